"""Attention over the token pyramid: the patterns the families are made of.

Over scales of side ``patch_nums``, row-major within each scale:

* ``block_causal_attention``: scale l attends to every scale <= l (VAR);
* ``markov_attention``: scale l attends only within itself (block-diagonal,
  scale-Markov) and, from ``refine_step`` on, only to a k x k neighbourhood of its
  own map with NATTEN's ``na2d`` border rule (spatial-Markov; MVAR). With
  ``refine_step = len(patch_nums)`` every scale is attended whole (M-VAR).

Token sequences are ``(B, l, heads, head_dim)``; 2-D maps NATTEN's layout
``(B, H, W, heads, head_dim)``. The neighbourhood part goes through
``neighborhood_attention``: the memory-lean masked XLA path here, or the Pallas
kernel and its gather reference in ``kernels/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax.kernels.neighborhood import neighborhood_attention_reference, neighborhood_window_starts
from mvar_jax.kernels.spatial_markov import Tiling, spatial_markov_attention
from mvar_jax.models import recompute
from mvar_jax.models.config import NEIGHBORHOOD_IMPLS

# The masked formulation attends each axis whole up to this size (dense attention
# under the static window mask: 16x16 costs 256 logits a query instead of 49, but
# no copy of k or v); a longer axis is cut into query tiles of 4 to 8 rows, each
# attending the span of rows its windows cover (8 + k - 1 at most).
MASKED_WHOLE_AXIS = 16
MASKED_TILES = (8, 7, 6, 5, 4)
# What jax.nn.dot_product_attention writes for a masked float32 logit.
_MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)


class AxisTiling(NamedTuple):
    """How the masked formulation cuts one axis of the map (all static)."""

    tile: int  # queries per tile; the axis length when the axis is attended whole
    key_start: np.ndarray  # (num_tiles,) first key of each tile's span
    span: int  # keys per tile
    allowed: np.ndarray  # (num_tiles, tile, span) bool: key in the query's window


def axis_tiling(size: int, kernel_size: int) -> AxisTiling:
    """Query tiles along one axis and the key span each tile's windows cover."""
    starts = neighborhood_window_starts(size, kernel_size)
    tile = size
    if size > MASKED_WHOLE_AXIS:
        tile = next((t for t in MASKED_TILES if size % t == 0), size)
    first = starts[::tile]
    span = int(np.max(starts[tile - 1 :: tile] + kernel_size - first))
    key_start = np.minimum(first, size - span)
    keys = key_start[:, None, None] + np.arange(span)  # (n, 1, span)
    query_starts = starts.reshape(-1, tile)[:, :, None]  # (n, tile, 1)
    allowed = (keys >= query_starts) & (keys < query_starts + kernel_size)
    return AxisTiling(tile, key_start, span, allowed)


def _key_tiles(x: jax.Array, tiling: AxisTiling, axis: int) -> jax.Array:
    """Splits ``axis`` (of length L) into ``(num_tiles, span)`` overlapping key spans."""
    if len(tiling.key_start) == 1:  # The whole axis: a reshape, no copy.
        return jnp.expand_dims(x, axis)
    index = tiling.key_start[:, None] + np.arange(tiling.span)
    return jnp.take(x, index, axis=axis)


def neighborhood_attention_masked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kernel_size: int,
    scale: float | None = None,
) -> jax.Array:
    """Spatial-Markov attention as dense attention under the static window mask.

    The memory-lean pure-XLA path (what ``auto`` picks off GPU): maps up to
    ``MASKED_WHOLE_AXIS`` a side attend the whole map under the ``(HW, HW)``
    mask, so no per-query copy of the k x k keys and values is made (the
    reference's gather holds k*k copies of k and v in float32). Longer axes are
    tiled (``axis_tiling``): each query tile attends the span of key rows and
    columns its windows cover, keeping the logits and the key copies a few
    times the size of k.

    Args:
      q, k, v: ``(B, H, W, heads, head_dim)``.
      kernel_size: odd window side, at most ``min(H, W)``.
      scale: logit multiplier; ``head_dim ** -0.5`` when None.

    Returns:
      ``(B, H, W, heads, head_dim)`` in q's dtype; logits and softmax in float32,
      the probabilities cast to v's dtype for the second matmul (as
      ``jax.nn.dot_product_attention`` does).
    """
    B, H, W, heads, head_dim = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share a shape, got {q.shape}, {k.shape}, {v.shape}")
    if scale is None:
        scale = head_dim**-0.5
    rows, cols = axis_tiling(H, kernel_size), axis_tiling(W, kernel_size)
    nh, nw = H // rows.tile, W // cols.tile
    q_t = q.reshape(B, nh, rows.tile, nw, cols.tile, heads, head_dim)
    k_t, v_t = (_key_tiles(_key_tiles(x, rows, 1), cols, 3) for x in (k, v))
    # (B, nh, nw, heads, tile_h, tile_w, span_h, span_w)
    logits = jnp.einsum("zxiyjnd,zxaycnd->zxynijac", q_t, k_t, preferred_element_type=jnp.float32) * scale
    allowed = rows.allowed[:, None, None, :, None, :, None] & cols.allowed[None, :, None, None, :, None, :]
    queries, keys = rows.tile * cols.tile, rows.span * cols.span
    logits = jnp.where(
        allowed.reshape(nh, nw, 1, queries, keys), logits.reshape(B, nh, nw, heads, queries, keys), -jnp.inf
    )
    probs = (
        jax.nn.softmax(logits, axis=-1)
        .astype(v.dtype)
        .reshape(B, nh, nw, heads, rows.tile, cols.tile, rows.span, cols.span)
    )
    out = jnp.einsum("zxynijac,zxaycnd->zxiyjnd", probs, v_t, preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)


def scale_ids(patch_nums: Sequence[int], first_scale: int, last_scale: int) -> np.ndarray:
    """Scale index of every token of scales ``[first_scale, last_scale)``, shape ``(l,)``.

    A static numpy array (the official ``lvl_1L`` slice), so masks built from it
    are trace-time constants.
    """
    if not 0 <= first_scale < last_scale <= len(patch_nums):
        raise ValueError(
            f"need 0 <= first_scale < last_scale <= {len(patch_nums)}, got [{first_scale}, {last_scale})"
        )
    sizes = [pn * pn for pn in patch_nums[first_scale:last_scale]]
    return np.repeat(np.arange(first_scale, last_scale), sizes)


def block_diagonal_mask(patch_nums: Sequence[int]) -> np.ndarray:
    """``(L, L)``: token i may attend to token j when both belong to one scale (scale-Markov)."""
    ids = scale_ids(patch_nums, 0, len(patch_nums))
    return ids[:, None] == ids[None, :]


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scale: float,
    mask: np.ndarray | None = None,
    *,
    lean_backward: bool = False,
) -> jax.Array:
    """Softmax attention over token sequences; logits and softmax in float32.

    The value is ``jax.nn.dot_product_attention``'s. With ``lean_backward`` its
    gradient keeps q, k, v and each query's log-sum-exp, not the
    ``(B, heads, lq, lk)`` probabilities: the backward pass recomputes them once the
    output's gradient has arrived (``recompute.tied_to``), so a training step holds
    one block's probabilities at a time instead of every block's (the
    flash-attention backward, in plain XLA; ``TransformerConfig.remat``). Without it,
    plain autodiff.

    Args:
      q: ``(B, lq, heads, head_dim)``; k, v: ``(B, lk, heads, head_dim)``.
      scale: logit multiplier.
      mask: optional static boolean ``(lq, lk)``, True where a query may attend.
    """
    allowed = None if mask is None else jnp.asarray(mask, bool)[None, None]
    if not lean_backward:
        return jax.nn.dot_product_attention(q, k, v, mask=allowed, scale=scale)

    def logits_of(q, k):  # (B, heads, lq, lk), float32, masked as dot_product_attention masks
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
        return logits if allowed is None else jnp.where(allowed, logits, _MASKED_LOGIT)

    @jax.custom_vjp
    def attend(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=allowed, scale=scale)

    def forward(q, k, v):
        logits = logits_of(q, k)
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        out = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(logits - lse).astype(v.dtype), v)
        return out, (q, k, v, lse)

    def backward(saved, d_out):
        q, k, v, lse = saved
        (q_after,) = recompute.tied_to(d_out, q)  # not the forward's logits, nor early
        probs = jnp.exp(logits_of(q_after, k) - lse)
        d_v = jnp.einsum("bhqk,bqhd->bkhd", probs.astype(v.dtype), d_out, preferred_element_type=jnp.float32)
        d_probs = jnp.einsum("bqhd,bkhd->bhqk", d_out, v, preferred_element_type=jnp.float32)
        d_logits = (probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True)) * scale).astype(
            q.dtype
        )
        d_q = jnp.einsum("bhqk,bkhd->bqhd", d_logits, k, preferred_element_type=jnp.float32)
        d_k = jnp.einsum("bhqk,bqhd->bkhd", d_logits, q, preferred_element_type=jnp.float32)
        return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)

    attend.defvjp(forward, backward)
    return attend(q, k, v)


def block_diagonal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, ids: np.ndarray, scale: float, *, lean_backward: bool = False
) -> jax.Array:
    """MVAR scale-Markov attention: each token sees only the tokens of its own scale.

    ``ids`` is the static ``(l,)`` scale index of q's (= k's) tokens. A single
    scale needs no mask. Several scales (the training segment of the small
    scales, 255 tokens at 256 px) use one masked attention rather than one call
    per scale: a single fused matmul over a 255 x 255 mask is cheaper on an
    accelerator than eight tiny ones, and the mask is a trace-time constant.
    """
    if ids.shape != (q.shape[1],) or k.shape[1] != q.shape[1]:
        raise ValueError(
            f"block-diagonal attention needs one scale id per token and as many keys "
            f"as queries, got ids {ids.shape}, q {q.shape}, k {k.shape}"
        )
    mask = None if ids[0] == ids[-1] else ids[:, None] == ids[None, :]
    return dense_attention(q, k, v, scale, mask, lean_backward=lean_backward)


def block_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_ids: np.ndarray,
    k_ids: np.ndarray,
    scale: float,
    *,
    lean_backward: bool = False,
) -> jax.Array:
    """VAR attention: a token of scale l sees every token of the scales <= l.

    ``q_ids`` / ``k_ids`` are the static scale indices of queries and keys; the
    keys may cover more scales than the queries (the KV-cache path, where the
    queries are one scale and the keys everything generated so far).
    """
    if q_ids.shape != (q.shape[1],) or k_ids.shape != (k.shape[1],):
        raise ValueError(
            f"block-causal attention needs one scale id per query and key, got "
            f"q_ids {q_ids.shape} for q {q.shape}, k_ids {k_ids.shape} for k {k.shape}"
        )
    mask = q_ids[:, None] >= k_ids[None, :]
    return dense_attention(q, k, v, scale, None if mask.all() else mask, lean_backward=lean_backward)


def neighborhood_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kernel_size: int,
    scale: float | None = None,
    impl: str = "auto",
    tiling: Tiling | None = None,
) -> jax.Array:
    """MVAR spatial-Markov attention on ``(B, H, W, heads, head_dim)`` maps.

    ``impl``: 'masked' (pure XLA, memory-lean: ``neighborhood_attention_masked``),
    'reference' (the gather of every window: the test oracle beside the kernel),
    'pallas' (the fused kernel, launched with ``tiling``), 'pallas_interpret' (the
    kernel run by the Pallas interpreter, for CPU tests) or 'auto' (the kernel on
    GPU, 'masked' elsewhere).
    """
    if impl not in NEIGHBORHOOD_IMPLS:
        raise ValueError(f"neighborhood impl must be one of {NEIGHBORHOOD_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "masked"
    if impl == "masked":
        return neighborhood_attention_masked(q, k, v, kernel_size, scale)
    if impl == "reference":
        return neighborhood_attention_reference(q, k, v, kernel_size, scale)
    return spatial_markov_attention(
        q, k, v, kernel_size, scale, interpret=impl == "pallas_interpret", tiling=tiling
    )


def markov_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    patch_nums: Sequence[int],
    first_scale: int,
    last_scale: int,
    scale: float,
    refine_step: int,
    kernel_size: int,
    impl: str = "auto",
    tiling: Tiling | None = None,
    lean_backward: bool = False,
) -> jax.Array:
    """Scale-Markov attention over the tokens of scales ``[first_scale, last_scale)``.

    q, k and v hold the same tokens ``(B, l, heads, head_dim)``, row-major within
    each scale. Scales below ``refine_step`` attend within themselves
    (block-diagonal); every scale from ``refine_step`` on attends a
    ``kernel_size``-square neighbourhood of its own map (spatial-Markov).
    ``refine_step = len(patch_nums)`` leaves every scale whole.
    """
    q_ids = _query_ids(q, patch_nums, first_scale, last_scale)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"scale-Markov attention keeps every token within its own scale: q, k, v must share "
            f"a shape, got {q.shape}, {k.shape}, {v.shape}"
        )
    outputs = []
    n_small = int(np.sum(q_ids < refine_step))
    if n_small:
        outputs.append(
            block_diagonal_attention(
                q[:, :n_small],
                k[:, :n_small],
                v[:, :n_small],
                q_ids[:n_small],
                scale,
                lean_backward=lean_backward,
            )
        )
    begin = n_small
    for si in range(max(first_scale, refine_step), last_scale):
        pn = patch_nums[si]
        end = begin + pn * pn
        maps = [t[:, begin:end].reshape(t.shape[0], pn, pn, *t.shape[2:]) for t in (q, k, v)]
        out = neighborhood_attention(*maps, kernel_size, scale, impl, tiling)
        outputs.append(out.reshape(out.shape[0], pn * pn, *out.shape[3:]))
        begin = end
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)


def _query_ids(q: jax.Array, patch_nums: Sequence[int], first_scale: int, last_scale: int) -> np.ndarray:
    """The queries' scale ids, checked against q's token count."""
    q_ids = scale_ids(patch_nums, first_scale, last_scale)
    if q.shape[1] != q_ids.size:
        raise ValueError(
            f"q has {q.shape[1]} tokens but scales [{first_scale}, {last_scale}) of "
            f"{tuple(patch_nums)} have {q_ids.size}"
        )
    return q_ids
