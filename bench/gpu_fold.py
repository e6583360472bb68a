"""Folds a GPU verdict (``bench/gpu_verdict.py``'s results.json) into docs/benchmarks.md.

    python -m bench.gpu_fold --results /work/.device/.../results.json   # what a device call returned
    python -m bench.gpu_fold --results results.json --doc other.md

The section between ``BEGIN`` and ``END`` in the doc is replaced by ``render(results)``, so a GPU
run's output lands in one step (the driver writes the same tables to its results.md): the run's
device, versions and date; each stage's status; the targets, met or missed; then every measured
row beside the official PyTorch figure it answers (docs/benchmarks.md, "Baselines to beat") and
beside a baseline measured in the same run (the kernel vs the other attention paths, our MVAR
vs our VAR). Memory is in GB (1e9 bytes), as the official figures are labelled (the stricter
reading, should they mean GiB).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from absl import flags

from mvar_jax import cli
from mvar_jax.models import families

BEGIN = "<!-- gpu-verdict: begin; written by `python -m bench.gpu_fold`, edits here are replaced -->"
END = "<!-- gpu-verdict: end -->"
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"

# The official PyTorch code on the issue authors' H100, as in docs/benchmarks.md's "Baselines to
# beat" table (tests/test_gpu_verdict.py checks that each figure is there).
NATTEN_MS = {"fwd": 0.10, "bwd": 0.19}  # NATTEN Flex, B=32, 16 heads, d 64, 16x16, k 7, bf16
CUDNN_FWD_MS = 0.102  # cuDNN dense attention + mask, the same case
KERNEL_TARGET_MS = {"fwd": 0.07, "bwd": 0.13}
KERNEL_CASE = (16, 32)  # (map side, batch) of those figures
OFFICIAL_TRAIN = {  # (model, segment): (seconds per step, peak GB), batch 32, bf16
    ("MVAR", "1-10"): (0.072, 10.1),  # "scales 1-8": the first eight scales, up to 10x10
    ("MVAR", "13"): (0.250, 7.4),
    ("MVAR", "16"): (0.264, 10.1),
    ("MVAR", "cycle"): (0.109, None),
    ("VAR", "1-16"): (0.172, 23.0),
}
CYCLE = ("MVAR", "cycle")
CYCLE_TARGET_S = 0.055
OFFICIAL_SAMPLING = {  # (model, decode): (images/s, peak GB) at batch 64
    ("VAR", True): (118, 12.9),
    ("VAR", False): (209, 12.3),
    ("MVAR", True): (93, 12.5),
    ("MVAR", False): (178, 4.2),
}
SAMPLE_SET = 50_000  # the papers' FID set: 50 images of each ImageNet class
GB = 1e9


def _title(family: str) -> str:
    return families.get(family).title


def records(results: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """Every stage's records of one kind, in run order."""
    return [r for stage in results["stages"] for r in stage["records"] if r["kind"] == kind]


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _gb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GB:.2f}"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def _table(head: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A markdown table; ``align`` has an 'l' or 'r' per column."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(cells) + " |" for cells in (head, rule, *rows)]


def summary(results: dict[str, Any]) -> list[str]:
    h = results["header"]
    versions = ", ".join(
        f"{name} {h[key]}"
        for name, key in (
            ("jax", "jax"),
            ("jaxlib", "jaxlib"),
            ("flax", "flax"),
            ("optax", "optax"),
            ("triton", "triton"),
            ("Python", "python"),
        )
        if h.get(key)
    )
    where = f"{h['device']} ({h['backend']}, {h.get('devices', 1)} device)" if "device" in h else "no device"
    smoke = " **Smoke run: toy sizes on the CPU, not a measurement.**" if h["smoke"] else ""
    return [
        f"Run of {h.get('date', '?')} on {where}; {versions or 'versions unknown'}; commit "
        f"{h.get('commit') or 'unknown'}; stages {','.join(h['stages'])} under a {h['deadline_s']:.0f} s "
        f"deadline, {results['wall_s']:.0f} s in all.{smoke}",
        "",
        *_table(
            ["stage", "what", "status", "s", "box s", "note"],
            [
                [
                    s["name"],
                    s["what"],
                    s["status"],
                    f"{s['seconds']:.0f}",
                    _num(s["box_s"], ".0f"),
                    s["error"].splitlines()[0][:160] if s["error"] else "",
                ]
                for s in results["stages"]
            ],
            "lllrrl",
        ),
    ]


def _kernel_rows(results: dict[str, Any]) -> dict[tuple[int, int, str, str], dict[str, Any]]:
    """(side, batch, method, mode) -> the kernel stage's record."""
    return {
        (r["case"]["side"], r["case"]["batch"], r["method"], r["mode"]): r for r in records(results, "kernel")
    }


def _ms(rows: dict, side: int, batch: int, method: str, mode: str) -> float | None:
    row = rows.get((side, batch, method, mode))
    return row["median_ms"] if row else None


def _sampling(results: dict[str, Any]) -> dict[tuple[str, bool], dict[str, Any]]:
    """(model name, decode) -> the sampling record with its XLA prediction."""
    predicted = {(r["family"], r["decode"]): r for r in records(results, "predicted")}
    out = {}
    for r in records(results, "sampling"):
        p = predicted.get((r["family"], r["decode"]), {})
        out[_title(r["family"]), r["decode"]] = dict(r, predicted_bytes=p.get("peak_bytes"))
    return out


def _train(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(model name, segment) -> the train record (the Pallas kernel's where there are windows)."""
    return {(_title(r["family"]), r["segment"]): r for r in records(results, "train")}


def targets(results: dict[str, Any]) -> list[str]:
    """The issues' targets, each met, missed or not measured."""
    checks = records(results, "check")
    check_stage = next((s for s in results["stages"] if s["name"] == "check"), None)
    rows: list[list[str]] = []

    def add(what: str, measured: float | None, compare: str, target: float, spec: str) -> None:
        """A row: met when ``measured compare target`` (``compare``: '<=', '>=' or '>')."""
        if measured is None:
            rows.append([what, "not measured", ""])
            return
        met = {"<=": measured <= target, ">=": measured >= target, ">": measured > target}[compare]
        rows.append([what, format(measured, spec), "met" if met else "**missed**"])

    if check_stage and check_stage["status"] in ("ok", "failed"):
        failed = [c for c in checks if not c["ok"]]
        where = ", ".join(f"{c['dtype']} {c['side']}x{c['side']}" for c in failed)
        rows.append(
            [
                "kernel matches the reference (fwd+bwd, bf16 and fp32, 16/13/32)",
                f"{len(checks) - len(failed)} of {len(checks)} cases pass",
                "**missed**: " + (where or "see the check stage")
                if check_stage["status"] == "failed"
                else "met",
            ]
        )
    else:
        rows.append(["kernel matches the reference", "not measured", ""])
    k = _kernel_rows(results)
    side, batch = KERNEL_CASE
    fwd, both = _ms(k, side, batch, "pallas", "fwd"), _ms(k, side, batch, "pallas", "fwd+bwd")
    case = f"{side}x{side} B={batch}"
    add(
        f"kernel fwd ms {case}: <= {KERNEL_TARGET_MS['fwd']} (NATTEN {NATTEN_MS['fwd']:.2f})",
        fwd,
        "<=",
        KERNEL_TARGET_MS["fwd"],
        ".3f",
    )
    bwd = None if fwd is None or both is None else both - fwd
    add(
        f"kernel bwd ms (fwd+bwd - fwd) {case}: <= {KERNEL_TARGET_MS['bwd']} (NATTEN {NATTEN_MS['bwd']:.2f})",
        bwd,
        "<=",
        KERNEL_TARGET_MS["bwd"],
        ".3f",
    )
    floors = [
        k[(side, batch, "pallas", mode)]["x_floor"]
        for mode in ("fwd", "fwd+bwd")
        if (side, batch, "pallas", mode) in k
    ]
    add(
        f"kernel within 2x of the memory floor, {case} (worse pass)",
        max(floors) if floors else None,
        "<=",
        2.0,
        ".2f",
    )
    for s, b in sorted({(s, b) for s, b, _, _ in k if s >= 32}):
        speedup = _ratio(_ms(k, s, b, "dense_xla", "fwd+bwd"), _ms(k, s, b, "pallas", "fwd+bwd"))
        add(f"kernel fwd+bwd vs dense masked XLA, {s}x{s} B={b}: >= 3x", speedup, ">=", 3.0, ".2f")
    train = _train(results)
    cycle = train.get(CYCLE)
    add(
        f"MVAR-d16 train cycle average s: <= {CYCLE_TARGET_S} (official {OFFICIAL_TRAIN[CYCLE][0]})",
        cycle and cycle["ms_per_step"] / 1e3,
        "<=",
        CYCLE_TARGET_S,
        ".3f",
    )
    peaks = {_title(r["family"]): r["peak_bytes_in_use"] for r in records(results, "train_peak")}
    official_peak = max(p for (m, _), (_, p) in OFFICIAL_TRAIN.items() if m == "MVAR" and p)
    add(
        f"MVAR-d16 train peak GB: no higher than official ({official_peak})",
        peaks.get("MVAR") and peaks["MVAR"] / GB,
        "<=",
        official_peak,
        ".2f",
    )
    sampling = _sampling(results)
    for decode in (True, False):
        label = "with decode" if decode else "without decode"
        ours, var = sampling.get(("MVAR", decode)), sampling.get(("VAR", decode))
        official = OFFICIAL_SAMPLING["MVAR", decode][0]
        add(
            f"MVAR-d16 img/s {label}: >= 2x official MVAR ({2 * official})",
            ours and ours["images_per_s"],
            ">=",
            2 * official,
            ".0f",
        )
        add(
            f"MVAR-d16 img/s {label}: faster than our VAR-d16 (ratio > 1)",
            _ratio(ours and ours["images_per_s"], var and var["images_per_s"]),
            ">",
            1.0,
            ".2f",
        )
    ours, var = sampling.get(("MVAR", False)), sampling.get(("VAR", False))
    add(
        "MVAR-d16 peak without decode, batch 64: <= 1/4 of our VAR-d16's (ratio)",
        _ratio(ours and ours["peak_bytes_in_use"], var and var["peak_bytes_in_use"]),
        "<=",
        0.25,
        ".2f",
    )
    return [
        'Targets (docs/benchmarks.md, "Baselines to beat"):',
        "",
        *_table(["target", "measured", "verdict"], rows, "lrl"),
    ]


def check_table(results: dict[str, Any]) -> list[str]:
    rows = []
    for c in records(results, "check"):
        t = c.get("tiling")
        tiling = (
            f"{t['block_q']}/{t['partner_chunk'] or 'row'}/{t['num_warps']}w/{t['num_stages']}s" if t else "-"
        )
        errors = [_num(c.get("errors", {}).get(name), ".1e") for name in ("o", "dq", "dk", "dv")]
        verdict = "pass" if c["ok"] else "**FAIL**" + (f": {c['error'][:120]}" if c.get("error") else "")
        rows.append(
            [c["dtype"], f"{c['side']}x{c['side']}", tiling, *errors, f"{c['tolerance']:.0e}", verdict]
        )
    if not rows:
        return []
    return [
        "Kernel vs the gather reference, batch 2 (relative error; the reference in float32 logits, "
        "matmul precision 'highest'):",
        "",
        *_table(["dtype", "map", "tiling", "o", "dq", "dk", "dv", "tolerance", "result"], rows, "lllrrrrrl"),
    ]


def kernel_table(results: dict[str, Any]) -> list[str]:
    k = _kernel_rows(results)
    if not k:
        return []
    copy = records(results, "copy")
    rows = []
    for (side, batch, method, mode), r in k.items():
        official = ""
        if (side, batch) == KERNEL_CASE and method == "pallas":
            official = (
                f"NATTEN {NATTEN_MS['fwd'] if mode == 'fwd' else NATTEN_MS['fwd'] + NATTEN_MS['bwd']:.2f}"
            )
        elif (side, batch, method, mode) == (*KERNEL_CASE, "dense_sdpa", "fwd"):
            official = f"cuDNN dense+mask {CUDNN_FWD_MS}"
        rows.append(
            [
                f"{side}x{side}",
                str(batch),
                mode,
                method,
                r["impl"] or "-",
                _num(r["median_ms"], ".3f"),
                _num(r["gbps"], ".0f"),
                _num(r["x_floor"], ".1f"),
                _num(_ratio(r["median_ms"], _ms(k, side, batch, "pallas", mode)), ".2f"),
                official,
                r["note"],
            ]
        )
    return [
        f"Spatial-Markov attention, bfloat16, 16 heads, head_dim 64, k 7; copy bandwidth "
        f"{copy[0]['gbps']:.0f} GB/s" * bool(copy) + ". `/ pallas`: the method's time over the kernel's "
        "in the same run (> 1: the kernel is faster); official: the same pass on the issue authors' H100 "
        "(NATTEN's fwd+bwd is its fwd plus bwd).",
        "",
        *_table(
            [
                "map",
                "B",
                "pass",
                "method",
                "impl",
                "ms",
                "GB/s",
                "x floor",
                "/ pallas",
                "official ms",
                "note",
            ],
            rows,
            "lrlllrrrrll",
        ),
    ]


def sampling_table(results: dict[str, Any]) -> list[str]:
    sampling = _sampling(results)
    if not sampling:
        return []
    rows = []
    for (model, decode), r in sampling.items():
        official = OFFICIAL_SAMPLING.get((model, decode))
        var = sampling.get(("VAR", decode))
        rows.append(
            [
                f"{model}-d{r['depth']}",
                "yes" if decode else "no",
                str(r["batch"]),
                f"{r['images_per_s']:.1f}",
                f"{r['seconds_per_call']:.3f}",
                _gb(r["peak_bytes_in_use"]),
                _gb(r["predicted_bytes"]),
                f"{official[0]} ({official[1]})" if official else "-",
                _num(_ratio(r["images_per_s"], official and official[0]), ".2f"),
                _num(_ratio(r["images_per_s"], var and var["images_per_s"]), ".2f"),
                _num(_ratio(SAMPLE_SET / 60, r["images_per_s"]), ".1f") if decode else "-",
            ]
        )
    return [
        "Sampling, random weights, bfloat16, cfg 1.5, top-k 900, top-p 0.96, one process per model; "
        "the decode's peak is the process's after the run without it (the larger of the two). "
        "XLA peak: the compiled program's arguments + outputs + temporaries. 50k min: the papers' "
        "sample set (`sample.py --fid_npz`) on one such device at this rate.",
        "",
        *_table(
            [
                "model",
                "decode",
                "batch",
                "img/s",
                "s/call",
                "peak GB",
                "XLA peak GB",
                "official img/s (GB)",
                "vs official",
                "vs our VAR",
                "50k min",
            ],
            rows,
            "llrrrrrrrrr",
        ),
    ]


def train_table(results: dict[str, Any]) -> list[str]:
    train = _train(results)
    if not train:
        return []
    rows = []
    for (model, segment), r in train.items():
        official = OFFICIAL_TRAIN.get((model, segment))
        rows.append(
            [
                r["model"],
                segment,
                r["attention_impl"],
                str(r["batch"]),
                f"{r['ms_per_step'] / 1e3:.4f}",
                f"{r['images_per_s']:.0f}",
                _num(r["xla_gib"] and r["xla_gib"] * 2**30 / GB, ".2f"),
                "-" if not official else f"{official[0]:.3f}" + (f" ({official[1]})" if official[1] else ""),
                _num(_ratio(official and official[0], r["ms_per_step"] / 1e3), ".2f"),
                _num(r["compile_s"], ".0f"),
            ]
        )
    peaks = [
        f"{p['model']} {_gb(p['peak_bytes_in_use'])} GB (its largest XLA peak "
        f"{_gb(max((r['xla_gib'] or 0) * 2**30 for r in train.values() if r['model'] == p['model']))} GB)"
        for p in records(results, "train_peak")
    ]
    return [
        "Train steps, random weights and tokens, bfloat16, AdamW; one process per model. "
        "`official / ours` > 1: ours is faster.",
        "",
        *_table(
            [
                "model",
                "segment",
                "attention",
                "batch",
                "s/step",
                "img/s",
                "XLA peak GB",
                "official s (GB)",
                "official / ours",
                "compile s",
            ],
            rows,
            "lllrrrrrrr",
        ),
        "",
        "Measured peak (`peak_bytes_in_use`, the process's, all segments): " + "; ".join(peaks) + ".",
    ]


def render(results: dict[str, Any]) -> str:
    """The run as markdown: the summary, the targets, then each measured table."""
    parts = [summary(results), targets(results)]
    parts += [check_table(results), kernel_table(results), sampling_table(results), train_table(results)]
    return "\n".join("\n".join(part) + "\n" for part in parts if part)


def fold(doc: str, section: str) -> str:
    """``doc`` with the text between its ``BEGIN`` and ``END`` lines replaced by ``section``."""
    start, end = doc.find(BEGIN), doc.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the doc has no {BEGIN!r} ... {END!r} section")
    return doc[: start + len(BEGIN)] + "\n\n" + section.strip() + "\n\n" + doc[end:]


PROG = "python -m bench.gpu_fold"
FLAGS = flags.FlagValues()
flags.DEFINE_string("results", None, "results.json of a gpu_verdict run", required=True, flag_values=FLAGS)
flags.DEFINE_string("doc", str(DOC), "the markdown file whose marked section is replaced", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    doc = pathlib.Path(args.doc)
    results = json.loads(pathlib.Path(args.results).read_text())
    try:
        doc.write_text(fold(doc.read_text(), render(results)))
    except ValueError as e:
        cli.usage_error(PROG, f"{doc}: {e}")
    print(f"{PROG}: {doc}: the GPU verdict section now holds the run of {results['header'].get('date', '?')}")


if __name__ == "__main__":
    main()
