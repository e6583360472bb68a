"""The resizes against torch.nn.functional.interpolate on every pair of scale sizes."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mvar_jax.models.resize import area_matrix, bicubic_matrix, resize_area, resize_bicubic

SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PAIRS = list(itertools.product(SIZES, SIZES))


def _torch_resize(x_BHWC: np.ndarray, size, mode: str) -> np.ndarray:
    x = torch.from_numpy(x_BHWC).permute(0, 3, 1, 2)
    kwargs = {"align_corners": False} if mode == "bicubic" else {}
    return F.interpolate(x, size=size, mode=mode, **kwargs).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("mode, resize", [("bicubic", resize_bicubic), ("area", resize_area)])
def test_matches_torch_on_every_scale_pair(mode, resize):
    rng = np.random.default_rng(0)
    # Rows resize in -> out and columns out -> in: every ordered pair is seen on
    # both axes, and an axis mix-up changes the shape.
    jobs = [((i, o), (o, i)) for i, o in PAIRS]
    xs = [rng.standard_normal((2, *src, 3)).astype(np.float32) for src, _ in jobs]
    # One jit over all pairs: a single compilation instead of one per shape.
    gots = jax.jit(lambda xs: [resize(x, dst) for x, (_, dst) in zip(xs, jobs)])(xs)
    worst = 0.0
    for x, (src, dst), got in zip(xs, jobs, gots):
        want = _torch_resize(x, dst, mode)
        assert got.shape == want.shape
        err = float(np.max(np.abs(np.asarray(got) - want)))
        assert err < 1e-5, f"{mode} {src} -> {dst}: max abs error {err}"
        worst = max(worst, err)
    print(f"{mode}: worst max abs error over {len(PAIRS)} pairs: {worst:.2e}")


def test_resize_rows_are_partitions_of_unity():
    for in_size, out_size in PAIRS:
        np.testing.assert_allclose(bicubic_matrix(in_size, out_size).sum(1), 1.0, atol=1e-6)
        np.testing.assert_allclose(area_matrix(in_size, out_size).sum(1), 1.0, atol=1e-6)


def test_area_windows_overlap_when_sizes_do_not_divide():
    # 16 -> 13: output 1 averages inputs [1, 3), output 2 averages [2, 4).
    m = area_matrix(16, 13)
    np.testing.assert_allclose(m[1, 1:3], 0.5)
    np.testing.assert_allclose(m[2, 2:4], 0.5)
    assert m[1, 2] > 0 and m[2, 2] > 0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NHWC"):
        resize_area(np.zeros((4, 4, 3), np.float32), (2, 2))
    with pytest.raises(ValueError, match="positive"):
        resize_bicubic(np.zeros((1, 4, 4, 3), np.float32), (0, 2))
