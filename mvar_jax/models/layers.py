"""The layers every family's blocks are built from: AdaLN, attention with an optional KV cache, FFN.

A block's attention pattern over the pyramid is not decided here: the family's
``attend`` is handed to ``SelfAttention`` (``models.family.Family``), so one
attention layer serves VAR's block-causal, MVAR's Markov and M-VAR's within-scale
patterns alike.

Params are float32. With ``dtype='bfloat16'`` the matmuls run in bfloat16 while
the residual stream, LayerNorm, attention softmax and the logits stay float32.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvar_jax.models.config import InitScales, TransformerConfig
from mvar_jax.models.family import Attend
from mvar_jax.models.kv_compression import CompressedKV
from mvar_jax.models.normalize import l2_normalize

# The official per-head logit multiplier starts at 4 and is capped at 100.
INIT_SCALE_MUL = math.log(4.0)
MAX_SCALE_MUL = math.log(100.0)

# Initialisers (the official init_weights recipe, init_std = sqrt(1 / (3 C))).


def init_std(config: TransformerConfig) -> float:
    return (1.0 / (3 * config.embed_dim)) ** 0.5


def normal_init(std: float) -> nn.initializers.Initializer:
    """A plain normal: the official ``trunc_normal_(std=s)`` cuts at +-2 *absolute*,
    which at these small stds never triggers (Flax's truncated_normal would cut at
    +-2 std and narrow the spread by ~12%)."""
    return nn.initializers.normal(std)


def ada_lin_init(std: float, embed_dim: int, scales: InitScales) -> nn.initializers.Initializer:
    """Kernel ``(D, kC)``: the first 2C columns get the gate multiplier.

    They are VAR's two gates; of M-VAR's three (9C columns) the official init
    likewise scales only the first two, and the FFN's gate gets ``adaln``.
    """

    def init(key, shape, dtype=jnp.float32):
        column_gain = jnp.where(jnp.arange(shape[-1]) < 2 * embed_dim, scales.adaln_gamma, scales.adaln)
        return normal_init(std)(key, shape, dtype) * column_gain.astype(dtype)

    return init


def _ada_gss_init(scales: InitScales) -> nn.initializers.Initializer:
    """Shared-AdaLN offsets ``(6, C)``: unit normal / sqrt(C); rows 0-1 are the gates."""

    def init(key, shape, dtype=jnp.float32):
        row_gain = jnp.where(jnp.arange(shape[0]) < 2, scales.adaln_gamma, scales.adaln)[:, None]
        return jax.random.normal(key, shape, dtype) / shape[-1] ** 0.5 * row_gain.astype(dtype)

    return init


# Building blocks.


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine, in float32 with PyTorch's biased variance."""
    x = x.astype(jnp.float32)
    centred = x - x.mean(axis=-1, keepdims=True)
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(var + eps)


def modulate(x: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
    return x * (1 + scale) + shift


class SelfAttention(nn.Module):
    """QKV projection, (optionally L2-normalised) attention over the pyramid, output projection.

    ``attend`` is the family's pattern. With a ``cache`` (VAR's inference), this
    scale's keys and values are written at its offsets and the queries see the
    cache's prefix up to this scale; the updated cache is returned. A
    ``CompressedKV`` cache (``kv_compression``) keeps only a budget of the earlier
    scales' tokens, and attends over those and this scale.
    """

    config: TransformerConfig
    attend: Attend

    @nn.compact
    def __call__(
        self,
        x_BlC: jax.Array,
        *,
        first_scale: int,
        last_scale: int,
        cache: tuple[jax.Array, jax.Array] | CompressedKV | None = None,
    ):
        cfg = self.config
        B, l, C = x_BlC.shape
        dtype, std = cfg.compute_dtype, init_std(cfg)
        # Only q and v have learnt biases, as in the official model, whose k bias
        # is a fixed zero buffer (zero_k_bias) rather than a parameter.
        q_bias = self.param("q_bias", nn.initializers.zeros, (C,))
        v_bias = self.param("v_bias", nn.initializers.zeros, (C,))
        qkv = nn.Dense(3 * C, use_bias=False, dtype=dtype, kernel_init=normal_init(std), name="mat_qkv")(
            x_BlC
        )
        qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(dtype)
        qkv = qkv.reshape(B, l, 3, cfg.num_heads, cfg.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, l, heads, head_dim)

        if cfg.attn_l2_norm:
            # Cosine attention with a learnt per-head temperature (capped at 100).
            scale_mul = self.param("scale_mul", nn.initializers.constant(INIT_SCALE_MUL), (cfg.num_heads,))
            gain = jnp.exp(jnp.minimum(scale_mul, MAX_SCALE_MUL))[:, None]
            q = (l2_normalize(q) * gain).astype(dtype)
            k = l2_normalize(k).astype(dtype)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(cfg.head_dim)

        # The logits' factors, for calibrating a compressed cache (sampling.head_kinds); kept only
        # when the 'intermediates' collection is mutable.
        self.sow("intermediates", "scaled_q_k", (q * scale, k))
        if isinstance(cache, CompressedKV):
            if last_scale != first_scale + 1:
                raise ValueError(
                    f"a compressed KV cache runs one scale at a time, got [{first_scale}, {last_scale})"
                )
            out, cache = cache.attend(q, k, v, first_scale, scale)
        else:
            if cache is not None:
                begin, end = cfg.token_range(first_scale, last_scale)
                k_cache, v_cache = cache
                k_cache = k_cache.at[:, begin:end].set(k)
                v_cache = v_cache.at[:, begin:end].set(v)
                cache = (k_cache, v_cache)
                k, v = k_cache[:, :end], v_cache[:, :end]
            out = self.attend(q, k, v, cfg, first_scale, last_scale, scale)
        proj = nn.Dense(C, dtype=dtype, kernel_init=normal_init(std / math.sqrt(2 * cfg.depth)), name="proj")
        return proj(out.reshape(B, l, C)), cache


class FFN(nn.Module):
    """Two-layer MLP with tanh-approximated GELU."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BlC: jax.Array) -> jax.Array:
        cfg = self.config
        dtype, std = cfg.compute_dtype, init_std(cfg)
        h = nn.Dense(cfg.mlp_dim, dtype=dtype, kernel_init=normal_init(std), name="fc1")(x_BlC)
        h = nn.gelu(h, approximate=True)
        return nn.Dense(
            cfg.embed_dim, dtype=dtype, kernel_init=normal_init(std / math.sqrt(2 * cfg.depth)), name="fc2"
        )(h)


class AdaLNSelfAttn(nn.Module):
    """Pre-norm block whose LayerNorm scale/shift and residual gates come from the class.

    ``cond`` is the class embedding ``(B, D)``, or with ``shared_aln`` the
    shared projection ``(B, 6, C)`` to which this block adds its own offsets.
    """

    config: TransformerConfig
    attend: Attend
    drop_path_rate: float = 0.0
    init_scales: InitScales = InitScales()

    @nn.compact
    def __call__(
        self,
        x_BlC: jax.Array,
        cond: jax.Array,
        first_scale: int,
        last_scale: int,
        deterministic: bool = True,
        cache: tuple[jax.Array, jax.Array] | None = None,
    ):
        cfg = self.config
        C = cfg.embed_dim
        if cfg.shared_aln:
            gss_B6C = cond + self.param("ada_gss", _ada_gss_init(self.init_scales), (6, C))
        else:
            ada_lin = nn.Dense(
                6 * C,
                dtype=cfg.compute_dtype,
                kernel_init=ada_lin_init(init_std(cfg), C, self.init_scales),
                name="ada_lin",
            )
            gss_B6C = ada_lin(nn.silu(cond)).reshape(-1, 6, C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = jnp.split(gss_B6C, 6, axis=1)
        # Drop path: one keep/drop decision per sample, broadcast over (l, C).
        drop_path = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2))

        h, cache = SelfAttention(cfg, self.attend, name="attn")(
            modulate(layer_norm(x_BlC, cfg.norm_eps), scale1, shift1),
            first_scale=first_scale,
            last_scale=last_scale,
            cache=cache,
        )
        x_BlC = x_BlC + drop_path(h * gamma1, deterministic=deterministic)
        h = FFN(cfg, name="ffn")(modulate(layer_norm(x_BlC, cfg.norm_eps), scale2, shift2))
        x_BlC = x_BlC + drop_path(h * gamma2, deterministic=deterministic)
        return x_BlC, cache


class AdaLNBeforeHead(nn.Module):
    """Class-modulated LayerNorm in front of the classifier head (float32)."""

    config: TransformerConfig
    init_scales: InitScales = InitScales()

    @nn.compact
    def __call__(self, x_BlC: jax.Array, cond_BD: jax.Array) -> jax.Array:
        C = self.config.embed_dim
        ada_lin = nn.Dense(
            2 * C, kernel_init=normal_init(init_std(self.config) * self.init_scales.adaln), name="ada_lin"
        )
        scale, shift = jnp.split(ada_lin(nn.silu(cond_BD)).reshape(-1, 2, C), 2, axis=1)
        return modulate(layer_norm(x_BlC, self.config.norm_eps), scale, shift)
