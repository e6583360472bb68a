"""Sampling speed, first-call (compile) time and peak memory, for every family.

    python -m bench.bench_sampling --out bench_out/sampling                   # GPU: d16, B 32/64
    python -m bench.bench_sampling --out bench_out/cpu --batch_sizes=2 --dtype=float32 \\
        --decode=no                                                        # the CPU comparison
    python -m bench.bench_sampling --out /tmp/sampling_smoke --smoke          # CPU smoke run

Random weights (the official initialisation for the transformer, small normal
values for the VQVAE: timings do not depend on them), 256 px, the blocks stacked as
``checkpoint.load_model`` returns them, the papers' FID setting (cfg 1.5, top-k
900, top-p 0.96), one image per class label. Each row is one (family, batch,
decode) case, run in its own process, so that its first call includes tracing and
compilation and ``peak_bytes_in_use`` (the device's ``memory_stats``, weights
included) is that case's alone:

* ``first call s``: wall seconds of the first ``sampling.sample`` call (CPU seconds of the
  process, all threads, beside it);
* ``img/s``, ``s/call``: over ``--reps`` further calls, the median, each ended by
  ``block_until_ready``; ``CPU s/call`` their process CPU seconds, which a machine
  shared with other work inflates less than wall time;
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
from mvar_jax import checkpoint, cli, sampling
from mvar_jax.models import families, transformer
from mvar_jax.models.config import DTYPES, TransformerConfig
from mvar_jax.models.vqvae import VQVAEConfig, abstract_variables

OPTIONS = sampling.SamplingOptions()  # the papers' FID setting: cfg 1.5, top-k 900, top-p 0.96


@dataclasses.dataclass(frozen=True)
class Case:
    family: str  # models.families
    batch: int
    decode: bool
    dtype: str
    reps: int
    smoke: bool


def model_configs(family: str, smoke: bool, dtype: str = "bfloat16") -> tuple[VQVAEConfig, TransformerConfig]:
    """The released tokenizer and d16 at 256 px, or the toy (``common.toy_configs``) for --smoke.

    d16 is configured as released (the official stochastic depth too, inert when sampling), so
    that ``bench_cost`` lowers the very program this bench runs (bench/gpu_verdict.py reads its
    memory analysis off the compiled call)."""
    if smoke:
        return common.toy_configs(family, dtype)
    return VQVAEConfig(), TransformerConfig(family=family, depth=16, dtype=dtype, drop_path_rate=None)


def random_model(family: str, smoke: bool, dtype: str = "bfloat16") -> checkpoint.ModelBundle:
    """Random weights for ``model_configs`` (no checkpoint needed), the blocks stacked as
    ``checkpoint.load_model`` returns them."""
    return random_bundle(*model_configs(family, smoke, dtype))


def random_bundle(vqvae_config: VQVAEConfig, transformer_config: TransformerConfig) -> checkpoint.ModelBundle:
    """Random weights for these configs (small normals for the VQVAE, the official initialisation
    for the transformer), the blocks stacked."""
    leaves, treedef = jax.tree.flatten(abstract_variables(vqvae_config))
    # Drawn on the host: a jax.random.normal per leaf compiles once per shape (15 s for the toy on a CPU).
    rng = np.random.default_rng(1)
    vqvae_params = jax.tree.unflatten(
        treedef,
        [jnp.asarray(0.02 * rng.standard_normal(leaf.shape, np.float32), leaf.dtype) for leaf in leaves],
    )
    params = transformer.init_params(transformer_config, jax.random.PRNGKey(2))
    return checkpoint.ModelBundle(
        vqvae_config,
        vqvae_params,
        transformer_config,
        transformer.stack_blocks(params, transformer_config.depth),
    )


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def measure(case: Case) -> dict[str, Any]:
    """Times one case in this process: the first call, then ``case.reps`` calls."""
    model = random_model(case.family, case.smoke, case.dtype)
    options = dataclasses.replace(OPTIONS, decode=case.decode)
    labels = jnp.arange(case.batch) % model.transformer_config.num_classes
    wall, cpu = [], []
    for i in range(1 + case.reps):
        wall0, cpu0 = _clocks()
        jax.block_until_ready(sampling.sample(model, labels, jax.random.PRNGKey(i), options))
        wall1, cpu1 = _clocks()
        wall.append(wall1 - wall0)
        cpu.append(cpu1 - cpu0)
    per_call = statistics.median(wall[1:])
    stats = jax.local_devices()[0].memory_stats() or {}
    return dict(
        dataclasses.asdict(case),
        depth=model.transformer_config.depth,
        first_call_s=wall[0],
        first_call_cpu_s=cpu[0],
        compile_s=wall[0] - per_call,
        seconds_per_call=per_call,
        cpu_seconds_per_call=statistics.median(cpu[1:]),
        images_per_s=case.batch / per_call,
        peak_bytes_in_use=stats.get("peak_bytes_in_use"),
        device=jax.local_devices()[0].device_kind,
        jax=jax.__version__,
        cfg=OPTIONS.cfg,
        top_k=OPTIONS.top_k,
        top_p=OPTIONS.top_p,
    )


def run_isolated(case: Case) -> dict[str, Any]:
    """``measure`` in a fresh process: the first call compiles, the peak counter is the case's."""
    return common.run_case("bench.bench_sampling", dataclasses.asdict(case))


def markdown(rows: list[dict[str, Any]]) -> str:
    r0 = rows[0]
    lines = [
        f"Sampling on {r0['device']} (jax {r0['jax']}), cfg {r0['cfg']}, top-k {r0['top_k']}, "
        f"top-p {r0['top_p']}{' (smoke: toy model)' if r0['smoke'] else ''}.",
        "",
        "| model | batch | dtype | decode | img/s | s/call | CPU s/call | first call s (CPU s) | peak GiB |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        peak = "n/a" if r["peak_bytes_in_use"] is None else f"{r['peak_bytes_in_use'] / common.GiB:.2f}"
        lines.append(
            f"| {families.get(r['family']).title}-d{r['depth']} | {r['batch']} | {r['dtype']} | "
            f"{'yes' if r['decode'] else 'no'} | {r['images_per_s']:.1f} | {r['seconds_per_call']:.3f} | "
            f"{r['cpu_seconds_per_call']:.2f} | {r['first_call_s']:.1f} ({r['first_call_cpu_s']:.1f}) | "
            f"{peak} |"
        )
    return "\n".join(lines) + "\n"


PROG = "python -m bench.bench_sampling"
FLAGS = flags.FlagValues()
common.define_flags(FLAGS, smoke="toy model, batch 2, one call after the first (CPU)", case=True)
flags.DEFINE_list("families", ["mvar", "var"], f"of {', '.join(families.NAMES)}", flag_values=FLAGS)
cli.define_int_list(
    "batch_sizes", None, "default 32,64; --smoke: 2", FLAGS, what="batch sizes", example="32,64"
)
flags.DEFINE_enum("decode", "both", ["both", "yes", "no"], "with the VQVAE decode", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "bfloat16", list(DTYPES), "transformer compute", flag_values=FLAGS)
flags.DEFINE_integer("reps", 5, "timed calls after the first (--smoke: 1)", lower_bound=1, flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    if args.case:
        print(json.dumps(measure(Case(**json.loads(args.case)))))
        return
    unknown = sorted(set(args.families) - set(families.NAMES))
    if unknown:
        cli.usage_error(PROG, f"--families: unknown {unknown}; expected some of {', '.join(families.NAMES)}")
    batches = args.batch_sizes or ((2,) if args.smoke else (32, 64))
    decodes = {"both": (True, False), "yes": (True,), "no": (False,)}[args.decode]
    reps = 1 if args.smoke else args.reps
    rows = []
    for family in args.families:
        for batch in batches:
            for decode in decodes:
                rows.append(run_isolated(Case(family, batch, decode, args.dtype, reps, args.smoke)))
                print(
                    f"{family} batch {batch} decode {decode}: {rows[-1]['images_per_s']:.1f} img/s, "
                    f"first call {rows[-1]['first_call_s']:.1f} s",
                    flush=True,
                )
    common.write_results(args.out, rows, markdown(rows))


if __name__ == "__main__":
    main()
