"""Runs survive a SIGKILL at any moment and a second run on their work directory.

``train.py`` runs as a subprocess and is killed again and again, at a fixed list of
moments: points inside a train step, an asynchronous checkpoint save and the export
(``mvar_jax.faults``, the ``MVAR_JAX_KILL_AT`` test hook), and moments timed from its
output. After every kill nothing half-written may pass for whole (a model directory
that exists must load); then the same command runs again, until one run completes.
Its final train state and data position (the newest checkpoint), its model directory
and its TensorBoard scalars must equal an uninterrupted run's bit for bit.

The token-cache command is killed between a chunk's two files; the sampler is
killed half-way through writing each of its outputs (the kernel stops it at a file
size limit).

``RUNS`` lists the configs the chain trains, one line per task: any task's run goes
through the same trainer, checkpointer and export.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import FAST_COMPILE, event_scalars, make_image_folder, xla_flags

from mvar_jax import checkpoint
from mvar_jax.data import token_cache
from mvar_jax.training import trainer, workdir as workdir_lib
from mvar_jax.weights import vqvae as vqvae_weights

REPO = pathlib.Path(__file__).parent.parent
TINY_VAE = REPO / "tests/fixtures/official/tiny_vae.pth"
NUM_CLASSES, PER_CLASS = 4, 4  # 16 images
STEPS, SAVE_EVERY = 8, 2
TIMEOUT_S = 240


@dataclasses.dataclass(frozen=True)
class Run:
    """A config the chain trains: its file (``FILE.py`` or ``FILE.py:ARG``), its own overrides,
    and its model directory's reader."""

    config: str
    overrides: dict
    load: Callable[[pathlib.Path], object]


# One line per task. The overrides (beyond ``_overrides``') shrink its run to cheap steps.
GENERATOR = {"vqvae_checkpoint": str(TINY_VAE), "model.depth": 1, "ratio_k": 2, "sample_every": 0}
# A 16 px VQVAE (4x4 latents). The image folder has no val/ split, hence no evaluation;
# the restart re-seeds codes.
TOKENIZER = {
    "data.image_size": 16,
    "model.ch": 32,
    "model.ch_mult": (1, 1, 2),
    "model.patch_nums": (1, 2, 4),
    "model.vocab_size": 64,
    "model.z_channels": 8,
    "eval_every": 0,
    "codebook.window": 2,
    "codebook.dead_after": 2,
}
RUNS = [
    pytest.param(Run("configs/tiny_cpu.py:fixture", GENERATOR, checkpoint.load_model), id="generator"),
    pytest.param(Run("configs/vqvae_tiny_cpu.py", TOKENIZER, checkpoint.load_tokenizer), id="tokenizer"),
]

# The kills, in order, each followed by a restart: a hook point (``mvar_jax.faults``),
# or ``after <seconds>``: that long after the run prints its first step. A step's
# kill may land inside the asynchronous save of the step before it.
KILLS = (
    "train-step=3",
    "after 0.0",
    "checkpoint-save=4",  # the step-4 save in flight: the run resumes from step 2
    "after 0.1",
    "export-configs",  # a model directory's configs written, not its params
    "export-record",  # the model written, not its step record: the next start redoes it
    "export-swap",  # the redone export's new directory ready, the old one moved aside
)


def _env(kill_at: str | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "XLA_FLAGS": xla_flags(FAST_COMPILE),  # the runs are compared with each other
    }
    env.pop("MVAR_JAX_KILL_AT", None)
    if kill_at is not None:
        env["MVAR_JAX_KILL_AT"] = kill_at
    return env


def _overrides(run: Run, data_dir: pathlib.Path, **extra) -> dict:
    return {
        "data.name": "folder",
        "data.data_dir": str(data_dir),
        "data.num_classes": NUM_CLASSES,
        "batch_size": 4,
        "num_train_steps": STEPS,
        "log_every": 1,
        "checkpoint_every": SAVE_EVERY,
        "keep_checkpoints": 2,
        "async_checkpointing": True,
        **run.overrides,
        **extra,
    }


def _train_command(run: Run, data_dir: pathlib.Path, workdir: pathlib.Path, **extra) -> list[str]:
    return [
        sys.executable,
        str(REPO / "train.py"),
        f"--config={REPO / run.config}",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in _overrides(run, data_dir, **extra).items()),
    ]


def _config(run: Run, data_dir: pathlib.Path, **extra):
    """What ``_train_command`` runs, as a config for an in-process run."""
    path, *arg = run.config.split(":")
    config = importlib.import_module(path.removesuffix(".py").replace("/", ".")).get_config(*arg)
    for key, value in _overrides(run, data_dir, **extra).items():
        *parents, leaf = key.split(".")
        target = config
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def _start(command: list[str], env: dict[str, str], log: pathlib.Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(command, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT)


def _wait_for(proc: subprocess.Popen, log: pathlib.Path, pattern: str) -> None:
    """Until the output has a line matching ``pattern``; fails if the run ends first."""
    deadline = time.monotonic() + TIMEOUT_S
    while not re.search(pattern, log.read_text(), re.MULTILINE):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no line matching {pattern!r} (exit {proc.wait()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.01)


def _finish(proc: subprocess.Popen, log: pathlib.Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"ran past {TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


def _run(command: list[str], log: pathlib.Path, kill: str | None = None) -> int:
    """Runs ``command`` to its end, or to the kill; returns the exit status."""
    timed = kill is not None and kill.startswith("after ")
    proc = _start(command, _env(None if timed or kill is None else kill), log)
    if timed:
        _wait_for(proc, log, r"^step \d+:")
        time.sleep(float(kill.split()[1]))
        proc.send_signal(signal.SIGKILL)
    return _finish(proc, log)


def _checkpoint(workdir: pathlib.Path) -> tuple[int, object, dict]:
    """The newest checkpoint: its step, train state (as saved) and every host's data position."""
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(
        workdir / "checkpoints", options=options, item_names=("state", "data")
    ) as manager:
        step = manager.latest_step()
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())
        )
    return step, restored["state"], restored["data"]


def _assert_same(a, b) -> None:
    """Equal trees: arrays bit for bit, other leaves (configs) by ``==``."""
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, (jax.Array, np.ndarray)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            assert x == y


def _scalars(workdir: pathlib.Path) -> dict[tuple[str, int], set[float]]:
    """The logged scalars but timings."""
    return {k: v for k, v in event_scalars(workdir / "tensorboard").items() if k[0] != "images_per_sec"}


def _check_nothing_half_written(workdir: pathlib.Path, run: Run) -> None:
    """What a killed run left that a reader (or the next start) may take for whole, is whole."""
    for path in workdir.glob("*.json"):
        json.loads(path.read_text())
    model_dir = workdir / "model"
    if model_dir.exists():
        run.load(model_dir)
        record = model_dir / workdir_lib.EXPORTED_STEP
        if record.exists():
            assert json.loads(record.read_text()) == {"step": STEPS}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("kill_images")
    make_image_folder(root, NUM_CLASSES, PER_CLASS)
    return root


@pytest.mark.parametrize("run", RUNS)
def test_killed_anywhere_ends_like_an_uninterrupted_run(run, images, tmp_path):
    straight, chain = tmp_path / "straight", tmp_path / "chain"
    assert _run(_train_command(run, images, straight), tmp_path / "straight.log") == 0

    command = _train_command(run, images, chain)
    for i, kill in enumerate(KILLS):
        log = tmp_path / f"chain.{i}.log"
        rc = _run(command, log, kill)
        assert rc == -signal.SIGKILL, f"kill {kill!r}: exit {rc}\n{log.read_text()[-3000:]}"
        if kill == "checkpoint-save=4":  # landed inside the save: Orbax had not committed it
            assert list((chain / "checkpoints").glob("4.*tmp*"))
        _check_nothing_half_written(chain, run)
    log = tmp_path / "chain.final.log"
    assert _run(command, log) == 0, log.read_text()[-3000:]

    step, state, data = _checkpoint(chain)
    step_ref, state_ref, data_ref = _checkpoint(straight)
    assert step == step_ref == STEPS
    _assert_same(state, state_ref)  # params, optimizer state, step, RNG key
    assert data == data_ref  # the data position
    _assert_same(run.load(chain / "model"), run.load(straight / "model"))
    assert json.loads((chain / "model" / workdir_lib.EXPORTED_STEP).read_text()) == {"step": STEPS}
    # Every scalar the uninterrupted run logged is there, with its value; steps a
    # killed run logged after its last checkpoint were logged again, identically.
    reference = _scalars(straight)
    assert _scalars(chain) == reference and len(reference) > STEPS
    # Killed saves and exports leave nothing behind once a run has finished.
    leftovers = [
        p.name
        for p in [*(chain / "checkpoints").iterdir(), *chain.iterdir()]
        if "tmp" in p.name or "incomplete" in p.name or "replaced" in p.name
    ]
    assert not leftovers


def test_a_second_run_on_a_workdir_is_refused(images, tmp_path):
    """While one ``train.py`` trains (held still by SIGSTOP), another run on its workdir
    stops before writing; once the first is killed, the workdir is free again."""
    run = RUNS[0].values[0]
    workdir, log = tmp_path / "run", tmp_path / "first.log"
    first = _start(_train_command(run, images, workdir), _env(), log)
    try:
        _wait_for(first, log, r"^step 1:")
        first.send_signal(signal.SIGSTOP)
        with pytest.raises(workdir_lib.WorkdirInUse) as refused:
            trainer.train_and_evaluate(_config(run, images, num_train_steps=1), workdir)
        message = str(refused.value)
        assert str(workdir) in message and f"pid {first.pid}" in message
        assert socket.gethostname() in message
    finally:
        first.kill()
        first.wait()
    with workdir_lib.lock(workdir):  # the kernel released the killed holder's lock
        pass


def test_token_cache_killed_mid_chunk_resumes_to_the_same_files(images, tmp_path):
    vae = tmp_path / "tokenizer"  # a directory: reading it needs no torch
    vae_config, vae_params = vqvae_weights.load_official_vqvae(TINY_VAE, patch_nums=(1, 2, 3, 4))
    checkpoint.save_tokenizer(vae, vqvae_config=vae_config, vqvae_params=vae_params)

    def command(out: pathlib.Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mvar_jax.data.token_cache",
            f"--vae={vae}",
            "--patch_nums=1,2,3,4",
            "--data.name=folder",
            f"--data.data_dir={images}",
            "--data.image_size=64",
            f"--data.num_classes={NUM_CLASSES}",
            "--data.num_workers=2",
            f"--data.token_cache_dir={out}",
            "--role=train",
            "--batch_size=4",
            "--chunk_size=4",
        ]  # 4 chunks

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run(command(straight), tmp_path / "straight.log") == 0
    assert (
        _run(command(killed), tmp_path / "killed.log", "token-cache-chunk=1") == -signal.SIGKILL
    )  # chunk 1's labels written
    with pytest.raises(FileNotFoundError, match="incomplete"):
        token_cache.TokenCache(killed, "train")
    log = tmp_path / "resumed.log"
    assert _run(command(killed), log) == 0, log.read_text()[-3000:]

    def files(root: pathlib.Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in (root / "train").iterdir()}

    assert files(killed) == files(straight)
    assert len(token_cache.TokenCache(killed, "train")) == NUM_CLASSES * PER_CLASS


# sample.py with made-up images instead of a model (the writing is what is tested), and
# a file size limit: the kernel kills the process (SIGXFSZ, which Python ignores unless
# told) in the middle of the write that crosses it. A sample set's parts (16 images each,
# 0.2 MiB) fit under it; the set they make does not.
_SAMPLER = """
import resource, signal, sys, types
import numpy as np
import sample

def load(args):
    return types.SimpleNamespace(transformer_config=types.SimpleNamespace(num_classes=4, vocab_size=64))

def sub_batches(model, labels_N, seed, options, *, batch_size, skip, float_images):
    rng = np.random.default_rng(0)
    for j in range(0, len(labels_N) // 16):
        images = rng.random((16, 64, 64, 3), np.float32)
        labels, tokens = labels_N[16 * j : 16 * j + 16], np.zeros((16, 30), np.int32)
        yield sample.sample_set.SubBatch(j, labels, tokens, (images * 255).astype(np.uint8), images)

sample.load, sample.sample_set.sub_batches = load, sub_batches
sample.sample_set.spec = lambda *args: {"num_images": 64, "batch_size": 16}
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024,) * 2)
sys.exit(sample.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("output", ["--out=samples.npz", "--out=grid.png", "--fid_npz=fid.npz"])
def test_sampler_killed_while_writing_leaves_no_file_that_looks_complete(output, tmp_path):
    # 64 images: 3 MiB of float32 (npz), about 0.8 MiB as uint8 (png grid, fid npz).
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _SAMPLER,
            "--checkpoint=unused",
            "--labels=0,1,2,3",
            "--num_per_class=16",
            output,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr[-3000:]
    result = output.split("=")[1]
    assert not (tmp_path / result).exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != f"{result}.parts"]  # the set's, whole
    assert leftovers and all(name.startswith(f"{result}.incomplete") for name in leftovers)
