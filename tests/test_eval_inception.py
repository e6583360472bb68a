"""Inception-v3 (the evaluator's 2015 graph) against torch-fidelity's TF-faithful port, and its weights.

The reference is torch-fidelity's ``FeatureExtractorInceptionV3`` (pinned in
requirements-nodeps.txt), a port of the same graph that its authors checked against TensorFlow,
run on the CPU with the RANDOM weights built here in its own state-dict layout (no weights can
be downloaded): ``pool_3`` (its '2048'), the logits without bias (its 'logits_unbiased'), and
the spatial features taken with a hook on ``Mixed_6d.branch1x1`` (the graph's ``mixed_6/conv``),
first 7 channels in NHWC order as the evaluator flattens them. The resize is also checked
against TensorFlow's own kernel.

torch-fidelity imports torchvision at package import, whose wheel does not import beside the
pinned torch: a stand-in module with the few names it looks up is installed first (as
tests/test_lpips.py does for lpips); the Inception extractor never calls torchvision.
"""

from __future__ import annotations

import importlib
import types
from unittest import mock

import jax
import numpy as np
import pytest
import torch
from conftest import modules_replaced, rel_err

from mvar_jax.errors import CheckpointError
from mvar_jax.models import inception
from mvar_jax.weights.inception import (
    expected_state_dict_shapes,
    load_inception,
    params_from_state_dict,
)

_STAND_IN = ("torchvision", "torchvision.datasets", "torchvision.models", "torchvision.transforms")


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    """Modules with the names torch-fidelity's other extractors and datasets import."""
    tv = {name: types.ModuleType(name) for name in _STAND_IN}
    tv["torchvision.transforms.functional"] = types.ModuleType("torchvision.transforms.functional")
    for name in ("CIFAR10", "CIFAR100", "STL10"):
        setattr(tv["torchvision.datasets"], name, type(name, (), {}))  # subclassed, never used
    for name, module in tv.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(tv[parent], child, module)
    return tv


@pytest.fixture(scope="module")
def fidelity_extractor_cls():
    with modules_replaced(_torchvision_stand_in()):
        yield importlib.import_module(
            "torch_fidelity.feature_extractor_inceptionv3"
        ).FeatureExtractorInceptionV3


def _random_state_dict(layout: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random values in ``layout``'s keys and shapes: He-scaled convs (activations keep their size
    through 94 layers), batch norms far from identity, a 1008-class fc with a bias."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in layout.items():
        shape = value.shape
        if key.endswith("conv.weight"):
            out[key] = torch.randn(shape, generator=gen) * (2.0 / value[0].numel()) ** 0.5
        elif key.endswith(("bn.weight", "running_var")):
            out[key] = 0.5 + torch.rand(shape, generator=gen)
        elif key.endswith(("bn.bias", "running_mean")):
            out[key] = 0.1 * torch.randn(shape, generator=gen)
        elif key.startswith("fc."):
            out[key] = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        else:  # num_batches_tracked
            out[key] = value
    return out


@pytest.fixture(scope="module")
def weights(fidelity_extractor_cls, tmp_path_factory):
    """``(path, reference)``: random weights saved in torch-fidelity's layout, and its extractor
    loaded from that file by its own loader."""
    with mock.patch.object(fidelity_extractor_cls, "load_state_dict"), mock.patch("torch.load"):
        layout = fidelity_extractor_cls(
            "inception", ["2048"], feature_extractor_weights_path="none"
        ).state_dict()
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(_random_state_dict(layout, seed=0), path)
    reference = fidelity_extractor_cls(
        "inception", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
    )
    return path, reference


@pytest.mark.parametrize("size,count", [(256, 2), (97, 1)])
def test_matches_torch_fidelity(weights, size, count):
    path, reference = weights
    images = np.random.default_rng(size).integers(0, 256, (count, size, size, 3), np.uint8)
    spatial = {}
    hook = reference.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: spatial.update(x=out))
    with torch.no_grad():
        pool, logits = reference(torch.from_numpy(images).permute(0, 3, 1, 2))
    hook.remove()
    spatial_ref = spatial["x"].permute(0, 2, 3, 1)[..., : inception.SPATIAL_CHANNELS].reshape(count, -1)

    out = jax.jit(inception.InceptionV3().apply)(load_inception(path), images)
    assert out.spatial_BS.shape == (count, inception.SPATIAL_DIM)
    assert rel_err(out.pool_BF, pool) < 1e-4
    assert rel_err(out.logits_BK, logits) < 1e-4
    assert rel_err(out.spatial_BS, spatial_ref) < 1e-4


@pytest.mark.parametrize("shape", [(2, 256, 256, 3), (1, 97, 61, 3), (1, 400, 300, 3), (1, 1, 5, 3)])
def test_resize_matches_tensorflow(shape):
    """TensorFlow 1's resize (``align_corners=False``, no half-pixel centres), to one rounding of
    the multiply-add that XLA may fuse: 2^-16 at [128, 256)."""
    import tensorflow as tf

    x = np.random.default_rng(0).integers(0, 256, shape).astype(np.float32)
    expected = tf.compat.v1.image.resize_bilinear(
        x, (299, 299), align_corners=False, half_pixel_centers=False
    )
    got = jax.jit(inception.tf1_resize_bilinear, static_argnums=1)(x, (299, 299))
    assert np.max(np.abs(np.asarray(got) - expected.numpy())) <= 2.0**-16 * 4


def _zeros_state_dict() -> dict[str, np.ndarray]:
    return {k: np.zeros(s, np.float32) for k, s in expected_state_dict_shapes().items()}


def test_layout_and_batch_norm_folding():
    shapes = expected_state_dict_shapes()
    assert len(shapes) == 94 * 5 + 2  # 94 conv units (weight + 4 batch-norm arrays), fc
    assert shapes["fc.weight"] == (1008, 2048)
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    sd = _zeros_state_dict()
    sd["Conv2d_1a_3x3.bn.weight"][:] = 2.0
    sd["Conv2d_1a_3x3.bn.running_var"][:] = 3.999
    sd["Conv2d_1a_3x3.bn.running_mean"][:] = 0.5
    sd["Conv2d_1a_3x3.bn.bias"][:] = 0.25
    unit = params_from_state_dict(sd)["params"]["Conv2d_1a_3x3"]
    np.testing.assert_allclose(unit["scale"], 1.0, rtol=1e-7)  # 2 / sqrt(3.999 + 0.001)
    np.testing.assert_allclose(unit["bias"], 0.25 - 0.5, rtol=1e-7)


def test_unfit_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="file not found: .*absent.pth"):
        load_inception(tmp_path / "absent.pth")
    sd = _zeros_state_dict()
    del sd["Mixed_6d.branch1x1.bn.running_var"]
    sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    sd["fc.weight"] = np.zeros((1000, 2048), np.float32)
    with pytest.raises(CheckpointError) as e:
        params_from_state_dict(sd)
    message = str(e.value)
    assert "pt_inception-2015-12-05 Inception-v3 state dict" in message
    assert "missing keys (1): Mixed_6d.branch1x1.bn.running_var" in message
    assert "unexpected keys (1): AuxLogits.fc.weight" in message
    assert "wrong shape for fc.weight: got (1000, 2048), expected (1008, 2048)" in message
    sd = _zeros_state_dict()
    sd["Conv2d_2a_3x3.conv.weight"][0, 0, 0, 0] = np.nan
    with pytest.raises(CheckpointError, match="NaN.*Conv2d_2a_3x3.conv.weight"):
        params_from_state_dict(sd)
    not_torch = tmp_path / "classify_image_graph_def.pb"
    not_torch.write_bytes(b"\x0a\x05graph")
    with pytest.raises(CheckpointError, match="cannot read .* as a PyTorch checkpoint"):
        load_inception(not_torch)
