"""Registers, spills, shared memory and occupancy of the Pallas kernel, compiled on a CPU.

    python -m bench.bench_kernel_resources --out bench_out/kernel_resources
    python -m bench.bench_kernel_resources --out /tmp/kr_smoke --smoke --processes 1  # toy

No GPU is needed: ``kernels.cubin`` exports the spatial-Markov kernel (forward,
dq, dkv) for CUDA and compiles each Triton module with PyPI Triton for sm_80
(A100) and sm_90 (H100); ptxas reports registers and spills, Triton the shared
memory of a block. The occupancy estimate is the CUDA occupancy calculator's:
resident blocks per SM as bounded by registers (allocated per warp in units
of 256), shared memory (plus 1 KB reserved per block), 64 warps and 32 blocks.

The cases are CI's (``kernels.cubin.checked_cases``): the maps of
``CANDIDATE_MAPS``, 16 heads, head_dim 64, k 7. Two tables: every kernel of
``default_tiling`` per map (bfloat16 as the models train, float32 too), and
each of ``candidate_tilings`` (the tuner's choices, bfloat16) summarised per
target. Writes ``results.md`` (for docs/benchmarks.md) and
``results.json``.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from absl import flags

from bench import common
from mvar_jax import cli
from mvar_jax.kernels import cubin
from mvar_jax.kernels.spatial_markov import default_tiling

CAPABILITIES = (80, 90)
KERNELS = ("fwd", "dq", "dkv")


def cases(smoke: bool) -> list[cubin.KernelCase]:
    if not smoke:
        return cubin.checked_cases()
    return [
        cubin.KernelCase(8, default_tiling(8, 8, dtype), dtype, heads=2, head_dim=16, kernel_size=3)
        for dtype in ("bfloat16", "float32")
    ]


def _kernel(name: str) -> str:
    return name.removeprefix("spatial_markov_")


def row(compiled: cubin.Compiled) -> dict:
    r, case = compiled.resources, compiled.case
    occupancy = cubin.occupancy(r)
    return dict(
        side=case.side,
        dtype=case.dtype,
        tiling=dataclasses.asdict(case.tiling),
        default=case.tiling == default_tiling(case.side, case.side, case.dtype),
        kernel=_kernel(compiled.kernel),
        **dataclasses.asdict(r),
        blocks_per_sm=occupancy.blocks,
        warps_per_sm=occupancy.warps,
        limited_by=occupancy.limited_by,
        problems=cubin.within_limits(r),
    )


def _tiling_cell(t: dict, side: int) -> str:
    """block/chunk/warps/stages; chunk 'row' is the row width, 'cols' a column-tiled walk."""
    column_tiled = t["block_q"] < side and side % t["block_q"] == 0
    chunk = "cols" if column_tiled else t["partner_chunk"] or "row"
    return f"{t['block_q']}/{chunk}/{t['num_warps']}w/{t['num_stages']}s"


def _target_cells(r: dict) -> str:
    spills = r["spill_stores"] + r["spill_loads"]
    return (
        f"{r['registers']} | {spills} | {r['shared'] / 1024:.1f} | "
        f"{r['blocks_per_sm']} x {r['num_warps']} = {r['warps_per_sm']} ({r['limited_by']})"
    )


def markdown(rows: list[dict], header: dict) -> str:
    lines = [
        f"Device: {header['device']}; jax {header['jax']}, ptxas {header['ptxas']}, "
        f"Python {header['python']}; "
        f"heads {header['heads']}, head_dim {header['head_dim']}, k {header['kernel_size']}; "
        f"{header['date']}. Tiling: block/partner chunk/warps/stages. Registers per thread, "
        "spilled bytes (stores + loads), shared KB per block; occupancy: resident blocks x "
        "warps = warps per SM of 64 (the bound that sets it).",
        "",
        "Default tilings:",
        "",
        "| map | dtype | kernel | tiling | sm_80 regs | spills | smem KB | warps/SM "
        "| sm_90 regs | spills | smem KB | warps/SM |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    by_kernel = defaultdict(dict)
    for r in rows:
        by_kernel[(r["side"], r["dtype"], _tiling_cell(r["tiling"], r["side"]), r["kernel"])][
            r["capability"]
        ] = r
    for (side, dtype, tiling, kernel), targets in by_kernel.items():
        if targets[CAPABILITIES[0]]["default"]:
            lines.append(
                f"| {side}x{side} | {dtype} | {kernel} | {tiling} | "
                + " | ".join(_target_cells(targets[c]) for c in CAPABILITIES)
                + " |"
            )

    lines += [
        "",
        "Every candidate tiling (bfloat16); fwd/dq/dkv registers, the largest "
        "shared KB of the three, the fewest warps per SM:",
        "",
        "| map | tiling | sm_80 regs | smem KB | warps/SM | sm_90 regs | smem KB | warps/SM | problems |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    by_tiling = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["dtype"] == "bfloat16":
            by_tiling[(r["side"], _tiling_cell(r["tiling"], r["side"]), r["default"])][r["capability"]][
                r["kernel"]
            ] = r
    for (side, tiling, default), targets in sorted(
        by_tiling.items(), key=lambda item: (item[0][0], not item[0][2])
    ):
        cells, problems = [], []
        for c in CAPABILITIES:
            kernels = [targets[c][k] for k in KERNELS]
            cells.append(
                "/".join(str(r["registers"]) for r in kernels) + " | "
                f"{max(r['shared'] for r in kernels) / 1024:.1f} | "
                f"{min(r['warps_per_sm'] for r in kernels)}"
            )
            problems += [f"sm_{c} {r['kernel']}: {p}" for r in kernels for p in r["problems"]]
        lines.append(
            f"| {side}x{side} | {tiling}{' (default)' if default else ''} | "
            + " | ".join(cells)
            + f" | {'; '.join(problems) or 'none'} |"
        )
    return "\n".join(lines) + "\n"


PROG = "python -m bench.bench_kernel_resources"
FLAGS = flags.FlagValues()
common.define_flags(FLAGS, smoke="an 8x8 toy map, default tiling only: checks the script runs")
flags.DEFINE_integer("processes", 2, "compiling in parallel", lower_bound=1, flag_values=FLAGS)


def main(argv=None):
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    found = cases(args.smoke)
    rows = [row(c) for c in cubin.spatial_markov_resources(found, CAPABILITIES, args.processes)]
    first = found[0]
    header = common.header(
        device=f"none (compiled on CPU with triton {cubin.TRITON_VERSION})",
        triton=cubin.TRITON_VERSION,
        ptxas=cubin.PTXAS_VERSION,
        heads=first.heads,
        head_dim=first.head_dim,
        kernel_size=first.kernel_size,
    )
    common.write_results(args.out, dict(header=header, rows=rows), markdown(rows, header))


if __name__ == "__main__":
    main()
