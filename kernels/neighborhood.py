"""NATTEN's neighbourhood (``na2d``, dilation 1, non-causal): the window rule, written once, and
the pure-jnp reference of the Pallas kernel.

The window of query i along an axis of ``size`` positions starts at
``clamp(i - k // 2, 0, size - k)``: windows stay inside the map, so border queries
see a shifted window rather than a padded one, and every query sees k*k keys.
The reference below, the Pallas kernel (``kernels.spatial_markov``), the model's masked
XLA path (``mvar_jax.models.attention``) and the benches all take the rule from here.

Each function works on numpy values (static windows, built at trace time) and on
jax arrays (inside a kernel, where positions are traced), returning the same kind.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _xp(i):
    return jnp if isinstance(i, jax.Array) else np


def window_start(i, size: int, kernel_size: int):
    """First row (column) of query i's window along an axis of ``size``."""
    return _xp(i).clip(i - kernel_size // 2, 0, size - kernel_size)


def first_query(j, kernel_size: int):
    """Smallest query index whose window contains key index j."""
    return _xp(j).where(j < kernel_size, 0, j - kernel_size // 2)


def last_query(j, size: int, kernel_size: int):
    """Largest query index whose window contains key index j."""
    return _xp(j).where(j >= size - kernel_size, size - 1, j + kernel_size // 2)


def neighborhood_window_starts(size: int, kernel_size: int) -> np.ndarray:
    """First row (or column) of each query's window, shape ``(size,)``.

    NATTEN (dilation 1, non-causal) keeps every window inside the map: the window
    of query i starts at ``clamp(i - k // 2, 0, size - k)``, so border queries see
    a shifted window rather than a padded one, and every query sees k*k keys.
    A static numpy array: the windows depend on shapes only. The rule itself is
    ``window_start``, which the Pallas kernel uses too.
    """
    if kernel_size % 2 != 1 or not 1 <= kernel_size <= size:
        raise ValueError(
            f"kernel_size must be odd and in [1, {size}] for a map of size {size}, got {kernel_size}"
        )
    return window_start(np.arange(size), size, kernel_size)


def neighborhood_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kernel_size: int,
    scale: float | None = None,
) -> jax.Array:
    """Spatial-Markov attention by gathering each query's k x k window.

    Args:
      q, k, v: ``(B, H, W, heads, head_dim)``.
      kernel_size: odd window side, at most ``min(H, W)``.
      scale: logit multiplier; ``head_dim ** -0.5`` when None.

    Returns:
      ``(B, H, W, heads, head_dim)`` in q's dtype; logits and softmax in float32.
    """
    B, H, W, heads, head_dim = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share a shape, got {q.shape}, {k.shape}, {v.shape}")
    if scale is None:
        scale = head_dim**-0.5
    ks = kernel_size
    rows = neighborhood_window_starts(H, ks)[:, None] + jnp.arange(ks)[None, :]  # (H, ks)
    cols = neighborhood_window_starts(W, ks)[:, None] + jnp.arange(ks)[None, :]  # (W, ks)
    # Windowed keys/values: (B, H, ks, W, ks, heads, head_dim).
    k_win = k[:, rows][:, :, :, cols]
    v_win = v[:, rows][:, :, :, cols]
    logits = jnp.einsum("bhwnd,bhawcnd->bhwnac", q.astype(jnp.float32), k_win.astype(jnp.float32)) * scale
    logits = logits.reshape(B, H, W, heads, ks * ks)
    probs = jax.nn.softmax(logits, axis=-1).reshape(B, H, W, heads, ks, ks)
    out = jnp.einsum("bhwnac,bhawcnd->bhwnd", probs, v_win.astype(jnp.float32))
    return out.astype(q.dtype)
