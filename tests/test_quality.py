"""mvar_jax.eval.quality: the Fréchet distance against closed forms, the accuracy bookkeeping, the
classifier reaching its threshold, tokenizer PSNR, the bad-input errors, the CLI."""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import tiny_transformer

from mvar_jax import checkpoint, data
from mvar_jax.data import builtin_shapes
from mvar_jax.errors import CheckpointError
from mvar_jax.eval import classifier as classifier_lib, quality
from mvar_jax.models.transformer import init_params
from mvar_jax.models.vqvae import VQVAE
from mvar_jax.weights.vqvae import load_official_vqvae


def test_class_accuracy_bookkeeping():
    labels = np.array([0, 0, 0, 0, 2, 2, 3])
    predicted = np.array([0, 1, 0, 0, 2, 0, 1])
    acc = classifier_lib.class_accuracy(predicted, labels, num_classes=4)
    assert acc["per_class"] == [0.75, None, 0.5, 0.0]
    assert acc["count"] == [4, 0, 2, 1]
    assert acc["mean"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)  # classes weigh the same
    with pytest.raises(ValueError, match=r"labels \[4\] are outside the 4 classes"):
        classifier_lib.class_accuracy(predicted, np.array([0, 0, 0, 0, 2, 2, 4]), num_classes=4)
    with pytest.raises(ValueError, match="same length"):
        classifier_lib.class_accuracy(predicted[:3], labels, num_classes=4)


def test_blur_factors_keep_a_legible_image():
    config = classifier_lib.ClassifierConfig()  # (2, 4), at least 16 px a side
    assert config.blur_factors_at(64) == (2, 4)
    assert config.blur_factors_at(32) == (2,)
    assert config.blur_factors_at(16) == ()


def test_degrade_blurs_and_adds_bounded_noise():
    x = np.zeros((64, 8, 8, 3), np.float32)
    x[:, :, :4] = 1.0  # a vertical edge
    clean = np.asarray(classifier_lib.degrade(jax.random.PRNGKey(0), x, (2, 4), 0.0))
    blurred = [np.array_equal(img, x[0]) for img in clean]
    assert 0 < sum(blurred) < len(x)  # some images are left sharp, the others blurred
    assert np.allclose(clean.mean(axis=(1, 2, 3)), 0.5, atol=0.05)  # blur keeps the mean
    noisy = np.asarray(classifier_lib.degrade(jax.random.PRNGKey(1), x, (), 0.1))
    stds = (noisy - x).std(axis=(1, 2, 3))
    assert stds.max() < 0.2 * 1.2 and stds.min() < stds.max() / 2  # random std in [0, 0.2]


@pytest.fixture(scope="module")
def data_cfg(builtin_shapes_dir) -> ml_collections.ConfigDict:
    cfg = data.default_config()
    cfg.update(data_dir=str(builtin_shapes_dir), num_workers=2)
    return cfg


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("classifiers")


@pytest.fixture(scope="module")
def judge(data_cfg, classifier_cache) -> classifier_lib.TrainedClassifier:
    """An untrained stand-in judge at 64 px, in the cache: for what reads a judge, not its skill."""
    config = classifier_lib.ClassifierConfig()
    params = jax.jit(classifier_lib.Classifier(config, 10).init)(
        jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3))
    )
    trained = classifier_lib.TrainedClassifier(config, 10, 64, params, 0.125, 0.0)
    classifier_lib.save_classifier(classifier_lib.classifier_cache_path(classifier_cache, data_cfg), trained)
    return trained


def test_classifier_reaches_the_accuracy_threshold_and_is_cached(data_cfg, tmp_path, monkeypatch):
    """The demo's judge, as the demo trains it: at 32 px."""
    data_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    data_cfg.image_size = 32
    classifier = classifier_lib.load_or_train_classifier(tmp_path, data_cfg, progress=False)
    print(
        f"classifier: held-out accuracy {classifier.val_accuracy:.4f}, "
        f"{classifier.train_cpu_seconds:.1f} CPU s"
    )
    assert classifier.val_accuracy >= classifier_lib.MIN_CLASSIFIER_ACCURACY
    # Held-out accuracy recomputed from the validation images, independently of training.
    images, labels = classifier_lib.validation_images(data_cfg)
    assert len(images) == 500
    logits, features = classifier_lib.classifier_outputs(classifier, images / 255.0)
    assert np.mean(logits.argmax(-1) == labels) == pytest.approx(classifier.val_accuracy)
    assert features.shape == (500, classifier.config.feature_dim)

    # A second call reads the cache (training would fail here) and gets the same params.
    monkeypatch.setattr(classifier_lib, "train_classifier", lambda *a, **k: pytest.fail("retrained"))
    cached = classifier_lib.load_or_train_classifier(tmp_path, data_cfg, progress=False)
    for a, b in zip(jax.tree.leaves(cached.params), jax.tree.leaves(classifier.params)):
        np.testing.assert_array_equal(a, b)
    assert cached._replace(params=None) == classifier._replace(params=None)


def test_cache_key_changes_with_resolution_and_recipe(data_cfg, tmp_path):
    path = classifier_lib.classifier_cache_path(tmp_path, data_cfg)
    assert path.parent == tmp_path and "res64" in path.name
    other_size = data.default_config()
    other_size.update(data_dir=data_cfg.data_dir, image_size=32)
    other_recipe = classifier_lib.ClassifierConfig(num_steps=10)
    others = {
        classifier_lib.classifier_cache_path(tmp_path, other_size),
        classifier_lib.classifier_cache_path(tmp_path, data_cfg, other_recipe),
    }
    assert path not in others and len(others) == 2
    with pytest.MonkeyPatch.context() as m:  # a new version of the built-in images
        m.setattr(builtin_shapes.BuiltinShapes, "VERSION", tfds.core.Version("99.0.0"))
        assert classifier_lib.classifier_cache_path(tmp_path, data_cfg) not in others | {path}
    moved = data.default_config()  # where the data lives does not matter
    assert classifier_lib.classifier_cache_path(tmp_path, moved) == path
    path.write_text("not an npz")
    with pytest.raises(ValueError, match="cannot read the classifier cache"):
        classifier_lib.load_classifier(path)


@pytest.fixture(scope="module")
def tiny_tokenizer(fixture_dir):
    """The tiny fixture VQVAE at 64 px (4x4 token maps), as configs/tiny_cpu.py:fixture uses it."""
    return load_official_vqvae(fixture_dir / "tiny_vae.pth", patch_nums=(1, 2, 3, 4))


def test_tokenizer_psnr_against_the_full_pyramid_reconstruction(tiny_tokenizer, data_cfg):
    config, params = tiny_tokenizer
    images = classifier_lib.validation_images(data_cfg)[0][:8] / 255.0
    recon = quality.reconstruct(config, params, images, batch_size=8)
    # VQVAE.__call__ reconstructs through f_hat directly, not through the token ids.
    direct = (np.asarray(jax.jit(VQVAE(config).apply)(params, images * 2 - 1)) + 1) / 2
    np.testing.assert_allclose(recon, direct, atol=1e-5)
    value = quality.tokenizer_psnr(config, params, data_cfg, num_images=8)
    assert value == pytest.approx(
        np.mean(10 * np.log10(1 / np.mean((direct - images) ** 2, axis=(1, 2, 3)))), abs=1e-3
    )
    with pytest.raises(ValueError, match="encodes 64x64 RGB images"):
        quality.reconstruct(config, params, images[:, :32, :32])


@pytest.fixture(scope="module")
def model_64px(tiny_tokenizer, tmp_path_factory):
    """A random-weight 10-class MVAR over the tiny tokenizer at 64 px, saved as a model dir."""
    vqvae_config, vqvae_params = tiny_tokenizer
    config = tiny_transformer(
        vocab_size=vqvae_config.vocab_size, cvae=vqvae_config.z_channels, depth=1, embed_dim=32, num_heads=2
    )
    path = tmp_path_factory.mktemp("models") / "mvar64"
    checkpoint.save_model(
        path,
        vqvae_config=vqvae_config,
        vqvae_params=vqvae_params,
        transformer_config=config,
        transformer_params=init_params(config, jax.random.PRNGKey(0)),
    )
    return path


def test_bad_inputs_are_named(model_64px, tiny_checkpoints, tiny_tokenizer, data_cfg, tmp_path, monkeypatch):
    # Every check runs before the classifier is trained or loaded.
    monkeypatch.setattr(
        quality, "load_or_train_classifier", lambda *a, **k: pytest.fail("the classifier was needed")
    )
    evaluate = dict(classifier_cache=tmp_path, data_cfg=data_cfg, progress=False)
    with pytest.raises(
        ValueError,
        match=r"makes 256x256 px images but the dataset and its "
        r"classifier are 64x64 px",
    ):
        quality.evaluate_model(tiny_checkpoints["mvar"], **evaluate)
    with pytest.raises(ValueError, match=r"labels \[10, 12\] are outside the model's classes 0..9"):
        quality.evaluate_model(model_64px, labels=[0, 12, 10], **evaluate)
    vqvae_config, vqvae_params = tiny_tokenizer
    checkpoint.save_tokenizer(tmp_path / "tokenizer", vqvae_config=vqvae_config, vqvae_params=vqvae_params)
    with pytest.raises(CheckpointError, match="is a tokenizer directory"):
        quality.evaluate_model(tmp_path / "tokenizer", **evaluate)

    model = checkpoint.load_model(model_64px)
    seven = model._replace(transformer_config=dataclasses.replace(model.transformer_config, num_classes=7))
    with pytest.raises(
        ValueError,
        match=r"the model has 7 classes but the dataset "
        r"'builtin_shapes' has 10",
    ):
        quality.check_generator(seven, data_cfg)


def test_cli_reports_bad_input_as_usage_errors(tiny_checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        quality.main(
            [
                "--checkpoint",
                str(tiny_checkpoints["var"]),
                "--out",
                str(tmp_path / "r.json"),
                "--classifier_cache",
                str(tmp_path),
                "--image_size",
                "64",
            ]
        )
    assert exit_info.value.code == 2
    assert "makes 256x256 px images but the dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # by default the data is at the model's resolution
        quality.main(
            ["--checkpoint", str(tiny_checkpoints["var"]), "--out", str(tmp_path / "r.json")]
            + ["--classifier_cache", str(tmp_path)]
        )
    assert exit_info.value.code == 2
    assert "drawn at up to 128 px; image_size=256 is larger" in capsys.readouterr().err
    checkpoint_dir = str(tiny_checkpoints["var"])
    for flags_, message in [
        (["--out", str(tmp_path / "r.txt")], "--out must end in .json"),
        (["--out", str(tmp_path / "r.json"), "--labels", "0,x"], "such as 3,1, got '0,x'"),
        (["--out", str(tmp_path / "r.json"), "--num_per_class", "0"], "--num_per_class=0"),
        (["--out", str(tmp_path / "r.json"), "--cfg", "-2"], "--cfg=-2.0 must be"),
    ]:
        with pytest.raises(SystemExit):
            quality.main(["--checkpoint", checkpoint_dir, *flags_])
        assert message in capsys.readouterr().err


def test_cli_end_to_end(model_64px, judge, data_cfg, classifier_cache, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert (
        quality.main(
            [
                "--checkpoint",
                str(model_64px),
                "--out",
                str(out),
                "--classifier_cache",
                str(classifier_cache),
                "--data_dir",
                data_cfg.data_dir,
                "--labels",
                "0,3,7",
                "--num_per_class",
                "4",
                "--batch_size",
                "5",
                "--cfg",
                "2.0",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["settings"] == {
        "cfg": 2.0,
        "top_k": 0,
        "top_p": 0.0,
        "num_per_class": 4,
        "seed": 1,
        "batch_size": 5,
        "labels": [0, 3, 7],
    }
    assert list(report["class_accuracy"]["per_class"]) == ["red_circle", "red_star", "blue_triangle"]
    per_class = list(report["class_accuracy"]["per_class"].values())
    assert all(a in (0.0, 0.25, 0.5, 0.75, 1.0) for a in per_class)  # 4 samples each
    assert report["class_accuracy"]["mean"] == pytest.approx(np.mean(per_class))
    fd = report["frechet_distance"]
    assert (fd["num_samples"], fd["num_reference"]) == (12, 150)  # 3 classes of the 500
    assert all(
        np.isfinite(fd[k]) and fd[k] >= 0 for k in ("generated", "reconstruction_floor", "train_floor")
    )
    assert fd["ratio_to_reconstruction_floor"] == pytest.approx(fd["generated"] / fd["reconstruction_floor"])
    assert report["classifier"]["val_accuracy"] == judge.val_accuracy  # the cached judge's
    assert report["model"]["family"] == "mvar" and report["model"]["image_size"] == 64
    md = out.with_suffix(".md").read_text()
    assert "| mean class accuracy |" in md and "| red_circle | red_star | blue_triangle |" in md
    assert "floor: tokenizer reconstructions vs validation" in md
    assert "wrote" in capsys.readouterr().out
