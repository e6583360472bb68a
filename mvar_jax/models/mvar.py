"""MVAR (arXiv 2505.12742): scale-Markov and spatial-Markov attention, nothing carried between scales.

Each scale attends only within itself (its input tokens already carry the
previous scale), and from ``refine_step`` on each token only to a
``kernel_size``-square neighbourhood of its own map. Inference therefore keeps no
cache, and training splits the pyramid into segments: scales ``[0, refine_step)``
in one call, then every larger scale alone, ``ratio_k`` steps on the first for
one on each of the others (8:1:1 at the official 10 scales and refine step 8).
"""

from __future__ import annotations

from mvar_jax.kernels.spatial_markov import Tiling
from mvar_jax.models import attention
from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.family import Family, no_state
from mvar_jax.models.layers import AdaLNSelfAttn
from mvar_jax.models.segments import Segment, SegmentSchedule


def check_refine_step(refine_step: int, num_scales: int, *, training: bool = False) -> None:
    """The one rule for ``refine_step``, the first scale with spatial-Markov attention.

    Scales ``[0, refine_step)`` attend within themselves, so the model accepts
    ``[1, num_scales]``. Training teaches those scales in one segment, which must
    reach beyond the start token's 1x1 scale (the official trainer asserts
    ``prog_ed > 0``), hence ``[2, num_scales]`` with ``training=True``.
    """
    low = 2 if training else 1
    if not low <= refine_step <= num_scales:
        raise ValueError(
            f"refine_step must be in [{low}, {num_scales}] for {num_scales} scales, got {refine_step}"
        )


def check(config: TransformerConfig) -> None:
    check_refine_step(config.refine_step, config.num_scales)
    spatial = config.patch_nums[config.refine_step :]
    if spatial and config.kernel_size > min(spatial):
        raise ValueError(
            f"kernel_size {config.kernel_size} exceeds the smallest spatial-Markov "
            f"scale ({min(spatial)}) at refine_step {config.refine_step}"
        )


def attend(
    q,
    k,
    v,
    config: TransformerConfig,
    first_scale: int,
    last_scale: int,
    scale: float,
    *,
    spatial: bool = True,
):
    """Scale-Markov attention, spatial-Markov from ``refine_step`` on; ``spatial=False``:
    every scale attended whole (M-VAR's attention)."""
    return attention.markov_attention(
        q,
        k,
        v,
        patch_nums=config.patch_nums,
        first_scale=first_scale,
        last_scale=last_scale,
        scale=scale,
        refine_step=config.refine_step if spatial else config.num_scales,
        kernel_size=config.kernel_size,
        impl=config.neighborhood_impl,
        tiling=None if config.neighborhood_tiling is None else _tiling(*config.neighborhood_tiling),
        lean_backward=config.lean_attention_backward,
    )


def _tiling(block_q: int, block_k: int, num_warps: int, num_stages: int) -> Tiling:
    return Tiling(block_q, block_k, num_warps=num_warps, num_stages=num_stages)


def keys_per_query(config: TransformerConfig, si: int) -> int:
    pn = config.patch_nums[si]
    return pn * pn if si < config.refine_step else config.kernel_size**2


def schedule(config: TransformerConfig, ratio_k: int) -> SegmentSchedule:
    """``[0, refine_step)`` together ``ratio_k`` times, then each larger scale once.

    The official trainer picks the large scale of cycle position ``p >= ratio_k`` as
    ``refine_step + p % ratio_k`` (``p - 1`` when ratio_k is 1); that is
    ``refine_step + (p - ratio_k)`` whenever ratio_k is 1 or at least the number of
    large scales, which covers every official setting. The general form is used
    here, so every large scale is visited once per cycle for any ratio_k.
    """
    if ratio_k < 1:
        raise ValueError(f"ratio_k must be >= 1, got {ratio_k}")
    num_scales, refine_step = config.num_scales, config.refine_step
    check_refine_step(refine_step, num_scales, training=True)
    segments = (Segment(0, refine_step),) + tuple(Segment(s, s + 1) for s in range(refine_step, num_scales))
    return SegmentSchedule(segments, (0,) * ratio_k + tuple(range(1, len(segments))))


FAMILY = Family(
    name="mvar",
    title="MVAR",
    summary="scale-Markov and spatial-Markov attention, no KV cache",
    block=AdaLNSelfAttn,
    attend=attend,
    keys_per_query=keys_per_query,
    spatial_markov=True,
    init_state=no_state,
    state_in_place=False,
    any_first_scale=True,
    guides_at_cfg_one=False,
    schedule=schedule,
    check=check,
    release_key="mvar_wo_ddp",
    training_mask=attention.block_diagonal_mask,
)
