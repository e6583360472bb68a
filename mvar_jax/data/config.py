"""The data config: one ConfigDict shared by training, evaluation and token caching."""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

CROPS = ("resize_random_crop", "adm_center_crop")
BAD_IMAGE_POLICIES = ("skip", "raise")


def default_config() -> ml_collections.ConfigDict:
    """Defaults for the built-in dataset; training configs override what they need."""
    cfg = ml_collections.ConfigDict()
    # 'builtin_shapes' | 'imagenet2012' | 'tfds:<name>' | 'folder'.
    cfg.name = "builtin_shapes"
    # TFDS data dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets), or for
    # 'folder' the root holding train/<class>/*.jpg and val/<class>/*.jpg.
    cfg.data_dir = config_dict.placeholder(str)
    cfg.image_size = 64
    # 'resize_random_crop' (VAR's utils/data.py): Lanczos-resize the shorter side
    # to round(mid_reso * image_size), random crop for training, centre crop for
    # eval. 'adm_center_crop' (MVAR's utils/data.py): ADM centre crop for both.
    cfg.crop = "resize_random_crop"
    cfg.mid_reso = 1.125
    cfg.hflip = False
    cfg.num_classes = 10
    # Directory written by ``python -m mvar_jax.data.token_cache``; when set the
    # sources yield token ids instead of images.
    cfg.token_cache_dir = config_dict.placeholder(str)
    cfg.on_bad_image = "skip"  # or 'raise'
    cfg.num_workers = 8  # decode threads per host
    cfg.prefetch = 4  # batches prepared ahead, per host
    return cfg


def check_config(cfg: Any) -> None:
    """Raises ValueError naming the first invalid field; accepts any attribute object."""
    name = cfg.name
    if not (
        name in ("builtin_shapes", "imagenet2012", "folder")
        or (name.startswith("tfds:") and len(name) > len("tfds:"))
    ):
        raise ValueError(
            f"data.name={name!r}: expected 'builtin_shapes', 'imagenet2012', 'folder' "
            "or 'tfds:<dataset name>'"
        )
    if name == "folder" and not cfg.data_dir:
        raise ValueError("data.name='folder' needs data.data_dir (the folder with train/ and val/)")
    if int(cfg.image_size) <= 0:
        raise ValueError(f"data.image_size={cfg.image_size} must be positive")
    if cfg.crop not in CROPS:
        raise ValueError(f"data.crop={cfg.crop!r}: expected one of {CROPS}")
    if cfg.mid_reso < 1.0:
        raise ValueError(f"data.mid_reso={cfg.mid_reso} must be >= 1 (resize, then crop)")
    if int(cfg.num_classes) <= 0:
        raise ValueError(f"data.num_classes={cfg.num_classes} must be positive")
    if cfg.on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"data.on_bad_image={cfg.on_bad_image!r}: expected one of {BAD_IMAGE_POLICIES}")
    if int(cfg.num_workers) < 0 or int(cfg.prefetch) < 0:
        raise ValueError(f"data.num_workers={cfg.num_workers} and data.prefetch={cfg.prefetch} must be >= 0")
