"""The VAR / MVAR / M-VAR class-conditional transformer over a token pyramid.

One model serves the three papers; they differ in how the scales meet
(``TransformerConfig.attention``):

* ``'var'``: block-causal over all scales, so inference keeps a KV cache;
* ``'mvar'``: scale-Markov (each scale attends only to itself; its input
  already carries the previous scale) and, from ``refine_step`` on,
  spatial-Markov (a ``kernel_size``-square neighbourhood). No cache is needed;
* ``'mamba'``: M-VAR (arXiv 2411.10433; blocks in ``m_var.py``): attention
  within each scale plus a Mamba2 layer over the whole pyramid, so inference
  carries each block's Mamba state from scale to scale.

Teacher forcing (training, parity tests)::

    logits = model.apply(params, label_B, x_BlCv, first_scale=0, last_scale=8)

Inference, one scale at a time (the sampler owns the loop, CFG and the VQVAE)::

    x, cond = model.apply(params, label_B, method=Transformer.start_input)
    cache = init_kv_cache(config, batch)    # None for MVAR, Mamba states for M-VAR
    for si in range(config.num_scales):
      if si: x = model.apply(params, h_BlCv, si, method=Transformer.scale_input)
      logits, cache = model.apply(params, x, cond, si, cache,
                                  method=Transformer.scale_logits)

Scale indices (``first_scale``, ``last_scale``, ``si``) are static Python ints:
jit with ``static_argnames`` and each scale compiles once.

Params keep one subtree per block (``blocks_0`` ... ``blocks_{depth-1}``), the
layout of checkpoints and converters. ``stack_blocks`` turns them into one
``blocks`` subtree with a leading depth axis, which ``Transformer(config,
scan_blocks=True)`` runs with ``jax.lax.scan``: one compiled block per scale
instead of ``depth`` (the sampler's compile time), and the per-block weight
casts stay inside the loop.

Params are float32. With ``dtype='bfloat16'`` the matmuls run in bfloat16 while
the residual stream, LayerNorm, attention softmax and the logits stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax.models import attention, mamba2
from mvar_jax.models.normalize import l2_normalize

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The official per-head logit multiplier starts at 4 and is capped at 100.
INIT_SCALE_MUL = math.log(4.0)
MAX_SCALE_MUL = math.log(100.0)

# Per block, one (k, v) pair of shape (B, L, heads, head_dim) holding every token
# generated so far (VAR only); with scanned blocks one (k, v) pair of shape
# (depth, B, L, heads, head_dim).
KVCache = tuple[tuple[jax.Array, jax.Array], ...] | tuple[jax.Array, jax.Array]

# The attention argument: VAR's and MVAR's patterns, and M-VAR ('mamba').
ATTENTIONS = (*attention.PATTERNS, "mamba")
# How each family is named for people.
MODEL_NAMES = {"mvar": "MVAR", "var": "VAR", "mamba": "M-VAR"}


def check_refine_step(refine_step: int, num_scales: int, *, training: bool = False) -> None:
    """The one rule for ``refine_step``, the first scale with spatial-Markov attention.

    Scales ``[0, refine_step)`` attend within themselves, so the model accepts
    ``[1, num_scales]``. Training MVAR teaches those scales in one segment, which must
    reach beyond the start token's 1x1 scale (the official trainer asserts
    ``prog_ed > 0``), hence ``[2, num_scales]`` with ``training=True``.
    """
    low = 2 if training else 1
    if not low <= refine_step <= num_scales:
        raise ValueError(
            f"refine_step must be in [{low}, {num_scales}] for {num_scales} scales, got {refine_step}"
        )


def official_drop_path_rate(depth: int) -> float:
    """Stochastic depth of the official runs (models/__init__.py: ``dpr = 0.1 * depth / 24``)."""
    return 0.1 * depth / 24


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of a VAR / MVAR transformer.

    ``embed_dim`` and ``num_heads`` default to the official convention
    ``64 * depth`` and ``depth``. ``drop_path_rate`` only acts in training, where
    the official runs use ``official_drop_path_rate(depth)``.

    ``mamba_inference_chunk_size`` (M-VAR only) is the Mamba2 scan's chunk when
    inference advances each block's carried state by one scale
    (``mamba_inference``); training, teacher forcing and the official re-run keep
    mamba_ssm's 256 (``mamba``). The result does not depend on the chunk, the
    cost does: the within-chunk work per token grows with the chunk, so one
    256-token chunk per scale costs more than chunks of 16 (measured per scale
    with bench/bench_m_var_cost.py's ``flops``, docs/benchmarks.md, issue 15).
    """

    vocab_size: int = 4096
    cvae: int = 32
    num_classes: int = 1000
    depth: int = 16
    embed_dim: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    attention: str = "mvar"
    kernel_size: int = 7
    refine_step: int = 8
    drop_path_rate: float = 0.0
    cond_drop_rate: float = 0.1
    dtype: str = "float32"
    neighborhood_impl: str = "auto"
    mamba_inference_chunk_size: int = 16

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if self.embed_dim is None:
            object.__setattr__(self, "embed_dim", 64 * self.depth)
        if self.num_heads is None:
            object.__setattr__(self, "num_heads", self.depth)
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str):
            raise ValueError(f"TransformerConfig: {msg}")

        sizes = ("vocab_size", "cvae", "num_classes", "depth", "embed_dim", "num_heads")
        for name in (*sizes, "mamba_inference_chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.embed_dim % self.num_heads:
            fail(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.mlp_ratio <= 0 or self.norm_eps <= 0:
            fail(f"mlp_ratio and norm_eps must be > 0, got {self.mlp_ratio}, {self.norm_eps}")
        if len(self.patch_nums) < 2 or min(self.patch_nums) < 1:
            # Guidance and sampling schedules interpolate over num_scales - 1 steps.
            fail(f"patch_nums must hold >= 2 positive scales, got {self.patch_nums}")
        if self.attention not in ATTENTIONS:
            fail(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            fail(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if self.attention != "mamba":  # M-VAR attends within whole scales: no refine_step.
            try:
                check_refine_step(self.refine_step, self.num_scales)
            except ValueError as e:
                fail(str(e))
        if self.attention == "mamba":
            if self.shared_aln:  # The official block offsets 6 modulations, it needs 9.
                fail("M-VAR (attention='mamba') has no shared AdaLN")
            try:
                _ = self.mamba  # its checks
            except ValueError as e:
                fail(f"M-VAR's Mamba2 layer: {e}")
        spatial = self.patch_nums[self.refine_step :]
        if self.attention == "mvar" and spatial and self.kernel_size > min(spatial):
            fail(
                f"kernel_size {self.kernel_size} exceeds the smallest spatial-Markov "
                f"scale ({min(spatial)}) at refine_step {self.refine_step}"
            )
        for name in ("drop_path_rate", "cond_drop_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            fail(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.neighborhood_impl not in attention.NEIGHBORHOOD_IMPLS:
            fail(
                f"neighborhood_impl must be one of {attention.NEIGHBORHOOD_IMPLS}, "
                f"got {self.neighborhood_impl!r}"
            )

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        """L: tokens over all scales (680 at 256 px)."""
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def first_l(self) -> int:
        """Tokens of scale 0, all of them start (class) tokens."""
        return self.patch_nums[0] ** 2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def mamba(self) -> mamba2.Mamba2Config:
        """M-VAR's Mamba2 layer: the official settings at this width."""
        return mamba2.Mamba2Config(d_model=self.embed_dim)

    @property
    def mamba_inference(self) -> mamba2.Mamba2Config:
        """The same layer as inference runs it on a carried state: its own chunk size."""
        return dataclasses.replace(self.mamba, chunk_size=self.mamba_inference_chunk_size)

    def token_range(self, first_scale: int, last_scale: int) -> tuple[int, int]:
        """``[begin, end)`` token offsets of scales ``[first_scale, last_scale)``."""
        if not 0 <= first_scale < last_scale <= self.num_scales:
            raise ValueError(
                f"need 0 <= first_scale < last_scale <= {self.num_scales}, got [{first_scale}, {last_scale})"
            )
        sizes = [pn * pn for pn in self.patch_nums]
        return sum(sizes[:first_scale]), sum(sizes[:last_scale])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_nums"] = list(self.patch_nums)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransformerConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"TransformerConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class InitScales:
    """Multipliers of the official initialisation (train.py's ``aln``, ``alng``, ``hd``).

    They shape fresh params only: ``apply`` never reads them, so a model restored
    from a checkpoint needs none.
    """

    adaln: float = 0.5  # AdaLN projections: the blocks' scale/shift columns, head_nm
    adaln_gamma: float = 1e-5  # the blocks' residual gates: each block starts near identity
    head: float = 0.02  # the classifier head

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"InitScales: {field.name} must be a finite number >= 0, got {value!r}")


# ----------------------------------------------------------------------------
# Initialisers (the official init_weights recipe, init_std = sqrt(1 / (3 C))).


def init_std(config: TransformerConfig) -> float:
    return (1.0 / (3 * config.embed_dim)) ** 0.5


def _normal(std: float) -> nn.initializers.Initializer:
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
        return _normal(std)(key, shape, dtype) * column_gain.astype(dtype)

    return init


def _ada_gss_init(scales: InitScales) -> nn.initializers.Initializer:
    """Shared-AdaLN offsets ``(6, C)``: unit normal / sqrt(C); rows 0-1 are the gates."""

    def init(key, shape, dtype=jnp.float32):
        row_gain = jnp.where(jnp.arange(shape[0]) < 2, scales.adaln_gamma, scales.adaln)[:, None]
        return jax.random.normal(key, shape, dtype) / shape[-1] ** 0.5 * row_gain.astype(dtype)

    return init


# ----------------------------------------------------------------------------
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
    """QKV projection, (optionally L2-normalised) pyramid attention, output projection."""

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        x_BlC: jax.Array,
        *,
        first_scale: int,
        last_scale: int,
        cache: tuple[jax.Array, jax.Array] | None = None,
    ):
        cfg = self.config
        B, l, C = x_BlC.shape
        dtype, std = cfg.compute_dtype, init_std(cfg)
        # Only q and v have learnt biases, as in the official model, whose k bias
        # is a fixed zero buffer (zero_k_bias) rather than a parameter.
        q_bias = self.param("q_bias", nn.initializers.zeros, (C,))
        v_bias = self.param("v_bias", nn.initializers.zeros, (C,))
        qkv = nn.Dense(3 * C, use_bias=False, dtype=dtype, kernel_init=_normal(std), name="mat_qkv")(x_BlC)
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

        if cache is not None:
            begin, end = cfg.token_range(first_scale, last_scale)
            k_cache, v_cache = cache
            k_cache = k_cache.at[:, begin:end].set(k)
            v_cache = v_cache.at[:, begin:end].set(v)
            cache = (k_cache, v_cache)
            k, v = k_cache[:, :end], v_cache[:, :end]

        # M-VAR attends within each scale at every scale: MVAR's scale-Markov pattern
        # with no spatial-Markov scales.
        pattern, refine_step = (
            ("mvar", cfg.num_scales) if cfg.attention == "mamba" else (cfg.attention, cfg.refine_step)
        )
        out = attention.pyramid_attention(
            q,
            k,
            v,
            pattern=pattern,
            patch_nums=cfg.patch_nums,
            first_scale=first_scale,
            last_scale=last_scale,
            scale=scale,
            refine_step=refine_step,
            kernel_size=cfg.kernel_size,
            impl=cfg.neighborhood_impl,
        )
        proj = nn.Dense(C, dtype=dtype, kernel_init=_normal(std / math.sqrt(2 * cfg.depth)), name="proj")
        return proj(out.reshape(B, l, C)), cache


class FFN(nn.Module):
    """Two-layer MLP with tanh-approximated GELU."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BlC: jax.Array) -> jax.Array:
        cfg = self.config
        dtype, std = cfg.compute_dtype, init_std(cfg)
        h = nn.Dense(cfg.mlp_dim, dtype=dtype, kernel_init=_normal(std), name="fc1")(x_BlC)
        h = nn.gelu(h, approximate=True)
        return nn.Dense(
            cfg.embed_dim, dtype=dtype, kernel_init=_normal(std / math.sqrt(2 * cfg.depth)), name="fc2"
        )(h)


class AdaLNSelfAttn(nn.Module):
    """Pre-norm block whose LayerNorm scale/shift and residual gates come from the class.

    ``cond`` is the class embedding ``(B, D)``, or with ``shared_aln`` the
    shared projection ``(B, 6, C)`` to which this block adds its own offsets.
    """

    config: TransformerConfig
    drop_path_rate: float = 0.0
    init_scales: InitScales = InitScales()

    @nn.compact
    def __call__(
        self,
        x_BlC: jax.Array,
        cond: jax.Array,
        *,
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

        h, cache = SelfAttention(cfg, name="attn")(
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
            2 * C, kernel_init=_normal(init_std(self.config) * self.init_scales.adaln), name="ada_lin"
        )
        scale, shift = jnp.split(ada_lin(nn.silu(cond_BD)).reshape(-1, 2, C), 2, axis=1)
        return modulate(layer_norm(x_BlC, self.config.norm_eps), scale, shift)


# ----------------------------------------------------------------------------
# The model.


class Transformer(nn.Module):
    """VAR / MVAR: class start token, AdaLN blocks, logits over the VQ vocabulary.

    ``init_scales`` matters to ``init`` alone; ``Transformer(config)`` applies any params.
    """

    config: TransformerConfig
    init_scales: InitScales = InitScales()
    scan_blocks: bool = False  # params from stack_blocks, blocks run by lax.scan (inference)

    def setup(self):
        cfg = self.config
        C, std = cfg.embed_dim, init_std(cfg)
        # Embeddings and head stay float32 (the official code runs them outside autocast).
        self.word_embed = nn.Dense(C, kernel_init=_normal(std))
        self.class_emb = nn.Embed(cfg.num_classes + 1, C, embedding_init=_normal(std))
        self.lvl_embed = nn.Embed(cfg.num_scales, C, embedding_init=_normal(std))
        self.pos_start = self.param("pos_start", _normal(std), (cfg.first_l, C))
        self.pos_embed = self.param("pos_embed", _normal(std), (cfg.seq_len, C))
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Dense(6 * C, dtype=cfg.compute_dtype, kernel_init=_normal(std))
        if self.scan_blocks:
            self.stacked_blocks = self.param("blocks", stacked_blocks_init(cfg, self.init_scales))
        else:
            self.blocks = [
                block_class(cfg)(cfg, float(rate), init_scales=self.init_scales)
                for rate in np.linspace(0.0, cfg.drop_path_rate, cfg.depth)
            ]
        self.head_nm = AdaLNBeforeHead(cfg, init_scales=self.init_scales)
        self.head = nn.Dense(cfg.vocab_size, kernel_init=_normal(std * self.init_scales.head))

    def __call__(
        self,
        label_B: jax.Array,
        x_BlCv: jax.Array | None,
        *,
        first_scale: int,
        last_scale: int,
        train: bool = False,
    ) -> jax.Array:
        """Teacher-forcing logits ``(B, l, V)`` (float32) for scales ``[first_scale, last_scale)``.

        Args:
          label_B: int class labels; ``num_classes`` is the null (unconditional) class.
          x_BlCv: the VQVAE's teacher-forcing input. With ``first_scale == 0`` it
            excludes the ``first_l`` start tokens (the official
            ``x_BLCv_wo_first_l[:, :l - first_l]``; may be None when l == first_l),
            otherwise it is the input of exactly these scales.
          first_scale, last_scale: static ints. VAR and M-VAR need ``first_scale == 0``.
            MVAR accepts any range, each scale attending as it does at inference
            (within itself below refine_step, its neighbourhood from there on);
            the official schedule uses ``[0, refine_step)``, then one scale at a time.
          train: enables class dropout and drop path (rng stream 'dropout').
        """
        cfg = self.config
        if cfg.attention != "mvar" and first_scale != 0:
            raise ValueError(
                f"{cfg.attention!r} teacher forcing reads every earlier scale, so it must "
                f"start at scale 0; got first_scale={first_scale} (use scale_logits with "
                f"a cache)"
            )
        begin, end = cfg.token_range(first_scale, last_scale)
        B = label_B.shape[0]
        n_start = cfg.first_l if first_scale == 0 else 0
        n_in = end - begin - n_start
        if x_BlCv is None and n_in == 0:
            x_BlCv = jnp.zeros((B, 0, cfg.cvae), jnp.float32)
        if x_BlCv is None or x_BlCv.shape != (B, n_in, cfg.cvae):
            raise ValueError(
                f"x_BlCv for scales [{first_scale}, {last_scale}) must have shape "
                f"{(B, n_in, cfg.cvae)}, got {None if x_BlCv is None else x_BlCv.shape}"
            )

        if train and cfg.cond_drop_rate > 0:
            dropped = jax.random.uniform(self.make_rng("dropout"), (B,)) < cfg.cond_drop_rate
            label_B = jnp.where(dropped, cfg.num_classes, label_B)
        cond_BD = self.class_emb(label_B)
        x_BlC = self.word_embed(x_BlCv.astype(jnp.float32))
        if first_scale == 0:
            x_BlC = jnp.concatenate([self._start_tokens(cond_BD), x_BlC], axis=1)
        x_BlC = x_BlC + self._level_and_position(first_scale, last_scale)
        h_BlC, _ = self._blocks(x_BlC, cond_BD, first_scale, last_scale, deterministic=not train, cache=None)
        return self._logits(h_BlC, cond_BD)

    def start_input(self, label_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Scale-0 input ``(B, first_l, C)`` and the condition ``cond_BD`` for ``label_B``.

        For classifier-free guidance, call it on the labels concatenated with
        ``num_classes`` (the null class) and keep the doubled batch throughout.
        """
        cond_BD = self.class_emb(label_B)
        return self._start_tokens(cond_BD) + self._level_and_position(0, 1), cond_BD

    def scale_input(self, h_BlCv: jax.Array, si: int) -> jax.Array:
        """Input tokens ``(B, pn*pn, C)`` of scale ``si`` >= 1.

        ``h_BlCv``: ``(B, pn*pn, Cvae)``, the VQVAE's next autoregressive input
        (f_hat so far, resized to scale si), row-major over (h, w).
        """
        if not 1 <= si < self.config.num_scales:
            raise ValueError(
                f"scale_input is for scales 1..{self.config.num_scales - 1}, "
                f"got si={si} (scale 0 comes from start_input)"
            )
        n = self.config.patch_nums[si] ** 2
        if h_BlCv.ndim != 3 or h_BlCv.shape[1:] != (n, self.config.cvae):
            raise ValueError(
                f"h_BlCv for scale {si} must be (B, {n}, {self.config.cvae}), got {h_BlCv.shape}"
            )
        return self.word_embed(h_BlCv.astype(jnp.float32)) + self._level_and_position(si, si + 1)

    def scale_logits(
        self, x_BlC: jax.Array, cond_BD: jax.Array, si: int, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits ``(B, pn*pn, V)`` of scale ``si`` from its input tokens.

        MVAR: each scale is self-contained, pass ``cache=None`` (returned as None).
        VAR: pass the cache from ``init_kv_cache`` (then from the previous scale);
        this scale's keys and values are written at its offsets and the updated
        cache is returned. The cache has a fixed size, so each ``si`` compiles once.
        M-VAR: the same with each block's Mamba state, which this scale's tokens
        advance (``m_var.py``).
        """
        cfg = self.config
        if not 0 <= si < cfg.num_scales:
            raise ValueError(f"si must be in [0, {cfg.num_scales}), got {si}")
        if (cache is None) != (cfg.attention == "mvar"):
            raise ValueError(
                "VAR inference needs a KV cache and M-VAR its Mamba states (both "
                "from init_kv_cache), MVAR takes none; attention="
                f"{cfg.attention!r}, cache given: {cache is not None}"
            )
        n = cfg.patch_nums[si] ** 2
        if x_BlC.ndim != 3 or x_BlC.shape[1:] != (n, cfg.embed_dim):
            raise ValueError(f"x_BlC for scale {si} must be (B, {n}, {cfg.embed_dim}), got {x_BlC.shape}")
        if cache is not None and not self.scan_blocks and len(cache) != cfg.depth:
            raise ValueError(f"cache has {len(cache)} blocks, the model {cfg.depth}")
        h_BlC, cache = self._blocks(x_BlC, cond_BD, si, si + 1, deterministic=True, cache=cache)
        return self._logits(h_BlC, cond_BD), cache

    def _start_tokens(self, cond_BD: jax.Array) -> jax.Array:
        return cond_BD[:, None, :] + self.pos_start[None]

    def _level_and_position(self, first_scale: int, last_scale: int) -> jax.Array:
        """``(1, l, C)`` level embedding plus absolute position of the scales' tokens."""
        begin, end = self.config.token_range(first_scale, last_scale)
        levels = attention.scale_ids(self.config.patch_nums, first_scale, last_scale)
        return (self.lvl_embed(jnp.asarray(levels)) + self.pos_embed[begin:end])[None]

    def _blocks(self, x_BlC, cond_BD, first_scale, last_scale, *, deterministic, cache):
        cfg = self.config
        if cfg.shared_aln:
            cond = self.shared_ada_lin(nn.silu(cond_BD)).reshape(-1, 6, cfg.embed_dim)
        else:
            cond = cond_BD
        if self.scan_blocks:
            if not deterministic:
                raise ValueError(
                    "scanned blocks are for inference: train with the per-block params (scan_blocks=False)"
                )
            return self._scanned_blocks(x_BlC, cond, first_scale, last_scale, cache)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x_BlC, block_cache = block(
                x_BlC,
                cond,
                first_scale=first_scale,
                last_scale=last_scale,
                deterministic=deterministic,
                cache=None if cache is None else cache[i],
            )
            new_cache.append(block_cache)
        return x_BlC, None if cache is None else tuple(new_cache)

    def _scanned_blocks(self, x_BlC, cond, first_scale, last_scale, cache):
        """The blocks as one ``lax.scan`` over the stacked params and cache (``stack_cache``).

        VAR's cache is carried whole and this scale's keys and values written
        into it in place; M-VAR's per-block state goes in and comes out as the
        scan's inputs and outputs.
        """
        cfg = self.config
        block = block_class(cfg)(cfg, parent=None)  # Applied to each layer's params in turn.
        begin, end = cfg.token_range(first_scale, last_scale)
        carried, scanned = (cache, None) if cfg.attention == "var" else (None, cache)

        def step(carry, layer):
            x_BlC, kv = carry
            params, i, block_cache = layer
            if kv is not None:
                block_cache = tuple(full[i] for full in kv)
            x_BlC, block_cache = block.apply(
                {"params": params},
                x_BlC,
                cond,
                first_scale=first_scale,
                last_scale=last_scale,
                cache=block_cache,
            )
            if kv is not None:  # Only this scale's keys and values are new.
                kv = tuple(
                    jax.lax.dynamic_update_slice(full, new[None, :, begin:end], (i, 0, begin, 0, 0))
                    for full, new in zip(kv, block_cache)
                )
                block_cache = None
            return (x_BlC, kv), block_cache

        (x_BlC, carried), scanned = jax.lax.scan(
            step, (x_BlC, carried), (self.stacked_blocks, jnp.arange(cfg.depth), scanned)
        )
        return x_BlC, carried if cfg.attention == "var" else scanned

    def _logits(self, h_BlC: jax.Array, cond_BD: jax.Array) -> jax.Array:
        return self.head(self.head_nm(h_BlC.astype(jnp.float32), cond_BD)).astype(jnp.float32)


def init_kv_cache(
    config: TransformerConfig, batch_size: int
) -> KVCache | tuple[mamba2.MambaState, ...] | None:
    """Zeroed VAR KV cache (one (k, v) pair of ``(B, L, heads, head_dim)`` per block,
    in the compute dtype as the official cache).

    Returns None for MVAR, which needs no cache, so a sampler can treat all alike,
    and M-VAR's zero Mamba state per block (what scale 0 starts from).
    ``stack_cache`` turns a per-block cache into the form of scanned blocks.
    """
    if config.attention == "mvar":
        return None
    if config.attention == "mamba":
        return tuple(config.mamba.zero_state(batch_size) for _ in range(config.depth))
    shape = (batch_size, config.seq_len, config.num_heads, config.head_dim)
    # Distinct buffers, so that a jitted step may donate the whole cache.
    return tuple(
        (jnp.zeros(shape, config.compute_dtype), jnp.zeros(shape, config.compute_dtype))
        for _ in range(config.depth)
    )


def stack_cache(cache: tuple[Any, ...] | None) -> Any:
    """A per-block cache (``init_kv_cache``, ``m_var.init_rerun_cache``) with its blocks'
    leaves stacked on a leading depth axis, the form ``scan_blocks`` carries."""
    return None if cache is None else jax.tree.map(lambda *leaves: jnp.stack(leaves), *cache)


def block_class(config: TransformerConfig) -> type[AdaLNSelfAttn]:
    """The block of the config's family (M-VAR's lives in ``m_var``)."""
    if config.attention == "mamba":
        from mvar_jax.models.m_var import AdaLNAttnMamba  # m_var builds on this module.

        return AdaLNAttnMamba
    return AdaLNSelfAttn


@functools.cache
def stacked_blocks_init(config: TransformerConfig, scales: InitScales) -> Any:
    """``rng -> params`` of every block, stacked on a leading depth axis.

    Jitted and cached per config: Flax checks a param's shape by tracing its
    initialiser on every ``apply``, which the sampler calls twice per scale.
    """
    block = block_class(config)(config, init_scales=scales, parent=None)
    cond_shape = (1, 6, config.embed_dim) if config.shared_aln else (1, config.embed_dim)

    def init(rng: jax.Array) -> Any:
        x_BlC, cond = jnp.zeros((1, config.first_l, config.embed_dim)), jnp.zeros(cond_shape)
        return jax.vmap(lambda key: block.init(key, x_BlC, cond, first_scale=0, last_scale=1)["params"])(
            jax.random.split(rng, config.depth)
        )

    return jax.jit(init)


def _block_names(depth: int) -> list[str]:
    return [f"blocks_{i}" for i in range(depth)]


def blocks_are_stacked(variables: Mapping[str, Any]) -> bool:
    """Whether ``{'params': ...}`` holds the blocks stacked (``stack_blocks``) or one per block."""
    return "blocks" in variables["params"]


def stack_blocks(variables: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """``{'params': ...}`` with ``blocks_0`` ... ``blocks_{depth-1}`` replaced by one
    ``blocks`` subtree whose leaves carry a leading depth axis (for ``scan_blocks``).

    A new copy of the block weights: drop the per-block tree to free its memory.
    """
    params = dict(variables["params"])
    missing = [name for name in _block_names(depth) if name not in params]
    if missing:
        raise ValueError(f"stack_blocks: per-block params {missing} not found")
    blocks = [params.pop(name) for name in _block_names(depth)]
    params["blocks"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)
    return {**variables, "params": params}


def _init_fn(config: TransformerConfig, scales: InitScales = InitScales()):
    """``rng -> variables``: teacher forcing on the start token alone touches every param."""
    model = Transformer(config, init_scales=scales)
    label_B = jnp.zeros((1,), jnp.int32)
    return lambda rng: model.init(rng, label_B, None, first_scale=0, last_scale=1)


def init_params(
    config: TransformerConfig, rng: jax.Array, scales: InitScales = InitScales()
) -> dict[str, Any]:
    """Fresh ``{'params': ...}``: the official initialisation recipe with ``scales``."""
    return jax.jit(_init_fn(config, scales))(rng)


def param_shapes(config: TransformerConfig) -> dict[str, Any]:
    """``{'params': ...}`` of ``jax.ShapeDtypeStruct`` (no allocation)."""
    return jax.eval_shape(_init_fn(config), jax.random.PRNGKey(0))
