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

from mvar_jax.errors import CheckpointError, check_keys
from mvar_jax.models.inception import BN_EPS, param_shapes
from mvar_jax.weights.state_dict import load_state_dict

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


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


def params_from_state_dict(state_dict: dict[str, Any]) -> dict:
    """``{'params': ...}`` for ``InceptionV3`` from the state dict's arrays (numpy or torch, CPU)."""
    expected = expected_state_dict_shapes()
    tracked = tuple(k for k in state_dict if k.endswith(".num_batches_tracked"))
    what = "the pt_inception-2015-12-05 Inception-v3 state dict (pytorch-fid / torch-fidelity)"
    check_keys(state_dict, expected, what=what, ignore=tracked)
    sd = {k: np.asarray(v, np.float64) for k, v in state_dict.items() if k in expected}
    bad = sorted(k for k, v in sd.items() if not np.isfinite(v).all())
    if bad:
        raise CheckpointError(f"the Inception weights hold NaN or infinite values: {', '.join(bad)}")
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
    """``{'params': ...}`` from the ``.pth`` file at ``path`` (``weights_only``); a
    ``CheckpointError`` that says what is wrong with anything but a fitting state dict."""
    return params_from_state_dict(load_state_dict(path))
