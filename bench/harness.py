"""What the benchmark scripts share: one case per process, results as JSON and markdown.

A case that measures compilation, a device's peak memory or a multi-GB compile
needs a process of its own: the JIT cache, the peak counter and the compiler's
memory are per process.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_case(module: str, flag: str, case: dict[str, Any]) -> dict[str, Any]:
    """``python -m module flag JSON`` from the repository root; the last stdout line as JSON."""
    result = subprocess.run([sys.executable, "-m", module, flag, json.dumps(case)],
                            cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{module} {flag} {case} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_results(out: pathlib.Path, rows: list[dict[str, Any]], markdown: str) -> None:
    """``results.json`` (the rows) and ``results.md`` (the table) in ``out``; the table printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results.md").write_text(markdown)
    print(markdown)
