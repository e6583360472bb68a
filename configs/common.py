"""Defaults shared by the training configs.

``trainer_config()`` holds the trainer's own settings (steps, batch, logging,
checkpoints, data, parallelism), which every task's config starts from.
``get_config()`` adds the generator (VAR / MVAR / M-VAR) with the official recipe's fixed
values; ``tokenizer_config()`` the VQVAE. A section that a dataclass reads
(``model``, ``init``, ``optim``, ``sampling``) is made from that dataclass
(``from_dataclass``): its fields and defaults are written once, in the
dataclass, and the task builds the dataclass from the section. Sources are the
official MVAR code (CVL-UESTC/MVAR): ``utils/arg_util.py`` (flag defaults),
``utils/lr_control.py`` (schedule, no-decay set), ``train.py`` (optimizer),
``trainer.py`` (loss, 8:1:1 schedule) and ``models/__init__.py`` (architecture per
depth). VAR (FoundationVision/VAR) shares all of them. Each experiment file
overrides what its README command line sets.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from mvar_jax.data.config import default_config as data_default_config
from mvar_jax.models.config import InitScales, TransformerConfig
from mvar_jax.models.vqvae import VQVAEConfig
from mvar_jax.sampling.options import SamplingOptions
from mvar_jax.training.codebook import CodebookConfig
from mvar_jax.training.optimizer import OptimizerConfig
from mvar_jax.training.progressive import ProgressiveConfig

IMAGENET_TRAIN_EXAMPLES = 1_281_167  # ILSVRC-2012 train split.
# The repository: the tiny configs' tokenizers and the demo's outputs are paths in it, so that a
# command run from any directory finds them.
REPO = pathlib.Path(__file__).resolve().parents[1]


# TransformerConfig fields a run does not choose: the tokenizer and the data decide them.
FROM_TOKENIZER_AND_DATA = ("vocab_size", "cvae", "num_classes")


def from_dataclass(cls: type, exclude: tuple[str, ...] = (), **values: Any) -> ml_collections.ConfigDict:
    """A config section holding ``cls``'s fields with its defaults, ``values`` overriding them.

    A None default (or value) becomes a typed placeholder, so the command line can
    still set it (``--config.model.embed_dim=512``). The task builds the dataclass
    back with ``cls(**section)``.
    """
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    section = ml_collections.ConfigDict()
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        value = values.get(field.name, field.default)
        if value is None:
            value = config_dict.placeholder(_base_type(hints[field.name]))
        section[field.name] = value
    return section


def _base_type(hint: Any) -> type:
    """``int`` of ``int | None``, ``tuple`` of ``tuple[int, ...]``: what a placeholder holds."""
    if isinstance(hint, types.UnionType):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    return typing.get_origin(hint) or hint


def trainer_config() -> ml_collections.ConfigDict:
    """What the trainer reads, for every task; the task's config sets ``task`` and the rest."""
    c = ml_collections.ConfigDict()
    c.task = ""  # which model trains: 'generator' (MVAR, VAR, M-VAR) or 'tokenizer' (the VQVAE);
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
    c.task = "generator"  # an MVAR / VAR / M-VAR transformer on a frozen VQVAE
    c.seed = 0  # arg_util.py --seed (None there: nondeterministic); fixed here

    # TransformerConfig's defaults are the official MVAR-d16's (models/__init__.py and
    # utils/arg_util.py: mlp_ratio 4, norm_eps 1e-6, --saln False, --anorm True,
    # --kernel_size 7, --refine_step 8, cond_drop_rate 0.1); a run sets what differs.
    c.model = from_dataclass(
        TransformerConfig,
        exclude=FROM_TOKENIZER_AND_DATA,
        family="mvar",  # models.families: 'mvar', 'var' (the baseline) or 'm_var' (M-VAR)
        depth=16,  # --depth; width 64 * depth and depth heads when embed_dim / num_heads are None
        patch_nums=None,  # the tokenizer's pyramid (the release .pth: --pn 1_2_3_4_5_6_8_10_13_16)
        drop_path_rate=None,  # dpr = 0.1 * depth / 24 (models/__init__.py)
        # README trains with --fp16=1 (float16 autocast + GradScaler); bfloat16 compute
        # needs no loss scaling. Params, optimizer state and loss stay float32.
        dtype="bfloat16",
        # The backward pass recomputes each block when its gradient arrives: the official H100
        # peaks at the official batches (docs/benchmarks.md), for a third more FLOPs.
        remat="block",
    )
    # --aln 0.5, --alng 1e-5, --hd 0.02, --ini -1 (the official defaults; InitScales').
    c.init = from_dataclass(InitScales)

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
    # --ac 1: each step's batch as this many micro-batches run one after another (one update,
    # one micro-batch's activations in memory); batch_size stays the update's batch.
    c.grad_accum_steps = 1

    # OptimizerConfig's defaults are the official recipe: --tblr 1e-4 per 256 images,
    # AdamW betas (0.9, 0.95) and eps 1e-8 (train.py), --twd 0.05 with --twde 0 (constant),
    # --tclip 2, --sche lin0, --wp 0 (ep / 50), --wp0 0.005, --wpe 0.01.
    c.optim = from_dataclass(OptimizerConfig)
    # --pg 0 (off), --pg0 4, --pgwp 0 (-> ep / 300): VAR's progressive training; on, it sets
    # the lr schedule to lin<fraction> as the official arg_util.py does.
    c.progressive = from_dataclass(ProgressiveConfig)

    c.sample_every = 10_000  # steps between sample grids (0: never)
    # The official eval_ep: every val_every steps, each scale's teacher-forced loss and accuracy
    # on the validation split (data's eval split, or its token cache) (0: never).
    c.val_every = 0
    c.val_images = 0  # the first this many validation images (0: the whole split)
    c.val_batch_size = 64  # global
    c.sample_classes = (980, 980, 437, 437, 22, 22, 562, 562)  # VAR demo_sample.ipynb
    # The sample grid: MVAR's README suggests cfg 2.7, top-p 0.99, top-k 1200 for d16 (the
    # papers' FID setting, SamplingOptions' defaults, is cfg 1.5, top-k 900, top-p 0.96).
    c.sampling = from_dataclass(SamplingOptions, cfg=2.7, top_k=1200, top_p=0.99)
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


def tokenizer_optim(base_lr: float, b1: float, b2: float, **values: Any) -> ml_collections.ConfigDict:
    """A tokenizer's ``optim`` section: an absolute learning rate (no batch scaling), no
    weight decay, clipping, warm-up or decay unless ``values`` set them."""
    fields = dict(lr_batch=0, weight_decay=0.0, grad_clip=0.0, schedule="cos", warmup_fraction=0.0)
    fields.update(warmup_start=0.0, final_lr_ratio=1.0)
    return from_dataclass(OptimizerConfig, base_lr=base_lr, b1=b1, b2=b2, **{**fields, **values})


def tokenizer_config() -> ml_collections.ConfigDict:
    """The tokenizer's fields (``config.task = 'tokenizer'``); recipes set their values.

    Defaults: the released VQVAE's architecture (vae_ch160v4096z32.pth), the
    official training forward's losses (L2 + VQ), no LPIPS, no GAN.
    """
    c = trainer_config()
    c.task = "tokenizer"

    c.model = from_dataclass(VQVAEConfig)

    loss = c.loss = ml_collections.ConfigDict()
    loss.l1 = 0.0
    loss.l2 = 1.0
    loss.vq = 1.0  # weight of the VQ loss (beta is in model)
    loss.lpips = 0.0  # > 0 needs the two weight files below
    loss.lpips_vgg = ""  # torchvision's vgg16 state dict (.pth), see mvar_jax/weights/lpips.py
    loss.lpips_lin = ""  # the lpips package's weights/v0.1/vgg.pth

    gan = c.gan = ml_collections.ConfigDict()
    gan.weight = 0.0  # 0: no discriminator; else the GAN loss weight (times the adaptive ratio)
    gan.adaptive = True  # VQGAN's adaptive weight at the decoder's last layer
    gan.start = 0  # the first step that trains the discriminator and uses its loss
    gan.loss = "hinge"  # or 'vanilla'
    gan.ndf = 64
    gan.n_layers = 3
    gan.optim = tokenizer_optim(base_lr=1e-4, b1=0.5, b2=0.9)

    c.optim = tokenizer_optim(base_lr=1e-4, b1=0.5, b2=0.9)

    c.codebook = from_dataclass(CodebookConfig)  # usage window 100 steps, no dead-code restart

    c.eval_every = 1000  # steps between evaluations (0: never)
    c.eval_images = 500  # validation images per evaluation
    c.eval_batch_size = 50  # global
    c.grid_images = 8  # input|reconstruction pairs in the grid (<= eval_batch_size)
    return c
