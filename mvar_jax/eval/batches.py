"""The evaluator's ``.npz`` batches: images streamed a batch at a time, and reference statistics.

A sample batch holds ``arr_0``, ``(N, H, W, 3)`` images in [0, 255] (uint8, as ``sample.py
--fid_npz`` writes them, or float). A reference batch such as ADM's
``VIRTUAL_imagenet256_labeled.npz`` holds ``arr_0`` and, usually, the statistics the evaluator
computed from it: ``mu`` (2048,), ``sigma`` (2048, 2048) of ``pool_3`` and ``mu_s``, ``sigma_s``
of the spatial features; FID and sFID use those when they are there, precision and recall
always need the images. A reference of statistics alone gives FID and sFID only.

50,000 images of 256 px are 9.8 GB, so ``arr_0`` is read from the zip member a batch at a time
(compressed or not), never whole.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator

import numpy as np

from mvar_jax.models.inception import POOL_DIM, SPATIAL_DIM

IMAGES_KEY = "arr_0"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
MIN_IMAGES = 2  # a covariance needs two


class NpzError(ValueError):
    """A batch file that cannot be scored; the message says why and what was expected."""


def _members(path: str | os.PathLike) -> list[str]:
    if not os.path.isfile(path):
        raise NpzError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as z:
            return [n.removesuffix(".npy") for n in z.namelist()]
    except zipfile.BadZipFile:
        raise NpzError(f"{path} is not an .npz file (a zip of .npy arrays)") from None


class ImageBatch:
    """``arr_0`` of an ``.npz``: its shape and dtype, checked, and its images in batches."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        members = _members(path)
        if IMAGES_KEY not in members:
            raise NpzError(
                f"{path} has no {IMAGES_KEY} (it holds {', '.join(members) or 'nothing'}): the evaluator's "
                "format is uint8 images (N, H, W, 3) in arr_0, as `sample.py --fid_npz` writes"
            )
        with self._open() as (shape, dtype, _, _):
            self.shape, self.dtype = shape, dtype
        if len(shape) != 4 or shape[-1] != 3:
            raise NpzError(f"{path}: {IMAGES_KEY} has shape {shape}; expected RGB images (N, H, W, 3)")
        if dtype != np.uint8 and dtype.kind != "f":
            raise NpzError(f"{path}: {IMAGES_KEY} is {dtype}; expected uint8, or floats in [0, 255]")
        if shape[0] < MIN_IMAGES:
            raise NpzError(f"{path}: {shape[0]} image(s); FID needs at least {MIN_IMAGES} (a covariance)")

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    @contextlib.contextmanager
    def _open(self) -> Iterator[tuple[tuple[int, ...], np.dtype, bool, object]]:
        """``(shape, dtype, fortran_order, file)``, the file positioned at the array's data."""
        with zipfile.ZipFile(self.path) as z, z.open(f"{IMAGES_KEY}.npy") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            yield shape, dtype, fortran, f

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive ``(b, H, W, 3)`` batches (the last may be shorter), checked for range."""
        with self._open() as (shape, dtype, fortran, f):
            whole = np.load(self.path)[IMAGES_KEY] if fortran else None  # rows are not contiguous
            row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                if whole is None:
                    data = f.read(n * row_bytes)
                    if len(data) != n * row_bytes:
                        raise NpzError(f"{self.path}: {IMAGES_KEY} ends early, at image {start}")
                    batch = np.frombuffer(data, dtype).reshape(n, *shape[1:])
                else:
                    batch = whole[start : start + n]
                self._check_values(batch, start)
                yield batch

    def _check_values(self, batch: np.ndarray, start: int) -> None:
        if batch.dtype == np.uint8:
            return
        where = f"{self.path}: images {start}..{start + len(batch) - 1}"
        if not np.isfinite(batch).all():
            raise NpzError(f"{where} hold NaN or infinite values")
        lo, hi = float(batch.min()), float(batch.max())
        if lo < 0 or hi > 255:
            raise NpzError(f"{where} range over [{lo:g}, {hi:g}]; expected [0, 255]")
        if start == 0 and hi <= 1.0:
            raise NpzError(
                f"{where} lie in [0, 1]; the evaluator expects [0, 255] (multiply by 255, or write "
                "uint8 with mvar_jax.images.to_uint8)"
            )


def read_reference(path: str | os.PathLike) -> tuple[ImageBatch | None, dict[str, np.ndarray] | None]:
    """A reference batch's images (or None) and precomputed ``mu, sigma, mu_s, sigma_s``
    (float64, checked; or None): at least one of the two."""
    members = _members(path)
    if IMAGES_KEY not in members and not set(STAT_KEYS) & set(members):
        raise NpzError(
            f"{path} holds neither images ({IMAGES_KEY}) nor statistics ({', '.join(STAT_KEYS)}) "
            f"but {', '.join(members) or 'nothing'}: not a reference batch"
        )
    return (ImageBatch(path) if IMAGES_KEY in members else None), _read_stats(path, members)


def _read_stats(path: str | os.PathLike, members: list[str]) -> dict[str, np.ndarray] | None:
    present = [k for k in STAT_KEYS if k in members]
    if not present:
        return None
    if len(present) < len(STAT_KEYS):
        missing = sorted(set(STAT_KEYS) - set(present))
        raise NpzError(f"{path} has {', '.join(present)} but not {', '.join(missing)}")
    with np.load(path) as z:
        stats = {k: np.asarray(z[k], np.float64) for k in STAT_KEYS}
    for prefix, dim in (("", POOL_DIM), ("_s", SPATIAL_DIM)):
        mu, sigma = stats[f"mu{prefix}"], stats[f"sigma{prefix}"]
        if mu.shape != (dim,) or sigma.shape != (dim, dim):
            raise NpzError(
                f"{path}: mu{prefix} {mu.shape} and sigma{prefix} {sigma.shape}; "
                f"expected ({dim},) and ({dim}, {dim})"
            )
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise NpzError(f"{path}: mu{prefix} / sigma{prefix} hold NaN or infinite values")
    return stats
