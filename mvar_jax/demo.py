"""The main job, end to end on the built-in dataset: ``make demo`` (``python -m mvar_jax.demo``).

    python -m mvar_jax.demo --out demo_out

Stages, each skipped when its output is whole (so a second run resumes where the
first stopped, or reports the demo complete):

  1. data       the built-in shapes dataset at 32 px, drawn locally (TFDS data dir)
  2. tokenizer  configs/vqvae_tiny_cpu.py trained into OUT/tokenizer (model: OUT/tokenizer/model)
  3. tokens     the train split's token ids under that tokenizer: OUT/tokens
  4. generator  configs/tiny_cpu.py (MVAR) trained on those tokens into OUT (model: OUT/model)
  5. samples    a labelled grid, OUT/samples.png (sample.py, two images per class)
  6. report     class accuracy, Fréchet distance, tokenizer PSNR: OUT/report.json + report.md

The two training stages resume from their checkpoints when interrupted. The judge
of the report (``mvar_jax.eval.quality``'s classifier) is trained once and cached in
``--classifier_cache`` (default ``~/.cache/mvar_jax``, shared with
``python -m mvar_jax.eval.quality``). A stage whose input was rebuilt after its output
was made runs again (its output is older than its input), as in make.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import ml_collections
from absl import flags

from mvar_jax import cli, compilation_cache
from mvar_jax.data import records, token_cache
from mvar_jax.eval import quality
from mvar_jax.models.vqvae import VQVAE
from mvar_jax.training import generator, trainer, workdir

REPO = pathlib.Path(__file__).resolve().parent.parent  # configs/ and sample.py live here
GRID_PER_CLASS = 2
REPORT_NUM_PER_CLASS = 50  # the validation split's count per class


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the demo: ``done()`` says whether ``output`` is whole and current."""

    name: str
    output: pathlib.Path
    done: Callable[[], bool]
    run: Callable[[], None]


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (all threads)."""
    own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_stages(stages: Sequence[Stage], log: Callable[[str], None] = print) -> list[str]:
    """Runs the stages that are not done, in order; returns the names of those it ran.

    A stage that is still not done after running is an error: the next stage
    would read a partial output.
    """
    ran = []
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    for i, stage in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {stage.name}"
        if stage.done():
            log(f"{head}: done already ({stage.output})")
            continue
        log(f"{head}: running -> {stage.output}")
        wall, cpu = time.perf_counter(), _cpu_seconds()
        stage.run()
        if not stage.done():
            raise RuntimeError(f"demo stage {stage.name!r} finished without a whole {stage.output}")
        log(f"{head}: finished in {time.perf_counter() - wall:.0f} s ({_cpu_seconds() - cpu:.0f} CPU-s)")
        ran.append(stage.name)
    total = f"{time.perf_counter() - wall0:.0f} s ({_cpu_seconds() - cpu0:.0f} CPU-s)"
    log(f"demo complete ({'ran ' + ', '.join(ran) + ' in ' + total if ran else 'nothing to do'})")
    return ran


def _newer(output: pathlib.Path, *inputs: pathlib.Path) -> bool:
    """Whether ``output`` exists and is at least as new as each of ``inputs``."""
    return output.exists() and all(output.stat().st_mtime >= p.stat().st_mtime for p in inputs)


def _config(module: str, data_dir: str | None) -> ml_collections.ConfigDict:
    """``configs/<module>.py``'s config (its default variant) reading the data from ``data_dir``."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    config = importlib.import_module(f"mvar_jax.configs.{module}").get_config()
    config.data.data_dir = data_dir
    return config


def _trained(model_dir: pathlib.Path, config: ml_collections.ConfigDict) -> bool:
    """Whether ``model_dir`` holds the export of a finished run of ``config``."""
    return workdir.exported_step(model_dir) == trainer.total_steps(config)


def _token_cache_done(cache_dir: pathlib.Path, tokenizer_model: pathlib.Path) -> bool:
    try:
        token_cache.TokenCache(cache_dir, "train")
    except FileNotFoundError:
        return False
    return _newer(cache_dir / "train" / "meta.json", tokenizer_model / workdir.EXPORTED_STEP)


def _write_token_cache(config: ml_collections.ConfigDict) -> None:
    """The train split's ids under the demo tokenizer; a cache of an older tokenizer is replaced."""
    cache_dir = pathlib.Path(config.data.token_cache_dir)
    meta = cache_dir / "train" / "meta.json"
    if meta.exists() and not _newer(meta, pathlib.Path(config.vqvae_checkpoint) / workdir.EXPORTED_STEP):
        shutil.rmtree(cache_dir)  # made by a tokenizer since retrained
    vqvae_config, params = generator.load_tokenizer(config.vqvae_checkpoint, config.model.patch_nums)
    encode = token_cache.sharded_encoder(token_cache.vqvae_tokenize(VQVAE(vqvae_config)), params)
    print(f"encoding the train split with {config.vqvae_checkpoint} ...", flush=True)
    token_cache.write_token_cache(config.data, encode, cache_dir, "train", batch_size=100, chunk_size=1000)


def _train(config: ml_collections.ConfigDict, directory: pathlib.Path) -> None:
    trainer.train_and_evaluate(config, directory)


def _sample_grid(model: pathlib.Path, num_classes: int, path: pathlib.Path) -> None:
    """``sample.py`` as the README shows it, ``GRID_PER_CLASS`` images of every class."""
    labels = ",".join(str(c) for c in range(num_classes))
    subprocess.run(
        [
            sys.executable,
            str(REPO / "sample.py"),
            "--checkpoint",
            str(model),
            "--labels",
            labels,
            "--num_per_class",
            str(GRID_PER_CLASS),
            "--cfg",
            str(quality.UNFILTERED.cfg),
            "--top_k",
            str(quality.UNFILTERED.top_k),
            "--top_p",
            str(quality.UNFILTERED.top_p),
            "--seed",
            "0",
            "--out",
            str(path),
        ],
        check=True,
    )


def _report(
    model: pathlib.Path,
    data_cfg: ml_collections.ConfigDict,
    classifier_cache: pathlib.Path,
    path: pathlib.Path,
) -> None:
    data_cfg = data_cfg.copy_and_resolve_references()
    data_cfg.token_cache_dir = None  # the judge reads images
    report = quality.evaluate_model(
        model,
        classifier_cache=classifier_cache,
        data_cfg=data_cfg,
        num_per_class=REPORT_NUM_PER_CLASS,
    )
    md = quality.write_report(report, path)
    print(quality.report_markdown(report), flush=True)
    print(f"wrote {path} and {md}")


def demo_stages(out: pathlib.Path, *, data_dir: str | None, classifier_cache: pathlib.Path) -> list[Stage]:
    """The demo's stages writing under ``out`` (see the module docstring)."""
    out = out.absolute()
    tokenizer_model = out / "tokenizer" / "model"
    tokenizer_config = _config("vqvae_tiny_cpu", data_dir)
    generator_config = _config("tiny_cpu", data_dir)
    generator_config.vqvae_checkpoint = str(tokenizer_model)
    generator_config.data.token_cache_dir = str(out / "tokens")
    model = out / "model"
    exported = model / workdir.EXPORTED_STEP
    samples, report = out / "samples.png", out / "report.json"
    size = int(generator_config.data.image_size)

    return [
        Stage(
            "data",
            pathlib.Path(data_dir or "~/tensorflow_datasets") / "builtin_shapes",
            lambda: records.builtin_prepared(data_dir, size),
            lambda: records.prepare("builtin_shapes", data_dir, image_size=size),
        ),
        Stage(
            "tokenizer",
            tokenizer_model,
            lambda: _trained(tokenizer_model, tokenizer_config),
            lambda: _train(tokenizer_config, out / "tokenizer"),
        ),
        Stage(
            "tokens",
            out / "tokens",
            lambda: _token_cache_done(out / "tokens", tokenizer_model),
            lambda: _write_token_cache(generator_config),
        ),
        Stage(
            "generator",
            model,
            lambda: _trained(model, generator_config),
            lambda: _train(generator_config, out),
        ),
        Stage(
            "samples",
            samples,
            lambda: _newer(samples, exported),
            lambda: _sample_grid(model, generator_config.data.num_classes, samples),
        ),
        Stage(
            "report",
            report,
            lambda: _newer(report, exported),
            lambda: _report(model, generator_config.data, classifier_cache, report),
        ),
    ]


PROG = "python -m mvar_jax.demo"
FLAGS = flags.FlagValues()  # this command's own, so that tests can import several commands
flags.DEFINE_string("out", "demo_out", "output directory", flag_values=FLAGS)
flags.DEFINE_string(
    "data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)", flag_values=FLAGS
)
flags.DEFINE_string(
    "classifier_cache",
    None,
    "where the judge is trained once and kept (default: $XDG_CACHE_HOME/mvar_jax or ~/.cache/mvar_jax)",
    flag_values=FLAGS,
)
cli.define_compilation_cache_flag(FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    compilation_cache.enable(args.compilation_cache)
    classifier_cache = (
        pathlib.Path(args.classifier_cache) if args.classifier_cache else quality.default_cache_dir()
    )
    run_stages(
        demo_stages(
            pathlib.Path(args.out),
            data_dir=args.data_dir or os.environ.get("TFDS_DATA_DIR"),
            classifier_cache=classifier_cache,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
