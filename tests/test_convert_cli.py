"""``python -m mvar_jax.convert``: official tiny fixtures -> model directories, and a
tokenizer back to the official VQVAE file.

The ``tiny_checkpoints`` fixture (conftest) converts the fixtures through the CLI
once per session.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch
from conftest import M_VAR_FIXTURES, convert_tiny, usage_error_of

from mvar_jax import checkpoint, convert

REPO = pathlib.Path(__file__).resolve().parents[1]


def _error_of(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        convert.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_converted_directory_is_self_contained(tiny_checkpoints, fixture_dir):
    for name in ("mvar", "var"):
        config = json.loads((tiny_checkpoints[name] / "transformer_config.json").read_text())
        assert (config["family"], config["num_heads"], config["depth"]) == (name, 4, 2)
        assert (config["kernel_size"], config["refine_step"]) == (7, 8)
    model = checkpoint.load_model(tiny_checkpoints["mvar"])
    assert model.vqvae_config.vocab_size == model.transformer_config.vocab_size == 64
    # Values survive the round trip, in Flax layout (Dense kernels transposed).
    sd = torch.load(fixture_dir / "tiny_mvar.pth", weights_only=True)
    np.testing.assert_array_equal(
        model.transformer_params["params"]["head"]["kernel"], sd["head.weight"].numpy().T
    )
    vae_sd = torch.load(fixture_dir / "tiny_vae.pth", weights_only=True)
    np.testing.assert_array_equal(
        model.vqvae_params["params"]["quantize"]["embedding"]["embedding"],
        vae_sd["quantize.embedding.weight"].numpy(),
    )


def test_var_weights_as_mvar_and_overwrite(tiny_checkpoints, fixture_dir, tmp_path, capsys):
    out = tmp_path / "as_mvar"
    shutil.copytree(tiny_checkpoints["mvar"], out)  # a model to replace
    convert_tiny(fixture_dir, "--mvar", "tiny_var.pth", out, "--kernel_size", "5", "--overwrite")
    warning = capsys.readouterr().err  # allowed, but said: the weights change what they attend to
    assert "tiny_var.pth holds VAR weights" in warning and "To keep them VAR, convert with --var" in warning
    as_mvar = checkpoint.load_model(out)
    var = checkpoint.load_model(tiny_checkpoints["var"])
    assert as_mvar.transformer_config.family == "mvar"
    assert as_mvar.transformer_config.kernel_size == 5
    np.testing.assert_array_equal(
        as_mvar.transformer_params["params"]["pos_embed"], var.transformer_params["params"]["pos_embed"]
    )
    # --overwrite replaces a model, never a directory holding anything else.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "stale.txt").write_text("x")
    with pytest.raises(SystemExit):
        convert_tiny(fixture_dir, "--var", "tiny_var.pth", tmp_path / "notes", "--overwrite")
    assert "not part of a model (stale.txt)" in capsys.readouterr().err
    assert (tmp_path / "notes" / "stale.txt").exists()


def test_m_var_converts_with_its_own_flag(m_var_checkpoints, capsys, fixture_dir, tmp_path):
    config = json.loads((m_var_checkpoints["l21"] / "transformer_config.json").read_text())
    assert (config["family"], config["attn_l2_norm"], config["num_heads"]) == ("m_var", True, 4)
    vae, out = str(fixture_dir / "tiny_vae.pth"), str(tmp_path / "out")
    m_var = str(M_VAR_FIXTURES / "tiny_mvar_m_l21.pth")
    err = _error_of(capsys, ["--vae", vae, "--mvar", m_var, "--out", out])
    assert "these are M-VAR weights" in err and "--m_var" in err
    err = _error_of(capsys, ["--vae", vae, "--m_var", str(fixture_dir / "tiny_mvar.pth"), "--out", out])
    assert "these are not M-VAR weights" in err
    err = _error_of(capsys, ["--vae", vae, "--m_var", m_var, "--out", out, "--kernel_size", "5"])
    assert "--kernel_size set MVAR's spatial-Markov attention; --m_var has none" in err


def test_errors_are_clear(capsys, fixture_dir, tmp_path):
    vae = str(fixture_dir / "tiny_vae.pth")
    out = str(tmp_path / "out")
    err = _error_of(capsys, ["--vae", vae, "--mvar", str(tmp_path / "nope.pth"), "--out", out])
    assert "not found" in err and "nope.pth" in err
    # Files given to the wrong flag are named as what they hold.
    mvar = str(fixture_dir / "tiny_mvar.pth")
    err = _error_of(capsys, ["--vae", vae, "--mvar", vae, "--out", out])
    assert f"--mvar {vae} holds a VQVAE, not transformer weights: did you swap --vae and --mvar?" in err
    err = _error_of(capsys, ["--vae", mvar, "--mvar", vae, "--out", out])
    assert f"--vae {mvar} holds MVAR transformer weights, not a VQVAE: did you swap" in err
    # A file that is neither: both the keys it lacks and the ones it should not have.
    foreign = tmp_path / "foreign.pth"
    torch.save({"foo.weight": torch.zeros(2)}, foreign)
    err = _error_of(capsys, ["--vae", vae, "--mvar", str(foreign), "--out", out])
    assert f"--mvar {foreign}: transformer state dict does not match" in err
    assert "missing keys (5): blocks.0.ffn.fc1.weight" in err and "unexpected keys (1): foo.weight" in err
    err = _error_of(capsys, ["--vae", str(foreign), "--mvar", mvar, "--out", out])
    assert "VQVAE state dict does not match" in err and "missing keys (2): encoder.conv_in.weight" in err
    err = _error_of(
        capsys, ["--vae", vae, "--mvar", str(fixture_dir / "tiny_mvar.pth"), "--out", out, "--num_heads", "8"]
    )
    assert "num_heads=8" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    err = _error_of(
        capsys, ["--vae", vae, "--var", str(fixture_dir / "tiny_var.pth"), "--out", str(tmp_path / "full")]
    )
    assert "not empty" in err and "--overwrite" in err
    assert not (tmp_path / "out").exists()


def test_command_line_exit_status(tmp_path):
    err = usage_error_of(
        "-m",
        "mvar_jax.convert",
        "--vae",
        str(tmp_path / "missing.pth"),
        "--mvar",
        str(tmp_path / "m.pth"),
        "--out",
        str(tmp_path / "o"),
    )
    assert "missing.pth" in err


def _official_tensors(path) -> dict[str, np.ndarray]:
    state_dict = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float32 for v in state_dict.values())
    return {k: v.numpy() for k, v in state_dict.items()}


def test_official_vae_round_trips_through_a_tokenizer_directory(capsys, fixture_dir, tmp_path):
    convert.main(["--vae", str(fixture_dir / "tiny_vae.pth"), "--out", str(tmp_path / "tok")])
    assert "tokenizer (VQVAE alone), vocab 64, Cvae 8" in capsys.readouterr().out
    assert not (tmp_path / "tok" / "transformer_config.json").exists()
    convert.main(["--to_official_vae", str(tmp_path / "out" / "vae.pth"), "--model", str(tmp_path / "tok")])
    printed = capsys.readouterr().out
    assert "VQVAE(vocab_size=64, z_channels=8, ch=32," in printed
    assert "load_state_dict(state_dict, strict=True)" in printed
    got = _official_tensors(tmp_path / "out" / "vae.pth")
    want = _official_tensors(fixture_dir / "tiny_vae.pth")
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_generator_model_exports_its_vqvae(tiny_checkpoints, fixture_dir, tmp_path):
    out = tmp_path / "vae.pth"
    convert.main(["--to_official_vae", str(out), "--model", str(tiny_checkpoints["var"])])
    out.write_bytes(b"stale")
    convert.main(["--to_official_vae", str(out), "--model", str(tiny_checkpoints["mvar"]), "--overwrite"])
    got = _official_tensors(out)
    want = _official_tensors(fixture_dir / "tiny_vae.pth")
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_tokenizer_modes_report_bad_input(capsys, tiny_checkpoints, fixture_dir, tmp_path):
    vae, model = str(fixture_dir / "tiny_vae.pth"), str(tiny_checkpoints["mvar"])
    out = str(tmp_path / "vae.pth")
    assert "--to_official_vae needs --model" in _error_of(capsys, ["--to_official_vae", out])
    err = _error_of(capsys, ["--to_official_vae", out, "--model", model, "--vae", vae])
    assert "--vae do not apply" in err
    err = _error_of(capsys, ["--to_official_vae", out, "--model", str(tmp_path / "nope")])
    assert "tokenizer directory not found" in err and "nope" in err
    no_vqvae = tmp_path / "no_vqvae"
    no_vqvae.mkdir()
    (no_vqvae / "transformer_config.json").write_text("{}")
    err = _error_of(capsys, ["--to_official_vae", out, "--model", str(no_vqvae)])
    assert "incomplete tokenizer directory" in err and "missing vqvae_config.json, params" in err
    err = _error_of(capsys, ["--to_official_vae", str(tmp_path), "--model", model])
    assert "is a directory" in err
    (tmp_path / "vae.pth").write_bytes(b"x")
    err = _error_of(capsys, ["--to_official_vae", out, "--model", model])
    assert "exists; pass --overwrite" in err
    assert "--to_official_vae" in _error_of(capsys, ["--model", model, "--out", out])
    assert "required: --vae, --out" in _error_of(capsys, ["--vae", vae])
    err = _error_of(capsys, ["--vae", vae, "--out", str(tmp_path / "tok"), "--num_heads", "4"])
    assert "--num_heads configure a transformer; they need one of --mvar, --var, --m_var" in err
    err = _error_of(capsys, ["--vae", str(fixture_dir / "tiny_mvar.pth"), "--out", str(tmp_path / "tok")])
    assert "holds MVAR transformer weights, not a VQVAE: pass it as --mvar, with its VQVAE as --vae" in err
    assert (tmp_path / "vae.pth").read_bytes() == b"x"
    assert not (tmp_path / "tok").exists()


def test_flag_errors_are_usage_errors(capsys, tmp_path):
    assert "--mvar and --var: convert one transformer at a time" in _error_of(
        capsys, ["--vae", "v.pth", "--mvar", "m.pth", "--var", "v.pth", "--out", str(tmp_path)]
    )
    assert "--num_heads=four" in _error_of(capsys, ["--num_heads", "four"])
    assert "unknown command line flag 'heads'" in _error_of(capsys, ["--heads", "4"]).lower()
    assert "expected comma-separated ints" in _error_of(capsys, ["--patch_nums", "1,x"])


def test_generators_export_the_official_files_they_came_from(
    capsys, tiny_checkpoints, m_var_checkpoints, fixture_dir, tmp_path
):
    """--to_official_<family>: the file converted in comes back out, every tensor and buffer."""
    for family, model, source in (
        ("mvar", tiny_checkpoints["mvar"], fixture_dir / "tiny_mvar.pth"),
        ("var", tiny_checkpoints["var"], fixture_dir / "tiny_var.pth"),
        ("m_var", m_var_checkpoints["l21"], M_VAR_FIXTURES / "tiny_mvar_m_l21.pth"),
    ):
        out = tmp_path / f"{family}.pth"
        convert.main([f"--to_official_{family}", str(out), "--model", str(model)])
        assert "then load_state_dict(state_dict, strict=True)" in capsys.readouterr().out
        got, want = torch.load(out, weights_only=True), torch.load(source, weights_only=True)
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_an_mvar_model_exported_as_var_keeps_its_weights_and_says_so(
    capsys, tiny_checkpoints, m_var_checkpoints, fixture_dir, tmp_path
):
    out = tmp_path / "as_var.pth"
    convert.main(["--to_official_var", str(out), "--model", str(tiny_checkpoints["mvar"])])
    assert "the official VAR code attends as VAR does" in capsys.readouterr().err
    got = torch.load(out, weights_only=True)
    mvar, var = (torch.load(fixture_dir / f"tiny_{n}.pth", weights_only=True) for n in ("mvar", "var"))
    assert torch.equal(got["attn_bias_for_masking"], var["attn_bias_for_masking"])  # VAR's mask
    assert torch.equal(got["head.weight"], mvar["head.weight"])  # MVAR's weights
    model = str(m_var_checkpoints["l21"])
    err = _error_of(capsys, ["--to_official_mvar", str(tmp_path / "x.pth"), "--model", model])
    assert (
        "holds M-VAR weights; MVAR's files hold another network: export them with --to_official_m_var" in err
    )
    err = _error_of(capsys, ["--to_official_var", str(out), "--to_official_vae", str(out), "--model", model])
    assert "--to_official_vae and --to_official_var: export one file at a time" in err
    err = _error_of(capsys, ["--to_official_var", str(out), "--model", model])
    assert "exists; pass --overwrite" in err
    assert "needs --model (a generator model directory)" in _error_of(
        capsys, ["--to_official_m_var", "x.pth"]
    )
