"""M-VAR training recipes (OliverRensu/MVAR). NOT WIRED: train.py cannot train M-VAR yet.

The values are traced to the official code: ``README.md`` (the training command
per depth and the inference settings), ``utils/arg_util.py`` (flag defaults),
``models/__init__.py`` (architecture per depth) and ``train.py`` (optimizer);
``train.sh`` is a one-GPU d12 example (``--depth=12 --bs=16 --ep=200 --fp16=1
--alng=1e-3 --wpe=0.1``). M-VAR's ``utils/data.py``, ``lr_control.py`` and
``amp_sc.py`` are VAR's, and its recipe is VAR's: every scale in every step
(teacher forcing over scales [0, num_scales)), no segment cycle, no progressive
training (``--pg 0``).

This module deliberately has no ``get_config``: ``train.py --config`` refuses it
until the trainer learns M-VAR, and the wiring then exposes ``recipe(name)``
(e.g. ``get_config = recipe`` with ``--config configs/m_var_recipes.py:d16``).
"""

from __future__ import annotations

import ml_collections

from configs import common, tiny_cpu

# depth, --bs, --ep, --tblr, --alng, --wpe of the README's commands; attn_l2_norm
# per the README's inference note ("for d16, d20, set attn_l2_norm=False"; the
# released d16/d20 files have no scale_mul), else arg_util.py's --anorm True.
_OFFICIAL = {
    "d16": dict(depth=16, batch_size=768, num_epochs=200, base_lr=1e-4, adaln_gamma=1e-3,
                final_lr_ratio=0.1, attn_l2_norm=False),
    "d20": dict(depth=20, batch_size=768, num_epochs=250, base_lr=1e-4, adaln_gamma=1e-3,
                final_lr_ratio=0.1, attn_l2_norm=False),
    "d24": dict(depth=24, batch_size=768, num_epochs=350, base_lr=8e-5, adaln_gamma=1e-4,
                final_lr_ratio=0.01, attn_l2_norm=True),
}
RECIPES = (*_OFFICIAL, "tiny_builtin")


def _as_m_var(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.model.name = "mamba"  # TransformerConfig.attention of M-VAR
    # MVAR's spatial-Markov and segment settings (model.kernel_size, model.refine_step,
    # ratio_k) mean nothing to M-VAR: attention stays within whole scales and every
    # step trains all scales.
    c.model.shared_aln = False  # --saln False (the official shared AdaLN is 6-way: unusable)
    return c


def recipe(name: str) -> ml_collections.ConfigDict:
    """The config of an official recipe ('d16', 'd20', 'd24') or of 'tiny_builtin'
    (``configs/tiny_cpu.py``'s built-in data and budget, with M-VAR as the model)."""
    if name == "tiny_builtin":
        c = _as_m_var(tiny_cpu.get_config())  # depth 2, width 64: Mamba2 d_inner 128, 2 heads
        c.sample_cfg = 1.5  # README: cfg=1.5 (M-VAR guides at every cfg, as VAR)
        return c
    if name not in _OFFICIAL:
        raise ValueError(f"unknown M-VAR recipe {name!r}; choose from {RECIPES}")
    r = _OFFICIAL[name]
    c = _as_m_var(common.get_config())
    # models/__init__.py: width = 64 * depth, heads = depth, drop path 0.1 * depth / 24,
    # norm_eps 1e-6, cond_drop_rate 0.1, mlp_ratio 4 (common.py's derivations).
    c.model.depth = r["depth"]  # --depth
    c.model.attn_l2_norm = r["attn_l2_norm"]
    c.batch_size = r["batch_size"]  # --bs (global; peak lr = tblr * bs / 256)
    c.num_epochs = r["num_epochs"]  # --ep (warm-up ep / 50: arg_util.py, --wp 0)
    c.optim.base_lr = r["base_lr"]  # --tblr (arg_util.py default 1e-4)
    c.init.adaln_gamma = r["adaln_gamma"]  # --alng
    c.optim.final_lr_ratio = r["final_lr_ratio"]  # --wpe
    # utils/data.py (VAR's): shorter side to mid_reso 1.125 * 256, random 256 crop, no flip.
    c.data.crop = "resize_random_crop"
    # README, inference: "For FID evaluation, we set cfg=1.5, top_p=0.96, top_k=900".
    c.sample_cfg, c.sample_top_k, c.sample_top_p = 1.5, 900, 0.96
    return c
