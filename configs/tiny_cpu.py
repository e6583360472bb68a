"""A small MVAR trained on the built-in shapes dataset; finishes on 2 CPU cores in minutes.

    python train.py --config configs/tiny_cpu.py --workdir /tmp/tiny

Not an official setting: it exercises the whole official pipeline (tokenizer,
8:1 segment cycle, recipe, checkpoints, export) at toy size. The official VQVAE
(vae_ch160v4096z32.pth) cannot be downloaded here, so the tokenizer is the tiny
random-weight VQVAE of the parity fixtures (official layout: vocab 64, Cvae 8,
16x downsampling). Its tokens are a fixed function of the image, which is all
the transformer needs to learn; decoded samples are not meant to look like the
data. 64 px images give 4x4 token maps, hence patch_nums (1, 2, 3, 4).
"""

from configs import common


def get_config():
    c = common.get_config()
    c.vqvae_checkpoint = "tests/fixtures/official/tiny_vae.pth"

    m = c.model
    m.depth = 2
    m.embed_dim = 64  # 4 heads of 16
    m.num_heads = 4
    m.drop_path_rate = 0.0
    m.patch_nums = (1, 2, 3, 4)  # 64 px / 16
    m.refine_step = 3  # scales 1..3 together, the 4x4 scale with spatial-Markov attention
    m.kernel_size = 3  # must fit the 4x4 map
    m.dtype = "float32"  # bfloat16 matmuls are slow on CPUs

    common.use_builtin_shapes(c)

    c.batch_size = 32
    c.num_epochs = 2  # 2 x 157 steps
    c.init.adaln_gamma = 1e-3
    # A 0.17M-parameter model at batch 32 wants a far larger step than tblr 1e-4.
    c.optim.base_lr = 0.02  # peak lr 2.5e-3
    c.optim.final_lr_ratio = 0.1

    c.log_every = 20
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.sample_every = 157  # a grid after each epoch
    c.sample_classes = tuple(range(10))
    c.sample_cfg = 1.5
    c.sample_top_k = 0  # the 64-token vocabulary needs no filtering
    c.sample_top_p = 0.0
    return c
