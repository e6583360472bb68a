"""Which scales one training step teaches: segments of the pyramid and the cycle over them.

A family decides its own schedule (``Family.schedule``): VAR and M-VAR teach the
whole pyramid in every step; MVAR, whose scales need only their own inputs,
teaches the small scales together and each large scale alone, in a cycle. The
cycle is indexed by the global step, so a resumed run picks up mid-cycle. Each
segment has its own static shapes, hence its own compiled train step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class Segment(NamedTuple):
    """Scales ``[first_scale, last_scale)`` of the pyramid, taught in one call."""

    first_scale: int
    last_scale: int

    def name(self, patch_nums: Sequence[int]) -> str:
        """Short label for logs, e.g. ``'1-8'`` or ``'13'`` (patch sides)."""
        first, last = patch_nums[self.first_scale], patch_nums[self.last_scale - 1]
        return str(first) if first == last else f"{first}-{last}"


class SegmentSchedule(NamedTuple):
    """The segments and the cyclic order in which steps visit them."""

    segments: tuple[Segment, ...]
    cycle: tuple[int, ...]  # Indices into ``segments``, one per step of a cycle.

    def index_at(self, step: int) -> int:
        """Index of the segment that global step ``step`` (0-based) trains."""
        return self.cycle[step % len(self.cycle)]

    def segment_at(self, step: int) -> Segment:
        return self.segments[self.index_at(step)]


def whole_pyramid(num_scales: int) -> SegmentSchedule:
    """Every scale in every step."""
    return SegmentSchedule((Segment(0, num_scales),), (0,))
