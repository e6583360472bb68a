"""What the benchmark scripts share: their common flags, the run's header, the results files,
one case per process, the smoke runs' toy model.

Every bench writes ``results.md`` (the table for docs/benchmarks.md) and ``results.json`` into
``--out``; ``--smoke`` shrinks the run to a CPU check of the script, on the test suite's toy
model (``toy_configs``). A case that measures compilation, a device's peak memory or a
multi-GB compile needs a process of its own: the JIT cache, the peak counter and the
compiler's memory are per process (``run_case``, which runs the bench again with ``--case``).
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import flags

from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.vqvae import VQVAEConfig

GiB = 2**30
REPO = pathlib.Path(__file__).resolve().parents[1]


def define_flags(flag_values: flags.FlagValues, smoke: str | None, *, case: bool = False) -> None:
    """``--out DIR`` (required) and ``--smoke`` (``smoke``: what the smoke run is; None: the
    bench has none). With ``case``, also ``--case JSON``: ``run_case``'s child process, which
    measures that one case, prints its result as JSON and needs no ``--out``."""
    flags.DEFINE_string(
        "out", None, "directory for results.md and results.json", required=not case, flag_values=flag_values
    )
    if smoke is not None:
        flags.DEFINE_bool("smoke", False, smoke, flag_values=flag_values)
    if case:
        flags.DEFINE_string(
            "case",
            None,
            "internal: one case as JSON, measured in this process (run_case)",
            flag_values=flag_values,
        )
        flags.register_multi_flags_validator(
            ["out", "case"],
            lambda values: values["out"] is not None or values["case"] is not None,
            message="--out is required",
            flag_values=flag_values,
        )


def header(**fields: Any) -> dict[str, Any]:
    """Where and with what a run measured, plus ``fields``: device, backend, versions, date."""
    return {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        **fields,
    }


def write_results(out: str | pathlib.Path, results: Any, markdown: str) -> None:
    """``results.json`` (``results``) and ``results.md`` (``markdown``) in ``out``; the table
    is printed too."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out}/results.md and results.json")


def run_case(module: str, case: dict[str, Any]) -> dict[str, Any]:
    """``python -m module --case=JSON`` from the repository root (``define_flags(case=True)``);
    the last stdout line as JSON."""
    result = subprocess.run(
        [sys.executable, "-m", module, f"--case={json.dumps(case)}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{module} --case {case} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def toy_configs(family: str, dtype: str = "bfloat16") -> tuple[VQVAEConfig, TransformerConfig]:
    """The smoke runs' model: ``configs/tiny_cpu.py:fixture`` (the test suite's toy generator)
    of ``family`` at ``dtype``, over the parity fixtures' tokenizer architecture
    (tests/fixtures/official/README.md: vocab 64, Cvae 8, ch 32, the released layout
    otherwise; the weights are the bench's)."""
    from mvar_jax.configs import tiny_cpu  # ml_collections: only the smoke runs need it
    from mvar_jax.training import generator

    toy = tiny_cpu.get_config("fixture")
    toy.model.family = family
    toy.model.dtype = dtype
    vqvae_config = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, patch_nums=tuple(toy.model.patch_nums))
    return vqvae_config, generator.transformer_config(toy, vqvae_config)


def timed(call: Callable[[], Any], warmup: int, reps: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of ``reps`` calls after ``warmup`` more)."""
    times = []
    for _ in range(1 + warmup + reps):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times[0], statistics.median(times[1 + warmup :])
