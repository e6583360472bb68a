"""Sampled images ([0, 1] float) to uint8 pixels and grids: the one conversion every output uses.

``to_uint8`` scales by 255, clips and truncates. That is what produced the figures this
project is compared with: the official MVAR evaluation writes each sample as
``img.mul(255).clamp(0, 255).byte()`` before packing the PNGs into the FID ``.npz``, and the
VAR / MVAR / M-VAR demos and the guided-diffusion (ADM) sampler, whose evaluator VAR points
to, truncate the same way. The evaluators themselves take uint8 as given (the ADM evaluator
reads ``arr_0``, torch-fidelity refuses anything but uint8; torchmetrics' ``normalize=True``
also truncates). Rounding (``torchvision.utils.save_image``, DiT's sampler) would brighten
every pixel by half a level against those figures. ``k / 255`` in float32 comes back as
exactly ``k``, so uint8 -> [0, 1] -> uint8 is lossless.

A training grid, a sampled PNG and an FID ``.npz`` of the same images hold the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

GRID_COLUMNS = 8  # images per row of a labelled grid
CAPTION_PX = 14  # height of the caption strip under each image of a labelled grid


def to_uint8(images_01: np.ndarray) -> np.ndarray:
    """Images in [0, 1] (any shape, float) -> uint8 of that shape: ``clip(x * 255)``, truncated."""
    return np.clip(np.asarray(images_01, np.float32) * 255, 0, 255).astype(np.uint8)


def from_uint8(images_u8: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1] (``k / 255``): the inverse of ``to_uint8``."""
    return np.asarray(images_u8).astype(np.float32) / 255.0


def image_grid(images_NHW3: np.ndarray, columns: int, pad_value: float = 0.0) -> np.ndarray:
    """Images in [0, 1] tiled row-major into one uint8 ``(rows * H, columns * W, 3)`` image.

    Cells after the last image are ``pad_value`` (in [0, 1]).
    """
    N, H, W, _ = images_NHW3.shape
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    rows = -(-N // columns)
    padded = np.full((rows * columns, H, W, 3), pad_value, np.float32)
    padded[:N] = images_NHW3
    grid = padded.reshape(rows, columns, H, W, 3).transpose(0, 2, 1, 3, 4)
    return to_uint8(grid.reshape(rows * H, columns * W, 3))


def labelled_grid(images_NHW3: np.ndarray, labels_N: Sequence[int]) -> Image.Image:
    """Images in rows of up to ``GRID_COLUMNS`` on white, ``class <label>`` written under each."""
    N = len(images_NHW3)
    with_strip = np.pad(
        np.asarray(images_NHW3, np.float32), ((0, 0), (0, CAPTION_PX), (0, 0), (0, 0)), constant_values=1.0
    )
    columns = min(N, GRID_COLUMNS)
    grid = Image.fromarray(image_grid(with_strip, columns, pad_value=1.0))
    draw = ImageDraw.Draw(grid)
    _, H, W, _ = with_strip.shape
    for i, label in enumerate(labels_N):
        x, y = (i % columns) * W, (i // columns) * H
        draw.text((x + 2, y + H - CAPTION_PX + 1), f"class {label}", fill="black")
    return grid
