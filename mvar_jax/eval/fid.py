"""Score a sample batch as the MVAR / VAR / M-VAR papers do: FID, sFID, Inception Score, precision, recall.

    python -m mvar_jax.eval.fid --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth --out metrics.json

The numbers are those of OpenAI's guided-diffusion evaluator (``evaluator.py``, also shipped
by MVAR): Inception-v3 of the 2015 TensorFlow graph (``mvar_jax.models.inception``), its
reference-batch statistics where the reference has them, its Inception Score splits (of a
shuffled order unless ``--shuffle_seed=-1``: see ``metrics.inception_score``) and its float16
nearest-neighbour precision and recall. ``--samples``: ``arr_0`` (N, H, W, 3) uint8 or
floats in [0, 255], as ``sample.py --fid_npz`` writes. ``--ref``: the same, with or without
``mu``/``sigma``/``mu_s``/``sigma_s``, or those statistics alone (then no precision/recall).
``--inception``: pytorch-fid's / torch-fidelity's ``pt_inception-2015-12-05`` weights file.

Features run in batches of ``--batch_size`` images split over every local device. The JSON
holds the five numbers, the image counts, and the versions that produced them.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import sys
from collections.abc import Sequence

import jax
import numpy as np
from absl import flags

import mvar_jax
from mvar_jax import cli
from mvar_jax.atomic_write import atomic_write
from mvar_jax.errors import CheckpointError
from mvar_jax.eval import metrics, precision_recall
from mvar_jax.eval.batches import ImageBatch, NpzError, read_reference
from mvar_jax.eval.features import FeatureExtractor
from mvar_jax.models.inception import InceptionOutputs
from mvar_jax.weights.inception import load_inception

PROG = "python -m mvar_jax.eval.fid"
FLAGS = flags.FlagValues()
flags.DEFINE_string(
    "samples", None, "sample batch .npz (arr_0: N x H x W x 3 in [0, 255])", flag_values=FLAGS
)
flags.DEFINE_string(
    "ref", None, "reference batch .npz (arr_0 and/or mu, sigma, mu_s, sigma_s)", flag_values=FLAGS
)
flags.DEFINE_string("inception", None, "pt_inception-2015-12-05 state dict (.pth)", flag_values=FLAGS)
flags.DEFINE_string("out", None, "metrics JSON to write", flag_values=FLAGS)
flags.DEFINE_integer(
    "batch_size", 64, "images per Inception call, over all devices", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_integer(
    "shuffle_seed",
    0,
    "the Inception Score splits runs of 5000 samples of a random order drawn with this seed "
    "(a file written class by class would cap it near 100); -1 keeps the file's order",
    lower_bound=-1,
    flag_values=FLAGS,
)
for _name in ("samples", "ref", "inception", "out"):
    flags.mark_flag_as_required(_name, flag_values=FLAGS)


def _check_inputs(samples: ImageBatch, ref_images: ImageBatch | None) -> None:
    if ref_images is None:
        return
    if ref_images.image_size != samples.image_size:
        (rh, rw), (sh, sw) = ref_images.image_size, samples.image_size
        raise NpzError(
            f"the reference batch is {rh}x{rw} px and the samples {sh}x{sw} px: score against a "
            "reference of the samples' resolution"
        )
    need = precision_recall.K + 1
    if min(len(samples), len(ref_images)) < need:
        raise NpzError(
            f"precision/recall needs at least {need} images in each batch (each with "
            f"{precision_recall.K} neighbours): {len(samples)} samples, {len(ref_images)} reference images"
        )


def evaluate(
    samples_path: str | os.PathLike,
    ref_path: str | os.PathLike,
    inception_path: str | os.PathLike,
    batch_size: int,
    shuffle_seed: int | None = 0,
) -> dict:
    """The metrics dict that ``main`` writes. Unfit inputs raise ``NpzError``,
    ``CheckpointError`` or ``FileNotFoundError``: before any feature is computed, but for
    float pixel values, checked batch by batch as they are read."""
    samples = ImageBatch(samples_path)
    ref_images, ref_stats = read_reference(ref_path)
    _check_inputs(samples, ref_images)
    extract = FeatureExtractor(load_inception(inception_path), batch_size)

    def features(batch: ImageBatch, desc: str) -> InceptionOutputs:
        return extract(batch.batches(extract.batch_size), len(batch), desc)

    sample_features = features(samples, "samples")
    ref_features = None if ref_images is None else features(ref_images, "reference")
    if ref_stats is not None:
        ref_pool = metrics.GaussianStats(ref_stats["mu"], ref_stats["sigma"])
        ref_spatial = metrics.GaussianStats(ref_stats["mu_s"], ref_stats["sigma_s"])
    else:
        ref_pool = metrics.gaussian_stats(ref_features.pool_BF)
        ref_spatial = metrics.gaussian_stats(ref_features.spatial_BS)
    precision = recall = None
    if ref_features is not None:
        precision, recall = precision_recall.precision_recall(ref_features.pool_BF, sample_features.pool_BF)
    return {
        "inception_score": metrics.inception_score(sample_features.logits_BK, shuffle_seed=shuffle_seed),
        "inception_score_order": "file" if shuffle_seed is None else f"shuffled, seed {shuffle_seed}",
        "fid": metrics.frechet_distance(metrics.gaussian_stats(sample_features.pool_BF), ref_pool),
        "sfid": metrics.frechet_distance(metrics.gaussian_stats(sample_features.spatial_BS), ref_spatial),
        "precision": precision,
        "recall": recall,
        "num_samples": len(samples),
        "num_reference": None if ref_images is None else len(ref_images),
        "reference_statistics": "from the file" if ref_stats is not None else "computed",
        "image_size": list(samples.image_size),
        "samples": str(samples_path),
        "reference": str(ref_path),
        "inception": str(inception_path),
        "devices": extract.mesh.size,
        "versions": {
            "mvar_jax": mvar_jax.__version__,
            "jax": jax.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        shuffle_seed = None if args.shuffle_seed < 0 else args.shuffle_seed
        result = evaluate(args.samples, args.ref, args.inception, args.batch_size, shuffle_seed)
    except (NpzError, CheckpointError, FileNotFoundError) as e:
        cli.usage_error(PROG, str(e))
    with atomic_write(out) as f:
        f.write((json.dumps(result, indent=2) + "\n").encode())
    for name in ("inception_score", "fid", "sfid", "precision", "recall"):
        print(f"{name}: {result[name]}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
