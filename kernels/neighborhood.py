"""NATTEN's neighbourhood window rule (``na2d``, dilation 1, non-causal), written once.

The window of query i along an axis of ``size`` positions starts at
``clamp(i - k // 2, 0, size - k)``: windows stay inside the map, so border queries
see a shifted window rather than a padded one, and every query sees k*k keys.
The pure-jnp reference (``mvar_jax.models.attention``), the Pallas kernel
(``kernels.spatial_markov``) and the benches all take the rule from here.

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
