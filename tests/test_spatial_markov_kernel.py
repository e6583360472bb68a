"""The Pallas spatial-Markov kernel (interpret mode) against two references.

References: autodiff through ``neighborhood_attention_reference`` (gather of
each window) and an explicit float64 numpy loop over windows, with the
gradients written out by hand. Shapes are small: interpret mode is slow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from hypothesis import given, settings, strategies as st

from mvar_jax.kernels.neighborhood import neighborhood_attention_reference
from mvar_jax.kernels.spatial_markov import Tiling, spatial_markov_attention
from mvar_jax.models.transformer import Transformer
from mvar_jax.weights import transformer as transformer_weights

TOL = 1e-5


def _random(shape, count, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(count)]


def numpy_windows(q, k, v, do, kernel_size, scale):
    """Output and (dq, dk, dv) for cotangent ``do``, one window at a time, float64."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    B, H, W, heads, D = q.shape
    ks = kernel_size
    out, dq, dk, dv = (np.zeros_like(q) for _ in range(4))
    for i in range(H):
        r = min(max(i - ks // 2, 0), H - ks)
        for j in range(W):
            c = min(max(j - ks // 2, 0), W - ks)
            k_win = k[:, r : r + ks, c : c + ks].reshape(B, ks * ks, heads, D)
            v_win = v[:, r : r + ks, c : c + ks].reshape(B, ks * ks, heads, D)
            logits = np.einsum("bnd,bknd->bnk", q[:, i, j], k_win) * scale
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[:, i, j] = np.einsum("bnk,bknd->bnd", p, v_win)
            dp = np.einsum("bnd,bknd->bnk", do[:, i, j], v_win)
            ds = p * (dp - (p * dp).sum(-1, keepdims=True)) * scale
            dq[:, i, j] = np.einsum("bnk,bknd->bnd", ds, k_win)
            window = (B, ks, ks, heads, D)
            dk[:, r : r + ks, c : c + ks] += np.einsum("bnk,bnd->bknd", ds, q[:, i, j]).reshape(window)
            dv[:, r : r + ks, c : c + ks] += np.einsum("bnk,bnd->bknd", p, do[:, i, j]).reshape(window)
    return out, (dq, dk, dv)


def _check_against_references(shape, kernel_size, tiling, seed=0):
    q, k, v, do = _random(shape, 4, seed=seed)
    scale = shape[-1] ** -0.5
    kernel = functools.partial(
        spatial_markov_attention, kernel_size=kernel_size, interpret=True, tiling=tiling
    )
    reference = functools.partial(neighborhood_attention_reference, kernel_size=kernel_size)
    out, vjp = jax.vjp(kernel, q, k, v)
    grads = vjp(do)
    ref_out, ref_vjp = jax.vjp(reference, q, k, v)
    ref_grads = ref_vjp(do)
    loop_out, loop_grads = numpy_windows(q, k, v, do, kernel_size, scale)

    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref_out) < TOL
    assert rel_err(out, loop_out) < TOL
    for name, g, ref_g, loop_g in zip("qkv", grads, ref_grads, loop_grads):
        assert rel_err(g, ref_g) < TOL, f"d{name} vs autodiff reference"
        assert rel_err(g, loop_g) < TOL, f"d{name} vs numpy loop"


@pytest.mark.parametrize(
    "shape, kernel_size, block, chunk",
    [
        # (B, H, W, heads, head_dim)
        ((2, 7, 9, 2, 8), 3, 16, None),  # non-square; blocks straddle rows
        ((1, 13, 13, 2, 16), 7, None, None),  # MVAR's 13x13 scale, default tiling
        ((1, 13, 13, 1, 8), 7, 32, 64),  # partner chunks of ~5 rows, not row-aligned
        ((1, 16, 16, 1, 8), 7, 64, 128),  # chunk longer than the band of the first block
        ((1, 6, 32, 1, 8), 5, 16, 64),  # column-tiled: 16-wide runs of 32-wide rows (no chunks)
        ((1, 5, 33, 1, 8), 5, 16, None),  # width 33: 64-wide partner segments
        ((1, 33, 7, 1, 8), 7, 32, 16),  # tall map, border rows see 1.5 k query rows
        ((1, 5, 5, 1, 8), 5, 16, None),  # k = H = W: every query sees the whole map
        ((1, 17, 48, 1, 8), 17, 16, None),  # column-tiled, large k: border keys seen by k + k//2 cols
    ],
    ids=[
        "7x9k3",
        "13x13k7",
        "13x13k7-chunk64",
        "16x16k7-chunk128",
        "6x32k5-coltiled",
        "5x33k5",
        "33x7k7-chunk16",
        "5x5k5",
        "17x48k17-coltiled",
    ],
)
def test_forward_and_grads_match_references(shape, kernel_size, block, chunk):
    tiling = None if block is None else Tiling(block_q=block, block_k=block, partner_chunk=chunk)
    _check_against_references(shape, kernel_size, tiling)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(kernel_size=st.sampled_from([3, 5, 7]), data=st.data())
def test_random_shapes_match_references(kernel_size, data):
    height = data.draw(st.integers(kernel_size, 20), label="H")
    width = data.draw(st.integers(kernel_size, 20), label="W")
    block_q = data.draw(st.sampled_from([16, 32]), label="block_q")
    block_k = data.draw(st.sampled_from([16, 32]), label="block_k")
    chunk = data.draw(st.sampled_from([None, 16, 32]), label="partner_chunk")
    _check_against_references(
        (1, height, width, 1, 8),
        kernel_size,
        Tiling(block_q=block_q, block_k=block_k, partner_chunk=chunk),
        seed=height * width,
    )


def test_kernel_size_one_returns_values():
    q, k, v = _random((1, 4, 6, 2, 16), 3)
    out = spatial_markov_attention(q, k, v, 1, interpret=True)
    np.testing.assert_allclose(out, v, rtol=1e-6, atol=1e-6)


def test_bfloat16_close_to_float32_reference():
    shape, ks = (1, 13, 13, 2, 16), 7
    q, k, v, do = _random(shape, 4, dtype=jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    out, vjp = jax.vjp(functools.partial(spatial_markov_attention, kernel_size=ks, interpret=True), q, k, v)
    grads = vjp(do)
    ref_out, ref_vjp = jax.vjp(functools.partial(neighborhood_attention_reference, kernel_size=ks), *f32[:3])
    ref_grads = ref_vjp(f32[3])
    assert out.dtype == jnp.bfloat16
    # bfloat16 has an 8-bit mantissa: one rounding is ~4e-3 relative.
    assert rel_err(out.astype(jnp.float32), ref_out) < 1e-2
    for g, ref_g in zip(grads, ref_grads):
        assert g.dtype == jnp.bfloat16
        assert rel_err(g.astype(jnp.float32), ref_g) < 2e-2


def test_jit_and_explicit_scale():
    shape, ks, scale = (1, 9, 11, 2, 8), 5, 0.7
    q, k, v = _random(shape, 3)
    fn = jax.jit(functools.partial(spatial_markov_attention, kernel_size=ks, scale=scale, interpret=True))
    ref = neighborhood_attention_reference(q, k, v, ks, scale=scale)
    assert rel_err(fn(q, k, v), ref) < TOL


@pytest.mark.parametrize(
    "shapes, dtype, kernel_size, match",
    [
        ([(2, 8, 8, 16)] * 3, jnp.float32, 3, "must be"),
        ([(1, 8, 8, 2, 16), (1, 8, 8, 2, 16), (1, 8, 9, 2, 16)], jnp.float32, 3, "share a shape"),
        ([(1, 8, 8, 2, 16)] * 3, jnp.float16, 3, "float32 or all bfloat16"),
        ([(1, 8, 8, 2, 16)] * 3, jnp.float32, 4, "odd"),
        ([(1, 8, 5, 2, 16)] * 3, jnp.float32, 7, "min"),
        ([(1, 8, 8, 2, 16)] * 3, jnp.float32, 0, "odd"),
    ],
)
def test_bad_input_raises(shapes, dtype, kernel_size, match):
    q, k, v = (jnp.zeros(s, dtype) for s in shapes)
    with pytest.raises(ValueError, match=match):
        spatial_markov_attention(q, k, v, kernel_size, interpret=True)


@pytest.mark.parametrize(
    "kwargs", [dict(block_q=48), dict(block_k=8), dict(partner_chunk=24), dict(num_warps=0)]
)
def test_bad_tiling_raises(kwargs):
    with pytest.raises(ValueError, match="Tiling|num_warps"):
        Tiling(**kwargs)


@pytest.fixture(scope="module")
def tiny_mvar_with_kernel(fixture_dir):
    return transformer_weights.load_transformer(
        fixture_dir / "tiny_mvar.pth", neighborhood_impl="pallas_interpret"
    )


@pytest.mark.parametrize("name, first_scale", [("mvar_logits_seg1", 8), ("mvar_logits_seg2", 9)])
def test_tiny_mvar_logits_with_kernel_match_official(tiny_mvar_with_kernel, tiny_io, name, first_scale):
    """The official spatial-Markov segments (13x13, 16x16 maps, k=7) through the kernel."""
    config, params = tiny_mvar_with_kernel
    begin, end = config.token_range(first_scale, first_scale + 1)
    x_BlCv = tiny_io["x_BLCv_wo_first_l"][:, begin - config.first_l : end - config.first_l]
    forward = jax.jit(
        functools.partial(Transformer(config).apply, first_scale=first_scale, last_scale=first_scale + 1)
    )
    assert rel_err(forward(params, tiny_io["label"], x_BlCv), tiny_io[name]) < TOL
