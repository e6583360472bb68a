"""Official transformer checkpoints <-> Flax params: layouts, full-size key maps, the way back,
errors."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import M_VAR_FIXTURES, M_VAR_VARIANTS, VAR_512

from mvar_jax.errors import CheckpointError, StateDictMismatchError
from mvar_jax.models.config import PATCH_NUMS_256, PATCH_NUMS_512, TransformerConfig
from mvar_jax.models.transformer import param_shapes, stack_blocks
from mvar_jax.weights import transformer as tw
from mvar_jax.weights.state_dict import load_state_dict

# The layouts no official checkpoint uses: shared AdaLN, attention without L2 norm.
SHARED_ADALN = TransformerConfig(
    vocab_size=32,
    cvae=4,
    num_classes=7,
    depth=3,
    embed_dim=48,
    num_heads=6,
    mlp_ratio=2.0,
    shared_aln=True,
    attn_l2_norm=False,
    family="var",
)


@pytest.fixture(scope="module")
def mvar_sd(fixture_dir):
    return load_state_dict(fixture_dir / "tiny_mvar.pth")


def _shape_only(shapes):
    """A fake state dict of read-only zero-stride views: full-size shapes, no memory."""
    return {k: np.broadcast_to(np.zeros((), np.float32), tuple(s)) for k, s in shapes.items()}


def test_release_trainer_state_loads_the_same_weights(fixture_dir):
    plain_cfg, plain = tw.load_transformer(fixture_dir / "tiny_mvar.pth")
    release_cfg, release = tw.load_transformer(fixture_dir / "tiny_mvar_release_layout.pth")
    assert release_cfg == plain_cfg
    jax.tree.map(np.testing.assert_array_equal, release, plain)


def test_nested_var_trainer_checkpoint_loads_the_same_weights(fixture_dir, tmp_path):
    # Official VAR train.py saves {'epoch', 'iter', 'trainer': trainer.state_dict()},
    # whose 'var_wo_ddp' holds the weights beside the VAE and optimizer states.
    import torch

    weights = torch.load(fixture_dir / "tiny_var.pth", map_location="cpu", weights_only=True)
    trainer = {
        "config": {"tlr": 1e-4},
        "var_wo_ddp": weights,
        "vae_local": {"quant_conv.weight": torch.zeros(2, 2, 3, 3)},
        "var_opt": {"optim": {"state": {}}, "names": ["a"]},
    }
    path = tmp_path / "ar-ckpt-last.pth"
    torch.save({"epoch": 3, "iter": 7, "trainer": trainer}, path)
    plain_cfg, plain = tw.load_transformer(fixture_dir / "tiny_var.pth")
    nested_cfg, nested = tw.load_transformer(path)
    assert nested_cfg == plain_cfg
    jax.tree.map(np.testing.assert_array_equal, nested, plain)


def test_architecture_is_read_off_the_tensors(fixture_dir, mvar_sd):
    config = tw.config_from_state_dict(mvar_sd)
    assert config == TransformerConfig(
        vocab_size=64, cvae=8, num_classes=10, depth=2, embed_dim=64, num_heads=4, family="mvar"
    )
    var_sd = load_state_dict(fixture_dir / "tiny_var.pth")
    assert tw.config_from_state_dict(var_sd).family == "var"
    # Official MVAR fine-tuning starts from VAR weights: same tensors, other attention.
    as_mvar = tw.config_from_state_dict(var_sd, family="mvar", kernel_size=5, refine_step=9)
    assert (as_mvar.family, as_mvar.kernel_size, as_mvar.refine_step) == ("mvar", 5, 9)
    jax.tree.map(
        np.testing.assert_array_equal,
        tw.params_from_state_dict(var_sd, as_mvar),
        tw.params_from_state_dict(var_sd, tw.config_from_state_dict(var_sd)),
    )


def test_params_take_the_official_values(mvar_sd):
    params = tw.params_from_state_dict(mvar_sd, tw.config_from_state_dict(mvar_sd))["params"]
    np.testing.assert_array_equal(
        params["blocks_1"]["attn"]["mat_qkv"]["kernel"], mvar_sd["blocks.1.attn.mat_qkv.weight"].T
    )
    np.testing.assert_array_equal(
        params["blocks_0"]["attn"]["scale_mul"], mvar_sd["blocks.0.attn.scale_mul_1H11"].reshape(4)
    )
    np.testing.assert_array_equal(params["pos_embed"], mvar_sd["pos_1LC"][0])
    np.testing.assert_array_equal(params["class_emb"]["embedding"], mvar_sd["class_emb.weight"])
    np.testing.assert_array_equal(params["head_nm"]["ada_lin"]["bias"], mvar_sd["head_nm.ada_lin.1.bias"])


def _official_checkpoints(fixture_dir):
    """Every released transformer's key -> shape: the 256 px ones and VAR-d36-s at 512 px."""
    keys = {}
    for path in (fixture_dir / "official_checkpoint_keys.json", VAR_512 / "var_d36_keys.json"):
        keys.update(json.loads(path.read_text()))
    return {name: shapes for name, shapes in keys.items() if not name.startswith("vae")}


def test_every_official_checkpoint_maps_onto_the_full_size_model(fixture_dir):
    checkpoints = _official_checkpoints(fixture_dir)
    assert len(checkpoints) == 8
    for name, shapes in checkpoints.items():
        state_dict = _shape_only(shapes)
        family = "mvar" if name.startswith("mvar") else "var"
        config = tw.config_from_state_dict(state_dict, family=family)  # the pyramid: pos_1LC's
        depth = int(name.split("d")[-1][:2])
        assert (config.depth, config.embed_dim, config.num_heads) == (depth, 64 * depth, depth)
        assert (config.vocab_size, config.cvae, config.num_classes) == (4096, 32, 1000)
        d36 = name == "var_d36.pth"  # 512 px, shared AdaLN (the README's "d36-s")
        assert config.attn_l2_norm and config.shared_aln == d36
        assert config.patch_nums == (PATCH_NUMS_512 if d36 else PATCH_NUMS_256)
        params = tw.params_from_state_dict(state_dict, config)  # views: nothing allocated
        jax.tree.map(lambda p, s: np.testing.assert_equal(p.shape, s.shape), params, param_shapes(config))


def test_shared_adaln_and_plain_attention_layouts_roundtrip():
    # No official checkpoint uses them, so check that the layout the model expects
    # reads back as the same architecture.
    config = SHARED_ADALN
    shapes = tw.official_shapes(config)
    assert shapes["shared_ada_lin.1.weight"] == (6 * 48, 48)
    assert shapes["blocks.2.ada_gss"] == (1, 1, 6, 48)
    assert not any("scale_mul" in k or "blocks.0.ada_lin" in k for k in shapes)
    assert tw.config_from_state_dict(_shape_only(shapes), family="var", num_heads=6) == config


def test_missing_unexpected_and_misshaped_keys_are_named(mvar_sd):
    config = tw.config_from_state_dict(mvar_sd)
    broken = dict(mvar_sd)
    del broken["blocks.1.ffn.fc2.bias"]
    broken["head.bias"] = broken["head.bias"][:10]
    broken["blocks.0.attn.k_bias"] = np.zeros(64, np.float32)
    with pytest.raises(StateDictMismatchError) as e:
        tw.params_from_state_dict(broken, config)
    assert e.value.missing == ["blocks.1.ffn.fc2.bias"]
    assert e.value.unexpected == ["blocks.0.attn.k_bias"]
    assert [k for k, _, _ in e.value.mis_shaped] == ["head.bias"]
    message = str(e.value)
    for fragment in (
        "blocks.1.ffn.fc2.bias",
        "blocks.0.attn.k_bias",
        "wrong shape for head.bias: got (10,), expected (64,)",
    ):
        assert fragment in message


def test_buffers_are_optional(mvar_sd):
    config = tw.config_from_state_dict(mvar_sd)
    without = {k: v for k, v in mvar_sd.items() if k not in tw.buffer_keys(config.depth)}
    assert len(without) == len(mvar_sd) - 4
    tw.params_from_state_dict(without, config)
    with pytest.raises(CheckpointError, match="cannot tell MVAR from VAR: .* pass family='mvar' or 'var'"):
        tw.config_from_state_dict(without)
    assert tw.config_from_state_dict(without, family="mvar") == config


def test_bad_requests_raise(mvar_sd):
    with pytest.raises(ValueError, match="num_heads=8 but the checkpoint"):
        tw.config_from_state_dict(mvar_sd, num_heads=8)
    with pytest.raises(ValueError, match="cannot be overridden"):
        tw.config_from_state_dict(mvar_sd, depth=4)
    with pytest.raises(
        ValueError, match=r"patch_nums \(1, 2, 4\) give 21; pass the pyramid it was trained on"
    ):
        tw.config_from_state_dict(mvar_sd, patch_nums=(1, 2, 4))
    short = dict(mvar_sd, pos_1LC=mvar_sd["pos_1LC"][:, :30])  # the tiny configs' 1..4 pyramid
    with pytest.raises(ValueError, match="30 positions, the length of no official .* --patch_nums"):
        tw.config_from_state_dict(short, family="mvar")
    assert tw.config_from_state_dict(short, family="mvar", patch_nums=(1, 2, 3, 4)).seq_len == 30
    with pytest.raises(StateDictMismatchError, match="head.weight"):
        tw.config_from_state_dict({k: v for k, v in mvar_sd.items() if k != "head.weight"})
    zero_mask = dict(mvar_sd, attn_bias_for_masking=np.zeros((1, 1, 680, 680), np.float32))
    with pytest.raises(CheckpointError, match="none of the known training masks"):
        tw.config_from_state_dict(zero_mask)


# ----------------------------------------------------------------------------
# M-VAR (OliverRensu/MVAR): Mamba2 layers and a 9-way ada_lin.


@pytest.fixture(scope="module")
def m_var_sd():
    return {
        variant: load_state_dict(M_VAR_FIXTURES / f"tiny_mvar_m_{variant}.pth") for variant in M_VAR_VARIANTS
    }


def test_m_var_architecture_and_values(m_var_sd):
    l21 = tw.config_from_state_dict(m_var_sd["l21"])
    assert l21 == TransformerConfig(
        vocab_size=64, cvae=8, num_classes=10, depth=2, embed_dim=64, num_heads=4, family="m_var"
    )
    # Without L2 attention nothing in the file gives the heads (as for MVAR/VAR).
    l20 = tw.config_from_state_dict(m_var_sd["l20"], num_heads=4)
    assert (l20.family, l20.attn_l2_norm, l20.num_heads) == ("m_var", False, 4)
    sd = m_var_sd["l21"]
    mamba = tw.params_from_state_dict(sd, l21)["params"]["blocks_1"]["mamba"]
    np.testing.assert_array_equal(mamba["in_proj"]["kernel"], sd["blocks.1.mamba.in_proj.weight"].T)
    np.testing.assert_array_equal(
        mamba["conv1d"]["kernel"], sd["blocks.1.mamba.conv1d.weight"].transpose(2, 1, 0)
    )
    np.testing.assert_array_equal(mamba["norm"]["scale"], sd["blocks.1.mamba.norm.weight"])
    for name in ("A_log", "dt_bias", "D"):
        np.testing.assert_array_equal(mamba[name], sd[f"blocks.1.mamba.{name}"])


def test_m_var_full_size_layout_follows_the_official_constructor():
    # models/basic_mvar.py: Mamba2(d_model=C, d_state=64, d_conv=4, expand=2), headdim 64;
    # ada_lin Linear(C, 9C). At d16: d_inner 2048, 32 heads, conv over x, B, C.
    shapes = tw.official_shapes(TransformerConfig(depth=16, family="m_var", attn_l2_norm=False))
    assert shapes["blocks.15.mamba.in_proj.weight"] == (2 * 2048 + 2 * 64 + 32, 1024)
    assert shapes["blocks.15.mamba.conv1d.weight"] == (2048 + 2 * 64, 1, 4)
    assert shapes["blocks.15.mamba.conv1d.bias"] == (2048 + 2 * 64,)
    assert shapes["blocks.15.mamba.out_proj.weight"] == (1024, 2048)
    assert shapes["blocks.15.mamba.norm.weight"] == (2048,)
    assert shapes["blocks.0.mamba.A_log"] == shapes["blocks.0.mamba.D"] == (32,)
    assert shapes["blocks.0.ada_lin.1.weight"] == (9 * 1024, 1024)
    assert not any(k.endswith(("mamba.in_proj.bias", "out_proj.bias")) for k in shapes)


def test_m_var_files_are_checked_strictly(m_var_sd, fixture_dir):
    sd = m_var_sd["l21"]
    config = tw.config_from_state_dict(sd)
    broken = {k: v for k, v in sd.items() if k != "blocks.1.mamba.dt_bias"}
    broken["blocks.0.mamba.in_proj.weight"] = np.zeros((450, 64), np.float32)  # d_state 96
    with pytest.raises(StateDictMismatchError) as e:
        tw.params_from_state_dict(broken, config)
    assert e.value.missing == ["blocks.1.mamba.dt_bias"]
    assert "wrong shape for blocks.0.mamba.in_proj.weight: got (450, 64), expected (386, 64)" in str(e.value)
    with pytest.raises(CheckpointError, match="holds blocks.0.mamba.in_proj.weight: these are M-VAR weights"):
        tw.config_from_state_dict(sd, family="mvar")
    with pytest.raises(CheckpointError, match="these are not M-VAR weights"):
        tw.config_from_state_dict(load_state_dict(fixture_dir / "tiny_var.pth"), family="m_var")


def _state_dicts_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """The same keys, dtypes, shapes and values, bit for bit."""
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert (got[key].dtype, got[key].shape) == (value.dtype, value.shape), key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize(
    "path",
    [
        "official/tiny_var.pth",
        "official/tiny_mvar.pth",
        "official/tiny_mvar_release_layout.pth",
        *(f"m_var/tiny_mvar_m_{variant}.pth" for variant in M_VAR_VARIANTS),
    ],
)
def test_every_fixture_round_trips_to_its_official_state_dict(fixture_dir, path):
    """official -> params -> official gives the file's every tensor back, buffers included."""
    state_dict = load_state_dict(fixture_dir.parent / path)
    config = tw.config_from_state_dict(state_dict, num_heads=4)
    params = tw.params_from_state_dict(state_dict, config)
    _state_dicts_equal(tw.state_dict_from_params(params, config), state_dict)
    # The sampler's layout (blocks stacked on a depth axis) exports the same file.
    _state_dicts_equal(tw.state_dict_from_params(stack_blocks(params, config.depth), config), state_dict)


def test_the_export_of_every_full_size_checkpoint_has_its_keys(fixture_dir):
    for name, shapes in _official_checkpoints(fixture_dir).items():
        family = "mvar" if name.startswith("mvar") else "var"
        config = tw.config_from_state_dict(_shape_only(shapes), family=family)
        exported = {
            **tw.official_shapes(config),
            **{k: v.shape for k, v in tw.official_buffers(config).items()},
        }
        assert exported == {k: tuple(s) for k, s in shapes.items()}, name


def test_trained_params_export_and_import_unchanged(mvar_sd):
    """What the trainer changes goes out and comes back bit for bit, in every layout: with the
    fixtures' parity (the official code's outputs on the imported weights), the official code
    computes on an exported model what mvar_jax computes."""
    for config in (
        tw.config_from_state_dict(mvar_sd),
        SHARED_ADALN,
    ):
        shapes = param_shapes(config)
        leaves, tree = jax.tree.flatten(shapes)
        keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
        trained = jax.tree.unflatten(
            tree, [np.asarray(jax.random.normal(k, s.shape, np.float32)) for k, s in zip(keys, leaves)]
        )
        state_dict = tw.state_dict_from_params(trained, config)
        assert (
            state_dict["lvl_1L"].dtype == np.int64 and state_dict["attn_bias_for_masking"].dtype == np.float32
        )
        back = tw.params_from_state_dict(state_dict, config)
        jax.tree.map(np.testing.assert_array_equal, back, trained)


def test_export_names_params_that_do_not_fit(mvar_sd):
    config = tw.config_from_state_dict(mvar_sd)
    params = tw.params_from_state_dict(mvar_sd, config)
    wider = dataclasses.replace(config, embed_dim=config.embed_dim * 2)
    with pytest.raises(
        StateDictMismatchError,
        match=r"wrong shape for blocks_0/ada_lin/bias: got \(384,\), expected \(768,\)",
    ):
        tw.state_dict_from_params(params, wider)
