"""Sampling throughput and peak memory: MVAR-d16 (no KV cache) vs VAR-d16 (KV cache).

    python -m bench.bench_sampling --out bench_out/sampling            # GPU
    python -m bench.bench_sampling --out /tmp/sampling_smoke --smoke   # CPU smoke run

Random weights (the official initialisation for the transformer, small normal
values for the VQVAE: timings do not depend on them), 256 px, bfloat16
transformer (blocks stacked by ``sampling.prepare``), cfg 1.5, top-k 900,
top-p 0.96, one image per class label. Each row is one (model, batch size,
decode) case, run in its own process so that
``peak_bytes_in_use`` (``jax`` device ``memory_stats``, weights included) is that
case's alone:

* ``img/s``: batch size / median seconds per ``sampling.sample`` call over
  ``--reps`` calls after ``--warmup`` (compilation), each ended by
  ``block_until_ready``;
* ``decode``: with the VQVAE decoder (images) or without (tokens and f_hat only).

Writes ``results.md`` and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from bench import common
from mvar_jax import attention, checkpoint, cli, sampling, transformer
from mvar_jax.vqvae import VQVAEConfig, abstract_variables

OPTIONS = dict(cfg=1.5, top_k=900, top_p=0.96)


@dataclasses.dataclass(frozen=True)
class Case:
    attention: str  # 'mvar' or 'var'
    batch: int
    decode: bool
    smoke: bool
    warmup: int
    reps: int


def model_configs(
    attention: str,
    smoke: bool,
    dtype: str = "bfloat16",
) -> tuple[VQVAEConfig, transformer.TransformerConfig]:
    """The released tokenizer and d16 at 256 px, or the toy (``common.toy_configs``) for --smoke.

    d16 is configured as released (the official stochastic depth too, inert when sampling), so
    that ``bench_cost`` lowers the very program this bench runs (bench/gpu_verdict.py reads its
    memory analysis off the compiled call)."""
    if smoke:
        return common.toy_configs(attention, dtype)
    return VQVAEConfig(), transformer.TransformerConfig(
        depth=16, attention=attention, dtype=dtype, drop_path_rate=transformer.official_drop_path_rate(16)
    )


def random_model(attention: str, smoke: bool, dtype: str = "bfloat16") -> checkpoint.ModelBundle:
    """Random weights for ``model_configs`` (no checkpoint needed)."""
    vqvae_config, transformer_config = model_configs(attention, smoke, dtype)
    leaves, treedef = jax.tree.flatten(abstract_variables(vqvae_config))
    # Drawn on the host: a jax.random.normal per leaf compiles once per shape (15 s for the toy on a CPU).
    rng = np.random.default_rng(1)
    vqvae_params = jax.tree.unflatten(
        treedef,
        [jnp.asarray(0.02 * rng.standard_normal(leaf.shape, np.float32), leaf.dtype) for leaf in leaves],
    )
    return checkpoint.ModelBundle(
        vqvae_config,
        vqvae_params,
        transformer_config,
        transformer.init_params(transformer_config, jax.random.PRNGKey(2)),
    )


def measure(case: Case) -> dict[str, Any]:
    """Runs one case in this process."""
    model = sampling.prepare(random_model(case.attention, case.smoke))
    labels = jnp.arange(case.batch) % model.transformer_config.num_classes
    seconds = []
    for i in range(case.warmup + case.reps):
        start = time.perf_counter()
        out = sampling.sample(model, labels, jax.random.PRNGKey(i), decode=case.decode, **OPTIONS)
        jax.block_until_ready(out)
        seconds.append(time.perf_counter() - start)
    per_call = statistics.median(seconds[case.warmup :])
    stats = jax.local_devices()[0].memory_stats() or {}
    return dict(
        dataclasses.asdict(case),
        seconds_per_call=per_call,
        images_per_s=case.batch / per_call,
        compile_s=seconds[0] - per_call,
        depth=model.transformer_config.depth,
        peak_bytes_in_use=stats.get("peak_bytes_in_use"),
        device=jax.local_devices()[0].device_kind,
        **OPTIONS,
        dtype="bfloat16",
    )


def run_isolated(case: Case) -> dict[str, Any]:
    """``measure`` in a fresh process: the device's peak counter cannot be reset."""
    return common.run_case("bench.bench_sampling", dataclasses.asdict(case))


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"Sampling, bfloat16, cfg {OPTIONS['cfg']}, top-k {OPTIONS['top_k']}, "
        f"top-p {OPTIONS['top_p']}, on {rows[0]['device']}"
        f"{' (smoke: toy model)' if rows[0]['smoke'] else ''}.",
        "",
        "| model | batch | decode | img/s | s/call | peak GiB |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        peak = "n/a" if r["peak_bytes_in_use"] is None else f"{r['peak_bytes_in_use'] / common.GiB:.2f}"
        lines.append(
            f"| {r['attention'].upper()}-d{r['depth']} | {r['batch']} | "
            f"{'yes' if r['decode'] else 'no'} | {r['images_per_s']:.1f} | "
            f"{r['seconds_per_call']:.3f} | {peak} |"
        )
    return "\n".join(lines) + "\n"


PROG = "python -m bench.bench_sampling"
FLAGS = flags.FlagValues()
common.define_flags(FLAGS, smoke="toy model and batches (CPU)", case=True)
cli.define_int_list(
    "batch_sizes", None, "default 32,64; --smoke: 2", FLAGS, what="batch sizes", example="32,64"
)
flags.DEFINE_integer("warmup", 1, "untimed calls first (compilation)", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("reps", 5, "timed calls per case (--smoke: 1)", lower_bound=1, flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    if args.case:
        print(json.dumps(measure(Case(**json.loads(args.case)))))
        return
    batches = args.batch_sizes or ((2,) if args.smoke else (32, 64))
    reps = 1 if args.smoke else args.reps
    rows = []
    for pattern in attention.PATTERNS:
        for batch in batches:
            for decode in (True, False):
                rows.append(run_isolated(Case(pattern, batch, decode, args.smoke, args.warmup, reps)))
                print(
                    f"{pattern} batch {batch} decode {decode}: {rows[-1]['images_per_s']:.1f} img/s",
                    flush=True,
                )
    common.write_results(args.out, rows, markdown(rows))


if __name__ == "__main__":
    main()
