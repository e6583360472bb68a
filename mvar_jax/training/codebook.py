"""Codebook health of the multi-scale quantizer: usage, perplexity, dead-code restart.

Pure functions over a ``CodebookState`` pytree that the trainer carries in its
train state (and so checkpoints), updated inside the jitted step on global
arrays, so every device and host holds the same statistics. One step of
training gives the token ids of each scale (``QuantizerTrainOutput.ids``):

    state = codebook.record(state, q.ids, window=W)
    logs = codebook.metrics(state, patch_nums, window=W, global_batch_size=B)
    restart = codebook.restart_dead_codes(table_VC, state, q.z, rng, dead_after=N)

Three views of usage, per scale (metric names use the scale's side, ``4x4``):

* ``usage/4x4``: the share (%) of the codebook that the scale chose at least
  once in the last ``window`` steps. A sliding window over steps, so a 1x1
  scale (B choices a step) and a 16x16 one (256 B) are rated on the same
  footing: did the code serve this scale recently. ``usage/all``: any scale.
* ``perplexity/4x4``: exp of the entropy of the scale's code histogram, with
  counts decayed by ``1 - 1/window`` per step (about the last ``window``
  steps); the number of codes the scale effectively spreads its choices over.
* ``usage_official/4x4``: the official rule (``VectorQuantizer2``'s
  ``ema_vocab_hit_SV``), the share (%) of codes whose EMA of per-step hit
  counts reaches ``0.08 * B * H * W / vocab`` for the global batch B and the
  full H x W map. The margin is the same for every scale while a small scale
  makes far fewer choices, so it rates small scales low by construction: shown
  beside ``usage`` for comparison with the official logs, not as the target.

Dead-code restart. The codebook is one table shared by all scales, so "dead"
is judged on the table: a code is dead when *no* scale chose it for
``dead_after`` steps (counting from its last (re-)seeding). Judging per scale
would re-seed codes that other scales still rely on (a code that serves only
the 16x16 scale is by design unused at 1x1). A dead code is re-seeded with a
recent encoder residual (a lookup input ``z`` of the current step): first a
scale drawn uniformly, then one of that scale's residuals. Drawing scales
evenly, rather than residuals in proportion to their count, gives the coarse
scales (B residuals a step at 1x1 against 64 B at 8x8), the ones that
collapse, as many fresh codes as the finest. The draw uses a PRNG key from the
train state inside jit, so every device and host re-seeds the same rows with
the same vectors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

# Idle counters saturate here (int32-safe); it also stands for "never chosen".
IDLE_CAP = 2**30
# The official EMA: decay 0.9 for the first 100 records, 0.99 after (a record is
# one scale of one step, as the official loop counts them).
_EMA_WARMUP_RECORDS = 100
_EMA_MARGIN_FRACTION = 0.08


@dataclasses.dataclass(frozen=True)
class CodebookConfig:
    """How the tokenizer task watches and heals its codebook (a config's ``codebook`` section).

    window: steps of the usage window (``usage/<pn>x<pn>``, perplexity).
    dead_after: re-seed codes no scale chose for this many steps (0: never).
    """

    window: int = 100
    dead_after: int = 0

    def __post_init__(self):
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window={self.window!r} must be a positive int of steps")
        if not isinstance(self.dead_after, int) or self.dead_after < 0:
            raise ValueError(f"dead_after={self.dead_after!r} must be an int >= 0 (0: no dead-code restart)")


@flax.struct.dataclass
class CodebookState:
    """Usage statistics; S scales, V codes. All int32 / float32 arrays."""

    idle_SV: jax.Array  # int32 (S, V): steps since scale s last chose code v (IDLE_CAP: never)
    idle_V: jax.Array  # int32 (V,): steps since any scale chose v, or since v was (re-)seeded
    recent_hits_SV: jax.Array  # float32 (S, V): hit counts decayed by 1 - 1/window per step
    ema_hits_SV: jax.Array  # float32 (S, V): the official ema_vocab_hit_SV
    ema_records: jax.Array  # int32 (): the official record_hit (S records a step)


class RestartResult(NamedTuple):
    embedding_VC: jax.Array  # the table with dead rows re-seeded
    state: CodebookState  # idle_V reset for the re-seeded codes
    restarted_V: jax.Array  # bool (V,): which rows were re-seeded
    num_restarted: jax.Array  # int32 (), the metric 'codebook/restarted'


def init_state(num_scales: int, vocab_size: int) -> CodebookState:
    """Nothing seen yet: no scale has chosen any code; every code freshly seeded."""
    return CodebookState(
        idle_SV=jnp.full((num_scales, vocab_size), IDLE_CAP, jnp.int32),
        idle_V=jnp.zeros((vocab_size,), jnp.int32),
        recent_hits_SV=jnp.zeros((num_scales, vocab_size), jnp.float32),
        ema_hits_SV=jnp.zeros((num_scales, vocab_size), jnp.float32),
        ema_records=jnp.zeros((), jnp.int32),
    )


def _check_window(window: int) -> None:
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"codebook usage window must be a positive int of steps, got {window!r}")


def _step_hits(ids: Sequence[jax.Array], vocab_size: int) -> jax.Array:
    """Per-scale code histogram ``(S, V)`` int32 of one step's token ids ``(B, l)``."""
    return jnp.stack([jnp.bincount(idx.reshape(-1), length=vocab_size) for idx in ids])


def _official_ema(ema_SV: jax.Array, records: jax.Array, hits_SV: jax.Array) -> jax.Array:
    """``ema_vocab_hit_SV`` after one step: copy on record 0, then 0.9 / 0.99 decay."""
    rows = []
    for si in range(hits_SV.shape[0]):
        r = records + si
        blended = jnp.where(
            r < _EMA_WARMUP_RECORDS,
            ema_SV[si] * 0.9 + hits_SV[si] * 0.1,
            ema_SV[si] * 0.99 + hits_SV[si] * 0.01,
        )
        rows.append(jnp.where(r == 0, hits_SV[si], blended))
    return jnp.stack(rows)


def record(state: CodebookState, ids: Sequence[jax.Array], *, window: int) -> CodebookState:
    """Adds one step's token ids (one ``(B, pn * pn)`` array per scale, global batch)."""
    _check_window(window)
    S, V = state.idle_SV.shape
    if len(ids) != S:
        raise ValueError(f"expected token ids of {S} scales, got {len(ids)}")
    hits_SV = _step_hits(ids, V)
    hit_SV = hits_SV > 0
    idle_SV = jnp.where(hit_SV, 0, jnp.minimum(state.idle_SV + 1, IDLE_CAP))
    idle_V = jnp.where(hit_SV.any(axis=0), 0, jnp.minimum(state.idle_V + 1, IDLE_CAP))
    hits_f = hits_SV.astype(jnp.float32)
    return CodebookState(
        idle_SV=idle_SV,
        idle_V=idle_V,
        recent_hits_SV=state.recent_hits_SV * (1 - 1 / window) + hits_f,
        ema_hits_SV=_official_ema(state.ema_hits_SV, state.ema_records, hits_f),
        ema_records=state.ema_records + S,
    )


def _perplexity(counts_V: jax.Array) -> jax.Array:
    total = counts_V.sum()
    p_V = counts_V / jnp.maximum(total, 1e-30)
    entropy = -jnp.sum(jnp.where(p_V > 0, p_V * jnp.log(jnp.where(p_V > 0, p_V, 1.0)), 0.0))
    return jnp.exp(entropy)


def official_margin(global_batch_size: int, patch_nums: Sequence[int], vocab_size: int) -> float:
    """The official usage threshold: 8% of an even share of one step's full-map choices."""
    return global_batch_size * patch_nums[-1] ** 2 / vocab_size * _EMA_MARGIN_FRACTION


def metrics(
    state: CodebookState, patch_nums: Sequence[int], *, window: int, global_batch_size: int
) -> dict[str, jax.Array]:
    """TensorBoard scalars: ``usage/<pn>x<pn>`` and ``usage_official/<pn>x<pn>`` (%),
    ``perplexity/<pn>x<pn>``, and ``usage/all`` (%, chosen by any scale in the window)."""
    _check_window(window)
    S, V = state.idle_SV.shape
    if len(patch_nums) != S:
        raise ValueError(f"the state tracks {S} scales, got patch_nums {tuple(patch_nums)}")
    recent_SV = state.idle_SV < window
    margin = official_margin(global_batch_size, patch_nums, V)
    out = {}
    for si, pn in enumerate(patch_nums):
        out[f"usage/{pn}x{pn}"] = 100 * recent_SV[si].mean()
        out[f"usage_official/{pn}x{pn}"] = 100 * (state.ema_hits_SV[si] >= margin).mean()
        out[f"perplexity/{pn}x{pn}"] = _perplexity(state.recent_hits_SV[si])
    out["usage/all"] = 100 * recent_SV.any(axis=0).mean()
    return out


def restart_dead_codes(
    embedding_VC: jax.Array, state: CodebookState, z: Sequence[jax.Array], rng: jax.Array, *, dead_after: int
) -> RestartResult:
    """Re-seeds every code no scale chose for ``dead_after`` steps with a residual of ``z``.

    ``z``: one step's lookup inputs, ``(B, pn * pn, Cvae)`` per scale
    (``QuantizerTrainOutput.z``, global batch). ``rng`` must be the same on
    every host (e.g. folded from the train state's key and step). Live rows are
    returned bit-for-bit; the optimizer state of re-seeded rows is the caller's
    (``restarted_V`` marks them).
    """
    if not isinstance(dead_after, int) or dead_after < 1:
        raise ValueError(f"dead_after must be a positive int of steps, got {dead_after!r}")
    V, C = embedding_VC.shape
    if state.idle_V.shape != (V,) or len(z) != state.idle_SV.shape[0]:
        raise ValueError(
            f"state tracks {state.idle_SV.shape[0]} scales of {state.idle_V.shape[0]} codes; "
            f"got a ({V}, {C}) table and residuals of {len(z)} scales"
        )
    pool_NC = jnp.concatenate([zs.reshape(-1, C) for zs in z]).astype(embedding_VC.dtype)
    sizes = np.array([zs.shape[0] * zs.shape[1] for zs in z])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    k_scale, k_row = jax.random.split(rng)
    scale_V = jax.random.randint(k_scale, (V,), 0, len(z))
    row_V = jnp.asarray(offsets, jnp.int32)[scale_V] + jax.random.randint(
        k_row, (V,), 0, jnp.asarray(sizes, jnp.int32)[scale_V]
    )
    dead_V = state.idle_V >= dead_after
    table = jnp.where(dead_V[:, None], pool_NC[row_V], embedding_VC)
    new_state = state.replace(idle_V=jnp.where(dead_V, 0, state.idle_V))
    return RestartResult(table, new_state, dead_V, dead_V.sum(dtype=jnp.int32))
