"""Class-conditional generation for every family (``generate``), and the filters it draws tokens with."""

from mvar_jax.sampling.filters import (
    check_filters,
    cumsum_last,
    filter_logits,
    gumbel_softmax,
    tokens_from_uniform,
    top_k_filter,
    top_p_filter,
)
from mvar_jax.sampling.generate import (
    CHUNK_TOKENS,
    DECODE_BATCH_SIZE,
    Samples,
    generate,
    generate_jit,
    guidance_schedule,
    images_per_chunk,
    map_chunks,
    prepare,
    sample,
)

__all__ = [
    "CHUNK_TOKENS",
    "DECODE_BATCH_SIZE",
    "Samples",
    "check_filters",
    "cumsum_last",
    "filter_logits",
    "generate",
    "generate_jit",
    "guidance_schedule",
    "gumbel_softmax",
    "images_per_chunk",
    "map_chunks",
    "prepare",
    "sample",
    "tokens_from_uniform",
    "top_k_filter",
    "top_p_filter",
]
