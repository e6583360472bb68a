r"""Writes the token cache of a dataset with a VQ-VAE (official .pth, tokenizer or model dir).

  python -m mvar_jax.data.token_cache --vae=pretrained/vae_ch160v4096z32.pth \
      --data.name=folder --data.data_dir=/data/imagenet --data.image_size=256 \
      --data.num_classes=1000 --data.crop=adm_center_crop \
      --data.token_cache_dir=/data/imagenet_tokens --role=train

``--data.*`` are the fields of ``mvar_jax.data.default_config()``; the same values
(with ``token_cache_dir``) then make ``build_train_source`` read the cache. Run it
once per role; on several hosts pass --process_index/--process_count and each
writes its share of the chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from absl import app, flags
from ml_collections import config_flags

from mvar_jax import checkpoint
from mvar_jax.data import config as config_lib, token_cache
from mvar_jax.models.vqvae import VQVAE

_DATA = config_flags.DEFINE_config_dict(
    "data", config_lib.default_config(), "Data config; data.token_cache_dir is the output."
)
_VAE = flags.DEFINE_string(
    "vae", None, "Official VQ-VAE state dict (.pth), or a tokenizer / model directory.", required=True
)
_PATCH_NUMS = flags.DEFINE_list(
    "patch_nums",
    None,
    "Token map sides per scale (default: the pyramid the tokenizer directory records; an "
    "official .pth records none: 1,2,3,4,5,6,8,10,13,16, the release's).",
)
_ROLE = flags.DEFINE_enum("role", "train", ["train", "eval"], "Which split to cache.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per encoder call (per host).")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 4096, "Examples per cache file.")
_PROCESS_INDEX = flags.DEFINE_integer("process_index", None, "This host (default: jax.process_index()).")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", None, "Hosts (default: jax.process_count()).")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _DATA.value
    if not cfg.token_cache_dir:
        raise app.UsageError("--data.token_cache_dir (the output directory) is required")
    patch_nums = None if _PATCH_NUMS.value is None else tuple(int(p) for p in _PATCH_NUMS.value)
    vae_config, variables = checkpoint.load_vqvae_checkpoint(_VAE.value, patch_nums=patch_nums)
    encode_fn = token_cache.sharded_encoder(token_cache.vqvae_tokenize(VQVAE(vae_config)), variables)
    token_cache.write_token_cache(
        cfg,
        encode_fn,
        cfg.token_cache_dir,
        _ROLE.value,
        batch_size=_BATCH_SIZE.value,
        chunk_size=_CHUNK_SIZE.value,
        process_index=jax.process_index() if _PROCESS_INDEX.value is None else _PROCESS_INDEX.value,
        process_count=jax.process_count() if _PROCESS_COUNT.value is None else _PROCESS_COUNT.value,
    )


if __name__ == "__main__":
    app.run(main)
