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

import argparse
import dataclasses
import json
import pathlib
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from bench.common import GiB, run_case, write_results
from mvar_jax import attention, checkpoint, sampling, transformer
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
    """The released tokenizer and d16 at 256 px, or a toy for --smoke."""
    if smoke:
        patch_nums = (1, 2, 3, 4)
        vqvae_config = VQVAEConfig(
            vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=patch_nums
        )
        return vqvae_config, transformer.TransformerConfig(
            vocab_size=64,
            cvae=8,
            num_classes=10,
            depth=2,
            embed_dim=64,
            num_heads=4,
            patch_nums=patch_nums,
            refine_step=3,
            kernel_size=3,
            attention=attention,
            dtype=dtype,
        )
    return VQVAEConfig(), transformer.TransformerConfig(depth=16, attention=attention, dtype=dtype)


def random_model(attention: str, smoke: bool, dtype: str = "bfloat16") -> checkpoint.ModelBundle:
    """Random weights for ``model_configs`` (no checkpoint needed)."""
    vqvae_config, transformer_config = model_configs(attention, smoke, dtype)
    leaves, treedef = jax.tree.flatten(abstract_variables(vqvae_config))
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    vqvae_params = jax.tree.unflatten(
        treedef, [0.02 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)]
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
    return run_case("bench.bench_sampling", "--case", dataclasses.asdict(case))


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
        peak = "n/a" if r["peak_bytes_in_use"] is None else f"{r['peak_bytes_in_use'] / GiB:.2f}"
        lines.append(
            f"| {r['attention'].upper()}-d{r['depth']} | {r['batch']} | "
            f"{'yes' if r['decode'] else 'no'} | {r['images_per_s']:.1f} | "
            f"{r['seconds_per_call']:.3f} | {peak} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, help="directory for results.md/.json")
    parser.add_argument("--smoke", action="store_true", help="toy model and batches (CPU)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 32,64; --smoke: 2)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # One case, JSON result on stdout.
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(Case(**json.loads(args.case)))))
        return
    if args.out is None:
        parser.error("--out is required")
    batches = args.batch_sizes or ("2" if args.smoke else "32,64")
    reps = 1 if args.smoke else args.reps
    rows = []
    for pattern in attention.PATTERNS:
        for batch in (int(b) for b in batches.split(",")):
            for decode in (True, False):
                rows.append(run_isolated(Case(pattern, batch, decode, args.smoke, args.warmup, reps)))
                print(
                    f"{pattern} batch {batch} decode {decode}: {rows[-1]['images_per_s']:.1f} img/s",
                    flush=True,
                )
    write_results(args.out, rows, markdown(rows))


if __name__ == "__main__":
    main()
