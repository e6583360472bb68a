"""M-VAR at depth 16, 20 or 24 on ImageNet 256x256 (OliverRensu/MVAR README, "Training"). The
depth is the config's argument:

    python train.py --config configs/m_var.py:d16 --workdir DIR \
      --config.data.data_dir=/path/to/tfds

    torchrun --nproc_per_node=8 ... train.py --depth=16 --bs=768 --ep=200 --fp16=1 \
      --alng=1e-3 --wpe=0.1                                  # d20: --depth=20 --ep=250
    torchrun --nproc_per_node=8 ... train.py --depth=24 --bs=768 --ep=350 --tblr=8e-5 \
      --fp16=1 --alng=1e-4 --wpe=0.01

The README: "The hyperparameters of training are same as that in VAR". M-VAR's
utils/arg_util.py, utils/lr_control.py, utils/data.py and train.py's optimizer
are VAR's (configs/common.py's sources), and its trainer.py teaches every scale
in every step with VAR's 1 / L token weights (no segment cycle, no progressive
training: --pg 0). models/__init__.py sizes the model from --depth as VAR does
(width 64 * depth, depth heads, drop path 0.1 * depth / 24, cond_drop_rate 0.1,
norm_eps 1e-6); models/basic_mvar.py adds Mamba2(d_state=64, d_conv=4, expand=2)
per block (models.m_var.mamba_config). The official train.sh is a one-GPU d12
smoke run (--depth=12 --bs=16 --ep=200 --fp16=1 --alng=1e-3 --wpe=0.1).
"""

from __future__ import annotations

import ml_collections

from mvar_jax.configs import common
from mvar_jax.sampling.options import SamplingOptions

# --ep of each depth's README command.
_EPOCHS = {"d16": 200, "d20": 250, "d24": 350}
DEPTHS = tuple(_EPOCHS)


def get_config(depth: str | None = None) -> ml_collections.ConfigDict:
    """The M-VAR recipe at ``depth`` ('d16', 'd20' or 'd24')."""
    c = common.get_config()
    c.model.family = "m_var"  # M-VAR: attention within each scale, Mamba2 across the pyramid
    # --depth (embed 64 * depth, depth heads, drop path 0.1 * depth / 24: common.py);
    # d16: embed 1024, drop path 0.0667; d20: 1280, 0.0833; d24: 1536, 0.1.
    c.model.depth = common.check_depth("m_var", depth, DEPTHS)
    # arg_util.py's --anorm defaults to True and the commands do not set it, but the README
    # has d16 and d20 sampled with attn_l2_norm=False, and the released d16/d20 weights
    # hold no scale_mul: they were trained without L2-normalised attention. d24 keeps the
    # --anorm True default, which the README's note (d16, d20 only) leaves in place.
    c.model.attn_l2_norm = depth == "d24"
    # model.kernel_size, model.refine_step and ratio_k are MVAR's: M-VAR ignores them.
    c.batch_size = 768  # --bs=768 (global; peak lr tblr * 768 / 256)
    c.num_epochs = _EPOCHS[depth]  # --ep (warm-up ep / 50: arg_util.py --wp 0)
    if depth == "d24":
        c.optim.base_lr = 8e-5  # --tblr=8e-5 (peak lr 8e-5 * 768 / 256 = 2.4e-4)
        c.init.adaln_gamma = 1e-4  # --alng=1e-4
        c.optim.final_lr_ratio = 0.01  # --wpe=0.01
    else:
        # --tblr 1e-4 (arg_util.py default: common.py; peak lr 1e-4 * 768 / 256 = 3e-4)
        c.init.adaln_gamma = 1e-3  # --alng=1e-3
        c.optim.final_lr_ratio = 0.1  # --wpe=0.1
    # utils/data.py (VAR's): Lanczos-resize the shorter side to 1.125 * 256, random crop.
    c.data.crop = "resize_random_crop"
    # README, Inference: "For FID evaluation, we set cfg=1.5, top_p=0.96, top_k=900"
    # (SamplingOptions' defaults).
    c.sampling = common.from_dataclass(SamplingOptions)
    return c
