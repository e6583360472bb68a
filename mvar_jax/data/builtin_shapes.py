"""A small class-conditional image dataset drawn locally, as a TFDS builder.

It lets the default run and the tests train a generator without downloading
anything. A label is a (colour, shape) pair, so a conditional model has to get
both the hue family and the outline right, while position, size, shading and a
textured gradient background vary freely within a class and the object tilts by
up to 15 degrees. Two choices come from measuring the demo's tiny generator
(docs/benchmarks.md, "The demo"; earlier versions in CHANGELOG.md):
- The object spans 0.6-0.9 of the image (its circumradius 0.30-0.45 of the
  side), so a multi-scale tokenizer's coarse maps (4x4, 6x6) already show its
  outline, as an ImageNet object does over VAR's 16x16 maps at 256 px. With the
  smaller objects of version 1 (0.20-0.36) the outline lived in the last 8x8
  map alone (the tiny tokenizer's first five scales of the validation images
  decoded: 40% recognised, against 84% with version 2's sizes).
- Objects stand nearly upright (version 2 turned them to any angle). A
  VAR-style generator draws all tokens of a scale at once, each from its own
  marginal, so a tiny one mixed orientations within one outline: circles,
  which have none, were drawn right 98% of the time, the other shapes 46-82%.
  Objects in photographs mostly stand upright too.
Every image is a pure function of (seed, split, index): rebuilding gives the
same bytes.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator

import numpy as np
import PIL.Image
import PIL.ImageDraw
import tensorflow_datasets as tfds
from etils import epath

SHAPES = ("circle", "square", "triangle", "star", "cross")
# Centre hue of each colour family, as a fraction of the colour wheel.
COLOUR_HUES = {"red": 0.0, "blue": 0.62}
CLASS_NAMES = tuple(f"{c}_{s}" for c in COLOUR_HUES for s in SHAPES)
NUM_CLASSES = len(CLASS_NAMES)

RESOLUTIONS = (32, 64, 128)
MAX_TILT = np.pi / 12  # objects stand nearly upright: rotated by at most 15 degrees
SPLIT_SIZES = {"train": 5000, "validation": 500}
_SPLIT_IDS = {"train": 0, "validation": 1}
_SUPERSAMPLE = 4  # polygon edges are anti-aliased by drawing larger and box-reducing


def _unit_outline(shape: str) -> np.ndarray:
    """Outline vertices ``(n, 2)`` of a shape whose circumradius is 1."""
    if shape == "circle":
        angles = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
        radii = np.ones_like(angles)
    elif shape == "square":
        angles = np.pi / 4 + np.arange(4) * np.pi / 2
        radii = np.ones(4)
    elif shape == "triangle":
        angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        radii = np.ones(3)
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    elif shape == "cross":
        a = 0.32  # half-width of an arm
        arm = np.array([[a, 1.0], [-a, 1.0], [-a, a]])
        quarter_turn = np.array([[0.0, -1.0], [1.0, 0.0]])
        quarters = [arm @ np.linalg.matrix_power(quarter_turn, k).T for k in range(4)]
        return np.concatenate(quarters) / np.hypot(a, 1.0)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_OUTLINES = {s: _unit_outline(s) for s in SHAPES}


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (all in [0, 1]) to RGB floats in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted two-colour gradient with faint stripes and grain, ``(S, S, 3)`` in [0, 1]."""
    c0, c1 = (_hsv_to_rgb(rng.uniform(), rng.uniform(0.05, 0.35), rng.uniform(0.25, 0.9)) for _ in range(2))
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    phi = rng.uniform(0.0, 2 * np.pi)
    t = np.clip(0.5 + (x - 0.5) * np.cos(phi) + (y - 0.5) * np.sin(phi), 0.0, 1.0)
    img_HW3 = c0 * (1.0 - t[..., None]) + c1 * t[..., None]
    psi = rng.uniform(0.0, np.pi)
    cycles = rng.uniform(2.0, 7.0)
    stripes = np.sin(2 * np.pi * cycles * (x * np.cos(psi) + y * np.sin(psi)) + rng.uniform(0, 2 * np.pi))
    img_HW3 = img_HW3 + rng.uniform(0.02, 0.07) * stripes[..., None]
    img_HW3 = img_HW3 + rng.normal(0.0, 0.015, size=img_HW3.shape)
    return np.clip(img_HW3, 0.0, 1.0)


def _shape_alpha(shape: str, centre: np.ndarray, radius: float, angle: float, size: int) -> np.ndarray:
    """Anti-aliased coverage ``(S, S)`` in [0, 1] of the rotated, placed shape."""
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    vertices = (_OUTLINES[shape] @ rotation.T * radius + centre) * _SUPERSAMPLE
    big = size * _SUPERSAMPLE
    mask = PIL.Image.new("L", (big, big), 0)
    PIL.ImageDraw.Draw(mask).polygon([tuple(v) for v in vertices], fill=255)
    return np.asarray(mask.reduce(_SUPERSAMPLE), np.float64) / 255.0


def draw_example(label: int, seed: int | np.random.SeedSequence, size: int) -> np.ndarray:
    """The image ``(S, S, 3)`` uint8 of class ``label`` for a given per-image seed."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label {label} is outside [0, {NUM_CLASSES})")
    colour, shape = divmod(label, len(SHAPES))
    shape = SHAPES[shape]
    rng = np.random.default_rng(seed)
    img_HW3 = _background(rng, size)

    radius = rng.uniform(0.3, 0.45) * size
    centre = rng.uniform(radius, size - radius, size=2)
    alpha_HW = _shape_alpha(shape, centre, radius, rng.uniform(-1.0, 1.0) * MAX_TILT, size)

    hue = (tuple(COLOUR_HUES.values())[colour] + rng.uniform(-0.04, 0.04)) % 1.0
    fill = _hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    # Light from a random side: a linear shade across the object gives it volume.
    light = rng.uniform(0.0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    along = ((x - centre[0]) * np.cos(light) + (y - centre[1]) * np.sin(light)) / radius
    shade = np.clip(1.0 - 0.22 * along, 0.55, 1.2)[..., None]
    obj_HW3 = np.clip(fill * shade, 0.0, 1.0)

    img_HW3 = img_HW3 * (1.0 - alpha_HW[..., None]) + obj_HW3 * alpha_HW[..., None]
    # Rounded, not images.to_uint8: this draws the dataset (its bytes are fixed; every figure
    # measured on it depends on them), it does not quantise a model's output.
    return np.round(img_HW3 * 255.0).astype(np.uint8)


def example_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """Per-image seed: images do not depend on generation order or sharding."""
    return np.random.SeedSequence([seed, _SPLIT_IDS[split], index])


def _png(img_HW3: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(img_HW3).save(buf, format="PNG", compress_level=3)  # fast, still lossless
    return buf.getvalue()


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    image_size: int = 64
    seed: int = 0


class BuiltinShapes(tfds.core.GeneratorBasedBuilder):
    """Coloured shapes on textured backgrounds: 10 balanced classes."""

    VERSION = tfds.core.Version("3.0.0")
    RELEASE_NOTES = {
        "1.0.0": "First version.",
        "2.0.0": "Larger objects: circumradius 0.30-0.45 of the side (was 0.20-0.36).",
        "3.0.0": "Objects nearly upright: rotated by at most 15 degrees (was any angle).",
    }
    BUILDER_CONFIGS = [
        ShapesConfig(name=f"res{s}", description=f"{s}x{s} px images", image_size=s) for s in RESOLUTIONS
    ]
    DEFAULT_CONFIG_NAME = "res64"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9's default probes the ``importlib_resources`` backport, which is
        # not installed on Python >= 3.9; this file is the answer it would find.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is drawn locally
        return {split: self._generate_examples(split) for split in SPLIT_SIZES}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        for index in range(SPLIT_SIZES[split]):
            label = index % NUM_CLASSES  # exact balance
            img_HW3 = draw_example(label, example_seed(cfg.seed, split, index), cfg.image_size)
            yield index, {"image": _png(img_HW3), "label": label}


def config_name_for(image_size: int) -> str:
    """The smallest built-in resolution that covers ``image_size`` (no upsampling)."""
    for s in RESOLUTIONS:
        if image_size <= s:
            return f"res{s}"
    raise ValueError(
        f"builtin_shapes is drawn at up to {RESOLUTIONS[-1]} px; image_size={image_size} is larger"
    )
