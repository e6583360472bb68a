"""Zero-shot editing for every family: in-painting, out-painting, class-conditional editing.

VAR's editing needs no training: sampling runs as usual, but at every scale the tokens
drawn where a mask says "keep" are replaced by the given image's tokens before they
update the feature map and build the next scale's input (``generate``'s ``edit``). The
mask is given at the last scale (1 = keep, 0 = generate) and brought to each scale
bilinearly (half-pixel centres, no antialiasing), keeping where it exceeds 0.5; scales
of at most 3 tokens keep everything, so the layout of the given image survives.
In-painting generates inside a box, out-painting keeps only the box, and
class-conditional editing is in-painting with a class label instead of the null one.

    edit = make_edit(model, images_BHW3, box_keep_mask(16, (0.2, 0.3, 0.7, 0.9), inpaint=True))
    samples = sampling.sample(model, labels, key, options, edit=edit)

The same ``edit`` serves MVAR (the kept tokens feed the next scale's input), VAR (and
its KV cache) and M-VAR (its carried Mamba state sees them).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax.checkpoint import ModelBundle
from mvar_jax.models.vqvae import VQVAE, VQVAEConfig
from mvar_jax.sampling.sampler import Edit

KEEP_ALL_AT_MOST = 3  # scales of at most this many tokens keep the given image's


def box_keep_mask(side: int, box_y0x0y1x1: Sequence[float], *, inpaint: bool) -> np.ndarray:
    """``(side, side)`` float32, 1 = keep: the box (fractions of the image, rounded to the
    token grid) generated when ``inpaint``, else the only part kept."""
    y0, x0, y1, x1 = (float(v) for v in box_y0x0y1x1)
    if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
        raise ValueError(
            f"box y0,x0,y1,x1 = {y0},{x0},{y1},{x1}: need 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1"
        )
    rows = slice(round(y0 * side), round(y1 * side))
    cols = slice(round(x0 * side), round(x1 * side))
    inside = np.zeros((side, side), np.float32)
    inside[rows, cols] = 1
    if not inside.any():
        raise ValueError(f"box y0,x0,y1,x1 = {y0},{x0},{y1},{x1} covers no token of the {side}x{side} grid")
    return 1 - inside if inpaint else inside


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``(out, in)`` float32: bilinear resampling with half-pixel centres, edges clamped, no
    antialiasing (torch's ``interpolate(mode='bilinear', align_corners=False)``)."""
    scale = np.float32(in_size / out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    lo = np.minimum(np.floor(src).astype(int), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    m = np.zeros((out_size, in_size), np.float32)
    np.add.at(m, (np.arange(out_size), lo), 1 - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m


def keep_per_scale(keep_Bhw: np.ndarray, patch_nums: Sequence[int]) -> np.ndarray:
    """``(B, L)`` bool: the last scale's keep mask ``(B, h, w)`` brought to every scale."""
    keep_Bhw = np.asarray(keep_Bhw, np.float32)
    per_scale = []
    for pn in patch_nums:
        if pn * pn <= KEEP_ALL_AT_MOST:
            keep = np.ones((len(keep_Bhw), pn, pn), bool)
        else:
            rows, cols = _bilinear_matrix(keep_Bhw.shape[1], pn), _bilinear_matrix(keep_Bhw.shape[2], pn)
            keep = np.einsum("ph,bhw,qw->bpq", rows, keep_Bhw, cols) > 0.5
        per_scale.append(keep.reshape(len(keep_Bhw), -1))
    return np.concatenate(per_scale, axis=1)


def image_tokens(model: ModelBundle, images_BHW3: np.ndarray | jax.Array) -> np.ndarray:
    """``(B, L)`` int32: the tokens of images in [0, 1] at the model's resolution."""
    tcfg, vcfg = model.transformer_config, model.vqvae_config
    images = np.asarray(images_BHW3, np.float32)
    side = tcfg.patch_nums[-1] * vcfg.downsample
    if images.ndim != 4 or images.shape[1:] != (side, side, 3):
        raise ValueError(
            f"images must be (B, {side}, {side}, 3) in [0, 1] for this model, got {images.shape}"
        )
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"images must be in [0, 1], got values in [{images.min()}, {images.max()}]")
    ids = _img_to_idx(vcfg, model.vqvae_params, jnp.asarray(images * 2 - 1))
    return np.concatenate([np.asarray(i).reshape(len(images), -1) for i in ids], axis=1).astype(np.int32)


@jax.jit(static_argnums=0)
def _img_to_idx(vqvae_config: VQVAEConfig, vqvae_params, img_BHW3: jax.Array) -> list[jax.Array]:
    return VQVAE(vqvae_config).apply(vqvae_params, img_BHW3, method=VQVAE.img_to_idx)


def make_edit(
    model: ModelBundle, images_or_tokens: np.ndarray | jax.Array, keep_hw: np.ndarray | jax.Array
) -> Edit:
    """What ``sampling.sample(..., edit=...)`` keeps: images ``(B, H, W, 3)`` in [0, 1] (or their
    tokens ``(B, L)``) and a keep mask at the last scale, ``(h, w)`` for every image or
    ``(B, h, w)`` (1 = keep, 0 = generate)."""
    tcfg = model.transformer_config
    given = np.asarray(images_or_tokens)
    tokens_BL = given.astype(np.int32) if given.ndim == 2 else image_tokens(model, given)
    if tokens_BL.shape[1] != tcfg.seq_len:
        raise ValueError(f"tokens must be (B, {tcfg.seq_len}) for this model, got {tokens_BL.shape}")
    keep = np.asarray(keep_hw, np.float32)
    keep = np.broadcast_to(keep, (len(tokens_BL), *keep.shape)) if keep.ndim == 2 else keep
    side = tcfg.patch_nums[-1]
    if keep.shape != (len(tokens_BL), side, side):
        raise ValueError(
            f"the keep mask must be ({side}, {side}) or ({len(tokens_BL)}, {side}, {side}) (the last "
            f"scale's tokens), got {np.shape(keep_hw)}"
        )
    return Edit(tokens_BL, keep_per_scale(keep, tcfg.patch_nums))
