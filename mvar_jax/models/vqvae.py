"""The multi-scale VQVAE tokenizer of VAR/MVAR (NHWC, float32).

Encoder and decoder follow the VQGAN / latent-diffusion f16 design that the
official checkpoint ``vae_ch160v4096z32.pth`` uses; module and parameter names
mirror the official ones so that ``weights.vqvae`` maps them mechanically.

Use the methods through ``apply``, e.g.
``model.apply(variables, img_BHW3, method=VQVAE.img_to_idx)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvar_jax.models.config import PATCH_NUMS_256, from_dict, to_dict
from mvar_jax.models.quantizer import MultiScaleQuantizer, QuantizerTrainOutput

_GROUPS = 32


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """Hyper-parameters of the VQVAE; the defaults are the released tokenizer's."""

    vocab_size: int = 4096
    z_channels: int = 32  # Cvae, the channels of the quantized features.
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    using_sa: bool = True  # Attention after each ResNet block of the lowest resolution.
    using_mid_sa: bool = True
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    using_znorm: bool = False
    beta: float = 0.25  # Commitment weight of the VQ loss in tokenizer training.
    patch_nums: tuple[int, ...] = PATCH_NUMS_256

    def __post_init__(self):
        # Lists (e.g. from JSON) become tuples so that the config stays hashable.
        for name in ("ch_mult", "patch_nums"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("vocab_size", "z_channels", "ch", "num_res_blocks", "quant_conv_ks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VQVAEConfig.{name} must be a positive int, got {value!r}")
        if not self.ch_mult or any(not isinstance(m, int) or m < 1 for m in self.ch_mult):
            raise ValueError(f"VQVAEConfig.ch_mult must be positive ints, got {self.ch_mult}")
        bad = [self.ch * m for m in (1, *self.ch_mult) if (self.ch * m) % _GROUPS]
        if bad:
            raise ValueError(
                f"VQVAEConfig: channel counts {bad} (ch={self.ch} x ch_mult) are not "
                f"divisible by the {_GROUPS} GroupNorm groups"
            )
        if self.quant_conv_ks % 2 != 1:
            raise ValueError(f"VQVAEConfig.quant_conv_ks must be odd, got {self.quant_conv_ks}")
        if not isinstance(self.share_quant_resi, int) or self.share_quant_resi < 0:
            raise ValueError(
                f"VQVAEConfig.share_quant_resi must be an int >= 0, got {self.share_quant_resi!r}"
            )
        if self.beta < 0:
            raise ValueError(f"VQVAEConfig.beta must be >= 0, got {self.beta}")
        pns = self.patch_nums
        if (
            len(pns) < 2
            or any(not isinstance(p, int) or p < 1 for p in pns)
            or any(a >= b for a, b in zip(pns, pns[1:]))
        ):
            raise ValueError(
                f"VQVAEConfig.patch_nums must be >= 2 strictly increasing positive ints, got {pns}"
            )

    @property
    def downsample(self) -> int:
        """Image pixels per feature-map position along each axis."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        """Side of the images the token pyramid describes."""
        return self.patch_nums[-1] * self.downsample

    @property
    def num_tokens(self) -> int:
        """L, the token count over all scales."""
        return sum(pn * pn for pn in self.patch_nums)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQVAEConfig:
        return from_dict(cls, d)


# Pixels (images x rows x columns) a 3x3 convolution takes at once on a CPU where one
# image's map is larger: XLA's CPU convolution loses about a third of its speed once a
# map outgrows the caches (the decoder's last level, 256 x 256 x 160), and strips of whole
# rows stay fast. Smaller maps run whole, as nn.Conv, whatever the batch.
CPU_STRIP_PIXELS = 16384


class Conv3x3(nn.Conv):
    """``nn.Conv(features, (3, 3), padding=1)``, and that module itself on maps of under
    ``strip_pixels`` an image; larger maps run as strips of whole rows (each with its
    neighbour rows), ``strip_pixels`` at a time over the batch, one convolution each, with
    the same parameters and outputs.

    ``strip_pixels`` None: ``CPU_STRIP_PIXELS`` on a CPU, the whole map on an accelerator.
    """

    kernel_size: Sequence[int] = (3, 3)
    padding: Any = 1
    strip_pixels: int | None = None

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        B, H, W, C = x_BHWC.shape
        budget = self.strip_pixels
        if budget is None and jax.default_backend() != "cpu":
            return super().__call__(x_BHWC)
        budget = CPU_STRIP_PIXELS if budget is None else budget
        if H * W < budget:
            return super().__call__(x_BHWC)
        rows = max(1, budget // (B * W))
        kernel = self.param("kernel", self.kernel_init, (3, 3, C, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x_BHWC, kernel, bias = nn.dtypes.promote_dtype(x_BHWC, kernel, bias, dtype=self.dtype)
        x_BHWC = jnp.pad(x_BHWC, ((0, 0), (1, 1), (0, 0), (0, 0)))  # the rows' zeros, before the cut
        strips = [
            jax.lax.conv_general_dilated(
                x_BHWC[:, r : r + rows + 2],
                kernel,
                (1, 1),
                ((0, 0), (1, 1)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=self.precision,
            )
            for r in range(0, H, rows)
        ]
        return jnp.concatenate(strips, axis=1) + bias


def _group_norm(name: str | None = None) -> nn.GroupNorm:
    # Two-pass variance, as PyTorch computes it: the one-pass E[x^2] - E[x]^2 loses digits.
    return nn.GroupNorm(num_groups=_GROUPS, epsilon=1e-6, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
    """Pre-activation ResNet block; a 1x1 ``nin_shortcut`` when the width changes."""

    out_channels: int

    def setup(self):
        self.norm1 = _group_norm()
        self.conv1 = Conv3x3(self.out_channels)
        self.norm2 = _group_norm()
        self.conv2 = Conv3x3(self.out_channels)
        self.nin_shortcut = nn.Dense(self.out_channels)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        h = self.conv1(nn.silu(self.norm1(x_BHWC)))
        h = self.conv2(nn.silu(self.norm2(h)))
        skip = x_BHWC if x_BHWC.shape[-1] == self.out_channels else self.nin_shortcut(x_BHWC)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, residual."""

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        B, H, W, C = x_BHWC.shape
        qkv = nn.Dense(3 * C, name="qkv")(_group_norm(name="norm")(x_BHWC))
        q_BLC, k_BLC, v_BLC = jnp.split(qkv.reshape(B, H * W, 3 * C), 3, axis=-1)
        w_BLL = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q_BLC, k_BLC) * C**-0.5, axis=-1)
        h_BLC = jnp.einsum("bij,bjc->bic", w_BLL, v_BLC)
        return x_BHWC + nn.Dense(C, name="proj_out")(h_BLC).reshape(B, H, W, C)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right only."""

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        conv = nn.Conv(x_BHWC.shape[-1], (3, 3), strides=2, padding=((0, 1), (0, 1)), name="conv")
        return conv(x_BHWC)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        x_BHWC = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
        return Conv3x3(x_BHWC.shape[-1], name="conv")(x_BHWC)


class Level(nn.Module):
    """One resolution: ResNet blocks (each optionally followed by attention), then a resample.

    ``resample`` is "down" (encoder), "up" (decoder) or "" (none, at the end of the path).
    """

    channels: int
    num_blocks: int
    with_attn: bool
    resample: str

    def setup(self):
        self.block = [ResnetBlock(self.channels) for _ in range(self.num_blocks)]
        self.attn = [AttnBlock() for _ in range(self.num_blocks)] if self.with_attn else []
        if self.resample == "down":
            self.downsample = Downsample()
        elif self.resample == "up":
            self.upsample = Upsample()

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        for i, block in enumerate(self.block):
            x_BHWC = block(x_BHWC)
            if self.attn:
                x_BHWC = self.attn[i](x_BHWC)
        if self.resample == "down":
            return self.downsample(x_BHWC)
        if self.resample == "up":
            return self.upsample(x_BHWC)
        return x_BHWC


class MidBlock(nn.Module):
    """ResNet, attention (optional), ResNet at the lowest resolution."""

    channels: int
    with_attn: bool

    def setup(self):
        self.block_1 = ResnetBlock(self.channels)
        if self.with_attn:
            self.attn_1 = AttnBlock()
        self.block_2 = ResnetBlock(self.channels)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        x_BHWC = self.block_1(x_BHWC)
        if self.with_attn:
            x_BHWC = self.attn_1(x_BHWC)
        return self.block_2(x_BHWC)


class Encoder(nn.Module):
    """Image ``(B, H, W, 3)`` -> features ``(B, H/ds, W/ds, z_channels)``.

    The official ``double_z`` (twice the output channels, for KL-VAEs) is always
    off for this VQVAE and so not offered.
    """

    config: VQVAEConfig

    def setup(self):
        c = self.config
        last = len(c.ch_mult) - 1
        self.conv_in = Conv3x3(c.ch)
        self.down = [
            Level(
                c.ch * m,
                c.num_res_blocks,
                with_attn=c.using_sa and i == last,
                resample="" if i == last else "down",
            )
            for i, m in enumerate(c.ch_mult)
        ]
        self.mid = MidBlock(c.ch * c.ch_mult[-1], c.using_mid_sa)
        self.norm_out = _group_norm()
        self.conv_out = Conv3x3(c.z_channels)

    def __call__(self, img_BHW3: jax.Array) -> jax.Array:
        h = self.conv_in(img_BHW3)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(nn.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features ``(B, h, w, z_channels)`` -> image ``(B, h*ds, w*ds, 3)``, unclamped."""

    config: VQVAEConfig

    def setup(self):
        c = self.config
        last = len(c.ch_mult) - 1
        self.conv_in = Conv3x3(c.ch * c.ch_mult[-1])
        self.mid = MidBlock(c.ch * c.ch_mult[-1], c.using_mid_sa)
        # up_i works at the resolution of encoder level i; they run from last to first.
        self.up = [
            Level(
                c.ch * m,
                c.num_res_blocks + 1,
                with_attn=c.using_sa and i == last,
                resample="" if i == 0 else "up",
            )
            for i, m in enumerate(c.ch_mult)
        ]
        self.norm_out = _group_norm()
        self.conv_out = Conv3x3(3)

    def __call__(self, z_BhwC: jax.Array) -> jax.Array:
        h = self.mid(self.conv_in(z_BhwC))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(nn.silu(self.norm_out(h)))


class VQVAE(nn.Module):
    """Encoder, quant_conv, multi-scale quantizer, post_quant_conv, decoder."""

    config: VQVAEConfig

    def setup(self):
        c = self.config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quantize = MultiScaleQuantizer(
            vocab_size=c.vocab_size,
            Cvae=c.z_channels,
            patch_nums=c.patch_nums,
            quant_resi=c.quant_resi,
            share_quant_resi=c.share_quant_resi,
            using_znorm=c.using_znorm,
            beta=c.beta,
        )
        ks = c.quant_conv_ks
        self.quant_conv = nn.Conv(c.z_channels, (ks, ks), padding=ks // 2)
        self.post_quant_conv = nn.Conv(c.z_channels, (ks, ks), padding=ks // 2)

    def __call__(self, img_BHW3: jax.Array) -> jax.Array:
        """Reconstruction through the full token pyramid (also builds every parameter)."""
        return self.fhat_to_img(self.fhat_per_scale(self.encode(img_BHW3))[-1])

    def train_forward(self, img_BHW3: jax.Array) -> tuple[jax.Array, QuantizerTrainOutput]:
        """The official training forward: (reconstruction, unclamped; quantizer output).

        The decoder sees the straight-through f_hat; the VQ loss, token ids and
        lookup inputs per scale come with the quantizer output.
        """
        q = self.quantize.quantize_train(self.encode(img_BHW3))
        return self.decoder(self.post_quant_conv(q.f_hat_BHWC)), q

    def encode(self, img_BHW3: jax.Array) -> jax.Array:
        """Images in [-1, 1] -> the features ``f_BhwC`` that get quantized."""
        if img_BHW3.ndim != 4 or img_BHW3.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB images (B, H, W, 3), got {img_BHW3.shape}")
        return self.quant_conv(self.encoder(img_BHW3))

    def img_to_idx(self, img_BHW3: jax.Array) -> list[jax.Array]:
        """Token ids, one ``(B, pn * pn)`` int32 array per scale."""
        return self.quantize.quantize(self.encode(img_BHW3))[0]

    def fhat_per_scale(self, f_BhwC: jax.Array) -> list[jax.Array]:
        """Quantized approximation f_hat of ``f`` after each scale."""
        return self.quantize.quantize(f_BhwC)[1]

    def idx_to_fhat(self, ids: list[jax.Array]) -> jax.Array:
        """f_hat ``(B, h, w, Cvae)`` from token ids of all scales (or the first few)."""
        return self.quantize.idx_to_fhat(ids)

    def fhat_to_img(self, f_hat_BhwC: jax.Array) -> jax.Array:
        """Decoded images, clamped to [-1, 1]."""
        return jnp.clip(self.decoder(self.post_quant_conv(f_hat_BhwC)), -1, 1)

    def idx_to_img(self, ids: list[jax.Array]) -> jax.Array:
        return self.fhat_to_img(self.idx_to_fhat(ids))

    def idx_to_var_input(self, ids: list[jax.Array]) -> jax.Array:
        """Teacher-forcing input ``(B, L - first_l, Cvae)`` of the transformer."""
        return self.quantize.idx_to_var_input(ids)

    def next_autoregressive_input(
        self,
        si: int,
        f_hat_BhwC: jax.Array,
        h_BhwC: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """Sampler step: (f_hat with scale si added, next scale's input map)."""
        return self.quantize.next_autoregressive_input(si, f_hat_BhwC, h_BhwC)

    def embed_tokens(self, idx_Bl: jax.Array) -> jax.Array:
        """Codebook entries ``(B, l, Cvae)`` of token ids ``(B, l)``."""
        return self.quantize.embed_tokens(idx_Bl)


def abstract_variables(config: VQVAEConfig) -> dict[str, Any]:
    """``{'params': ...}`` as ``jax.ShapeDtypeStruct`` leaves: shapes without allocation."""
    img = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    return jax.eval_shape(VQVAE(config).init, jax.random.PRNGKey(0), img)


def split_scales(tokens_BL: jax.Array, patch_nums: tuple[int, ...]) -> list[jax.Array]:
    """``(B, L)`` token ids -> one ``(B, pn*pn)`` array per scale (undoes the concatenation)."""
    offsets, total = [], 0
    for pn in patch_nums[:-1]:
        total += pn * pn
        offsets.append(total)
    if tokens_BL.shape[-1] != total + patch_nums[-1] ** 2:
        raise ValueError(
            f"expected {total + patch_nums[-1] ** 2} tokens for patch_nums "
            f"{tuple(patch_nums)}, got shape {tokens_BL.shape}"
        )
    return jnp.split(tokens_BL, offsets, axis=-1)
