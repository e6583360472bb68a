"""The GPU benchmark scripts in their CPU smoke modes, so a lent GPU's minutes go to measuring.

Each script is run (or, for the subprocess-per-case sampling bench, its
per-case function) on toy shapes, and its tables are checked for the rows
docs/benchmarks.md is filled from.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench import (
    bench_cost,
    bench_kernel_resources,
    bench_kv_compression,
    bench_m_var_cost,
    bench_sampling,
    bench_sampling_vs_official,
    bench_spatial_markov,
    bench_train_step,
    bench_train_vs_official,
    common,
    official,
    tune_spatial_markov,
)


def test_kernel_bench_and_tuner(tmp_path):
    bench_spatial_markov.main(["--out", str(tmp_path / "kernel"), "--smoke"])
    results = json.loads((tmp_path / "kernel" / "results.json").read_text())
    timed = {(r["method"], r["mode"]) for r in results["results"] if r["median_ms"]}
    for method in ("pallas", "reference", "masked", "dense_xla", "dense_sdpa"):
        assert {(method, "fwd"), (method, "fwd+bwd")} <= timed
    checks = results["header"]["checks"]["8"]
    assert all(err < 2e-2 for err in checks.values())  # bf16 kernel vs f32 reference

    tune_spatial_markov.main(["--out", str(tmp_path / "tune"), "--smoke"])
    table = json.loads((tmp_path / "tune" / "results.json").read_text())["tables"]["8"]
    assert len(table["rows"]) == 2 and sum(r["default"] for r in table["rows"]) == 1
    assert table["rows"][0]["fwd_bwd_ms"] <= table["rows"][1]["fwd_bwd_ms"]
    assert "| default |" in (tmp_path / "tune" / "results.md").read_text()


def test_kernel_resources_bench(tmp_path):
    bench_kernel_resources.main(["--out", str(tmp_path), "--smoke", "--processes", "1"])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert sorted((r["dtype"], r["kernel"], r["capability"]) for r in rows) == sorted(
        (dtype, kernel, capability)
        for dtype in ("bfloat16", "float32")
        for kernel in ("fwd", "dq", "dkv")
        for capability in (80, 90)
    )
    assert all(r["registers"] > 0 and r["warps_per_sm"] >= r["num_warps"] for r in rows)
    table = (tmp_path / "results.md").read_text()
    assert "| 8x8 | float32 | dkv | 32/row/4w/2s |" in table
    assert "| 8x8 | 64/row/4w/2s (default) |" in table


def test_train_step_bench(tmp_path):
    bench_train_step.main(["--out", str(tmp_path), "--smoke"])
    results = json.loads((tmp_path / "results.json").read_text())
    segments = {(r["model"], r["segment"], r["attention_impl"]) for r in results["rows"]}
    # Scales 1-3 together, the 4x4 scale (spatial-Markov) once per attention impl.
    assert ("MVAR-d2", "1-3", "dense") in segments
    assert ("MVAR-d2", "4", "reference") in segments
    assert ("MVAR-d2", "4", "pallas_interpret") in segments
    assert any(model == "MVAR-d2" and segment == "cycle" for model, segment, _ in segments)
    assert any(model == "VAR-d2" for model, _, _ in segments)
    assert all(r["ms_per_step"] > 0 for r in results["rows"])
    assert "reference / pallas_interpret" in (tmp_path / "results.md").read_text()


def test_train_vs_official_bench_runs_our_side(tmp_path):
    """The side-by-side bench without an official checkout (as in CI): our steps alone."""
    bench_train_vs_official.main(["--out", str(tmp_path), "--smoke"])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["family"], r["name"]) for r in rows] == [("var", "1-4"), ("mvar", "1-2")]
    assert all(r["ours"]["step_s"] > 0 and "official" not in r for r in rows)
    assert "| VAR-d1 | 1-4 |" in (tmp_path / "results.md").read_text()


def test_sampling_vs_official_bench_runs_our_side(tmp_path):
    """The sampling side-by-side without an official checkout (as in CI): ours alone, every row."""
    bench_sampling_vs_official.main(["--out", str(tmp_path), "--smoke", "--families", "var"])
    (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert "official" not in row and all(row["ours"][key] > 0 for key, _ in bench_sampling_vs_official.ROWS)
    table = (tmp_path / "results.md").read_text()
    assert "| VAR-d2 sampling, no decode, per call | - |" in table and "VQVAE decode of 2 images" in table


def test_official_natten_stand_in_is_the_neighbourhood_reference():
    """The stand-in the official MVAR runs with on a CPU computes NATTEN's na2d (windows shifted
    inward at the borders), as the kernels' reference does."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    from mvar_jax.kernels.neighborhood import neighborhood_attention_reference

    natten: dict = {}
    exec(official._NATTEN, natten)
    q, k, v = np.random.default_rng(0).standard_normal((3, 2, 9, 11, 2, 4)).astype(np.float32)
    got = natten["na2d"](*(torch.from_numpy(x) for x in (q, k, v)), kernel_size=5, scale=0.3).numpy()
    want = neighborhood_attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 5, scale=0.3)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-6)


def _case(bench, case, capsys) -> dict:
    """``bench.main(['--case=JSON'])``, as ``common.run_case``'s child runs it: its JSON row."""
    capsys.readouterr()
    bench.main([f"--case={json.dumps(dataclasses.asdict(case))}"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_sampling_bench_case(capsys):
    case = bench_sampling.Case("mvar", batch=2, decode=False, dtype="bfloat16", reps=1, smoke=True)
    row = _case(bench_sampling, case, capsys)
    assert row["images_per_s"] > 0 and row["depth"] == 2
    assert row["first_call_s"] > 0 and row["seconds_per_call"] > 0 and row["cpu_seconds_per_call"] > 0
    assert "| MVAR-d2 | 2 | bfloat16 | no |" in bench_sampling.markdown([row])


def test_cost_bench_programs():
    """Compiled, never run: XLA's counts beside the analytic one, and the memory analysis."""
    programs = [
        bench_cost.Program("mvar", 2, 2, "sample+decode", smoke=True),
        bench_cost.Program("var", 2, 2, "train", segment=(0, 4), smoke=True),
    ]
    rows = [bench_cost.measure(program) for program in programs]
    accumulated = dataclasses.replace(programs[1], grad_accum=2)  # the step: test_training_recipe
    assert accumulated.name(bench_cost.configs(accumulated)[1]) == "train 1-4 in 2 micro-batches"
    for row in rows:
        assert row["xla_flops"] > 0 and row["temp_bytes"] > 0 and row["peak_bytes"] > 0
        # The toy's elementwise work (softmax, norms, filters) weighs more than at scale.
        assert 0.8 < row["ratio"] < 1.6, row["ratio"]
    assert {"linear", "attention", "adaln", "head", "vqvae", "decoder"} <= set(rows[0]["analytic"])
    assert rows[1]["analytic"]["head"] == 3 * 2 * 30 * 2 * 64 * 64  # fwd+bwd, B 2, 30 tokens
    table = bench_cost.markdown(rows)
    assert "| MVAR-d2 | 2 | sample+decode |" in table and "| VAR-d2 | 2 | train 1-4 |" in table


def test_m_var_cost_bench(tmp_path):
    bench_m_var_cost.main(["--out", str(tmp_path), "--smoke"])
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["model"] == "M-VAR-d1" and r["batch"] == 2
    # Carrying the state saves the re-run, less the state's own cost (the toy's scales of
    # at most 4 tokens are one scan chunk in either sampler: no chunking saving).
    assert r["carried_flops"] < r["official_rerun_flops"]
    saved = r["official_rerun_flops"] - r["carried_flops"]
    assert r["chunking_flops"] == 0
    assert 0 < r["state_flops"] < saved < r["rerun_flops"] < saved + 2 * r["state_flops"]
    assert len(set(r["carried_mamba_flops_per_chunk"].values())) == 1
    table = (tmp_path / "results.md").read_text()
    assert "| ours (Mamba state carried from scale to scale, chunks of 16) |" in table


def test_bench_needs_out_unless_it_runs_one_case(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_cost.main([])
    assert exit_info.value.code == 2
    assert "--out is required" in capsys.readouterr().err


def test_smoke_model_is_the_tiny_cpu_fixture_config():
    from mvar_jax.configs import tiny_cpu

    vqvae_config, config = common.toy_configs("var", "float32")
    toy = tiny_cpu.get_config("fixture").model
    assert (config.family, config.dtype, config.depth, config.embed_dim) == ("var", "float32", 2, 64)
    assert (config.patch_nums, config.refine_step, config.kernel_size) == (
        tuple(toy.patch_nums),
        toy.refine_step,
        toy.kernel_size,
    )
    assert (config.vocab_size, config.cvae) == (vqvae_config.vocab_size, vqvae_config.z_channels) == (64, 8)
    assert vqvae_config.image_size == 64  # the built-in shapes' size, as in tiny_cpu


def test_kv_compression_bench(tmp_path):
    bench_kv_compression.main(["--out", str(tmp_path), "--smoke", "--ratios", "0.7", "--time_reps", "1"])
    rows = json.loads((tmp_path / "results.json").read_text())["memory"]
    assert [(r["method"], r["ratio"]) for r in rows] == [("full cache", 0.0), ("hack", 0.7)]
    full, hack = rows
    assert hack["kv_bytes"] < full["kv_bytes"] and hack["temp_bytes"] <= full["temp_bytes"]
    assert all(r["s_per_call"] > 0 for r in rows)
    assert "| VAR-d2 | hack | 0.7 | 64 | bfloat16 |" in (tmp_path / "results.md").read_text()
