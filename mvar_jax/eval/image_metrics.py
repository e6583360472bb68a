"""Image comparisons for tokenizer training: reconstruction losses, PSNR, SSIM.

Images are NHWC ``(B, H, W, 3)`` in the model's range [-1, 1] (clamp a raw
decoder output first when it feeds a metric). The losses are means over every
element, as ``F.l1_loss`` / ``F.mse_loss``; the metrics are per image ``(B,)``
and computed as on [0, 1] images, the usual convention for reporting them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# SSIM of Wang et al. (2004): Gaussian window 11 x 11, sigma 1.5, K1 0.01, K2 0.03.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def l1_loss(rec_BHW3: jax.Array, target_BHW3: jax.Array) -> jax.Array:
    """Mean absolute error, ()."""
    return jnp.mean(jnp.abs(rec_BHW3 - target_BHW3))


def l2_loss(rec_BHW3: jax.Array, target_BHW3: jax.Array) -> jax.Array:
    """Mean squared error, (); the official tokenizer's reconstruction loss."""
    return jnp.mean(jnp.square(rec_BHW3 - target_BHW3))


def _check_pair(a: jax.Array, b: jax.Array) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two NHWC image batches of one shape, got {a.shape} and {b.shape}")


def psnr(a_BHW3: jax.Array, b_BHW3: jax.Array, *, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB per image, ``(B,)``; inf for identical images.

    ``data_range`` is the span of the pixel values: 2 for the models' [-1, 1]
    (the same value as PSNR on those images mapped to [0, 1]), 1 for [0, 1].
    """
    _check_pair(a_BHW3, b_BHW3)
    mse_B = jnp.mean(jnp.square(a_BHW3 - b_BHW3), axis=(1, 2, 3))
    return 10 * jnp.log10(data_range**2 / mse_B)


def _gaussian_window() -> np.ndarray:
    x = np.arange(SSIM_WINDOW) - (SSIM_WINDOW - 1) / 2
    g = np.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    g /= g.sum()
    return np.outer(g, g).astype(np.float32)


def _local_mean(x_NHW1: jax.Array) -> jax.Array:
    """Gaussian-weighted mean over each full 11 x 11 window ('valid': no padding)."""
    window = jnp.asarray(_gaussian_window())[:, :, None, None]
    return jax.lax.conv_general_dilated(
        x_NHW1,
        window,
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )


def ssim(a_BHW3: jax.Array, b_BHW3: jax.Array) -> jax.Array:
    """Structural similarity per image, ``(B,)``: the mean SSIM map over positions and channels.

    Each channel separately, on the images mapped to [0, 1] (dynamic range 1),
    with Gaussian local statistics over the windows that fit inside the image.
    """
    _check_pair(a_BHW3, b_BHW3)
    B, H, W, C = a_BHW3.shape
    if min(H, W) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} px a side, got {H}x{W}")

    def planes(img_BHWC):  # (B * C, H, W, 1) in [0, 1], one plane per channel
        img01 = (img_BHWC.astype(jnp.float32) + 1) / 2
        return img01.transpose(0, 3, 1, 2).reshape(B * C, H, W, 1)

    x, y = planes(a_BHW3), planes(b_BHW3)
    mu_x, mu_y = _local_mean(x), _local_mean(y)
    var_x = _local_mean(x * x) - mu_x**2
    var_y = _local_mean(y * y) - mu_y**2
    cov_xy = _local_mean(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(B, -1).mean(axis=1)
