"""Decoding and augmentation of one image, in numpy/PIL, matching the official loaders.

Two recipes exist upstream and both are offered (``data.crop``):
- 'resize_random_crop' (VAR ``utils/data.py``): torchvision
  ``Resize(round(mid_reso * S), LANCZOS)`` of the shorter side, then ``RandomCrop(S)``
  for training and ``CenterCrop(S)`` for eval.
- 'adm_center_crop' (MVAR ``utils/data.py``, the guided-diffusion recipe): halve with
  a box filter while the shorter side is >= 2S, bicubic-resize the shorter side to
  S, take the centre; the same for training and eval.
Training may then flip horizontally with probability 1/2. Images leave the host
as uint8, a quarter of the float32 bytes; ``to_pm1`` maps them to [-1, 1] on the
device exactly like ``ToTensor()`` followed by ``x + x - 1`` in float32.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from mvar_jax.data import config as config_lib

ArrayT = TypeVar("ArrayT", np.ndarray, jax.Array)


class BadImageError(ValueError):
    """An image that cannot be read or decoded; the message names where it came from."""


def decode_rgb(data: bytes) -> PIL.Image.Image:
    """Encoded bytes to an RGB image, as the official ``pil_loader`` does (``convert('RGB')``)."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise BadImageError(f"{type(err).__name__}: {err}") from err


def resize_shorter_side(img: PIL.Image.Image, size: int, resample: int) -> PIL.Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: the longer side is truncated, not rounded."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return img.resize((new_w, new_h), resample)


def adm_resize(img: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """guided-diffusion's resize: box-halve large images first, then bicubic to ``size``."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), PIL.Image.BOX)
    scale = size / min(img.size)
    return img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), PIL.Image.BICUBIC)


def _pm1_of_each_byte() -> np.ndarray:
    """(256,) float32: torch's ``ToTensor()`` (x / 255) then ``x + x - 1``, for every byte value."""
    x = np.arange(256, dtype=np.float32) / np.float32(255.0)
    table = x + x - np.float32(1.0)
    table.flags.writeable = False
    return table


_PM1_OF_BYTE = _pm1_of_each_byte()


def to_pm1(img: ArrayT) -> ArrayT:
    """uint8 to float32 in [-1, 1], bit-identical to torch's ``ToTensor()`` then ``x + x - 1``.

    Takes a numpy or a jax array of any shape, so the same rule runs on the host
    and inside a jitted step. It is a table look-up because compilers may turn
    the division by 255 into a multiplication, which differs in the last bit.
    """
    if img.dtype != np.uint8:
        raise TypeError(f"to_pm1 takes uint8 images, got {img.dtype}")
    if isinstance(img, np.ndarray):
        return _PM1_OF_BYTE[img]
    return jnp.asarray(_PM1_OF_BYTE)[img]


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """PIL image -> ``(S, S, 3)`` uint8; ``rng=None`` is the eval path."""

    image_size: int
    crop: str = "resize_random_crop"
    mid_reso: float = 1.125
    hflip: bool = False

    def __post_init__(self):
        if self.crop not in config_lib.CROPS:
            raise ValueError(f"crop={self.crop!r}: expected one of {config_lib.CROPS}")

    @classmethod
    def from_config(cls, cfg: Any) -> Preprocess:
        return cls(int(cfg.image_size), cfg.crop, float(cfg.mid_reso), bool(cfg.hflip))

    def __call__(self, img: PIL.Image.Image, rng: np.random.Generator | None) -> np.ndarray:
        s = self.image_size
        if self.crop == "adm_center_crop":
            img_HW3 = np.asarray(adm_resize(img, s))
            top, left = (img_HW3.shape[0] - s) // 2, (img_HW3.shape[1] - s) // 2
        else:
            resized = resize_shorter_side(img, round(self.mid_reso * s), PIL.Image.LANCZOS)
            img_HW3 = np.asarray(resized)
            h, w = img_HW3.shape[:2]
            if rng is None:  # torchvision CenterCrop rounds half to even, like Python's round
                top, left = round((h - s) / 2), round((w - s) / 2)
            else:
                top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        img_HW3 = img_HW3[top : top + s, left : left + s]
        # Upstream flips before the resize; for a symmetric filter and a uniform
        # crop offset flipping the crop has the same distribution.
        if rng is not None and self.hflip and rng.random() < 0.5:
            img_HW3 = img_HW3[:, ::-1]
        return np.ascontiguousarray(img_HW3)
