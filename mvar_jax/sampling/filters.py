"""Turning logits into tokens: the official top-k / top-p filters, inverse-CDF draws, Gumbel mixing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _top_values(logits_BlV: jax.Array, k: int) -> jax.Array:
    """The ``k`` largest values of each row ``(B, l, k)``, descending, by XLA's TopK.

    ``lax.top_k`` is a sort and a slice that XLA rewrites into its TopK kernel only
    while every use is a slice from the front; a later slice or reversal merged
    into it (``[..., -1:]``, ``[..., ::-1]``) leaves a full sort of the vocabulary,
    3x slower on a CPU. The barrier keeps the uses apart.
    """
    return jax.lax.optimization_barrier(jax.lax.top_k(logits_BlV, k)[0])


def top_k_filter(logits_BlV: jax.Array, top_k: int) -> jax.Array:
    """Sets logits strictly below the k-th largest of their row to -inf.

    Ties with the k-th largest survive, as with the official helper. ``top_k <= 0``
    or ``top_k >= V`` keeps everything.
    """
    V = logits_BlV.shape[-1]
    if top_k <= 0 or top_k >= V:
        return logits_BlV
    kth_largest = _top_values(logits_BlV, top_k)[..., -1:]
    return jnp.where(logits_BlV < kth_largest, -jnp.inf, logits_BlV)


def cumsum_last(x: jax.Array, block: int = 64) -> jax.Array:
    """Cumulative sum over the last axis as two small triangular matmuls (float32).

    Within blocks of ``block`` entries, then the blocks' running offsets: on a
    CPU this compiles twice and runs four times as fast as XLA's reduce-window
    cumsum, which the sampler needs twice per scale over the vocabulary.
    """
    *lead, n = x.shape
    pad = -n % block
    x_nb = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, -1, block)
    exact = jax.lax.Precision.HIGHEST  # No reduced-precision passes on GPU/TPU.
    within = jnp.matmul(x_nb, np.triu(np.ones((block, block), np.float32)), precision=exact)
    num_blocks = within.shape[-2]
    offsets = jnp.matmul(
        within[..., -1], np.triu(np.ones((num_blocks, num_blocks), np.float32), 1), precision=exact
    )
    return (within + offsets[..., None]).reshape(*lead, n + pad)[..., :n]


def _nucleus_threshold(ascending_Bln: jax.Array, extra_Bl1: jax.Array | int, top_p: float) -> jax.Array:
    """The nucleus rule's smallest kept value ``(B, l, 1)``, from candidates sorted ascending.

    ``extra_Bl1`` more entries equal to the smallest candidate come before them
    (top-k's ties with the k-th largest beyond k): they add to every running mass.
    """
    weights = jnp.exp(ascending_Bln - ascending_Bln[..., -1:])
    below = extra_Bl1 * weights[..., :1]
    mass = (below + cumsum_last(weights)) / (below + weights.sum(-1, keepdims=True))
    num_dropped = jnp.sum(mass <= 1 - top_p, axis=-1, keepdims=True)
    num_dropped = jnp.minimum(num_dropped, ascending_Bln.shape[-1] - 1)
    return jnp.take_along_axis(ascending_Bln, num_dropped, axis=-1)


def top_p_filter(logits_BlV: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filtering with the official rule, keyed on ascending order.

    Sorted ascending, a token is dropped while the running softmax mass up to and
    including it is at most ``1 - top_p``; the largest token is always kept. The
    dropped tokens form a prefix of the ascending order, so the rule reduces to a
    per-row threshold (ties at the threshold are all kept). ``top_p <= 0`` keeps
    everything.
    """
    if top_p <= 0:
        return logits_BlV
    threshold = _nucleus_threshold(jnp.sort(logits_BlV, axis=-1), 0, top_p)
    return jnp.where(logits_BlV < threshold, -jnp.inf, logits_BlV)


def filter_logits(logits_BlV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Top-k, then top-p on what is left (the official order).

    With both, the nucleus is found among the k largest values as ``lax.top_k``
    returns them, sorted: no sort of the whole vocabulary (4x faster on a CPU).
    """
    V = logits_BlV.shape[-1]
    if top_p <= 0 or not 0 < top_k < V:
        return top_p_filter(top_k_filter(logits_BlV, top_k), top_p)
    top_Blk = _top_values(logits_BlV, top_k)
    ties_Bl1 = jnp.sum(logits_BlV >= top_Blk[..., -1:], axis=-1, keepdims=True) - top_k
    threshold = _nucleus_threshold(top_Blk[..., ::-1], ties_Bl1, top_p)
    return jnp.where(logits_BlV < threshold, -jnp.inf, logits_BlV)


def tokens_from_uniform(logits_BlV: jax.Array, u_Bl: jax.Array) -> jax.Array:
    """Token ids ``(B, l)`` int32 drawn from ``softmax(logits)`` by inverse CDF.

    ``u_Bl`` holds one uniform in (0, 1] per token: the first entry whose
    cumulative probability reaches ``u * total`` is drawn, so an entry of zero
    probability (filtered to -inf) never is. ``jax.random.categorical`` (the
    Gumbel-max trick) needs one random number per vocabulary entry instead:
    ``(B, l, V)`` random bits per scale that depend on the key alone, which XLA
    computes up front and holds for every scale at once (1.4 GB at batch 64).
    """
    cdf_BlV = cumsum_last(jax.nn.softmax(logits_BlV, axis=-1))
    threshold_Bl1 = u_Bl[..., None] * cdf_BlV[..., -1:]
    return jnp.sum(cdf_BlV < threshold_Bl1, axis=-1).astype(jnp.int32)


def gumbel_softmax(key: jax.Array, logits_BlV: jax.Array, tau: float) -> jax.Array:
    """``softmax((logits + g) / tau)`` with standard Gumbel noise g: a soft sample."""
    gumbel = jax.random.gumbel(key, logits_BlV.shape, logits_BlV.dtype)
    return jax.nn.softmax((logits_BlV + gumbel) / tau, axis=-1)
