"""FID / sFID, Inception Score and precision/recall against independent formulations and the evaluator.

Three kinds of reference:

* ``tests/fixtures/eval/evaluator_reference.json``: the numbers that OpenAI's guided-diffusion
  evaluator (MVAR's ``utils/evaluations/c2i/evaluator.py``, run unmodified with TensorFlow 2.21
  on the CPU) reports for ``evaluator_inputs()``, written by a script kept outside the repository
  (the evaluator is not committed); the inputs' checksums are stored beside them, so that a
  change in numpy's generator shows as such;
* numpy/scipy renderings written here (``scipy.linalg.sqrtm`` FID, a float64 Inception Score,
  brute-force nearest neighbours, float16 arithmetic done by numpy);
* closed forms (diagonal covariances, equal covariances, confident classes).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import scipy.linalg

from mvar_jax.eval import metrics, precision_recall
from mvar_jax.eval.metrics import GaussianStats

EVALUATOR_REFERENCE = pathlib.Path(__file__).parent / "fixtures" / "eval" / "evaluator_reference.json"


def evaluator_inputs() -> dict[str, np.ndarray]:
    """The seeded arrays the evaluator scored for the fixture (the fixture script imports this)."""
    rng = np.random.default_rng(2024)
    mix = rng.normal(size=(64, 64)) / 8
    centres = rng.normal(size=(10, 16))
    return {
        # pool_3-like: non-negative, correlated; 500 and 400 images of 64 features
        "fid_a": np.maximum(rng.normal(0.0, 1.0, (500, 64)) @ mix, 0),
        "fid_b": np.maximum(rng.normal(0.2, 1.1, (400, 64)) @ mix, 0),
        # IS from 12000 "pool" rows and the softmax weights: 3 splits (5000, 5000, 2000)
        "is_pool": np.abs(rng.normal(0.0, 1.0, (12000, 32))).astype(np.float32),
        "is_weights": rng.normal(0.0, 0.4, (32, 16)).astype(np.float32),
        # 10 clusters in the reference, 7 of them, wider, in the samples
        "pr_ref": (centres[rng.integers(0, 10, 600)] + rng.normal(0, 0.7, (600, 16))).astype(np.float32),
        "pr_samples": (centres[rng.integers(0, 7, 500)] + rng.normal(0, 0.75, (500, 16))).astype(np.float32),
    }


def checksums(inputs: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.sum(v, dtype=np.float64)) for k, v in inputs.items()}


@pytest.fixture(scope="module")
def evaluator():
    inputs = evaluator_inputs()
    expected = json.loads(EVALUATOR_REFERENCE.read_text())
    np.testing.assert_allclose(
        list(checksums(inputs).values()), list(expected["checksums"].values()), rtol=1e-12, err_msg="inputs"
    )
    return inputs, expected


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_fid_matches_the_evaluator(evaluator):
    x, expected = evaluator
    fid = metrics.frechet_distance(metrics.gaussian_stats(x["fid_a"]), metrics.gaussian_stats(x["fid_b"]))
    assert _rel(fid, expected["fid"]) < 1e-9
    # fewer images than features: singular covariances (the evaluator's sqrtm is good to ~1e-8 there)
    low = metrics.frechet_distance(
        metrics.gaussian_stats(x["fid_a"][:40]), metrics.gaussian_stats(x["fid_b"][:30])
    )
    assert _rel(low, expected["fid_low_rank"]) < 1e-6


def test_inception_score_matches_the_evaluator(evaluator):
    x, expected = evaluator
    logits = x["is_pool"].astype(np.float64) @ x["is_weights"].astype(np.float64)
    # the evaluator's softmax is float32
    assert _rel(metrics.inception_score(logits), expected["inception_score"]) < 1e-6


def test_precision_recall_match_the_evaluator(evaluator):
    """TensorFlow on the CPU sums the float16 squared norms in another order than the float32
    accumulation here (and on GPUs), which may move a point across a sphere: one point at most."""
    x, expected = evaluator
    precision, recall = precision_recall.precision_recall(x["pr_ref"], x["pr_samples"])
    assert 0.2 < precision < 0.95 and 0.2 < recall < 0.95  # far from the trivial values
    assert abs(precision - expected["precision"]) <= 1 / 500 + 1e-12
    assert abs(recall - expected["recall"]) <= 1 / 600 + 1e-12


def _scipy_fid(a_NF: np.ndarray, b_NF: np.ndarray) -> float:
    mu1, mu2 = a_NF.mean(0), b_NF.mean(0)
    s1, s2 = np.cov(a_NF, rowvar=False), np.cov(b_NF, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_matches_scipy_sqrtm_and_statistics_match_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (300, 24)) @ rng.normal(0, 1, (24, 24))
    b = rng.normal(0.5, 2, (200, 24))
    stats = metrics.gaussian_stats(a.astype(np.float32))
    np.testing.assert_allclose(stats.mu_F, a.astype(np.float32).mean(0, dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma_FF, np.cov(a.astype(np.float32), rowvar=False), rtol=1e-10)
    fid = metrics.frechet_distance(metrics.gaussian_stats(a), metrics.gaussian_stats(b))
    assert _rel(fid, _scipy_fid(a, b)) < 1e-10


def test_fid_closed_forms():
    rng = np.random.default_rng(1)
    va, vb = rng.uniform(0.1, 3, 32), rng.uniform(0.1, 3, 32)
    mu_a, mu_b = rng.normal(size=32), rng.normal(size=32)
    fid = metrics.frechet_distance(GaussianStats(mu_a, np.diag(va)), GaussianStats(mu_b, np.diag(vb)))
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    assert _rel(fid, expected) < 1e-12
    # Equal covariances leave |mu1 - mu2|^2, also with fewer images than features (the factor path,
    # with one factor or two) and with more (the general path). One factor and a singular sigma
    # leave a zero eigenvalue whose round-off enters through its square root: ~1e-7.
    shift = rng.normal(size=64)
    for n in (20, 200):
        x = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64))
        a, b = metrics.gaussian_stats(x), metrics.gaussian_stats(x + shift)
        assert (a.factor_NF is not None) == (n <= 64)
        assert _rel(metrics.frechet_distance(a, b), shift @ shift) < 1e-9
        assert _rel(metrics.frechet_distance(a, GaussianStats(b.mu_F, b.sigma_FF)), shift @ shift) < 1e-6


def test_fid_rejects_bad_statistics():
    good = GaussianStats(np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        metrics.frechet_distance(good, GaussianStats(np.array([0, np.nan, 0]), np.eye(3)))
    with pytest.raises(ValueError, match="features"):
        metrics.frechet_distance(good, GaussianStats(np.zeros(4), np.eye(4)))
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.gaussian_stats(np.ones((1, 3)))


def _numpy_inception_score(logits_NK: np.ndarray, split: int) -> float:
    p = np.exp(logits_NK - logits_NK.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split):
        part = p[i : i + split]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def test_inception_score_formula_splits_and_closed_forms():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (11000, 20))
    assert _rel(metrics.inception_score(logits), _numpy_inception_score(logits, 5000)) < 1e-12
    # 5000-sample splits: the score of two halves is the mean of theirs
    halves = [metrics.inception_score(logits[:5000]), metrics.inception_score(logits[5000:10000])]
    assert _rel(metrics.inception_score(logits[:10000]), np.mean(halves)) < 1e-12
    assert metrics.inception_score(np.zeros((50, 1008))) == pytest.approx(1.0, abs=1e-12)
    # K classes drawn equally often, each predicted with certainty: IS = K
    confident = 200.0 * np.eye(8)[np.arange(4000) % 8]
    assert metrics.inception_score(confident) == pytest.approx(8.0, rel=1e-12)
    # stored class by class, each split of 5000 sees 4 of the 8 classes; shuffled, all 8
    by_class = 200.0 * np.eye(8)[np.arange(10000) // 1250]
    assert metrics.inception_score(by_class) == pytest.approx(4.0, rel=1e-12)
    assert metrics.inception_score(by_class, shuffle_seed=0) == pytest.approx(8.0, rel=1e-3)


def _brute_force_precision_recall(ref: np.ndarray, samples: np.ndarray) -> tuple[float, float]:
    """Float64, every pair, ``<=``: the algorithm without the evaluator's float16 rounding."""

    def d2(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

    def radii(x):
        return np.sort(d2(x, x), 1)[:, precision_recall.K]

    d = d2(ref, samples)
    return float((d <= radii(ref)[:, None]).any(0).mean()), float(
        (d <= radii(samples)[None, :]).any(1).mean()
    )


@pytest.mark.parametrize("block", [precision_recall.BLOCK, 7])
def test_precision_recall_exact_on_small_integers(monkeypatch, block):
    """Small integer features: every float16 step is exact, so the evaluator's arithmetic equals
    float64's, ties and all (distances equal to radii are frequent here and count as inside).
    A block of 7 runs the many-block paths (radii across column blocks, flags across both)."""
    monkeypatch.setattr(precision_recall, "BLOCK", block)
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 4, (40, 6)).astype(np.float32)
    samples = rng.integers(1, 5, (33, 6)).astype(np.float32)
    np.testing.assert_array_equal(
        precision_recall.manifold_radii(ref), np.sort(((ref[:, None] - ref[None]) ** 2).sum(-1), 1)[:, 3]
    )
    result = precision_recall.precision_recall(ref, samples)
    assert result == _brute_force_precision_recall(ref, samples)
    assert 0 < result[0] < 1 and 0 < result[1] < 1


def test_distances_round_like_float16_arithmetic():
    """Against numpy doing the evaluator's steps in float16 (squares, sums and the product
    accumulated in float32): the same values but where a float32 sum in another order rounds
    to the other side of a float16 step."""
    rng = np.random.default_rng(4)
    u = np.maximum(rng.normal(0.3, 0.5, (120, 256)), 0).astype(np.float32)
    v = np.maximum(rng.normal(0.3, 0.5, (90, 256)), 0).astype(np.float32)
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    norm_u = (u16 * u16).sum(1, dtype=np.float32).astype(np.float16)
    norm_v = (v16 * v16).sum(1, dtype=np.float32).astype(np.float16)
    dot = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    expected = np.maximum((norm_u[:, None] - 2 * dot) + norm_v[None, :], np.float16(0)).astype(np.float32)
    got = np.asarray(precision_recall.distance_block(u, v))
    assert np.mean(got == expected) > 0.99
    # a norm one float16 step off moves the distance by that step (or rounds it one step)
    step = np.spacing(np.maximum(norm_u[:, None], norm_v[None, :])).astype(np.float32)
    assert np.all(np.abs(got - expected) <= step)
    # the rounding is real: float64 distances differ from it by more than float32 round-off
    exact = ((u[:, None].astype(np.float64) - v[None]) ** 2).sum(-1)
    assert np.max(np.abs(got - exact) / exact) > 1e-4


def test_float16_overflow_falls_back_to_float32():
    rng = np.random.default_rng(5)
    ref = rng.normal(0, 300, (30, 8)).astype(np.float32)  # squared norms beyond float16's 65504
    samples = rng.normal(0, 300, (25, 8)).astype(np.float32)
    d = np.asarray(precision_recall.distance_block(ref, samples))
    exact = ((ref[:, None].astype(np.float64) - samples[None]) ** 2).sum(-1)
    assert np.isfinite(d).all() and np.max(np.abs(d - exact) / exact) < 1e-4
    assert precision_recall.precision_recall(ref, samples) == _brute_force_precision_recall(ref, samples)


def test_precision_recall_needs_four_points():
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall.precision_recall(np.zeros((3, 2), np.float32), np.zeros((9, 2), np.float32))


def _random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, 2 * dim))
    return a @ a.T / (2 * dim) + 0.1 * np.eye(dim)


def test_fid_of_covariances_that_do_not_commute():
    """2x2: tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2))); and a distribution is at
    distance 0 from itself."""
    s1, s2 = np.array([[2.0, 0.7], [0.7, 1.0]]), np.array([[1.0, -0.4], [-0.4, 3.0]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    p = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(p) + 2 * np.sqrt(np.linalg.det(p)))
    expected = 0.5**2 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    got = metrics.frechet_distance(GaussianStats(np.zeros(2), s1), GaussianStats(np.array([0.5, 0.0]), s2))
    assert got == pytest.approx(expected, rel=1e-12)
    s = GaussianStats(np.ones(16), _random_covariance(np.random.default_rng(0), 16))
    assert abs(metrics.frechet_distance(s, s)) < 1e-9


def test_fid_of_samples_estimates_the_gaussians_distance():
    """Features drawn from two known Gaussians: the estimate converges to the closed form."""
    rng = np.random.default_rng(2)
    mu1, mu2 = np.zeros(4), np.array([1.0, 0.0, -0.5, 0.0])
    s1, s2 = np.diag([1.0, 2.0, 0.5, 1.0]), _random_covariance(rng, 4)
    x1 = rng.multivariate_normal(mu1, s1, size=200_000)
    x2 = rng.multivariate_normal(mu2, s2, size=200_000)
    exact = metrics.frechet_distance(GaussianStats(mu1, s1), GaussianStats(mu2, s2))
    estimate = metrics.frechet_distance(metrics.gaussian_stats(x1), metrics.gaussian_stats(x2))
    assert estimate == pytest.approx(exact, abs=0.02)
