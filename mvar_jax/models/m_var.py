"""M-VAR (Ren et al., arXiv 2411.10433): VAR's AdaLN transformer with Mamba2 between scales.

``Transformer(TransformerConfig(family='m_var', ...))`` builds it from the
block below; embeddings, head, attention and FFN are the shared ones. Each
block has three residual branches, modulated and gated by the class (9-way AdaLN)::

    x += attn(LN(x) (1 + scale1) + shift1) * gamma1    bidirectional, within each scale
    x += mamba(LN(x) (1 + scale2) + shift2) * gamma2   causal over the whole pyramid
    x += ffn(LN(x) (1 + scale3) + shift3) * gamma3

The pyramid is the scales concatenated coarse to fine (row-major inside a
scale); the Mamba2 layer is the only path from one scale to the next.

Inference is linear in the pyramid: each block's Mamba state (conv history, SSM
state) is carried from scale to scale, so scale si processes only its own
``pn * pn`` tokens (``Transformer.scale_logits`` with the states of
``init_mamba_states``). The official sampler instead re-runs every
block's Mamba from scratch over all earlier scales at each scale; a cache from
``init_rerun_cache`` selects that algorithm, the reference for the tests and the
cost benchmark (``bench/bench_m_var_cost.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax.models import attention, mamba2, mvar
from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.family import Family
from mvar_jax.models.layers import (
    FFN,
    AdaLNSelfAttn,
    SelfAttention,
    ada_lin_init,
    init_std,
    layer_norm,
    modulate,
)
from mvar_jax.models.segments import SegmentSchedule, whole_pyramid


def mamba_config(config: TransformerConfig, *, inference: bool = False) -> mamba2.Mamba2Config:
    """A block's Mamba2 layer: the official settings at this width. ``inference``: as
    inference runs it on a carried state, scanned in chunks of
    ``config.mamba_inference_chunk_size`` (the same result, fewer FLOPs per token)."""
    layer = mamba2.Mamba2Config(d_model=config.embed_dim)
    if inference:
        layer = dataclasses.replace(layer, chunk_size=config.mamba_inference_chunk_size)
    return layer


def init_mamba_states(config: TransformerConfig, batch_size: int) -> tuple[mamba2.MambaState, ...]:
    """Every block's zero Mamba state: what scale 0 starts from."""
    return tuple(mamba_config(config).zero_state(batch_size) for _ in range(config.depth))


class RerunPrefix(NamedTuple):
    """The official inference's per-block cache: the residual stream (after attention)
    of every token generated so far, ``(B, tokens, C)``."""

    x_BLC: jax.Array


def init_rerun_cache(config: TransformerConfig, batch_size: int) -> tuple[RerunPrefix, ...]:
    """An empty prefix per block: ``scale_logits`` then re-runs Mamba as the official code."""
    empty = jnp.zeros((batch_size, 0, config.embed_dim), jnp.float32)
    return tuple(RerunPrefix(empty) for _ in range(config.depth))


class AdaLNAttnMamba(AdaLNSelfAttn):
    """M-VAR block: attention within each scale, Mamba2 over the pyramid, FFN.

    It keeps the VAR/MVAR block's fields and call, so that ``Transformer`` runs
    either alike. ``cache``: None for teacher forcing (Mamba from a zero state
    over scales starting at 0), else this block's ``MambaState`` (advanced by
    this scale's tokens and returned) or ``RerunPrefix`` (the official re-run).
    """

    @nn.compact
    def __call__(
        self,
        x_BlC: jax.Array,
        cond_BD: jax.Array,
        first_scale: int,
        last_scale: int,
        deterministic: bool = True,
        cache: mamba2.MambaState | RerunPrefix | None = None,
    ):
        cfg = self.config
        C = cfg.embed_dim
        ada_lin = nn.Dense(
            9 * C,
            dtype=cfg.compute_dtype,
            kernel_init=ada_lin_init(init_std(cfg), C, self.init_scales),
            name="ada_lin",
        )
        (gamma1, gamma2, gamma3, scale1, scale2, scale3, shift1, shift2, shift3) = jnp.split(
            ada_lin(nn.silu(cond_BD)).reshape(-1, 9, C), 9, 1
        )
        drop_path = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2))

        def add(x, h, gamma):  # One gated residual branch; drop path per sample.
            return x + drop_path(h * gamma, deterministic=deterministic)

        def normed(x, scale, shift):
            return modulate(layer_norm(x, cfg.norm_eps), scale, shift)

        h, _ = SelfAttention(cfg, self.attend, name="attn")(
            normed(x_BlC, scale1, shift1), first_scale=first_scale, last_scale=last_scale
        )
        x_BlC = add(x_BlC, h, gamma1)

        # Carrying the state: inference's chunking (the same result, fewer FLOPs per token).
        layer = mamba_config(cfg, inference=isinstance(cache, mamba2.MambaState))
        mamba = mamba2.Mamba2(layer, dtype=cfg.compute_dtype, proj_std=init_std(cfg), name="mamba")
        if isinstance(cache, RerunPrefix):  # From scratch over every token so far.
            prefix_BLC = jnp.concatenate([cache.x_BLC, x_BlC], axis=1)
            h, _ = mamba(normed(prefix_BLC, scale2, shift2))
            h, cache = h[:, -x_BlC.shape[1] :], RerunPrefix(prefix_BLC)
        else:
            h, state = mamba(normed(x_BlC, scale2, shift2), cache)
            cache = None if cache is None else state
        x_BlC = add(x_BlC, h, gamma2)

        x_BlC = add(x_BlC, FFN(cfg, name="ffn")(normed(x_BlC, scale3, shift3)), gamma3)
        return x_BlC, cache


# Within each scale, whole: MVAR's scale-Markov attention without spatial-Markov scales.
attend = functools.partial(mvar.attend, spatial=False)


def keys_per_query(config: TransformerConfig, si: int) -> int:
    return config.patch_nums[si] ** 2  # its own scale (Mamba2 carries the rest)


def schedule(config: TransformerConfig, ratio_k: int) -> SegmentSchedule:
    del ratio_k  # MVAR's: M-VAR's Mamba layers run causally over the whole pyramid.
    return whole_pyramid(config.num_scales)


def check(config: TransformerConfig) -> None:
    if config.shared_aln:  # The official block offsets 6 modulations, it needs 9.
        raise ValueError("M-VAR has no shared AdaLN (shared_aln=False)")
    try:
        mamba_config(config)
    except ValueError as e:
        raise ValueError(f"M-VAR's Mamba2 layer: {e}") from e


def official_attention_buffers(config: TransformerConfig) -> dict[str, np.ndarray]:
    """The official M-VAR attention keeps its scales' token counts as an int32 buffer."""
    return {"patch_nums": np.array([pn * pn for pn in config.patch_nums], np.int32)}


FAMILY = Family(
    name="m_var",
    title="M-VAR",
    summary="attention within each scale, Mamba2 across the pyramid (OliverRensu/MVAR)",
    block=AdaLNAttnMamba,
    attend=attend,
    keys_per_query=keys_per_query,
    spatial_markov=False,
    init_state=init_mamba_states,
    state_in_place=False,
    any_first_scale=False,
    guides_at_cfg_one=True,
    schedule=schedule,
    check=check,
    weights_marker="blocks.0.mamba.in_proj.weight",
    training_mask=attention.block_diagonal_mask,
    attention_buffers=official_attention_buffers,
)
