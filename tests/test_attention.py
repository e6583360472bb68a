"""Attention patterns against direct numpy loops and analytic masks."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from mvar_jax.kernels import neighborhood
from mvar_jax.models import attention

PATCH_NUMS = (1, 2, 3, 4, 5)


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _softmax_attend(q, k, v, scale, allowed):
    """One query row: q (heads, d), k/v (n, heads, d), allowed (n,) -> (heads, d)."""
    logits = np.einsum("hd,nhd->hn", q, k).astype(np.float64) * scale
    logits = np.where(allowed[None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hn,nhd->hd", p, v)


def _masked_attention_loop(q, k, v, scale, allowed):
    """(B, lq, heads, d) queries, (lq, lk) boolean mask, one row at a time."""
    out = np.zeros(q.shape, np.float64)
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            out[b, i] = _softmax_attend(q[b, i], k[b], v[b], scale, allowed[i])
    return out


def _neighborhood_loop(q, k, v, ks, scale):
    """NATTEN na2d by definition: the window of row i starts at clamp(i - ks//2, 0, H - ks)."""
    B, H, W, heads, d = q.shape
    out = np.zeros(q.shape, np.float64)
    for b in range(B):
        for i in range(H):
            r0 = min(max(i - ks // 2, 0), H - ks)
            for j in range(W):
                c0 = min(max(j - ks // 2, 0), W - ks)
                kw = k[b, r0 : r0 + ks, c0 : c0 + ks].reshape(ks * ks, heads, d)
                vw = v[b, r0 : r0 + ks, c0 : c0 + ks].reshape(ks * ks, heads, d)
                out[b, i, j] = _softmax_attend(q[b, i, j], kw, vw, scale, np.ones(ks * ks, bool))
    return out


@pytest.mark.parametrize("H,W,ks", [(3, 3, 3), (5, 8, 3), (9, 6, 5), (7, 11, 7), (13, 13, 7), (6, 6, 1)])
def test_neighborhood_reference_matches_window_loop(H, W, ks):
    rng = np.random.default_rng(H * 100 + W + ks)
    q, k, v = (_rand(rng, 2, H, W, 2, 8) for _ in range(3))
    out = neighborhood.neighborhood_attention_reference(q, k, v, ks, scale=0.7)
    assert out.shape == q.shape
    assert rel_err(out, _neighborhood_loop(q, k, v, ks, 0.7)) < 1e-6


def test_neighborhood_full_window_is_dense_attention():
    # A window as large as the map sees every token: plain attention.
    rng = np.random.default_rng(0)
    q, k, v = (_rand(rng, 1, 5, 5, 2, 4) for _ in range(3))
    out = neighborhood.neighborhood_attention_reference(q, k, v, 5)
    flat = [t.reshape(1, 25, 2, 4) for t in (q, k, v)]
    dense = attention.dense_attention(*flat, scale=0.5)
    assert rel_err(out.reshape(1, 25, 2, 4), dense) < 1e-6


def test_lean_backward_is_the_gradient_of_softmax_attention():
    """The recomputing backward against autodiff through jax.nn.dot_product_attention, under VAR's
    block-causal mask: the same value, the same gradients (float32)."""
    rng = np.random.default_rng(3)
    ids = attention.scale_ids((1, 2, 3, 4), 0, 4)
    q, k, v, weight = (_rand(rng, 2, 30, 4, 8) for _ in range(4))

    def loss(lean):
        return lambda q, k, v: jnp.sum(
            attention.block_causal_attention(q, k, v, ids, ids, 0.3, lean_backward=lean) * weight
        )

    np.testing.assert_array_equal(loss(True)(q, k, v), loss(False)(q, k, v))
    lean, plain = (jax.grad(loss(flag), argnums=(0, 1, 2))(q, k, v) for flag in (True, False))
    for name, ours, ref in zip("qkv", lean, plain):
        assert rel_err(ours, ref) < 1e-6, name


def test_neighborhood_dispatch():
    rng = np.random.default_rng(1)
    q, k, v = (_rand(rng, 1, 6, 7, 2, 4) for _ in range(3))
    ref = neighborhood.neighborhood_attention_reference(q, k, v, 3, 0.5)
    np.testing.assert_array_equal(attention.neighborhood_attention(q, k, v, 3, 0.5, impl="reference"), ref)
    with pytest.raises(ValueError, match="impl"):
        attention.neighborhood_attention(q, k, v, 3, 0.5, impl="natten")
    with pytest.raises(ValueError, match="kernel_size"):
        attention.neighborhood_attention(q, k, v, 9, 0.5, impl="reference")


def test_neighborhood_masked_matches_window_loop():
    # Whole axes (dense under the mask) up to 16; tiles of 4 to 8 rows above, with ragged
    # border spans (18: tiles of 6; 20: tiles of 5), and a prime side attended whole (17).
    rng = np.random.default_rng(7)
    for H, W, ks in [(5, 8, 3), (13, 13, 7), (16, 16, 7), (24, 20, 5), (18, 17, 7), (32, 9, 3), (20, 6, 1)]:
        q, k, v = (_rand(rng, 2, H, W, 2, 8) for _ in range(3))
        out = attention.neighborhood_attention_masked(q, k, v, ks, scale=0.7)
        assert out.shape == q.shape
        assert rel_err(out, _neighborhood_loop(q, k, v, ks, 0.7)) < 1e-6, (H, W, ks)


@pytest.mark.parametrize("size,ks", [(13, 7), (16, 7), (24, 7), (18, 5), (64, 7), (17, 3)])
def test_axis_tiling_covers_every_window_exactly(size, ks):
    tiling = attention.axis_tiling(size, ks)
    starts = neighborhood.neighborhood_window_starts(size, ks)
    assert size % tiling.tile == 0 and tiling.allowed.shape[1:] == (tiling.tile, tiling.span)
    whole = size <= attention.MASKED_WHOLE_AXIS or size == 17  # 17 has no tile of 4 to 8
    assert tiling.tile == size if whole else tiling.tile in attention.MASKED_TILES
    for i in range(size):
        t, j = divmod(i, tiling.tile)
        keys = tiling.key_start[t] + np.flatnonzero(tiling.allowed[t, j])
        np.testing.assert_array_equal(keys, np.arange(starts[i], starts[i] + ks))
    assert np.all(tiling.key_start >= 0) and np.all(tiling.key_start + tiling.span <= size)


def test_neighborhood_masked_gradients_and_bfloat16_match_reference():
    rng = np.random.default_rng(5)
    q, k, v, do = (jnp.asarray(_rand(rng, 2, 18, 9, 2, 8)) for _ in range(4))

    def grads(fn):
        return jax.vjp(lambda *qkv: fn(*qkv, 5, 0.7), q, k, v)[1](do)

    for got, want in zip(
        grads(attention.neighborhood_attention_masked), grads(neighborhood.neighborhood_attention_reference)
    ):
        assert rel_err(got, want) < 1e-5
    bf16 = [t.astype(jnp.bfloat16) for t in (q, k, v)]
    out = attention.neighborhood_attention_masked(*bf16, 5, 0.7)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, neighborhood.neighborhood_attention_reference(*bf16, 5, 0.7)) < 1e-2


def test_auto_picks_the_masked_path_off_gpu():
    rng = np.random.default_rng(6)
    q, k, v = (_rand(rng, 1, 6, 7, 2, 4) for _ in range(3))
    masked = attention.neighborhood_attention_masked(q, k, v, 3, 0.5)
    for impl in ("masked", "auto"):
        np.testing.assert_array_equal(attention.neighborhood_attention(q, k, v, 3, 0.5, impl), masked)


@pytest.mark.skipif(
    importlib.util.find_spec("mvar_jax.kernels.spatial_markov") is None,
    reason="kernels/spatial_markov.py not written yet",
)
def test_neighborhood_dispatch_reaches_pallas_kernel_in_interpret_mode():
    rng = np.random.default_rng(2)
    q, k, v = (_rand(rng, 1, 8, 8, 2, 16) for _ in range(3))
    out = attention.neighborhood_attention(q, k, v, 3, 0.5, impl="pallas_interpret")
    assert rel_err(out, _neighborhood_loop(q, k, v, 3, 0.5)) < 1e-5


def test_scale_ids():
    np.testing.assert_array_equal(
        attention.scale_ids(PATCH_NUMS, 0, 3), [0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    )
    np.testing.assert_array_equal(attention.scale_ids(PATCH_NUMS, 2, 3), [2] * 9)
    with pytest.raises(ValueError, match="first_scale"):
        attention.scale_ids(PATCH_NUMS, 3, 3)


def test_block_diagonal_and_block_causal_match_masked_loop():
    rng = np.random.default_rng(3)
    ids = attention.scale_ids(PATCH_NUMS, 0, 4)  # 30 tokens
    q, k, v = (_rand(rng, 2, ids.size, 2, 4) for _ in range(3))
    diag = attention.block_diagonal_attention(q, k, v, ids, 0.6)
    assert rel_err(diag, _masked_attention_loop(q, k, v, 0.6, ids[:, None] == ids[None])) < 1e-6
    causal = attention.block_causal_attention(q, k, v, ids, ids, 0.6)
    assert rel_err(causal, _masked_attention_loop(q, k, v, 0.6, ids[:, None] >= ids[None])) < 1e-6


def test_block_causal_with_cached_prefix_equals_full_sequence_rows():
    rng = np.random.default_rng(4)
    ids = attention.scale_ids(PATCH_NUMS, 0, 4)
    q, k, v = (_rand(rng, 1, ids.size, 2, 4) for _ in range(3))
    full = attention.block_causal_attention(q, k, v, ids, ids, 0.6)
    rows = ids == 2
    end = int(np.flatnonzero(rows)[-1]) + 1
    one_scale = attention.block_causal_attention(
        q[:, rows], k[:, :end], v[:, :end], ids[rows], ids[:end], 0.6
    )
    assert rel_err(one_scale, np.asarray(full)[:, rows]) < 1e-6


@pytest.mark.parametrize("first,last", [(0, 5), (0, 3), (3, 5), (4, 5), (1, 2)])
def test_markov_attention_is_per_scale(first, last):
    """Scales below refine_step: full attention within the scale; later: 3x3 windows."""
    rng = np.random.default_rng(first * 10 + last)
    ids = attention.scale_ids(PATCH_NUMS, first, last)
    q, k, v = (_rand(rng, 2, ids.size, 2, 4) for _ in range(3))
    out = attention.markov_attention(
        q,
        k,
        v,
        patch_nums=PATCH_NUMS,
        first_scale=first,
        last_scale=last,
        scale=0.6,
        refine_step=3,
        kernel_size=3,
        impl="reference",
    )
    want = np.zeros(q.shape)
    for si in range(first, last):
        rows = ids == si
        pn = PATCH_NUMS[si]
        if si < 3:
            want[:, rows] = _masked_attention_loop(
                q[:, rows], k[:, rows], v[:, rows], 0.6, np.ones((pn * pn, pn * pn), bool)
            )
        else:
            maps = [t[:, rows].reshape(2, pn, pn, 2, 4) for t in (q, k, v)]
            want[:, rows] = _neighborhood_loop(*maps, 3, 0.6).reshape(2, pn * pn, 2, 4)
    assert rel_err(out, want) < 1e-6


def test_pyramid_attention_errors():
    q = jnp.zeros((1, 14, 2, 4))
    span = dict(patch_nums=PATCH_NUMS, first_scale=0, last_scale=3, scale=1.0)
    with pytest.raises(ValueError, match="q has 10 tokens but scales"):
        attention.markov_attention(q[:, :10], q, q, refine_step=3, kernel_size=3, **span)
    with pytest.raises(ValueError, match="share a shape"):
        attention.markov_attention(q, q[:, :5], q[:, :5], refine_step=3, kernel_size=3, **span)
