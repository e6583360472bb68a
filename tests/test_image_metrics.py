"""Reconstruction losses, PSNR and SSIM against TensorFlow's tf.image and analytic cases."""

from __future__ import annotations

import numpy as np
import pytest

from mvar_jax.eval import image_metrics


def _images(seed: int, shape=(3, 24, 20, 3)) -> tuple[np.ndarray, np.ndarray]:
    """A smooth image batch in [-1, 1] and a noisy, slightly shifted copy."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : shape[1], 0 : shape[2]] / 8.0
    base = np.stack([np.sin(x + k + rng.uniform(0, 3)) * np.cos(y - k) for k in range(shape[0] * 3)])
    a = 0.8 * base.reshape(shape[0], 3, *shape[1:3]).transpose(0, 2, 3, 1)
    b = np.clip(a + 0.15 * rng.standard_normal(shape) + 0.05, -1, 1)
    return a.astype(np.float32), b.astype(np.float32)


def test_losses_are_means_of_abs_and_squared_error():
    a, b = _images(0)
    np.testing.assert_allclose(image_metrics.l1_loss(a, b), np.abs(a - b).mean(), rtol=1e-6)
    np.testing.assert_allclose(image_metrics.l2_loss(a, b), ((a - b) ** 2).mean(), rtol=1e-6)


def test_psnr_and_ssim_match_tf_image_on_zero_one_images():
    tf = pytest.importorskip("tensorflow")
    for seed in range(3):
        a, b = _images(seed)
        a01, b01 = (a + 1) / 2, (b + 1) / 2
        want_psnr = tf.image.psnr(a01, b01, max_val=1.0).numpy()
        want_ssim = tf.image.ssim(
            a01, b01, max_val=1.0, filter_size=11, filter_sigma=1.5, k1=0.01, k2=0.03
        ).numpy()
        np.testing.assert_allclose(image_metrics.psnr(a, b), want_psnr, rtol=1e-5)
        np.testing.assert_allclose(image_metrics.ssim(a, b), want_ssim, rtol=1e-5, atol=1e-6)
        assert 0.2 < want_ssim.min() and want_ssim.max() < 0.95  # a case far from both ends


def test_analytic_cases():
    a, _ = _images(1)
    np.testing.assert_allclose(image_metrics.ssim(a, a), 1.0, rtol=1e-6)
    assert np.all(np.isinf(image_metrics.psnr(a, a)))
    # A constant offset d in [-1, 1] is d / 2 on [0, 1]: PSNR = 10 log10(4 / d^2).
    d = 0.1
    np.testing.assert_allclose(image_metrics.psnr(a * 0.5, a * 0.5 + d), 10 * np.log10(4 / d**2), rtol=1e-5)
    # Flat images u and v on [0, 1]: only the luminance term, (2uv + C1) / (u^2 + v^2 + C1).
    u, v = 0.3, 0.45
    flat = np.full((2, 16, 16, 3), 2 * u - 1, np.float32)
    c1 = 0.01**2
    np.testing.assert_allclose(
        image_metrics.ssim(flat, flat + 2 * (v - u)), (2 * u * v + c1) / (u**2 + v**2 + c1), rtol=1e-5
    )


def test_bad_shapes_are_named():
    a, b = _images(2)
    with pytest.raises(ValueError, match="one shape"):
        image_metrics.psnr(a, b[:, :-1])
    with pytest.raises(ValueError, match="at least 11 px"):
        image_metrics.ssim(a[:, :10], b[:, :10])


def test_psnr_of_images_in_0_1():
    ref = np.full((2, 4, 4, 3), 0.5)
    img = ref + np.array([0.1, 0.01])[:, None, None, None]  # MSE 1e-2 and 1e-4
    np.testing.assert_allclose(image_metrics.psnr(img, ref, data_range=1.0), [20.0, 40.0])
