"""CPU sampling speed and first-call (compile) time, as the official PyTorch MVAR was timed.

    python -m bench.bench_cpu_sampling --out bench_out/cpu_sampling          # d16, B=2, float32
    python -m bench.bench_cpu_sampling --out /tmp/cpu_sampling_smoke --smoke  # toy model

Random full-size weights (``bench_sampling.random_model``, stacked by
``sampling.prepare`` as ``sample.py`` does), B images, cfg 1.5,
top-k 900, top-p 0.96, tokens and f_hat only (no VQVAE decode), ``--dtype``
transformer compute. Each model runs in a fresh process, so that its first call
includes tracing and compilation:

* ``first call s``: wall seconds of the first ``sampling.sample`` call;
* ``s/call``: median wall seconds of ``--reps`` further calls, each ended by
  ``block_until_ready``; ``CPU s/call`` the process CPU seconds (all threads) of
  the same calls, which a machine shared with other work inflates less than wall.

The official code's figures (26.8 s per call, 34.1 s first call, on a 2-core
machine; issue 16) are quoted in docs/benchmarks.md. Writes ``results.md`` and
``results.json`` to ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Any

import jax
from absl import flags

from bench import common
from bench.bench_sampling import OPTIONS, random_model
from mvar_jax import cli, sampling


@dataclasses.dataclass(frozen=True)
class Case:
    attention: str  # 'mvar' or 'var'
    batch: int
    dtype: str
    reps: int
    smoke: bool


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def measure(case: Case) -> dict[str, Any]:
    """Times one case in this process: the first call, then ``case.reps`` calls."""
    model = sampling.prepare(random_model(case.attention, case.smoke, case.dtype))
    labels = [i % model.transformer_config.num_classes for i in range(case.batch)]
    wall, cpu = [], []
    for i in range(1 + case.reps):
        wall0, cpu0 = _clocks()
        jax.block_until_ready(sampling.sample(model, labels, jax.random.PRNGKey(i), decode=False, **OPTIONS))
        wall1, cpu1 = _clocks()
        wall.append(wall1 - wall0)
        cpu.append(cpu1 - cpu0)
    return dict(
        dataclasses.asdict(case),
        depth=model.transformer_config.depth,
        first_call_s=wall[0],
        first_call_cpu_s=cpu[0],
        seconds_per_call=statistics.median(wall[1:]),
        cpu_seconds_per_call=statistics.median(cpu[1:]),
        calls_s=wall[1:],
        jax=jax.__version__,
        device=jax.devices()[0].device_kind,
        **OPTIONS,
    )


def run_isolated(case: Case) -> dict[str, Any]:
    """``measure`` in a fresh process, so that the first call pays for compilation."""
    return common.run_case("bench.bench_cpu_sampling", dataclasses.asdict(case))


def markdown(rows: list[dict[str, Any]]) -> str:
    r0 = rows[0]
    lines = [
        f"Sampling on {r0['device']} (jax {r0['jax']}), cfg {OPTIONS['cfg']}, top-k "
        f"{OPTIONS['top_k']}, top-p {OPTIONS['top_p']}, no decode"
        f"{' (smoke: toy model)' if r0['smoke'] else ''}.",
        "",
        "| model | batch | dtype | first call s (CPU s) | s/call | CPU s/call | calls s |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        calls = ", ".join(f"{s:.1f}" for s in r["calls_s"])
        lines.append(
            f"| {r['attention'].upper()}-d{r['depth']} | {r['batch']} | {r['dtype']} | "
            f"{r['first_call_s']:.1f} ({r['first_call_cpu_s']:.1f}) | "
            f"{r['seconds_per_call']:.2f} | {r['cpu_seconds_per_call']:.2f} | {calls} |"
        )
    return "\n".join(lines) + "\n"


PROG = "python -m bench.bench_cpu_sampling"
FLAGS = flags.FlagValues()
common.define_flags(FLAGS, smoke="toy model, one call after the first", case=True)
flags.DEFINE_list("models", ["mvar"], "comma-separated: mvar, var", flag_values=FLAGS)
flags.DEFINE_integer("batch", 2, "images per call", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "transformer compute", flag_values=FLAGS)
flags.DEFINE_integer("reps", 3, "calls after the first (--smoke: 1)", lower_bound=1, flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    if args.case:
        print(json.dumps(measure(Case(**json.loads(args.case)))))
        return
    rows = []
    for attention in args.models:
        rows.append(
            run_isolated(Case(attention, args.batch, args.dtype, 1 if args.smoke else args.reps, args.smoke))
        )
        print(
            f"{attention}: first call {rows[-1]['first_call_s']:.1f} s, "
            f"{rows[-1]['seconds_per_call']:.2f} s/call",
            flush=True,
        )
    common.write_results(args.out, rows, markdown(rows))


if __name__ == "__main__":
    main()
