"""Per-example load functions for `batching.BatchSource`: read, decode, augment."""

from __future__ import annotations

from typing import Any

import numpy as np
from absl import logging

from mvar_jax.data import batching, order, preprocess, records


def image_loader_for(cfg: Any, role: str, *, seed: int | None) -> tuple[batching.LoadFn, int]:
    """`image_loader` over `cfg`'s records of `role` with its preprocessing, and the split size."""
    recs = records.open_image_records(cfg, role)
    prep = preprocess.Preprocess.from_config(cfg)
    return image_loader(recs, prep, on_bad_image=cfg.on_bad_image, seed=seed), len(recs)


def image_loader(
    recs: records.ImageRecords,
    prep: preprocess.Preprocess,
    *,
    on_bad_image: str,
    seed: int | None,
) -> batching.LoadFn:
    """Loads `{'image': (S, S, 3) uint8, 'label': () int32}`; `seed=None` is eval.

    An unreadable image is logged and dropped (None), or with
    `on_bad_image='raise'` stops everything with its location.
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
