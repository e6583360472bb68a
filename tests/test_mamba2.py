"""Mamba2: the chunked scan against the token-by-token recurrence, state carried across cuts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from mvar_jax.models.mamba2 import Mamba2, Mamba2Config, MambaState, ssd_scan

# Small but with every axis > 1: 4 heads of 16, d_state 8, conv width 4.
SIZES = dict(d_model=32, d_state=8, d_conv=4, expand=2, headdim=16)


def _params(seed: int = 0):
    """The layer's own init for A and dt, O(1) random values elsewhere, so that
    every path moves the output."""
    model = Mamba2(Mamba2Config(**SIZES))
    u = jnp.zeros((1, 1, SIZES["d_model"]))
    params = model.init(jax.random.PRNGKey(seed), u)["params"]
    rng = np.random.default_rng(seed)

    def randomise(path, leaf):
        name = path[-1].key
        if name in ("A_log", "dt_bias"):
            return leaf
        return jnp.asarray(rng.normal(0, 0.3, leaf.shape) + (name in ("D", "scale")), jnp.float32)

    return {"params": jax.tree_util.tree_map_with_path(randomise, params)}


@functools.cache
def _chunked(chunk_size: int):
    model = Mamba2(Mamba2Config(**SIZES, chunk_size=chunk_size))
    return jax.jit(model.apply)


@jax.jit
def _token_by_token(params, u_BLD, state):
    model = Mamba2(Mamba2Config(**SIZES))

    def one(state, u_BD):
        out, state = model.apply(params, u_BD, state, method=Mamba2.step)
        return state, out

    state, out_LBD = jax.lax.scan(one, state, jnp.moveaxis(u_BLD, 1, 0))
    return jnp.moveaxis(out_LBD, 0, 1), state


def _random_state(rng, batch: int) -> MambaState:
    zero = Mamba2Config(**SIZES).zero_state(batch)
    return MambaState(*(jnp.asarray(rng.normal(0, 1, s.shape), jnp.float32) for s in zero))


def _assert_close(got, want, tol=1e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(g, w) <= tol, rel_err(g, w)


# 13 tokens (one length: one compilation of the recurrence): chunks of 1, of 4 and 5
# (the last one partial), one chunk larger than the sequence.
@pytest.mark.parametrize("chunk_size,from_zero", [(1, True), (4, False), (5, False), (256, True)])
def test_chunked_scan_equals_the_recurrence(chunk_size, from_zero):
    rng = np.random.default_rng(chunk_size)
    params = _params(seed=chunk_size)
    u = jnp.asarray(rng.normal(0, 1, (2, 13, SIZES["d_model"])), jnp.float32)
    state = Mamba2Config(**SIZES).zero_state(2) if from_zero else _random_state(rng, 2)
    got = _chunked(chunk_size)(params, u, None if from_zero else state)
    _assert_close(got, _token_by_token(params, u, state))


def _recurrence_float64(x, dt, A, B, C, h):
    """``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t`` in numpy float64."""
    x, dt, A, B, C, h = (np.asarray(t, np.float64) for t in (x, dt, A, B, C, h))
    ys = []
    for t in range(x.shape[1]):
        h = (
            h * np.exp(dt[:, t] * A)[..., None, None]
            + dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, None, None, :]
        )
        ys.append(np.einsum("bhpn,bn->bhp", h, C[:, t]))
    return np.stack(ys, axis=1), h


def test_ssd_scan_survives_state_resets():
    # Two tokens with a huge step (dt = 1000, log-decays down to -16000) wipe the
    # state, as Mamba's input-dependent dt does. Inside a chunk, a decay written as
    # a difference of prefix sums then loses ~1e-4 to cancellation; summed term by
    # term it stays at float32 round-off.
    rng = np.random.default_rng(0)
    L, H, P, N = 300, 3, 4, 5
    x, B, C = rng.normal(size=(2, L, H, P)), rng.normal(size=(2, L, N)), rng.normal(size=(2, L, N))
    dt = np.full((2, L, H), 0.02)
    dt[:, [30, 200]] = 1000.0
    A, h = np.array([-0.5, -2.0, -16.0]), rng.normal(size=(2, H, P, N))
    want = _recurrence_float64(x, dt, A, B, C, h)
    got = jax.jit(ssd_scan, static_argnames="chunk_size")(
        *(jnp.asarray(t, jnp.float32) for t in (x, dt, A, B, C, h)), chunk_size=64
    )
    _assert_close(got, want, tol=1e-6)  # measured 1.2e-7


def test_state_carries_a_sequence_across_cuts():
    """Pieces processed one after another, each from the last one's state, equal the
    whole sequence: what M-VAR's sampler does scale by scale."""
    rng = np.random.default_rng(1)
    params = _params(seed=1)
    u = jnp.asarray(rng.normal(0, 1, (2, 13, SIZES["d_model"])), jnp.float32)
    # Chunks of up to 4 over the whole (the last one partial), over pieces of 1, 4, 4, 4.
    first = Mamba2Config(**SIZES).zero_state(2)
    whole, whole_state = _chunked(4)(params, u, first)
    state, outs = first, []
    for begin, end in [(0, 1), (1, 5), (5, 9), (9, 13)]:
        out, state = _chunked(4)(params, u[:, begin:end], state)
        outs.append(out)
    _assert_close((jnp.concatenate(outs, axis=1), state), (whole, whole_state))


def test_initial_state_matters_and_config_errors_are_clear():
    rng = np.random.default_rng(0)
    params = _params()
    u = jnp.asarray(rng.normal(0, 1, (2, 13, SIZES["d_model"])), jnp.float32)
    from_zero, _ = _chunked(4)(params, u, Mamba2Config(**SIZES).zero_state(2))
    from_state, _ = _chunked(4)(params, u, _random_state(rng, 2))
    assert rel_err(from_state, from_zero) > 1e-2
    with pytest.raises(ValueError, match="not a multiple of headdim 64"):
        Mamba2Config(d_model=48)
    with pytest.raises(ValueError, match="d_conv must be >= 2"):
        Mamba2Config(d_model=64, d_conv=1)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        Mamba2Config(d_model=64, chunk_size=0)
