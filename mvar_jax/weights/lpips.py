"""The LPIPS network's weights from the two PyTorch files a user supplies (see ``models.lpips``)."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mvar_jax.errors import CheckpointError, check_keys
from mvar_jax.models.lpips import LPIPS, torchvision_index
from mvar_jax.weights.state_dict import load_state_dict


def _param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{Flax param path: shape}`` of ``LPIPS``, via eval_shape (nothing allocated)."""
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    abstract = jax.eval_shape(LPIPS().init, jax.random.PRNGKey(0), x, x)["params"]
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract).items()}


def _torch_key(path: tuple[str, ...]) -> str:
    """Key of a Flax param in its PyTorch file: torchvision's vgg16 or lpips' vgg.pth."""
    if path[0] == "vgg":
        leaf = {"kernel": "weight", "bias": "bias"}[path[2]]
        return f"features.{torchvision_index(path[1])}.{leaf}"
    return f"{path[0]}.model.1.weight"  # lin0 .. lin4: Sequential(Dropout, Conv2d 1x1).


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Conv kernels HWIO -> OIHW; the 1x1 linear layers (C, 1) -> (1, C, 1, 1)."""
    if len(shape) == 4:
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if len(shape) == 2:
        i, o = shape
        return (o, i, 1, 1)
    return tuple(shape)


def _to_flax(value: np.ndarray) -> np.ndarray:
    """Inverse of ``_torch_shape`` on the values."""
    if value.ndim == 4 and value.shape[2:] == (1, 1):
        return value[:, :, 0, 0].T
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value


def check_lpips_files(vgg_path: str | os.PathLike | None, lin_path: str | os.PathLike | None) -> None:
    """Start-up check for an LPIPS-enabled run: raises CheckpointError naming a missing file.

    Only checks that both paths are set and are files (cheap); ``load_lpips`` then
    checks every key and shape.
    """
    roles = (
        (
            vgg_path,
            "VGG16 weights (torchvision's vgg16 state dict, e.g. vgg16-397923af.pth "
            "from https://download.pytorch.org/models/)",
        ),
        (lin_path, "LPIPS linear-layer weights (weights/v0.1/vgg.pth inside the lpips PyPI package)"),
    )
    for path, role in roles:
        if path is None or not os.fspath(path):
            raise CheckpointError(f"LPIPS is enabled but no file is given for its {role}")
        if not os.path.isfile(path):
            raise CheckpointError(f"LPIPS is enabled but its {role} file is missing: {os.fspath(path)}")


def lpips_from_state_dicts(
    vgg_sd: dict[str, np.ndarray],
    lin_sd: dict[str, np.ndarray],
    vgg_source: str = "VGG16 state dict",
    lin_source: str = "LPIPS linear-layer state dict",
) -> dict[str, Any]:
    """torchvision vgg16 + lpips vgg.pth state dicts (numpy) -> LPIPS Flax params, float32.

    Raises StateDictMismatchError naming the source and its missing, unexpected or
    mis-shaped keys (torchvision's ``classifier.*`` entries are accepted and ignored).
    """
    shapes = _param_shapes()
    vgg_sd = {k: v for k, v in vgg_sd.items() if not k.startswith("classifier.")}
    for part, sd, what in (("vgg", vgg_sd, vgg_source), ("lin", lin_sd, lin_source)):
        expected = {_torch_key(p): _torch_shape(s) for p, s in shapes.items() if p[0].startswith(part)}
        check_keys(sd, expected, what=what)
    merged = {**vgg_sd, **lin_sd}
    params = {p: jnp.asarray(_to_flax(merged[_torch_key(p)]), jnp.float32) for p in shapes}
    return traverse_util.unflatten_dict(params)


def load_lpips(vgg_path: str | os.PathLike, lin_path: str | os.PathLike) -> dict[str, Any]:
    """Reads the two PyTorch files (see the module docstring) into LPIPS params.

    Use as ``LPIPS().apply({'params': load_lpips(vgg, lin)}, x0, x1)``.
    """
    check_lpips_files(vgg_path, lin_path)
    return lpips_from_state_dicts(
        load_state_dict(vgg_path),
        load_state_dict(lin_path),
        vgg_source=f"VGG16 state dict {os.fspath(vgg_path)}",
        lin_source=f"LPIPS linear-layer state dict {os.fspath(lin_path)}",
    )
