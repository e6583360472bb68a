"""Shared test set-up: float32 parity on the CPU, fixture paths, the slow marker, data."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import PIL.Image
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The commands' own cache setting stays off in the tests (test_sample_cli turns it on in a tmp
# dir); instead one JAX compilation cache serves the whole session: both workers and every
# command they start. Many tests compile the same tiny programs (a train step, a sampler) in
# fresh functions or processes, and JAX keys an entry by the program, the backend and the
# compiler's flags, so a hit is the program the compiler would have built. The directory is
# the session's own (set before the workers start, which inherit it) and removed at its end.
os.environ["MVAR_JAX_COMPILATION_CACHE"] = ""
SESSION_CACHE = "MVAR_JAX_TEST_SESSION_CACHE"
if SESSION_CACHE not in os.environ:
    os.environ[SESSION_CACHE] = tempfile.mkdtemp(prefix="mvar_jax_test_xla_")
    atexit.register(shutil.rmtree, os.environ[SESSION_CACHE], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[SESSION_CACHE]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
# Unoptimised CPU code compiles faster, but XLA 0.10's CPU backend miscompiles at this level
# (lax.map's int32 outputs came back zeroed in places): only for runs checked against runs with
# the same flag (a crash and its resume), never for a result a reference checks.
FAST_COMPILE = "--xla_backend_optimization_level=0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def xla_flags(*flags: str) -> str:
    """This process's XLA flags and ``flags``, for a subprocess's ``XLA_FLAGS``."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "official"
M_VAR_FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "m_var"
VAR_512 = pathlib.Path(__file__).parent / "fixtures" / "var_512"
# The M-VAR fixtures: attn_l2_norm True (l21) and False (l20).
M_VAR_VARIANTS = ("l21", "l20")
REPO = pathlib.Path(__file__).parent.parent
# The smallest VQVAE the tests build (16 codes of 4 channels, one ResNet block a level, no
# attention, 2x downsampling): for checkpoints, shapes and losses that need no parity.
# ``VQVAEConfig(**MINI_VQVAE, patch_nums=...)``; a plain dict, so a subprocess script can take it.
MINI_VQVAE = dict(
    vocab_size=16,
    z_channels=4,
    ch=32,
    ch_mult=(1, 1),
    num_res_blocks=1,
    using_sa=False,
    using_mid_sa=False,
)


def tiny_vqvae(**fields):
    """The parity fixtures' tokenizer architecture (vocab 64, Cvae 8, ch 32; README in
    tests/fixtures/official), at ``configs/tiny_cpu.py:fixture``'s pyramid unless ``fields`` say."""
    from mvar_jax.configs import tiny_cpu
    from mvar_jax.models.vqvae import VQVAEConfig

    fixture = tiny_cpu.get_config("fixture")
    return VQVAEConfig(
        **{"vocab_size": 64, "z_channels": 8, "ch": 32, "patch_nums": fixture.model.patch_nums, **fields}
    )


def tiny_transformer(**fields):
    """``configs/tiny_cpu.py:fixture``'s generator (the tests' and benches' toy model: depth 2,
    width 64, 4 heads, scales 1-4, refine step 3, kernel 3) over ``tiny_vqvae``, with
    ``fields`` changed: for what needs no parity."""
    import dataclasses

    from mvar_jax.configs import tiny_cpu
    from mvar_jax.training import generator

    base = generator.transformer_config(tiny_cpu.get_config("fixture"), tiny_vqvae())
    return dataclasses.replace(base, **fields)


def mini_transformer(**fields):
    """``tiny_transformer`` over ``MINI_VQVAE``'s tokens (16 codes of 4 channels)."""
    return tiny_transformer(vocab_size=MINI_VQVAE["vocab_size"], cvae=MINI_VQVAE["z_channels"], **fields)


def trace_generate(model, record, label_B, init_state=None) -> None:
    """Traces ``sampling.generate`` (greedy, cfg 1.5, no decode; nothing compiled) with ``record``
    intercepting every Flax method call (``nn.intercept_methods``)."""
    import flax.linen as nn

    from mvar_jax import sampling

    options = sampling.SamplingOptions(top_k=1, decode=False)

    def trace():
        jax.eval_shape(
            lambda vqvae_params, transformer_params: sampling.generate(
                model.vqvae_config,
                model.transformer_config,
                vqvae_params,
                transformer_params,
                label_B,
                jax.random.PRNGKey(0),
                sampling.guidance_schedule(options.cfg, model.transformer_config),
                options,
                init_state,
            ),
            model.vqvae_params,
            model.transformer_params,
        )

    trace()  # fills the caches (the stacked blocks' jitted initialiser) whatever ran before
    with nn.intercept_methods(record):
        trace()


@contextlib.contextmanager
def modules_replaced(modules: dict):
    """``sys.modules`` holds ``modules`` (name -> module) inside the block, what it held after:
    for a test-only package whose imports fight the pinned torch (a torchvision stand-in)."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


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


def load_arrays(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, read into memory."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def tiny_io() -> dict[str, np.ndarray]:
    return load_arrays(FIXTURES / "tiny_io.npz")


@pytest.fixture(scope="session")
def builtin_shapes_dir(tmp_path_factory) -> pathlib.Path:
    """A TFDS directory holding the built-in dataset at 64 px, built once per session."""
    from mvar_jax import data

    data_dir = tmp_path_factory.mktemp("builtin_tfds")
    cfg = data.default_config()
    cfg.update(data_dir=str(data_dir), num_workers=2, prefetch=0)
    data.build_train_source(cfg, global_batch_size=8, process_index=0, process_count=1, seed=0).close()
    return data_dir


def make_image_folder(root: pathlib.Path, num_classes: int, per_class: int) -> None:
    """``train/class<c>/<i>.png``: distinct random 72x80 images (resized and cropped to 64)."""
    rng = np.random.default_rng(0)
    for c in range(num_classes):
        class_dir = root / "train" / f"class{c}"
        class_dir.mkdir(parents=True)
        for i in range(per_class):
            PIL.Image.fromarray(rng.integers(0, 256, (72, 80, 3), np.uint8)).save(class_dir / f"{i}.png")


def set_fields(config, overrides: dict) -> None:
    """``config[a][b] = value`` for each ``'a.b': value`` of ``overrides`` (as --config.a.b does)."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target = config
        for p in parents:
            target = target[p]
        target[leaf] = value


def event_scalars(directory: pathlib.Path) -> dict[tuple[str, int], set[float]]:
    """``(tag, step) -> values`` of every TensorBoard event file in ``directory``; a torn
    last record ends its file, as for TensorBoard."""
    from tensorboardX.proto import event_pb2

    values: dict[tuple[str, int], set[float]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):  # length (8), its CRC (4), event, its CRC (4)
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            end = pos + 12 + length + 4
            if end > len(data):
                break
            event = event_pb2.Event.FromString(data[pos + 12 : end - 4])
            for value in event.summary.value:
                values.setdefault((value.tag, event.step), set()).add(value.simple_value)
            pos = end
    return values


def rel_err(out, ref) -> float:
    """``||out - ref|| / ||ref||``, the fixtures' parity metric."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def usage_error_of(*argv: str) -> str:
    """``python *argv`` from the repository root, as a user runs a command: it must exit with
    status 2 and an ``error:`` line, no traceback. Its stderr."""
    result = subprocess.run(
        [sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 2, result.stderr[-4000:]
    assert "error:" in result.stderr and "Traceback" not in result.stderr, result.stderr[-4000:]
    return result.stderr


def run_on_eight_devices(script: str | os.PathLike, cwd: pathlib.Path) -> dict:
    """Runs ``script`` on 8 simulated CPU devices; its last stdout line, parsed as JSON.

    The device count must be set before JAX starts, hence a fresh process.
    """
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600, cwd=cwd
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def convert_tiny(
    fixture_dir: pathlib.Path, flag: str, weights: str | pathlib.Path, out: pathlib.Path, *extra: str
) -> None:
    """Runs the convert CLI on a tiny fixture (4 heads, as the fixtures were made);
    ``weights`` is relative to ``fixture_dir`` or absolute."""
    from mvar_jax import convert

    convert.main(
        [
            "--vae",
            str(fixture_dir / "tiny_vae.pth"),
            flag,
            str(fixture_dir / weights),
            "--out",
            str(out),
            "--num_heads",
            "4",
            *extra,
        ]
    )


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, fixture_dir) -> dict[str, pathlib.Path]:
    """``{'mvar': dir, 'var': dir}`` converted by the CLI, shared by every test module."""
    root = tmp_path_factory.getbasetemp() / "tiny_checkpoints"
    dirs = {"mvar": root / "mvar", "var": root / "var"}
    for name, path in dirs.items():
        if not (path / "params").exists():  # Another module of this session may have made it.
            convert_tiny(fixture_dir, f"--{name}", f"tiny_{name}.pth", path)
    return dirs


@pytest.fixture(scope="session")
def m_var_checkpoints(tmp_path_factory, fixture_dir) -> dict[str, pathlib.Path]:
    """``{'l21': dir, 'l20': dir}``: the M-VAR fixtures converted by the CLI (``--m_var``)."""
    root = tmp_path_factory.getbasetemp() / "m_var_checkpoints"
    dirs = {variant: root / variant for variant in M_VAR_VARIANTS}
    for variant, path in dirs.items():
        if not (path / "params").exists():
            convert_tiny(fixture_dir, "--m_var", M_VAR_FIXTURES / f"tiny_mvar_m_{variant}.pth", path)
    return dirs


@pytest.fixture(scope="session")
def m_var_io() -> dict[str, dict[str, np.ndarray]]:
    """Each M-VAR variant's ``*_io.npz`` arrays (README in tests/fixtures/m_var)."""
    return {v: load_arrays(M_VAR_FIXTURES / f"tiny_mvar_m_{v}_io.npz") for v in M_VAR_VARIANTS}
