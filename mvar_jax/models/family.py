"""What a model family is: everything that differs between VAR, MVAR and M-VAR, in one record.

The three share the tokenizer, embeddings, AdaLN blocks, head, sampler and
checkpoints; they differ in how the scales of the pyramid meet. Each family's
module (``var.py``, ``mvar.py``, ``m_var.py``) builds one ``Family`` and
``families.py`` registers them by name; code elsewhere reads these fields and
never compares a family's name. A new family is a module with its record (and
its block, if it has one of its own) plus a line in ``families.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.segments import SegmentSchedule

# ``(q, k, v, config, first_scale, last_scale, scale) -> out``: a block's attention over
# the pyramid; q holds the tokens of scales [first_scale, last_scale), k and v what the
# family lets them see. Shapes ``(B, l, heads, head_dim)``.
Attend = Callable[[jax.Array, jax.Array, jax.Array, TransformerConfig, int, int, float], jax.Array]


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
      name: the one spelling: config value (``TransformerConfig.family``), module
        name, converter flag (``--<name>``), report field.
      title: how people write it ('M-VAR').
      summary: one line for help texts.
      block: the residual block, an ``nn.Module`` class built as
        ``block(config, attend, drop_path_rate, init_scales=...)`` and called as
        ``block(x_BlC, cond, first_scale, last_scale, deterministic, cache)``
        -> ``(x_BlC, cache)``.
      attend: the block's attention over the pyramid (``Attend``).
      keys_per_query: ``(config, si) -> keys`` a query of scale si attends: what the
        attention pattern costs (the analytic FLOP counts).
      spatial_markov: whether some scales (from ``refine_step`` on) attend a
        neighbourhood, which ``config.neighborhood_impl`` runs.
      init_state: ``(config, batch) -> per-block state or None``: what inference
        carries from one scale to the next (VAR's KV cache, M-VAR's Mamba
        states); None when each scale needs nothing but its own input, so the
        sampler may run a scale's images in chunks.
      state_in_place: the state is a fixed-size cache into which each scale writes
        its slice (VAR), rather than a per-block state each scale replaces.
      any_first_scale: teacher forcing may start at any scale (each scale's logits
        depend on its own input alone); else it starts at scale 0.
      guides_at_cfg_one: whether the official sampler runs the unconditional half
        at ``cfg == 1`` (where it changes nothing but the cost).
      schedule: ``(config, ratio_k) -> SegmentSchedule``: what each training step teaches.
      check: raises ValueError on a config this family cannot run.
      weights_marker: an official state-dict key only this family's files hold, or None.
      release_key: the key under which the official trainer's release files (trainer states)
        hold this family's weights, or None.
      training_mask: ``patch_nums -> (L, L) bool``: the attention mask the official
        trainer saves as ``attn_bias_for_masking`` (True: may attend), or None.
      attention_buffers: ``config -> {name: array}``: buffers the official attention
        module of this family registers beside ``zero_k_bias`` (saved in its files).
    """

    name: str
    title: str
    summary: str
    block: type
    attend: Attend
    keys_per_query: Callable[[TransformerConfig, int], int]
    spatial_markov: bool
    init_state: Callable[[TransformerConfig, int], Any]
    state_in_place: bool
    any_first_scale: bool
    guides_at_cfg_one: bool
    schedule: Callable[[TransformerConfig, int], SegmentSchedule]
    check: Callable[[TransformerConfig], None]
    weights_marker: str | None = None
    release_key: str | None = None
    training_mask: Callable[[Sequence[int]], np.ndarray] | None = None
    attention_buffers: Callable[[TransformerConfig], dict[str, np.ndarray]] = lambda _: {}

    @property
    def carries_state(self) -> bool:
        """Whether inference carries anything from one scale to the next."""
        return self.init_state is not no_state


def no_state(config: TransformerConfig, batch_size: int) -> None:
    """A family whose scales carry nothing between them."""
    del config, batch_size
