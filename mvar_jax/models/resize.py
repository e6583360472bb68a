"""PyTorch-compatible image resizes for NHWC arrays.

The official tokenizer moves feature maps between scales with
``F.interpolate(mode="bicubic")`` and ``F.interpolate(mode="area")``.
``jax.image.resize`` follows other conventions (antialiased kernels, other
weights) and can differ by 0.25 on unit-scale inputs, which changes tokens. Both
resizes here are separable, so each is two small matmuls with interpolation
matrices built once per (in, out) pair in numpy: exact, cheap, and jittable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Keys' cubic convolution coefficient used by PyTorch.
_CUBIC_A = -0.75


def _check_sizes(in_size: int, out_size: int) -> None:
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")


def _cubic_kernel(d: np.ndarray) -> np.ndarray:
    """Keys' cubic kernel at distances ``0 <= d < 2``."""
    a = _CUBIC_A
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, far)


@functools.cache
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` float32 matrix of bicubic resampling along one axis.

    Mirrors PyTorch (align_corners=False, no antialias): output i samples the
    source coordinate ``(i + 0.5) * in / out - 0.5``, and taps beyond the border
    read the edge sample. The coordinate is rounded to float32 as PyTorch rounds
    it, since its fraction sets the weights; the weights are then evaluated in
    float64 (PyTorch's float32 ones carry ~1e-7 of rounding noise that depends on
    how it was compiled, so no closed form matches them bit for bit).
    """
    _check_sizes(in_size, out_size)
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    src = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32).astype(np.float64)
    base = np.floor(src)
    t = (src - base)[:, None]
    weights = _cubic_kernel(np.abs(t - np.arange(-1, 3)))  # (out, 4)
    taps = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size)[:, None], taps), weights)
    return matrix.astype(np.float32)


@functools.cache
def area_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` float32 matrix of adaptive average pooling along one axis.

    Output i averages inputs ``[floor(i * in / out), ceil((i + 1) * in / out))``;
    the windows overlap when the sizes do not divide (e.g. 16 -> 13).
    """
    _check_sizes(in_size, out_size)
    matrix = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        stop = -((-(i + 1) * in_size) // out_size)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def _resize_separable(x_BHWC: jax.Array, size: tuple[int, int], matrix_fn) -> jax.Array:
    if x_BHWC.ndim != 4:
        raise ValueError(f"expected an NHWC array, got shape {x_BHWC.shape}")
    out_h, out_w = size
    _, in_h, in_w, _ = x_BHWC.shape
    # HIGHEST: the resizes feed nearest-code searches, so they must stay float32-exact
    # whatever the default matmul precision of the backend.
    hi = jax.lax.Precision.HIGHEST
    mat_w = jnp.asarray(matrix_fn(in_w, out_w), x_BHWC.dtype)
    mat_h = jnp.asarray(matrix_fn(in_h, out_h), x_BHWC.dtype)
    # Width first, then height: PyTorch's bicubic kernel sums in that order.
    x = jnp.einsum("bhwc,ow->bhoc", x_BHWC, mat_w, precision=hi)
    return jnp.einsum("bhwc,oh->bowc", x, mat_h, precision=hi)


def resize_bicubic(x_BHWC: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size, mode="bicubic", align_corners=False)`` on NHWC."""
    return _resize_separable(x_BHWC, size, bicubic_matrix)


def resize_area(x_BHWC: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size, mode="area")`` (adaptive average pooling) on NHWC."""
    return _resize_separable(x_BHWC, size, area_matrix)
