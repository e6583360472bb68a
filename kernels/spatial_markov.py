"""Spatial-Markov (neighbourhood) attention as Pallas kernels, with a custom VJP.

Every query of an ``H x W`` map attends to the ``k x k`` keys of its NATTEN
window (dilation 1, non-causal): rows ``clamp(i - k//2, 0, H - k) + [0, k)``,
likewise columns. Tensors use NATTEN's layout ``(B, H, W, heads, head_dim)``.

Design. The map is flattened row-major to ``N = H * W`` positions, and each
program owns a run of ``block`` consecutive positions of one (batch, head).
The positions on the other side of the attention (keys for a query block, the
queries that see a key block for dk/dv) lie in a band of whole rows, so the
program walks that band in contiguous segments of ``C`` positions: it loads
a segment, scores the block against it with a dense dot, and masks every pair
that is not in a window by index arithmetic. This is dense, masked work on
tensor cores instead of a gather; for the small maps of MVAR (13x13 to
32x32) the band is only a few times larger than the windows.

* A block that spans several rows meets whole partner rows, and the band is
  one contiguous run of positions: it is walked in chunks of
  ``Tiling.partner_chunk`` positions, which need not align with rows.
* When ``block`` divides W and is smaller (wide maps, 64x64), a block is one
  run of columns and only the ``block + k - 1`` columns next to it are loaded,
  one partner row per step: the column tiling that keeps large maps from
  wasting work.

Forward saves the log-sum-exp per query (base 2); backward recomputes the
probabilities, one kernel for dq (per query block, as forward) and one for
dk, dv (per key block, walking the inverse neighbourhood: border keys are seen
by up to ``k + k//2`` rows (and, with column tiling, columns) of queries,
which the walk and the partner segment bound exactly).

Triton constraints respected: every loaded tensor has power-of-two dims, every
dot operand is 2-D with dims >= 16 (``block``, ``C`` and the padded head_dim),
out-of-range rows, columns and head lanes are masked loads and stores, and
masks are iota comparisons. With ``interpret=True`` the same kernels run on
the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mvar_jax.kernels.neighborhood import first_query, last_query, window_start

# Finite stand-in for -inf: keeps the running maximum finite, so the online
# softmax never computes inf - inf.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Logits are kept in base 2 (scale * log2(e) folded in) so the kernels use exp2.
_LOG2_E = math.log2(math.e)
_MIN_DOT_DIM = 16  # Triton's tensor-core dot needs every operand dim >= 16.
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Launch parameters of the three kernels.

    Attributes:
      block_q: query positions (row-major run) per forward and dq program.
      block_k: key positions per dk/dv program.
      partner_chunk: partner positions per step of the walk when blocks span
        whole rows; None: the row width rounded up to a power of two. Column-
        tiled maps walk one partner row per step and ignore it.
      num_warps, num_stages: Triton compiler parameters.
    """

    block_q: int = 64
    block_k: int = 64
    partner_chunk: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k", "partner_chunk"):
            value = getattr(self, name)
            if name == "partner_chunk" and value is None:
                continue
            if not _is_power_of_2(value) or value < _MIN_DOT_DIM:
                raise ValueError(f"Tiling.{name} must be a power of two >= {_MIN_DOT_DIM}, got {value}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(
                f"num_warps and num_stages must be >= 1, got {self.num_warps}, {self.num_stages}"
            )


def default_tiling(height: int, width: int, dtype=jnp.bfloat16) -> Tiling:
    """Tiling for head_dim 64 on an H100.

    bfloat16: untuned guesses until a GPU run measures them: blocks of 64
    positions (several whole rows) on 4 warps for maps up to 32 wide; 16-column
    runs on 2 warps for wider maps (each loads 32-column partner segments when
    k <= 11). float32: IEEE float32 dots run on the FMA units with whole
    operand tiles in registers, and 64-position blocks on 4 warps spill at
    13x13 and 32x32, so blocks of 32 (16-column runs) on 4 warps. Never a block
    much larger than the map. Compiled for sm_80 and sm_90 in CI (see
    ``candidate_tilings``).
    """
    if jnp.dtype(dtype) == jnp.float32:
        tiling = Tiling(16, 16) if width > 32 else Tiling(32, 32)
    else:
        tiling = Tiling(16, 16, num_warps=2) if width > 32 else Tiling(64, 64)
    return _fit(tiling, height, width)


# Square map sides whose candidate tilings CI compiles for the GPU: the models'
# spatial-Markov maps (13, 16) and two larger ones. The tuner sweeps only these.
CANDIDATE_MAPS = (13, 16, 32, 64)


def candidate_tilings(height: int, width: int) -> tuple[Tiling, ...]:
    """The tilings ``bench.tune_spatial_markov`` chooses among, the default first.

    A short explicit list, each compiled for sm_80 and sm_90 at head_dim 64 in
    CI (tests/test_spatial_markov_cubin.py: no spills, at most 255 registers,
    shared memory within a block's limit). Left out because they spill or sit
    near 255 registers (measured with triton 3.6, see docs/benchmarks.md):
    128-position blocks on 4 warps or with partner chunks, 64-position blocks
    with partner chunks, 32-position blocks with 128-position chunks, and
    64-position blocks at 64x64.
    """
    if width <= 32:  # blocks of whole rows
        others = [
            Tiling(64, 64, num_warps=4, num_stages=3),
            Tiling(32, 32, num_warps=4, num_stages=2),
            Tiling(32, 32, partner_chunk=64, num_warps=4, num_stages=2),
            Tiling(128, 128, num_warps=8, num_stages=2),
            Tiling(128, 128, num_warps=8, num_stages=3),
        ]
    else:  # runs of columns
        others = [
            Tiling(16, 16, num_warps=2, num_stages=3),
            Tiling(32, 32, num_warps=4, num_stages=2),
            Tiling(32, 32, num_warps=4, num_stages=3),
        ]
    found = [default_tiling(height, width)] + [_fit(t, height, width) for t in others]
    return tuple(dict.fromkeys(found))


def _fit(tiling: Tiling, height: int, width: int) -> Tiling:
    """Blocks no larger than the map (rounded up to a power of two)."""
    cap = max(_MIN_DOT_DIM, pl.next_power_of_2(height * width))
    return dataclasses.replace(tiling, block_q=min(tiling.block_q, cap), block_k=min(tiling.block_k, cap))


# --------------------------------------------------------------------------
# What the kernels know statically.


@dataclasses.dataclass(frozen=True)
class _Call:
    """Everything static about one call: map, window, head size, scale, tiling, and
    which side a program owns (hashable: the custom_vjp's nondiff argument).

    ``own_is_query``: forward and dq programs own a block of queries and walk their
    keys; dk/dv programs own a block of keys and walk the queries that see them.
    """

    height: int
    width: int
    kernel_size: int
    head_dim: int
    scale: float
    tiling: Tiling
    interpret: bool
    own_is_query: bool = True

    def keys_owned(self) -> _Call:
        """The same call seen from the dk/dv kernel."""
        return dataclasses.replace(self, own_is_query=False)

    @property
    def block(self) -> int:
        """Own positions per program."""
        return self.tiling.block_q if self.own_is_query else self.tiling.block_k

    @property
    def scale_log2(self) -> float:
        """The logit multiplier in base 2 (the kernels use exp2)."""
        return self.scale * _LOG2_E

    @property
    def size(self) -> int:
        return self.height * self.width

    @property
    def head_dim_padded(self) -> int:
        return max(_MIN_DOT_DIM, pl.next_power_of_2(self.head_dim))

    @property
    def column_tiled(self) -> bool:
        """Blocks never straddle rows, so partners need only nearby columns."""
        return self.block < self.width and self.width % self.block == 0

    @property
    def segment(self) -> int:
        """Positions loaded per step of the walk (``C``).

        Column-tiled: a run of ``block`` columns meets ``block + k - 1`` partner
        columns in the interior. At a border the keys of a run are seen by up
        to ``k // 2`` more query columns (border windows are shifted inward,
        not clipped), so the key direction needs ``block + k - 1 + k // 2``;
        one bound serves both. Otherwise any chunk of the band will do.
        """
        if self.column_tiled:
            ks = self.kernel_size
            needed = min(self.width, self.block + ks - 1 + ks // 2)
        elif self.tiling.partner_chunk is not None:
            return self.tiling.partner_chunk
        else:
            needed = self.width
        return max(_MIN_DOT_DIM, pl.next_power_of_2(needed))

    def grid_size(self) -> int:
        return pl.cdiv(self.size, self.block)


def _in_window(q_row_start, q_col_start, k_row, k_col, ks: int):
    """Whether key (k_row, k_col) is in the window starting at the given corner."""
    dr = k_row - q_row_start
    dc = k_col - q_col_start
    return (dr >= 0) & (dr < ks) & (dc >= 0) & (dc < ks)


class _Walk:
    """A program's block of positions and the band of partner positions it walks.

    ``call.own_is_query`` selects the direction: queries walking their keys
    (forward, dq) or keys walking the queries that see them (dk, dv). In both,
    ``mask`` of a step is ``(block, segment)``: own positions x partner positions.
    """

    def __init__(self, call: _Call):
        H, W, ks = call.height, call.width, call.kernel_size
        self.call = call
        first = pl.program_id(0) * call.block
        idx = first + jnp.arange(call.block)
        self.own_valid = idx < call.size
        self.own_row = lax.div(idx, W)
        self.own_col = lax.rem(idx, W)
        last = jnp.minimum(first + call.block, call.size) - 1
        row_first, row_last = lax.div(first, W), lax.div(last, W)
        col_first = lax.rem(first, W)
        if call.own_is_query:
            self.row_lo = window_start(row_first, H, ks)
            self.row_hi = window_start(row_last, H, ks) + ks
            col0 = window_start(col_first, W, ks)
            self.own_row_start = window_start(self.own_row, H, ks)[:, None]
            self.own_col_start = window_start(self.own_col, W, ks)[:, None]
        else:
            self.row_lo = first_query(row_first, ks)
            self.row_hi = last_query(row_last, H, ks) + 1
            col0 = first_query(col_first, ks)
        self.col0 = col0  # first partner column of a column-tiled walk

    def _partners(self, step):
        """Step ``step``'s first partner position, and its rows, columns, validity ``(C,)``."""
        call, lane = self.call, jnp.arange(self.call.segment)
        if call.column_tiled:  # one partner row, the columns near the block
            row = self.row_lo + step
            col = self.col0 + lane
            return row * call.width + self.col0, jnp.full_like(col, row), col, col < call.width
        start = (self.row_lo * call.width) + step * call.segment  # a chunk of the band
        pos = start + lane
        valid = pos < self.row_hi * call.width
        return start, lax.div(pos, call.width), lax.rem(pos, call.width), valid

    def _num_steps(self):
        call = self.call
        if call.column_tiled:
            return self.row_hi - self.row_lo
        band = (self.row_hi - self.row_lo) * call.width
        return lax.div(band + call.segment - 1, call.segment)

    def fold(self, body, init):
        """``body(start, partner_valid, mask, carry)`` over the walk's steps."""
        call, ks = self.call, self.call.kernel_size

        def step(t, carry):
            start, row, col, valid = self._partners(t)
            if call.own_is_query:
                mask = _in_window(self.own_row_start, self.own_col_start, row[None, :], col[None, :], ks)
            else:
                mask = _in_window(
                    window_start(row, call.height, ks)[None, :],
                    window_start(col, call.width, ks)[None, :],
                    self.own_row[:, None],
                    self.own_col[:, None],
                    ks,
                )
            mask = mask & self.own_valid[:, None] & valid[None, :]
            return body(start, valid, mask, carry)

        return lax.fori_loop(0, self._num_steps(), step, init)


def _lanes(call: _Call) -> jax.Array:
    return jnp.arange(call.head_dim_padded) < call.head_dim


def _read(ref, valid, lanes=None, start=None):
    """Masked read of rows ``[start, start + len(valid))`` (the whole ref if None).

    Masked entries read as zero, so padding never reaches a dot product.
    """
    if start is not None:
        ref = ref.at[pl.ds(start, valid.shape[0])]
    mask = valid if lanes is None else valid[:, None] & lanes[None, :]
    return plgpu.load(ref, mask=mask, other=0.0)


def _write(ref, value, valid, lanes=None):
    mask = valid if lanes is None else valid[:, None] & lanes[None, :]
    plgpu.store(ref, value.astype(ref.dtype), mask=mask)


def _dot(a, b, trans_b: bool = False):
    # The float32-accumulating 2-D product pl.dot built (jax 0.11, the GPU image's,
    # no longer has pl.dot). HIGHEST keeps float32 inputs in IEEE float32 (no
    # TF32) on the GPU; it is a no-op for bfloat16 operands.
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------
# Kernels. Refs: own-block features (block, Dp), own-block stats (block,),
# partner features (N, Dp), partner stats (N,).


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, call: _Call):
    walk = _Walk(call)
    lanes = _lanes(call)
    q = _read(q_ref, walk.own_valid, lanes)

    def step(start, key_valid, mask, carry):
        acc, m, l = carry
        k = _read(k_ref, key_valid, lanes, start)
        v = _read(v_ref, key_valid, lanes, start)
        s = jnp.where(mask, _dot(q, k, trans_b=True) * call.scale_log2, _MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
        rescale = jnp.exp2(m - m_new)
        l = rescale * l + p.sum(axis=1)
        acc = rescale[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    init = (
        jnp.zeros((call.block, call.head_dim_padded), jnp.float32),
        jnp.full((call.block,), _MASK_VALUE, jnp.float32),
        jnp.zeros((call.block,), jnp.float32),
    )
    acc, m, l = walk.fold(step, init)
    l = jnp.where(walk.own_valid, l, 1.0)  # padding rows saw no key
    _write(o_ref, acc / l[:, None], walk.own_valid, lanes)
    _write(lse_ref, m + jnp.log2(l), walk.own_valid)


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dq_ref, *, call: _Call):
    walk = _Walk(call)
    lanes = _lanes(call)
    q = _read(q_ref, walk.own_valid, lanes)
    do = _read(do_ref, walk.own_valid, lanes)
    lse = _read(lse_ref, walk.own_valid)[:, None]
    delta = _read(delta_ref, walk.own_valid)[:, None]

    def step(start, key_valid, mask, dq):
        k = _read(k_ref, key_valid, lanes, start)
        v = _read(v_ref, key_valid, lanes, start)
        p = jnp.where(mask, jnp.exp2(_dot(q, k, trans_b=True) * call.scale_log2 - lse), 0.0)
        ds = p * (_dot(do, v, trans_b=True) - delta)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = walk.fold(step, jnp.zeros((call.block, call.head_dim_padded), jnp.float32))
    _write(dq_ref, dq * call.scale, walk.own_valid, lanes)


def _dkv_kernel(k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, call: _Call):
    walk = _Walk(call)
    lanes = _lanes(call)
    k = _read(k_ref, walk.own_valid, lanes)
    v = _read(v_ref, walk.own_valid, lanes)

    def step(start, query_valid, mask, carry):
        dk, dv = carry
        q = _read(q_ref, query_valid, lanes, start)
        do = _read(do_ref, query_valid, lanes, start)
        lse = _read(lse_ref, query_valid, start=start)[None, :]
        delta = _read(delta_ref, query_valid, start=start)[None, :]
        # Transposed scores: rows are this block's keys, columns the queries.
        p = jnp.where(mask, jnp.exp2(_dot(k, q, trans_b=True) * call.scale_log2 - lse), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do)
        ds = p * (_dot(v, do, trans_b=True) - delta)
        dk = dk + _dot(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros((call.block, call.head_dim_padded), jnp.float32)
    dk, dv = walk.fold(step, (zeros, zeros))
    _write(dk_ref, dk * call.scale, walk.own_valid, lanes)
    _write(dv_ref, dv, walk.own_valid, lanes)


# --------------------------------------------------------------------------
# pallas_call wiring. Features are (B, N, heads, head_dim), stats (B, heads, N);
# grid (blocks, B, heads) with the block index fastest, so neighbouring
# programs share partner rows in L2.


def _specs(call: _Call):
    """BlockSpecs: own features, own stats, partner features, partner stats."""
    dp, n = call.head_dim_padded, call.size
    return (
        pl.BlockSpec((None, call.block, None, dp), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, None, call.block), lambda i, b, h: (b, h, i)),
        pl.BlockSpec((None, n, None, dp), lambda i, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, None, n), lambda i, b, h: (b, h, 0)),
    )


def _launch(kernel, call: _Call, name: str, in_specs, out_specs, out_shape, *args):
    batch, _, heads, _ = args[0].shape
    return pl.pallas_call(
        functools.partial(kernel, call=call),
        grid=(call.grid_size(), batch, heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=call.tiling.num_warps, num_stages=call.tiling.num_stages
        ),
        interpret=call.interpret,
        name=name,
    )(*args)


def _forward(q, k, v, call: _Call):
    """Returns o ``(B, N, heads, D)`` and the base-2 log-sum-exp ``(B, heads, N)``."""
    batch, n, heads, _ = q.shape
    own, own_stat, partner, _ = _specs(call)
    return _launch(
        _forward_kernel,
        call,
        "spatial_markov_fwd",
        [own, partner, partner],
        [own, own_stat],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, n), jnp.float32)],
        q,
        k,
        v,
    )


def _backward(q, k, v, o, lse, do, call: _Call):
    # delta_i = sum_j p_ij dp_ij = do_i . o_i, the softmax-backward correction.
    delta = jnp.einsum("bnhd,bnhd->bhn", o.astype(jnp.float32), do.astype(jnp.float32))

    own, own_stat, partner, _ = _specs(call)
    dq = _launch(
        _dq_kernel,
        call,
        "spatial_markov_dq",
        [own, own, own_stat, own_stat, partner, partner],
        own,
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        q,
        do,
        lse,
        delta,
        k,
        v,
    )

    call = call.keys_owned()
    own, _, partner, partner_stat = _specs(call)
    dk, dv = _launch(
        _dkv_kernel,
        call,
        "spatial_markov_dkv",
        [own, own, partner, partner, partner_stat, partner_stat],
        [own, own],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        k,
        v,
        q,
        do,
        lse,
        delta,
    )
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, call: _Call):
    return _forward(q, k, v, call)[0]


def _attention_fwd(q, k, v, call: _Call):
    o, lse = _forward(q, k, v, call)
    return o, (q, k, v, o, lse)


def _attention_bwd(call: _Call, residuals, do):
    return _backward(*residuals, do, call)


_attention.defvjp(_attention_fwd, _attention_bwd)


def spatial_markov_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kernel_size: int,
    scale: float | None = None,
    *,
    interpret: bool = False,
    tiling: Tiling | None = None,
) -> jax.Array:
    """NATTEN-style 2-D neighbourhood attention (``na2d``, dilation 1, non-causal).

    Args:
      q, k, v: ``(B, H, W, heads, head_dim)``, float32 or bfloat16, one shape
        and dtype. Logits, softmax and accumulation are float32 either way.
      kernel_size: odd window side, at most ``min(H, W)``.
      scale: logit multiplier (a Python number); ``head_dim ** -0.5`` when None.
      interpret: run the kernels in Pallas' interpreter (CPU, tests).
      tiling: launch parameters; ``default_tiling(H, W, dtype)`` when None.

    Returns:
      ``(B, H, W, heads, head_dim)`` in q's dtype. Differentiable in q, k, v.
    """
    if q.ndim != 5:
        raise ValueError(f"q must be (B, H, W, heads, head_dim), got shape {q.shape}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share a shape, got {q.shape}, {k.shape}, {v.shape}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _DTYPES:
        raise ValueError(f"q, k, v must all be float32 or all bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, height, width, heads, head_dim = q.shape
    if (
        not isinstance(kernel_size, (int, np.integer))
        or kernel_size % 2 != 1
        or not 1 <= kernel_size <= min(height, width)
    ):
        raise ValueError(
            f"kernel_size must be an odd int in [1, min(H, W) = {min(height, width)}], got {kernel_size!r}"
        )
    scale = head_dim**-0.5 if scale is None else float(scale)
    call = _Call(
        height,
        width,
        int(kernel_size),
        head_dim,
        scale,
        tiling or default_tiling(height, width, q.dtype),
        bool(interpret),
    )
    flat = (batch, height * width, heads, head_dim)
    out = _attention(q.reshape(flat), k.reshape(flat), v.reshape(flat), call)
    return out.reshape(q.shape)
