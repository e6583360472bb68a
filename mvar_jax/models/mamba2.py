"""Mamba2 (the SSD layer of Dao & Gu, 2024) in Flax: a whole sequence at once, or one token.

Data path for ``u`` of shape ``(B, L, d_model)``::

    in_proj (no bias) -> [z, xBC, dt]
    xBC -> depthwise causal conv (with bias) -> SiLU -> [x, B, C]
    A = -exp(A_log) per head, dt = softplus(dt + dt_bias)
    y = SSD(x, dt, A, B, C) + D * x                   (per head)
    out = out_proj(RMSNorm(y * silu(z)) * weight)     (eps 1e-5, one group)

with one B and C shared by all heads (``ngroups = 1``). The state-space recurrence
per head, for a state ``h`` of shape ``(headdim, d_state)``::

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,        y_t = h_t C_t

``ssd_scan`` evaluates it in chunks (matmuls inside a chunk, the recurrence only
across chunk boundaries); ``Mamba2.step`` runs it one token at a time. Both start
from and return a ``MambaState``, so a sequence may be processed in pieces: the
result does not depend on where it is cut, nor on the chunk size. The conv, the
scan and the norm run in float32 whatever the matmul dtype.

Shape letters (Mamba2's): ``B`` batch, ``L`` tokens, ``H`` heads, ``P`` headdim, ``N``
d_state, ``c`` chunks, ``Q`` tokens per chunk, ``K`` conv taps kept (d_conv - 1), ``C``
conv channels, ``E`` d_inner, ``D`` d_model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class MambaState(NamedTuple):
    """What a Mamba2 layer carries from one token to the next (float32)."""

    conv_BKC: jax.Array  # (B, d_conv - 1, conv_dim): the latest conv inputs [x, B, C]
    ssm_BHPN: jax.Array  # (B, nheads, headdim, d_state)


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """Sizes of a Mamba2 layer. The defaults are M-VAR's (official MVAR blocks:
    ``Mamba2(d_model, d_state=64, d_conv=4, expand=2)``, mamba_ssm's headdim 64,
    ngroups 1 and chunk 256); ``chunk_size`` changes the cost, never the result."""

    d_model: int
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    chunk_size: int = 256

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Mamba2Config: {field.name} must be a positive int, got {value!r}")
        if self.d_conv < 2:
            raise ValueError(f"Mamba2Config: d_conv must be >= 2, got {self.d_conv}")
        if self.d_inner % self.headdim:
            raise ValueError(
                f"Mamba2Config: d_inner {self.d_inner} (expand {self.expand} x "
                f"d_model {self.d_model}) is not a multiple of headdim "
                f"{self.headdim}"
            )

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        """Channels of the conv: x, B and C."""
        return self.d_inner + 2 * self.d_state

    def zero_state(self, batch_size: int) -> MambaState:
        """The state before the first token."""
        return MambaState(
            jnp.zeros((batch_size, self.d_conv - 1, self.conv_dim), jnp.float32),
            jnp.zeros((batch_size, self.nheads, self.headdim, self.d_state), jnp.float32),
        )


# ----------------------------------------------------------------------------
# The chunked scan (pure jnp).


def _decay_within_chunk(a_BcHQ: jax.Array) -> jax.Array:
    """``(..., Q, Q)``: ``exp(a[s+1] + ... + a[l])`` at ``[l, s]`` for ``l >= s``, else 0.

    Summed term by term rather than as a difference of prefix sums, which would
    cancel catastrophically once the prefix sums grow large.
    """
    Q = a_BcHQ.shape[-1]
    after_s = np.tril(np.ones((Q, Q), bool), -1)  # [k, s]: k > s
    sums = jnp.cumsum(jnp.where(after_s, a_BcHQ[..., :, None], 0.0), axis=-2)
    return jnp.exp(sums) * np.tril(np.ones((Q, Q), np.float32))


def ssd_scan(
    x_BLHP: jax.Array,
    dt_BLH: jax.Array,
    A_H: jax.Array,
    B_BLN: jax.Array,
    C_BLN: jax.Array,
    state_BHPN: jax.Array,
    *,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """The SSD recurrence over a whole sequence, from ``state_BHPN``; float32.

    Args:
      x_BLHP: inputs per head; dt_BLH: step sizes (after softplus); A_H: negative
        decay rates; B_BLN, C_BLN: input and output projections shared by the heads.
      state_BHPN: the state before the first token.
      chunk_size: tokens per chunk (at most L): O(L * chunk) work inside chunks,
        a ``lax.scan`` over ``ceil(L / chunk)`` chunk boundaries.

    Returns:
      ``y_BLHP`` (without the D skip) and the state after the last token.
    """
    Bsz, L, H, P = x_BLHP.shape
    Q = min(chunk_size, L)
    c = -(-L // Q)
    # A zero tail: dt = 0 there, so the padding neither decays nor feeds the state.
    pad = c * Q - L

    def chunked(t):
        t = jnp.pad(t.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        return t.reshape(Bsz, c, Q, *t.shape[2:])

    x, dt, B, C = chunked(x_BLHP), chunked(dt_BLH), chunked(B_BLN), chunked(C_BLN)
    xdt_BcQHP = x * dt[..., None]
    a_BcHQ = jnp.moveaxis(dt * A_H.astype(jnp.float32), -1, 2)  # log-decay of each token

    # Within each chunk, from tokens s <= l: y_l = sum_s (C_l . B_s) decay(l, s) dt_s x_s.
    decay_BcHQQ = _decay_within_chunk(a_BcHQ)
    CB_BcQQ = jnp.einsum("bcln,bcsn->bcls", C, B)
    y = jnp.einsum("bcls,bchls,bcshp->bclhp", CB_BcQQ, decay_BcHQQ, xdt_BcQHP)

    # What each chunk adds to the state by its end, and how much it decays the state.
    chunk_input_BcHPN = jnp.einsum("bcsn,bchs,bcshp->bchpn", B, decay_BcHQQ[..., -1, :], xdt_BcQHP)
    log_decay_to_l_BcHQ = jnp.cumsum(a_BcHQ, axis=-1)
    chunk_decay_BcH = jnp.exp(log_decay_to_l_BcHQ[..., -1])

    def across(h_BHPN, chunk):
        decay_BH, input_BHPN = chunk
        return h_BHPN * decay_BH[..., None, None] + input_BHPN, h_BHPN

    # Rolled: unrolled, XLA computes each step twice (once for the carry, once for the
    # output). Its cost analysis counts the rolled body once whatever the trip count;
    # bench/bench_m_var_cost.py adds the other chunks' share.
    final_BHPN, entering_cBHPN = jax.lax.scan(
        across,
        state_BHPN.astype(jnp.float32),
        (jnp.moveaxis(chunk_decay_BcH, 1, 0), jnp.moveaxis(chunk_input_BcHPN, 1, 0)),
    )

    # The state entering each chunk, decayed to token l, read out by C_l.
    y = y + jnp.einsum("bcln,bchl,cbhpn->bclhp", C, jnp.exp(log_decay_to_l_BcHQ), entering_cBHPN)
    return y.reshape(Bsz, c * Q, H, P)[:, :L], final_BHPN


# ----------------------------------------------------------------------------
# The layer.


def _dt_bias_init(key, shape, dtype=jnp.float32):
    """mamba_ssm's: softplus^-1 of dt log-uniform in [1e-3, 0.1], floored at 1e-4."""
    log_dt = jax.random.uniform(key, shape, dtype, math.log(1e-3), math.log(0.1))
    dt = jnp.maximum(jnp.exp(log_dt), 1e-4)
    return dt + jnp.log(-jnp.expm1(-dt))


def _a_log_init(key, shape, dtype=jnp.float32):
    """mamba_ssm's: A uniform in [1, 16]."""
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time with bias; the history holds the previous inputs."""

    channels: int
    width: int
    kernel_std: float = 0.02

    @nn.compact
    def __call__(self, x_BLC: jax.Array, history_BKC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(y_BLC, new history)``; the history is the last ``width - 1`` inputs."""
        # (width, 1, channels): the layout of a depthwise nn.Conv kernel.
        kernel = self.param("kernel", nn.initializers.normal(self.kernel_std), (self.width, 1, self.channels))
        bias = self.param("bias", nn.initializers.zeros, (self.channels,))
        L = x_BLC.shape[1]
        full = jnp.concatenate([history_BKC, x_BLC.astype(jnp.float32)], axis=1)
        y = sum(kernel[k, 0] * full[:, k : k + L] for k in range(self.width))
        return y + bias, full[:, L:]


class GatedRMSNorm(nn.Module):
    """``RMSNorm(y * silu(z)) * scale`` over the last axis (one group), float32."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (y.shape[-1],))
        g = y * nn.silu(z.astype(jnp.float32))
        return g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + self.eps) * scale


class Mamba2(nn.Module):
    """A Mamba2 layer: ``__call__`` for a sequence (chunked scan), ``step`` for one token.

    ``dtype`` is the projections' matmul dtype; ``proj_std`` the normal init of
    in_proj and out_proj (the official M-VAR init overwrites mamba_ssm's).
    """

    config: Mamba2Config
    dtype: Any = jnp.float32
    proj_std: float = 0.02

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(self.proj_std)
        self.in_proj = nn.Dense(
            2 * cfg.d_inner + 2 * cfg.d_state + cfg.nheads, use_bias=False, dtype=self.dtype, kernel_init=init
        )
        self.conv1d = CausalConv1d(cfg.conv_dim, cfg.d_conv)
        self.dt_bias = self.param("dt_bias", _dt_bias_init, (cfg.nheads,))
        self.A_log = self.param("A_log", _a_log_init, (cfg.nheads,))
        self.D = self.param("D", nn.initializers.ones, (cfg.nheads,))
        self.norm = GatedRMSNorm()
        self.out_proj = nn.Dense(cfg.d_model, use_bias=False, dtype=self.dtype, kernel_init=init)

    def __call__(self, u_BLD: jax.Array, state: MambaState | None = None) -> tuple[jax.Array, MambaState]:
        """``(out_BLD, state after the last token)``; ``state`` None starts from zeros."""
        cfg = self.config
        Bsz, L, _ = u_BLD.shape
        if state is None:
            state = cfg.zero_state(Bsz)
        z, xBC, dt = self._project(u_BLD)
        xBC, conv_state = self.conv1d(xBC, state.conv_BKC)
        x, B, C = self._split_conv_output(nn.silu(xBC))
        x_BLHP = x.reshape(Bsz, L, cfg.nheads, cfg.headdim)
        y, ssm_state = ssd_scan(
            x_BLHP, self._dt(dt), self._A(), B, C, state.ssm_BHPN, chunk_size=cfg.chunk_size
        )
        y = y + self.D[:, None] * x_BLHP
        return self._output(y.reshape(Bsz, L, cfg.d_inner), z), MambaState(conv_state, ssm_state)

    def step(self, u_BD: jax.Array, state: MambaState) -> tuple[jax.Array, MambaState]:
        """One token ``(B, d_model)``: the recurrence written out, no chunks."""
        cfg = self.config
        Bsz = u_BD.shape[0]
        z, xBC, dt = self._project(u_BD[:, None])
        xBC, conv_state = self.conv1d(xBC, state.conv_BKC)
        x, B, C = (t[:, 0] for t in self._split_conv_output(nn.silu(xBC)))
        x_BHP = x.reshape(Bsz, cfg.nheads, cfg.headdim)
        dt_BH = self._dt(dt)[:, 0]
        h = (
            state.ssm_BHPN * jnp.exp(dt_BH * self._A())[..., None, None]
            + dt_BH[..., None, None] * x_BHP[..., None] * B[:, None, None, :]
        )
        y = jnp.einsum("bhpn,bn->bhp", h, C) + self.D[:, None] * x_BHP
        out = self._output(y.reshape(Bsz, 1, cfg.d_inner), z)[:, 0]
        return out, MambaState(conv_state, h)

    def _project(self, u_BLD):
        """in_proj split into z, xBC (float32) and dt."""
        cfg = self.config
        zxbcdt = self.in_proj(u_BLD).astype(jnp.float32)
        return jnp.split(zxbcdt, [cfg.d_inner, cfg.d_inner + cfg.conv_dim], axis=-1)

    def _split_conv_output(self, xBC):
        cfg = self.config
        return jnp.split(xBC, [cfg.d_inner, cfg.d_inner + cfg.d_state], axis=-1)

    def _dt(self, dt):
        return jax.nn.softplus(dt + self.dt_bias)

    def _A(self):
        return -jnp.exp(self.A_log)

    def _output(self, y_BLE, z_BLE):
        return self.out_proj(self.norm(y_BLE, z_BLE).astype(self.dtype))
