"""Train-step time and memory per segment: MVAR-d16 (8:1:1 cycle) vs VAR-d16 (a GPU benchmark).

    python -m bench.bench_train_step --out bench_out/train_step
    python -m bench.bench_train_step --out /tmp/ts_smoke --smoke   # CPU smoke run

Each row is one compiled train step of ``mvar_jax.training.step`` (forward,
backward, AdamW with the official recipe) on random weights and random tokens,
bfloat16 compute, ``--batch_per_device`` images per device over all local
devices (data parallel). The VQVAE is not part of the step (the token cache
removes it from training), so the teacher-forcing input is random too.

* ``attention impl``: MVAR's spatial-Markov segments (13x13 and 16x16 at
  256 px) run once per ``--neighborhood_impls`` entry
  (``TransformerConfig.neighborhood_impl``: the Pallas kernel, XLA's dense
  attention under the window mask, the gather reference); the other segments
  use dense attention only;
* ``ms/step``: median over ``--reps`` steps after ``--warmup``, each ended by
  ``block_until_ready``;
* ``XLA GiB``: the compiled step's arguments + outputs + temporaries
  (``memory_analysis``), i.e. its peak on one device;
* the MVAR ``cycle`` row weights the segments as the schedule visits them
  (ratio_k : 1 : 1), which is what an epoch costs per step, with the first
  attention impl.

Beneath the table: ``reference / <impl>`` step-time ratios of the largest
spatial-Markov segment (how much faster the kernel makes the 16x16 step) and
the process-wide peak (``memory_stats``). Writes ``results.md`` and
``results.json`` to ``--out``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import ml_collections
import numpy as np
from absl import flags

from bench import common as bench_common
from bench.common import GiB
from mvar_jax import cli, parallel
from mvar_jax.configs import common
from mvar_jax.models import families
from mvar_jax.models.config import NEIGHBORHOOD_IMPLS, InitScales, TransformerConfig
from mvar_jax.models.segments import Segment
from mvar_jax.models.transformer import Transformer
from mvar_jax.training import optimizer, state as state_lib, step as step_lib
from mvar_jax.training.synthetic import SyntheticTokenSource

DEFAULT_IMPLS = ("pallas", "masked", "reference")
# The interpreter runs the kernel's code on CPU, so the smoke run exercises both paths.
SMOKE_IMPLS = ("reference", "pallas_interpret")
DENSE = "dense"  # The attention impl column of segments without spatial-Markov attention.


def model_config(family: str, smoke: bool) -> TransformerConfig:
    """d16 at 256 px with the released tokenizer's vocabulary and the recipe's rematerialisation,
    or the toy (``bench.common.toy_configs``) for --smoke."""
    if smoke:
        return bench_common.toy_configs(family)[1]
    remat = recipe().model.remat
    return TransformerConfig(family=family, depth=16, drop_path_rate=None, dtype="bfloat16", remat=remat)


def recipe() -> ml_collections.ConfigDict:
    """The official training recipe (``configs/common.py``) with the README's ``--alng=1e-3``."""
    config = common.get_config()
    config.init.adaln_gamma = 1e-3
    return config


def _xla_bytes(compiled) -> float | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return float(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def uses_neighborhood(config: TransformerConfig, segment: Segment) -> bool:
    """Whether the segment's attention is spatial-Markov (MVAR, scales >= refine_step)."""
    return families.of(config).spatial_markov and segment.last_scale > config.refine_step


def bench_model(
    config: TransformerConfig,
    recipe: ml_collections.ConfigDict,
    *,
    impls: tuple[str, ...],
    batch: int,
    warmup: int,
    reps: int,
) -> list[dict]:
    """One row per segment of the model's schedule, per impl where neighbourhoods are used."""
    mesh = parallel.make_mesh(jax.local_devices())
    tx, lr = optimizer.make_optimizer(
        optimizer.OptimizerConfig(**recipe.optim),
        global_batch_size=batch,
        total_steps=10_000,
        decay_mask=optimizer.official_decay_mask,
    )
    rng = jax.random.PRNGKey(0)
    params = state_lib.init_params(config, InitScales(**recipe.init), rng)
    state = state_lib.create_train_state(params, tx, rng)
    shardings = parallel.state_shardings(state, mesh, fsdp=False)
    state = jax.device_put(state, shardings)
    tokens = SyntheticTokenSource(
        batch_size=batch, seq_len=config.seq_len, vocab_size=config.vocab_size, num_classes=config.num_classes
    ).batch(0)
    tokens["x_BLCv"] = (
        np.random.default_rng(0)
        .normal(size=(batch, config.seq_len - config.first_l, config.cvae))
        .astype(np.float32)
    )
    inputs = parallel.host_batch_to_global(tokens, mesh)
    cycle = families.of(config).schedule(config, recipe.ratio_k)
    rows = []
    for index, segment in enumerate(cycle.segments):
        segment_impls = impls if uses_neighborhood(config, segment) else (DENSE,)
        for impl in segment_impls:
            model_config = config if impl == DENSE else dataclasses.replace(config, neighborhood_impl=impl)
            train_step = parallel.jit_train_step(
                step_lib.make_train_step(Transformer(model_config), tx, lr, segment, label_smoothing=0.0),
                shardings,
                mesh,
            )
            state, timing = time_step(train_step, state, inputs, warmup=warmup, reps=reps)
            begin, end = config.token_range(*segment)
            rows.append(
                {
                    "model": f"{families.of(config).title}-d{config.depth}",
                    "segment": segment.name(config.patch_nums),
                    "attention_impl": impl,
                    "tokens": end - begin,
                    "steps_per_cycle": cycle.cycle.count(index),
                    "ms_per_step": 1e3 * timing["seconds"],
                    "images_per_s": batch / timing["seconds"],
                    "xla_gib": None if timing["xla_bytes"] is None else timing["xla_bytes"] / GiB,
                    "compile_s": timing["compile_s"],
                }
            )
    return rows


def time_step(
    train_step, state: state_lib.TrainState, inputs, *, warmup: int, reps: int
) -> tuple[state_lib.TrainState, dict]:
    """Compiles and times a jitted ``(state, batch) -> (state, metrics)`` step (state donated).

    Returns the final state and the median ``seconds``, ``compile_s`` and ``xla_bytes``.
    """
    started = time.perf_counter()
    compiled = train_step.lower(state, inputs).compile()
    compile_s = time.perf_counter() - started
    for _ in range(warmup):
        state, _ = compiled(state, inputs)
    jax.block_until_ready(state)
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        state, metrics = compiled(state, inputs)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - started)
    return state, {
        "seconds": statistics.median(times),
        "compile_s": compile_s,
        "xla_bytes": _xla_bytes(compiled),
    }


def cycle_row(rows: list[dict], impl: str) -> dict:
    """The schedule-weighted average step of one model, with ``impl`` where it applies."""
    rows = [r for r in rows if r["attention_impl"] in (DENSE, impl)]
    weights = np.array([r["steps_per_cycle"] for r in rows], float)
    ms = float(np.average([r["ms_per_step"] for r in rows], weights=weights))
    peaks = [r["xla_gib"] for r in rows]
    return {
        "model": rows[0]["model"],
        "segment": "cycle",
        "attention_impl": impl,
        "tokens": None,
        "steps_per_cycle": int(weights.sum()),
        "ms_per_step": ms,
        "images_per_s": rows[0]["images_per_s"] * rows[0]["ms_per_step"] / ms,
        "xla_gib": None if None in peaks else max(peaks),
        "compile_s": None,
    }


def reference_ratios(rows: list[dict], config: TransformerConfig) -> list[dict]:
    """``reference / impl`` ms per step on the largest spatial-Markov segment (> 1: impl wins)."""
    side = config.patch_nums[-1]
    ms = {
        r["attention_impl"]: r["ms_per_step"]
        for r in rows
        if r["segment"] == str(side) and r["attention_impl"] != DENSE
    }
    if "reference" not in ms:
        return []
    return [
        {
            "segment": f"{side}x{side}",
            "numerator": "reference",
            "denominator": impl,
            "ratio": ms["reference"] / ms[impl],
        }
        for impl in ms
        if impl != "reference"
    ]


def ratio_line(ratio: dict) -> str:
    return f"{ratio['segment']} segment: {ratio['numerator']} / {ratio['denominator']} = {ratio['ratio']:.2f}"


def to_markdown(rows: list[dict], header: str) -> str:
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    lines = [
        header,
        "",
        "| model | segment | attention impl | tokens | steps/cycle | ms/step | images/s "
        "| XLA GiB | compile s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['segment']} | {r['attention_impl']} | "
            f"{fmt(r['tokens'], 'd')} | {r['steps_per_cycle']} | "
            f"{r['ms_per_step']:.1f} | {r['images_per_s']:.0f} | "
            f"{fmt(r['xla_gib'], '.2f')} | {fmt(r['compile_s'], '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def parse_impls(names: list[str] | None, smoke: bool) -> tuple[str, ...]:
    """``--neighborhood_impls``: distinct names, each a neighborhood_impl value."""
    if names is None:
        return SMOKE_IMPLS if smoke else DEFAULT_IMPLS
    impls = tuple(name.strip() for name in names if name.strip())
    unknown = [name for name in impls if name not in NEIGHBORHOOD_IMPLS]
    if not impls or unknown or len(set(impls)) != len(impls):
        raise ValueError(
            f"--neighborhood_impls must list distinct names from {NEIGHBORHOOD_IMPLS}, "
            f"got {','.join(names)!r}"
        )
    return impls


PROG = "python -m bench.bench_train_step"
FLAGS = flags.FlagValues()
bench_common.define_flags(FLAGS, smoke="toy model, 2 steps (CPU check)")
flags.DEFINE_list("families", ["mvar", "var"], f"some of {', '.join(families.NAMES)}", flag_values=FLAGS)
flags.DEFINE_integer("batch_per_device", 32, "images per device", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("warmup", 3, "untimed steps first", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("reps", 20, "timed steps per row", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_list(
    "neighborhood_impls",
    None,
    "MVAR spatial-Markov attention impls to time, the first also for the cycle row "
    f"(default: {','.join(DEFAULT_IMPLS)}; with --smoke {','.join(SMOKE_IMPLS)})",
    flag_values=FLAGS,
)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    try:
        impls = parse_impls(args.neighborhood_impls, args.smoke)
    except ValueError as e:
        cli.usage_error(PROG, str(e))
    if args.smoke:
        args.batch_per_device, args.warmup, args.reps = 2, 1, 2

    batch = args.batch_per_device * jax.local_device_count()
    rows, ratios = [], []
    for name in args.families:
        config = model_config(name, args.smoke)
        model_rows = bench_model(
            config, recipe(), impls=impls, batch=batch, warmup=args.warmup, reps=args.reps
        )
        rows += model_rows + ([cycle_row(model_rows, impls[0])] if len(model_rows) > 1 else [])
        ratios += reference_ratios(model_rows, config)

    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    header = (
        f"Train step, bfloat16, batch {args.batch_per_device}/device x "
        f"{jax.local_device_count()} {device.device_kind}; jax {jax.__version__}"
        f"{' (SMOKE: toy model)' if args.smoke else ''}"
    )
    markdown = to_markdown(rows, header)
    if ratios:
        markdown += "\n" + "".join(ratio_line(r) + "\n" for r in ratios)
    if peak is not None:
        markdown += f"\nProcess peak device memory: {peak / GiB:.2f} GiB\n"
    results = {
        "device": device.device_kind,
        "jax": jax.__version__,
        "smoke": args.smoke,
        "batch_per_device": args.batch_per_device,
        "neighborhood_impls": list(impls),
        "rows": rows,
        "ratios": ratios,
    }
    bench_common.write_results(args.out, results, markdown)


if __name__ == "__main__":
    main()
