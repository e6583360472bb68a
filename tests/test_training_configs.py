"""The experiment configs resolve to the official settings; train.py wiring; fine-tune loading."""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from mvar_jax import checkpoint
from mvar_jax.models import families, m_var
from mvar_jax.models.segments import Segment, SegmentSchedule
from mvar_jax.models.vqvae import VQVAEConfig
from mvar_jax.sampling import SamplingOptions
from mvar_jax.training import generator, trainer
from mvar_jax.training.optimizer import OptimizerConfig
from mvar_jax.weights.transformer import load_transformer
from mvar_jax.weights.vqvae import load_official_vqvae

REPO = pathlib.Path(__file__).parent.parent

# config[:arg]: (family, depth, embed, global batch, epochs, finetune file, fsdp) from the
# READMEs.
OFFICIAL = {
    "mvar_d16": ("mvar", 16, 1024, 448, 300, "", False),
    "mvar_ft:d16": ("mvar", 16, 1024, 448, 80, "var_d16.pth", False),
    "mvar_ft:d20": ("mvar", 20, 1280, 192, 80, "var_d20.pth", False),
    "mvar_ft:d24": ("mvar", 24, 1536, 448, 80, "var_d24.pth", True),
    "var_d16": ("var", 16, 1024, 768, 200, "", False),
}


def _config(name: str):
    """``configs/<file>.py[:arg]``'s config, as ``train.py --config`` reads it."""
    file, *arg = name.split(":")
    return importlib.import_module(f"mvar_jax.configs.{file}").get_config(*arg)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_configs(name):
    family, depth, embed, batch, epochs, finetune, fsdp = OFFICIAL[name]
    config = _config(name)
    model = generator.transformer_config(config, VQVAEConfig())  # the released tokenizer
    assert (model.family, model.depth, model.embed_dim, model.num_heads) == (
        family,
        depth,
        embed,
        depth,
    )
    assert model.drop_path_rate == pytest.approx(0.1 * depth / 24)
    assert (model.vocab_size, model.cvae, model.num_classes, model.seq_len) == (4096, 32, 1000, 680)
    assert (model.kernel_size, model.refine_step, model.dtype) == (7, 8, "bfloat16")
    assert (config.batch_size, config.num_epochs) == (batch, epochs)
    assert config.finetune_from.endswith(finetune) and bool(config.finetune_from) == bool(finetune)
    assert config.parallel.fsdp == fsdp
    assert config.init.adaln_gamma == 1e-3 and config.optim.final_lr_ratio == 0.1
    assert OptimizerConfig(**config.optim).peak_learning_rate(batch) == pytest.approx(1e-4 * batch / 256)
    assert trainer.total_steps(config) == epochs * -(-1_281_167 // batch)


@pytest.mark.parametrize("file", ["mvar_ft", "m_var"])
@pytest.mark.parametrize("arg", [None, "d30", "16"])
def test_depth_configs_need_a_known_depth(file, arg):
    with pytest.raises(ValueError, match=f"configs/{file}.py:d16"):
        _config(file if arg is None else f"{file}:{arg}")


def test_config_argument_reaches_get_config():
    """``--config FILE.py:ARG`` (ml_collections' config_flags) calls ``get_config(ARG)``."""
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values)
    values(["prog", f"--config={REPO / 'configs' / 'mvar_ft.py'}:d20"])
    assert (values.config.model.depth, values.config.batch_size) == (20, 192)


# name: (depth, global batch, epochs, tblr, alng, wpe, attn_l2_norm) from the M-VAR README's
# commands (OliverRensu/MVAR); attn_l2_norm off for d16/d20 per its inference note.
M_VAR_OFFICIAL = {
    "m_var:d16": (16, 768, 200, 1e-4, 1e-3, 0.1, False),
    "m_var:d20": (20, 768, 250, 1e-4, 1e-3, 0.1, False),
    "m_var:d24": (24, 768, 350, 8e-5, 1e-4, 0.01, True),
}


@pytest.mark.parametrize("name", sorted(M_VAR_OFFICIAL))
def test_official_m_var_configs(name, fixture_dir):
    depth, batch, epochs, tblr, alng, wpe, l2_norm = M_VAR_OFFICIAL[name]
    config = _config(name)
    checked = config.copy_and_resolve_references()
    checked.vqvae_checkpoint = str(fixture_dir / "tiny_vae.pth")  # the released one is not here
    generator.check_config(checked)
    model = generator.transformer_config(config, VQVAEConfig())  # the released tokenizer
    assert (model.family, model.depth, model.embed_dim, model.num_heads) == (
        "m_var",
        depth,
        64 * depth,
        depth,
    )
    assert (model.attn_l2_norm, model.shared_aln, model.dtype) == (l2_norm, False, "bfloat16")
    assert model.drop_path_rate == pytest.approx(0.1 * depth / 24)
    mamba = m_var.mamba_config(model)
    assert (mamba.d_state, mamba.d_conv, mamba.expand) == (64, 4, 2)
    assert (config.batch_size, config.num_epochs, config.optim.base_lr) == (batch, epochs, tblr)
    assert (config.init.adaln_gamma, config.optim.final_lr_ratio) == (alng, wpe)
    assert (config.data.crop, config.data.hflip, config.label_smoothing) == ("resize_random_crop", False, 0.0)
    sampling = SamplingOptions(**config.sampling)  # the README's FID setting
    assert (sampling.cfg, sampling.top_k, sampling.top_p) == (1.5, 900, 0.96)
    assert trainer.total_steps(config) == epochs * -(-1_281_167 // batch)
    assert families.of(model).schedule(model, config.ratio_k) == SegmentSchedule((Segment(0, 10),), (0,))


def test_tiny_cpu_fixture_config_fits_the_fixture_tokenizer(fixture_dir):
    config = importlib.import_module("mvar_jax.configs.tiny_cpu").get_config("fixture")
    vqvae_config, _ = load_official_vqvae(fixture_dir / "tiny_vae.pth", patch_nums=config.model.patch_nums)
    model = generator.transformer_config(config, vqvae_config)
    assert (model.vocab_size, model.cvae, model.seq_len) == (64, 8, 30)
    assert config.vqvae_checkpoint == str(REPO / "tests/fixtures/official/tiny_vae.pth")  # from any directory
    assert config.data.token_cache_dir is None


def test_tiny_cpu_config_fits_the_demo_tokenizer():
    """The default tiny_cpu trains on the tokens of the tokenizer configs/vqvae_tiny_cpu.py makes."""
    tiny_cpu = importlib.import_module("mvar_jax.configs.tiny_cpu")
    config = tiny_cpu.get_config()
    tokenizer = importlib.import_module("mvar_jax.configs.vqvae_tiny_cpu").get_config()
    vqvae_config = importlib.import_module("mvar_jax.training.tokenizer").vqvae_config(tokenizer)
    model = generator.transformer_config(config, vqvae_config)  # raises if the maps do not fit
    assert (model.vocab_size, model.cvae) == (tokenizer.model.vocab_size, tokenizer.model.z_channels)
    assert model.patch_nums == tuple(tokenizer.model.patch_nums)
    assert vqvae_config.image_size == config.data.image_size == tokenizer.data.image_size
    with pytest.raises(ValueError, match="configs/tiny_cpu.py:vqgan: expected one of"):
        tiny_cpu.get_config("vqgan")


@pytest.mark.parametrize("tokenizer", ["demo", "fixture"])
@pytest.mark.parametrize("twin,family", [("tiny_cpu_var", "var"), ("tiny_cpu_m_var", "m_var")])
def test_tiny_cpu_twins_differ_from_tiny_cpu_in_the_model_family_only(
    twin, family, tokenizer, fixture_dir, monkeypatch
):
    """The MVAR / VAR / M-VAR comparison at one budget: only the model family differs."""
    mvar = importlib.import_module("mvar_jax.configs.tiny_cpu").get_config(tokenizer)
    other = importlib.import_module(f"mvar_jax.configs.{twin}").get_config(tokenizer)
    assert trainer.task_class(other) is trainer.task_class(mvar)
    assert trainer.total_steps(other) == trainer.total_steps(mvar)
    differ = {k for k, v in other.to_dict().items() if v != mvar.to_dict()[k]}
    assert differ == {"model"}
    assert {k for k, v in other.model.items() if v != mvar.model[k]} == {"family"}
    if tokenizer == "fixture":  # the demo's tokenizer is made by `make demo`
        trainer.check_config(other)
        generator.check_config(other)
        vqvae_config, _ = load_official_vqvae(fixture_dir / "tiny_vae.pth", patch_nums=other.model.patch_nums)
        mvar_model, other_model = (generator.transformer_config(c, vqvae_config) for c in (mvar, other))
        assert (mvar_model.family, other_model.family) == ("mvar", family)
        assert dataclasses.replace(other_model, family="mvar") == mvar_model


def test_train_py_applies_overrides_and_reports_bad_values(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            "configs/tiny_cpu.py",
            "--workdir",
            str(tmp_path),
            "--config.model.family=vqgan",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "config.model.family: unknown model family 'vqgan'; expected one of mvar, var, m_var" in out.stderr


def test_finetune_and_tokenizer_from_official_files_or_a_model_dir(fixture_dir, tmp_path):
    var_config, var_params = load_transformer(fixture_dir / "tiny_var.pth", family="var")
    mvar_config = dataclasses.replace(var_config, family="mvar")
    params = generator.finetune_params(fixture_dir / "tiny_var.pth", mvar_config)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(var_params["params"])):
        np.testing.assert_array_equal(a, b)
    # A converted model directory works too.
    vqvae_config, vqvae_params = load_official_vqvae(fixture_dir / "tiny_vae.pth")
    checkpoint.save_model(
        tmp_path / "model",
        vqvae_config=vqvae_config,
        vqvae_params=vqvae_params,
        transformer_config=var_config,
        transformer_params=var_params,
    )
    params = generator.finetune_params(tmp_path / "model", mvar_config)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(var_params["params"])):
        np.testing.assert_array_equal(np.asarray(a), b)
    # The tokenizer can come from the same directory, at the run's token pyramid.
    tokenizer_config, tokenizer_params = generator.load_tokenizer(tmp_path / "model", (1, 2, 3, 4))
    assert tokenizer_config == dataclasses.replace(vqvae_config, patch_nums=(1, 2, 3, 4))
    for a, b in zip(jax.tree.leaves(tokenizer_params), jax.tree.leaves(vqvae_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    deeper = dataclasses.replace(mvar_config, depth=3)
    with pytest.raises(ValueError, match="does not fit the model: depth: checkpoint 2 vs config 3"):
        generator.finetune_params(fixture_dir / "tiny_var.pth", deeper)
