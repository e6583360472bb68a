"""A small MVAR on the built-in shapes: the demo's generator, trained on 2 CPU cores in minutes.

    python train.py --config configs/tiny_cpu.py --workdir demo_out   # after the demo's tokens
    python train.py --config configs/tiny_cpu.py:fixture --workdir /tmp/tiny

Not an official setting: the whole official pipeline (frozen tokenizer, segment
cycle, recipe, checkpoints, export) at toy size. Two tokenizers:

- ``demo`` (the default): the tiny multi-scale VQVAE that ``make demo`` trains
  with ``configs/vqvae_tiny_cpu.py`` into ``demo_out/tokenizer/model`` (vocab 512,
  Cvae 16, 4x downsampling: 8x8 token maps at 32 px), read through the token
  cache that ``make demo`` writes beside it. Its decoded samples show the classes.
- ``fixture``: the random-weight VQVAE of the parity fixtures (vocab 64, Cvae 8,
  16x downsampling: 4x4 maps at 64 px), which needs nothing but the repository; the tests
  train on it. Its tokens are a fixed function of the image, which is all the
  transformer needs to learn, but decoded samples are coloured noise.

Everything else is shared, and configs/tiny_cpu_var.py (VAR) derives from this file.
"""

from mvar_jax.configs import common

# Per tokenizer: its checkpoint, image size and token pyramid (None: the one the tokenizer
# directory records; an official-layout .pth records none), the MVAR attention
# fitted to that pyramid (refine_step: the first scale with spatial-Markov attention; the
# kernel must fit the smallest such map), and the run's size.
TOKENIZERS = {
    # 1x1..4x4 together, then 6x6 and 8x8 each with 3x3 neighbourhoods (the official
    # 256 px setting keeps the last two of ten scales for spatial-Markov attention).
    # Cycle [1-4, 1-4, 6x6, 8x8] (ratio_k 2): the official 8:1:1 has eight small scales
    # in the first segment, here it has four, so each large scale gets a quarter of the steps.
    "demo": dict(
        vqvae_checkpoint=str(common.REPO / "demo_out/tokenizer/model"),
        token_cache_dir=str(common.REPO / "demo_out/tokens"),
        image_size=32,
        patch_nums=None,  # the tokenizer directory records its pyramid: 1, 2, 3, 4, 6, 8
        refine_step=4,
        kernel_size=3,
        ratio_k=2,
        depth=4,
        embed_dim=128,
        # What these reach on the built-in shapes: docs/benchmarks.md, "The demo".
        num_train_steps=1800,
        base_lr=0.06,
        sample_every=0,
    ),  # mvar_jax.demo draws the grid from the export
    # The smoke-size run the tests and notebooks train: 2 epochs of 157 steps.
    "fixture": dict(
        vqvae_checkpoint=str(common.REPO / "tests/fixtures/official/tiny_vae.pth"),
        token_cache_dir=None,
        image_size=64,
        patch_nums=(1, 2, 3, 4),
        refine_step=3,
        kernel_size=3,
        ratio_k=8,
        depth=2,
        embed_dim=64,
        num_train_steps=314,
        base_lr=0.02,
        sample_every=157,
    ),  # a grid after each epoch
}


def get_config(tokenizer: str = "demo"):
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"configs/tiny_cpu.py:{tokenizer}: expected one of {tuple(TOKENIZERS)}")
    t = TOKENIZERS[tokenizer]
    c = common.get_config()
    c.vqvae_checkpoint = t["vqvae_checkpoint"]

    m = c.model
    m.depth = t["depth"]
    m.embed_dim = t["embed_dim"]
    m.num_heads = 4
    m.drop_path_rate = 0.0
    m.patch_nums = t["patch_nums"]
    m.refine_step = t["refine_step"]
    m.kernel_size = t["kernel_size"]
    m.dtype = "float32"  # bfloat16 matmuls are slow on CPUs
    m.remat = "none"  # a toy's activations are small: keep them and skip the recomputation

    common.use_builtin_shapes(c, image_size=t["image_size"])
    c.data.token_cache_dir = t["token_cache_dir"]

    c.batch_size = 32
    c.num_epochs = 0
    c.num_train_steps = t["num_train_steps"]
    c.ratio_k = t["ratio_k"]
    c.init.adaln_gamma = 1e-3
    # A small model at batch 32 wants a far larger step than tblr 1e-4.
    c.optim.base_lr = t["base_lr"]  # peak lr base_lr * 32 / 256
    c.optim.final_lr_ratio = 0.1

    c.log_every = 50
    c.checkpoint_every = 150
    c.keep_checkpoints = 2
    c.sample_every = t["sample_every"]
    c.sample_classes = tuple(range(10))
    c.sampling.top_k = 0  # the model's own distribution, as mvar_jax.eval.quality measures it
    c.sampling.top_p = 0.0
    return c
