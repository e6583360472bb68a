"""Class-conditional generation for every family.

    model = checkpoint.load_model("ckpt/mvar_d16")
    samples = sampling.sample(model, [207, 360], jax.random.PRNGKey(0), SamplingOptions(cfg=1.5))

``generate`` is the traceable loop, ``filters`` how logits become tokens, ``editing`` the
zero-shot in-painting, out-painting and class-conditional editing of given images.
"""

from mvar_jax.sampling import editing
from mvar_jax.sampling.filters import (
    cumsum_last,
    filter_logits,
    gumbel_softmax,
    tokens_from_uniform,
    top_k_filter,
    top_p_filter,
)
from mvar_jax.sampling.options import CHUNK_TOKENS, DECODE_BATCH_SIZE, SamplingOptions, check_filters
from mvar_jax.sampling.sampler import (
    Edit,
    Samples,
    check_kv_cache,
    generate,
    generate_jit,
    guidance_schedule,
    images_per_chunk,
    lower_sample,
    map_chunks,
    sample,
    sample_batches,
)

__all__ = [
    "CHUNK_TOKENS",
    "DECODE_BATCH_SIZE",
    "Edit",
    "Samples",
    "SamplingOptions",
    "check_filters",
    "check_kv_cache",
    "cumsum_last",
    "editing",
    "filter_logits",
    "generate",
    "generate_jit",
    "guidance_schedule",
    "gumbel_softmax",
    "images_per_chunk",
    "lower_sample",
    "map_chunks",
    "sample",
    "sample_batches",
    "tokens_from_uniform",
    "top_k_filter",
    "top_p_filter",
]
