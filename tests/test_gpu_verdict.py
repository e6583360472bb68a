"""The GPU verdict (bench/gpu.sh, bench/gpu_verdict.py) in its CPU dry run, and its fold into the docs.

The dry run goes through the real driver: ``bash bench/gpu.sh --smoke``, each stage in its own
process under its time box. The fast tests run three stages (one of them boxed to time out);
the whole run is ``--runslow``'s.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from bench import bench_cost, bench_sampling, gpu_fold, gpu_verdict

REPO = pathlib.Path(__file__).resolve().parents[1]


def _gpu_sh(tmp_path: pathlib.Path, *args: str, **env: str) -> dict:
    """``bash bench/gpu.sh --smoke --out tmp_path/out ARGS`` with this interpreter, no wheels; its
    results.json."""
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--smoke", f"--out={out}", *args],
        env={**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no_wheels"), **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}/results.json" in result.stdout
    return json.loads((out / "results.json").read_text())


def _by_name(results: dict) -> dict[str, dict]:
    return {stage["name"]: stage for stage in results["stages"]}


def test_dry_run_boxes_each_stage(tmp_path):
    """A stage that outlives its box is killed and recorded as timed out; the next one runs."""
    results = _gpu_sh(tmp_path, "--stages=check,sample_var,kernel", "--time_boxes=sample_var=1")
    stages = _by_name(results)
    assert list(stages) == ["check", "sample_var", "kernel"]
    assert results["header"]["backend"] == "cpu" and results["header"]["smoke"]

    check = stages["check"]
    assert check["status"] == "ok", check["error"]
    assert [(r["dtype"], r["ok"]) for r in check["records"]] == [("bfloat16", True), ("float32", True)]
    assert check["records"][0]["tiling"]["block_q"] == 64  # the bfloat16 default at 8x8
    assert all(err < 1e-5 for err in check["records"][1]["errors"].values())  # float32, interpreted

    timed_out = stages["sample_var"]
    assert timed_out["status"] == "timed out" and timed_out["box_s"] == 1
    assert timed_out["seconds"] < 10 and timed_out["records"] == []

    kernel = stages["kernel"]
    assert kernel["status"] == "ok", kernel["error"]
    timed = {(r["method"], r["mode"]) for r in kernel["records"] if r["kind"] == "kernel" and r["median_ms"]}
    assert timed == {(m, p) for m in gpu_verdict.KERNEL_METHODS for p in ("fwd", "fwd+bwd")}

    out = tmp_path / "out"
    table = (out / "results.md").read_text()
    assert "| sample_var | VAR-d16 sampling, batch 64 | timed out |" in table
    assert "| 8x8 | 1 | fwd+bwd | masked | xla |" in table
    assert "===== kernel (box 60 s) =====" in (out / "log.txt").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "results.md"]


def test_a_failed_check_is_recorded_and_stops_the_run(tmp_path):
    """A stage's exception comes back as its error text; the kernel check's failure ends the run."""
    results = _gpu_sh(tmp_path, "--stages=check,kernel", JAX_PLATFORMS="no_such_backend")
    check, kernel = results["stages"]
    assert check["status"] == "failed" and check["error"].startswith("RuntimeError: ")
    assert "no_such_backend" in check["error"] and "Traceback" in check["traceback"]
    assert (kernel["status"], kernel["error"]) == ("skipped", "stopped: check failed")
    table = (tmp_path / "out" / "results.md").read_text()
    assert (
        "no device" in table
        and "| failed |" in table
        and "| skipped | 0 | - | stopped: check failed |" in table
    )


def test_results_are_written_after_every_stage_and_the_deadline_skips(tmp_path, monkeypatch):
    """What a kill at any stage would leave, and which stages the deadline lets start."""
    snapshots = {}

    def fake_run_stage(stage, box_s, smoke, log, work):
        snapshots[stage.name] = (box_s, json.loads((tmp_path / "results.json").read_text()))
        if stage.name == "check":
            time.sleep(2.2)  # leaves under 1 s of the 3 s deadline: less than half a 2 s box
        status = "failed" if stage.name == "kernel" else "ok"  # not the gate: the run goes on
        entry = dict(name=stage.name, what=stage.what, status=status, seconds=0.0, box_s=box_s, error=None)
        return dict(entry, traceback=None, records=[])

    monkeypatch.setattr(gpu_verdict, "run_stage", fake_run_stage)
    names = ["kernel", "check", "sample_var", "train_var"]
    results = gpu_verdict.verdict(tmp_path, names, dict.fromkeys(names, 2.0), deadline_s=3.0, smoke=True)

    assert [name for name in snapshots] == ["kernel", "check"]
    assert snapshots["kernel"][0] == 2.0
    assert [s["name"] for s in snapshots["kernel"][1]["stages"]] == []
    assert [(s["name"], s["status"]) for s in snapshots["check"][1]["stages"]] == [("kernel", "failed")]
    assert [s["status"] for s in results["stages"]] == ["failed", "ok", "skipped", "skipped"]
    assert "under half its 2 s box" in results["stages"][2]["error"]
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert "| train_var | VAR-d16 train step, batch 32 | skipped |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize(
    "flag, message",
    [("--stages=check,nope", "--stages must name stages"), ("--time_boxes=check=0", "--time_boxes takes")],
)
def test_bad_stage_flags_are_usage_errors(tmp_path, capsys, flag, message):
    with pytest.raises(SystemExit) as exit_info:
        gpu_verdict.main([f"--out={tmp_path}", flag])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("family", ["mvar", "var", "m_var"])
def test_the_predicted_peak_is_of_the_program_sampling_ran(family):
    """bench_cost lowers what bench_sampling called, to the static argument: a jit-cache hit on the
    GPU, where a compile of its own would take tens of seconds."""
    program = bench_cost.Program(family, gpu_verdict.DEPTH, gpu_verdict.SAMPLE_BATCH, "sample")
    assert bench_cost.configs(program) == bench_sampling.model_configs(family, smoke=False)


@pytest.mark.slow
def test_full_dry_run(tmp_path):
    results = _gpu_sh(tmp_path, "--deadline_s=1200")
    stages = _by_name(results)
    assert list(stages) == list(gpu_verdict.STAGES)
    assert all(s["status"] == "ok" for s in stages.values()), {n: s["error"] for n, s in stages.items()}
    predicted = gpu_fold.records(results, "predicted")
    compiled = {(r["family"], r["decode"]): r["compile_s"] for r in gpu_fold.records(results, "sampling")}
    assert len(predicted) == len(compiled) == 6
    for r in predicted:  # a jit-cache hit: the abstract shapes' tracing only
        assert r["seconds"] < compiled[r["family"], r["decode"]] / 3, r
    table = (tmp_path / "out" / "results.md").read_text()
    for row in (
        "| M-VAR-d2 | yes | 2 |",
        "| MVAR-d2 | cycle | pallas_interpret | 2 |",
        "| VAR-d2 | 1-4 | dense |",
    ):
        assert row in table


def _kernel(side: int, batch: int, method: str, mode: str, ms: float, impl: str = "xla") -> dict:
    case = dict(batch=batch, side=side, heads=16, head_dim=64, kernel_size=7, dtype="bfloat16")
    floor_ms = (4 if mode == "fwd" else 8) * batch * side * side * 16 * 64 * 2 / 3e12 * 1e3
    return dict(
        kind="kernel",
        case=case,
        method=method,
        mode=mode,
        impl=impl,
        median_ms=ms,
        gbps=None,
        x_floor=ms / floor_ms,
        note="",
    )


def _stage(name: str, records: list[dict], status: str = "ok") -> dict:
    what = gpu_verdict.STAGES[name].what
    entry = dict(name=name, what=what, status=status, seconds=50.0, box_s=100.0, error=None, traceback=None)
    return dict(entry, records=records)


def _sampling(family: str, decode: bool, images_per_s: float, peak: float, predicted: float) -> list[dict]:
    measured = dict(kind="sampling", family=family, batch=64, decode=decode, depth=16, smoke=False)
    measured.update(images_per_s=images_per_s, seconds_per_call=64 / images_per_s, peak_bytes_in_use=peak)
    predicted = dict(kind="predicted", family=family, decode=decode, peak_bytes=predicted, seconds=0.9)
    return [dict(measured, compile_s=40.0), predicted]


def _train(family: str, segment: str, ms: float, xla_gib: float, impl: str = "dense", steps: int = 1) -> dict:
    row = dict(kind="train", family=family, batch=32, model=f"{family.upper()}-d16", segment=segment)
    row.update(
        attention_impl=impl, tokens=None, steps_per_cycle=steps, ms_per_step=ms, images_per_s=32e3 / ms
    )
    return dict(row, xla_gib=xla_gib, compile_s=30.0)


def _train_peak(family: str, peak: float) -> dict:
    model = f"{family.upper()}-d16"
    return dict(kind="train_peak", family=family, model=model, peak_bytes_in_use=peak)


def synthetic_results() -> dict:
    """A GPU run as the driver writes it, with made-up d16 figures."""
    tiling = dict(block_q=64, block_k=64, partner_chunk=None, num_warps=4, num_stages=2)
    errors = dict(o=3e-3, dq=4e-3, dk=5e-3, dv=5e-3)
    checks = [
        dict(kind="check", side=side, dtype=dtype, tolerance=tol, ok=True, tiling=tiling, errors=errors)
        for dtype, tol in gpu_verdict.CHECK_TOLERANCE.items()
        for side in gpu_verdict.CHECK_MAPS
    ]
    kernel = [dict(kind="copy", gbps=3000.0)]
    for side, batch, times in (
        (16, 32, dict(pallas=(0.05, 0.16), masked=(0.2, 0.6), dense_xla=(0.25, 0.7), dense_sdpa=(0.1, 0.4))),
        (32, 32, dict(pallas=(0.2, 0.6), dense_xla=(1.5, 3.0))),
        (64, 8, dict(pallas=(0.3, 0.5), dense_xla=(0.6, 1.0))),
    ):
        for method, (fwd, both) in times.items():
            impl = {"pallas": "triton", "dense_sdpa": "cudnn"}.get(method, "xla")
            kernel += [_kernel(side, batch, method, "fwd", fwd, impl)]
            kernel += [_kernel(side, batch, method, "fwd+bwd", both, impl)]
    mvar_train = [
        _train("mvar", "1-10", 40.0, 8.0, steps=8),
        _train("mvar", "13", 30.0, 6.0, "pallas"),
        _train("mvar", "16", 45.0, 8.5, "pallas"),
        _train("mvar", "cycle", (8 * 40 + 30 + 45) / 10, 8.5, "pallas", steps=10),
    ]
    header = dict(smoke=False, deadline_s=480.0, commit="abc1234", stages=list(gpu_verdict.STAGES))
    header.update(device="NVIDIA H100 80GB HBM3", backend="gpu", devices=1, date="2026-12-08")
    header.update(
        jax="0.11.2", jaxlib="0.11.2", flax="0.12.8", optax="0.2.8", triton="3.6.0", python="3.12.3"
    )
    return dict(
        header=header,
        stages=[
            _stage("check", checks),
            _stage("kernel", kernel),
            _stage(
                "sample_mvar",
                _sampling("mvar", False, 400.0, 3e9, 2.5e9) + _sampling("mvar", True, 200.0, 6e9, 5e9),
            ),
            _stage(
                "sample_var",
                _sampling("var", False, 300.0, 12e9, 11e9) + _sampling("var", True, 150.0, 13e9, 12e9),
            ),
            _stage("train_mvar", [*mvar_train, _train_peak("mvar", 9.5e9)]),
            _stage("train_var", [_train("var", "1-16", 150.0, 20.0), _train_peak("var", 2.2e10)]),
            _stage("sample_m_var", [], status="timed out"),
        ],
        wall_s=470.0,
    )


def test_fold_writes_the_verdict_into_the_docs_section(tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    original = (REPO / "docs" / "benchmarks.md").read_text()
    doc.write_text(original)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(synthetic_results()))

    gpu_fold.main([f"--results={results}", f"--doc={doc}"])
    folded = doc.read_text()
    assert "2026-12-08" in capsys.readouterr().out
    before, after = original.split(gpu_fold.BEGIN)[0], original.split(gpu_fold.END)[1]
    assert folded.startswith(before + gpu_fold.BEGIN) and folded.endswith(gpu_fold.END + after)
    section = folded.split(gpu_fold.BEGIN)[1].split(gpu_fold.END)[0]
    assert "No GPU run yet." not in section
    assert "on NVIDIA H100 80GB HBM3 (gpu, 1 device); jax 0.11.2" in section
    assert "| sample_m_var | M-VAR-d16 sampling, batch 64 | timed out | 50 | 100 |  |" in section
    # The kernel beside NATTEN and beside the other paths of the same run (dense XLA 0.7 / 0.16 ms).
    assert "| 16x16 | 32 | fwd+bwd | pallas | triton | 0.160 |" in section
    assert "| 1.00 | NATTEN 0.29 |" in section
    assert "| 16x16 | 32 | fwd+bwd | dense_xla | xla | 0.700 | - | 15.6 | 4.38 |" in section
    # Our MVAR beside the official one (400 / 178) and our VAR (400 / 300).
    assert "| MVAR-d16 | no | 64 | 400.0 | 0.160 | 3.00 | 2.50 | 178 (4.2) | 2.25 | 1.33 |" in section
    assert "| MVAR-d16 | 16 | pallas | 32 | 0.0450 | 711 | 9.13 | 0.264 (10.1) | 5.87 | 30 |" in section
    assert "MVAR-d16 9.50 GB (its largest XLA peak 9.13 GB)" in section
    verdicts = {
        "kernel matches the reference (fwd+bwd, bf16 and fp32, 16/13/32) | 6 of 6 cases pass | met",
        "kernel fwd ms 16x16 B=32: <= 0.07 (NATTEN 0.10) | 0.050 | met",
        "kernel bwd ms (fwd+bwd - fwd) 16x16 B=32: <= 0.13 (NATTEN 0.19) | 0.110 | met",
        "kernel fwd+bwd vs dense masked XLA, 32x32 B=32: >= 3x | 5.00 | met",
        "kernel fwd+bwd vs dense masked XLA, 64x64 B=8: >= 3x | 2.00 | **missed**",
        "MVAR-d16 train cycle average s: <= 0.055 (official 0.109) | 0.040 | met",
        "MVAR-d16 train peak GB: no higher than official (10.1) | 9.50 | met",
        "MVAR-d16 img/s with decode: >= 2x official MVAR (186) | 200 | met",
        "MVAR-d16 img/s without decode: faster than our VAR-d16 (ratio > 1) | 1.33 | met",
        "MVAR-d16 peak without decode, batch 64: <= 1/4 of our VAR-d16's (ratio) | 0.25 | met",
    }
    for line in verdicts:
        assert f"| {line} |" in section, line

    gpu_fold.main([f"--results={results}", f"--doc={doc}"])
    assert doc.read_text() == folded  # a second fold replaces the section, nothing else


def test_fold_needs_the_marked_section(tmp_path, capsys):
    doc = tmp_path / "other.md"
    doc.write_text("# no section\n")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(synthetic_results()))
    with pytest.raises(SystemExit) as exit_info:
        gpu_fold.main([f"--results={results}", f"--doc={doc}"])
    assert exit_info.value.code == 2 and "no '<!-- gpu-verdict: begin" in capsys.readouterr().err


def test_official_figures_are_the_docs_baselines():
    """The fold's official figures are those of docs/benchmarks.md's "Baselines to beat" table."""
    doc = (REPO / "docs" / "benchmarks.md").read_text()
    table = doc.split("## Baselines to beat")[1].split("\n## ")[0]
    train = gpu_fold.OFFICIAL_TRAIN
    figures = [
        f"NATTEN Flex: fwd {gpu_fold.NATTEN_MS['fwd']:.2f} ms, bwd {gpu_fold.NATTEN_MS['bwd']:.2f} ms",
        f"cuDNN dense+mask fwd {gpu_fold.CUDNN_FWD_MS} ms",
        f"fwd <= {gpu_fold.KERNEL_TARGET_MS['fwd']} ms, bwd <= {gpu_fold.KERNEL_TARGET_MS['bwd']} ms",
        f"{train['MVAR', '1-10'][0]:.3f} s (scales 1-8), {train['MVAR', '13'][0]:.3f} s (13x13), "
        f"{train['MVAR', '16'][0]:.3f} s (16x16); peaks {train['MVAR', '1-10'][1]} / "
        f"{train['MVAR', '13'][1]} / {train['MVAR', '16'][1]} GB; {train[gpu_fold.CYCLE][0]} s cycle average",
        f"cycle average <= {gpu_fold.CYCLE_TARGET_S} s",
        f"{train['VAR', '1-16'][0]} s, {train['VAR', '1-16'][1]} GB",
    ]
    for (model, decode), (images_per_s, peak) in gpu_fold.OFFICIAL_SAMPLING.items():
        row = table.split("sampling with decode" if decode else "sampling without decode")[1].split("\n")[0]
        assert f"{model}-d16" in row and f"{images_per_s} @64 ({peak} GB)" in row.split(f"{model}-d16")[1]
    for figure in figures:
        assert figure in table, figure
