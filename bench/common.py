"""What the benchmark scripts share: their two common flags, the run's header, the results files,
one case per process.

Every bench writes ``results.md`` (the table for docs/benchmarks.md) and ``results.json`` into
``--out``; ``--smoke`` shrinks the run to a CPU check of the script. A case that measures
compilation, a device's peak memory or a multi-GB compile needs a process of its own: the
JIT cache, the peak counter and the compiler's memory are per process (``run_case``).
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import subprocess
import sys
from typing import Any

import jax
from absl import flags

GiB = 2**30
REPO = pathlib.Path(__file__).resolve().parents[1]


def define_flags(flag_values: flags.FlagValues, smoke: str) -> None:
    """``--out DIR`` (required) and ``--smoke`` (``smoke``: what the smoke run is)."""
    flags.DEFINE_string(
        "out", None, "directory for results.md and results.json", required=True, flag_values=flag_values
    )
    flags.DEFINE_bool("smoke", False, smoke, flag_values=flag_values)


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


def run_case(module: str, flag: str, case: dict[str, Any]) -> dict[str, Any]:
    """``python -m module flag JSON`` from the repository root; the last stdout line as JSON."""
    result = subprocess.run(
        [sys.executable, "-m", module, flag, json.dumps(case)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{module} {flag} {case} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
