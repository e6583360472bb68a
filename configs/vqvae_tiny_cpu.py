"""A small multi-scale VQVAE trained on the built-in shapes; finishes on 2 CPU cores in minutes.

    python train.py --config configs/vqvae_tiny_cpu.py --workdir /tmp/vqvae_tiny

Not an official setting (every value is our choice, sized for a CPU): 32 px
images, 4x downsampling to 8x8 latents, six scales, a 512-code book, the
official training losses (L2 + VQ) and the dead-code restart.

Chosen for the demo by what the generator needs, not by PSNR alone: how many of
its reconstructions the demo's classifier recognises (docs/benchmarks.md, "The
demo"). 64 px images with 8x downsampling give the same 8x8 token maps, but the
first level at full resolution makes each step several times dearer, and within
a CPU budget their reconstructions lose the shapes' corners. The export
(WORKDIR/model) is a tokenizer directory that configs/tiny_cpu.py can use as
``--config.vqvae_checkpoint``.
"""

from mvar_jax.configs import common


def get_config():
    c = common.tokenizer_config()

    m = c.model
    m.ch = 32
    m.ch_mult = (1, 2, 2)  # 4x downsampling: 32 px -> 8x8
    m.num_res_blocks = 1
    m.using_sa = False  # attention costs more than it gives at this size
    m.using_mid_sa = False
    m.vocab_size = 512
    m.z_channels = 16
    m.patch_nums = (1, 2, 3, 4, 6, 8)
    m.using_znorm = True  # cosine code lookup: far higher code usage from the first steps

    common.use_builtin_shapes(c, image_size=32)

    c.batch_size = 16
    c.num_train_steps = 1000  # the demo's tokenizer: docs/benchmarks.md, "The demo"

    c.loss.l2 = 1.0
    c.loss.vq = 1.0

    c.optim = common.tokenizer_optim(
        base_lr=2e-3, b1=0.9, b2=0.99, warmup_fraction=0.02, schedule="cos", final_lr_ratio=0.1
    )

    c.codebook.window = 50
    c.codebook.dead_after = 10

    c.log_every = 20
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.eval_every = 500
    c.eval_images = 500  # the whole builtin_shapes validation split
    c.eval_batch_size = 100
    c.grid_images = 16
    return c
