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

    python -m mvar_jax.quality --checkpoint demo_out/model --out demo_out/report.json

writes ``report.json`` and ``report.md`` (a short table). From Python:
``evaluate_model(model_dir, classifier_cache=DIR)`` returns the same dict. Flags are absl's
(see ``mvar_jax.cli``); the dashed spellings of earlier versions (``--samples-per-class``)
still work.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from flax import linen as nn, traverse_util
from tqdm import tqdm

from mvar_jax import checkpoint, cli, data, sampling
from mvar_jax.atomic_write import atomic_write
from mvar_jax.data import builtin_shapes
from mvar_jax.torch_checkpoint import CheckpointError
from mvar_jax.transformer import MODEL_NAMES
from mvar_jax.vqvae import VQVAE, VQVAEConfig

# Bump when the classifier or its training changes in a way ClassifierConfig does not show.
CLASSIFIER_VERSION = 1
MIN_CLASSIFIER_ACCURACY = 0.98  # held-out accuracy below which the judge is not trusted
_FEATURE_BATCH = 100  # images per compiled classifier / tokenizer call


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """The judge's architecture and training recipe; every field enters the cache key."""

    widths: tuple[int, ...] = (16, 32, 64, 64)  # conv channels; the first conv has stride 2
    feature_dim: int = 64  # the penultimate layer: the Fréchet distance's features
    batch_size: int = 64
    num_steps: int = 800
    learning_rate: float = 5e-3
    weight_decay: float = 1e-4
    seed: int = 0
    # Training-time degradation (see `degrade`): box-downsampling factors drawn
    # with the identity, and the largest noise std (images in [0, 1]).
    blur_factors: tuple[int, ...] = (2, 4)
    # Factors that would leave fewer pixels a side are not drawn: at 32 px a 4x blur
    # (8x8 pixels) no longer tells a star from a circle, and the judge stalls below 85%.
    min_blurred_size: int = 16
    max_noise: float = 0.1

    def blur_factors_at(self, image_size: int) -> tuple[int, ...]:
        return tuple(f for f in self.blur_factors if image_size // f >= self.min_blurred_size)


class Classifier(nn.Module):
    """Images ``(B, H, W, 3)`` in [-1, 1] -> (logits ``(B, K)``, features ``(B, F)``).

    A stride-2 conv, then 3x3 convs with 2x average pooling between them, the
    global mean and max of each channel (any resolution; the max finds a small
    shape's corners and tips, which a mean alone washes out), and a ReLU layer
    whose output is the feature.
    """

    config: ClassifierConfig
    num_classes: int

    @nn.compact
    def __call__(self, img_BHW3: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = img_BHW3
        for i, width in enumerate(self.config.widths):
            if i >= 2:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
            x = nn.relu(nn.Conv(width, (3, 3), strides=2 if i == 0 else 1)(x))
        # (B, 2 * C): the mean and the max over the map.
        pooled = jnp.concatenate([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))], -1)
        features_BF = nn.relu(nn.Dense(self.config.feature_dim)(pooled))
        return nn.Dense(self.num_classes)(features_BF), features_BF


class TrainedClassifier(NamedTuple):
    """A trained judge and how it was made."""

    config: ClassifierConfig
    num_classes: int
    image_size: int
    params: Any  # {'params': ...}
    val_accuracy: float  # on the validation split
    train_cpu_seconds: float  # process CPU time of the training run (all threads)


def _data_fields(data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """What of the data config decides the classifier (not where the data lives)."""
    return {
        "name": data_cfg.name,
        "image_size": int(data_cfg.image_size),
        "crop": data_cfg.crop,
        "mid_reso": float(data_cfg.mid_reso),
        "num_classes": int(data_cfg.num_classes),
        # The built-in images change with the dataset's version (not with its name).
        "dataset_version": str(builtin_shapes.BuiltinShapes.VERSION)
        if "builtin_shapes" in data_cfg.name
        else None,
    }


def classifier_cache_path(
    cache_dir: str | os.PathLike,
    data_cfg: ml_collections.ConfigDict,
    config: ClassifierConfig = ClassifierConfig(),
) -> pathlib.Path:
    """``cache_dir/classifier-<dataset>-res<S>-<hash>.npz``; the hash covers every setting."""
    key = json.dumps(
        {
            "version": CLASSIFIER_VERSION,
            "data": _data_fields(data_cfg),
            "classifier": dataclasses.asdict(config),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = data_cfg.name.replace(":", "-").replace("/", "-")
    return pathlib.Path(cache_dir) / f"classifier-{name}-res{data_cfg.image_size}-{digest}.npz"


def _source_config(data_cfg: ml_collections.ConfigDict, **overrides: Any) -> ml_collections.ConfigDict:
    """A copy of ``data_cfg`` reading images (never a token cache), with ``overrides``."""
    cfg = data_cfg.copy_and_resolve_references()
    cfg.update(token_cache_dir=None, **overrides)
    return cfg


def validation_images(data_cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """The whole validation split: ``(N, H, W, 3)`` uint8 (eval crop) and ``(N,)`` int32 labels."""
    source = data.build_eval_source(
        _source_config(data_cfg), global_batch_size=100, process_index=0, process_count=1
    )
    batches = [next(source) for _ in range(source.num_batches)]
    source.close()
    mask = np.concatenate([b["mask"] for b in batches])
    return (
        np.concatenate([b["image"] for b in batches])[mask],
        np.concatenate([b["label"] for b in batches])[mask],
    )


def train_images(
    data_cfg: ml_collections.ConfigDict, labels: Sequence[int], per_class: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` training images of each of ``labels``, as a generator is trained on them.

    They come from the training source (random crop, and flips if the config
    has them), in its shuffled order: ``(N, H, W, 3)`` uint8 and ``(N,)`` int32.
    """
    wanted = {int(c): per_class for c in labels}
    source = data.build_train_source(
        _source_config(data_cfg), global_batch_size=100, process_index=0, process_count=1, seed=seed
    )
    images, kept = [], []
    for _ in range(-(-source.num_examples // 100)):  # one epoch at most
        if not any(wanted.values()):
            break
        batch = next(source)
        for img, label in zip(batch["image"], batch["label"]):
            if wanted.get(int(label), 0) > 0:
                wanted[int(label)] -= 1
                images.append(img)
                kept.append(label)
    source.close()
    short = {c: n for c, n in wanted.items() if n}
    if short:
        raise ValueError(f"the training split has fewer than {per_class} images of classes {sorted(short)}")
    order = np.argsort(kept, kind="stable")
    return np.stack(images)[order], np.asarray(kept, np.int32)[order]


def _pm1(images_01: np.ndarray) -> np.ndarray:
    """Images in [0, 1] (float) -> [-1, 1] float32, as the networks take them."""
    return np.asarray(images_01, np.float32) * 2.0 - 1.0


def _u8_to_01(images_u8: np.ndarray) -> np.ndarray:
    return images_u8.astype(np.float32) / 255.0


def _batched(fn: Callable[[np.ndarray], Any], x_N: np.ndarray, batch_size: int) -> Any:
    """``fn`` over ``x_N`` in fixed-size batches (the last padded, so one compilation serves).

    Returns ``fn``'s outputs (a tuple or one array) for the ``N`` rows, on the host.
    """
    n, outs = len(x_N), []
    for start in range(0, n, batch_size):
        chunk = x_N[start : start + batch_size]
        pad = [(0, batch_size - len(chunk))] + [(0, 0)] * (chunk.ndim - 1)
        k = len(chunk)
        out = fn(np.pad(chunk, pad, mode="edge"))
        outs.append(jax.tree.map(lambda y, k=k: np.asarray(y)[:k], out))
    return jax.tree.map(lambda *ys: np.concatenate(ys), *outs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _classifier_apply(
    config: ClassifierConfig, num_classes: int, params: Any, img_BHW3: jax.Array
) -> tuple[jax.Array, jax.Array]:
    return Classifier(config, num_classes).apply(params, img_BHW3)


def classifier_outputs(classifier: TrainedClassifier, images_01: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(N, K)`` and penultimate features ``(N, F)`` of images ``(N, H, W, 3)`` in [0, 1]."""
    images_01 = np.asarray(images_01)
    s = classifier.image_size
    if images_01.ndim != 4 or images_01.shape[1:] != (s, s, 3):
        raise ValueError(
            f"the classifier was trained on {s}x{s} RGB images; got images of shape {images_01.shape}"
        )
    fn = functools.partial(_classifier_apply, classifier.config, classifier.num_classes, classifier.params)
    return _batched(lambda x: fn(_pm1(x)), images_01, _FEATURE_BATCH)


def _accuracy(classifier: TrainedClassifier, images_01: np.ndarray, labels_N: np.ndarray) -> float:
    logits, _ = classifier_outputs(classifier, images_01)
    return float(np.mean(np.argmax(logits, axis=-1) == labels_N))


def degrade(key: jax.Array, x_BHW3: jax.Array, blur_factors: tuple[int, ...], max_noise: float) -> jax.Array:
    """Per image, blur (box-downsample by a random factor of ``(1, *blur_factors)``, bilinear
    back up) and add Gaussian noise of a random std up to ``max_noise`` ([0, 1] scale).

    Samples and tokenizer reconstructions are softer and noisier than the data;
    the judge should decide their class, not whether they are crisp.
    """
    k_blur, k_std, k_noise = jax.random.split(key, 3)
    B = x_BHW3.shape[0]
    choice_B = jax.random.randint(k_blur, (B, 1, 1, 1), 0, len(blur_factors) + 1)
    for i, f in enumerate(blur_factors, start=1):
        blurred = jax.image.resize(nn.avg_pool(x_BHW3, (f, f), strides=(f, f)), x_BHW3.shape, "bilinear")
        x_BHW3 = jnp.where(choice_B == i, blurred, x_BHW3)
    std_B = jax.random.uniform(k_std, (B, 1, 1, 1), maxval=2 * max_noise)  # [-1, 1] scale
    return x_BHW3 + std_B * jax.random.normal(k_noise, x_BHW3.shape)


def train_classifier(
    data_cfg: ml_collections.ConfigDict,
    config: ClassifierConfig = ClassifierConfig(),
    *,
    progress: bool = True,
) -> TrainedClassifier:
    """Trains the judge on the train split, scores it on the validation split.

    AdamW with a warm-up and a cosine decay, cross-entropy; the batches come from
    ``data.build_train_source`` with ``data_cfg`` (random crops, plus horizontal
    flips: they do not change a class of the built-in dataset), then ``degrade``.
    """
    cpu_start = time.process_time()
    num_classes = int(data_cfg.num_classes)
    model = Classifier(config, num_classes)
    s = int(data_cfg.image_size)
    init_key, degrade_key = jax.random.split(jax.random.PRNGKey(config.seed))
    params = model.init(init_key, jnp.zeros((1, s, s, 3)))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, max(1, config.num_steps // 20), config.num_steps
    )
    optimizer = optax.adamw(schedule, weight_decay=config.weight_decay)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, image_u8_BHW3, label_B, key):
        x_BHW3 = degrade(key, data.to_pm1(image_u8_BHW3), config.blur_factors_at(s), config.max_noise)

        def loss_fn(p):
            logits, _ = model.apply(p, x_BHW3)
            return optax.softmax_cross_entropy_with_integer_labels(logits, label_B).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    source = data.build_train_source(
        _source_config(data_cfg, hflip=True),
        global_batch_size=config.batch_size,
        process_index=0,
        process_count=1,
        seed=config.seed,
    )
    bar = tqdm(range(config.num_steps), desc="training the classifier", unit="step", disable=not progress)
    for i in bar:
        batch = next(source)
        params, opt_state, loss = step(
            params, opt_state, batch["image"], batch["label"], jax.random.fold_in(degrade_key, i)
        )
        bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    source.close()
    classifier = TrainedClassifier(config, num_classes, s, params, float("nan"), 0.0)
    images, labels = validation_images(data_cfg)
    return classifier._replace(
        val_accuracy=_accuracy(classifier, _u8_to_01(images), labels),
        train_cpu_seconds=time.process_time() - cpu_start,
    )


def save_classifier(path: str | os.PathLike, classifier: TrainedClassifier) -> None:
    """Writes params and metadata to one ``.npz`` (atomically: a partial file never appears)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": dataclasses.asdict(classifier.config),
        "num_classes": classifier.num_classes,
        "image_size": classifier.image_size,
        "val_accuracy": classifier.val_accuracy,
        "train_cpu_seconds": classifier.train_cpu_seconds,
        "version": CLASSIFIER_VERSION,
    }
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(classifier.params).items()}
    with atomic_write(path) as f:  # also safe with several processes filling one cache
        np.savez(f, __meta__=np.asarray(json.dumps(meta)), **flat)


def load_classifier(path: str | os.PathLike) -> TrainedClassifier:
    """Reads what ``save_classifier`` wrote; ValueError for an unreadable or foreign file."""
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["__meta__"]))
            flat = {tuple(k.split("/")): f[k] for k in f.files if k != "__meta__"}
        config = ClassifierConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
        )
        return TrainedClassifier(
            config,
            meta["num_classes"],
            meta["image_size"],
            traverse_util.unflatten_dict(flat),
            meta["val_accuracy"],
            meta["train_cpu_seconds"],
        )
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"cannot read the classifier cache {path}: {type(e).__name__}: {e}") from e


def load_or_train_classifier(
    cache_dir: str | os.PathLike,
    data_cfg: ml_collections.ConfigDict | None = None,
    config: ClassifierConfig = ClassifierConfig(),
    *,
    progress: bool = True,
) -> TrainedClassifier:
    """The cached judge for this data config and classifier config, trained on first use.

    ``data_cfg`` defaults to ``data.default_config()`` (the built-in dataset, 64 px).
    """
    data_cfg = data.default_config() if data_cfg is None else data_cfg
    path = classifier_cache_path(cache_dir, data_cfg, config)
    if path.exists():
        return load_classifier(path)
    classifier = train_classifier(data_cfg, config, progress=progress)
    save_classifier(path, classifier)
    print(
        f"classifier: held-out accuracy {classifier.val_accuracy:.2%} after "
        f"{classifier.train_cpu_seconds:.0f} CPU s; cached in {path}"
    )
    if classifier.val_accuracy < MIN_CLASSIFIER_ACCURACY:
        print(
            f"warning: below the {MIN_CLASSIFIER_ACCURACY:.0%} the class accuracies assume; "
            "treat them with care"
        )
    return classifier


def class_accuracy(predicted_N: np.ndarray, labels_N: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Per-class share of samples predicted as their requested label, and the mean over classes.

    ``per_class[c]`` is None for a class with no samples; ``mean`` averages the
    classes that have samples (each class counts the same whatever its count).
    """
    predicted_N, labels_N = np.asarray(predicted_N), np.asarray(labels_N)
    if predicted_N.shape != labels_N.shape or labels_N.ndim != 1:
        raise ValueError(
            f"predictions {predicted_N.shape} and labels {labels_N.shape} must be "
            "1-D arrays of the same length"
        )
    bad = sorted({int(c) for c in labels_N if not 0 <= c < num_classes})
    if bad:
        raise ValueError(f"labels {bad} are outside the {num_classes} classes [0, {num_classes - 1}]")
    count = np.bincount(labels_N, minlength=num_classes)
    correct = np.bincount(labels_N[predicted_N == labels_N], minlength=num_classes)
    per_class = [float(correct[c] / count[c]) if count[c] else None for c in range(num_classes)]
    present = [a for a in per_class if a is not None]
    return {
        "per_class": per_class,
        "count": count.tolist(),
        "mean": float(np.mean(present)) if present else None,
    }


def generated_class_accuracy(
    classifier: TrainedClassifier, images_01: np.ndarray, labels_N: np.ndarray
) -> dict[str, Any]:
    """``class_accuracy`` of the classifier's verdicts on images in [0, 1] asked to be ``labels_N``."""
    logits, _ = classifier_outputs(classifier, images_01)
    return class_accuracy(np.argmax(logits, axis=-1), labels_N, classifier.num_classes)


def gaussian_stats(features_NF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(F,)`` and covariance ``(F, F)`` (unbiased, float64) of feature rows."""
    x = np.asarray(features_NF, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least 2 feature rows (N, F), got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between two Gaussians.

    ``tr((S1 S2)^(1/2))`` is taken as ``tr((R S2 R)^(1/2))`` with ``R = S1^(1/2)``:
    the same eigenvalues, but of a symmetric PSD matrix, so two ``eigh`` calls
    in float64 replace a general matrix square root and its complex round-off.
    """
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"mismatched statistics: means {mu1.shape}, {mu2.shape}, covariances "
            f"{sigma1.shape}, {sigma2.shape}"
        )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_cross)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to two sets of feature rows ``(N, F)``."""
    return frechet_distance_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(vqvae_config: VQVAEConfig, vqvae_params: Any, img_BHW3: jax.Array) -> jax.Array:
    vqvae = VQVAE(vqvae_config)
    ids = vqvae.apply(vqvae_params, img_BHW3, method=VQVAE.img_to_idx)
    return (vqvae.apply(vqvae_params, ids, method=VQVAE.idx_to_img) + 1) * 0.5


def reconstruct(
    vqvae_config: VQVAEConfig, vqvae_params: Any, images_01: np.ndarray, batch_size: int = _FEATURE_BATCH
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
    return _batched(lambda x: fn(_pm1(x)), images_01, batch_size)


def psnr(images_01: np.ndarray, reference_01: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB ``(N,)`` of images in [0, 1] (peak 1) against a reference."""
    err = np.asarray(images_01, np.float64) - np.asarray(reference_01, np.float64)
    mse = np.mean(err.reshape(len(err), -1) ** 2, axis=1)
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-20))


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
    images = _u8_to_01(validation_images(data_cfg)[0][:num_images])
    recon = reconstruct(vqvae_config, vqvae_params, images, min(len(images), _FEATURE_BATCH))
    return float(np.mean(psnr(recon, images)))


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


def generate_images(
    model: checkpoint.ModelBundle,
    labels_N: np.ndarray,
    *,
    cfg: float,
    top_k: int,
    top_p: float,
    seed: int,
    batch_size: int,
    progress: bool = True,
) -> np.ndarray:
    """Samples ``(N, H, W, 3)`` float32 in [0, 1], one per label.

    Batch b draws from ``fold_in(PRNGKey(seed), b)``, as ``sample.py`` does, so
    the same seed and batch size give sample.py's images.
    """
    key = jax.random.PRNGKey(seed)
    batch_size = min(batch_size, len(labels_N))
    starts = range(0, len(labels_N), batch_size)
    images = []
    for b, start in enumerate(tqdm(starts, desc="sampling", unit="batch", disable=not progress)):
        labels_B = labels_N[start : start + batch_size]
        out = sampling.sample(
            model,
            np.pad(labels_B, (0, batch_size - len(labels_B)), mode="edge"),
            jax.random.fold_in(key, b),
            cfg=cfg,
            top_k=top_k,
            top_p=top_p,
        )
        images.append(np.asarray(out.images)[: len(labels_B)])
    return np.concatenate(images)


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
    samples_per_class: int = 50,
    cfg: float = 1.5,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int = 0,
    batch_size: int = 50,
    progress: bool = True,
) -> dict[str, Any]:
    """Samples ``samples_per_class`` images of each label and measures them; the report dict.

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
    if samples_per_class < 1 or samples_per_class * len(labels) < 2:
        raise ValueError(
            f"samples_per_class={samples_per_class} with {len(labels)} labels: "
            "the Fréchet distance needs at least 2 samples"
        )
    labels_N = np.repeat(np.asarray(labels, np.int32), samples_per_class)
    start = time.perf_counter()
    generated = generate_images(
        model,
        labels_N,
        cfg=cfg,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    sampling_seconds = time.perf_counter() - start

    if progress:
        print("measuring: classifier features, tokenizer reconstructions", flush=True)
    val_u8, val_labels = validation_images(data_cfg)
    keep = np.isin(val_labels, labels)
    val, val_labels = _u8_to_01(val_u8[keep]), val_labels[keep]
    val_recon = reconstruct(model.vqvae_config, model.vqvae_params, val)
    train = _u8_to_01(train_images(data_cfg, labels, samples_per_class, seed=0)[0])
    features = {
        name: classifier_outputs(classifier, images)[1]
        for name, images in (
            ("generated", generated),
            ("train", train),
            ("reconstruction", reconstruct(model.vqvae_config, model.vqvae_params, train)),
            ("validation", val),
        )
    }
    fd = {
        name: frechet_distance(features[name], features["validation"])
        for name in ("generated", "reconstruction", "train")
    }

    accuracy = generated_class_accuracy(classifier, generated, labels_N)
    names = class_names(data_cfg)
    return {
        "model": {
            "attention": model.transformer_config.attention,
            "depth": model.transformer_config.depth,
            "image_size": model.vqvae_config.image_size,
            "num_classes": model.transformer_config.num_classes,
        },
        "settings": {
            "cfg": cfg,
            "top_k": top_k,
            "top_p": top_p,
            "samples_per_class": samples_per_class,
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
            "psnr_db": float(np.mean(psnr(val_recon, val))),
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
        f"{MODEL_NAMES[m['attention']]} depth {m['depth']}, {m['image_size']} px: "
        f"{fd['num_samples']} samples ({s['samples_per_class']} per class), cfg {s['cfg']}, "
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
    **sampling: Any,
) -> dict[str, Any]:
    """Loads and checks a generator model directory, then ``evaluate_generator`` (which
    takes ``sampling``: samples_per_class, cfg, top_k, top_p, seed, batch_size).

    The model is checked against the data before the classifier is trained or
    loaded, so a wrong model fails fast. ``data_cfg`` defaults to
    ``data.default_config()`` (the built-in dataset, 64 px).
    """
    data_cfg = data.default_config() if data_cfg is None else data_cfg
    model, labels = load_generator(model_dir, data_cfg, labels)
    classifier = load_or_train_classifier(classifier_cache, data_cfg, progress=progress)
    report = evaluate_generator(model, classifier, data_cfg, labels=labels, progress=progress, **sampling)
    report["model"]["directory"] = str(pathlib.Path(model_dir).absolute())
    return report


def default_cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/mvar_jax`` (``~/.cache/mvar_jax``): where the CLI keeps classifiers."""
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "mvar_jax"


PROG = "python -m mvar_jax.quality"
FLAGS = flags.FlagValues()  # this command's own, so that tests can import several commands
flags.DEFINE_string(
    "checkpoint",
    None,
    "generator model directory (train.py export or mvar_jax.convert)",
    required=True,
    flag_values=FLAGS,
)
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
cli.define_sampling_flags(FLAGS, batch_size=50, top_k=0, top_p=0.0)
flags.DEFINE_integer(
    "samples_per_class",
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
    cli.check_sampling_flags(FLAGS, PROG)
    data_cfg = data.default_config()
    try:  # The model is checked before anything slow runs.
        image_size = FLAGS.image_size or checkpoint.read_vqvae_config(FLAGS.checkpoint).image_size
        data_cfg.update(image_size=image_size, data_dir=FLAGS.data_dir)
        report = evaluate_model(
            FLAGS.checkpoint,
            classifier_cache=FLAGS.classifier_cache or default_cache_dir(),
            data_cfg=data_cfg,
            labels=FLAGS.labels,
            samples_per_class=FLAGS.samples_per_class,
            cfg=FLAGS.cfg,
            top_k=FLAGS.top_k,
            top_p=FLAGS.top_p,
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
