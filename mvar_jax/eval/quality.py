"""How well a class-conditional generator draws the classes it is asked for, measured.

A small CNN trained on the dataset's train split judges the samples:

- class accuracy: the share of samples of each requested class that it assigns
  to that class (per class, and their mean);
- a Fréchet distance between its penultimate features of samples and of the
  validation images, with two reference points drawn the same way with the same
  sample count: training images (what a perfect model of the training
  distribution scores: the sampling-noise floor) and their reconstructions by
  the model's own tokenizer (the floor a generator over that tokenizer can reach);
- the tokenizer's reconstruction PSNR on the validation images.

The classifier is trained once per dataset resolution and configuration and
cached as an ``.npz`` whose name holds both, so a stale cache is never reused.

    python -m mvar_jax.eval.quality --checkpoint demo_out/model --out demo_out/report.json

writes ``report.json`` and ``report.md`` (a short table). From Python:
``evaluate_model(model_dir, classifier_cache=DIR)`` returns the same dict. Flags are absl's
(see ``mvar_jax.cli``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from mvar_jax import checkpoint, cli, data, sampling
from mvar_jax.atomic_write import atomic_write
from mvar_jax.data import builtin_shapes
from mvar_jax.errors import CheckpointError
from mvar_jax.eval import image_metrics, metrics
from mvar_jax.eval.classifier import (
    FEATURE_BATCH,
    TrainedClassifier,
    classifier_outputs,
    generated_class_accuracy,
    load_or_train_classifier,
    map_batches,
    pm1,
    train_images,
    validation_images,
)
from mvar_jax.images import from_uint8
from mvar_jax.models import families
from mvar_jax.models.vqvae import VQVAE, VQVAEConfig


# Bump when the classifier or its training changes in a way ClassifierConfig does not show.
@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(vqvae_config: VQVAEConfig, vqvae_params: Any, img_BHW3: jax.Array) -> jax.Array:
    vqvae = VQVAE(vqvae_config)
    ids = vqvae.apply(vqvae_params, img_BHW3, method=VQVAE.img_to_idx)
    return (vqvae.apply(vqvae_params, ids, method=VQVAE.idx_to_img) + 1) * 0.5


def reconstruct(
    vqvae_config: VQVAEConfig, vqvae_params: Any, images_01: np.ndarray, batch_size: int = FEATURE_BATCH
) -> np.ndarray:
    """Images ``(N, H, W, 3)`` in [0, 1] through the tokenizer's tokens and back, in [0, 1]."""
    images_01 = np.asarray(images_01)
    s = vqvae_config.image_size
    if images_01.ndim != 4 or images_01.shape[1:] != (s, s, 3):
        raise ValueError(
            f"the tokenizer (patch_nums {vqvae_config.patch_nums}) encodes "
            f"{s}x{s} RGB images; got images of shape {images_01.shape}"
        )
    fn = functools.partial(_reconstruct, vqvae_config, vqvae_params)
    return map_batches(lambda x: fn(pm1(x)), images_01, batch_size)


def tokenizer_psnr(
    vqvae_config: VQVAEConfig,
    vqvae_params: Any,
    data_cfg: ml_collections.ConfigDict | None = None,
    num_images: int | None = None,
) -> float:
    """Mean per-image PSNR (dB) of the tokenizer's reconstructions of the validation split.

    ``num_images``: only the split's first ones (all by default), for a quick look.
    """
    data_cfg = data.default_config() if data_cfg is None else data_cfg
    check_resolution(vqvae_config.image_size, data_cfg, "the tokenizer")
    images = from_uint8(validation_images(data_cfg)[0][:num_images])
    recon = reconstruct(vqvae_config, vqvae_params, images, min(len(images), FEATURE_BATCH))
    return float(np.mean(image_metrics.psnr(recon, images, data_range=1.0)))


def check_resolution(image_size: int, data_cfg: ml_collections.ConfigDict, what: str) -> None:
    """ValueError naming both sizes unless ``what`` makes images of the dataset's size."""
    if image_size != int(data_cfg.image_size):
        raise ValueError(
            f"{what} makes {image_size}x{image_size} px images but the dataset and its "
            f"classifier are {data_cfg.image_size}x{data_cfg.image_size} px (data.image_size, "
            "--image_size on the command line); evaluate it against data at its own resolution"
        )


def check_generator(
    model: checkpoint.ModelBundle, data_cfg: ml_collections.ConfigDict, labels: Sequence[int] | None = None
) -> list[int]:
    """The labels to evaluate (default: every class); ValueError if the model does not fit the data.

    Checks the resolution (both sizes named), the number of classes, and that
    ``labels`` are among the model's classes.
    """
    check_resolution(model.vqvae_config.image_size, data_cfg, "the model")
    num_classes = model.transformer_config.num_classes
    if num_classes != int(data_cfg.num_classes):
        raise ValueError(
            f"the model has {num_classes} classes but the dataset "
            f"{data_cfg.name!r} has {data_cfg.num_classes} (data.num_classes)"
        )
    labels = list(range(num_classes)) if labels is None else [int(c) for c in labels]
    bad = sorted({c for c in labels if not 0 <= c < num_classes})
    if bad:
        raise ValueError(f"labels {bad} are outside the model's classes 0..{num_classes - 1}")
    if not labels:
        raise ValueError("no labels to evaluate")
    return labels


def load_generator(
    model_dir: str | os.PathLike, data_cfg: ml_collections.ConfigDict, labels: Sequence[int] | None = None
) -> tuple[checkpoint.ModelBundle, list[int]]:
    """``checkpoint.load_model`` plus ``check_generator``: a model and the labels to evaluate.

    Raises CheckpointError (a missing or unreadable directory, a tokenizer
    directory) or ValueError (a model that does not fit the data).
    """
    model = checkpoint.load_model(model_dir)
    return model, check_generator(model, data_cfg, labels)


# The model's own distribution: no top-k or top-p filtering.
UNFILTERED = sampling.SamplingOptions(top_k=0, top_p=0.0)


def class_names(data_cfg: ml_collections.ConfigDict) -> list[str]:
    """Names of the dataset's classes (the built-in dataset's, else ``class <i>``)."""
    if data_cfg.name == "builtin_shapes":
        return list(builtin_shapes.CLASS_NAMES)
    return [f"class {c}" for c in range(int(data_cfg.num_classes))]


def evaluate_generator(
    model: checkpoint.ModelBundle,
    classifier: TrainedClassifier,
    data_cfg: ml_collections.ConfigDict,
    *,
    labels: Sequence[int] | None = None,
    num_per_class: int = 50,
    options: sampling.SamplingOptions = UNFILTERED,
    seed: int = 0,
    batch_size: int = 50,
    progress: bool = True,
) -> dict[str, Any]:
    """Samples ``num_per_class`` images of each label and measures them; the report dict.

    ``options``: how to sample; by default the model's own distribution
    (``UNFILTERED``: cfg 1.5, no top-k or top-p), which is what the class
    accuracy and the Fréchet distance should judge.

    Everything is measured on the classes in ``labels``: the Fréchet distances
    compare with their validation images; the floors use as many training
    images per class as there are samples (always the same ones: drawn with
    seed 0), as they are and through the model's tokenizer; the PSNR and the
    classifier's accuracy on reconstructions are over their validation images.
    """
    labels = check_generator(model, data_cfg, labels)
    if (classifier.image_size, classifier.num_classes) != (
        int(data_cfg.image_size),
        int(data_cfg.num_classes),
    ):
        raise ValueError(
            f"the classifier judges {classifier.num_classes} classes at {classifier.image_size} "
            f"px, the data config has {data_cfg.num_classes} at {data_cfg.image_size} px"
        )
    if num_per_class < 1 or num_per_class * len(labels) < 2:
        raise ValueError(
            f"num_per_class={num_per_class} with {len(labels)} labels: "
            "the Fréchet distance needs at least 2 samples"
        )
    labels_N = np.repeat(np.asarray(labels, np.int32), num_per_class)
    start = time.perf_counter()
    batches = sampling.sample_batches(
        model, labels_N, seed, options, batch_size=batch_size, progress=progress
    )
    generated = np.concatenate([images for images, _ in batches])
    sampling_seconds = time.perf_counter() - start

    if progress:
        print("measuring: classifier features, tokenizer reconstructions", flush=True)
    val_u8, val_labels = validation_images(data_cfg)
    keep = np.isin(val_labels, labels)
    val, val_labels = from_uint8(val_u8[keep]), val_labels[keep]
    val_recon = reconstruct(model.vqvae_config, model.vqvae_params, val)
    train = from_uint8(train_images(data_cfg, labels, num_per_class, seed=0)[0])
    features = {
        name: classifier_outputs(classifier, images)[1]
        for name, images in (
            ("generated", generated),
            ("train", train),
            ("reconstruction", reconstruct(model.vqvae_config, model.vqvae_params, train)),
            ("validation", val),
        )
    }
    stats = {name: metrics.gaussian_stats(f) for name, f in features.items()}
    fd = {
        name: metrics.frechet_distance(stats[name], stats["validation"])
        for name in ("generated", "reconstruction", "train")
    }

    accuracy = generated_class_accuracy(classifier, generated, labels_N)
    names = class_names(data_cfg)
    return {
        "model": {
            "family": model.transformer_config.family,
            "depth": model.transformer_config.depth,
            "image_size": model.vqvae_config.image_size,
            "num_classes": model.transformer_config.num_classes,
        },
        "settings": {
            "cfg": options.cfg,
            "top_k": options.top_k,
            "top_p": options.top_p,
            "num_per_class": num_per_class,
            "seed": seed,
            "batch_size": batch_size,
            "labels": labels,
        },
        "class_accuracy": {
            "mean": accuracy["mean"],
            "per_class": {names[c]: accuracy["per_class"][c] for c in labels},
        },
        "frechet_distance": {
            "generated": fd["generated"],
            "reconstruction_floor": fd["reconstruction"],
            "train_floor": fd["train"],
            "ratio_to_reconstruction_floor": fd["generated"] / fd["reconstruction"],
            "num_samples": len(generated),
            "num_reference": len(features["validation"]),
            "feature_dim": classifier.config.feature_dim,
        },
        "tokenizer": {
            "psnr_db": float(np.mean(image_metrics.psnr(val_recon, val, data_range=1.0))),
            "reconstruction_class_accuracy": generated_class_accuracy(classifier, val_recon, val_labels)[
                "mean"
            ],
        },
        "classifier": {
            "val_accuracy": classifier.val_accuracy,
            "train_cpu_seconds": classifier.train_cpu_seconds,
            "config": dataclasses.asdict(classifier.config),
        },
        "sampling_wall_seconds": sampling_seconds,  # compilation included
    }


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as two short markdown tables: the headline figures, then accuracy per class."""
    s, fd, tok = report["settings"], report["frechet_distance"], report["tokenizer"]
    m = report["model"]
    per_class = report["class_accuracy"]["per_class"]
    rows = [
        ("mean class accuracy", _percent(report["class_accuracy"]["mean"])),
        (
            "Fréchet distance, samples vs validation",
            f"{fd['generated']:.3f} ({fd['ratio_to_reconstruction_floor']:.2f}x the reconstruction floor)",
        ),
        ("floor: tokenizer reconstructions vs validation", f"{fd['reconstruction_floor']:.3f}"),
        ("floor: training images vs validation", f"{fd['train_floor']:.3f}"),
        ("tokenizer PSNR (validation)", f"{tok['psnr_db']:.2f} dB"),
        ("class accuracy of tokenizer reconstructions", _percent(tok["reconstruction_class_accuracy"])),
        ("classifier held-out accuracy", _percent(report["classifier"]["val_accuracy"])),
    ]
    lines = [
        f"{families.get(m['family']).title} depth {m['depth']}, {m['image_size']} px: "
        f"{fd['num_samples']} samples ({s['num_per_class']} per class), cfg {s['cfg']}, "
        f"top-k {s['top_k']}, top-p {s['top_p']}, seed {s['seed']}; Fréchet distances on the "
        f"classifier's {fd['feature_dim']} features against {fd['num_reference']} validation "
        "images.",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        "| " + " | ".join(per_class) + " |",
        "|" + " --- |" * len(per_class),
        "| " + " | ".join(_percent(a) for a in per_class.values()) + " |",
    ]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], json_path: str | os.PathLike) -> pathlib.Path:
    """Writes ``report`` to ``json_path`` and its tables beside it (``.md``); returns the latter."""
    json_path = pathlib.Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path = json_path.with_suffix(".md")
    for path, text in ((json_path, json.dumps(report, indent=1) + "\n"), (md_path, report_markdown(report))):
        with atomic_write(path) as f:  # whole or absent, if the run is killed
            f.write(text.encode())
    return md_path


def evaluate_model(
    model_dir: str | os.PathLike,
    *,
    classifier_cache: str | os.PathLike,
    data_cfg: ml_collections.ConfigDict | None = None,
    labels: Sequence[int] | None = None,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Loads and checks a generator model directory, then ``evaluate_generator`` (which
    takes ``settings``: num_per_class, options, seed, batch_size).

    The model is checked against the data before the classifier is trained or
    loaded, so a wrong model fails fast. ``data_cfg`` defaults to
    ``data.default_config()`` (the built-in dataset, 64 px).
    """
    data_cfg = data.default_config() if data_cfg is None else data_cfg
    model, labels = load_generator(model_dir, data_cfg, labels)
    classifier = load_or_train_classifier(classifier_cache, data_cfg, progress=progress)
    report = evaluate_generator(model, classifier, data_cfg, labels=labels, progress=progress, **settings)
    report["model"]["directory"] = str(pathlib.Path(model_dir).absolute())
    return report


def default_cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/mvar_jax`` (``~/.cache/mvar_jax``): where the CLI keeps classifiers."""
    return cli.user_cache_dir()


PROG = "python -m mvar_jax.eval.quality"
FLAGS = flags.FlagValues()  # this command's own, so that tests can import several commands
cli.define_checkpoint_flag(FLAGS)
flags.DEFINE_string(
    "out",
    None,
    "report FILE.json; the markdown tables go to FILE.md beside it",
    required=True,
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "classifier_cache",
    None,
    "directory of trained classifiers (default: $XDG_CACHE_HOME/mvar_jax or ~/.cache/mvar_jax)",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)", flag_values=FLAGS
)
flags.DEFINE_integer(
    "image_size", None, "dataset resolution (default: the model's)", lower_bound=1, flag_values=FLAGS
)
cli.define_sampling_flags(
    FLAGS,
    batch_size=50,
    why="0 here, not sample.py's FID setting: the report judges the model's own distribution",
    top_k=UNFILTERED.top_k,
    top_p=UNFILTERED.top_p,
)
flags.DEFINE_integer(
    "num_per_class",
    50,
    "samples per label (the validation split's count)",
    lower_bound=1,
    flag_values=FLAGS,
)


def main(argv: Sequence[str] | None = None) -> int:
    cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    out = pathlib.Path(FLAGS.out)
    if out.suffix != ".json":
        cli.usage_error(PROG, f"--out must end in .json, got {out}")
    options = cli.sampling_options(FLAGS, PROG)
    data_cfg = data.default_config()
    try:  # The model is checked before anything slow runs.
        image_size = FLAGS.image_size or checkpoint.read_vqvae_config(FLAGS.checkpoint).image_size
        data_cfg.update(image_size=image_size, data_dir=FLAGS.data_dir)
        report = evaluate_model(
            FLAGS.checkpoint,
            classifier_cache=FLAGS.classifier_cache or default_cache_dir(),
            data_cfg=data_cfg,
            labels=FLAGS.labels,
            num_per_class=FLAGS.num_per_class,
            options=options,
            seed=FLAGS.seed,
            batch_size=FLAGS.batch_size,
        )
    except (CheckpointError, ValueError, OSError) as e:
        cli.usage_error(PROG, str(e))
    md_path = write_report(report, out)
    print(report_markdown(report))
    print(f"wrote {out} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
