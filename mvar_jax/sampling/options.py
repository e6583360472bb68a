"""How samples are drawn: one frozen dataclass, from the command line to the compiled loop."""

from __future__ import annotations

import dataclasses
import math

from mvar_jax.models.kv_compression import KVCompression

# Images the VQVAE decodes at a time.
DECODE_BATCH_SIZE = 4
# Tokens per chunk of a stateless family's per-scale work: 16x16 maps of 16 guided
# images, matmuls of 8192 rows, still large enough for an accelerator.
CHUNK_TOKENS = 8192


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Everything about a sampling call but the model, the labels and the key.

    The defaults are the papers' FID setting (the MVAR and M-VAR READMEs: cfg 1.5,
    top-k 900, top-p 0.96); the field names are the command-line flags' names.

    Attributes:
      cfg: classifier-free guidance scale, >= 0. An input of the compiled program,
        not part of its shape, so it does not enter equality: another cfg re-uses
        the compilation (except MVAR moving to or from 1, which drops the
        unconditional half).
      top_k, top_p: logit filters, 0 disables either; ``top_k=1`` is greedy.
      more_smooth: feed the next scale a Gumbel-softmax mix of codebook entries
        instead of the drawn one (the official visualisation mode, not for FID).
      decode: decode the features to images (off for token-only work).
      decode_batch_size: images the VQVAE decodes at a time, so that its
        full-resolution activations never set the peak memory.
      chunk_tokens: a family that carries no state between scales (MVAR) runs
        each scale on chunks of images of at most this many tokens (both guidance
        rows counted), one after another: memory is one chunk's activations.
        Results do not depend on it.
      kv_compression: VAR's KV cache compressed (``models.kv_compression``: HACK or a
        baseline); None or a ratio of 0 is the full cache.
    """

    cfg: float = dataclasses.field(default=1.5, compare=False)
    top_k: int = 900
    top_p: float = 0.96
    more_smooth: bool = False
    decode: bool = True
    decode_batch_size: int = DECODE_BATCH_SIZE
    chunk_tokens: int = CHUNK_TOKENS
    kv_compression: KVCompression | None = None

    def __post_init__(self):
        if not (math.isfinite(self.cfg) and self.cfg >= 0):
            raise ValueError(f"cfg={self.cfg} must be a finite number >= 0 (1: no guidance)")
        check_filters(self.top_k, self.top_p)
        for name in ("decode_batch_size", "chunk_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an int >= 1")


def check_filters(top_k: int, top_p: float) -> None:
    """ValueError unless ``top_k >= 0`` and ``0 <= top_p <= 1`` (0 disables either)."""
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an int >= 0 (0: off)")
    if not 0 <= top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in [0, 1] (0: off)")
