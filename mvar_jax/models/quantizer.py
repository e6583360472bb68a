"""Multi-scale residual vector quantizer of VAR/MVAR.

A feature map ``f`` of side ``H = patch_nums[-1]`` is tokenized coarse to fine:
at scale ``si`` the residual ``f - f_hat`` is area-downsampled to ``pn x pn``,
each position takes its nearest codebook entry, and the entries, bicubic
upsampled back to ``H x H`` and refined by a Phi conv, are added to ``f_hat``.
The last scale works at full size, with neither resize.

Phi: ``phi(h) = (1 - r) h + r conv3x3(h)`` with ``r = |quant_resi|``; one of
``num_phis`` convs serves each scale (``share_quant_resi`` = 0: one per scale,
1: a single shared one, K > 1: K convs spread over the scales), and
``quant_resi == 0`` makes Phi the identity.

Training (``quantize_train``) follows the official ``VectorQuantizer2.forward``:
the same residual loop picks the same tokens; a VQ loss per scale pulls f and
the running f_hat together (commitment ``beta * |sg(f_hat_s) - f|^2`` moves the
encoder, ``|f_hat_s - sg(f)|^2`` moves the codebook and Phi), and the decoder
sees f_hat through a straight-through estimator. Codebook usage statistics
live outside the model, in ``mvar_jax.training.codebook``.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax.models.normalize import l2_normalize
from mvar_jax.models.resize import resize_area, resize_bicubic

# Below this |quant_resi| the official model replaces every Phi by the identity.
_IDENTITY_PHI_TOL = 1e-6


def num_phis(quant_resi: float, share_quant_resi: int, num_scales: int) -> int:
    """How many Phi convs the quantizer holds (0 when Phi is the identity)."""
    if abs(quant_resi) <= _IDENTITY_PHI_TOL:
        return 0
    return num_scales if share_quant_resi == 0 else share_quant_resi


def phi_index(si: int, num_scales: int, num_phis: int) -> int:
    """The Phi that refines scale ``si``.

    Phi k sits at a tick in (0, 1): K evenly spaced ticks with a margin of
    1/(2K) at both ends, or 1/(3K) when K == 4; scale si takes the Phi whose
    tick is nearest to its position ``si / (num_scales - 1)`` (first on ties).
    """
    k = num_phis
    margin = 1 / 3 / k if k == 4 else 1 / 2 / k
    ticks = np.linspace(margin, 1 - margin, k)
    return int(np.argmin(np.abs(ticks - si / (num_scales - 1))))


class ScaleCodes(NamedTuple):
    """One scale of the residual loop (pn = the scale's side, l = pn * pn)."""

    z_BlC: jax.Array  # (B, l, Cvae): residual f - f_hat area-downsampled to pn x pn; chose ids
    ids_Bl: jax.Array  # (B, l) int32: the nearest code of each row of z
    f_hat_BHWC: jax.Array  # (B, H, H, Cvae): running f_hat after this scale


class QuantizerTrainOutput(NamedTuple):
    """What the training forward gives the decoder, the loss and the codebook statistics."""

    f_hat_BHWC: jax.Array  # straight-through: f_hat's value, the identity's gradient to f
    vq_loss: jax.Array  # () float32, averaged over scales
    ids: list[jax.Array]  # per scale (B, pn * pn) int32, as ``quantize`` gives them
    z: list[jax.Array]  # per scale (B, pn * pn, Cvae), the lookup inputs (no gradient)


def _mse(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(a - b))


class MultiScaleQuantizer(nn.Module):
    """Codebook ``embedding`` (vocab, Cvae) and the Phi convs ``phi_k``.

    Feature maps are NHWC, ``(B, H, H, Cvae)`` with ``H = patch_nums[-1]``; token
    ids are one ``(B, pn * pn)`` int32 array per scale, row-major over (h, w).
    """

    vocab_size: int
    Cvae: int
    patch_nums: tuple[int, ...]
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    using_znorm: bool = False
    beta: float = 0.25  # Commitment weight of the VQ loss (training only).

    def setup(self):
        if len(self.patch_nums) < 2:
            raise ValueError(f"patch_nums needs at least 2 scales, got {self.patch_nums}")
        self.embedding = nn.Embed(self.vocab_size, self.Cvae)
        n = num_phis(self.quant_resi, self.share_quant_resi, len(self.patch_nums))
        self.phi = [nn.Conv(self.Cvae, (3, 3), padding=1) for _ in range(n)]

    # ----------------------------------------------------------------- pieces

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def scale_residual(self, si: int, h_BhwC: jax.Array) -> jax.Array:
        """Scale ``si``'s share of f_hat ``(B, H, H, Cvae)``: its embeddings
        bicubic-upsampled to full size (the last scale already is), then its Phi."""
        H = self.patch_nums[-1]
        h_BHWC = h_BhwC if si == self.num_scales - 1 else resize_bicubic(h_BhwC, (H, H))
        if not self.phi:
            return h_BHWC
        conv = self.phi[phi_index(si, self.num_scales, len(self.phi))]
        r = abs(self.quant_resi)
        return h_BHWC * (1 - r) + conv(h_BHWC) * r

    def nearest_code(self, z_NC: jax.Array) -> jax.Array:
        """Index of the nearest codebook entry for each row of ``z_NC``, ``(N,)`` int32."""
        codes_VC = self.embedding.embedding
        hi = jax.lax.Precision.HIGHEST  # Near-ties must resolve as in float32 PyTorch.
        if self.using_znorm:
            cos_NV = jnp.matmul(l2_normalize(z_NC), l2_normalize(codes_VC).T, precision=hi)
            return jnp.argmax(cos_NV, axis=1).astype(jnp.int32)
        # ||z||^2 + ||e||^2 - 2 z.e, the official expansion (not ||z - e||^2),
        # so that ties and rounding match.
        dist_NV = (
            jnp.sum(z_NC**2, axis=1, keepdims=True)
            + jnp.sum(codes_VC**2, axis=1)
            - 2 * jnp.matmul(z_NC, codes_VC.T, precision=hi)
        )
        return jnp.argmin(dist_NV, axis=1).astype(jnp.int32)

    def embed_tokens(self, idx_Bl: jax.Array) -> jax.Array:
        """Codebook entries of ``(B, l)`` token ids, ``(B, l, Cvae)``."""
        return self.embedding(idx_Bl)

    def embed_scale(self, si: int, idx_Bl: jax.Array) -> jax.Array:
        """Token ids of scale ``si`` as a ``(B, pn, pn, Cvae)`` map."""
        pn = self.patch_nums[si]
        if idx_Bl.ndim != 2 or idx_Bl.shape[1] != pn * pn:
            raise ValueError(f"scale {si} needs token ids of shape (B, {pn * pn}), got {idx_Bl.shape}")
        return self.embed_tokens(idx_Bl).reshape(idx_Bl.shape[0], pn, pn, self.Cvae)

    # ------------------------------------------------------------- operations

    def residual_codes(self, f_BHWC: jax.Array) -> list[ScaleCodes]:
        """The residual loop shared by inference and training, coarse to fine.

        Token choice never carries a gradient (argmin); f_hat carries one to the
        codebook and Phi only, through the embedding lookups.
        """
        B, H, W, C = f_BHWC.shape
        pn_last = self.patch_nums[-1]
        if (H, W, C) != (pn_last, pn_last, self.Cvae):
            raise ValueError(
                f"expected features of shape (B, {pn_last}, {pn_last}, {self.Cvae}) for "
                f"patch_nums {self.patch_nums}, got {f_BHWC.shape}"
            )
        if self.is_initializing():
            # Create every Phi, including any that this schedule never selects.
            for conv in self.phi:
                conv(f_BHWC)
        f_rest = f_BHWC
        f_hat = jnp.zeros_like(f_BHWC)
        scales = []
        for si, pn in enumerate(self.patch_nums):
            z_BhwC = f_rest if si == self.num_scales - 1 else resize_area(f_rest, (pn, pn))
            idx_N = self.nearest_code(z_BhwC.reshape(-1, C))
            h_BhwC = self.embedding(idx_N).reshape(B, pn, pn, C)
            h_BHWC = self.scale_residual(si, h_BhwC)
            f_hat = f_hat + h_BHWC
            f_rest = f_rest - h_BHWC
            scales.append(
                ScaleCodes(
                    z_BlC=z_BhwC.reshape(B, pn * pn, C), ids_Bl=idx_N.reshape(B, pn * pn), f_hat_BHWC=f_hat
                )
            )
        return scales

    def quantize(self, f_BHWC: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        """Tokenizes ``f``; returns (token ids per scale, f_hat after each scale).

        Ask only for what you need: under jit the unused half is dropped.
        """
        scales = self.residual_codes(f_BHWC)
        return [s.ids_Bl for s in scales], [s.f_hat_BHWC for s in scales]

    def quantize_train(self, f_BHWC: jax.Array) -> QuantizerTrainOutput:
        """The official training forward (``VectorQuantizer2.forward``).

        Per scale s, ``beta * mse(sg(f_hat_s), f) + mse(f_hat_s, sg(f))`` with
        f_hat_s the running sum after scale s, averaged over scales; the output
        ``sg(f_hat) - sg(f) + f`` passes the decoder's gradient to the encoder
        unchanged. Tokens are the ones ``quantize`` picks.
        """
        f_sg = jax.lax.stop_gradient(f_BHWC)
        scales = self.residual_codes(f_sg)
        vq_loss = 0.0
        for s in scales:
            vq_loss = vq_loss + (
                self.beta * _mse(jax.lax.stop_gradient(s.f_hat_BHWC), f_BHWC) + _mse(s.f_hat_BHWC, f_sg)
            )
        vq_loss = vq_loss * (1 / self.num_scales)
        f_hat_st = (jax.lax.stop_gradient(scales[-1].f_hat_BHWC) - f_sg) + f_BHWC
        return QuantizerTrainOutput(
            f_hat_BHWC=f_hat_st,
            vq_loss=vq_loss,
            ids=[s.ids_Bl for s in scales],
            z=[jax.lax.stop_gradient(s.z_BlC) for s in scales],
        )

    def embed_to_fhat(self, ms_h_BhwC: list[jax.Array]) -> list[jax.Array]:
        """Sums refined, upsampled per-scale embeddings into f_hat at full size.

        Takes the embeddings of the first ``len(ms_h_BhwC)`` scales (all of them
        for a finished image). Returns the ``(B, H, H, Cvae)`` f_hat after each scale.
        """
        if not 1 <= len(ms_h_BhwC) <= self.num_scales:
            raise ValueError(f"expected embeddings of 1 to {self.num_scales} scales, got {len(ms_h_BhwC)}")
        H = self.patch_nums[-1]
        f_hat = jnp.zeros((ms_h_BhwC[0].shape[0], H, H, self.Cvae), jnp.float32)
        f_hats = []
        for si, h_BhwC in enumerate(ms_h_BhwC):
            f_hat = f_hat + self.scale_residual(si, h_BhwC)
            f_hats.append(f_hat)
        return f_hats

    def idx_to_fhat(self, ids: list[jax.Array]) -> jax.Array:
        """f_hat ``(B, H, H, Cvae)`` from the token ids of every scale so far."""
        return self.embed_to_fhat([self.embed_scale(si, idx) for si, idx in enumerate(ids)])[-1]

    def idx_to_var_input(self, ids: list[jax.Array]) -> jax.Array:
        """Teacher-forcing input ``(B, L - patch_nums[0]**2, Cvae)``.

        The input of scale si + 1 is the running f_hat after scale si,
        area-downsampled to that scale's size and flattened row-major. The last
        scale's ids are not needed (it feeds nothing); they may be passed.
        """
        if len(ids) not in (self.num_scales - 1, self.num_scales):
            raise ValueError(
                f"expected token ids of {self.num_scales - 1} or {self.num_scales} scales, got {len(ids)}"
            )
        B = ids[0].shape[0]
        H = self.patch_nums[-1]
        f_hat = jnp.zeros((B, H, H, self.Cvae), jnp.float32)
        inputs = []
        for si in range(self.num_scales - 1):
            h_BhwC = self.embed_scale(si, ids[si])
            f_hat, next_BhwC = self.next_autoregressive_input(si, f_hat, h_BhwC)
            inputs.append(next_BhwC.reshape(B, -1, self.Cvae))
        return jnp.concatenate(inputs, axis=1)

    def next_autoregressive_input(
        self,
        si: int,
        f_hat_BHWC: jax.Array,
        h_BhwC: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """Adds scale ``si``'s embeddings to f_hat; returns (f_hat, next scale's input).

        The next input is f_hat area-downsampled to scale si + 1, ``(B, pn', pn', Cvae)``;
        after the last scale it is f_hat itself. ``si`` must be a Python int.
        """
        f_hat_BHWC = f_hat_BHWC + self.scale_residual(si, h_BhwC)
        if si == self.num_scales - 1:
            return f_hat_BHWC, f_hat_BHWC
        pn = self.patch_nums[si + 1]
        return f_hat_BHWC, resize_area(f_hat_BHWC, (pn, pn))
