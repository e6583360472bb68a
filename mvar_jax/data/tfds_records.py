"""Random access to a TFDS image-classification split stored as array_record.

Images are handed out still encoded (TFDS's decoder is skipped) so that every
source decodes with PIL, like the official loader, and a corrupt image is caught
where it is read.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from mvar_jax.data import builtin_shapes

IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def _not_prepared_error(tfds_name: str, builder: tfds.core.DatasetBuilder) -> FileNotFoundError:
    root = builder.data_dir_root
    steps = ""
    if builder.name == "imagenet2012":
        steps = f"put {' and '.join(IMAGENET_MANUAL_FILES)} into {root}/downloads/manual, then "
    return FileNotFoundError(
        f"TFDS dataset {builder.info.full_name} is not prepared in {root}: {steps}run "
        f"`python -m mvar_jax.data.prepare --name=tfds:{tfds_name} --data_dir={root}` "
        "(see docs/data.md)"
    )


def _builtin_builder(data_dir: str | None, image_size: int) -> tfds.core.DatasetBuilder:
    return builtin_shapes.BuiltinShapes(
        config=builtin_shapes.config_name_for(image_size),
        data_dir=data_dir,
        file_format="array_record",
    )


def prepare(
    tfds_name: str, data_dir: str | None, *, image_size: int = 64, manual_dir: str | None = None
) -> tfds.core.DatasetBuilder:
    """Generates (downloads, or reads from `manual_dir`) a dataset as array_record."""
    if tfds_name == "builtin_shapes":
        builder = _builtin_builder(data_dir, image_size)
    else:
        builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return builder


def open_builder(tfds_name: str, data_dir: str | None, image_size: int) -> tfds.core.DatasetBuilder:
    """The prepared builder; only the built-in dataset is generated on first use."""
    if tfds_name == "builtin_shapes":
        builder = _builtin_builder(data_dir, image_size)
        if not builder.is_prepared():
            builder.download_and_prepare()
        return builder
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    if not builder.is_prepared():
        raise _not_prepared_error(tfds_name, builder)
    return builder


class TfdsRecords:
    """(encoded bytes, label) of one split of an image-classification builder."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
        info = builder.info
        if split not in info.splits:
            raise ValueError(
                f"{info.full_name} has no split {split!r}; available: {sorted(info.splits)}"
            )
        keys = info.supervised_keys or ("image", "label")
        if not (
            len(keys) == 2
            and all(isinstance(k, str) and k in info.features for k in keys)
            and isinstance(info.features[keys[0]], tfds.features.Image)
            and isinstance(info.features[keys[1]], tfds.features.ClassLabel)
        ):
            raise ValueError(
                f"{info.full_name} is not an image-classification dataset: expected an Image "
                f"and a ClassLabel feature, got supervised_keys={keys!r}, features={info.features}"
            )
        self._image_key, self._label_key = keys
        self._name = f"{info.full_name}:{split}"
        try:
            self._source = builder.as_data_source(
                split, decoders={self._image_key: tfds.decode.SkipDecoding()}
            )
        except (NotImplementedError, ValueError) as err:
            raise ValueError(
                f"{info.full_name} in {builder.data_dir} must be stored as array_record for "
                "random access; rebuild it with `--file_format=array_record`"
            ) from err
        self.num_classes = info.features[self._label_key].num_classes
        self._has_file_name = "file_name" in info.features

    def __len__(self) -> int:
        return len(self._source)

    def read(self, index: int) -> tuple[bytes, int]:
        example = self._source[index]
        return example[self._image_key], int(example[self._label_key])

    def where(self, index: int) -> str:
        where = f"{self._name}[{index}]"
        if self._has_file_name:
            where += f" ({self._source[index]['file_name']!r})"
        return where
