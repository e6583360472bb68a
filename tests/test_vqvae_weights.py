"""Official VQVAE state dict <-> config + Flax params: key coverage, exact round trips and
clear errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch

from mvar_jax.errors import CheckpointError, StateDictMismatchError
from mvar_jax.models.vqvae import VQVAEConfig, abstract_variables
from mvar_jax.weights.state_dict import load_state_dict
from mvar_jax.weights.vqvae import (
    IGNORED_KEYS,
    VOCAB_HIT_KEY,
    config_from_state_dict,
    expected_official_shapes,
    load_official_vqvae,
    official_class_args,
    official_key,
    save_official_vqvae,
    vqvae_from_state_dict,
    vqvae_to_state_dict,
)

RELEASE = "vae_ch160v4096z32.pth"


def _fake_state_dict(shapes) -> dict[str, np.ndarray]:
    """Zero-strided arrays of the given shapes: a state dict that allocates nothing."""
    return {k: np.broadcast_to(np.float32(0), tuple(s)) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def tiny_sd(fixture_dir):
    return load_state_dict(fixture_dir / "tiny_vae.pth")


def test_release_checkpoint_maps_onto_full_size_model(fixture_dir):
    release = json.loads((fixture_dir / "official_checkpoint_keys.json").read_text())[RELEASE]
    config = config_from_state_dict(_fake_state_dict(release))
    assert config == VQVAEConfig()
    expected = expected_official_shapes(config)  # Through jax.eval_shape: nothing allocated.
    assert set(release) == set(expected) | set(IGNORED_KEYS)
    for key, shape in expected.items():
        assert tuple(release[key]) == shape, key


def test_tiny_checkpoint_converts(tiny_sd):
    config, variables = vqvae_from_state_dict(tiny_sd)
    assert (config.vocab_size, config.z_channels, config.ch, config.share_quant_resi) == (64, 8, 32, 4)
    params = variables["params"]
    # OIHW -> HWIO for convs, (O, I, 1, 1) -> (I, O) for the 1x1 convs held as Dense.
    np.testing.assert_array_equal(
        params["quant_conv"]["kernel"][1, 2, 3, 4], tiny_sd["quant_conv.weight"][4, 3, 1, 2]
    )
    qkv = tiny_sd["encoder.mid.attn_1.qkv.weight"]
    np.testing.assert_array_equal(params["encoder"]["mid"]["attn_1"]["qkv"]["kernel"], qkv[:, :, 0, 0].T)
    np.testing.assert_array_equal(
        params["quantize"]["phi_3"]["bias"], tiny_sd["quantize.quant_resi.qresi_ls.3.bias"]
    )


@pytest.mark.parametrize(
    "changes, phi_key",
    [
        ({"share_quant_resi": 0}, "quantize.quant_resi.2.weight"),
        ({"share_quant_resi": 1}, "quantize.quant_resi.qresi.weight"),
        ({"share_quant_resi": 6}, "quantize.quant_resi.qresi_ls.5.weight"),
        ({"quant_resi": 0.0}, None),
        (
            {
                "using_sa": False,
                "using_mid_sa": False,
                "num_res_blocks": 1,
                "ch_mult": (1, 2, 2),
                "quant_conv_ks": 1,
            },
            "quantize.quant_resi.qresi_ls.0.weight",
        ),
    ],
)
def test_architecture_is_read_off_the_shapes(changes, phi_key):
    config = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 4), **changes)
    shapes = expected_official_shapes(config)
    if phi_key is None:
        assert not any("quant_resi" in k for k in shapes)
    else:
        assert phi_key in shapes
    sd = _fake_state_dict(shapes)
    assert config_from_state_dict(sd, config.patch_nums, quant_resi=config.quant_resi) == config


def test_official_key_keeps_mid_names():
    config = VQVAEConfig()
    assert (
        official_key(("decoder", "mid", "block_1", "norm1", "scale"), config)
        == "decoder.mid.block_1.norm1.weight"
    )
    assert (
        official_key(("decoder", "up_4", "attn_1", "qkv", "kernel"), config)
        == "decoder.up.4.attn.1.qkv.weight"
    )
    assert official_key(("quantize", "embedding", "embedding"), config) == "quantize.embedding.weight"


def test_truncated_file_raises(fixture_dir, tmp_path):
    data = (fixture_dir / "tiny_vae.pth").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_official_vqvae(path)


def test_missing_key_is_named(tiny_sd):
    sd = dict(tiny_sd)
    del sd["decoder.up.1.block.0.conv1.bias"]
    with pytest.raises(StateDictMismatchError, match=r"missing keys \(1\): decoder.up.1.block.0.conv1.bias"):
        vqvae_from_state_dict(sd)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("quantize.embedding.weight", None, "missing keys .*quantize.embedding.weight"),
        (
            "quantize.embedding.weight",
            np.zeros(64, np.float32),
            r"quantize.embedding.weight has shape \(64,\), expected 2 dimensions",
        ),
        (
            "encoder.conv_in.weight",
            np.zeros((48, 3, 3, 3), np.float32),
            "encoder.down.0.block.0.conv1.weight has 32 output channels, not a multiple of ch=48",
        ),
        ("quant_conv.weight", np.zeros((8, 8, 2, 2), np.float32), "invalid: .*quant_conv_ks must be odd"),
    ],
)
def test_bad_architecture_keys_are_named(tiny_sd, key, value, message):
    sd = dict(tiny_sd)
    if value is None:
        del sd[key]
    else:
        sd[key] = value
    with pytest.raises(CheckpointError, match=message):
        vqvae_from_state_dict(sd)


def test_extra_key_is_named(tiny_sd):
    sd = dict(tiny_sd, **{"decoder.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(StateDictMismatchError, match=r"unexpected keys \(1\): decoder.extra.weight"):
        vqvae_from_state_dict(sd)


def test_wrong_shape_is_named(tiny_sd):
    sd = dict(tiny_sd, **{"post_quant_conv.weight": np.zeros((8, 8, 1, 1), np.float32)})
    with pytest.raises(
        StateDictMismatchError,
        match=r"wrong shape for post_quant_conv.weight: got \(8, 8, 1, 1\), expected \(8, 8, 3, 3\)",
    ):
        vqvae_from_state_dict(sd)


def test_phis_without_a_ratio_are_unexpected(tiny_sd):
    with pytest.raises(StateDictMismatchError, match="unexpected keys.*quant_resi.qresi_ls.0.weight"):
        vqvae_from_state_dict(tiny_sd, quant_resi=0.0)


def test_missing_phis_with_a_ratio_suggest_quant_resi_zero(tiny_sd):
    without_phis = {k: v for k, v in tiny_sd.items() if "quant_resi" not in k}
    assert len(without_phis) < len(tiny_sd)
    with pytest.raises(
        CheckpointError,
        match=r"no Phi weights .*quant_resi=0.5 needs them; "
        r"pass quant_resi=0",
    ):
        vqvae_from_state_dict(without_phis)
    config, _ = vqvae_from_state_dict(without_phis, quant_resi=0.0)
    assert config.quant_resi == 0.0


# Flax params -> official state dict.


def assert_same_state_dict(got, want):
    """Every key, exact values, float32: what PyTorch's strict loading would see."""
    assert set(got) == set(want)
    for key in want:
        assert np.asarray(got[key]).dtype == np.float32, key
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


def test_official_to_ours_to_official_is_exact(tiny_sd):
    config, variables = vqvae_from_state_dict(tiny_sd)
    assert_same_state_dict(vqvae_to_state_dict(config, variables), tiny_sd)


def test_saved_pth_is_the_official_file(fixture_dir, tiny_sd, tmp_path):
    config, variables = vqvae_from_state_dict(tiny_sd)
    save_official_vqvae(tmp_path / "vae.pth", config, variables)
    saved = torch.load(tmp_path / "vae.pth", weights_only=True)
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in saved.values())
    assert_same_state_dict({k: v.numpy() for k, v in saved.items()}, tiny_sd)
    assert list(tmp_path.iterdir()) == [tmp_path / "vae.pth"]  # No temporary file left.


def test_release_configuration_exports_the_release_layout(fixture_dir):
    release = json.loads((fixture_dir / "official_checkpoint_keys.json").read_text())[RELEASE]
    config = VQVAEConfig()
    exported = jax.eval_shape(lambda v: vqvae_to_state_dict(config, v), abstract_variables(config))
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v) for k, v in release.items()}
    assert {v.dtype for v in exported.values()} == {np.dtype(np.float32)}


def test_vocab_hits_fill_the_ema_buffer(tiny_sd):
    config, variables = vqvae_from_state_dict(tiny_sd)
    hits = np.arange(10 * 64, dtype=np.int32).reshape(10, 64)
    sd = vqvae_to_state_dict(config, variables, vocab_hits=hits)
    np.testing.assert_array_equal(np.asarray(sd[VOCAB_HIT_KEY]), hits.astype(np.float32))
    with pytest.raises(
        ValueError,
        match=r"vocab_hits has shape \(64,\), expected "
        r"\(len\(patch_nums\), vocab_size\) = \(10, 64\)",
    ):
        vqvae_to_state_dict(config, variables, vocab_hits=hits[0])


def test_params_that_do_not_fit_the_config_are_named(tiny_sd):
    config, variables = vqvae_from_state_dict(tiny_sd)
    with pytest.raises(
        StateDictMismatchError,
        match=r"(?s)VQVAE params does not match.*\n  wrong shape for "
        r"quant_conv/kernel: got \(3, 3, 8, 8\), expected \(3, 3, 16, 16\)",
    ):
        vqvae_to_state_dict(VQVAEConfig(vocab_size=64, z_channels=16, ch=32), variables)
    with pytest.raises(
        CheckpointError,
        match=r"expected a dict \{'params': ...\}, got keys "
        r"\['decoder', 'encoder'",
    ):
        vqvae_to_state_dict(config, variables["params"])


def test_official_class_args():
    assert official_class_args(VQVAEConfig()) == dict(
        vocab_size=4096,
        z_channels=32,
        ch=160,
        beta=0.25,
        using_znorm=False,
        quant_conv_ks=3,
        quant_resi=0.5,
        share_quant_resi=4,
        v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    )
    with pytest.raises(
        ValueError,
        match=r"cannot build this tokenizer: ch_mult=\(1, 2\) "
        r"\(official: \(1, 1, 2, 2, 4\)\), using_sa=False",
    ):
        official_class_args(VQVAEConfig(ch_mult=(1, 2), using_sa=False))
