"""Official VQVAE state dict (``vae_ch160v4096z32.pth``) <-> ``VQVAEConfig`` and Flax params.

One translation, ``official_key`` / ``official_shape``, maps each leaf of the
Flax parameter tree to its official key and tensor shape. The expected state
dict is generated from the tree (``jax.eval_shape``, nothing allocated), so the
converter checks keys and shapes exactly before touching any value. The same
layout writes a tokenizer back as an official state dict
(``vqvae_to_state_dict``, ``save_official_vqvae``) that the official ``VQVAE``
loads with ``strict=True``.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mvar_jax.atomic_write import atomic_write
from mvar_jax.errors import CheckpointError, StateDictMismatchError, check_keys
from mvar_jax.models.quantizer import num_phis
from mvar_jax.models.vqvae import VQVAEConfig, abstract_variables
from mvar_jax.weights.state_dict import load_state_dict

# Training statistics of the official quantizer (an EMA of code hits per scale,
# (num_scales, vocab)), not a parameter; read and ignored, written for strict loading.
VOCAB_HIT_KEY = "quantize.ema_vocab_hit_SV"
IGNORED_KEYS = (VOCAB_HIT_KEY,)
# The architecture the official VQVAE class hard-codes (models/vqvae.py ddconfig);
# the other VQVAEConfig fields are its constructor arguments.
_OFFICIAL_CLASS_FIXED = {
    "ch_mult": (1, 1, 2, 2, 4),
    "num_res_blocks": 2,
    "using_sa": True,
    "using_mid_sa": True,
}

# VQVAEConfig fields the official class takes as constructor arguments of the same name
# (and ``patch_nums`` as ``v_patch_nums``).
_OFFICIAL_CLASS_ARGS = (
    "vocab_size",
    "z_channels",
    "ch",
    "beta",
    "using_znorm",
    "quant_conv_ks",
    "quant_resi",
    "share_quant_resi",
)
_DEFAULT = VQVAEConfig()
# Flax names the items of a module list ``<list>_<i>``; the official ModuleLists use ``<list>.<i>``.
_LIST_ITEM = re.compile(r"^(down|up|block|attn)_(\d+)$")
_PHI = re.compile(r"^phi_(\d+)$")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _phi_prefix(index: str, share_quant_resi: int) -> str:
    """Official module of Phi ``index``: the three sharing modes store it differently."""
    if share_quant_resi == 0:
        return f"quant_resi.{index}"
    if share_quant_resi == 1:
        return "quant_resi.qresi"
    return f"quant_resi.qresi_ls.{index}"


def official_key(path: tuple[str, ...], config: VQVAEConfig) -> str:
    """Official state-dict key of the Flax param at ``path`` (no leading 'params')."""
    parts = []
    for parent, name in zip(("",) + path[:-2], path[:-1]):
        item, phi = _LIST_ITEM.match(name), _PHI.match(name)
        if item and parent != "mid":  # mid's children really are named block_1, attn_1, block_2.
            parts.append(f"{item[1]}.{item[2]}")
        elif phi:
            parts.append(_phi_prefix(phi[1], config.share_quant_resi))
        else:
            parts.append(name)
    return ".".join(parts + [_LEAF_NAMES[path[-1]]])


def official_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Official tensor shape of a Flax param: convs OIHW, 1x1 convs (Dense here) OI11."""
    if path[-1] == "kernel" and len(shape) == 4:
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if path[-1] == "kernel" and len(shape) == 2:
        i, o = shape
        return (o, i, 1, 1)
    return tuple(shape)


def _to_flax(path: tuple[str, ...], value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """An official tensor as the Flax param of ``shape`` at ``path`` (inverse of official_shape)."""
    if path[-1] == "kernel" and len(shape) == 2:
        return value[:, :, 0, 0].T
    if path[-1] == "kernel":
        return value.transpose(2, 3, 1, 0)
    return value


def _to_official(path: tuple[str, ...], value: jax.Array) -> jax.Array:
    """A Flax param as its official tensor (``_to_flax`` undone): OIHW, 1x1 convs OI11."""
    if path[-1] == "kernel" and value.ndim == 2:
        return value.T[:, :, None, None]
    if path[-1] == "kernel":
        return value.transpose(3, 2, 0, 1)
    return value


@functools.lru_cache(maxsize=8)
def _flax_param_shapes(config: VQVAEConfig) -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
    """``(path without 'params', shape)`` of every Flax param, via eval_shape."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_variables(config)["params"])[0]
    return tuple((tuple(k.key for k in keypath), leaf.shape) for keypath, leaf in flat)


def expected_official_shapes(config: VQVAEConfig) -> dict[str, tuple[int, ...]]:
    """Every official key the model needs, with its shape (ignored buffers excluded)."""
    return {official_key(p, config): official_shape(p, shape) for p, shape in _flax_param_shapes(config)}


def _shape_of(sd: Mapping[str, np.ndarray], key: str, ndim: int) -> tuple[int, ...]:
    """Shape of a tensor the architecture is read from; names the key if absent or malformed."""
    if key not in sd:
        raise StateDictMismatchError("VQVAE state dict (reading the architecture)", missing=[key])
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"VQVAE state dict: {key} has shape {shape}, expected {ndim} dimensions")
    return shape


def _count(sd: Mapping[str, np.ndarray], pattern: str) -> int:
    """Number of distinct indices i for which some key matches ``pattern % i``."""
    regex = re.compile("^" + re.escape(pattern).replace("%d", r"(\d+)") + "$")
    return len({m[1] for m in map(regex.match, sd) if m})


def config_from_state_dict(
    sd: Mapping[str, np.ndarray],
    patch_nums: tuple[int, ...] = _DEFAULT.patch_nums,
    quant_resi: float = _DEFAULT.quant_resi,
    using_znorm: bool = _DEFAULT.using_znorm,
) -> VQVAEConfig:
    """Reads the architecture off the tensor shapes.

    ``patch_nums``, ``quant_resi`` and ``using_znorm`` leave no trace in the
    weights and are arguments (defaults: the released tokenizer's).
    """
    if not any(key in sd for key in ("quantize.embedding.weight", "encoder.conv_in.weight")):
        raise StateDictMismatchError(
            "VQVAE state dict", missing=["quantize.embedding.weight", "encoder.conv_in.weight"], unexpected=sd
        )
    vocab_size, z_channels = _shape_of(sd, "quantize.embedding.weight", 2)
    ch = _shape_of(sd, "encoder.conv_in.weight", 4)[0]
    num_levels = _count(sd, "encoder.down.%d.block.0.conv1.weight")
    if num_levels == 0:
        _shape_of(sd, "encoder.down.0.block.0.conv1.weight", 4)  # Raises, naming the key.
    ch_mult = []
    for i in range(num_levels):
        width = _shape_of(sd, f"encoder.down.{i}.block.0.conv1.weight", 4)[0]
        if width % ch:
            raise CheckpointError(
                f"encoder.down.{i}.block.0.conv1.weight has {width} output channels, "
                f"not a multiple of ch={ch}"
            )
        ch_mult.append(width // ch)
    num_phis_partial = _count(sd, "quantize.quant_resi.qresi_ls.%d.weight")
    if num_phis_partial:
        share_quant_resi = num_phis_partial
    elif "quantize.quant_resi.qresi.weight" in sd:
        share_quant_resi = 1
    elif _count(sd, "quantize.quant_resi.%d.weight"):
        share_quant_resi = 0
    elif num_phis(quant_resi, _DEFAULT.share_quant_resi, len(patch_nums)):
        # Otherwise check_keys would list every Phi key as missing without saying why.
        raise CheckpointError(
            f"VQVAE state dict has no Phi weights (quantize.quant_resi.*), but "
            f"quant_resi={quant_resi} needs them; pass quant_resi=0 for a tokenizer "
            f"whose Phi is the identity"
        )
    else:  # Identity Phi: no weights, the sharing mode is moot.
        share_quant_resi = _DEFAULT.share_quant_resi
    fields = dict(
        vocab_size=vocab_size,
        z_channels=z_channels,
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=_count(sd, "encoder.down.0.block.%d.conv1.weight"),
        using_sa=f"encoder.down.{num_levels - 1}.attn.0.qkv.weight" in sd,
        using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd,
        quant_conv_ks=_shape_of(sd, "quant_conv.weight", 4)[-1],
        quant_resi=quant_resi,
        share_quant_resi=share_quant_resi,
        using_znorm=using_znorm,
        patch_nums=tuple(patch_nums),
    )
    try:
        return VQVAEConfig(**fields)
    except ValueError as e:
        raise CheckpointError(
            f"VQVAE state dict: the architecture read off its shapes is invalid: {e}"
        ) from e


def vqvae_from_state_dict(
    sd: Mapping[str, np.ndarray],
    patch_nums: tuple[int, ...] = _DEFAULT.patch_nums,
    quant_resi: float = _DEFAULT.quant_resi,
    using_znorm: bool = _DEFAULT.using_znorm,
) -> tuple[VQVAEConfig, dict[str, Any]]:
    """Official VQVAE state dict (numpy) -> (config, ``{'params': ...}`` float32).

    Raises StateDictMismatchError listing missing, unexpected and mis-shaped
    keys; ``quantize.ema_vocab_hit_SV`` is accepted and ignored.
    """
    config = config_from_state_dict(sd, patch_nums, quant_resi, using_znorm)
    check_keys(sd, expected_official_shapes(config), what="VQVAE state dict", ignore=IGNORED_KEYS)
    params = {
        path: jnp.asarray(_to_flax(path, sd[official_key(path, config)], shape), jnp.float32)
        for path, shape in _flax_param_shapes(config)
    }
    return config, {"params": traverse_util.unflatten_dict(params)}


def load_official_vqvae(
    path: str | os.PathLike,
    patch_nums: tuple[int, ...] = _DEFAULT.patch_nums,
    quant_resi: float = _DEFAULT.quant_resi,
    using_znorm: bool = _DEFAULT.using_znorm,
) -> tuple[VQVAEConfig, dict[str, Any]]:
    """Reads an official VQVAE ``.pth`` file; see ``vqvae_from_state_dict``."""
    sd = load_state_dict(path)
    return vqvae_from_state_dict(sd, patch_nums, quant_resi, using_znorm)


def vqvae_to_state_dict(
    config: VQVAEConfig, variables: Mapping[str, Any], *, vocab_hits: jax.Array | np.ndarray | None = None
) -> dict[str, jax.Array]:
    """``{'params': ...}`` of ``VQVAE(config)`` -> the official state dict (float32).

    The inverse of ``vqvae_from_state_dict``: every official key with its official
    shape, plus the ``quantize.ema_vocab_hit_SV`` buffer that the official class
    needs for ``strict=True`` loading: ``vocab_hits`` (code hits per scale,
    ``(len(patch_nums), vocab_size)``) or zeros. Pure jnp, so ``jax.eval_shape``
    gives the layout without allocating. Raises StateDictMismatchError naming the
    params that do not fit the config.
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise CheckpointError(
            "VQVAE variables: expected a dict {'params': ...}, got "
            + (f"keys {sorted(variables)}" if isinstance(variables, Mapping) else type(variables).__name__)
        )
    flat = traverse_util.flatten_dict(dict(variables["params"]))
    check_keys(
        {"/".join(path): x for path, x in flat.items()},
        {"/".join(path): shape for path, shape in _flax_param_shapes(config)},
        what="VQVAE params",
    )
    sd = {
        official_key(path, config): _to_official(path, jnp.asarray(flat[path], jnp.float32))
        for path, _ in _flax_param_shapes(config)
    }
    hits_shape = (len(config.patch_nums), config.vocab_size)
    if vocab_hits is None:
        vocab_hits = jnp.zeros(hits_shape, jnp.float32)
    elif tuple(np.shape(vocab_hits)) != hits_shape:
        raise ValueError(
            f"vocab_hits has shape {tuple(np.shape(vocab_hits))}, expected "
            f"(len(patch_nums), vocab_size) = {hits_shape}"
        )
    sd[VOCAB_HIT_KEY] = jnp.asarray(vocab_hits, jnp.float32)
    return sd


def official_class_args(config: VQVAEConfig) -> dict[str, Any]:
    """Arguments of the official ``VQVAE(...)`` that rebuilds ``config``.

    Raises ValueError naming the fields the official class hard-codes to other
    values (its state dict is still written; only a modified class loads it).
    """
    differ = [
        f"{name}={getattr(config, name)!r} (official: {value!r})"
        for name, value in _OFFICIAL_CLASS_FIXED.items()
        if getattr(config, name) != value
    ]
    if differ:
        raise ValueError("the official VQVAE class cannot build this tokenizer: " + ", ".join(differ))
    args = {name: getattr(config, name) for name in _OFFICIAL_CLASS_ARGS}
    return {**args, "v_patch_nums": config.patch_nums}


def save_official_vqvae(
    path: str | os.PathLike,
    config: VQVAEConfig,
    variables: Mapping[str, Any],
    *,
    vocab_hits: np.ndarray | None = None,
) -> None:
    """Writes ``vqvae_to_state_dict`` as a ``.pth`` (``torch.save`` of a dict of tensors).

    Replaces ``path`` atomically. Call it from one process: the params must be
    addressable here.
    """
    import torch  # Conversion-only dependency.

    sd = vqvae_to_state_dict(config, variables, vocab_hits=vocab_hits)
    with atomic_write(path) as f:
        torch.save({key: torch.from_numpy(np.array(value)) for key, value in sd.items()}, f)
