"""Sweeps the Pallas kernel's launch parameters per map size (a GPU tuning run).

    python -m bench.tune_spatial_markov --out $OUT/tune --maps 13,16   # GPU
    python -m bench.tune_spatial_markov --out /tmp/tune_smoke --smoke  # CPU smoke run

For each square map (B=32, 16 heads, head_dim 64, k 7, bfloat16 unless told
otherwise) every tiling of ``candidate_tilings`` is timed forward and
forward+backward (the pass training runs), the way ``bench_spatial_markov``
times: back-to-back rounds over rotating inputs. The candidates are the short
list CI compiles for sm_80 and sm_90 at these maps (no spills, registers and
shared memory within the limits), so the tuner never picks a tiling that was
not checked; ``default_tiling`` is the first, so the table shows what changing
it would gain. The fastest fwd+bwd tiling is checked against the pure-jnp
reference. Candidates stop after ``--budget_s`` seconds per map (each costs
three Triton compilations); the table lists what was timed. Writes
``results.md`` and ``results.json``; the best tilings are what
``default_tiling`` should return.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
from absl import flags

from bench import common
from bench.bench_spatial_markov import (
    FLOOR_TENSORS,
    Case,
    check_kernel,
    copy_bandwidth,
    define_case_flags,
    input_sets,
    passes,
    time_call,
)
from bench.common import GiB
from mvar_jax import cli
from mvar_jax.kernels.spatial_markov import (
    CANDIDATE_MAPS,
    Tiling,
    candidate_tilings,
    spatial_markov_attention,
)


def tune_map(
    case: Case,
    tilings: list[Tiling],
    interpret: bool,
    copy_bps: float,
    *,
    warmup: int,
    reps: int,
    budget_s: float,
) -> list[dict]:
    """One row per timed tiling, fastest fwd+bwd first."""
    arg_sets = input_sets(case, 4)
    rows, started = [], time.perf_counter()
    for tiling in tilings:
        if rows and time.perf_counter() - started > budget_s:
            break
        fn = functools.partial(
            spatial_markov_attention, kernel_size=case.kernel_size, interpret=interpret, tiling=tiling
        )
        try:
            ms = {
                mode: 1e3 * time_call(pass_fn, arg_sets, warmup, reps) for mode, pass_fn in passes(fn).items()
            }
        except Exception as e:  # noqa: BLE001 - a tiling Triton refuses is a result too
            print(f"  {tiling}: refused: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
            continue
        floor_ms = 1e3 * FLOOR_TENSORS["fwd+bwd"] * case.tensor_bytes / copy_bps
        rows.append(
            dict(
                tiling=dataclasses.asdict(tiling),
                default=not rows,
                fwd_ms=ms["fwd"],
                fwd_bwd_ms=ms["fwd+bwd"],
                x_floor=ms["fwd+bwd"] / floor_ms,
            )
        )
        print(f"  {tiling}: fwd {ms['fwd']:.4f} ms, fwd+bwd {ms['fwd+bwd']:.4f} ms", flush=True)
    return sorted(rows, key=lambda r: r["fwd_bwd_ms"])


def markdown(tables: dict[int, dict], header: dict) -> str:
    lines = [
        f"Tiling sweep on {header['device']} (jax {header['jax']}), B={header['batch']}, "
        f"heads {header['heads']}, head_dim {header['head_dim']}, k {header['kernel_size']}, "
        f"{header['dtype']}; copy bandwidth {header['copy_gbps']:.0f} GB/s. "
        "x floor: fwd+bwd time over its compulsory bytes / copy bandwidth.",
        "",
    ]
    for side, table in tables.items():
        rows = table["rows"]
        lines += [
            f"### {side}x{side}",
            "",
            "| block | partner_chunk | warps | stages | fwd ms | fwd+bwd ms | x floor | |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in rows:
            t = r["tiling"]
            lines.append(
                f"| {t['block_q']} | {t['partner_chunk'] or 'row'} | {t['num_warps']} | "
                f"{t['num_stages']} | {r['fwd_ms']:.4f} | {r['fwd_bwd_ms']:.4f} | "
                f"{r['x_floor']:.1f} | {'default' if r['default'] else ''} |"
            )
        default = next((r for r in rows if r["default"]), None)
        if rows and default:
            best, base = rows[0]["fwd_bwd_ms"], default["fwd_bwd_ms"]
            lines += [
                "",
                f"Best fwd+bwd {best:.4f} ms vs default {base:.4f} ms "
                f"(x{base / best:.2f}); best vs reference, relative errors: "
                f"{table['check']}",
            ]
        lines.append("")
    return "\n".join(lines)


PROG = "python -m bench.tune_spatial_markov"
FLAGS = flags.FlagValues()
common.define_flags(FLAGS, smoke="toy shapes, two candidates (CPU)")
cli.define_int_list(
    "maps",
    ",".join(map(str, CANDIDATE_MAPS)),
    "square maps whose candidates CI compiles",
    FLAGS,
    what="map sides",
    example="13,16",
)
flags.DEFINE_integer("batch", 32, "batch size", flag_values=FLAGS)
define_case_flags(FLAGS, warmup=2)
flags.DEFINE_float("budget_s", 240.0, "seconds of candidates per map", flag_values=FLAGS)


def main(argv=None):
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    if set(args.maps) - set(CANDIDATE_MAPS):
        cli.usage_error(PROG, f"--maps {args.maps}: candidates are compiled for {CANDIDATE_MAPS} only")
    if args.smoke:
        args.maps, args.batch, args.heads, args.head_dim = [8], 1, 2, 16
        args.kernel_size, args.warmup, args.reps = 3, 1, 2

    interpret = jax.default_backend() == "cpu"
    copy_bps = copy_bandwidth((GiB // 64) if args.smoke else 2 * GiB, args.warmup, args.reps)
    header = common.header(
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        kernel_size=args.kernel_size,
        dtype="bfloat16",
        copy_gbps=copy_bps / 1e9,
    )
    tables = {}
    for side in args.maps:
        case = Case(args.batch, side, args.heads, args.head_dim, args.kernel_size)
        tilings = candidate_tilings(side, side)[: 2 if args.smoke else None]
        print(f"{side}x{side}: {len(tilings)} candidates", flush=True)
        rows = tune_map(
            case, tilings, interpret, copy_bps, warmup=args.warmup, reps=args.reps, budget_s=args.budget_s
        )
        check = check_kernel(case, interpret, Tiling(**rows[0]["tiling"])) if rows else {}
        tables[side] = dict(rows=rows, check={k: round(v, 5) for k, v in check.items()})

    common.write_results(args.out, dict(header=header, tables=tables), markdown(tables, header))


if __name__ == "__main__":
    main()
