r"""Prepares a TFDS dataset as array_record, the random-access format the pipelines read.

  python -m mvar_jax.data.records --name=imagenet2012 --data_dir=/data/tfds \
      --manual_dir=/data/ilsvrc   # holds ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar
  python -m mvar_jax.data.records --name=tfds:cifar10 --data_dir=/data/tfds
  python -m mvar_jax.data.records --name=builtin_shapes --image_size=128

The built-in dataset is also generated on first use; preparing it beforehand
keeps several hosts from generating it at once into a shared directory.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from mvar_jax import cli
from mvar_jax.data import records

PROG = "python -m mvar_jax.data.records"
FLAGS = flags.FlagValues()  # this command's own, as every command's (mvar_jax.cli)
flags.DEFINE_string(
    "name", "builtin_shapes", "'builtin_shapes', 'imagenet2012' or 'tfds:<name>'", flag_values=FLAGS
)
flags.DEFINE_string(
    "data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)", flag_values=FLAGS
)
flags.DEFINE_string(
    "manual_dir",
    None,
    "where manually downloaded archives are (default: <data_dir>/downloads/manual)",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "image_size", 64, "builtin_shapes only: the resolution to cover", lower_bound=1, flag_values=FLAGS
)


def main(argv: Sequence[str] | None = None) -> int:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    if args.name == "folder":
        cli.usage_error(PROG, "an image folder needs no preparation: point data.data_dir at it")
    try:
        builder = records.prepare(
            args.name.removeprefix("tfds:"),
            args.data_dir,
            image_size=args.image_size,
            manual_dir=args.manual_dir,
        )
    except (ValueError, FileNotFoundError) as e:
        cli.usage_error(PROG, str(e))
    print(f"prepared {builder.info.full_name} in {builder.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
