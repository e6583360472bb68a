"""Which scales a training step teaches: the segment schedule.

VAR teaches all scales at once through its block-causal mask, and so does M-VAR
(attention within each scale, its Mamba2 layers causal over the whole pyramid
in teacher forcing). MVAR's attention never looks further back than the previous
scale, so the official trainer splits
the pyramid into segments: scales ``[0, refine_step)`` in one call (block-diagonal
attention, cheap because the maps are small), then every larger scale alone with
spatial-Markov attention. A cycle spends ``ratio_k`` steps on the first segment and
one step on each larger scale (8:1:1 at the official 10 scales and refine_step 8).
The cycle is indexed by the global step, so a resumed run picks up mid-cycle.

Each segment has its own static shapes, hence its own compiled train step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from mvar_jax.models import transformer


class Segment(NamedTuple):
    """Scales ``[first_scale, last_scale)`` of the pyramid, taught in one call."""

    first_scale: int
    last_scale: int

    def name(self, patch_nums: Sequence[int]) -> str:
        """Short label for logs, e.g. ``'1-8'`` or ``'13'`` (patch sides)."""
        first, last = patch_nums[self.first_scale], patch_nums[self.last_scale - 1]
        return str(first) if first == last else f"{first}-{last}"


def mvar_segments(num_scales: int, refine_step: int) -> tuple[Segment, ...]:
    """``[0, refine_step)`` together, then each larger scale alone.

    ``refine_step`` must be trainable (``transformer.check_refine_step``).
    """
    transformer.check_refine_step(refine_step, num_scales, training=True)
    return (Segment(0, refine_step),) + tuple(Segment(s, s + 1) for s in range(refine_step, num_scales))


class SegmentSchedule(NamedTuple):
    """The segments and the cyclic order in which steps visit them."""

    segments: tuple[Segment, ...]
    cycle: tuple[int, ...]  # Indices into ``segments``, one per step of a cycle.

    def index_at(self, step: int) -> int:
        """Index of the segment that global step ``step`` (0-based) trains."""
        return self.cycle[step % len(self.cycle)]

    def segment_at(self, step: int) -> Segment:
        return self.segments[self.index_at(step)]


def make_schedule(
    model_name: str, num_scales: int, *, refine_step: int = 0, ratio_k: int = 1
) -> SegmentSchedule:
    """The official schedule: MVAR's ``ratio_k``:1:...:1 cycle, or VAR's and M-VAR's
    single segment (``refine_step`` and ``ratio_k`` are MVAR's alone).

    The official MVAR trainer picks the large scale of cycle position ``p >= ratio_k``
    as ``refine_step + p % ratio_k`` (``p - 1`` when ratio_k is 1); that is
    ``refine_step + (p - ratio_k)`` whenever ratio_k is 1 or at least the number of
    large scales, which covers every official setting. The general form is used here,
    so every large scale is visited once per cycle for any ratio_k.
    """
    if model_name not in transformer.ATTENTIONS:
        raise ValueError(f"unknown model name {model_name!r}; expected one of {transformer.ATTENTIONS}")
    if model_name != "mvar":  # VAR, M-VAR: every scale in every step.
        return SegmentSchedule((Segment(0, num_scales),), (0,))
    if ratio_k < 1:
        raise ValueError(f"ratio_k must be >= 1, got {ratio_k}")
    segments = mvar_segments(num_scales, refine_step)
    return SegmentSchedule(segments, (0,) * ratio_k + tuple(range(1, len(segments))))
