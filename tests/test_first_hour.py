"""A new user's first hour: every command from a scratch directory, every mistake one line.

The subprocess tests run the installed package (``make setup`` installs it editable) from a
temporary directory with no ``PYTHONPATH``, as a user who left the repository would.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from conftest import FIXTURES, REPO

import sample
import train
from mvar_jax import convert
from mvar_jax.configs import tiny_cpu
from mvar_jax.eval import fid, quality

# Every entry point's main(argv), in-process, as (name, main).
COMMANDS = [
    ("train.py", train.main),
    ("sample.py", sample.main),
    ("convert", convert.main),
    ("token_cache", importlib.import_module("mvar_jax.data.token_cache.__main__").main),
    ("records", importlib.import_module("mvar_jax.data.records.__main__").main),
    ("quality", quality.main),
    ("fid", fid.main),
]


def _scratch_run(argv: list[str], cwd: pathlib.Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python *argv`` in ``cwd``, with the package found only as installed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _one_line_error(capsys, main, argv: list[str], prog: str) -> str:
    """``main(argv)`` must exit 2 with a single ``<prog>: error:`` line; that line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("name, main", COMMANDS, ids=[name for name, _ in COMMANDS])
def test_help_is_one_format_and_exits_0(capsys, name, main):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(".") and "\n\nflags:\n  --" in out


def test_help_runs_from_a_scratch_directory(tmp_path):
    for argv in (["-m", "mvar_jax.convert", "--help"], [str(REPO / "train.py"), "--help"]):
        proc = _scratch_run(argv, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "flags:" in proc.stdout and not proc.stderr.strip(), proc.stderr


def test_sampling_flags_share_names_and_say_why_defaults_differ(capsys):
    helps = {}
    for name, main in (("sample", sample.main), ("quality", quality.main)):
        with pytest.raises(SystemExit):
            main(["--help"])
        helps[name] = capsys.readouterr().out
    for flag in ("--num_per_class", "--top_k", "--top_p", "--cfg", "--batch_size"):
        assert all(f"  {flag}: " in h for h in helps.values()), flag
    assert "0 here, not sample.py's FID setting" in helps["quality"]


def test_train_mistakes_are_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # configs given by absolute path, as from anywhere
    fixture = f"{REPO / 'configs' / 'tiny_cpu.py'}:fixture"
    workdir = ["--workdir", str(tmp_path / "w")]
    err = _one_line_error(
        capsys, train.main, ["--config", fixture, "--config.modle.depth=2", *workdir], "train.py"
    )
    assert "--config.modle.depth=2: no config field 'modle'" in err
    err = _one_line_error(capsys, train.main, ["--config", "nope.py", *workdir], "train.py")
    assert "--config: file not found" in err and "nope.py" in err
    err = _one_line_error(capsys, train.main, ["--config", fixture], "train.py")
    assert "--workdir required" in err
    err = _one_line_error(
        capsys, train.main, ["--config", fixture, "--config.model.family=mvr", *workdir], "train.py"
    )
    assert "config.model.family: unknown model family 'mvr'" in err
    # The demo's tokenizer, not made yet: the advice is the demo, not a download.
    demo = f"--config.vqvae_checkpoint={tmp_path / 'demo_out/tokenizer/model'}"
    err = _one_line_error(
        capsys, train.main, ["--config", str(REPO / "configs/tiny_cpu.py"), demo, *workdir], "train.py"
    )
    assert "config.vqvae_checkpoint: not found" in err and "make demo" in err and "download" not in err
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*.ocdbt"))


def test_config_paths_resolve_against_the_repository(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in ("demo", "fixture"):
        config = tiny_cpu.get_config(name)
        assert pathlib.Path(config.vqvae_checkpoint).is_absolute()
    assert pathlib.Path(tiny_cpu.get_config("fixture").vqvae_checkpoint).is_file()


def test_sampler_traps(capsys, tiny_checkpoints, tmp_path):
    ckpt = ["--checkpoint", str(tiny_checkpoints["mvar"])]
    err = _one_line_error(capsys, sample.main, [*ckpt, "--cfg", "-1", "--out", "x.npz"], "sample.py")
    assert "cfg" in err and ">= 0" in err
    err = _one_line_error(capsys, sample.main, [*ckpt, "--fid_npz", "a.png"], "sample.py")
    assert "--fid_npz must end in .npz" in err
    assert not pathlib.Path("a.png").exists() and not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("damage", ["data file", "manifest", "metadata"])
def test_damaged_model_directory_is_one_line(capsys, tiny_checkpoints, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoints["mvar"], model)
    params = model / "params"
    if damage == "data file":
        victim = max(params.rglob("d/*"), key=lambda p: p.stat().st_size)  # the largest array data
    else:
        victim = params / {"manifest": "manifest.ocdbt", "metadata": "_METADATA"}[damage]
    victim.unlink()
    err = _one_line_error(
        capsys, sample.main, ["--checkpoint", str(model), "--out", str(tmp_path / "x.npz")], "sample.py"
    )
    assert f"damaged model directory {model}:" in err and "--overwrite" in err
    assert len(err.replace(str(model), "DIR")) < 300, err


def test_readme_commands_from_a_scratch_directory(tmp_path):
    """README's conversion and sampling commands, on the tiny fixtures, from outside the
    repository (relative paths are the user's, not the repository's)."""
    proc = _scratch_run(
        [
            "-m",
            "mvar_jax.convert",
            "--vae",
            str(FIXTURES / "tiny_vae.pth"),
            "--mvar",
            str(FIXTURES / "tiny_mvar.pth"),
            "--out",
            "ckpt/mvar_d16",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "ckpt/mvar_d16/transformer_config.json").read_text())["family"] == "mvar"
    # The README's sampling line, with labels the 10-class fixture has.
    argv = [str(REPO / "sample.py"), "--checkpoint", "ckpt/mvar_d16", "--labels", "0,3,8", "--cfg", "1.5"]
    proc = _scratch_run(
        [*argv, "--top_k", "900", "--top_p", "0.96", "--seed", "0", "--out", "samples.png"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "note: --top_k 900 keeps the whole vocabulary of 64" in proc.stderr
    assert (tmp_path / "samples.png").is_file()
