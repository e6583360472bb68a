"""Progressive training (the official VAR trainer's ``--pg``, ``--pg0``, ``--pgwp``).

Over the first ``fraction`` of the run the model learns a growing prefix of the
pyramid: scales ``0..stage``, with ``stage`` rising from ``first_stage`` to the last
scale (utils/arg_util.py and train.py of FoundationVision/VAR). Each stage after the
first brings one new scale whose loss weight ramps linearly from 1% to 100% over
``warmup_fraction`` of the run; the earlier scales keep their full weight, and every
token still weighs ``1 / L`` of the whole pyramid (trainer.py's ``loss_weight``).
After ``fraction``, every scale trains as without progression.

How it composes with a family's segment cycle (``Family.schedule``): stage ``s``
keeps the cycle's segments that begin at or below ``s``, in their order (a shorter
cycle, still indexed by the global step), and cuts the one holding ``s`` to end
there. VAR and M-VAR (one
segment) train ``[0, s]``; MVAR at 256 px trains ``[0, s]`` while ``s`` is a small
scale and, once the large scales arrive, ``1-10`` eight times per 13x13 step, then
the full 8:1:1 cycle. The official MVAR trainer has no progressive training; this
composition is this implementation's.

Everything here is a function of the global step, so a resumed run continues in
the same stage with the same weight (the official trainer checkpoints ``prog_it``).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.segments import Segment, SegmentSchedule

# The new scale's weight never falls below this (trainer.py: ``max(..., 0.01)``).
_RAMP_FLOOR = 0.01


@dataclasses.dataclass(frozen=True)
class ProgressiveConfig:
    """A config's ``progressive`` section.

    Attributes:
      fraction: share of the run over which the stage grows (the official ``--pg``);
        0 turns progression off. The learning-rate schedule becomes ``lin<fraction>``
        (official: ``sche = f'lin{pg:g}'``).
      first_stage: the last scale index taught at the start (``--pg0``; 0: the 1x1 map).
      warmup_fraction: share of the run over which a new scale's loss weight ramps up
        (``--pgwp`` epochs of ``--ep``; its default ``ep / 300``).
    """

    fraction: float = 0.0
    first_stage: int = 4
    warmup_fraction: float = 1 / 300

    def __post_init__(self):
        if not 0 <= self.fraction < 1:
            raise ValueError(f"fraction={self.fraction} must be in [0, 1) (0: no progressive training)")
        if not isinstance(self.first_stage, int) or self.first_stage < 0:
            raise ValueError(f"first_stage={self.first_stage!r} must be a scale index >= 0")
        if not 0 < self.warmup_fraction <= 1:
            raise ValueError(f"warmup_fraction={self.warmup_fraction} must be in (0, 1]")

    @property
    def enabled(self) -> bool:
        return self.fraction > 0

    @property
    def lr_schedule(self) -> str:
        """The learning-rate schedule the official trainer switches to."""
        return f"lin{self.fraction:g}"


def stage_at(
    step: int, *, num_scales: int, total_steps: int, lr_warmup_steps: float, progressive: ProgressiveConfig
) -> int:
    """The last scale index taught at global ``step`` (0-based): the official rule, in which
    the stage holds at ``first_stage`` through the learning-rate warm-up and then grows with
    Python's ``round`` (ties to even) until ``fraction * total_steps``."""
    last = num_scales - 1
    if not progressive.enabled:
        return last
    if step <= lr_warmup_steps:
        return progressive.first_stage
    end = total_steps * progressive.fraction
    if step >= end:
        return last
    progress = min(max((step - lr_warmup_steps) / (end - lr_warmup_steps), 0), 1)
    return progressive.first_stage + round(progress * (last - progressive.first_stage))


class Ramp(NamedTuple):
    """Scale ``scale``'s loss weight at a step: ``(step - start + 1) / steps``, in [0.01, 1]."""

    scale: int
    start: int  # the first step of the stage that brought the scale
    steps: float

    def weight(self, step: jax.Array) -> jax.Array:
        return jnp.clip((step - self.start + 1) / self.steps, _RAMP_FLOOR, 1.0)


class StepPlan(NamedTuple):
    """What one compiled train step teaches: a segment, and the ramp of its newest scale."""

    segment: Segment
    ramp: Ramp | None = None


class Curriculum:
    """Which ``StepPlan`` each global step runs: the family's segment cycle, cut to the stage.

    Without progression the plans are the schedule's segments in their order and the
    step's plan is the cycle's, unchanged.
    """

    def __init__(
        self,
        schedule: SegmentSchedule,
        *,
        num_scales: int,
        total_steps: int,
        lr_warmup_steps: float,
        progressive: ProgressiveConfig,
    ):
        if progressive.enabled and progressive.first_stage >= num_scales:
            raise ValueError(
                f"first_stage={progressive.first_stage} must be below the {num_scales} scales of the pyramid"
            )
        self._stage = lambda step: stage_at(
            step,
            num_scales=num_scales,
            total_steps=total_steps,
            lr_warmup_steps=lr_warmup_steps,
            progressive=progressive,
        )
        starts = _stage_starts(self._stage, total_steps)
        first, last = self._stage(0), num_scales - 1
        self.plans: list[StepPlan] = []
        self._cycles: dict[int, tuple[int, ...]] = {}
        for stage, start in starts.items():
            ramp = None
            if stage not in (first, last):  # the first stage is already eased in by the lr warm-up
                ramp = Ramp(stage, start, progressive.warmup_fraction * total_steps)
            cycle = []
            for index in schedule.cycle:
                segment = schedule.segments[index]
                if segment.first_scale > stage:
                    continue
                cut = Segment(segment.first_scale, min(segment.last_scale, stage + 1))
                cycle.append(self._plan_index(StepPlan(cut, ramp if cut.last_scale == stage + 1 else None)))
            self._cycles[stage] = tuple(cycle)

    def _plan_index(self, plan: StepPlan) -> int:
        if plan not in self.plans:
            self.plans.append(plan)
        return self.plans.index(plan)

    def stage_at(self, step: int) -> int:
        return self._stage(step)

    def index_at(self, step: int) -> int:
        """Index into ``plans`` of the plan that global step ``step`` runs."""
        cycle = self._cycles[self._stage(step)]
        return cycle[step % len(cycle)]

    def plan_at(self, step: int) -> StepPlan:
        return self.plans[self.index_at(step)]


def _stage_starts(stage_of, total_steps: int) -> dict[int, int]:
    """The first step of each stage that occurs in ``[0, total_steps)``; the stage never
    falls as the step grows, so a bisection finds each start."""
    steps = range(max(total_steps, 1))
    starts, step = {}, 0
    while step < len(steps):
        stage = stage_of(step)
        starts[stage] = step
        step = bisect.bisect_right(steps, stage, lo=step, key=stage_of)
    return starts


def token_weights(
    segment: Segment, ramp: Ramp | None, config: TransformerConfig, step: jax.Array
) -> jax.Array | None:
    """``(l,)`` loss weight of each token of ``segment`` at ``step`` (None: all 1). The
    ramped scale is the segment's last (a stage cuts its segment there)."""
    if ramp is None:
        return None
    if ramp.scale != segment.last_scale - 1:
        raise ValueError(f"the ramped scale {ramp.scale} must end the segment {segment}")
    begin, end = config.token_range(segment.first_scale, segment.last_scale)
    new = config.patch_nums[ramp.scale] ** 2
    return jnp.concatenate([jnp.ones(end - begin - new), jnp.full(new, ramp.weight(step))])
