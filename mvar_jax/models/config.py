"""A VAR-family transformer's architecture as one frozen dataclass, and the token pyramid.

Every field and default is written once, here. A training config's ``model`` section
holds these fields by name and builds the dataclass from them
(``TransformerConfig(**fields)``), a model directory stores ``to_dict()`` beside its
params, and the converter reads what it can off the official tensors.

The checks below are those every family shares. What a family adds (MVAR's
``refine_step`` and ``kernel_size`` against the pyramid, M-VAR's Mamba2 sizes) is
checked by the family itself (``models.families.of``), which every model build
goes through.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

# The official token pyramids (VAR utils/arg_util.py ``--pn 256 / 512``): the side of each
# scale's token map, with the release tokenizer's 16x downsampling.
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
OFFICIAL_PYRAMIDS = (PATCH_NUMS_256, PATCH_NUMS_512)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# How MVAR's spatial-Markov attention runs (``models.attention.neighborhood_attention``).
NEIGHBORHOOD_IMPLS = ("auto", "masked", "reference", "pallas", "pallas_interpret")
# What the backward pass of a training step keeps of each block: 'none' every activation the
# gradient needs (plain autodiff), 'attention' all but the attention probabilities (recomputed from
# q, k and each row's log-sum-exp), 'block' only the block's input (the block runs again when its
# gradient arrives, its attention as with 'attention').
REMATS = ("none", "attention", "block")


def official_drop_path_rate(depth: int) -> float:
    """Stochastic depth of the official runs (models/__init__.py: ``dpr = 0.1 * depth / 24``)."""
    return 0.1 * depth / 24


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as stored beside its params: JSON-friendly (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    """The inverse of ``to_dict``; ValueError naming unknown fields (missing ones take defaults)."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of a VAR / MVAR / M-VAR transformer.

    ``family`` names the model family (``models.families``: 'mvar', 'var', 'm_var').
    ``embed_dim`` and ``num_heads`` default to the official convention
    ``64 * depth`` and ``depth``, ``drop_path_rate=None`` to the official
    ``0.1 * depth / 24``; drop path and ``cond_drop_rate`` act in training only.

    MVAR's fields: ``refine_step`` (the first scale with spatial-Markov
    attention), ``kernel_size`` (its neighbourhood side), ``neighborhood_impl``
    and ``neighborhood_tiling`` (how that attention runs: the Pallas kernel's
    ``(block_q, block_k, num_warps, num_stages)`` for every spatial-Markov map,
    None for ``kernels.spatial_markov.default_tiling``). M-VAR's:
    ``mamba_inference_chunk_size``, the Mamba2 scan's chunk when inference
    advances a carried state by one scale (training and the official re-run keep
    mamba_ssm's 256); the result does not depend on it, the cost does. Other
    families ignore them.
    """

    family: str = "mvar"
    vocab_size: int = 4096
    cvae: int = 32
    num_classes: int = 1000
    depth: int = 16
    embed_dim: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    kernel_size: int = 7
    refine_step: int = 8
    drop_path_rate: float | None = 0.0
    cond_drop_rate: float = 0.1
    dtype: str = "float32"
    neighborhood_impl: str = "auto"
    neighborhood_tiling: tuple[int, int, int, int] | None = None
    mamba_inference_chunk_size: int = 16
    remat: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if self.neighborhood_tiling is not None:
            object.__setattr__(self, "neighborhood_tiling", tuple(int(t) for t in self.neighborhood_tiling))
        if self.embed_dim is None:
            object.__setattr__(self, "embed_dim", 64 * self.depth)
        if self.num_heads is None:
            object.__setattr__(self, "num_heads", self.depth)
        if self.drop_path_rate is None:
            object.__setattr__(self, "drop_path_rate", official_drop_path_rate(self.depth))
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str):
            raise ValueError(f"TransformerConfig: {msg}")

        if not isinstance(self.family, str) or not self.family.isidentifier():
            fail(f"family must be a family's name such as 'mvar', got {self.family!r}")
        sizes = ("vocab_size", "cvae", "num_classes", "depth", "embed_dim", "num_heads")
        for name in (*sizes, "kernel_size", "refine_step", "mamba_inference_chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.embed_dim % self.num_heads:
            fail(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not (self.mlp_ratio > 0 and self.norm_eps > 0):
            fail(f"mlp_ratio and norm_eps must be > 0, got {self.mlp_ratio}, {self.norm_eps}")
        if len(self.patch_nums) < 2 or min(self.patch_nums) < 1:
            # Guidance and sampling schedules interpolate over num_scales - 1 steps.
            fail(f"patch_nums must hold >= 2 positive scales, got {self.patch_nums}")
        if self.kernel_size % 2 == 0:
            fail(f"kernel_size must be odd, got {self.kernel_size}")
        for name in ("drop_path_rate", "cond_drop_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            fail(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.remat not in REMATS:
            fail(f"remat must be one of {REMATS}, got {self.remat!r}")
        if self.neighborhood_impl not in NEIGHBORHOOD_IMPLS:
            fail(f"neighborhood_impl must be one of {NEIGHBORHOOD_IMPLS}, got {self.neighborhood_impl!r}")
        if self.neighborhood_tiling is not None and len(self.neighborhood_tiling) != 4:
            fail(
                "neighborhood_tiling must be (block_q, block_k, num_warps, num_stages), "
                f"got {self.neighborhood_tiling}"
            )

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        """L: tokens over all scales (680 at 256 px)."""
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def first_l(self) -> int:
        """Tokens of scale 0, all of them start (class) tokens."""
        return self.patch_nums[0] ** 2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    def token_range(self, first_scale: int, last_scale: int) -> tuple[int, int]:
        """``[begin, end)`` token offsets of scales ``[first_scale, last_scale)``."""
        if not 0 <= first_scale < last_scale <= self.num_scales:
            raise ValueError(
                f"need 0 <= first_scale < last_scale <= {self.num_scales}, got [{first_scale}, {last_scale})"
            )
        sizes = [pn * pn for pn in self.patch_nums]
        return sum(sizes[:first_scale]), sum(sizes[:last_scale])

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @property
    def lean_attention_backward(self) -> bool:
        """Whether training attention recomputes its probabilities (every ``remat`` but 'none')."""
        return self.remat != "none"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransformerConfig:
        return from_dict(cls, d)


@dataclasses.dataclass(frozen=True)
class InitScales:
    """Multipliers of the official initialisation (train.py's ``aln``, ``alng``, ``hd``, ``ini``).

    They shape fresh params only: ``apply`` never reads them, so a model restored
    from a checkpoint needs none. ``std`` is the official ``--ini``: only its
    automatic setting (-1: ``sqrt(1 / (3 * embed_dim))``) is implemented.
    """

    adaln: float = 0.5  # AdaLN projections: the blocks' scale/shift columns, head_nm
    adaln_gamma: float = 1e-5  # the blocks' residual gates: each block starts near identity
    head: float = 0.02  # the classifier head
    std: float = -1.0

    def __post_init__(self):
        for name in ("adaln", "adaln_gamma", "head"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"InitScales: {name} must be a finite number >= 0, got {value!r}")
        if self.std != -1:
            raise ValueError(
                f"InitScales: std={self.std}: only the official automatic init "
                "(-1, std = sqrt(1 / (3 * embed_dim))) is implemented"
            )
