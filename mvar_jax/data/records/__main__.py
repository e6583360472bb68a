r"""Prepares a TFDS dataset as array_record, the random-access format the pipelines read.

  python -m mvar_jax.data.records --name=imagenet2012 --data_dir=/data/tfds \
      --manual_dir=/data/ilsvrc   # holds ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar
  python -m mvar_jax.data.records --name=tfds:cifar10 --data_dir=/data/tfds
  python -m mvar_jax.data.records --name=builtin_shapes --image_size=128

The built-in dataset is also generated on first use; preparing it beforehand
keeps several hosts from generating it at once into a shared directory.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from mvar_jax.data import records

_NAME = flags.DEFINE_string("name", "builtin_shapes", "'builtin_shapes', 'imagenet2012' or 'tfds:<name>'.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)."
)
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir",
    None,
    "Where manually downloaded archives are (default: <data_dir>/downloads/manual).",
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "builtin_shapes only: the resolution to cover.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _NAME.value == "folder":
        raise app.UsageError("an image folder needs no preparation")
    builder = records.prepare(
        _NAME.value.removeprefix("tfds:"),
        _DATA_DIR.value,
        image_size=_IMAGE_SIZE.value,
        manual_dir=_MANUAL_DIR.value,
    )
    print(f"prepared {builder.info.full_name} in {builder.data_dir}")


if __name__ == "__main__":
    app.run(main)
