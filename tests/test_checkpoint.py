"""Model export (mvar_jax.checkpoint): round trip of the official tiny weights, clear errors,
and refusal of a directory whose configs do not describe its params."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import MINI_VQVAE, xla_flags

from mvar_jax import checkpoint
from mvar_jax.errors import CheckpointError, StateDictMismatchError
from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.transformer import init_params, stack_blocks
from mvar_jax.models.vqvae import VQVAEConfig, abstract_variables
from mvar_jax.weights.transformer import load_transformer
from mvar_jax.weights.vqvae import load_official_vqvae


@pytest.fixture(scope="module")
def tiny_model(fixture_dir):
    vqvae_config, vqvae_params = load_official_vqvae(fixture_dir / "tiny_vae.pth")
    transformer_config, transformer_params = load_transformer(
        fixture_dir / "tiny_mvar.pth", kernel_size=7, refine_step=8
    )
    return dict(
        vqvae_config=vqvae_config,
        vqvae_params=vqvae_params,
        transformer_config=transformer_config,
        transformer_params=transformer_params,
    )


# A tiny model whose params a subprocess replicates over two simulated devices
# before saving; the test loads it with the one device this process has.
_TWO_DEVICE_SAVE = """
import sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from mvar_jax import checkpoint
from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.transformer import init_params
from mvar_jax.models.vqvae import VQVAEConfig, abstract_variables

assert jax.device_count() == 2, jax.devices()
vqvae_config = VQVAEConfig(**_VQVAE)
transformer_config = TransformerConfig(**_TRANSFORMER)
replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
def place(tree):
    return jax.device_put(tree, replicated)
vqvae_params = place(jax.tree.map(lambda s: np.arange(s.size, dtype=np.float32).reshape(s.shape),
                                  abstract_variables(vqvae_config)))
transformer_params = place(init_params(transformer_config, jax.random.PRNGKey(0)))
checkpoint.save_model(sys.argv[1], vqvae_config=vqvae_config, vqvae_params=vqvae_params,
                      transformer_config=transformer_config, transformer_params=transformer_params)
"""
_VQVAE = dict(MINI_VQVAE, patch_nums=(1, 2))
_TRANSFORMER = dict(
    vocab_size=16,
    cvae=4,
    num_classes=3,
    depth=1,
    embed_dim=16,
    num_heads=2,
    patch_nums=(1, 2),
    family="var",
    refine_step=1,
)


def test_model_saved_on_two_devices_loads_on_one(tmp_path):
    directory = tmp_path / "model"
    script = f"_VQVAE = {_VQVAE!r}\n_TRANSFORMER = {_TRANSFORMER!r}\n{_TWO_DEVICE_SAVE}"
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2"),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(pathlib.Path(__file__).parent.parent),
    }
    out = subprocess.run(
        [sys.executable, "-c", script, str(directory)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert jax.device_count() == 1
    bundle = checkpoint.load_model(directory)
    want_vqvae = jax.tree.map(
        lambda s: np.arange(s.size, dtype=np.float32).reshape(s.shape),
        abstract_variables(VQVAEConfig(**_VQVAE)),
    )
    want_transformer = stack_blocks(init_params(TransformerConfig(**_TRANSFORMER), jax.random.PRNGKey(0)), 1)
    for got, want in ((bundle.vqvae_params, want_vqvae), (bundle.transformer_params, want_transformer)):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert len(a.sharding.device_set) == 1
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("export") / "model"
    checkpoint.save_model(directory, **tiny_model)
    return directory


def test_round_trip_keeps_configs_and_every_param(tiny_model, saved):
    """The model comes back ready to sample: its blocks stacked (as ``abstract_model`` says)."""
    bundle = checkpoint.load_model(saved)
    assert bundle.vqvae_config == tiny_model["vqvae_config"]
    assert bundle.transformer_config == tiny_model["transformer_config"]
    depth = bundle.transformer_config.depth
    stacked = stack_blocks(tiny_model["transformer_params"], depth)
    abstract = checkpoint.abstract_model(bundle.vqvae_config, bundle.transformer_config)
    assert jax.tree.map(np.shape, abstract.transformer_params) == jax.tree.map(np.shape, stacked)
    for name, want in (("vqvae_params", tiny_model["vqvae_params"]), ("transformer_params", stacked)):
        got = getattr(bundle, name)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_loaded_model_saves_back_with_one_subtree_per_block(saved, tmp_path):
    bundle = checkpoint.load_model(saved)
    checkpoint.save_model(tmp_path / "again", **bundle._asdict())
    again = checkpoint.load_model(tmp_path / "again")
    jax.tree.map(np.testing.assert_array_equal, again.transformer_params, bundle.transformer_params)


def test_save_refuses_to_overwrite_unless_asked(tiny_model, saved):
    with pytest.raises(FileExistsError, match="already holds a model"):
        checkpoint.save_model(saved, **tiny_model)


def test_a_failed_save_leaves_the_model_it_would_replace(tiny_model, saved, tmp_path, monkeypatch):
    """New configs never sit beside old params: a save that dies after writing its configs
    (here it raises; a kill leaves the same files) leaves the old model, whole."""
    copy = tmp_path / "model"
    shutil.copytree(saved, copy)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", no_space)
    other = dataclasses.replace(tiny_model["transformer_config"], dtype="bfloat16")
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_model(copy, **{**tiny_model, "transformer_config": other}, overwrite=True)
    assert checkpoint.load_model(copy).transformer_config == tiny_model["transformer_config"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # nothing half-written beside it
    # A directory holding anything but a model is never replaced.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("")
    with pytest.raises(FileExistsError, match=r"not part of a model \(todo.txt\)"):
        checkpoint.save_model(tmp_path / "notes", **tiny_model, overwrite=True)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="model directory not found"):
        checkpoint.load_model(tmp_path / "nope")


@pytest.mark.parametrize("remove", ["transformer_config.json", "params"])
def test_incomplete_directory_names_what_is_missing(saved, tmp_path, remove):
    copy = tmp_path / "model"
    shutil.copytree(saved, copy)
    target = copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CheckpointError, match=f"incomplete model directory .*missing {remove}"):
        checkpoint.load_model(copy)


def test_invalid_config_json(saved, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(saved, copy)
    (copy / "vqvae_config.json").write_text('{"vocab_size": 64, "colour": "blue"}')
    with pytest.raises(CheckpointError, match="invalid config JSON"):
        checkpoint.load_model(copy)


@pytest.mark.parametrize(
    "config_file,edit,error,match",
    [
        # The architecture in the JSON no longer matches the stored transformer.
        (
            "transformer_config.json",
            {"depth": 3},
            StateDictMismatchError,
            r"transformer params does not match.*\n  missing keys \(\d+\): params/blocks_2/",
        ),
        (
            "transformer_config.json",
            {"mlp_ratio": 2.0},
            StateDictMismatchError,
            r"wrong shape for params/blocks_0/ffn/fc1/kernel: got \(64, 256\), expected \(64, 128\)",
        ),
        (
            "vqvae_config.json",
            {"using_sa": False},
            StateDictMismatchError,
            r"VQVAE params does not match.*\n  unexpected keys",
        ),
        # Each config fits its params, but not the other network.
        (
            "transformer_config.json",
            {"vocab_size": 32},
            CheckpointError,
            r"the VQVAE \(.*vocab 64\) and the transformer \(.*vocab 32\) do not fit together",
        ),
    ],
)
def test_configs_that_do_not_describe_the_params_are_refused(
    saved, tmp_path, config_file, edit, error, match
):
    copy = tmp_path / "model"
    shutil.copytree(saved, copy)
    config = json.loads((copy / config_file).read_text())
    (copy / config_file).write_text(json.dumps({**config, **edit}))
    with pytest.raises(error, match=match) as info:
        checkpoint.load_model(copy)
    assert str(info.value).startswith(str(copy))


# A tokenizer directory: the VQVAE alone.


@pytest.fixture(scope="module")
def saved_tokenizer(tiny_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("export") / "tokenizer"
    checkpoint.save_tokenizer(
        directory, vqvae_config=tiny_model["vqvae_config"], vqvae_params=tiny_model["vqvae_params"]
    )
    return directory


def _assert_same_params(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tokenizer_round_trip(tiny_model, saved_tokenizer):
    assert sorted(p.name for p in saved_tokenizer.iterdir()) == ["params", "vqvae_config.json"]
    config, params = checkpoint.load_tokenizer(saved_tokenizer)
    assert config == tiny_model["vqvae_config"]
    _assert_same_params(params, tiny_model["vqvae_params"])


def test_load_model_on_a_tokenizer_directory_says_what_it_is(saved_tokenizer):
    with pytest.raises(
        CheckpointError,
        match="is a tokenizer directory .*a generator model "
        r"\(VQVAE \+ transformer.*\) was expected",
    ):
        checkpoint.load_model(saved_tokenizer)


def test_load_tokenizer_reads_the_vqvae_of_a_generator_model(tiny_checkpoints, fixture_dir):
    config, params = checkpoint.load_tokenizer(tiny_checkpoints["mvar"])
    bundle = checkpoint.load_model(tiny_checkpoints["mvar"])
    assert config == bundle.vqvae_config
    _assert_same_params(params, bundle.vqvae_params)
    # ... which are the official weights it was converted from.
    _assert_same_params(params, load_official_vqvae(fixture_dir / "tiny_vae.pth")[1])


def test_tokenizer_over_a_generator_model_drops_its_transformer(tiny_model, saved, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(saved, copy)
    with pytest.raises(FileExistsError, match="already holds a model"):
        checkpoint.save_tokenizer(
            copy, vqvae_config=tiny_model["vqvae_config"], vqvae_params=tiny_model["vqvae_params"]
        )
    checkpoint.save_tokenizer(
        copy, vqvae_config=tiny_model["vqvae_config"], vqvae_params=tiny_model["vqvae_params"], overwrite=True
    )
    assert not (copy / "transformer_config.json").exists()
    with pytest.raises(CheckpointError, match="is a tokenizer directory"):
        checkpoint.load_model(copy)


def test_generator_model_without_transformer_config_is_incomplete(saved, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(saved, copy)
    (copy / "transformer_config.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete model directory .*missing transformer_config.json"):
        checkpoint.load_model(copy)
    checkpoint.load_tokenizer(copy)  # Its VQVAE is whole.


@pytest.mark.parametrize(
    "remove, match",
    [
        (None, "tokenizer directory not found"),
        ("vqvae_config.json", "incomplete tokenizer directory .*missing vqvae_config.json"),
        ("params", "incomplete tokenizer directory .*missing params"),
    ],
)
def test_load_tokenizer_names_what_is_missing(saved_tokenizer, tmp_path, remove, match):
    copy = tmp_path / "tokenizer"
    if remove is not None:
        shutil.copytree(saved_tokenizer, copy)
        target = copy / remove
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load_tokenizer(copy)


def test_tokenizer_whose_config_does_not_describe_its_params(saved_tokenizer, tmp_path):
    copy = tmp_path / "tokenizer"
    shutil.copytree(saved_tokenizer, copy)
    config = json.loads((copy / "vqvae_config.json").read_text())
    (copy / "vqvae_config.json").write_text(json.dumps({**config, "z_channels": 16}))
    with pytest.raises(
        StateDictMismatchError,
        match=r"(?s)VQVAE params does not match.*\n  wrong shape for "
        r"params/quant_conv/kernel: got \(3, 3, 8, 8\), expected "
        r"\(3, 3, 16, 16\)",
    ) as info:
        checkpoint.load_tokenizer(copy)
    assert str(info.value).startswith(f"{copy}: VQVAE params")


def test_vqvae_checkpoint_accepts_a_pth_a_tokenizer_or_a_generator_model(
    fixture_dir, saved_tokenizer, tiny_checkpoints
):
    want_config, want_params = load_official_vqvae(fixture_dir / "tiny_vae.pth", patch_nums=(1, 2, 3, 4))
    for source in (fixture_dir / "tiny_vae.pth", saved_tokenizer, tiny_checkpoints["var"]):
        config, params = checkpoint.load_vqvae_checkpoint(source, (1, 2, 3, 4))
        assert config == want_config, source
        _assert_same_params(params, want_params)
    assert checkpoint.load_vqvae_checkpoint(saved_tokenizer)[0].patch_nums == VQVAEConfig().patch_nums


def test_vqvae_checkpoint_with_one_phi_per_scale_keeps_its_scale_count(tmp_path):
    config = VQVAEConfig(**MINI_VQVAE, share_quant_resi=0, patch_nums=(1, 2))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_variables(config))
    checkpoint.save_tokenizer(tmp_path / "tok", vqvae_config=config, vqvae_params=params)
    assert checkpoint.load_vqvae_checkpoint(tmp_path / "tok", (1, 3))[0].patch_nums == (1, 3)
    with pytest.raises(
        CheckpointError,
        match=r"one Phi per scale \(2, share_quant_resi=0\) "
        r"but patch_nums \(1, 2, 3\) has 3 scales",
    ):
        checkpoint.load_vqvae_checkpoint(tmp_path / "tok", (1, 2, 3))
    with pytest.raises(CheckpointError, match="patch_nums must be"):
        checkpoint.load_vqvae_checkpoint(tmp_path / "tok", (2, 1))
