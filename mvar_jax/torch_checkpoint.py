"""Reading official PyTorch checkpoints safely, and mapping them onto Flax trees.

Only this module (and the converters built on it) imports torch; the models never do.
Files are read with ``torch.load(weights_only=True)``: tensors and plain containers,
never arbitrary pickled objects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

# Official checkpoints nest the weights under these keys: train.py saves
# {'epoch', 'iter', 'trainer': {'config', 'var_wo_ddp' or 'mvar_wo_ddp', ...}}.
_WRAPPER_KEYS = ("trainer", "mvar_wo_ddp", "var_wo_ddp", "vae_wo_ddp", "model", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class StateDictMismatchError(CheckpointError):
    """A state dict whose keys or shapes differ from what the model expects."""

    def __init__(self, what: str, missing=(), unexpected=(), mis_shaped=()):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mis_shaped = sorted(mis_shaped)
        lines = [f"{what} does not match the model:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        for key, got, want in self.mis_shaped:
            lines.append(f"  wrong shape for {key}: got {tuple(got)}, expected {tuple(want)}")
        super().__init__("\n".join(lines))


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a ``.pth`` file into ``{official key: float32/int numpy array}``.

    Accepts a plain state dict or an official trainer checkpoint (weights under
    ``trainer/var_wo_ddp`` and friends; optimizer state and config are ignored).
    """
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
    return state_dict_to_numpy(obj, source=path)


def _unwrap(obj: Mapping) -> Mapping:
    """The weights inside (possibly nested) trainer-state wrappers, else ``obj`` itself."""
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            return _unwrap(obj[key])
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


def check_keys(
    state_dict: Mapping[str, np.ndarray],
    expected_shapes: Mapping[str, tuple[int, ...]],
    what: str = "state dict",
    ignore: tuple[str, ...] = (),
) -> None:
    """Raises StateDictMismatchError unless keys and shapes match exactly.

    ``ignore`` lists keys that may be present without being used (buffers the
    Flax model recomputes, such as attention masks); they are neither missing
    nor unexpected.
    """
    got = {k for k in state_dict if k not in ignore}
    want = set(expected_shapes)
    mis_shaped = [
        (k, state_dict[k].shape, expected_shapes[k])
        for k in sorted(got & want)
        if tuple(state_dict[k].shape) != tuple(expected_shapes[k])
    ]
    if got != want or mis_shaped:
        raise StateDictMismatchError(what, want - got, got - want, mis_shaped)
