"""Reading PyTorch state dicts safely: the one place that calls ``torch.load``.

Only this package imports torch; the models never do.
Files are read with ``torch.load(weights_only=True)``: tensors and plain containers,
never arbitrary pickled objects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from mvar_jax.errors import CheckpointError

# Official checkpoints nest the weights under these keys: train.py saves
# {'epoch', 'iter', 'trainer': {'config', 'var_wo_ddp' or 'mvar_wo_ddp', ...}}.
_WRAPPER_KEYS = ("trainer", "mvar_wo_ddp", "var_wo_ddp", "vae_wo_ddp", "model", "state_dict")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a ``.pth`` file into ``{official key: float32/int numpy array}``.

    Accepts a plain state dict or an official trainer checkpoint (weights under
    ``trainer/var_wo_ddp`` and friends; optimizer state and config are ignored).
    """
    return load_official(path)[0]


def load_official(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """``load_state_dict``, and the trainer-state keys the weights sat under (``()`` for a
    plain state dict; ``('mvar_wo_ddp',)`` for an MVAR release file): what the file says it is."""
    import torch  # Conversion-only dependency.

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt/truncated files.
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint (truncated or not a "
            f"weights-only .pth file?): {type(e).__name__}: {e}"
        ) from e
    return state_dict_to_numpy(obj, source=path), _wrappers(obj) if isinstance(obj, Mapping) else ()


def _wrappers(obj: Mapping) -> tuple[str, ...]:
    """The keys of the (possibly nested) trainer-state wrappers around the weights."""
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            return (key, *_wrappers(obj[key]))
    return ()


def _unwrap(obj: Mapping) -> Mapping:
    """The weights inside (possibly nested) trainer-state wrappers, else ``obj`` itself."""
    for key in _wrappers(obj):
        obj = obj[key]
    return obj


def state_dict_to_numpy(obj: Any, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Unwraps (nested) trainer states if needed and converts every tensor to numpy."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a state dict, got {type(obj).__name__}")
    out = {}
    for key, value in _unwrap(obj).items():
        if hasattr(value, "detach"):  # torch.Tensor
            value = value.detach().cpu()
            if value.is_floating_point():
                value = value.float()
            value = value.numpy()
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value
    if not out:
        raise CheckpointError(f"{source}: the state dict is empty")
    return out
