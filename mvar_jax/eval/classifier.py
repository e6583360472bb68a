"""The demo's judge: a small CNN trained on the dataset's train split, cached per dataset and recipe.

It decides which class a generated image shows (class accuracy) and gives the
features of the Fréchet distance (``frechet``). The cache is an ``.npz`` whose
name holds the resolution and a hash of every setting, so a stale one is never reused.
"""

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn, traverse_util
from tqdm import tqdm

from mvar_jax import data
from mvar_jax.atomic_write import atomic_write
from mvar_jax.data import builtin_shapes
from mvar_jax.images import from_uint8

# Bump when the classifier or its training changes in a way ClassifierConfig does not show.
CLASSIFIER_VERSION = 1
MIN_CLASSIFIER_ACCURACY = 0.98  # held-out accuracy below which the judge is not trusted
FEATURE_BATCH = 100  # images per compiled classifier / tokenizer call


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


def pm1(images_01: np.ndarray) -> np.ndarray:
    """Images in [0, 1] (float) -> [-1, 1] float32, as the networks take them."""
    return np.asarray(images_01, np.float32) * 2.0 - 1.0


def map_batches(fn: Callable[[np.ndarray], Any], x_N: np.ndarray, batch_size: int) -> Any:
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
    return map_batches(lambda x: fn(pm1(x)), images_01, FEATURE_BATCH)


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
        val_accuracy=_accuracy(classifier, from_uint8(images), labels),
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
