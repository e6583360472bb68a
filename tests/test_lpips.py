"""LPIPS (VGG16) in Flax against the ``lpips`` package on random VGG weights, and its loader.

torchvision cannot be installed beside the pinned torch, and lpips only needs
``torchvision.models.vgg16(pretrained=...).features``: a stand-in module provides
that (VGG16's conv trunk, randomly initialised) before lpips is imported.
"""

from __future__ import annotations

import importlib
import os
import re
import types

import jax
import numpy as np
import pytest
import torch
from conftest import modules_replaced, rel_err

from mvar_jax.errors import CheckpointError, StateDictMismatchError
from mvar_jax.models.lpips import LPIPS, VGG16_BLOCKS, conv_names, torchvision_index, unit_normalize
from mvar_jax.weights.lpips import check_lpips_files, load_lpips

SIZE = 64


def _random_vgg16_features(seed: int) -> torch.nn.Sequential:
    """torchvision's ``vgg16().features`` layout (conv3x3+ReLU, 2x2 max pools), random weights.

    Biases are random too (torchvision zeroes them) so that the test sees their mapping.
    """
    gen = torch.Generator().manual_seed(seed)
    layers, in_ch = [], 3
    for widths in VGG16_BLOCKS:
        for width in widths:
            conv = torch.nn.Conv2d(in_ch, width, 3, padding=1)
            with torch.no_grad():
                conv.weight.normal_(0.0, (2.0 / (9 * width)) ** 0.5, generator=gen)  # He, fan_out.
                conv.bias.normal_(0.0, 0.1, generator=gen)
            layers += [conv, torch.nn.ReLU(inplace=True)]
            in_ch = width
        layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
    return torch.nn.Sequential(*layers)


def _torchvision_stand_in() -> types.ModuleType:
    """A ``torchvision`` module with just ``models.vgg16`` (random weights only)."""

    def vgg16(pretrained=False, **unused):
        if pretrained:
            raise RuntimeError("the torchvision stand-in has no pretrained weights")
        return types.SimpleNamespace(features=_random_vgg16_features(seed=0))

    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    tv.models.vgg16 = vgg16
    return tv


@pytest.fixture(scope="module")
def lpips_pkg():
    """The ``lpips`` package, imported against the torchvision stand-in."""
    stand_in = _torchvision_stand_in()
    with modules_replaced({"torchvision": stand_in, "torchvision.models": stand_in.models}):
        yield importlib.import_module("lpips")


@pytest.fixture(scope="module")
def reference(lpips_pkg):
    """lpips' LPIPS (random VGG16 trunk, the shipped v0.1 linear layers), eval mode."""
    return lpips_pkg.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False)


@pytest.fixture(scope="module")
def shipped_lin_path(lpips_pkg) -> str:
    return os.path.join(os.path.dirname(lpips_pkg.__file__), "weights", "v0.1", "vgg.pth")


@pytest.fixture(scope="module")
def vgg_path(reference, tmp_path_factory) -> str:
    """The reference's trunk saved as a torchvision vgg16 state dict (with a classifier entry)."""
    sd = {}
    for slice_ in (
        reference.net.slice1,
        reference.net.slice2,
        reference.net.slice3,
        reference.net.slice4,
        reference.net.slice5,
    ):
        sd.update({f"features.{k}": v for k, v in slice_.state_dict().items()})
    sd["classifier.6.bias"] = torch.zeros(1000)  # Present in the real file; must be ignored.
    path = tmp_path_factory.mktemp("lpips") / "vgg16.pth"
    torch.save(sd, path)
    return str(path)


@pytest.fixture(scope="module")
def params(vgg_path, shipped_lin_path):
    return load_lpips(vgg_path, shipped_lin_path)


def _image_pairs() -> tuple[np.ndarray, np.ndarray]:
    """Four NHWC pairs in [-1, 1]: independent, two perturbed copies (small distances), equal."""
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (4, SIZE, SIZE, 3)).astype(np.float32)
    x1 = np.stack(
        [
            rng.uniform(-1, 1, (SIZE, SIZE, 3)),
            np.clip(x0[1] + 0.3 * rng.standard_normal((SIZE, SIZE, 3)), -1, 1),
            np.clip(x0[2] + 0.1 * rng.standard_normal((SIZE, SIZE, 3)), -1, 1),
            x0[3],
        ]
    ).astype(np.float32)
    return x0, x1


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_conv_names_map_onto_torchvision_features():
    assert [torchvision_index(n) for n in conv_names()] == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    with pytest.raises(KeyError, match="conv6_1"):
        torchvision_index("conv6_1")


def test_distance_matches_lpips_package(reference, params):
    x0, x1 = _image_pairs()
    with torch.no_grad():
        want, want_layers = reference(_nchw(x0), _nchw(x1), retPerLayer=True)
    both = jax.jit(
        lambda a, b: LPIPS().apply(
            {"params": params}, a, b, method=lambda m, a, b: (m(a, b), m.per_layer(a, b))
        )
    )
    got, got_layers = both(x0, x1)
    assert got.shape == (4,)
    want = want.numpy().reshape(4)
    for i in range(3):  # Each pair on its own: the small distances must be right too.
        assert rel_err(got[i], want[i]) <= 1e-5, (i, got[i], want[i])
    assert want[3] == 0.0 and abs(got[3]) < 1e-9  # Identical images (rounding only).
    for k, (g, w) in enumerate(zip(got_layers, want_layers)):
        assert rel_err(g, w.numpy().reshape(4)) <= 1e-5, k


def test_vgg_features_match_lpips_package(reference, params):
    x0, _ = _image_pairs()
    with torch.no_grad():
        want = reference.net(reference.scaling_layer(_nchw(x0[:1])))
    got = LPIPS().apply({"params": params}, x0[:1], method=LPIPS.features)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.permute(0, 2, 3, 1).shape, k
        assert rel_err(g, w.numpy().transpose(0, 2, 3, 1)) <= 1e-5, k


def test_unit_normalize_of_a_zero_vector_has_a_finite_gradient():
    x = np.zeros((1, 1, 2, 4), np.float32)
    x[0, 0, 1] = [3.0, 0.0, 4.0, 0.0]
    np.testing.assert_allclose(unit_normalize(x)[0, 0, 1], [0.6, 0.0, 0.8, 0.0], rtol=1e-6)
    grad = jax.grad(lambda y: unit_normalize(y).sum())(x)
    # At the zero vector the map is x / 1e-10: no NaN from the square root's derivative.
    np.testing.assert_allclose(grad[0, 0, 0], np.full(4, 1e10), rtol=1e-6)
    # Elsewhere d/dx_i sum_j x_j / |x| = (1 - x_i sum_j x_j / |x|^2) / |x|.
    np.testing.assert_allclose(grad[0, 0, 1], (1 - x[0, 0, 1] * 7 / 25) / 5, rtol=1e-5)


def test_shipped_linear_weights_load(params, shipped_lin_path):
    lin = torch.load(shipped_lin_path, map_location="cpu", weights_only=True)
    assert sorted(lin) == [f"lin{k}.model.1.weight" for k in range(5)]
    for k, width in enumerate(w[0] for w in VGG16_BLOCKS):
        kernel = params[f"lin{k}"]["kernel"]
        assert kernel.shape == (width, 1)
        want = lin[f"lin{k}.model.1.weight"].numpy()[0, :, 0, 0]
        np.testing.assert_array_equal(kernel[:, 0], want)


def test_rejects_bad_inputs(params):
    model = LPIPS()
    x = np.zeros((1, 16, 16, 3), np.float32)
    with pytest.raises(ValueError, match="differ in shape"):
        model.apply({"params": params}, x, x[:, :8])
    with pytest.raises(ValueError, match="at least 16x16"):
        model.apply({"params": params}, x[:, :8, :8], x[:, :8, :8])
    with pytest.raises(ValueError, match="NHWC RGB"):
        model.apply({"params": params}, x[..., :1], x[..., :1])


def test_missing_files_are_named(vgg_path, shipped_lin_path, tmp_path):
    missing = tmp_path / "nowhere" / "vgg16.pth"
    named = re.escape(str(missing))
    with pytest.raises(CheckpointError, match=f"VGG16 weights .* missing: {named}"):
        check_lpips_files(missing, shipped_lin_path)
    with pytest.raises(CheckpointError, match=f"linear-layer weights .* missing: {named}"):
        load_lpips(vgg_path, missing)
    with pytest.raises(CheckpointError, match="no file is given for its VGG16 weights"):
        check_lpips_files("", shipped_lin_path)
    check_lpips_files(vgg_path, shipped_lin_path)  # Both present: no error.


def test_bad_files_are_named(vgg_path, shipped_lin_path, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"cannot read {re.escape(str(garbage))}"):
        load_lpips(vgg_path, garbage)

    lin = torch.load(shipped_lin_path, map_location="cpu", weights_only=True)
    lin["lin2.model.1.weight"] = lin["lin2.model.1.weight"][:, :128]
    del lin["lin4.model.1.weight"]
    bad_lin = tmp_path / "bad_lin.pth"
    torch.save(lin, bad_lin)
    with pytest.raises(StateDictMismatchError, match=re.escape(str(bad_lin))) as info:
        load_lpips(vgg_path, bad_lin)
    assert info.value.missing == ["lin4.model.1.weight"]
    assert info.value.mis_shaped == [("lin2.model.1.weight", (1, 128, 1, 1), (1, 256, 1, 1))]

    # A vgg16_bn trunk or a truncated file: the VGG keys that do not fit are listed.
    vgg = torch.load(vgg_path, weights_only=True)
    del vgg["features.28.bias"]
    bad_vgg = tmp_path / "bad_vgg.pth"
    torch.save(vgg, bad_vgg)
    with pytest.raises(StateDictMismatchError, match="(?s)VGG16 state dict .*features.28.bias"):
        load_lpips(bad_vgg, shipped_lin_path)
