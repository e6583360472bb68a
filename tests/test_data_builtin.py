"""The built-in dataset: builds fast, balanced, deterministic, readable through every TFDS path."""

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mvar_jax import data
from mvar_jax.data import builtin_shapes


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(data_dir, seconds the first build took)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    cfg = data.default_config()
    cfg.update(data_dir=str(data_dir), num_workers=2, prefetch=0)
    start = time.perf_counter()
    data.build_train_source(cfg, global_batch_size=8, process_index=0, process_count=1, seed=0)
    return data_dir, time.perf_counter() - start


def test_builds_in_under_a_minute_with_balanced_labels(built):
    data_dir, seconds = built
    print(f"builtin_shapes/res64 built in {seconds:.1f}s")
    assert seconds < 60
    builder = tfds.builder("builtin_shapes/res64", data_dir=data_dir)
    for split, size in builtin_shapes.SPLIT_SIZES.items():
        source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        labels = np.array([source[i]["label"] for i in range(len(source))])
        assert len(source) == size
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [size // 10] * 10)
    assert builder.as_data_source("train")[0]["image"].shape == (64, 64, 3)


def test_images_are_deterministic_and_class_dependent():
    seed = builtin_shapes.example_seed(0, "train", 5)
    a = builtin_shapes.draw_example(3, seed, 32)
    np.testing.assert_array_equal(a, builtin_shapes.draw_example(3, seed, 32))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, builtin_shapes.draw_example(4, seed, 32))
    with pytest.raises(ValueError, match="outside"):
        builtin_shapes.draw_example(10, seed, 32)


def test_the_object_carries_the_colour_half_of_the_label():
    """Saturated pixels (the object; the background is muted) are red or blue by class."""
    for i in range(40):
        img = builtin_shapes.draw_example(i % 10, builtin_shapes.example_seed(0, "train", i), 32) / 255.0
        saturation = (img.max(-1) - img.min(-1)) / np.maximum(img.max(-1), 1e-6)
        obj = img[saturation > 0.6]
        assert len(obj) > 0.02 * 32 * 32
        red_minus_blue = np.mean(obj[:, 0] - obj[:, 2])
        assert red_minus_blue > 0.3 if i % 10 < 5 else red_minus_blue < -0.3


def test_squares_stand_nearly_upright():
    """A square tilted by t fills 1 / (1 + sin 2t) of its axis-aligned bounding box: at
    most 15 degrees (MAX_TILT) leaves >= 2/3 filled; at 45 degrees, 1/2."""
    square = builtin_shapes.CLASS_NAMES.index("red_square")
    for i in range(40):
        img = builtin_shapes.draw_example(square, builtin_shapes.example_seed(0, "train", i), 64) / 255.0
        saturation = (img.max(-1) - img.min(-1)) / np.maximum(img.max(-1), 1e-6)
        ys, xs = np.nonzero(saturation > 0.55)  # the object's pixels
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert len(ys) / box > 0.6, f"image {i}: fills {len(ys) / box:.2f} of its box"


def test_pipeline_reads_it_by_name_and_through_the_generic_tfds_path(built):
    data_dir, _ = built
    cfg = data.default_config()
    cfg.update(data_dir=str(data_dir), num_workers=2, prefetch=1)
    batch = next(data.build_train_source(cfg, global_batch_size=8, process_index=0, process_count=1, seed=0))
    assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.uint8
    cfg.update(name="tfds:builtin_shapes/res64")
    source = data.build_eval_source(cfg, global_batch_size=100, process_index=0, process_count=1)
    assert source.num_examples == builtin_shapes.SPLIT_SIZES["validation"] and source.num_batches == 5
    assert next(source)["mask"].all()


def test_missing_tfds_dataset_and_wrong_class_count_are_clear_errors(built):
    data_dir, _ = built
    cfg = data.default_config()
    cfg.update(data_dir=str(data_dir), name="tfds:builtin_shapes/res32")
    with pytest.raises(
        FileNotFoundError, match="not prepared.*mvar_jax.data.records --name=tfds:builtin_shapes"
    ):
        data.build_eval_source(cfg, global_batch_size=1, process_index=0, process_count=1)
    cfg.update(name="builtin_shapes", num_classes=1000)
    with pytest.raises(ValueError, match="num_classes=1000 but builtin_shapes"):
        data.build_eval_source(cfg, global_batch_size=1, process_index=0, process_count=1)
    cfg.update(image_size=256, num_classes=10)
    with pytest.raises(ValueError, match="up to 128 px"):
        data.build_eval_source(cfg, global_batch_size=1, process_index=0, process_count=1)
