"""The one place that maps `data.name` to a random-access source of encoded images.

TFDS (and with it TensorFlow) is imported only when a TFDS dataset is opened, so
token-cache and synthetic-data runs, and the GPU benchmarks, work without it.
"""

from __future__ import annotations

import pathlib
from typing import Any, Protocol

from mvar_jax.data import config as config_lib
from mvar_jax.data import folder

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


def _tfds_name(name: str) -> str:
    return name.removeprefix("tfds:")


def open_image_records(cfg: Any, role: str) -> ImageRecords:
    """Records for `role` ('train' | 'eval'), checked against `cfg.num_classes`."""
    config_lib.check_config(cfg)
    if role not in ROLES:
        raise ValueError(f"role={role!r}: expected one of {ROLES}")
    if cfg.name == "folder":
        records = folder.FolderRecords(pathlib.Path(cfg.data_dir) / _FOLDER_SPLITS[role])
    else:
        from mvar_jax.data import tfds_records  # Heavy: TensorFlow.

        builder = tfds_records.open_builder(_tfds_name(cfg.name), cfg.data_dir, int(cfg.image_size))
        present = [s for s in _TFDS_SPLITS[role] if s in builder.info.splits]
        if not present:
            raise ValueError(
                f"{builder.info.full_name} has no {role} split (looked for "
                f"{_TFDS_SPLITS[role]}); available: {sorted(builder.info.splits)}"
            )
        records = tfds_records.TfdsRecords(builder, present[0])
    if records.num_classes != int(cfg.num_classes):
        raise ValueError(
            f"data.num_classes={cfg.num_classes} but {cfg.name} ({role}) has "
            f"{records.num_classes} classes"
        )
    if len(records) == 0:
        raise ValueError(f"{cfg.name} ({role}) has no examples")
    return records
