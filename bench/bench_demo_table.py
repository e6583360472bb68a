"""The paper's table in miniature: MVAR vs VAR (vs M-VAR) on the demo's tokenizer, same budget.

    python -m mvar_jax.demo --out demo_out                      # first: tokenizer + tokens
    python -m bench.bench_demo_table --demo_out demo_out --out bench_out/demo_table

Each family trains its ``configs/tiny_cpu*.py`` (the same width, depth, batch,
steps, data and recipe; only the attention pattern differs) over the demo's
tokenizer and token cache, in its own ``train.py`` process, into
``--out/<family>``; a family whose export is whole is not trained again (its
recorded training time is reused). Then, per family:

* class accuracy and Fréchet distance: ``mvar_jax.eval.quality.evaluate_model``
  (cfg 1.5, 50 samples per class, the demo's cached classifier);
* ``train s``: wall and CPU seconds of the ``train.py`` process (start-up,
  compilation and checkpoints included);
* sampling, in a fresh process per family: images/s of ``sampling.sample``
  (median over ``--reps`` calls of ``--batch`` images after one warm-up call),
  the measured peak of the calls (the process's peak RSS, reset with
  ``/proc/self/clear_refs`` after the warm-up, minus the RSS before the calls)
  and XLA's ``memory_analysis`` of the compiled sampler (arguments + outputs +
  temporaries), with and without the VQVAE decoder.

Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import flags

from bench import common
from mvar_jax import checkpoint, cli, sampling
from mvar_jax.eval import quality
from mvar_jax.models import families

REPO = common.REPO
FAMILIES = {"mvar": "tiny_cpu", "var": "tiny_cpu_var", "m_var": "tiny_cpu_m_var"}  # family: its config
MiB = 2**20


def overrides(demo_out: pathlib.Path, data_dir: str | None) -> dict[str, str]:
    """What points a tiny_cpu config at the demo's tokenizer, token cache and data."""
    values = {
        "vqvae_checkpoint": str(demo_out / "tokenizer" / "model"),
        "data.token_cache_dir": str(demo_out / "tokens"),
    }
    if data_dir:
        values["data.data_dir"] = data_dir
    return values


def load_config(family: str, demo_out: pathlib.Path, data_dir: str | None):
    config = importlib.import_module(f"mvar_jax.configs.{FAMILIES[family]}").get_config()
    for key, value in overrides(demo_out, data_dir).items():
        *parents, leaf = key.split(".")
        target = config
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def train(
    family: str, demo_out: pathlib.Path, workdir: pathlib.Path, data_dir: str | None
) -> dict[str, float]:
    """``train.py`` in its own process, unless ``workdir`` holds the finished export."""
    from mvar_jax.training import trainer, workdir as workdir_lib

    record = workdir / "bench_train.json"
    config = load_config(family, demo_out, data_dir)
    if workdir_lib.exported_step(workdir / "model") == trainer.total_steps(config) and record.exists():
        return json.loads(record.read_text())
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        f"--config={REPO / 'configs' / FAMILIES[family]}.py",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in overrides(demo_out, data_dir).items()),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {
        "train_wall_s": time.perf_counter() - start,
        "train_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "steps": trainer.total_steps(config),
    }
    record.write_text(json.dumps(timing))
    return timing


def _rss_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_sampling(model_dir: str, batch: int, reps: int, decode: bool) -> dict[str, Any]:
    """Runs in a fresh process: sampling speed, measured peak and XLA's memory analysis."""
    model = checkpoint.load_model(model_dir)
    options = dataclasses.replace(quality.UNFILTERED, decode=decode)
    labels = np.arange(batch) % model.transformer_config.num_classes

    def run(vqvae_params, transformer_params, key):
        bundle = model._replace(vqvae_params=vqvae_params, transformer_params=transformer_params)
        return sampling.sample(bundle, labels, key, options)

    compiled = (
        jax.jit(run).lower(model.vqvae_params, model.transformer_params, jax.random.PRNGKey(0)).compile()
    )
    analysis = compiled.memory_analysis()
    xla_bytes = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    jax.block_until_ready(sampling.sample(model, labels, jax.random.PRNGKey(0), options))  # compiles
    rss_before = _rss_bytes("VmRSS")
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    seconds = []
    for i in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(sampling.sample(model, labels, jax.random.PRNGKey(i + 1), options))
        seconds.append(time.perf_counter() - start)
    per_call = statistics.median(seconds)
    return {
        "batch": batch,
        "decode": decode,
        "images_per_s": batch / per_call,
        "seconds_per_call": per_call,
        "measured_peak_mib": (_rss_bytes("VmHWM") - rss_before) / MiB,
        "xla_temp_mib": analysis.temp_size_in_bytes / MiB,
        "xla_total_mib": xla_bytes / MiB,
    }


def sampling_isolated(model_dir: pathlib.Path, batch: int, reps: int, decode: bool) -> dict[str, Any]:
    case = {"model_dir": str(model_dir), "batch": batch, "reps": reps, "decode": decode}
    return common.run_case("bench.bench_demo_table", case)


def markdown(rows: list[dict[str, Any]], batch: int) -> str:
    lines = [
        "| model | params | mean class acc. | worst class | Fréchet dist. (x recon. floor) | "
        f"train s wall / CPU | img/s @{batch} | sampling peak MiB measured / XLA | "
        "same, tokens only (no decode) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        q, d, t = r["quality"], r["sampling"]["decode"], r["sampling"]["tokens"]
        fd = q["frechet_distance"]
        lines.append(
            f"| {families.get(r['family']).title} | {r['params'] / 1e6:.2f}M | "
            f"{100 * q['class_accuracy']['mean']:.1f}% | "
            f"{100 * min(q['class_accuracy']['per_class'].values()):.1f}% | "
            f"{fd['generated']:.2f} ({fd['ratio_to_reconstruction_floor']:.2f}x) | "
            f"{r['train']['train_wall_s']:.0f} / {r['train']['train_cpu_s']:.0f} | "
            f"{d['images_per_s']:.0f} | {d['measured_peak_mib']:.0f} / {d['xla_total_mib']:.0f} | "
            f"{t['measured_peak_mib']:.0f} / {t['xla_total_mib']:.0f} |"
        )
    fd = rows[0]["quality"]["frechet_distance"]
    lines += [
        "",
        f"Floors: tokenizer reconstructions {fd['reconstruction_floor']:.2f}, "
        f"training images {fd['train_floor']:.2f}; tokenizer PSNR "
        f"{rows[0]['quality']['tokenizer']['psnr_db']:.2f} dB.",
    ]
    return "\n".join(lines) + "\n"


PROG = "python -m bench.bench_demo_table"
FLAGS = flags.FlagValues()
common.define_flags(FLAGS, smoke=None, case=True)
flags.DEFINE_string(
    "demo_out", "demo_out", "a finished (or at least tokenized) demo directory", flag_values=FLAGS
)
flags.DEFINE_list(
    "families",
    None,
    f"comma-separated, of {tuple(FAMILIES)} (default: all)",
    flag_values=FLAGS,
)
flags.DEFINE_string("data_dir", os.environ.get("TFDS_DATA_DIR"), "TFDS data directory", flag_values=FLAGS)
flags.DEFINE_string("classifier_cache", None, "default: the quality command's cache", flag_values=FLAGS)
flags.DEFINE_integer("batch", 50, "images per sampling call", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("reps", 5, "timed sampling calls", lower_bound=1, flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    if args.case:
        print(json.dumps(measure_sampling(**json.loads(args.case))))
        return
    demo_out = pathlib.Path(args.demo_out).absolute()
    for needed in (demo_out / "tokenizer" / "model", demo_out / "tokens" / "train" / "meta.json"):
        if not needed.exists():
            cli.usage_error(
                PROG,
                f"{needed} is missing: run `python -m mvar_jax.demo --out {demo_out}` "
                "first (its tokenizer and tokens are what every family trains on)",
            )
    names = args.families or list(FAMILIES)
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        cli.usage_error(PROG, f"--families {unknown}: expected some of {tuple(FAMILIES)}")
    cache = pathlib.Path(args.classifier_cache) if args.classifier_cache else quality.default_cache_dir()
    out = pathlib.Path(args.out)
    rows = []
    for family in names:
        workdir = (out / family).absolute()
        print(f"== {family}: training into {workdir}", flush=True)
        timing = train(family, demo_out, workdir, args.data_dir)
        data_cfg = load_config(family, demo_out, args.data_dir).data  # its images, at its resolution
        data_cfg.token_cache_dir = None  # the judge reads images
        report = quality.evaluate_model(
            workdir / "model", classifier_cache=cache, data_cfg=data_cfg, num_per_class=50
        )
        sampled = {
            name: sampling_isolated(workdir / "model", args.batch, args.reps, decode)
            for name, decode in (("decode", True), ("tokens", False))
        }
        params = checkpoint.load_model(workdir / "model").transformer_params
        rows.append(
            {
                "family": family,
                "train": timing,
                "quality": report,
                "sampling": sampled,
                "params": sum(x.size for x in jax.tree.leaves(params)),
            }
        )
        print(markdown(rows[-1:], args.batch), flush=True)
    common.write_results(out, rows, markdown(rows, args.batch))


if __name__ == "__main__":
    main()
