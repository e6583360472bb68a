"""The GPU verdict in one device call: is the kernel right on a GPU, and how fast and
how lean are the kernel, the samplers and the train steps there, all within one short loan.

    bash bench/gpu.sh                                      # on the GPU machine; results in $OUT
    python -m bench.gpu_verdict --out DIR --smoke          # CPU dry run: toy sizes, interpreted kernel
    python -m bench.gpu_verdict --out DIR --stages=train_mvar,train_var --deadline_s=240   # a rerun

A loan is about 15 minutes in all (the machine's start included), so the run is ordered by what
matters most and bounded twice. Each stage (``STAGES``, in priority order) runs in a process of
its own, which is killed with its process group when it outlives its time box: a hang, a crash
or an out-of-memory costs that stage alone, and the device's peak memory counter, which cannot
be reset, is that stage's own. The whole run has a deadline (``--deadline_s``): a stage starts
only while half its box is left, and gets no more than what is left. A failed kernel check
stops the run: timings of a wrong kernel are no verdict, and the loan's remaining minutes are
better spent on a fix and a rerun.

Stages append their measurements to a JSON-lines file as they go. After every stage the driver
writes ``results.json`` (everything; ``python -m bench.gpu_fold`` turns it into
docs/benchmarks.md's tables) and ``results.md`` (those tables) into ``--out``, and the stages'
output goes to ``log.txt`` there, so a run killed at any point still returns what it measured.

The measurements are the bench modules' own (``bench_spatial_markov``, ``bench_sampling``,
``bench_train_step``, ``bench_cost``). XLA's predicted peaks (``memory_analysis``) are read off
the programs the sampling and train stages ran, beside their measured ``peak_bytes_in_use``:
the sampler's lowering hits the jit cache of the call just timed, and the train step's comes
with its compilation, so the issue's fifth item costs no compile of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

from absl import flags

from bench import common, gpu_fold

# The library names this driver uses itself; everything else comes through the bench modules,
# which are imported in the stage processes only (modules are moving: keep this list short).
from mvar_jax import cli


def _default_tiling(side: int, dtype: str) -> Any:
    """The kernel's tiling for a square map; imported here, in the check stage's process, so that
    a Pallas/Triton import error is that stage's recorded error, not the driver's crash."""
    from mvar_jax.kernels.spatial_markov import default_tiling

    return default_tiling(side, side, dtype)


Emit = Callable[[dict[str, Any]], None]

# Kernel check: relative error bounds of the kernel vs the gather reference (both computed in
# float32 logits; the reference under matmul precision 'highest', so not TF32). bfloat16
# operands land near 1e-2; float32 far under 1e-3 (TF32 dots would show as ~3e-4); a wrong
# window or gradient is off by order 1.
CHECK_TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-3}
CHECK_MAPS = (16, 13, 32)
# Kernel timing: (map side, batch), the baselines' case first. 64x64's dense attention needs
# ~100 GiB at batch 32, so it runs at batch 8, where the masked paths fit.
KERNEL_CASES = ((16, 32), (32, 32), (64, 8), (13, 32))
KERNEL_METHODS = ("pallas", "masked", "dense_xla", "dense_sdpa")
DEPTH = 16  # the benches' full-size models: d16
SAMPLE_BATCH = 64
SAMPLE_REPS = 3  # timed calls after the first (which compiles)
TRAIN_BATCH = 32
TRAIN_WARMUP, TRAIN_REPS = 2, 10


def check(smoke: bool, emit: Emit) -> None:
    """The kernel's output and gradients vs the reference at its default tilings, every dtype and
    map; raises at the first that misses."""
    import jax

    from bench import bench_spatial_markov

    heads, head_dim, kernel_size, maps = (2, 16, 3, (8,)) if smoke else (16, 64, 7, CHECK_MAPS)
    interpret = jax.default_backend() == "cpu"
    for dtype, tolerance in CHECK_TOLERANCE.items():
        for side in maps:
            case = bench_spatial_markov.Case(2, side, heads, head_dim, kernel_size, dtype)
            record = dict(kind="check", side=side, dtype=dtype, tolerance=tolerance)
            started = time.perf_counter()
            try:
                tiling = _default_tiling(side, dtype)
                record["tiling"] = dataclasses.asdict(tiling)
                with jax.default_matmul_precision("highest"):
                    record["errors"] = bench_spatial_markov.check_kernel(case, interpret, tiling)
            except Exception as e:
                emit(dict(record, ok=False, error=f"{type(e).__name__}: {e}"[:4000]))
                raise
            record["ok"] = all(error <= tolerance for error in record["errors"].values())  # NaN fails
            emit(dict(record, seconds=time.perf_counter() - started))
            if not record["ok"]:
                raise AssertionError(f"{side}x{side} {dtype}: errors {record['errors']} above {tolerance}")


def kernel(smoke: bool, emit: Emit) -> None:
    """Kernel vs the model's masked XLA path vs dense attention (XLA; cuDNN where it takes the
    mask), forward and forward+backward, bfloat16, one record per method and pass."""
    import jax

    from bench import bench_spatial_markov

    if smoke:
        cases, (heads, head_dim, kernel_size), warmup, reps, copy_gib = ((8, 1),), (2, 16, 3), 1, 2, 1 / 64
    else:
        cases, (heads, head_dim, kernel_size), warmup, reps, copy_gib = KERNEL_CASES, (16, 64, 7), 3, 50, 2.0
    copy_bps = bench_spatial_markov.copy_bandwidth(int(copy_gib * common.GiB), warmup, reps)
    emit(dict(kind="copy", gbps=copy_bps / 1e9))
    interpret = jax.default_backend() == "cpu"
    for side, batch in cases:
        case = bench_spatial_markov.Case(batch, side, heads, head_dim, kernel_size)
        for result in bench_spatial_markov.run_case(case, interpret, copy_bps, warmup, reps, KERNEL_METHODS):
            emit(dict(kind="kernel", **dataclasses.asdict(result)))


def _predicted_peak(compiled: Any) -> int:
    """XLA's peak for a compiled program: arguments + outputs + temporaries - aliased."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def sample(family: str, smoke: bool, emit: Emit) -> None:
    """Sampling images/s and peak memory without and with the decode, then XLA's predicted peak
    of each program (a jit-cache hit: ``seconds``, the abstract shapes' tracing, far under a
    compile says so)."""
    from bench import bench_sampling

    batch, reps = (2, 1) if smoke else (SAMPLE_BATCH, SAMPLE_REPS)
    # Without the decode first: the peak counter only grows, and the decode's peak is the larger.
    for decode in (False, True):
        case = bench_sampling.Case(family, batch, decode, "bfloat16", reps, smoke)
        emit(dict(kind="sampling", **bench_sampling.measure(case)))
    from bench import bench_cost  # after the measurements: its train programs need ml_collections

    for decode in (False, True):
        kind = "sample+decode" if decode else "sample"
        program = bench_cost.Program(family, DEPTH, batch, kind, smoke=smoke)
        started = time.perf_counter()
        peak = _predicted_peak(bench_cost.sampler_lowered(program, loop_free=False).compile())
        seconds = time.perf_counter() - started
        emit(dict(kind="predicted", family=family, decode=decode, peak_bytes=peak, seconds=seconds))


def train(family: str, smoke: bool, emit: Emit) -> None:
    """Train-step time and XLA's peak per segment (the Pallas kernel where MVAR's windows are),
    the schedule's cycle average, and the process's measured peak."""
    import jax

    from bench import bench_train_step

    impl = "pallas_interpret" if smoke else "pallas"
    batch, warmup, reps = (2, 1, 2) if smoke else (TRAIN_BATCH, TRAIN_WARMUP, TRAIN_REPS)
    config = bench_train_step.model_config(family, smoke)
    rows = bench_train_step.bench_model(
        config, bench_train_step.recipe(), impls=(impl,), batch=batch, warmup=warmup, reps=reps
    )
    if len(rows) > 1:
        rows.append(bench_train_step.cycle_row(rows, impl))
    for row in rows:
        emit(dict(kind="train", family=family, batch=batch, **row))
    peak = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    emit(dict(kind="train_peak", family=family, model=rows[0]["model"], peak_bytes_in_use=peak))


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    box_s: float  # on the GPU: wall seconds its process may run
    smoke_box_s: float  # the CPU dry run's
    run: Callable[[bool, Emit], None]
    what: str
    gate: bool = False  # its failure stops the run


# In priority order, with their time boxes in seconds on the GPU and in the CPU dry run. A GPU
# box allows for jax's start and CUDA set-up (~10 s a process) and for compilation, which
# dominates the model stages: tens of seconds per d16 program (two samplers per sampling stage,
# three MVAR segments). The boxes add up to more than the default deadline on purpose: the last
# stages get what the first leave (M-VAR only if time is left).
# fmt: off
STAGES = {stage.name: stage for stage in (
    Stage("check",         75,  60, check, "kernel vs reference: fwd+bwd, bf16 and fp32, 16/13/32", True),
    Stage("kernel",       100,  60, kernel, "kernel vs masked XLA vs dense attention, bf16"),
    Stage("sample_mvar",  110, 120, functools.partial(sample, "mvar"), "MVAR-d16 sampling, batch 64"),
    Stage("sample_var",   110, 120, functools.partial(sample, "var"), "VAR-d16 sampling, batch 64"),
    Stage("train_mvar",   130, 120, functools.partial(train, "mvar"), "MVAR-d16 train steps, batch 32"),
    Stage("train_var",     80, 120, functools.partial(train, "var"), "VAR-d16 train step, batch 32"),
    Stage("sample_m_var", 110, 120, functools.partial(sample, "m_var"), "M-VAR-d16 sampling, batch 64"),
)}
# fmt: on
DEADLINE_S = 480.0
SMOKE_DEADLINE_S = 300.0
# Modules the GPU machine's image lacks and the stages must not need: every stage process
# marks them absent (as ``import`` and ``importlib.util.find_spec`` see it), so the CPU dry
# run fails where the GPU run would.
ABSENT_ON_GPU = ("tensorflow", "tensorflow_datasets", "tensorboardX")
PACKAGES = ("jaxlib", "flax", "optax", "orbax-checkpoint", "triton", "ml-collections")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def stage_process(name: str, records: str, smoke: bool) -> None:
    """A stage's process (``--case``): its records appended to ``records`` as JSON lines, first
    the device and versions; an exception is recorded, then raised (a non-zero exit)."""
    sys.modules.update(dict.fromkeys(ABSENT_ON_GPU))
    path = pathlib.Path(records)

    def emit(record: dict[str, Any]) -> None:
        with path.open("a") as f:
            f.write(json.dumps(record, default=lambda x: x.item() if hasattr(x, "item") else str(x)) + "\n")

    try:
        import jax

        emit(
            dict(
                kind="header",
                devices=jax.device_count(),
                **common.header(**{p: _version(p) for p in PACKAGES}),
            )
        )
        STAGES[name].run(smoke, emit)
    except Exception as e:
        emit(
            dict(
                kind="error",
                message=f"{type(e).__name__}: {e}"[:2000],
                traceback=traceback.format_exc()[-6000:],
            )
        )
        raise


def run_stage(
    stage: Stage, box_s: float, smoke: bool, log: pathlib.Path, work: pathlib.Path
) -> dict[str, Any]:
    """Runs ``stage`` in a process of its own for at most ``box_s`` seconds; its entry in
    results.json, with what it recorded before it ended, however it ended."""
    path = work / f"{stage.name}.jsonl"
    case = json.dumps(dict(name=stage.name, records=str(path), smoke=smoke))
    started = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n===== {stage.name} (box {box_s:.0f} s) =====\n")
        out.flush()
        offset = out.tell()
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.gpu_verdict", f"--case={case}"],
            cwd=common.REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            # A process group of its own, killed whole; in the driver's session, so that whatever
            # ends the driver's session (the device call's own timeout) ends the stage too.
            process_group=0,
        )
        try:
            status = "ok" if process.wait(timeout=box_s) == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = "timed out"
    seconds = time.monotonic() - started
    # A line cut short by the kill has no newline yet: everything before the last one is whole.
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    records = [json.loads(line) for line in lines]
    error = next((r for r in records if r["kind"] == "error"), {})
    entry = dict(
        name=stage.name,
        what=stage.what,
        status=status,
        seconds=seconds,
        box_s=box_s,
        error=error.get("message"),
        traceback=error.get("traceback"),
        header=next((r for r in records if r["kind"] == "header"), None),
        records=[r for r in records if r["kind"] not in ("error", "header")],
    )
    if status == "failed" and not error:  # killed from outside (out of memory) or crashed in C
        with log.open() as out:
            out.seek(offset)
            entry.update(error=f"exit status {process.returncode}", traceback=out.read()[-3000:])
    return entry


def _skipped(stage: Stage, reason: str) -> dict[str, Any]:
    entry = dict(name=stage.name, what=stage.what, status="skipped", seconds=0.0, box_s=None, error=reason)
    return dict(entry, traceback=None, records=[])


def _commit() -> str | None:
    """The checkout's commit, where the tree came with its git directory (and git is there)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=common.REPO, capture_output=True, text=True
        )
    except OSError:
        return None
    return result.stdout.strip() or None


def write(out: pathlib.Path, results: dict[str, Any]) -> None:
    """results.json and results.md, each replaced whole (a kill mid-write leaves the last one)."""
    for name, text in (
        ("results.json", json.dumps(results, indent=1)),
        ("results.md", gpu_fold.render(results)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def verdict(
    out: pathlib.Path, names: list[str], boxes: dict[str, float], deadline_s: float, smoke: bool
) -> dict[str, Any]:
    """Runs the stages ``names`` in order under the deadline; the results, also written to ``out``
    after every stage."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    log.write_text("")
    results: dict[str, Any] = dict(
        header=dict(smoke=smoke, deadline_s=deadline_s, commit=_commit(), stages=names),
        stages=[],
        wall_s=0.0,
    )
    write(out, results)
    start = time.monotonic()
    stop = None
    with tempfile.TemporaryDirectory(prefix="gpu_verdict_") as work:
        for name in names:
            stage, box = STAGES[name], boxes[name]
            left = deadline_s - (time.monotonic() - start)
            if stop:
                entry = _skipped(stage, stop)
            elif left < box / 2:
                entry = _skipped(stage, f"{left:.0f} s of the deadline left, under half its {box:.0f} s box")
            else:
                entry = run_stage(stage, min(box, left), smoke, log, pathlib.Path(work))
            header = entry.pop("header", None)
            if header and "device" not in results["header"]:
                results["header"].update({k: v for k, v in header.items() if k != "kind"})
            if stage.gate and entry["status"] == "failed":
                stop = f"stopped: {name} failed"
            results["stages"].append(entry)
            results["wall_s"] = time.monotonic() - start
            write(out, results)
            print(
                f"gpu_verdict: {name}: {entry['status']} in {entry['seconds']:.0f} s, "
                f"{len(entry['records'])} records",
                flush=True,
            )
    return results


PROG = "bash bench/gpu.sh (python -m bench.gpu_verdict)"
FLAGS = flags.FlagValues()
common.define_flags(FLAGS, smoke="toy sizes, interpreted kernel, CPU boxes and deadline (CI)", case=True)
flags.DEFINE_float(
    "deadline_s",
    None,
    f"the whole run's wall-clock limit (default {DEADLINE_S:.0f}; --smoke: {SMOKE_DEADLINE_S:.0f})",
    lower_bound=0,
    flag_values=FLAGS,
)
flags.DEFINE_list(
    "stages", list(STAGES), f"stages to run, in this order, from {','.join(STAGES)}", flag_values=FLAGS
)
flags.DEFINE_list(
    "time_boxes",
    [],
    "stage=seconds pairs that replace a stage's time box (e.g. train_mvar=200)",
    flag_values=FLAGS,
)


def _boxes(pairs: list[str], smoke: bool) -> dict[str, float]:
    boxes = {name: stage.smoke_box_s if smoke else stage.box_s for name, stage in STAGES.items()}
    for pair in pairs:
        name, _, seconds = pair.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if name not in STAGES or value <= 0:
            raise ValueError(
                f"--time_boxes takes stage=seconds pairs with stages from {','.join(STAGES)}, got {pair!r}"
            )
        boxes[name] = value
    return boxes


def main(argv: list[str] | None = None) -> None:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    if args.case:
        stage_process(**json.loads(args.case))
        return
    unknown = [name for name in args.stages if name not in STAGES]
    if unknown or not args.stages:
        cli.usage_error(
            PROG, f"--stages must name stages from {','.join(STAGES)}, got {','.join(args.stages)!r}"
        )
    try:
        boxes = _boxes(args.time_boxes, args.smoke)
    except ValueError as e:
        cli.usage_error(PROG, str(e))
    deadline_s = (
        args.deadline_s if args.deadline_s is not None else SMOKE_DEADLINE_S if args.smoke else DEADLINE_S
    )
    out = pathlib.Path(args.out)
    results = verdict(out, args.stages, boxes, deadline_s, args.smoke)
    print(gpu_fold.render(results))
    print(f"gpu_verdict: wrote {out}/results.json, results.md and log.txt in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
