"""Defaults shared by the training configs.

``trainer_config()`` holds the trainer's own settings (steps, batch, logging,
checkpoints, data, parallelism), which every task's config starts from.
``get_config()`` adds the generator (VAR / MVAR / M-VAR) with the official recipe's fixed
values. Sources are the official MVAR code (CVL-UESTC/MVAR): ``utils/arg_util.py``
(flag defaults), ``utils/lr_control.py`` (schedule, no-decay set), ``train.py``
(optimizer), ``trainer.py`` (loss, 8:1:1 schedule) and ``models/__init__.py``
(architecture per depth). VAR (FoundationVision/VAR) shares all of them. Each
experiment file overrides what its README command line sets.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from mvar_jax.data.config import default_config as data_default_config

IMAGENET_TRAIN_EXAMPLES = 1_281_167  # ILSVRC-2012 train split.


def trainer_config() -> ml_collections.ConfigDict:
    """What the trainer reads, for every task; the task's config sets ``task`` and the rest."""
    c = ml_collections.ConfigDict()
    c.task = ""  # which model trains: 'generator' (VAR/MVAR) or 'tokenizer' (the VQVAE);
    # see mvar_jax.training.trainer.TASKS
    c.seed = 0
    c.data = data_default_config()
    c.num_train_examples = 0  # the train split's size, if the data source does not report it
    c.batch_size = 0  # global, over all devices and hosts
    c.num_epochs = 0
    c.num_train_steps = -1  # > 0 overrides num_epochs (tests, smoke runs)

    c.log_every = 100  # steps between console/TensorBoard logs
    c.checkpoint_every = 2000  # steps between train-state checkpoints
    c.keep_checkpoints = 3  # newest train-state checkpoints kept
    c.async_checkpointing = True  # save in the background while training continues

    p = c.parallel = ml_collections.ConfigDict()
    # Shard params + optimizer state over all devices (FSDP) instead of
    # replicating them; for d24/d30 on small-memory devices.
    p.fsdp = False
    p.fsdp_min_size = 2**16  # arrays smaller than this stay replicated
    dist = p.distributed = ml_collections.ConfigDict()
    dist.enabled = False  # call jax.distributed.initialize (multi-host)
    dist.coordinator_address = config_dict.placeholder(str)  # None: auto-detect
    dist.num_processes = -1  # -1: auto-detect
    dist.process_id = -1  # -1: auto-detect
    return c


def get_config() -> ml_collections.ConfigDict:
    """The generator's defaults: the official VAR / MVAR recipe on ImageNet 256 px."""
    c = trainer_config()
    c.task = "generator"  # the VAR/MVAR transformer on a frozen VQVAE
    c.seed = 0  # arg_util.py --seed (None there: nondeterministic); fixed here

    m = c.model = ml_collections.ConfigDict()
    # 'mvar' (scale/spatial-Markov), 'var' (block-causal baseline) or 'mamba' (M-VAR:
    # attention within each scale, Mamba2 across the pyramid).
    m.name = "mvar"
    m.depth = 16  # --depth
    # None derives the size from depth, as models/__init__.py does:
    m.embed_dim = config_dict.placeholder(int)  # width = depth * 64
    m.num_heads = config_dict.placeholder(int)  # heads = depth
    m.drop_path_rate = config_dict.placeholder(float)  # dpr = 0.1 * depth / 24
    m.mlp_ratio = 4.0  # MVAR(mlp_ratio=4.0) default
    m.norm_eps = 1e-6  # models/__init__.py: norm_eps=1e-6
    m.shared_aln = False  # --saln False
    m.attn_l2_norm = True  # --anorm True
    m.patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # --pn 1_2_3_4_5_6_8_10_13_16 (256 px)
    m.kernel_size = 7  # --kernel_size 7 (spatial-Markov neighbourhood)
    m.refine_step = 8  # --refine_step 8 (scales 13 and 16 use spatial-Markov attention)
    m.cond_drop_rate = 0.1  # models/__init__.py: cond_drop_rate=0.1 (class dropout for CFG)
    # README trains with --fp16=1 (float16 autocast + GradScaler); bfloat16 compute
    # needs no loss scaling. Params, optimizer state and loss stay float32.
    m.dtype = "bfloat16"
    m.neighborhood_impl = "auto"  # Pallas kernel on GPU, the lean "masked" XLA path elsewhere

    init = c.init = ml_collections.ConfigDict()
    init.adaln = 0.5  # --aln: ada_lin weight multiplier
    init.adaln_gamma = 1e-5  # --alng: multiplier of ada_lin's gate (gamma) columns
    init.head = 0.02  # --hd: head weight multiplier
    init.std = -1.0  # --ini -1: automatic, sqrt(1 / (3 * embed_dim)); the only one supported

    # The official tokenizer (the VAR release's vae_ch160v4096z32.pth, or a model
    # directory holding it), loaded at every start; it is frozen during training.
    c.vqvae_checkpoint = "pretrained/vae_ch160v4096z32.pth"  # --vae_ckpt
    # --finetune_from_var: official VAR .pth (or converted model dir) to start from.
    c.finetune_from = ""

    d = c.data
    d.name = "imagenet2012"  # --data_path: ImageNet-1k train/
    d.image_size = 256  # data_load_reso = max(patch_nums) * patch_size 16
    d.crop = "adm_center_crop"  # MVAR utils/data.py: ADM centre crop for train and val
    d.hflip = False  # --hflip False
    d.num_classes = 1000  # utils/data.py: num_classes = 1000
    c.num_train_examples = IMAGENET_TRAIN_EXAMPLES  # steps/epoch = ceil(examples / batch_size)

    c.batch_size = 64  # --bs (global); every README command overrides it
    c.num_epochs = 250  # --ep
    c.ratio_k = 8  # --ratio_k 8: steps on scales [0, refine_step) per step on each larger scale
    c.label_smoothing = 0.0  # --ls 0.0

    o = c.optim = ml_collections.ConfigDict()
    o.base_lr = 1e-4  # --tblr; peak lr tlr = tblr * batch_size / 256
    o.b1, o.b2 = 0.9, 0.95  # train.py: AdamW betas=(0.9, 0.95)
    o.eps = 1e-8  # torch.optim.AdamW default eps
    o.weight_decay = 0.05  # --twd
    o.weight_decay_end = 0.05  # --twde 0 -> twde = twd (cosine from twd to twde)
    o.grad_clip = 2.0  # --tclip (global-norm clipping; <= 0 disables)
    o.schedule = "lin0"  # --sche lin0: hold 5% after warm-up, then linear decay
    o.warmup_fraction = 1 / 50  # --wp 0 -> wp = ep / 50 epochs
    o.warmup_start = 0.005  # --wp0: lr ratio at the start of warm-up
    o.final_lr_ratio = 0.01  # --wpe: lr ratio at the end of training

    c.sample_every = 10_000  # steps between sample grids (0: never)
    c.sample_classes = (980, 980, 437, 437, 22, 22, 562, 562)  # VAR demo_sample.ipynb
    c.sample_cfg = 2.7  # README: suggested d16 sampling cfg=2.7, top_p=0.99, top_k=1200
    c.sample_top_k = 1200
    c.sample_top_p = 0.99
    return c


def check_depth(file: str, depth: str | None, depths: tuple[str, ...]) -> int:
    """The depth of ``--config configs/<file>.py:<depth>`` ('d16' -> 16); a ValueError showing
    the spelling when ``depth`` is not one of ``depths``."""
    if depth not in depths:
        raise ValueError(
            f"configs/{file}.py takes the depth, one of {', '.join(depths)}: "
            f"--config configs/{file}.py:{depths[0]} (got {depth!r})"
        )
    return int(depth[1:])


def use_builtin_shapes(c: ml_collections.ConfigDict, image_size: int = 64) -> None:
    """Points a config at the built-in shapes dataset (no download), drawn at ``image_size`` px."""
    c.data.name = "builtin_shapes"
    c.data.image_size = image_size
    c.data.crop = "resize_random_crop"
    c.data.num_classes = 10
    c.data.num_workers = 2
    c.num_train_examples = 5000  # builtin_shapes train split


def adam_config(lr: float, b1: float, b2: float) -> ml_collections.ConfigDict:
    """An optimizer block of the tokenizer (``mvar_jax.training.tokenizer.make_optimizer``)."""
    o = ml_collections.ConfigDict()
    o.lr = lr  # peak learning rate (absolute, not scaled by the batch)
    o.b1, o.b2 = b1, b2
    o.eps = 1e-8
    o.weight_decay = 0.0  # on arrays of >= 2 dims (kernels, the codebook)
    o.grad_clip = 0.0  # global-norm clipping; <= 0 disables
    o.schedule = "cos"  # 'cos' | 'lin' | 'lin0' after the warm-up (mvar_jax.training.optimizer)
    o.warmup_steps = 0
    o.warmup_start = 0.0  # lr ratio at the start of warm-up
    o.final_lr_ratio = 1.0  # lr ratio at the last step (1: constant after warm-up)
    return o


def tokenizer_config() -> ml_collections.ConfigDict:
    """The tokenizer's fields (``config.task = 'tokenizer'``); recipes set their values.

    Defaults: the released VQVAE's architecture (vae_ch160v4096z32.pth), the
    official training forward's losses (L2 + VQ), no LPIPS, no GAN.
    """
    c = trainer_config()
    c.task = "tokenizer"

    m = c.model = ml_collections.ConfigDict()  # mvar_jax.models.vqvae.VQVAEConfig
    m.vocab_size = 4096
    m.z_channels = 32  # Cvae
    m.ch = 160
    m.ch_mult = (1, 1, 2, 2, 4)  # downsampling 2 ** (len - 1)
    m.num_res_blocks = 2
    m.using_sa = True
    m.using_mid_sa = True
    m.quant_conv_ks = 3
    m.quant_resi = 0.5
    m.share_quant_resi = 4
    m.using_znorm = False
    m.beta = 0.25  # commitment weight inside the VQ loss
    m.patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # last = image_size / downsampling

    loss = c.loss = ml_collections.ConfigDict()
    loss.l1 = 0.0
    loss.l2 = 1.0
    loss.vq = 1.0  # weight of the VQ loss (beta is in model)
    loss.lpips = 0.0  # > 0 needs the two weight files below
    loss.lpips_vgg = ""  # torchvision's vgg16 state dict (.pth), see mvar_jax/models/lpips.py
    loss.lpips_lin = ""  # the lpips package's weights/v0.1/vgg.pth

    gan = c.gan = ml_collections.ConfigDict()
    gan.weight = 0.0  # 0: no discriminator; else the GAN loss weight (times the adaptive ratio)
    gan.adaptive = True  # VQGAN's adaptive weight at the decoder's last layer
    gan.start = 0  # the first step that trains the discriminator and uses its loss
    gan.loss = "hinge"  # or 'vanilla'
    gan.ndf = 64
    gan.n_layers = 3
    gan.optim = adam_config(lr=1e-4, b1=0.5, b2=0.9)

    c.optim = adam_config(lr=1e-4, b1=0.5, b2=0.9)

    cb = c.codebook = ml_collections.ConfigDict()
    cb.window = 100  # steps of the usage window (usage/<pn>x<pn>, perplexity)
    cb.dead_after = 0  # re-seed codes no scale chose for this many steps (0: never)

    c.eval_every = 1000  # steps between evaluations (0: never)
    c.eval_images = 500  # validation images per evaluation
    c.eval_batch_size = 50  # global
    c.grid_images = 8  # input|reconstruction pairs in the grid (<= eval_batch_size)
    return c
