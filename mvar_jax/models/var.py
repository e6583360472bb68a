"""VAR (Tian et al., arXiv 2404.02905): each scale attends to itself and every earlier scale.

Teacher forcing runs the whole pyramid under the block-causal mask; inference
keeps every block's keys and values in a fixed-size cache, into which each scale
writes its own slice (``init_kv_cache``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax.models import attention
from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.family import Family
from mvar_jax.models.layers import AdaLNSelfAttn
from mvar_jax.models.segments import SegmentSchedule, whole_pyramid

# Per block, one (k, v) pair of shape (B, L, heads, head_dim) holding every token
# generated so far; with scanned blocks one (k, v) pair of shape
# (depth, B, L, heads, head_dim).
KVCache = tuple[tuple[jax.Array, jax.Array], ...] | tuple[jax.Array, jax.Array]


def init_kv_cache(config: TransformerConfig, batch_size: int) -> KVCache:
    """A zeroed KV cache: one (k, v) pair of ``(B, L, heads, head_dim)`` per block, in the
    compute dtype as the official cache."""
    shape = (batch_size, config.seq_len, config.num_heads, config.head_dim)
    # Distinct buffers, so that a jitted step may donate the whole cache.
    return tuple(
        (jnp.zeros(shape, config.compute_dtype), jnp.zeros(shape, config.compute_dtype))
        for _ in range(config.depth)
    )


def attend(q, k, v, config: TransformerConfig, first_scale: int, last_scale: int, scale: float):
    """Queries of scales ``[first_scale, last_scale)``; keys and values of scales ``[0, last_scale)``
    (teacher forcing starts at 0; cached inference has one scale of queries and the cache's prefix)."""
    q_ids = attention.scale_ids(config.patch_nums, first_scale, last_scale)
    k_ids = attention.scale_ids(config.patch_nums, 0, last_scale)
    return attention.block_causal_attention(
        q, k, v, q_ids, k_ids, scale, lean_backward=config.lean_attention_backward
    )


def block_causal_mask(patch_nums: Sequence[int]) -> np.ndarray:
    """``(L, L)``: token i may attend to token j when j's scale is not after i's."""
    ids = attention.scale_ids(patch_nums, 0, len(patch_nums))
    return ids[:, None] >= ids[None, :]


def keys_per_query(config: TransformerConfig, si: int) -> int:
    return config.token_range(0, si + 1)[1]  # every token of the scales up to si


def schedule(config: TransformerConfig, ratio_k: int) -> SegmentSchedule:
    del ratio_k  # MVAR's
    return whole_pyramid(config.num_scales)


def check(config: TransformerConfig) -> None:
    del config  # nothing beyond the shared checks


FAMILY = Family(
    name="var",
    title="VAR",
    summary="block-causal attention over all earlier scales, sampled with a KV cache",
    block=AdaLNSelfAttn,
    attend=attend,
    keys_per_query=keys_per_query,
    spatial_markov=False,
    init_state=init_kv_cache,
    state_in_place=True,
    any_first_scale=False,
    guides_at_cfg_one=True,
    schedule=schedule,
    check=check,
    release_key="var_wo_ddp",
    training_mask=block_causal_mask,
)
