"""LPIPS perceptual distance (VGG16 trunk, v0.1) in Flax; ``weights.lpips`` reads its PyTorch files.

The distance is the ``lpips`` package's ``LPIPS(net='vgg', version='0.1')`` in eval
mode: scale the input, run VGG16's conv trunk, take the five ReLU outputs relu1_2,
relu2_2, relu3_3, relu4_3 and relu5_3, normalise each feature vector to unit length,
weight the squared difference per channel (learned 1x1 layers, no bias; their
training-time dropout is off), average over space and sum over the five layers.

Nothing is downloaded. The weights come from two files the user supplies:
  * ``vgg_path``: torchvision's ``vgg16`` state dict (``features.N.weight/bias``; the
    ``classifier.*`` entries are ignored), e.g. ``vgg16-397923af.pth`` from
    https://download.pytorch.org/models/ or ``torchvision.models.vgg16(weights=
    "IMAGENET1K_V1").state_dict()`` saved with ``torch.save``;
  * ``lin_path``: the linear-layer weights ``weights/v0.1/vgg.pth`` shipped inside the
    ``lpips`` PyPI package (keys ``lin0.model.1.weight`` .. ``lin4.model.1.weight``).

A trainer calls ``weights.lpips.check_lpips_files`` while validating its config (so that a missing
file stops the run before anything else starts), then ``weights.lpips.load_lpips`` once, and uses
``LPIPS().apply({'params': params}, x0, x1)`` with the params held constant.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# VGG16 conv widths per block; a 2x2 max pool precedes every block but the first.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# The lpips package's input scaling (its ScalingLayer) for images in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_NORM_EPS = 1e-10  # Added to the feature-vector length, as lpips.normalize_tensor does.


def conv_names() -> list[str]:
    """Flax names of the 13 VGG16 convs: conv1_1 .. conv5_3."""
    return [f"conv{b + 1}_{i + 1}" for b, widths in enumerate(VGG16_BLOCKS) for i in range(len(widths))]


def torchvision_index(name: str) -> int:
    """Position of conv ``name`` in torchvision's ``vgg16().features`` (conv, ReLU, ..., pool)."""
    index = 0
    for b, widths in enumerate(VGG16_BLOCKS):
        index += b > 0  # The max pool that opens the block.
        for i in range(len(widths)):
            if name == f"conv{b + 1}_{i + 1}":
                return index
            index += 2  # The conv and its ReLU.
    raise KeyError(f"not a VGG16 conv: {name!r}")


class VGG16Features(nn.Module):
    """VGG16's conv trunk: image ``(B, H, W, 3)`` -> the 5 block outputs (relu1_2 .. relu5_3).

    Block ``b`` output has shape ``(B, H / 2**b, W / 2**b, width_b)`` (floored by the pools).
    """

    @nn.compact
    def __call__(self, x_BHW3: jax.Array) -> list[jax.Array]:
        outs, h = [], x_BHW3
        for b, widths in enumerate(VGG16_BLOCKS):
            if b:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            for i, width in enumerate(widths):
                h = nn.relu(nn.Conv(width, (3, 3), padding=1, name=f"conv{b + 1}_{i + 1}")(h))
            outs.append(h)
        return outs


def unit_normalize(x_BHWC: jax.Array) -> jax.Array:
    """Each feature vector divided by (its length + 1e-10), as lpips does.

    The length uses a guarded square root so that an all-zero vector (a position
    where every ReLU is off) has a zero, not NaN, gradient; its value is unchanged.
    """
    sq = jnp.sum(jnp.square(x_BHWC), axis=-1, keepdims=True)
    length = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
    return x_BHWC / (length + _NORM_EPS)


class LPIPS(nn.Module):
    """LPIPS distance between two image batches ``(B, H, W, 3)`` in [-1, 1] -> ``(B,)``.

    Images are NHWC with values in [-1, 1] (the ``lpips`` package's convention without
    ``normalize=True``); H and W must be at least 16 so that relu5_3 is not empty.
    """

    def setup(self):
        self.vgg = VGG16Features()
        self.lins = [nn.Dense(1, use_bias=False, name=f"lin{k}") for k in range(len(VGG16_BLOCKS))]

    def features(self, x_BHW3: jax.Array) -> list[jax.Array]:
        """The 5 VGG16 block outputs of the scaled input (before unit normalisation)."""
        if x_BHW3.ndim != 4 or x_BHW3.shape[-1] != 3:
            raise ValueError(f"LPIPS expects NHWC RGB images (B, H, W, 3), got {x_BHW3.shape}")
        if min(x_BHW3.shape[1:3]) < 16:
            raise ValueError(f"LPIPS needs images of at least 16x16 pixels, got {x_BHW3.shape}")
        shift = jnp.asarray(_SHIFT, x_BHW3.dtype)
        scale = jnp.asarray(_SCALE, x_BHW3.dtype)
        return self.vgg((x_BHW3 - shift) / scale)

    def per_layer(self, x0_BHW3: jax.Array, x1_BHW3: jax.Array) -> list[jax.Array]:
        """The 5 per-layer terms ``(B,)`` whose sum is the distance."""
        if x0_BHW3.shape != x1_BHW3.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {x0_BHW3.shape} vs {x1_BHW3.shape}")
        feats = self.features(jnp.concatenate([x0_BHW3, x1_BHW3]))
        terms = []
        for lin, f in zip(self.lins, feats):
            f0, f1 = jnp.split(unit_normalize(f), 2)
            terms.append(jnp.mean(lin(jnp.square(f0 - f1))[..., 0], axis=(1, 2)))
        return terms

    def __call__(self, x0_BHW3: jax.Array, x1_BHW3: jax.Array) -> jax.Array:
        return sum(self.per_layer(x0_BHW3, x1_BHW3))
