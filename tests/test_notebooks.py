"""The notebooks run top to bottom and leave their artefacts.

Each notebook's code cells are executed in order in one fresh namespace, in a
subprocess (as a kernel would), with ``MVAR_NOTEBOOK_SMOKE=1`` so that they
shrink their work. IPython-only lines (``%pip``, ``!git``) become ``pass``: the
install cell is skipped here because the package is importable. A JSON object
of ``# @param`` fields sets them as a user would in Colab's form: the
sampling notebook samples the 64 px model that ``train_small.ipynb`` exports
rather than the 256 px fixture, whose sampler takes a minute to compile here.

    python tests/test_notebooks.py notebooks/train_small.ipynb '{"NUM_STEPS": 40}'   # the runner
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
from typing import Any

import numpy as np
import PIL.Image
import pytest

from mvar_jax import checkpoint

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
NAMES = ("convert", "sampling", "train_small", "editing")
TIMEOUT_S = 600


def code_cells(
    path: pathlib.Path, params: dict[str, Any] | None = None, magics: dict[str, str] | None = None
) -> list[str]:
    """The code cells' sources, IPython-only lines replaced by ``pass`` at their indentation
    (or by ``magics[prefix]`` for a line starting with that prefix, to stand in for it).

    ``params`` replaces the values of ``NAME = ...  # @param`` lines (Python
    literals); naming a field that the notebook does not have is an error.
    """
    params, magics = dict(params or {}), dict(magics or {})
    cells = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        lines = []
        for line in "".join(cell["source"]).splitlines():
            body = line.lstrip()
            if body[:1] in ("%", "!"):
                stand_in = next((v for k, v in magics.items() if body.startswith(k)), "pass")
                line = line[: len(line) - len(body)] + stand_in
            field = re.match(r"(\w+) = .*# @param", line)
            if field and field[1] in params:
                line = f"{field[1]} = {params.pop(field[1])!r}  # @param"
            lines.append(line)
        cells.append("\n".join(lines))
    if params:
        raise ValueError(f"{path.name} has no # @param fields {sorted(params)}")
    return cells


def run_notebook(path: pathlib.Path, params: dict[str, Any] | None = None) -> None:
    """Executes the code cells in order in one namespace, like a kernel."""
    namespace = {"__name__": "__main__"}
    for i, source in enumerate(code_cells(path, params)):
        exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)


def execute(name: str, cwd: pathlib.Path, **params: Any) -> str:
    """Runs ``notebooks/<name>.ipynb`` in a subprocess in ``cwd``; returns its output."""
    env = dict(
        os.environ,
        MVAR_NOTEBOOK_SMOKE="1",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        TFDS_DATA_DIR=str(cwd / "tfds"),
    )
    proc = subprocess.run(
        [sys.executable, __file__, str(NOTEBOOKS / f"{name}.ipynb"), json.dumps(params)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name}.ipynb failed:\n{output[-6000:]}"
    return output


def image_size(path: pathlib.Path) -> tuple[int, int]:
    """(width, height) of a PNG, which must exist."""
    assert path.is_file(), f"missing {path}"
    with PIL.Image.open(path) as img:
        return img.size


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, builtin_shapes_dir) -> pathlib.Path:
    """The notebooks' working directory; its tfds/ is the session's built-in dataset."""
    workdir = tmp_path_factory.mktemp("notebooks")
    (workdir / "tfds").symlink_to(builtin_shapes_dir, target_is_directory=True)
    return workdir


@pytest.fixture(scope="module")
def trained(workdir) -> str:
    """train_small.ipynb's output, plus a VAR-attention copy of its model for the comparison."""
    output = execute("train_small", workdir)
    model = checkpoint.load_model(workdir / "notebook_out" / "train_small" / "model")
    checkpoint.save_model(
        workdir / "notebook_out" / "train_small_var",
        vqvae_config=model.vqvae_config,
        vqvae_params=model.vqvae_params,
        transformer_params=model.transformer_params,
        transformer_config=dataclasses.replace(model.transformer_config, family="var"),
    )
    return output


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_clean_nbformat4(name):
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    assert (nb["nbformat"], nb["nbformat_minor"]) == (4, 5)
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    ids = [cell["id"] for cell in nb["cells"]]
    assert len(set(ids)) == len(ids)
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)
    assert {cell["cell_type"] for cell in nb["cells"]} == {"code", "markdown"}
    install = "".join(code[0]["source"])
    assert 'find_spec("mvar_jax") is None' in install and "%pip install" in install
    assert "://" not in install and "git clone -" not in install  # no repository URL to guess
    assert any("# @param" in "".join(cell["source"]) for cell in code[1:])


def run_install_cell(name: str, cwd: pathlib.Path, venv: pathlib.Path) -> subprocess.CompletedProcess:
    """The notebook's install cell in a bare virtual environment (mvar_jax is absent), then
    ``import mvar_jax`` in the same process, as the next cell does.

    The editable ``%pip install`` stands in as what it leaves behind: a ``.pth`` file in
    site-packages naming the clone, which a running kernel only reads if the cell tells it to.
    """
    editable = "pathlib.Path(sysconfig.get_paths()['purelib'], 'clone.pth').write_text(str(CLONE))"
    cell = code_cells(NOTEBOOKS / f"{name}.ipynb", magics={"%pip install -q -r": editable})[0]
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    for pth in venv.glob("lib/python*/site-packages/clone.pth"):
        pth.unlink()
    script = "import sys\nexec(sys.argv[1])\nimport mvar_jax\nprint('imported', mvar_jax.__file__)"
    return subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c", script, cell],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def fake_clone(root: pathlib.Path) -> pathlib.Path:
    (root / "mvar_jax").mkdir(parents=True)
    (root / "mvar_jax" / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text("")
    (root / "notebooks").mkdir()
    return root


@pytest.mark.parametrize("name", NAMES)
def test_install_cell_finds_the_clone_it_runs_in(name, tmp_path):
    clone = fake_clone(tmp_path / "checkout")
    for cwd in (clone / "notebooks", clone):  # Jupyter starts in notebooks/, a shell at the root
        proc = run_install_cell(name, cwd, tmp_path / "venv")
        assert proc.returncode == 0, proc.stderr
        assert f"installing the clone at {clone}" in proc.stdout  # the %pip line's target
        assert f"imported {clone / 'mvar_jax' / '__init__.py'}" in proc.stdout
    fresh = fake_clone(tmp_path / "content" / "mvar_jax")  # `git clone URL` in Colab's /content
    proc = run_install_cell(name, fresh.parent, tmp_path / "venv")
    assert f"installing the clone at {fresh}" in proc.stdout, proc.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_install_cell(name, elsewhere, tmp_path / "venv")
    assert proc.returncode != 0
    assert "not inside a clone of it" in proc.stderr and "pip install" in proc.stderr


def test_code_cells_skip_shell_lines_and_set_params(tmp_path):
    path = tmp_path / "nb.ipynb"
    path.write_text(
        json.dumps(
            {
                "cells": [
                    {"cell_type": "markdown", "source": ["%not code"]},
                    {"cell_type": "code", "source": ["if x:\n", "    !ls\n", "    %cd y\n", "z = 1"]},
                    {"cell_type": "code", "source": ['DIR = "a"  # @param {type:"string"}\n', "N = 2"]},
                ]
            }
        )
    )
    assert code_cells(path) == [
        "if x:\n    pass\n    pass\nz = 1",
        'DIR = "a"  # @param {type:"string"}\nN = 2',
    ]
    assert code_cells(path, {"DIR": "b/c"})[1] == "DIR = 'b/c'  # @param\nN = 2"
    assert code_cells(path, {"DIR": 3})[1] == "DIR = 3  # @param\nN = 2"
    with pytest.raises(ValueError, match=r"no # @param fields \['N'\]"):
        code_cells(path, {"N": "3"})


def test_convert_notebook(workdir):
    output = execute("convert", workdir)
    out = workdir / "notebook_out"
    model = checkpoint.load_model(out / "tiny_mvar")
    assert (model.transformer_config.family, model.transformer_config.num_heads) == ("mvar", 4)
    side = model.vqvae_config.image_size
    assert image_size(out / "roundtrip.png") == (2 * side, side)
    assert " 1x1  [[" in output and "16x16" in output and "PSNR" in output


def test_train_small_notebook(trained, workdir):
    run = workdir / "notebook_out" / "train_small"
    model = checkpoint.load_model(run / "model")
    assert model.transformer_config.patch_nums == (1, 2, 3, 4)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert image_size(run / "samples" / "step_00000006.png")
    assert image_size(workdir / "notebook_out" / "train_small_samples.png")[0] == 8 * 64
    curve = [line.split() for line in trained.splitlines() if line.startswith("step ") and line.endswith("#")]
    assert [int(words[1]) for words in curve] == [2, 4, 6]  # log_every 2 of 6 steps
    losses = np.array([float(words[3]) for words in curve])
    assert np.all(np.isfinite(losses)) and np.all((losses > 0) & (losses < np.log(64)))
    assert "last per-scale cross-entropy: 1x1" in trained


def test_sampling_notebook(trained, workdir):
    output = execute(
        "sampling",
        workdir,
        CHECKPOINT="notebook_out/train_small/model",
        VAR_CHECKPOINT="notebook_out/train_small_var",
    )
    out = workdir / "notebook_out"
    assert image_size(out / "samples.png")[0] == 2 * 64  # smoke mode: the first 2 labels
    assert image_size(out / "pyramid.png") == (4 * 64, 2 * 64)  # 4 scales x 2 samples
    assert image_size(out / "mvar_vs_var.png")[0] == 2 * 64
    last_level_diff = float(output.split("max |diff| ")[1].split()[0])
    assert last_level_diff < 1e-4
    assert re.search(r"^MVAR  depth 2: .* ms per batch", output, re.M)
    assert re.search(r"^VAR   depth 2: .* ms per batch", output, re.M)


def test_editing_notebook(trained, workdir):
    output = execute("editing", workdir, CHECKPOINT="notebook_out/train_small/model")
    # input | mask | in-painted | out-painted | class-edited, at 64 px
    assert image_size(workdir / "notebook_out" / "editing.png") == (5 * 64, 64)
    # The edit holds: every kept token is the image's, and the box was drawn anew. (A model
    # trained for 6 steps draws poorly: its pixels inside and outside the box are no test.)
    for name in ("in-painted", "out-painted", "class 3"):
        kept, of, drawn_same, drawn = map(
            int, re.search(rf"{name}: (\d+) of (\d+) kept tokens .*, (\d+) of (\d+) drawn", output).groups()
        )
        assert kept == of > 0 and drawn > 0 and drawn_same < drawn
    for where in ("outside the box", "inside"):
        assert np.isfinite(float(re.search(rf"in-painted vs reconstruction, {where}: (\S+) dB", output)[1]))


if __name__ == "__main__":
    run_notebook(pathlib.Path(sys.argv[1]), json.loads(sys.argv[2]) if len(sys.argv) > 2 else None)
