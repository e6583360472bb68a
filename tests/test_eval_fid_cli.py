"""``python -m mvar_jax.eval.fid``: the metrics file, data parallelism, reference statistics, bad input.

The Inception weights are random (``expected_state_dict_shapes`` filled by a seeded generator);
the parity of the network and of the metrics is tests/test_eval_inception.py's and
tests/test_eval_metrics.py's. Here: the numbers equal the metrics of features computed outside
the command, 1 and 8 devices agree (batches padded differently), and a reference batch's own
``mu``/``sigma`` are used where present (with stand-in features: that is wiring, not Inception).
"""

from __future__ import annotations

import json
import pathlib
import types

import jax
import numpy as np
import pytest
import torch
from conftest import run_on_eight_devices

from mvar_jax.eval import fid, metrics, precision_recall
from mvar_jax.eval.features import FeatureExtractor
from mvar_jax.models import inception
from mvar_jax.weights.inception import expected_state_dict_shapes, load_inception

SIZE = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("fid_cli")
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for key, shape in expected_state_dict_shapes().items():
        if key.endswith("conv.weight"):
            weights[key] = torch.randn(shape, generator=gen) * (2.0 / np.prod(shape[1:])) ** 0.5
        elif key.endswith(("bn.weight", "running_var")):
            weights[key] = 0.5 + torch.rand(shape, generator=gen)
        else:
            weights[key] = 0.1 * torch.randn(shape, generator=gen)
    torch.save(weights, root / "inception.pth")
    rng = np.random.default_rng(0)
    np.savez(root / "samples.npz", arr_0=rng.integers(0, 256, (5, SIZE, SIZE, 3), np.uint8))
    np.savez(root / "ref.npz", arr_0=rng.integers(0, 128, (4, SIZE, SIZE, 3), np.uint8))
    return {
        "root": root,
        "inception": root / "inception.pth",
        "samples": root / "samples.npz",
        "ref": root / "ref.npz",
    }


def _argv(files, out: pathlib.Path, **overrides) -> list[str]:
    paths = {"samples": files["samples"], "ref": files["ref"], "inception": files["inception"], **overrides}
    return [*(f"--{k}={v}" for k, v in paths.items()), f"--out={out}", "--batch_size=2"]


@pytest.fixture(scope="module")
def one_device(files) -> dict:
    out = files["root"] / "one" / "metrics.json"
    assert fid.main(_argv(files, out)) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def features(files) -> dict[str, inception.InceptionOutputs]:
    """Each file's features outside the command, from its array split otherwise (1 + 2 + 2 and
    1 + 2 + 1 against the command's 2 + 2 + 1 and 2 + 2), on the command's compiled shapes."""
    extract = FeatureExtractor(load_inception(files["inception"]), batch_size=2)
    out = {}
    for name in ("samples", "ref"):
        images = np.load(files[name])["arr_0"]
        out[name] = extract([images[:1], images[1:3], images[3:]], len(images), name)
    return out


_METRICS = ("inception_score", "fid", "sfid", "precision", "recall")


def test_writes_the_metrics(one_device, features):
    assert one_device["num_samples"] == 5 and one_device["num_reference"] == 4
    assert one_device["image_size"] == [SIZE, SIZE] and one_device["devices"] == 1
    assert one_device["inception_score_order"] == "shuffled, seed 0"
    assert one_device["versions"]["jax"] == jax.__version__ and one_device["versions"]["mvar_jax"]
    s, r = features["samples"], features["ref"]
    expected = {
        "inception_score": metrics.inception_score(np.asarray(s.logits_BK)),
        "fid": metrics.frechet_distance(metrics.gaussian_stats(s.pool_BF), metrics.gaussian_stats(r.pool_BF)),
        "sfid": metrics.frechet_distance(
            metrics.gaussian_stats(s.spatial_BS), metrics.gaussian_stats(r.spatial_BS)
        ),
    }
    for name, value in expected.items():
        assert one_device[name] == pytest.approx(value, rel=1e-5), name
    assert 0 <= one_device["precision"] <= 1 and 0 <= one_device["recall"] <= 1


def test_eight_devices_give_the_same_numbers(files, one_device, tmp_path):
    """5 samples in one batch padded to 8 over 8 devices (against batches of 2 + 2 + 1 on one)."""
    out = tmp_path / "metrics8.json"
    script = tmp_path / "run8.py"
    script.write_text(
        "import runpy, sys, jax\n"
        "assert jax.device_count() == 8\n"
        f"sys.argv = ['fid', *{_argv(files, out)!r}]\n"
        "try:\n    runpy.run_module('mvar_jax.eval.fid', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        f"print(open({str(out)!r}).read().replace('\\n', ' '))\n"
    )
    eight = run_on_eight_devices(script, tmp_path)
    assert eight["devices"] == 8
    for name in _METRICS:
        assert eight[name] == pytest.approx(one_device[name], rel=1e-6), name


class _StandInExtractor:
    """Features that are a fixed function of the images: 2048, 2023 and 1008 random projections of
    their first 96 values, through a ReLU."""

    projections = [np.random.default_rng(0).normal(size=(96, d)) for d in (2048, 2023, 1008)]

    def __init__(self, params, batch_size):
        self.batch_size, self.mesh = batch_size, types.SimpleNamespace(size=1)

    def __call__(self, batches, total, desc):
        x = np.concatenate(list(batches)).reshape(total, -1)[:, :96] / 255.0
        return inception.InceptionOutputs(
            *(np.maximum(x @ p, 0).astype(np.float32) for p in self.projections)
        )


def test_reference_statistics_from_the_file(files, tmp_path, monkeypatch):
    """The file's ``mu``/``sigma`` are used (here the samples' own: FID 0) and its images still
    give precision and recall; statistics alone give FID and sFID, and no precision/recall."""
    monkeypatch.setattr(fid, "FeatureExtractor", _StandInExtractor)
    extract = _StandInExtractor(None, 2)
    samples, ref = (extract([np.load(files[n])["arr_0"]], 5 - (n == "ref"), n) for n in ("samples", "ref"))

    def stats(outputs: inception.InceptionOutputs) -> dict[str, np.ndarray]:
        pool, spatial = metrics.gaussian_stats(outputs.pool_BF), metrics.gaussian_stats(outputs.spatial_BS)
        return {"mu": pool.mu_F, "sigma": pool.sigma_FF, "mu_s": spatial.mu_F, "sigma_s": spatial.sigma_FF}

    computed = fid.evaluate(files["samples"], files["ref"], files["inception"], 2)
    assert computed["reference_statistics"] == "computed"
    assert computed["fid"] == pytest.approx(
        metrics.frechet_distance(metrics.gaussian_stats(samples.pool_BF), metrics.gaussian_stats(ref.pool_BF))
    )
    assert (computed["precision"], computed["recall"]) == precision_recall.precision_recall(
        ref.pool_BF, samples.pool_BF
    )
    np.savez(tmp_path / "own.npz", arr_0=np.load(files["ref"])["arr_0"], **stats(samples))
    own = fid.evaluate(files["samples"], tmp_path / "own.npz", files["inception"], 2)
    assert own["reference_statistics"] == "from the file"
    # 0 but for the square root of a zero eigenvalue's round-off (5 samples, rank 4)
    assert abs(own["fid"]) < 1e-7 * np.trace(metrics.gaussian_stats(samples.pool_BF).sigma_FF)
    assert abs(own["sfid"]) < 1e-7 * np.trace(metrics.gaussian_stats(samples.spatial_BS).sigma_FF)
    assert (own["precision"], own["recall"]) == (computed["precision"], computed["recall"])
    np.savez(tmp_path / "stats.npz", **stats(ref))
    only = fid.evaluate(files["samples"], tmp_path / "stats.npz", files["inception"], 2, shuffle_seed=None)
    assert only["inception_score_order"] == "file"
    assert only["precision"] is None and only["recall"] is None and only["num_reference"] is None
    assert only["fid"] == pytest.approx(computed["fid"], rel=1e-6)
    assert only["sfid"] == pytest.approx(computed["sfid"], rel=1e-6)


def _usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        fid.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_input_is_a_usage_error(files, tmp_path, capsys):
    def npz(name: str, **arrays) -> pathlib.Path:
        np.savez(tmp_path / name, **arrays)
        return tmp_path / name

    out = tmp_path / "never.json"
    images = np.load(files["samples"])["arr_0"]
    cases = {
        "int64": (dict(samples=npz("i.npz", arr_0=images.astype(np.int64))), "expected uint8"),
        "no channels": (dict(samples=npz("g.npz", arr_0=images[..., 0])), "(N, H, W, 3)"),
        "one image": (dict(samples=npz("one.npz", arr_0=images[:1])), "at least 2"),
        "[0, 1] floats": (dict(samples=npz("f.npz", arr_0=images / 255.0)), "lie in [0, 1]"),
        "no arr_0": (dict(samples=npz("o.npz", images=images)), "has no arr_0"),
        "resolution": (dict(ref=npz("big.npz", arr_0=np.zeros((5, 64, 64, 3), np.uint8))), "64x64 px"),
        "three images": (dict(ref=npz("three.npz", arr_0=images[:3])), "at least 4 images"),
        "NaN statistics": (
            dict(
                ref=npz(
                    "nan.npz",
                    mu=np.full(2048, np.nan),
                    sigma=np.eye(2048, dtype=np.float32),
                    mu_s=np.zeros(2023),
                    sigma_s=np.eye(2023, dtype=np.float32),
                )
            ),
            "NaN",
        ),
        "missing weights": (dict(inception=tmp_path / "absent.pth"), "not found"),
    }
    for name, (overrides, expected) in cases.items():
        assert expected in _usage_error(capsys, _argv(files, out, **overrides)), name
    assert "--ref" in _usage_error(capsys, [f"--samples={files['samples']}", f"--out={out}"])
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        fid.main(["--help"])
    assert e.value.code == 0 and "--inception" in capsys.readouterr().out
