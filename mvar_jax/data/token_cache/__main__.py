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

import sys
from collections.abc import Sequence

import jax
from absl import flags
from ml_collections import config_flags

from mvar_jax import checkpoint, cli
from mvar_jax.data import config as config_lib, token_cache
from mvar_jax.errors import CheckpointError
from mvar_jax.models.vqvae import VQVAE

PROG = "python -m mvar_jax.data.token_cache"
FLAGS = flags.FlagValues()  # this command's own, as every command's (mvar_jax.cli)
config_flags.DEFINE_config_dict(
    "data", config_lib.default_config(), "data config; data.token_cache_dir is the output", flag_values=FLAGS
)
flags.DEFINE_string(
    "vae", None, "official VQVAE state dict (.pth), or a tokenizer / model directory", flag_values=FLAGS
)
cli.define_int_list(
    "patch_nums",
    None,
    "token map sides per scale (default: the pyramid the tokenizer directory records; an official "
    ".pth records none: the release's)",
    FLAGS,
    what="ints",
    example="1,2,3,4,5,6,8,10,13,16",
)
flags.DEFINE_enum("role", "train", ["train", "eval"], "which split to cache", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "images per encoder call (per host)", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("chunk_size", 4096, "examples per cache file", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("process_index", None, "this host (default: jax.process_index())", flag_values=FLAGS)
flags.DEFINE_integer("process_count", None, "hosts (default: jax.process_count())", flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    cfg = args.data
    if args.vae is None or not cfg.token_cache_dir:
        cli.usage_error(PROG, "--vae and --data.token_cache_dir (the output directory) are required")
    try:
        config_lib.check_config(cfg)
        vae_config, variables = checkpoint.load_vqvae_checkpoint(args.vae, patch_nums=args.patch_nums)
    except (CheckpointError, ValueError) as e:
        cli.usage_error(PROG, f"--vae {args.vae}: {e}")
    encode_fn = token_cache.sharded_encoder(token_cache.vqvae_tokenize(VQVAE(vae_config)), variables)
    token_cache.write_token_cache(
        cfg,
        encode_fn,
        cfg.token_cache_dir,
        args.role,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        process_index=jax.process_index() if args.process_index is None else args.process_index,
        process_count=jax.process_count() if args.process_count is None else args.process_count,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
