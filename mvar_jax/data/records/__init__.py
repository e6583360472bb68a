"""Encoded images by index from an image folder or a TFDS split, and the loader that decodes them.

``open_image_records`` is the one place that maps ``data.name`` to a random-access
source of (encoded bytes, label); ``image_loader`` turns it into the per-example
function ``batching.BatchSource`` calls. Images stay encoded until they are loaded,
so that every source decodes with PIL, like the official loader, and a corrupt image
is caught where it is read. ``python -m mvar_jax.data.records`` (``__main__.py``)
prepares a TFDS dataset.

TFDS is imported only when a TFDS dataset is opened, so token-cache and
image-folder runs, and the GPU benchmarks, start without it.
"""

from __future__ import annotations

import os
import pathlib
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from absl import logging

from mvar_jax.data import batching, config as config_lib, order, preprocess

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

ROLES = ("train", "eval")
_FOLDER_SPLITS = {"train": "train", "eval": "val"}
# TFDS split per role, first present wins.
_TFDS_SPLITS = {"train": ("train",), "eval": ("validation", "test")}


class ImageRecords(Protocol):
    """Indexable encoded images with integer labels in [0, num_classes)."""

    num_classes: int

    def __len__(self) -> int: ...

    def read(self, index: int) -> tuple[bytes, int]: ...

    def where(self, index: int) -> str:
        """A human-readable location (path, or dataset[index]) for error messages."""
        ...


# An image folder laid out as the official code expects: <split>/<class>/<image>.
# Classes are the sorted sub-folder names and files are listed in sorted walk
# order, as torchvision's ``DatasetFolder`` does, so label ids and example indices
# agree with the PyTorch loaders.

# torchvision's IMG_EXTENSIONS, matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _image_files(class_dir: pathlib.Path) -> list[str]:
    files = []
    for root, _, names in sorted(os.walk(class_dir, followlinks=True)):
        files.extend(os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS))
    return files


class FolderRecords:
    """Random access to (encoded bytes, label) of the images under ``split_dir``."""

    def __init__(self, split_dir: str | os.PathLike):
        split_dir = pathlib.Path(split_dir)
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"image folder split {split_dir} does not exist; expected {split_dir}/<class>/<image>.jpg"
            )
        self.classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"{split_dir} has no class sub-folders (<class>/<image>.jpg)")
        self._paths: list[str] = []
        self._labels: list[int] = []
        empty = []
        for label, name in enumerate(self.classes):
            files = _image_files(split_dir / name)
            if not files:
                empty.append(name)
            self._paths.extend(files)
            self._labels.extend([label] * len(files))
        if empty:
            raise FileNotFoundError(
                f"class folders without images ({', '.join(IMAGE_EXTENSIONS)}) in {split_dir}: "
                f"{', '.join(empty)}"
            )
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self._paths)

    def read(self, index: int) -> tuple[bytes, int]:
        with open(self._paths[index], "rb") as f:
            return f.read(), self._labels[index]

    def where(self, index: int) -> str:
        return self._paths[index]


# A TFDS image-classification split stored as array_record, the random-access
# format; TFDS's own decoder is skipped.

IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def _not_prepared_error(tfds_name: str, builder: tfds.core.DatasetBuilder) -> FileNotFoundError:
    root = builder.data_dir_root
    steps = ""
    if builder.name == "imagenet2012":
        steps = f"put {' and '.join(IMAGENET_MANUAL_FILES)} into {root}/downloads/manual, then "
    return FileNotFoundError(
        f"TFDS dataset {builder.info.full_name} is not prepared in {root}: {steps}run "
        f"`python -m mvar_jax.data.records --name=tfds:{tfds_name} --data_dir={root}` "
        "(see docs/data.md)"
    )


def _builtin_builder(data_dir: str | None, image_size: int) -> tfds.core.DatasetBuilder:
    from mvar_jax.data import builtin_shapes  # a TFDS builder: imports TFDS

    return builtin_shapes.BuiltinShapes(
        config=builtin_shapes.config_name_for(image_size),
        data_dir=data_dir,
        file_format="array_record",
    )


def prepare(
    tfds_name: str, data_dir: str | None, *, image_size: int = 64, manual_dir: str | None = None
) -> tfds.core.DatasetBuilder:
    """Generates (downloads, or reads from ``manual_dir``) a dataset as array_record."""
    import tensorflow_datasets as tfds

    if tfds_name == "builtin_shapes":
        builder = _builtin_builder(data_dir, image_size)
    else:
        builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def builtin_prepared(data_dir: str | None, image_size: int) -> bool:
    """Whether the built-in dataset at ``image_size`` is generated in ``data_dir``."""
    return _builtin_builder(data_dir, image_size).is_prepared()


def open_builder(tfds_name: str, data_dir: str | None, image_size: int) -> tfds.core.DatasetBuilder:
    """The prepared builder; only the built-in dataset is generated on first use."""
    import tensorflow_datasets as tfds

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
        import tensorflow_datasets as tfds

        info = builder.info
        if split not in info.splits:
            raise ValueError(f"{info.full_name} has no split {split!r}; available: {sorted(info.splits)}")
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


def open_image_records(cfg: Any, role: str) -> ImageRecords:
    """Records for ``role`` ('train' | 'eval'), checked against ``cfg.num_classes``."""
    config_lib.check_config(cfg)
    if role not in ROLES:
        raise ValueError(f"role={role!r}: expected one of {ROLES}")
    if cfg.name == "folder":
        recs = FolderRecords(pathlib.Path(cfg.data_dir) / _FOLDER_SPLITS[role])
    else:
        builder = open_builder(cfg.name.removeprefix("tfds:"), cfg.data_dir, int(cfg.image_size))
        present = [s for s in _TFDS_SPLITS[role] if s in builder.info.splits]
        if not present:
            raise ValueError(
                f"{builder.info.full_name} has no {role} split (looked for "
                f"{_TFDS_SPLITS[role]}); available: {sorted(builder.info.splits)}"
            )
        recs = TfdsRecords(builder, present[0])
    if recs.num_classes != int(cfg.num_classes):
        raise ValueError(
            f"data.num_classes={cfg.num_classes} but {cfg.name} ({role}) has {recs.num_classes} classes"
        )
    if len(recs) == 0:
        raise ValueError(f"{cfg.name} ({role}) has no examples")
    return recs


def image_loader_for(cfg: Any, role: str, *, seed: int | None) -> tuple[batching.LoadFn, int]:
    """The ``image_loader`` of ``cfg``'s ``role`` split, and the split's size."""
    recs = open_image_records(cfg, role)
    prep = preprocess.Preprocess.from_config(cfg)
    return image_loader(recs, prep, on_bad_image=cfg.on_bad_image, seed=seed), len(recs)


def image_loader(
    recs: ImageRecords,
    prep: preprocess.Preprocess,
    *,
    on_bad_image: str,
    seed: int | None,
) -> batching.LoadFn:
    """Loads ``{'image': (S, S, 3) uint8, 'label': () int32}``; ``seed=None`` is eval.

    An unreadable image is logged and dropped (None), or with
    ``on_bad_image='raise'`` stops everything with its location.
    """

    def load(index: int, epoch: int) -> batching.Example | None:
        try:
            data, label = recs.read(index)
            img = preprocess.decode_rgb(data)
        except (OSError, preprocess.BadImageError) as err:
            where = recs.where(index)
            if on_bad_image == "raise":
                raise preprocess.BadImageError(f"cannot read image {where}: {err}") from err
            logging.warning("skipping unreadable image %s: %s", where, err)
            return None
        rng = None if seed is None else order.example_rng(seed, epoch, index)
        return {"image": prep(img, rng), "label": np.int32(label)}

    return load
