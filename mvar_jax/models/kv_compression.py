"""A compressed KV cache for VAR sampling: HACK (Qin et al., arXiv 2504.09261) and two LLM baselines.

VAR's queries of scale ``si`` read the keys and values of every earlier scale (the
history). A compressed cache keeps, per head, only a budget of those tokens: the
queries attend to the kept history plus their own scale whole, and after the scale
the history and the scale's own tokens are cut to the next scale's budget. A token
dropped once stays dropped.

Methods (``METHODS``), at one average budget per scale (``history_budgets``):

* ``hack``: heads are split offline into *contextual* heads (every query attends the
  same few tokens: low variance down each column of the attention matrix) and
  *structural* heads (attention by relative position), ``sampling.head_kinds``.
  A contextual head gets ``contextual_share`` of a structural head's budget and keeps
  the tokens most attended by ``observers`` queries spread evenly over the scale. A
  structural head keeps the first two scales, then the scale just drawn (its most
  attended tokens, up to half the budget), then the tokens most attended by all of
  the scale's queries.
* ``hack_random``: the same, the kinds dealt to heads at random in the same
  numbers (the paper's ablation).
* ``h2o``: every head alike (Zhang et al. 2023): the most recent tokens fill half the
  budget, the rest go to the tokens with the most attention summed over every query
  of every scale so far.
* ``snapkv``: every head alike (Li et al. 2024): the attention of the scale's last
  ``observers`` queries (raster order), max-pooled over 7 neighbouring positions,
  plus those queries' own tokens.

The paper is not specific on the budget split, the observers or the tie-breaking;
these are our choices (docs/benchmarks.md lists them).

Shapes are static for XLA: each scale's budgets are Python ints, and the heads of
one kind are gathered into one group per block (a fixed head list, held as data),
so a group's cache is ``(R, heads_g, kept, head_dim)`` arrays, never ragged. Every
block has as many heads of each kind (``sampling.head_kinds`` splits each block), so
all blocks share one plan and the sampler still runs them as one scan per scale.

Classifier-free guidance: the conditional and unconditional rows of an image keep
the same tokens. Their scores are summed before the selection, so guidance
compares two predictions made over one context.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax.models.config import TransformerConfig

METHODS = ("hack", "hack_random", "h2o", "snapkv")
HEAD_AWARE = ("hack", "hack_random")
CONTEXTUAL, STRUCTURAL, UNIFORM = "contextual", "structural", "uniform"
SNAPKV_POOL = 7  # SnapKV's pooling kernel
# Selection tiers: added to a score (a mean attention, in [0, 1]) so that a token of a
# higher tier always outranks one of a lower tier.
_TIER = 2.0


def check_ratio(ratio: float) -> None:
    """ValueError unless ``ratio`` is a number in [0, 1)."""
    if not (isinstance(ratio, (int, float)) and 0 <= ratio < 1):
        raise ValueError(f"kv_compression={ratio!r} must be in [0, 1) (0: the full cache)")


@dataclasses.dataclass(frozen=True)
class KVCompression:
    """How VAR's KV cache is compressed; hashable, a static part of ``SamplingOptions``.

    Attributes:
      ratio: the share of the history dropped, in [0, 1); each scale's queries attend
        on average ``floor((1 - ratio) * H)`` of the ``H`` tokens of the earlier scales
        (plus their own scale whole). 0 is the plain KV cache.
      method: one of ``METHODS``.
      contextual: per block, per head, True for a contextual head (``hack`` and
        ``hack_random``: ``sampling.head_kinds`` calibrates it; None for the others).
      contextual_share: a contextual head's budget over a structural head's.
      observers: queries whose attention chooses a contextual head's tokens (HACK) or
        SnapKV's observation window.
      seed: the random split of ``hack_random``.
    """

    ratio: float
    method: str = "hack"
    contextual: tuple[tuple[bool, ...], ...] | None = None
    contextual_share: float = 0.5
    observers: int = 32
    seed: int = 0

    def __post_init__(self):
        check_ratio(self.ratio)
        if self.method not in METHODS:
            raise ValueError(f"kv_method={self.method!r} must be one of {METHODS}")
        if (self.contextual is None) == (self.method in HEAD_AWARE):
            need = (
                "needs the head kinds (sampling.head_kinds)"
                if self.contextual is None
                else "takes no head kinds"
            )
            raise ValueError(f"kv_method={self.method!r} {need}")
        if not 0 < self.contextual_share <= 1:
            raise ValueError(f"contextual_share={self.contextual_share} must be in (0, 1]")
        if not isinstance(self.observers, int) or self.observers < 1:
            raise ValueError(f"observers={self.observers!r} must be an int >= 1")

    def head_kinds(self, config: TransformerConfig) -> list[list[str]]:
        """Per block, each head's kind: contextual / structural, or uniform for the baselines."""
        if self.contextual is None:
            return [[UNIFORM] * config.num_heads for _ in range(config.depth)]
        flags = np.asarray(self.contextual, bool)
        if flags.ndim != 2 or flags.shape != (config.depth, config.num_heads):
            raise ValueError(
                f"head kinds of shape {flags.shape} (blocks, heads), the model has {config.depth} blocks "
                f"of {config.num_heads} heads: calibrate this model"
            )
        per_block = flags.sum(axis=1).tolist()
        if len(set(per_block)) != 1:
            raise ValueError(
                f"every block needs as many contextual heads (one static shape), got {per_block}"
            )
        if self.method == "hack_random":
            rng = np.random.default_rng(self.seed)
            flags = np.stack([rng.permutation(block) for block in flags])
        return [[CONTEXTUAL if c else STRUCTURAL for c in block] for block in flags]


def history_budgets(config: TransformerConfig, compression: KVCompression) -> dict[str, tuple[int, ...]]:
    """Per kind, the history tokens a head of that kind attends at each scale (static ints).

    Scale si has ``H = token_range(0, si)[1]`` earlier tokens; every method keeps the mean
    over all heads at ``floor((1 - ratio) * H)`` at most. HACK splits it so that a contextual
    head gets ``contextual_share`` of a structural head's budget (each capped at ``H``, what a
    capped kind cannot use going to the other).
    """
    kinds = [k for block in compression.head_kinds(config) for k in block]
    n_c, n = kinds.count(CONTEXTUAL), len(kinds)
    budgets = {CONTEXTUAL: [], STRUCTURAL: [], UNIFORM: []}
    for si in range(config.num_scales):
        history = config.token_range(0, si)[1] if si else 0
        mean = math.floor((1 - compression.ratio) * history)
        budgets[UNIFORM].append(mean)
        structural = min(history, math.floor(mean / (1 - (1 - compression.contextual_share) * n_c / n)))
        contextual = min(history, (mean * n - (n - n_c) * structural) // n_c) if n_c else 0
        budgets[STRUCTURAL].append(structural)
        budgets[CONTEXTUAL].append(contextual)
    return {kind: tuple(b) for kind, b in budgets.items()}


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """What one block's compressed cache does (static)."""

    method: str
    kinds: tuple[str, ...]  # of each group of heads
    budgets: tuple[tuple[int, ...], ...]  # per group, the history kept at each scale
    scale_ends: tuple[int, ...]  # token offset where each scale ends
    rows: int  # rows per image (2 with guidance), which keep the same tokens
    observers: int


@flax.struct.dataclass
class GroupCache:
    """The kept history of one group of heads, ordered by position in the sequence."""

    heads: jax.Array  # (heads_g,) int32: the group's heads in the block
    k: jax.Array  # (R, heads_g, kept, head_dim)
    v: jax.Array  # (R, heads_g, kept, head_dim)
    ids: jax.Array  # (R, heads_g, kept) int32: each kept token's place in the sequence
    score: jax.Array  # (R, heads_g, kept) float32: H2O's accumulated attention (zeros otherwise)


@flax.struct.dataclass
class CompressedKV:
    """One block's compressed cache: a ``GroupCache`` per group of heads and the static plan."""

    groups: tuple[GroupCache, ...]
    order: jax.Array  # (heads,) int32: puts the groups' concatenated heads back in block order
    plan: BlockPlan = flax.struct.field(pytree_node=False)

    def attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, si: int, scale: float
    ) -> tuple[jax.Array, CompressedKV]:
        """Scale si's attention ``(R, n, heads, head_dim)`` over the kept history and itself,
        and the cache cut to scale si + 1's budgets.

        q, k, v: ``(R, n, heads, head_dim)``, the n tokens of scale si.
        """
        plan = self.plan
        outputs, groups = [], []
        for kind, budgets, cache in zip(plan.kinds, plan.budgets, self.groups):
            q_g, k_g, v_g = (
                jnp.swapaxes(jnp.take(x, cache.heads, axis=2), 1, 2) for x in (q, k, v)
            )  # (R, g, n, d)
            keys = jnp.concatenate([cache.k, k_g], axis=2)
            values = jnp.concatenate([cache.v, v_g], axis=2)
            logits = jnp.einsum("rgqd,rgkd->rgqk", q_g, keys, preferred_element_type=jnp.float32) * scale
            probs = jax.nn.softmax(logits, axis=-1)
            out = jnp.einsum("rgqk,rgkd->rqgd", probs.astype(values.dtype), values)
            outputs.append(out.astype(q.dtype))
            if si + 1 < len(plan.scale_ends):
                cache = self._cut(kind, cache, keys, values, probs, si, budgets[si + 1])
            groups.append(cache)
        out = jnp.take(jnp.concatenate(outputs, axis=2), self.order, axis=2)
        return out, CompressedKV(tuple(groups), self.order, plan)

    def _cut(self, kind, cache, keys, values, probs, si, keep) -> GroupCache:
        """The candidates (kept history, then scale si's tokens) cut to ``keep`` per head."""
        plan = self.plan
        begin, end = (plan.scale_ends[si - 1] if si else 0), plan.scale_ends[si]
        R, g, n, num = probs.shape
        new_ids = jnp.broadcast_to(jnp.arange(begin, end, dtype=jnp.int32), (R, g, n))
        ids = jnp.concatenate([cache.ids, new_ids], axis=2)
        score = jnp.concatenate([cache.score, jnp.zeros((R, g, n), jnp.float32)], axis=2)
        if plan.method == "h2o":
            score = score + probs.sum(axis=2)
        if keep >= num:
            return GroupCache(cache.heads, keys, values, ids, score)
        priority = _priority(plan.method, kind, probs, score, ids, plan, keep)
        priority = jnp.repeat(priority.reshape(-1, plan.rows, g, num).sum(axis=1), plan.rows, axis=0)
        _, chosen = jax.lax.top_k(priority, keep)
        chosen = jnp.sort(chosen, axis=-1)  # back in sequence order
        take = lambda x: jnp.take_along_axis(x, chosen if x.ndim == 3 else chosen[..., None], axis=2)  # noqa: E731
        return GroupCache(cache.heads, take(keys), take(values), take(ids), take(score))


def _evenly_spaced(n: int, count: int) -> np.ndarray:
    """``min(count, n)`` query indices spread over ``[0, n)``."""
    return np.unique(np.round(np.linspace(0, n - 1, min(count, n))).astype(int))


def _priority(
    method: str, kind: str, probs: jax.Array, score: jax.Array, ids: jax.Array, plan: BlockPlan, keep: int
) -> jax.Array:
    """``(R, g, candidates)``: the higher, the sooner a candidate is kept.

    probs: ``(R, g, n, candidates)``, scale si's attention; candidates are the kept
    history then the scale's n tokens, in sequence order.
    """
    n, num = probs.shape[2], probs.shape[3]
    if method == "h2o":  # the recent half of the budget, then the heavy hitters (sums over many queries)
        return jnp.where(jnp.arange(num) >= num - keep // 2, jnp.inf, score)
    if method == "snapkv":
        window = min(plan.observers, n)
        votes = probs[:, :, n - window :].mean(axis=2)
        pooled = jax.lax.reduce_window(votes, -jnp.inf, jax.lax.max, (1, 1, SNAPKV_POOL), (1, 1, 1), "SAME")
        return pooled + _TIER * (jnp.arange(num) >= num - window)
    if kind == CONTEXTUAL:
        return probs[:, :, _evenly_spaced(n, plan.observers)].mean(axis=2)
    # Structural: the first two scales, then the scale just drawn (its most attended tokens, up
    # to half the budget: kept whole, a 16x16 scale would leave no room for the middle), then
    # the most attended of the rest.
    attention = probs.mean(axis=2)
    rank = jnp.argsort(jnp.argsort(-attention[..., num - n :], axis=-1), axis=-1)  # 0: most attended
    newest = jnp.concatenate([jnp.zeros((*rank.shape[:-1], num - n), bool), rank < keep // 2], axis=-1)
    first_two = ids < plan.scale_ends[1]
    return attention + _TIER * newest + 2 * _TIER * first_two


def init_cache(
    config: TransformerConfig, rows_total: int, compression: KVCompression, rows: int
) -> tuple[CompressedKV, ...]:
    """Empty compressed caches, one per block, for ``rows_total`` rows (``rows`` per image)."""
    budgets = history_budgets(config, compression)
    ends = tuple(config.token_range(0, si + 1)[1] for si in range(config.num_scales))
    per_block = compression.head_kinds(config)
    kinds = tuple(kind for kind in (CONTEXTUAL, STRUCTURAL, UNIFORM) if kind in per_block[0])
    plan = BlockPlan(
        compression.method, kinds, tuple(budgets[kind] for kind in kinds), ends, rows, compression.observers
    )
    caches = []
    for block_kinds in per_block:
        heads = [np.flatnonzero(np.asarray(block_kinds) == kind).astype(np.int32) for kind in kinds]
        empty = tuple(
            GroupCache(
                jnp.asarray(h),
                *(jnp.zeros((rows_total, len(h), 0, config.head_dim), config.compute_dtype) for _ in "kv"),
                jnp.zeros((rows_total, len(h), 0), jnp.int32),
                jnp.zeros((rows_total, len(h), 0), jnp.float32),
            )
            for h in heads
        )
        order = jnp.asarray(np.argsort(np.concatenate(heads)), jnp.int32)
        caches.append(CompressedKV(empty, order, plan))
    return tuple(caches)
