"""VAR's KV cache compressed: HACK against H2O, SnapKV and HACK with random head kinds.

    python -m bench.bench_demo_table --demo_out demo_out --out bench_out/demo_table --families var
    python -m mvar_jax.hack --checkpoint bench_out/demo_table/var/model --calibrate
    python -m bench.bench_kv_compression --model bench_out/demo_table/var/model \\
        --demo_out demo_out --out bench_out/kv_compression                       # quality + memory
    python -m bench.bench_kv_compression --quality=false --time_reps 5 \\
        --out bench_out/kv_gpu                                                   # GPU: + timings
    python -m bench.bench_kv_compression --out /tmp/kv_smoke --smoke            # CPU smoke run

* quality (``--model``: a VAR model directory with its ``head_kinds.json``): class accuracy
  and Fréchet distance (``eval.quality.evaluate_generator``: cfg 1.5, unfiltered, 100 images per
  class, the demo's classifier) for every method at every ``--ratios``, and the full cache;
  and, free of sampling noise, how far each moves the model's guided predictions from the
  full cache's on the same prefixes (``--fidelity_per_class`` full-cache samples per class,
  teacher-forced through both caches): mean KL(full || compressed) per token and top-1
  agreement. The head kinds' stability: a second calibration on other images (seed 1),
  the heads whose kind it repeats;
* memory: XLA's ``memory_analysis`` of the compiled sampler of VAR-d16 and VAR-d30 (random
  weights; batch ``--batch`` with guidance, ``--dtype``, tokens only: the decoder is the same in
  every row), the KV bytes the cache holds at the last scale and, with ``--time_reps``, the
  median seconds per call; MVAR of the same depth beside them. The head kinds of a random
  model are the first half of each block's heads (memory and speed depend only on their
  number).

Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from bench import common
from bench.bench_sampling import random_bundle
from mvar_jax import checkpoint, cli, sampling
from mvar_jax.models import families, kv_compression
from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.transformer import Transformer, stack_cache
from mvar_jax.models.vqvae import VQVAE, VQVAEConfig, split_scales
from mvar_jax.sampling import head_kinds

PROG = "python -m bench.bench_kv_compression"
FLAGS = flags.FlagValues()
common.define_flags(FLAGS, smoke="the toy VAR, random weights: memory at one ratio, no quality")
flags.DEFINE_string("model", None, "VAR model directory for the quality table", flag_values=FLAGS)
flags.DEFINE_string("demo_out", "demo_out", "the demo's output (its data config)", flag_values=FLAGS)
flags.DEFINE_string("classifier_cache", None, "default: the quality command's cache", flag_values=FLAGS)
flags.DEFINE_bool("quality", True, "measure quality on --model", flag_values=FLAGS)
flags.DEFINE_list("ratios", ["0.5", "0.7", "0.9"], "compression ratios", flag_values=FLAGS)
flags.DEFINE_list("methods", list(kv_compression.METHODS), "methods", flag_values=FLAGS)
flags.DEFINE_integer("num_per_class", 100, "quality samples per class", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer(
    "fidelity_per_class", 20, "KL: full-cache samples per class", lower_bound=1, flag_values=FLAGS
)
cli.define_int_list(
    "depths", [16, 30], "VAR depths of the memory table", FLAGS, what="depths", example="16,30"
)
flags.DEFINE_integer(
    "batch", 64, "images per sampling call (memory, timing)", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "memory rows' precision", flag_values=FLAGS)
flags.DEFINE_integer("time_reps", 0, "timed calls per memory row (0: none)", lower_bound=0, flag_values=FLAGS)

GiB = 2**30


def compression(method: str, ratio: float, contextual) -> kv_compression.KVCompression | None:
    if ratio == 0:
        return None
    return kv_compression.KVCompression(
        ratio, method, contextual if method in kv_compression.HEAD_AWARE else None
    )


def kept_at_last_scale(config: TransformerConfig, compressed: kv_compression.KVCompression | None) -> float:
    """Mean history tokens a head attends at the last scale (all of it for the full cache)."""
    last = config.num_scales - 1
    if compressed is None:
        return float(config.token_range(0, last)[1])
    budgets = kv_compression.history_budgets(config, compressed)
    kinds = [k for block in compressed.head_kinds(config) for k in block]
    return float(np.mean([budgets[k][last] for k in kinds]))


@functools.partial(jax.jit, static_argnames=("vqvae_config", "config", "compression"))
def forced_logits(vqvae_config, config, compression, vqvae_params, params, label_B, tokens_BL, guidance_S2):
    """Guided logits ``(B, L, V)`` of every scale, the scales before it given as ``tokens_BL``
    (teacher forcing through the sampler's per-scale path and cache, full or compressed)."""
    model, B = Transformer(config, scan_blocks=True), label_B.shape[0]
    rows_B2 = jnp.stack([label_B, jnp.full_like(label_B, config.num_classes)], axis=1).reshape(-1)
    x_RlC, cond_RD = model.apply(params, rows_B2, method=Transformer.start_input)
    if compression is None:
        cache = families.of(config).init_state(config, 2 * B)
    else:
        cache = kv_compression.init_cache(config, 2 * B, compression, 2)
    cache = stack_cache(cache)
    x_BLCv = VQVAE(vqvae_config).apply(
        vqvae_params, split_scales(tokens_BL, config.patch_nums), method=VQVAE.idx_to_var_input
    )
    logits = []
    for si in range(config.num_scales):
        if si:
            begin, end = (t - config.first_l for t in config.token_range(si, si + 1))
            x_RlC = jnp.repeat(
                model.apply(params, x_BLCv[:, begin:end], si, method=Transformer.scale_input), 2, 0
            )
        logits_RlV, cache = model.apply(params, x_RlC, cond_RD, si, cache, method=Transformer.scale_logits)
        pair = logits_RlV.reshape(B, 2, *logits_RlV.shape[1:])
        logits.append(guidance_S2[si, 0] * pair[:, 0] - guidance_S2[si, 1] * pair[:, 1])
    return jnp.concatenate(logits, axis=1)


def fidelity(model, labels_N: np.ndarray, tokens_NL: np.ndarray, compression, batch: int) -> dict[str, float]:
    """How far the compressed cache moves the model's predictions from the full cache's, on
    the same prefixes: mean KL(full || compressed) in nats and top-1 agreement, over the
    tokens of scales 1.. (scale 0 reads no cache)."""
    tcfg = model.transformer_config
    guidance = sampling.guidance_schedule(1.5, tcfg)
    kl, agree = [], []
    for start in range(0, len(labels_N), batch):
        args = (model.vqvae_params, model.transformer_params, labels_N[start : start + batch])
        args += (tokens_NL[start : start + batch], guidance)
        full = forced_logits(model.vqvae_config, tcfg, None, *args)[:, tcfg.first_l :]
        ours = forced_logits(model.vqvae_config, tcfg, compression, *args)[:, tcfg.first_l :]
        log_p, log_q = jax.nn.log_softmax(full), jax.nn.log_softmax(ours)
        kl.append(np.asarray(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)))
        agree.append(np.asarray(jnp.argmax(full, -1) == jnp.argmax(ours, -1)))
    return {"kl": float(np.mean(np.concatenate(kl))), "top1_agreement": float(np.mean(np.concatenate(agree)))}


def stability(model_dir: pathlib.Path) -> dict[str, Any]:
    """The stored head kinds against a second calibration of 50 other images (seed 1)."""
    model = checkpoint.load_model(model_dir)
    statistics, contextual = head_kinds.load(model_dir, model.transformer_config)
    again = head_kinds.classify(head_kinds.head_statistics(model, seed=1, progress=False), contextual.mean())
    return {"heads": int(contextual.size), "same_kind": int((again == contextual).sum())}


def quality_rows(model_dir: pathlib.Path, args) -> list[dict[str, Any]]:
    # The judge reads the built-in dataset (TFDS), which the GPU image lacks: imported here only.
    from bench.bench_demo_table import load_config
    from mvar_jax.eval import quality

    model = checkpoint.load_model(model_dir)
    tcfg = model.transformer_config
    contextual = head_kinds.as_flags(head_kinds.load(model_dir, tcfg)[1])
    data_cfg = load_config("var", pathlib.Path(args.demo_out), None).data
    data_cfg.token_cache_dir = None
    cache = pathlib.Path(args.classifier_cache) if args.classifier_cache else quality.default_cache_dir()
    classifier = quality.load_or_train_classifier(cache, data_cfg)
    labels_N = np.repeat(np.arange(tcfg.num_classes, dtype=np.int32), args.fidelity_per_class)
    reference = np.concatenate(
        [
            t
            for _, t in sampling.sample_batches(
                model, labels_N, 1, quality.UNFILTERED, batch_size=50, progress=False
            )
        ]
    )
    cases = [("full cache", 0.0)] + [(m, float(r)) for r in args.ratios for m in args.methods]
    rows = []
    for method, ratio in cases:
        compressed = compression(method, ratio, contextual)
        options = dataclasses.replace(quality.UNFILTERED, kv_compression=compressed)
        report = quality.evaluate_generator(
            model, classifier, data_cfg, num_per_class=args.num_per_class, options=options, progress=False
        )
        accuracy = report["class_accuracy"]
        rows.append(
            {
                **fidelity(model, labels_N, reference, compressed, 50),
                "method": method,
                "ratio": ratio,
                "kept_last_scale": kept_at_last_scale(tcfg, compressed),
                "accuracy": accuracy["mean"],
                "worst_class": min(accuracy["per_class"].values()),
                "frechet": report["frechet_distance"]["generated"],
                "frechet_ratio": report["frechet_distance"]["ratio_to_reconstruction_floor"],
            }
        )
        print(quality_markdown(rows[-1:], tcfg), flush=True)
    return rows


def memory_row(
    vqvae_config: VQVAEConfig, tcfg: TransformerConfig, method: str, ratio: float, batch: int, time_reps: int
) -> dict[str, Any]:
    contextual = tuple(
        tuple(h < tcfg.num_heads // 2 for h in range(tcfg.num_heads)) for _ in range(tcfg.depth)
    )
    compressed = compression(method, ratio, contextual) if tcfg.family == "var" else None
    options = sampling.SamplingOptions(decode=False, kv_compression=compressed)
    model = checkpoint.abstract_model(vqvae_config, tcfg)
    start = time.perf_counter()
    compiled = sampling.lower_sample(model, batch, options).compile()
    analysis = compiled.memory_analysis()
    row = {
        "family": tcfg.family,
        "depth": tcfg.depth,
        "method": method if compressed else ("full cache" if tcfg.family == "var" else "no cache"),
        "ratio": ratio,
        "batch": batch,
        "dtype": tcfg.dtype,
        "compile_s": time.perf_counter() - start,
        "temp_bytes": analysis.temp_size_in_bytes,
        "argument_bytes": analysis.argument_size_in_bytes,
        "kv_bytes": 0,
    }
    if tcfg.family == "var":
        rows_total = 2 * batch  # guided
        per_token = 2 * tcfg.depth * rows_total * tcfg.embed_dim * np.dtype(tcfg.compute_dtype).itemsize
        if compressed is None:
            row["kv_bytes"] = per_token * tcfg.seq_len  # the whole pyramid, allocated at the start
        else:  # the history kept at the last scale plus the scale itself
            row["kv_bytes"] = int(
                per_token * (kept_at_last_scale(tcfg, compressed) + tcfg.patch_nums[-1] ** 2)
            )
    if time_reps:
        real = random_bundle(vqvae_config, tcfg)
        labels = np.arange(batch) % tcfg.num_classes
        seconds = []
        for rep in range(time_reps + 1):
            start = time.perf_counter()
            jax.block_until_ready(sampling.sample(real, labels, jax.random.PRNGKey(rep), options).tokens)
            seconds.append(time.perf_counter() - start)
        row["s_per_call"] = statistics.median(seconds[1:])
    return row


def memory_rows(args) -> list[dict[str, Any]]:
    rows = []
    ratios = [float(r) for r in args.ratios]
    for depth in args.depths:
        if args.smoke:
            vqvae_config, var = common.toy_configs("var", args.dtype)
        else:
            vqvae_config, var = VQVAEConfig(), TransformerConfig(family="var", depth=depth, dtype=args.dtype)
        cases = [(var, "full cache", 0.0)] + [(var, "hack", r) for r in ratios]
        if not args.smoke:
            cases += [(var, m, 0.7) for m in ("h2o", "snapkv") if 0.7 in ratios]
            cases.append((dataclasses.replace(var, family="mvar"), "-", 0.0))
        for tcfg, method, ratio in cases:
            rows.append(memory_row(vqvae_config, tcfg, method, ratio, args.batch, args.time_reps))
            print(memory_markdown(rows[-1:]), flush=True)
        if args.smoke:
            break
    return rows


def quality_markdown(rows: list[dict[str, Any]], tcfg: TransformerConfig) -> str:
    history = tcfg.token_range(0, tcfg.num_scales - 1)[1]
    lines = [
        f"| method | ratio | history kept at the last scale (of {history}) "
        "| class acc. | worst class | Fréchet dist. (x recon. floor) | KL to the full cache (nats) "
        "| top-1 agreement |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['ratio']:.1f} | {r['kept_last_scale']:.1f} | {100 * r['accuracy']:.1f}% "
            f"| {100 * r['worst_class']:.1f}% | {r['frechet']:.2f} ({r['frechet_ratio']:.2f}x) "
            f"| {r['kl']:.4f} | {100 * r['top1_agreement']:.1f}% |"
        )
    return "\n".join(lines)


def memory_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | ratio | batch | dtype | KV at the last scale GiB | XLA temporaries GiB "
        "| arguments GiB | s/call | compile s |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        timed = f"{r['s_per_call']:.3f}" if "s_per_call" in r else "-"
        lines.append(
            f"| {r['family'].upper()}-d{r['depth']} | {r['method']} | {r['ratio']:.1f} | {r['batch']} "
            f"| {r['dtype']} "
            f"| {r['kv_bytes'] / GiB:.2f} | {r['temp_bytes'] / GiB:.2f} | {r['argument_bytes'] / GiB:.2f} "
            f"| {timed} | {r['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    results: dict[str, Any] = {"header": common.header(batch=args.batch)}
    parts = []
    if args.quality and not args.smoke:
        if args.model is None:
            cli.usage_error(PROG, "--model DIR (a VAR model with head_kinds.json) for the quality table")
        results["head_kinds"] = stability(pathlib.Path(args.model))
        results["quality"] = quality_rows(pathlib.Path(args.model), args)
        tcfg = checkpoint.load_model(args.model).transformer_config
        parts.append(
            f"Head kinds: a second calibration on other images repeats {results['head_kinds']['same_kind']} "
            f"of {results['head_kinds']['heads']} heads' kinds.\n\n"
            + quality_markdown(results["quality"], tcfg)
        )
    results["memory"] = memory_rows(args)
    parts.append(memory_markdown(results["memory"]))
    common.write_results(args.out, results, "\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
