"""Zero-shot editing measured on the demo: in-paint the centre of validation images, per family.

    python -m mvar_jax.demo --out demo_out                                  # tokenizer, classifier
    python -m bench.bench_demo_table --demo_out demo_out --out bench_out/demo_table   # the models
    python -m bench.bench_editing --demo_out demo_out --models bench_out/demo_table --out bench_out/editing

For each family's model (``--models/<family>/model``), the first ``--per_class`` validation
images of every class have the centre box (``--box``, a quarter of the image) generated anew
(``sampling.editing``, in-painting) with three labels: the image's own class, the same colour
with the next shape, the same shape in the other colour. Reported: the share of results the
demo's classifier assigns to the asked class; PSNR outside the box against the tokenizer's
reconstruction of the input (what editing keeps is the reconstruction, up to the decoder's
reach across the box edge); images/s of the edit (batch ``--batch``, compiled, median of
``--reps``). Writes ``results.json``, ``results.md`` and ``<family>.png`` (per image of the first
class pairs: input | box | own class | next shape | other colour) to ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import time
from typing import Any

import jax
import numpy as np
import PIL.Image
from absl import flags

from bench import common
from bench.bench_demo_table import FAMILIES, load_config
from mvar_jax import checkpoint, cli, images as images_lib, sampling
from mvar_jax.data import builtin_shapes
from mvar_jax.eval import classifier as classifier_lib, image_metrics, quality
from mvar_jax.images import from_uint8
from mvar_jax.models import families

PROG = "python -m bench.bench_editing"
SHAPES = len(builtin_shapes.SHAPES)
TARGETS = {  # label -> the class asked for
    "own class": lambda label: label,
    "next shape": lambda label: label - label % SHAPES + (label + 1) % SHAPES,
    "other colour": lambda label: (label + SHAPES) % builtin_shapes.NUM_CLASSES,
}


def outside_box(side: int, keep_hw: np.ndarray) -> np.ndarray:
    """``(side, side)`` bool: the pixels of the kept tokens."""
    f = side // keep_hw.shape[0]
    return np.kron(keep_hw, np.ones((f, f))).astype(bool)


def edit_family(
    model_dir: pathlib.Path, data_cfg, judge, per_class: int, box: list[float], options, batch: int, reps: int
) -> dict[str, Any]:
    model = checkpoint.load_model(model_dir)
    images_u8, labels = classifier_lib.validation_images(data_cfg)
    chosen = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(data_cfg.num_classes)])
    images, labels = from_uint8(images_u8[chosen]), labels[chosen]
    grid = model.transformer_config.patch_nums[-1]
    keep_hw = sampling.editing.box_keep_mask(grid, box, inpaint=True)
    edit = sampling.editing.make_edit(model, images, keep_hw)
    recon = quality.reconstruct(model.vqvae_config, model.vqvae_params, images)
    kept_px = outside_box(images.shape[1], keep_hw)
    row: dict[str, Any] = {"family": model.transformer_config.family, "images": len(images)}
    shown = np.arange(0, len(images), per_class)[:4]  # the first image of 4 classes
    box_px = np.kron(1 - keep_hw, np.ones((images.shape[1] // grid,) * 2))[..., None].repeat(3, -1)
    columns = [images[shown], np.broadcast_to(box_px, images[shown].shape)]
    for name, target in TARGETS.items():
        asked = np.array([target(int(label)) for label in labels], np.int32)
        out = np.concatenate(
            [b[0] for b in sampling.sample_batches(model, asked, 0, options, batch_size=batch, edit=edit)]
        )
        predicted = classifier_lib.classifier_outputs(judge, out)[0].argmax(-1)
        psnr = image_metrics.psnr(out[:, kept_px][:, None], recon[:, kept_px][:, None], data_range=1.0)
        row[name] = {"accuracy": float(np.mean(predicted == asked)), "psnr_outside_db": float(np.mean(psnr))}
        columns.append(out[shown])
    row["picture"] = np.stack(columns, axis=1).reshape(-1, *images.shape[1:])  # rows: images
    # Speed: one compiled batch of edits, steady state.
    labels_b, edit_b = labels[:batch], sampling.Edit(*(np.asarray(x)[:batch] for x in edit))
    jax.block_until_ready(sampling.sample(model, labels_b, jax.random.PRNGKey(0), options, edit=edit_b))
    seconds = []
    for i in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(
            sampling.sample(model, labels_b, jax.random.PRNGKey(i + 1), options, edit=edit_b)
        )
        seconds.append(time.perf_counter() - start)
    row["images_per_s"] = len(labels_b) / statistics.median(seconds)
    return row


def markdown(rows: list[dict[str, Any]], options, box: list[float]) -> str:
    lines = [
        f"In-painting the centre box {box} (y0, x0, y1, x1) of {rows[0]['images']} validation images, "
        f"cfg {options.cfg}, top-k {options.top_k}, top-p {options.top_p}: the share the demo's classifier "
        "assigns to the asked class / PSNR outside the box against the tokenizer's reconstruction.",
        "",
        "| model | " + " | ".join(TARGETS) + " | edits/s |",
        "| --- |" + " ---: |" * (len(TARGETS) + 1),
    ]
    for r in rows:
        cells = [f"{100 * r[n]['accuracy']:.1f}% / {r[n]['psnr_outside_db']:.1f} dB" for n in TARGETS]
        lines.append(
            f"| {families.get(r['family']).title} | " + " | ".join(cells) + f" | {r['images_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


FLAGS = flags.FlagValues()
common.define_flags(FLAGS, smoke=None)
flags.DEFINE_string("demo_out", "demo_out", "the demo directory (its tokenizer and data)", flag_values=FLAGS)
flags.DEFINE_string(
    "models", "bench_out/demo_table", "bench_demo_table's --out: <family>/model", flag_values=FLAGS
)
flags.DEFINE_list("families", list(FAMILIES), f"of {tuple(FAMILIES)}", flag_values=FLAGS)
flags.DEFINE_list(
    "box", ["0.25", "0.25", "0.75", "0.75"], "y0,x0,y1,x1 of the generated box", flag_values=FLAGS
)
flags.DEFINE_integer("per_class", 10, "validation images per class", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_float("cfg", 1.5, "guidance (the demo's)", flag_values=FLAGS)
flags.DEFINE_integer("batch", 50, "images per compiled call", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("reps", 3, "timed calls", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string("classifier_cache", None, "default: the quality command's cache", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    demo_out, models = pathlib.Path(args.demo_out).absolute(), pathlib.Path(args.models)
    options = dataclasses.replace(quality.UNFILTERED, cfg=args.cfg)
    box = [float(v) for v in args.box]
    cache = pathlib.Path(args.classifier_cache) if args.classifier_cache else quality.default_cache_dir()
    rows = []
    for family in args.families:
        model_dir = models / family / "model"
        if not model_dir.is_dir():
            cli.usage_error(PROG, f"{model_dir} is missing: run bench.bench_demo_table first")
        data_cfg = load_config(family, demo_out, None).data
        data_cfg.token_cache_dir = None  # the judge reads images
        judge = classifier_lib.load_or_train_classifier(cache, data_cfg)
        rows.append(
            edit_family(model_dir, data_cfg, judge, args.per_class, box, options, args.batch, args.reps)
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "picture"}), flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        grid = images_lib.image_grid(row.pop("picture"), columns=2 + len(TARGETS))
        PIL.Image.fromarray(grid).save(out / f"{row['family']}.png")
    common.write_results(out, {"header": common.header(), "rows": rows}, markdown(rows, options, box))


if __name__ == "__main__":
    main()
