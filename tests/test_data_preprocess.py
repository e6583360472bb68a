"""Per-image preprocessing against torch ops and analytic cases."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch

from mvar_jax.data import preprocess
from mvar_jax.data.preprocess import Preprocess


def _pil(arr):
    return PIL.Image.fromarray(np.asarray(arr, np.uint8))


def test_to_pm1_is_bit_identical_to_torch_to_tensor_then_x_plus_x_minus_1():
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    ref = torch.from_numpy(u8).permute(2, 0, 1).float().div(255)  # what ToTensor() computes
    ref = ref.add(ref).add_(-1).permute(1, 2, 0).numpy()
    out = preprocess.to_pm1(u8)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, ref)
    assert out.min() == -1.0 and out.max() == 1.0
    on_device = jax.jit(preprocess.to_pm1)(jnp.asarray(u8))  # where the training step runs it
    assert on_device.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(on_device), ref)


@pytest.mark.parametrize(
    "wh, size, expected",
    [((300, 200), 72, (108, 72)), ((200, 301), 72, (72, 108)), ((50, 50), 18, (18, 18))],
)
def test_resize_shorter_side_truncates_the_longer_side_like_torchvision(wh, size, expected):
    img = _pil(np.zeros((wh[1], wh[0], 3)))
    assert preprocess.resize_shorter_side(img, size, PIL.Image.LANCZOS).size == expected


def test_eval_centre_crop_rounds_half_to_even():
    # The shorter side (11) already equals round(11 / 8 * 8), so the resize is the
    # identity and torchvision's offsets round(x / 2) show: 5 / 2 -> 2 and 3 / 2 -> 2.
    arr = np.random.default_rng(0).integers(0, 256, (13, 11, 3), dtype=np.uint8)
    out = Preprocess(8, mid_reso=11 / 8)(_pil(arr), rng=None)
    assert out.dtype == np.uint8  # images cross to the device as bytes
    np.testing.assert_array_equal(out, arr[2:10, 2:10])


def test_random_crop_is_a_window_of_the_resized_image_and_varies():
    arr = np.random.default_rng(1).integers(0, 256, (12, 11, 3), dtype=np.uint8)
    windows = {(top, left): arr[top : top + 8, left : left + 8] for top in range(5) for left in range(4)}
    seen = set()
    for seed in range(30):
        out = Preprocess(8, mid_reso=11 / 8)(_pil(arr), rng=np.random.default_rng(seed))
        seen |= {k for k, w in windows.items() if np.array_equal(out, w)}
    assert len(seen) > 5  # many different offsets, each an exact window


def test_adm_crop_box_halves_then_centres():
    # 2x2 constant blocks survive box-halving exactly; after it the shorter side
    # is the target, so bicubic is the identity and only the centring remains,
    # which floors: (11 - 8) // 2 = 1.
    blocks = np.random.default_rng(2).integers(0, 256, (8, 11, 3), dtype=np.uint8)
    arr = blocks.repeat(2, axis=0).repeat(2, axis=1)  # (16, 22)
    out = Preprocess(8, crop="adm_center_crop")(_pil(arr), rng=None)
    np.testing.assert_array_equal(out, blocks[:, 1:9])


def test_hflip_flips_about_half_the_time_and_never_in_eval():
    arr = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    prep = Preprocess(8, crop="adm_center_crop", hflip=True)
    plain, mirrored = arr, arr[:, ::-1]
    outs = [prep(_pil(arr), np.random.default_rng(s)) for s in range(40)]
    flips = [np.array_equal(o, mirrored) for o in outs]
    assert all(f or np.array_equal(o, plain) for f, o in zip(flips, outs, strict=True))
    assert 8 < sum(flips) < 32
    np.testing.assert_array_equal(prep(_pil(arr), None), plain)


def test_decode_rgb_converts_and_rejects_garbage():
    buf = io.BytesIO()
    PIL.Image.new("L", (5, 4), 77).save(buf, format="PNG")
    img = preprocess.decode_rgb(buf.getvalue())
    assert img.mode == "RGB" and np.asarray(img).shape == (4, 5, 3)
    with pytest.raises(preprocess.BadImageError):
        preprocess.decode_rgb(b"not an image")
    with pytest.raises(preprocess.BadImageError):
        preprocess.decode_rgb(buf.getvalue()[:30])  # truncated


def test_unknown_crop_is_rejected():
    with pytest.raises(ValueError, match="crop="):
        Preprocess(8, crop="random")
