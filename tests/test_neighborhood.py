"""``kernels.neighborhood``: the window rule and its inverse against a brute-force enumeration."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvar_jax.kernels.neighborhood import first_query, last_query, window_start

CASES = [(size, ks) for size in range(1, 12) for ks in range(1, size + 1, 2)]


def _windows(size: int, ks: int) -> list[range]:
    """Each query's window by NATTEN's definition: k consecutive keys, centred on the
    query where the map allows, else the k keys at that border."""
    return [
        range(min(max(i - ks // 2, 0), size - ks), min(max(i - ks // 2, 0), size - ks) + ks)
        for i in range(size)
    ]


@pytest.mark.parametrize("size, ks", CASES)
def test_rule_and_its_inverse(size, ks):
    windows = _windows(size, ks)
    i = np.arange(size)
    starts = window_start(i, size, ks)
    assert isinstance(starts, np.ndarray)  # static: built at trace time
    np.testing.assert_array_equal(starts, [w.start for w in windows])
    assert all(len(w) == ks and 0 <= w.start and w.stop <= size for w in windows)
    seen_by = [[q for q, w in enumerate(windows) if j in w] for j in range(size)]
    np.testing.assert_array_equal(first_query(i, ks), [min(s) for s in seen_by])
    np.testing.assert_array_equal(last_query(i, size, ks), [max(s) for s in seen_by])


def test_traced_positions_give_the_same_windows():
    size, ks = 13, 7

    @jax.jit
    def rule(i):
        return window_start(i, size, ks), first_query(i, ks), last_query(i, size, ks)

    i = np.arange(size)
    for traced, static in zip(
        rule(jnp.asarray(i)), (window_start(i, size, ks), first_query(i, ks), last_query(i, size, ks))
    ):
        assert isinstance(traced, jax.Array)
        np.testing.assert_array_equal(traced, static)
