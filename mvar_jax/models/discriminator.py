"""PatchGAN discriminator and the VQGAN adversarial loss terms (hinge/vanilla, adaptive weight).

The discriminator is VQGAN's (taming-transformers ``NLayerDiscriminator``, from
pix2pix): 4x4 convs, ``n_layers`` of them with stride 2, then one with stride 1, each
but the first followed by a norm and LeakyReLU(0.2), and a final 4x4 conv to one logit
per patch. A 256 px image gives 30x30 logits, a 64 px one 6x6.

The norm: taming uses BatchNorm2d and only ever trains it in training mode, i.e. it
normalises with the statistics of the batch at hand; its running averages serve only
eval-mode logging. ``BatchStatNorm`` is exactly that training-mode computation and
keeps no running averages, so the discriminator is a pure function of (params, batch)
with no ``batch_stats`` collection for the trainer to thread, checkpoint or sync.
Two consequences the trainer must respect:
  * logits depend on the whole batch, so real and fake images go through separate
    calls (as in taming); concatenating them would mix their statistics;
  * under ``jit`` with the batch sharded over devices the mean and variance are taken
    over the global batch (like SyncBatchNorm), whereas taming under DDP normalises per
    GPU; the result therefore does not depend on the device count.

Images are NHWC; the discriminator does not care about their range (the trainer feeds
images in [-1, 1], as the tokenizer sees them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

_KERNEL = 4
_INIT_STD = 0.02  # taming's weights_init: conv kernels N(0, 0.02), norm scales N(1, 0.02).
_ADAPTIVE_EPS = 1e-4
_ADAPTIVE_MAX = 1e4


def _torch_conv_bias_init(fan_in: int) -> Callable:
    """PyTorch's default conv bias init, U(+-1/sqrt(fan_in)): taming's weights_init keeps it."""
    bound = fan_in**-0.5

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _conv_kernel_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """N(0, 0.02), drawn as a flat vector: XLA:CPU takes seconds to compile each 4-d draw."""
    return _INIT_STD * jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def _norm_scale_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return 1.0 + _INIT_STD * jax.random.normal(key, shape, dtype)


class BatchStatNorm(nn.Module):
    """Per-channel normalisation by the current batch's mean and (biased) variance, then affine.

    BatchNorm2d's training-mode forward (eps 1e-5) without running averages.
    """

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        channels = x_BHWC.shape[-1]
        scale = self.param("scale", _norm_scale_init, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        mean = jnp.mean(x_BHWC, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x_BHWC - mean), axis=(0, 1, 2))  # Two-pass, as PyTorch.
        return (x_BHWC - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def patch_grid_size(image_size: int, n_layers: int = 3) -> int:
    """Side of the logit map for ``image_size`` inputs: halved ``n_layers`` times, then minus 2."""
    size = image_size
    for _ in range(n_layers):
        size //= 2  # 4x4 conv, stride 2, padding 1.
    return size - 2  # Two 4x4 convs, stride 1, padding 1.


class PatchDiscriminator(nn.Module):
    """Images ``(B, H, W, C)`` -> patch logits ``(B, h, w, 1)``, h = ``patch_grid_size(H)``.

    Params: ``conv0`` (with bias), ``conv1..conv{n_layers}`` (no bias) each with
    ``norm1..norm{n_layers}``, ``conv_out`` (with bias). Width of ``conv{n}`` is
    ``ndf * min(2**n, 8)``.
    """

    ndf: int = 64
    n_layers: int = 3

    def _conv(self, width: int, stride: int, in_ch: int, use_bias: bool, name: str) -> nn.Conv:
        return nn.Conv(
            width,
            (_KERNEL, _KERNEL),
            strides=stride,
            padding=1,
            use_bias=use_bias,
            kernel_init=_conv_kernel_init,
            bias_init=_torch_conv_bias_init(in_ch * _KERNEL * _KERNEL),
            name=name,
        )

    @nn.compact
    def __call__(self, img_BHWC: jax.Array) -> jax.Array:
        if self.ndf < 1 or self.n_layers < 1:
            raise ValueError(
                f"PatchDiscriminator needs ndf >= 1 and n_layers >= 1, "
                f"got ndf={self.ndf}, n_layers={self.n_layers}"
            )
        if img_BHWC.ndim != 4:
            raise ValueError(f"PatchDiscriminator expects NHWC images, got shape {img_BHWC.shape}")
        if min(patch_grid_size(s, self.n_layers) for s in img_BHWC.shape[1:3]) < 1:
            raise ValueError(
                f"images of shape {img_BHWC.shape} are too small for a {self.n_layers}-layer "
                f"PatchDiscriminator: it needs at least {3 * 2**self.n_layers} pixels a side"
            )
        h = self._conv(self.ndf, 2, img_BHWC.shape[-1], True, "conv0")(img_BHWC)
        h = nn.leaky_relu(h, 0.2)
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            h = self._conv(self.ndf * min(2**n, 8), stride, h.shape[-1], False, f"conv{n}")(h)
            h = nn.leaky_relu(BatchStatNorm(name=f"norm{n}")(h), 0.2)
        return self._conv(1, 1, h.shape[-1], True, "conv_out")(h)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``."""
    real_term = jnp.mean(jax.nn.relu(1.0 - logits_real))
    return 0.5 * (real_term + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Non-saturating BCE: ``0.5 * (mean(softplus(-real)) + mean(softplus(fake)))``."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array, kind: str = "hinge") -> jax.Array:
    """The discriminator's loss of the given ``kind`` ("hinge" or "vanilla")."""
    if kind not in D_LOSSES:
        raise ValueError(f"unknown discriminator loss {kind!r}; expected one of {sorted(D_LOSSES)}")
    return D_LOSSES[kind](logits_real, logits_fake)


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """The tokenizer's adversarial loss ``-mean(D(reconstruction))`` (for either D loss)."""
    return -jnp.mean(logits_fake)


def disc_factor(step: jax.Array | int, start: int) -> jax.Array:
    """0.0 before step ``start``, 1.0 from it on (taming's ``adopt_weight``); traceable in step."""
    return jnp.where(jnp.asarray(step) >= start, 1.0, 0.0).astype(jnp.float32)


def last_layer_grads(
    last_layer: Callable[[jax.Array], jax.Array], kernel: jax.Array, *cotangents: jax.Array
) -> tuple[jax.Array, ...]:
    """Gradients w.r.t. the last layer's kernel of losses given by their output cotangents.

    ``last_layer(W)`` is that layer applied, with kernel ``W``, to its fixed input ``h``
    (e.g. ``lambda w: conv.apply({'params': {'kernel': w, 'bias': b}}, h)`` for the
    decoder's ``conv_out``); each cotangent is ``dL/d(output)`` of one loss, shaped like
    the layer's output (anything after the layer, such as a clip, belongs to the loss).
    Because the output is linear in ``W``, one vjp of this layer alone gives every
    ``dL/dW`` without a backward pass through the rest of the network.
    """
    _, pullback = jax.vjp(last_layer, jax.lax.stop_gradient(kernel))
    return tuple(jax.lax.stop_gradient(pullback(ct)[0]) for ct in cotangents)


def adaptive_weight(rec_grad: jax.Array, gan_grad: jax.Array, disc_weight: float) -> jax.Array:
    """VQGAN's adaptive GAN weight, a constant for the optimiser (stop-gradient).

    ``disc_weight * clip(||rec_grad|| / (||gan_grad|| + 1e-4), 0, 1e4)``, with the
    gradients of the reconstruction loss (pixel + perceptual terms) and of the
    generator loss w.r.t. the decoder's last kernel (Frobenius norms).
    """
    rec_norm = jnp.sqrt(jnp.sum(jnp.square(rec_grad)))
    gan_norm = jnp.sqrt(jnp.sum(jnp.square(gan_grad)))
    ratio = jnp.clip(rec_norm / (gan_norm + _ADAPTIVE_EPS), 0.0, _ADAPTIVE_MAX)
    return jax.lax.stop_gradient(ratio) * disc_weight
