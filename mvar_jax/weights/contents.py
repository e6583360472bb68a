"""What an official ``.pth`` holds, told before any key is matched: a VQVAE, a transformer of some
family, or neither; so that a file given to the wrong converter flag is named for what it is."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from mvar_jax.errors import CheckpointError
from mvar_jax.models import families
from mvar_jax.weights import transformer

# Keys that only the official VQVAE's and the transformers' state dicts hold.
VQVAE_KEYS = ("quantize.embedding.weight", "encoder.conv_in.weight")
TRANSFORMER_KEYS = ("word_embed.weight", "class_emb.weight", "head.weight")


class Contents(NamedTuple):
    """kind: 'vqvae', 'transformer' or 'other'; family: a transformer's family as the file tells
    it (its release trainer state, a marker key, its training mask), None where it cannot."""

    kind: str
    family: str | None = None

    def describe(self) -> str:
        if self.kind == "vqvae":
            return "a VQVAE"
        if self.kind == "transformer":
            title = families.get(self.family).title if self.family else "VAR-family"
            return f"{title} transformer weights"
        return "neither a VQVAE nor transformer weights"


def contents(
    state_dict: Mapping[str, np.ndarray],
    wrappers: tuple[str, ...] = (),
    patch_nums: Sequence[int] | None = None,
) -> Contents:
    """What ``state_dict`` holds (``wrappers``: the trainer-state keys it sat under;
    ``patch_nums``: the pyramid its training mask is read against, None: the official
    one of its length)."""
    if all(k in state_dict for k in VQVAE_KEYS):
        return Contents("vqvae")
    if not all(k in state_dict for k in TRANSFORMER_KEYS):
        return Contents("other")
    released = [f.name for f in families.FAMILIES.values() if f.release_key and f.release_key in wrappers]
    if released:  # the release says which; the official fine-tuning keeps VAR's mask buffer
        return Contents("transformer", released[0])
    try:
        pyramid = transformer.pyramid_of(state_dict, patch_nums)
        return Contents("transformer", transformer.detect_family(state_dict, pyramid))
    except (CheckpointError, ValueError):  # no mask, or one of another pyramid
        return Contents("transformer")
