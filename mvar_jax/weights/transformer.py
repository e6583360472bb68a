"""Official VAR / MVAR / M-VAR transformer checkpoints <-> ``(TransformerConfig, params)``.

Reads the plain VAR state dicts (``var_d16.pth`` .. ``var_d30.pth``) and the MVAR
release trainer states (``mvar-d16.pth``, ``mvar-finetune-d16.pth``, ...); both
share one key layout. M-VAR's (OliverRensu/MVAR) adds ``blocks.<i>.mamba.*`` and
a 9-way ``ada_lin``. The architecture is read off the tensor shapes; the
expected official keys are derived from the Flax parameter tree (``eval_shape``),
so the converter cannot drift from the model.

VAR weights load into an MVAR model unchanged (the official MVAR fine-tuning
starts from them): pass ``family='mvar'``. ``state_dict_from_params`` is the way
back: the parameters plus the buffers the official classes register, so that
``load_state_dict(..., strict=True)`` takes them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from mvar_jax.atomic_write import atomic_write
from mvar_jax.errors import CheckpointError, StateDictMismatchError, check_keys
from mvar_jax.models import attention, families, transformer
from mvar_jax.models.config import OFFICIAL_PYRAMIDS, TransformerConfig
from mvar_jax.models.family import Family
from mvar_jax.weights.state_dict import load_state_dict

# Flax names that differ from the official ones (other than blocks_<i> -> blocks.<i>).
_OFFICIAL_NAMES = {
    "kernel": "weight",
    "embedding": "weight",
    "pos_embed": "pos_1LC",
    "scale_mul": "scale_mul_1H11",
    "scale": "weight",  # Mamba2's gated RMSNorm
}
# Official modules that are nn.Sequential(SiLU, Linear): the Linear is item 1.
_SEQUENTIAL_LINEARS = ("ada_lin", "shared_ada_lin")
# Official parameters with unit axes the Flax tree drops: Flax shape -> official shape.
_UNIT_AXES = {
    "pos_start": lambda s: (1, *s),
    "pos_embed": lambda s: (1, *s),
    "scale_mul": lambda s: (1, *s, 1, 1),
    "ada_gss": lambda s: (1, 1, *s),
}
# Config fields the converter reads off the tensors; they cannot be overridden.
_FROM_TENSORS = (
    "vocab_size",
    "cvae",
    "num_classes",
    "depth",
    "embed_dim",
    "mlp_ratio",
    "shared_aln",
    "attn_l2_norm",
)


def official_key(path: tuple[str, ...]) -> str:
    """Flax parameter path -> official state-dict key."""
    parts = []
    for name in path:
        block = re.fullmatch(r"blocks_(\d+)", name)
        if block:
            parts += ["blocks", block.group(1)]
        elif name in _SEQUENTIAL_LINEARS:
            parts += [name, "1"]
        else:
            parts.append(_OFFICIAL_NAMES.get(name, name))
    return ".".join(parts)


def _official_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel":  # torch Linear stores (out, in).
        return tuple(reversed(shape))
    return _UNIT_AXES.get(leaf, tuple)(shape)


def buffer_keys(depth: int) -> tuple[str, ...]:
    """Official buffers the Flax model recomputes (masks, level ids, zero k bias,
    and M-VAR's per-scale token counts)."""
    return (
        "lvl_1L",
        "attn_bias_for_masking",
        *(f"blocks.{i}.attn.zero_k_bias" for i in range(depth)),
        *(f"blocks.{i}.attn.patch_nums" for i in range(depth)),
    )


def _param_layout(
    config: TransformerConfig,
) -> dict[tuple[str, ...], tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """Flax path -> (official key, Flax shape, official shape), from eval_shape."""
    flat = traverse_util.flatten_dict(transformer.param_shapes(config)["params"])
    return {
        path: (official_key(path), leaf.shape, _official_shape(path[-1], leaf.shape))
        for path, leaf in flat.items()
    }


def official_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for every parameter of the model (no allocation)."""
    return {key: shape for key, _, shape in _param_layout(config).values()}


def pyramid_of(
    state_dict: Mapping[str, np.ndarray], patch_nums: Sequence[int] | None = None
) -> tuple[int, ...]:
    """The token pyramid of a transformer state dict: ``patch_nums`` checked against the
    length of ``pos_1LC``, or (None) the official pyramid of that length."""
    seq_len = state_dict["pos_1LC"].shape[1]
    if patch_nums is None:
        matching = [p for p in OFFICIAL_PYRAMIDS if sum(pn * pn for pn in p) == seq_len]
        if not matching:
            raise ValueError(
                f"pos_1LC has {seq_len} positions, the length of no official token pyramid "
                f"({', '.join(str(p) for p in OFFICIAL_PYRAMIDS)}); pass its patch_nums "
                "(convert: --patch_nums)"
            )
        return matching[0]
    if sum(pn * pn for pn in patch_nums) != seq_len:
        raise ValueError(
            f"pos_1LC has {seq_len} positions but patch_nums {tuple(patch_nums)} "
            f"give {sum(pn * pn for pn in patch_nums)}; pass the pyramid it was trained on"
        )
    return tuple(patch_nums)


def detect_family(state_dict: Mapping[str, np.ndarray], patch_nums: tuple[int, ...]) -> str:
    """The family an official state dict was trained as.

    The family whose marker key it holds (M-VAR's Mamba2 layers), else the one
    whose training mask it saved as ``attn_bias_for_masking``: VAR's and MVAR's
    weights are laid out alike, and only that buffer (block-causal or
    block-diagonal) tells them apart.
    """
    for family in families.FAMILIES.values():
        if family.weights_marker and family.weights_marker in state_dict:
            return family.name
    masked = [f for f in families.FAMILIES.values() if f.weights_marker is None and f.training_mask]
    names = " or ".join(repr(f.name) for f in masked)
    mask = state_dict.get("attn_bias_for_masking")
    if mask is None:
        raise CheckpointError(
            f"cannot tell {' from '.join(f.title for f in masked)}: the state dict has no "
            f"attn_bias_for_masking buffer; pass family={names}"
        )
    allowed = np.isfinite(np.asarray(mask)).reshape(mask.shape[-2:])
    for family in masked:
        expected = family.training_mask(patch_nums)
        if expected.shape == allowed.shape and np.array_equal(allowed, expected):
            return family.name
    raise CheckpointError(
        "attn_bias_for_masking is none of the known training masks ("
        + ", ".join(f"{f.title}'s" for f in masked)
        + f"); pass family={names}"
    )


def _check_marker(state_dict: Mapping[str, np.ndarray], family: Family) -> None:
    """CheckpointError when the file holds another family's marker, or lacks this one's."""
    for other in families.FAMILIES.values():
        marker = other.weights_marker
        if marker and (marker in state_dict) != (other is family):
            if other is family:
                raise CheckpointError(
                    f"family={family.name!r}, but the state dict has no {marker}: "
                    f"these are not {family.title} weights"
                )
            raise CheckpointError(
                f"family={family.name!r}, but the state dict holds {marker}: these are {other.title} weights "
                f"(family={other.name!r}, converter flag --{other.name})"
            )


def config_from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    *,
    family: str | None = None,
    num_heads: int | None = None,
    patch_nums: tuple[int, ...] | None = None,
    **overrides: Any,
) -> TransformerConfig:
    """The architecture of an official state dict.

    Args:
      family: the model family (``models.families``); None reads it off the file
        (``detect_family``). VAR weights load into MVAR unchanged (the official
        MVAR fine-tuning starts from them).
      num_heads: needed only without L2-normalised attention (default: depth);
        otherwise the per-head ``scale_mul_1H11`` gives it.
      patch_nums: None: the official pyramid (256 or 512 px) of ``pos_1LC``'s length;
        else checked against it.
      **overrides: other TransformerConfig fields (kernel_size, refine_step,
        dtype, neighborhood_impl, drop_path_rate, cond_drop_rate, norm_eps).
    """
    fixed = sorted(set(overrides) & set(_FROM_TENSORS))
    if fixed:
        raise ValueError(f"{fixed} are read from the checkpoint and cannot be overridden")
    needed = ("word_embed.weight", "class_emb.weight", "head.weight", "pos_1LC", "blocks.0.ffn.fc1.weight")
    absent = [k for k in needed if k not in state_dict]
    if absent:  # none of a transformer's keys: every key of the file is unexpected
        foreign = sorted(state_dict) if len(absent) == len(needed) else ()
        raise StateDictMismatchError("transformer state dict", missing=absent, unexpected=foreign)

    embed_dim, cvae = state_dict["word_embed.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in state_dict
    if attn_l2_norm:
        heads_in_file = state_dict["blocks.0.attn.scale_mul_1H11"].shape[1]
        if num_heads not in (None, heads_in_file):
            raise ValueError(
                f"num_heads={num_heads} but the checkpoint's scale_mul_1H11 has {heads_in_file} heads"
            )
        num_heads = heads_in_file
    patch_nums = pyramid_of(state_dict, patch_nums)
    if family is None:
        family = detect_family(state_dict, patch_nums)
    _check_marker(state_dict, families.get(family))

    return TransformerConfig(
        vocab_size=state_dict["head.weight"].shape[0],
        cvae=cvae,
        num_classes=state_dict["class_emb.weight"].shape[0] - 1,
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        mlp_ratio=state_dict["blocks.0.ffn.fc1.weight"].shape[0] / embed_dim,
        shared_aln="shared_ada_lin.1.weight" in state_dict,
        attn_l2_norm=attn_l2_norm,
        patch_nums=patch_nums,
        family=family,
        **overrides,
    )


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: TransformerConfig) -> dict[str, Any]:
    """``{'params': tree of float32 numpy arrays}`` for ``Transformer(config)``.

    Raises StateDictMismatchError listing missing, unexpected and mis-shaped keys.
    """
    layout = _param_layout(config)
    check_keys(
        state_dict,
        {key: shape for key, _, shape in layout.values()},
        what="transformer state dict",
        ignore=buffer_keys(config.depth),
    )
    flat = {}
    for path, (key, shape, _) in layout.items():
        value = np.asarray(state_dict[key], np.float32)
        flat[path] = value.T if path[-1] == "kernel" else value.reshape(shape)
    return {"params": traverse_util.unflatten_dict(flat)}


def load_transformer(path: str | os.PathLike, **config_args: Any) -> tuple[TransformerConfig, dict[str, Any]]:
    """Reads an official ``.pth`` (plain or trainer state) into ``(config, params)``.

    ``config_args`` go to ``config_from_state_dict`` (e.g. ``family='mvar'``
    to fine-tune VAR weights as MVAR, ``dtype='bfloat16'``).
    """
    state_dict = load_state_dict(path)
    config = config_from_state_dict(state_dict, **config_args)
    return config, params_from_state_dict(state_dict, config)


def official_buffers(config: TransformerConfig) -> dict[str, np.ndarray]:
    """The buffers of the official model ``config`` describes, as its files hold them.

    ``lvl_1L`` (int64 scale ids), ``attn_bias_for_masking`` (0 / -inf, the family's
    training mask, ``(1, 1, L, L)``), each attention's zero ``zero_k_bias`` and the
    family's own (``Family.attention_buffers``).
    """
    family = families.get(config.family)
    if family.training_mask is None:
        raise CheckpointError(f"{family.title} has no official training mask to write")
    allowed_LL = family.training_mask(config.patch_nums)
    buffers = {
        "lvl_1L": attention.scale_ids(config.patch_nums, 0, config.num_scales)[None].astype(np.int64),
        "attn_bias_for_masking": np.where(allowed_LL, 0.0, -np.inf).astype(np.float32)[None, None],
    }
    extra = family.attention_buffers(config)
    for i in range(config.depth):
        buffers[f"blocks.{i}.attn.zero_k_bias"] = np.zeros(config.embed_dim, np.float32)
        buffers.update({f"blocks.{i}.attn.{name}": value for name, value in extra.items()})
    return buffers


def state_dict_from_params(variables: Mapping[str, Any], config: TransformerConfig) -> dict[str, np.ndarray]:
    """``{'params': ...}`` of ``Transformer(config)`` (blocks stacked or not) -> the official
    state dict: every parameter at its official key and shape (float32) plus
    ``official_buffers``. The inverse of ``params_from_state_dict``.

    Raises StateDictMismatchError naming the params that do not fit the config.
    """
    if transformer.blocks_are_stacked(variables):
        variables = transformer.unstack_blocks(variables)
    flat = traverse_util.flatten_dict(dict(variables["params"]))
    layout = _param_layout(config)
    check_keys(
        {"/".join(path): x for path, x in flat.items()},
        {"/".join(path): shape for path, (_, shape, _) in layout.items()},
        what="transformer params",
    )
    state_dict = {}
    for path, (key, _, official) in layout.items():
        value = np.asarray(flat[path], np.float32)
        state_dict[key] = value.T if path[-1] == "kernel" else value.reshape(official)
    return {**state_dict, **official_buffers(config)}


def save_official_transformer(
    path: str | os.PathLike, config: TransformerConfig, variables: Mapping[str, Any]
) -> None:
    """Writes ``state_dict_from_params`` as a ``.pth`` (``torch.save`` of a dict of tensors),
    replacing ``path`` atomically."""
    import torch  # Conversion-only dependency.

    state_dict = state_dict_from_params(variables, config)
    with atomic_write(path) as f:
        torch.save({key: torch.from_numpy(np.array(v)) for key, v in state_dict.items()}, f)


def official_class_args(config: TransformerConfig) -> dict[str, Any]:
    """Keyword arguments of the official transformer class (besides its VQVAE) that rebuild
    ``config``."""
    return {
        "num_classes": config.num_classes,
        "depth": config.depth,
        "embed_dim": config.embed_dim,
        "num_heads": config.num_heads,
        "mlp_ratio": config.mlp_ratio,
        "shared_aln": config.shared_aln,
        "attn_l2_norm": config.attn_l2_norm,
        "patch_nums": tuple(config.patch_nums),
    }
