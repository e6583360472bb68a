"""``train.py`` as two real processes (``jax.distributed``, gloo collectives, 2 CPU devices each).

One 2-process run to ``STEPS`` is shared by the tests and checked against

* a 1-process run on 4 simulated devices. Host ``i`` of ``n`` reads examples
  ``i, i + n, ...`` of each epoch permutation (``data.order.ShuffledEpochs``), so
  global batch ``k`` of the 2-host run holds the same examples as that of the
  1-host run, with the same per-example augmentation, only in another order inside
  the batch. Class dropout draws its mask per batch position, so it is off here;
  the runs then differ by float32 summation order alone;
* itself interrupted: its work directory cut back to the step-``RESUME_FROM``
  checkpoint (what a job killed after that save leaves) and resumed by two
  processes must end bit-identical, which needs each host's data position back.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import make_image_folder, xla_flags

from mvar_jax import checkpoint

REPO = pathlib.Path(__file__).parent.parent
BATCH = 8  # global: 4 per host, 2 per device
STEPS = 4  # all on the first segment (ratio_k 8): one compiled train step
RESUME_FROM = 2
NUM_CLASSES, PER_CLASS = 10, 2
HOST_EPOCH = NUM_CLASSES * PER_CLASS // 2  # 10 examples per host: step 3 spans two epochs
TIMEOUT_S = 300
Jobs = dict[str, tuple[pathlib.Path, list[subprocess.Popen]]]  # name -> (workdir, processes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(data_dir: pathlib.Path, workdir: pathlib.Path) -> list[str]:
    """``train.py`` on the tiny config shrunk to ``STEPS`` steps of a depth-1 model."""
    overrides = {
        "vqvae_checkpoint": REPO / "tests/fixtures/official/tiny_vae.pth",
        "data.name": "folder",
        "data.data_dir": data_dir,
        "data.num_classes": NUM_CLASSES,
        "batch_size": BATCH,
        "num_train_steps": STEPS,
        "log_every": 1,
        "checkpoint_every": RESUME_FROM,
        "sample_every": 0,
        "model.depth": 1,
        "model.cond_drop_rate": 0.0,
    }
    return [
        sys.executable,
        str(REPO / "train.py"),
        f"--config={REPO / 'configs/tiny_cpu.py'}:fixture",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in overrides.items()),
    ]


def _log(workdir: pathlib.Path, process: int, stream: str) -> pathlib.Path:
    return workdir.with_name(f"{workdir.name}.{process}.{stream}")


def _start(
    data_dir: pathlib.Path, workdir: pathlib.Path, *, processes: int, devices_per_process: int
) -> list[subprocess.Popen]:
    """``processes`` train.py processes of one job, output to files beside ``workdir``."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
        "XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={devices_per_process}"),
    }
    args = _train_args(data_dir, workdir)
    if processes > 1:
        args += [
            "--config.parallel.distributed.enabled=True",
            f"--config.parallel.distributed.coordinator_address=127.0.0.1:{_free_port()}",
            f"--config.parallel.distributed.num_processes={processes}",
        ]
    procs = []
    for i in range(processes):
        rank = [f"--config.parallel.distributed.process_id={i}"] if processes > 1 else []
        with open(_log(workdir, i, "out"), "w") as out, open(_log(workdir, i, "err"), "w") as err:
            procs.append(subprocess.Popen(args + rank, env=env, cwd=workdir.parent, stdout=out, stderr=err))
    return procs


def _wait(jobs: Jobs) -> dict[str, list[str]]:
    """Each job's stdouts, one per process. When one process fails or time runs out,
    every process is killed (the others would wait for it in a collective) and the
    test fails with the stderr tails."""
    procs = [p for _, job in jobs.values() for p in job]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while (
            any(p.poll() is None for p in procs)
            and time.monotonic() < deadline
            and not any(p.poll() for p in procs)
        ):
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        tails = [
            f"--- {name} process {i}: exit {p.returncode}, stderr tail:\n"
            + _log(workdir, i, "err").read_text()[-2000:]
            for name, (workdir, job) in jobs.items()
            for i, p in enumerate(job)
        ]
        pytest.fail(f"training processes failed or ran past {TIMEOUT_S}s\n" + "\n".join(tails))
    return {
        name: [_log(workdir, i, "out").read_text() for i in range(len(job))]
        for name, (workdir, job) in jobs.items()
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[pathlib.Path, list[str]]]:
    """name -> (workdir, stdout per process) for 'two' (2 processes x 2 devices), 'one'
    (1 process x 4 devices) and 'resumed' ('two' resumed from step ``RESUME_FROM``)."""
    root = tmp_path_factory.mktemp("multiprocess")
    data_dir = root / "images"
    make_image_folder(data_dir, NUM_CLASSES, PER_CLASS)
    workdirs = {name: root / name for name in ("two", "one", "resumed")}
    # The 1-process run shares the cores while the two processes wait on each other.
    jobs = {
        "two": (workdirs["two"], _start(data_dir, workdirs["two"], processes=2, devices_per_process=2)),
        "one": (workdirs["one"], _start(data_dir, workdirs["one"], processes=1, devices_per_process=4)),
    }
    stdouts = _wait(jobs)

    resumed = workdirs["resumed"]
    shutil.copytree(workdirs["two"], resumed)
    shutil.rmtree(resumed / "model")
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    stdouts |= _wait({"resumed": (resumed, _start(data_dir, resumed, processes=2, devices_per_process=2))})
    return {name: (workdirs[name], stdouts[name]) for name in workdirs}


@functools.cache
def _params(workdir: pathlib.Path):
    return checkpoint.load_model(workdir / "model").transformer_params["params"]


# What train.py prints (steps, resuming, the export); gloo's connection notices,
# which its threads may interleave mid-line, contain none of these.
_TRAIN_MESSAGES = ("step ", "loss", "resuming", "exported")


def _prints_nothing_of_its_own(stdout: str) -> bool:
    return not any(message in stdout for message in _TRAIN_MESSAGES)


def _losses(stdout: str) -> list[float]:
    """The per-step losses printed (``log_every=1``): ``step 3: loss 4.1234, ...``."""
    return [
        float(line.split("loss ")[1].split(",")[0])
        for line in stdout.splitlines()
        if line.startswith("step ")
    ]


def _data_positions(workdir: pathlib.Path, step: int) -> dict[str, tuple[int, int]]:
    """Host -> (epoch, position) recorded in the checkpoint at ``step``."""
    with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "data")) as manager:
        hosts = manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    return {host: (s["epoch"], s["position"]) for host, s in hosts.items()}


def test_one_checkpoint_series_and_export_and_host0_alone_prints(runs):
    workdir, (out0, out1) = runs["two"]
    assert json.loads((workdir / "model" / "exported_step.json").read_text()) == {"step": STEPS}
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(RESUME_FROM), str(STEPS)]
    for step in (RESUME_FROM, STEPS):
        epoch_position = divmod(step * BATCH // 2, HOST_EPOCH)  # of the examples each host read
        assert _data_positions(workdir, step) == {"0": epoch_position, "1": epoch_position}
    assert len(list((workdir / "tensorboard").iterdir())) == 1  # one event file: host 0's
    assert len(_losses(out0)) == STEPS and f"exported the model at step {STEPS}" in out0
    assert _prints_nothing_of_its_own(out1), out1


def test_two_processes_match_one_process_on_four_devices(runs):
    two, one = _params(runs["two"][0]), _params(runs["one"][0])
    errs = jax.tree.map(lambda a, b: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)), two, one)
    assert max(jax.tree.leaves(errs)) < 1e-5, errs  # float32 rounding
    losses = _losses(runs["two"][1][0])
    assert np.all(np.isfinite(losses))
    np.testing.assert_allclose(losses, _losses(runs["one"][1][0]), atol=2e-4)


def test_interrupted_two_process_run_resumes_exactly(runs):
    (resumed, (out0, out1)), (straight, (straight0, _)) = runs["resumed"], runs["two"]
    assert f"resuming {resumed} from step {RESUME_FROM} of {STEPS}" in out0
    assert _prints_nothing_of_its_own(out1), out1
    assert _losses(out0) == _losses(straight0)[RESUME_FROM:]
    jax.tree.map(np.testing.assert_array_equal, _params(resumed), _params(straight))
