"""``mvar_jax.images``: the uint8 conversion against analytic values and the official expression."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mvar_jax import images


def test_to_uint8_scales_truncates_and_clips():
    k = np.arange(256)
    # k / 255 comes back as k: uint8 -> [0, 1] -> uint8 is lossless.
    np.testing.assert_array_equal(images.to_uint8(k.astype(np.float32) / 255), k)
    # Anything inside a level truncates to it; 0.5 is 127.5 levels.
    np.testing.assert_array_equal(images.to_uint8((k[:-1] + 0.99) / 255), k[:-1])
    assert images.to_uint8(np.float32(0.5)) == 127
    np.testing.assert_array_equal(images.to_uint8(np.array([-0.3, -0.0, 1.0, 1.7])), [0, 0, 255, 255])
    assert images.to_uint8(np.zeros((2, 3, 4, 3))).dtype == np.uint8


def test_to_uint8_is_the_official_evaluation_conversion():
    """``img.mul(255).clamp(0, 255).byte()``, as the official MVAR evaluation writes its PNGs."""
    x = np.random.default_rng(0).uniform(-0.1, 1.1, (4, 8, 8, 3)).astype(np.float32)
    official = torch.from_numpy(x).mul(255).clamp(0, 255).byte().numpy()
    np.testing.assert_array_equal(images.to_uint8(x), official)


def test_image_grid_tiles_row_major():
    tiles = np.stack([np.full((2, 3, 3), v, np.float32) for v in (0.0, 0.5, 1.0)])
    grid = images.image_grid(tiles, columns=2)
    assert grid.shape == (4, 6, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[:2, :3], 0)
    np.testing.assert_array_equal(grid[:2, 3:], 127)
    np.testing.assert_array_equal(grid[2:, :3], 255)
    np.testing.assert_array_equal(grid[2:, 3:], 0)  # padding
    np.testing.assert_array_equal(images.image_grid(tiles, 2, pad_value=1.0)[2:, 3:], 255)
    with pytest.raises(ValueError, match="columns"):
        images.image_grid(tiles, columns=0)


def test_labelled_grid_layout():
    x = np.random.default_rng(1).uniform(0, 1, (10, 5, 48, 3)).astype(np.float32)
    grid = np.asarray(images.labelled_grid(x, range(10)))
    cell_h = 5 + images.CAPTION_PX
    assert grid.shape == (2 * cell_h, images.GRID_COLUMNS * 48, 3)
    # Each image sits at the top of its cell, pixel for pixel; empty cells are white.
    for i in range(10):
        r, c = divmod(i, images.GRID_COLUMNS)
        np.testing.assert_array_equal(
            grid[r * cell_h : r * cell_h + 5, c * 48 : (c + 1) * 48], images.to_uint8(x[i])
        )
    np.testing.assert_array_equal(grid[cell_h:, 2 * 48 :], 255)
    caption = grid[5:cell_h, :48]
    assert (caption < 128).any() and (caption == 255).mean() > 0.5  # dark text on white
