"""Shared test set-up: float32 parity on the CPU, fixture paths, the slow marker."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "official"
REPO = pathlib.Path(__file__).parent.parent


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow test, run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixture_dir() -> pathlib.Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_io() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "tiny_io.npz") as f:
        return {k: f[k] for k in f.files}


def rel_err(out, ref) -> float:
    """``||out - ref|| / ||ref||``, the fixtures' parity metric."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def run_on_eight_devices(script: str | os.PathLike, cwd: pathlib.Path) -> dict:
    """Runs ``script`` on 8 simulated CPU devices; its last stdout line, parsed as JSON.

    The device count must be set before JAX starts, hence a fresh process.
    """
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=cwd)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def convert_tiny(fixture_dir: pathlib.Path, flag: str, weights: str, out: pathlib.Path,
                 *extra: str) -> None:
    """Runs the convert CLI on a tiny fixture (4 heads, as the fixtures were made)."""
    from mvar_jax import convert

    convert.main(["--vae", str(fixture_dir / "tiny_vae.pth"), flag, str(fixture_dir / weights),
                  "--out", str(out), "--num-heads", "4", *extra])


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, fixture_dir) -> dict[str, pathlib.Path]:
    """``{'mvar': dir, 'var': dir}`` converted by the CLI, shared by every test module."""
    root = tmp_path_factory.getbasetemp() / "tiny_checkpoints"
    dirs = {"mvar": root / "mvar", "var": root / "var"}
    for name, path in dirs.items():
        if not (path / "params").exists():  # Another module of this session may have made it.
            convert_tiny(fixture_dir, f"--{name}", f"tiny_{name}.pth", path)
    return dirs
