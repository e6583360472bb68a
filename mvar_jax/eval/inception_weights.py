"""The Inception-v3 weights: pytorch-fid's / torch-fidelity's ``pt_inception-2015-12-05`` state dict.

That file (``pt_inception-2015-12-05-6726825d.pth`` in pytorch-fid's releases,
``weights-inception-2015-12-05-6726825d.pth`` in torch-fidelity's) holds the 2015 graph's
constants under torchvision's Inception3 names: ``<unit>.conv.weight`` (OIHW),
``<unit>.bn.{weight,bias,running_mean,running_var}``, ``fc.weight`` ``(1008, 2048)`` and
``fc.bias``. Nothing is downloaded: the user names the file.

Each batch norm is folded here into the ``scale`` and ``bias`` of ``inception.ConvBN`` (in float64,
then float32). ``fc.bias`` must be present but is not used: the evaluator's Inception Score reads
logits without it. ``num_batches_tracked`` entries, which torchvision adds, are ignored.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flax import traverse_util

from mvar_jax.eval.inception import BN_EPS, param_shapes

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
_SHOWN = 8  # keys listed per kind of mismatch in an error message


class InceptionWeightsError(ValueError):
    """The file is not the pt_inception state dict: unreadable, or keys or shapes that do not fit."""


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Every key the file must hold and its shape, derived from ``InceptionV3``'s parameters."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, leaf in traverse_util.flatten_dict(param_shapes()["params"]).items():
        unit, name = ".".join(path[:-1]), path[-1]
        if path[-2:] == ("fc", "kernel"):
            shapes["fc.weight"] = tuple(reversed(leaf.shape))
            shapes["fc.bias"] = leaf.shape[1:]
        elif name == "kernel":  # (kh, kw, in, out) -> OIHW; unit ends in ".conv"
            kh, kw, cin, cout = leaf.shape
            shapes[f"{unit}.weight"] = (cout, cin, kh, kw)
        elif name == "scale":
            shapes.update({f"{unit}.bn.{field}": leaf.shape for field in _BN_FIELDS})
    return shapes


def _check_keys(state_dict: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> None:
    def listed(keys: list[str]) -> str:
        more = f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else ""
        return ", ".join(keys[:_SHOWN]) + more

    present = {k for k in state_dict if not k.endswith(".num_batches_tracked")}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    misshaped = [
        f"{k} {tuple(state_dict[k].shape)} (expected {expected[k]})"
        for k in sorted(present & set(expected))
        if tuple(state_dict[k].shape) != expected[k]
    ]
    problems = [
        f"{what}: {listed(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        raise InceptionWeightsError(
            "not the pt_inception-2015-12-05 Inception-v3 state dict (pytorch-fid / torch-fidelity): "
            + "; ".join(problems)
        )


def params_from_state_dict(state_dict: dict[str, Any]) -> dict:
    """``{'params': ...}`` for ``InceptionV3`` from the state dict's arrays (numpy or torch, CPU)."""
    expected = expected_state_dict_shapes()
    _check_keys(state_dict, expected)
    sd = {k: np.asarray(v, np.float64) for k, v in state_dict.items() if k in expected}
    bad = sorted(k for k, v in sd.items() if not np.isfinite(v).all())
    if bad:
        raise InceptionWeightsError(f"the Inception weights hold NaN or infinite values: {', '.join(bad)}")
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key in expected:
        unit = tuple(key.split(".")[:-2])
        if key.endswith(".conv.weight"):
            flat[(*unit, "conv", "kernel")] = sd[key].transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif key.endswith(".bn.weight"):
            bn = ".".join(unit) + ".bn."
            scale = sd[bn + "weight"] / np.sqrt(sd[bn + "running_var"] + BN_EPS)
            flat[(*unit, "scale")] = scale
            flat[(*unit, "bias")] = sd[bn + "bias"] - sd[bn + "running_mean"] * scale
    flat[("fc", "kernel")] = sd["fc.weight"].T
    params = {k: v.astype(np.float32) for k, v in flat.items()}
    return {"params": traverse_util.unflatten_dict(params)}


def load_inception(path: str | os.PathLike) -> dict:
    """``{'params': ...}`` from the ``.pth`` file at ``path`` (read with ``weights_only=True``).

    A missing file is a ``FileNotFoundError``; anything but a fitting state dict an
    ``InceptionWeightsError`` that says what is wrong.
    """
    import torch  # only here: computing features never needs it

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception weights file not found: {path} (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)"
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds (pickle, zip, runtime) for a foreign file
        raise InceptionWeightsError(f"{path} is not a PyTorch state dict ({type(e).__name__}: {e})") from e
    if not isinstance(state_dict, dict):
        raise InceptionWeightsError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    arrays = {
        k: v.float().numpy() if torch.is_tensor(v) else np.asarray(v, object) for k, v in state_dict.items()
    }
    return params_from_state_dict(arrays)
