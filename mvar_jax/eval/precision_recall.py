"""Improved precision and recall (Kynkäänniemi et al. 2019) as OpenAI's guided-diffusion evaluator runs it.

Each set of ``pool_3`` features estimates its manifold as the union of balls around its points,
each ball's squared radius the squared distance to the point's 3rd nearest neighbour (the 4th
smallest distance in its row, counting the point itself). Precision is the share of samples
inside the reference manifold, recall the share of reference points inside the samples'
manifold; a point on a sphere counts as inside (``<=``).

The evaluator's numerics are kept, because they move the result: features are float32 and
cast to float16, and squared distances are ``max(|u|^2 - 2 u.v + |v|^2, 0)`` with every step
rounded to float16 (sums and the product accumulated in float32, as TensorFlow does on a GPU),
in blocks of 10,000 x 10,000 pairs; a block where float16 overflows is computed again in
float32. Radii and comparisons use those rounded distances, ties included. (TensorFlow on a
CPU sums the squared norms in another order, so there about one norm in four differs by one
float16 step.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

K = 3  # neighbourhood size
BLOCK = 10_000  # rows and columns of one distance block, the evaluator's batch sizes
_HIGHEST = jax.lax.Precision.HIGHEST


def _f16(x: jax.Array) -> jax.Array:
    """``x`` (float32) rounded to the nearest float16 (ties to even, overflow to inf, subnormals
    kept), as float32: a float16 round trip that XLA may not drop as excess precision."""
    normal = jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)  # flushes subnormals
    subnormal = jnp.round(x * 2.0**24) * 2.0**-24  # float16's subnormal step is 2^-24
    return jnp.where(jnp.abs(x) < 2.0**-14, subnormal, normal)


def _squared_distances(u_rF: jax.Array, v_cF: jax.Array, round_: bool) -> jax.Array:
    """``(r, c)`` squared distances, each step rounded to float16 when ``round_``."""
    rnd = _f16 if round_ else (lambda x: x)
    norm_u = rnd(jnp.sum(rnd(u_rF * u_rF), 1))
    norm_v = rnd(jnp.sum(rnd(v_cF * v_cF), 1))
    dot = rnd(jnp.dot(u_rF, v_cF.T, precision=_HIGHEST))
    return jnp.maximum(rnd(rnd(norm_u[:, None] - rnd(2.0 * dot)) + norm_v[None, :]), 0.0)


@jax.jit
def distance_block(u_rF: jax.Array, v_cF: jax.Array) -> jax.Array:
    """The evaluator's distance block: float16 arithmetic, or float32 where that overflows."""
    u_rF, v_cF = u_rF.astype(jnp.float32), v_cF.astype(jnp.float32)
    d16 = _squared_distances(_f16(u_rF), _f16(v_cF), round_=True)
    return jax.lax.cond(
        jnp.isfinite(d16).all(), lambda: d16, lambda: _squared_distances(u_rF, v_cF, round_=False)
    )


@functools.partial(jax.jit, static_argnums=2)
def _smallest(u_rF: jax.Array, v_cF: jax.Array, k: int) -> jax.Array:
    """The ``k`` smallest distances of each row of a block, ascending."""
    return -jax.lax.top_k(-distance_block(u_rF, v_cF), k)[0]


def _check(features_NF: np.ndarray, what: str) -> np.ndarray:
    if features_NF.ndim != 2 or len(features_NF) < K + 1:
        raise ValueError(
            f"precision/recall needs at least {K + 1} {what} (each with {K} neighbours), "
            f"got features of shape {features_NF.shape}"
        )
    return np.asarray(features_NF, np.float32)


def manifold_radii(features_NF: np.ndarray) -> np.ndarray:
    """``(N,)`` float32: each point's squared distance to its ``K``-th nearest neighbour."""
    x = _check(features_NF, "points")
    radii = []
    for r0 in range(0, len(x), BLOCK):
        rows = x[r0 : r0 + BLOCK]
        parts = [
            np.asarray(_smallest(rows, x[c0 : c0 + BLOCK], min(K + 1, len(x) - c0)))
            for c0 in range(0, len(x), BLOCK)
        ]
        radii.append(np.sort(np.concatenate(parts, 1), 1)[:, K])
    return np.concatenate(radii)


@jax.jit
def _inside(u_rF, radii_u_r, v_cF, radii_v_c) -> tuple[jax.Array, jax.Array]:
    """Which rows lie in some column's ball, and which columns in some row's ball."""
    d = distance_block(u_rF, v_cF)
    return (d <= radii_v_c[None, :]).any(1), (d <= radii_u_r[:, None]).any(0)


def precision_recall(reference_NF: np.ndarray, samples_NF: np.ndarray) -> tuple[float, float]:
    """``(precision, recall)`` of the samples against the reference batch (pool_3 features)."""
    ref = _check(reference_NF, "reference images")
    samples = _check(samples_NF, "samples")
    if ref.shape[1] != samples.shape[1]:
        raise ValueError(f"features of {ref.shape[1]} and {samples.shape[1]} dimensions")
    radii_ref, radii_samples = manifold_radii(ref), manifold_radii(samples)
    ref_inside = np.zeros(len(ref), bool)
    samples_inside = np.zeros(len(samples), bool)
    for r0 in range(0, len(ref), BLOCK):
        rows = slice(r0, r0 + BLOCK)
        for c0 in range(0, len(samples), BLOCK):
            cols = slice(c0, c0 + BLOCK)
            r_in, c_in = _inside(ref[rows], radii_ref[rows], samples[cols], radii_samples[cols])
            ref_inside[rows] |= np.asarray(r_in)
            samples_inside[cols] |= np.asarray(c_in)
    return float(samples_inside.mean()), float(ref_inside.mean())
