"""Inception-v3 as OpenAI's guided-diffusion evaluator runs it: the 2015 TensorFlow graph, in Flax.

The papers' FID, sFID, Inception Score and precision/recall come from that evaluator, which
imports ``classify_image_graph_def.pb`` (inception-2015-12-05) and feeds it NHWC images in
[0, 255] of any size. The graph then

* resizes them to 299x299 with TensorFlow 1's bilinear resize (``align_corners=False`` and no
  half-pixel centres: output pixel ``i`` samples input ``i * in / out``; PyTorch's and
  ``jax.image.resize``'s bilinear sample ``(i + 0.5) * in / out - 0.5`` and give other pixels);
* maps them to [-1, 1] by ``(x - 128) / 128``;
* runs Inception-v3 with batch norm ``eps = 0.001``, average pools that leave the padding out of
  the count (TensorFlow's ``SAME`` pooling, ``count_include_pad=False`` in PyTorch terms), and a
  *max* pool in the last block's pool branch where the paper has an average;
* pads its convs and pools as TensorFlow does (``SAME`` or ``VALID``, kept by name here).
  Every ``SAME`` op of the graph has stride 1 and an odd window, so TensorFlow's asymmetric
  padding (the extra row at the bottom for even totals) never arises; every stride-2 op is
  ``VALID``.

The outputs are what the evaluator reads: ``pool_3`` (2048), the spatial features of sFID (the
op ``mixed_6/conv``: the ReLU output of the 1x1 branch of the fourth 17x17 block, Mixed_6d in
torchvision's names, of which the evaluator keeps the first 7 channels and flattens the
``(17, 17, 7)`` map in that order), and the logits of its Inception Score: ``pool_3`` times the
1008-class softmax weights, without the bias (the evaluator multiplies by the weights of
``softmax/logits/MatMul`` alone).

Parameters keep the PyTorch module names of pytorch-fid's and torch-fidelity's ports
(``Mixed_6d/branch1x1``...), so that ``weights.inception`` maps their ``pt_inception-2015-12-05``
state dict by name; each batch norm is folded into a per-channel ``scale`` and ``bias``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299  # The graph's resize target.
NUM_CLASSES = 1008  # The 2015 graph's softmax: 1000 ImageNet classes and 8 unused ones.
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # Of mixed_6/conv's 192, the evaluator keeps the first 7.
SPATIAL_SIZE = 17  # mixed_6/conv's map at 299 px input.
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
BN_EPS = 0.001
# Float32 products everywhere: on GPUs the default would round conv inputs to TF32 (~1e-3).
_PRECISION = jax.lax.Precision.HIGHEST


class InceptionOutputs(NamedTuple):
    """One batch's features, float32."""

    pool_BF: jax.Array  # (B, 2048): pool_3, FID and precision/recall
    spatial_BS: jax.Array  # (B, 2023): mixed_6/conv[..., :7] flattened in (h, w, c) order, sFID
    logits_BK: jax.Array  # (B, 1008): pool_3 @ softmax weights, no bias, the Inception Score


@functools.cache
def _tf1_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis: the two input rows each output row reads, and the weight of the second.

    TensorFlow 1 computes the source coordinate in float32, ``i * float32(in / out)``, and
    truncates it; the last row repeats at the border.
    """
    src = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
    lo = src.astype(np.int32)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


def tf1_resize_bilinear(x_BHWC: jax.Array, size: tuple[int, int]) -> jax.Array:
    """TensorFlow 1's ``resize_bilinear(align_corners=False)`` (no half-pixel centres), float32.

    Interpolates along the width first, then the height, each as ``a + (b - a) * t``, the order
    and form of TensorFlow's kernel: results match it to one float32 rounding (XLA may fuse the
    multiply and add; 5e-5 at most on [0, 255]).
    """
    x = x_BHWC.astype(jnp.float32)
    y_lo, y_hi, dy = _tf1_bilinear_taps(x.shape[1], size[0])
    x_lo, x_hi, dx = _tf1_bilinear_taps(x.shape[2], size[1])
    dx = dx[None, None, :, None]
    top, bottom = x[:, y_lo], x[:, y_hi]
    top = top[:, :, x_lo] + (top[:, :, x_hi] - top[:, :, x_lo]) * dx
    bottom = bottom[:, :, x_lo] + (bottom[:, :, x_hi] - bottom[:, :, x_lo]) * dx
    return top + (bottom - top) * dy[None, :, None, None]


class ConvBN(nn.Module):
    """Conv (no bias), batch norm folded to ``scale`` and ``bias``, ReLU: the graph's conv unit."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.features,
            self.kernel_size,
            self.strides,
            padding=self.padding,
            use_bias=False,
            precision=_PRECISION,
            name="conv",
        )(x_BHWC)
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return nn.relu(x * scale + bias)


def _avg_pool_same(x_BHWC: jax.Array) -> jax.Array:
    """3x3 stride-1 ``SAME`` average pool that divides by the pixels inside the image."""
    return nn.avg_pool(x_BHWC, (3, 3), (1, 1), padding="SAME", count_include_pad=False)


def _max_pool_valid(x_BHWC: jax.Array) -> jax.Array:
    return nn.max_pool(x_BHWC, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    """35x35 block (mixed .. mixed_2): 1x1, 5x5, double 3x3 and pool branches."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = ConvBN(64, (1, 1), name="branch1x1")(x)
        b5 = ConvBN(48, (1, 1), name="branch5x5_1")(x)
        b5 = ConvBN(64, (5, 5), name="branch5x5_2")(b5)
        b3 = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = ConvBN(96, (3, 3), name="branch3x3dbl_2")(b3)
        b3 = ConvBN(96, (3, 3), name="branch3x3dbl_3")(b3)
        bp = ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
    """35 -> 17 reduction (mixed_3)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = ConvBN(384, (3, 3), 2, "VALID", name="branch3x3")(x)
        bd = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = ConvBN(96, (3, 3), name="branch3x3dbl_2")(bd)
        bd = ConvBN(96, (3, 3), 2, "VALID", name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], -1)


class InceptionC(nn.Module):
    """17x17 block (mixed_4 .. mixed_7) with factorised 7x7 convs; also returns its 1x1 branch."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        c7 = self.channels_7x7
        b1 = ConvBN(192, (1, 1), name="branch1x1")(x)
        b7 = ConvBN(c7, (1, 1), name="branch7x7_1")(x)
        b7 = ConvBN(c7, (1, 7), name="branch7x7_2")(b7)
        b7 = ConvBN(192, (7, 1), name="branch7x7_3")(b7)
        bd = ConvBN(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = ConvBN(c7, (7, 1), name="branch7x7dbl_2")(bd)
        bd = ConvBN(c7, (1, 7), name="branch7x7dbl_3")(bd)
        bd = ConvBN(c7, (7, 1), name="branch7x7dbl_4")(bd)
        bd = ConvBN(192, (1, 7), name="branch7x7dbl_5")(bd)
        bp = ConvBN(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], -1), b1


class InceptionD(nn.Module):
    """17 -> 8 reduction (mixed_8)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = ConvBN(192, (1, 1), name="branch3x3_1")(x)
        b3 = ConvBN(320, (3, 3), 2, "VALID", name="branch3x3_2")(b3)
        b7 = ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = ConvBN(192, (1, 7), name="branch7x7x3_2")(b7)
        b7 = ConvBN(192, (7, 1), name="branch7x7x3_3")(b7)
        b7 = ConvBN(192, (3, 3), 2, "VALID", name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], -1)


def _split_3x3(x: jax.Array, name: str) -> jax.Array:
    """A 1x3 and a 3x1 conv side by side (``<name>a``, ``<name>b``), 768 channels; called inside
    a compact module, which owns the convs."""
    return jnp.concatenate(
        [ConvBN(384, (1, 3), name=f"{name}a")(x), ConvBN(384, (3, 1), name=f"{name}b")(x)], -1
    )


class InceptionE(nn.Module):
    """8x8 block (mixed_9, mixed_10); ``max_pool``: the graph's max pool in mixed_10."""

    max_pool: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = ConvBN(320, (1, 1), name="branch1x1")(x)
        b3 = ConvBN(384, (1, 1), name="branch3x3_1")(x)
        b3 = _split_3x3(b3, "branch3x3_2")
        bd = ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = ConvBN(384, (3, 3), name="branch3x3dbl_2")(bd)
        bd = _split_3x3(bd, "branch3x3dbl_3")
        pooled = nn.max_pool(x, (3, 3), (1, 1), padding="SAME") if self.max_pool else _avg_pool_same(x)
        bp = ConvBN(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


class InceptionV3(nn.Module):
    """Images ``(B, H, W, 3)`` in [0, 255] (uint8 or float, any size) -> ``InceptionOutputs``."""

    @nn.compact
    def __call__(self, images_BHW3: jax.Array) -> InceptionOutputs:
        x = tf1_resize_bilinear(images_BHW3, (INPUT_SIZE, INPUT_SIZE))
        x = (x - 128.0) / 128.0
        x = ConvBN(32, (3, 3), 2, "VALID", name="Conv2d_1a_3x3")(x)  # 149
        x = ConvBN(32, (3, 3), padding="VALID", name="Conv2d_2a_3x3")(x)  # 147
        x = ConvBN(64, (3, 3), name="Conv2d_2b_3x3")(x)
        x = _max_pool_valid(x)  # 73
        x = ConvBN(80, (1, 1), padding="VALID", name="Conv2d_3b_1x1")(x)
        x = ConvBN(192, (3, 3), padding="VALID", name="Conv2d_4a_3x3")(x)  # 71
        x = _max_pool_valid(x)  # 35
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)  # 17
        x, _ = InceptionC(128, name="Mixed_6b")(x)
        x, _ = InceptionC(160, name="Mixed_6c")(x)
        x, mixed_6_conv = InceptionC(160, name="Mixed_6d")(x)
        x, _ = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)  # 8
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        pool_BF = jnp.mean(x, axis=(1, 2))
        logits_BK = nn.Dense(NUM_CLASSES, use_bias=False, precision=_PRECISION, name="fc")(pool_BF)
        spatial_BS = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        return InceptionOutputs(pool_BF, spatial_BS, logits_BK)


@functools.cache
def param_shapes() -> dict:
    """The ``{'params': ...}`` tree of ``InceptionV3`` as ``ShapeDtypeStruct``s (nothing computed;
    traced once per process, callers must not modify it)."""
    images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), images)
