"""FID, sFID and the Inception Score, computed as OpenAI's guided-diffusion evaluator computes them.

* FID and sFID: the Fréchet distance between Gaussians fitted to the Inception features of the
  samples and of the reference batch (``pool_3`` for FID, the 2023 spatial features for sFID),
  ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``, with the unbiased covariance
  (``np.cov``'s ``N - 1``). The evaluator takes ``scipy.linalg.sqrtm`` of ``S1 S2``; only its
  trace enters, and here that is the sum of the square roots of the eigenvalues of a
  symmetric matrix with the same eigenvalues (``trace_sqrt_product``): the same number where
  ``sqrtm`` is accurate, no complex round-off where the covariances are singular (fewer
  images than features), and with few images a small eigenproblem instead of a 2048 x 2048 one.
* Inception Score: the softmax of the 1008 logits (no bias), split into consecutive runs of
  5000 samples (10 at 50,000; a shorter last run counts as a split; see ``inception_score`` on
  the order), ``exp`` of the mean KL
  divergence between each sample's class distribution and its split's mean, averaged over
  splits. Computed here in float64 from log-probabilities (the evaluator takes the log of a
  float32 softmax, which fails on probabilities that round to 0).

Everything is float64 numpy; a reference batch's precomputed ``mu``/``sigma`` enter as they are.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

IS_SPLIT_SIZE = 5000
_CHUNK = 4096  # rows per step of the covariance sum (bounds the float64 copy)


class GaussianStats(NamedTuple):
    """A feature set's mean ``(F,)`` and covariance ``(F, F)``, float64; with fewer images than
    features also ``factor_NF``, the centred features over ``sqrt(N - 1)`` (``sigma = f.T @ f``)."""

    mu_F: np.ndarray
    sigma_FF: np.ndarray
    factor_NF: np.ndarray | None = None


def gaussian_stats(features_NF: np.ndarray) -> GaussianStats:
    """Mean and unbiased covariance of ``(N, F)`` features (N >= 2), accumulated in float64 chunks."""
    if features_NF.ndim != 2 or len(features_NF) < 2:
        raise ValueError(f"need (N, F) features with N >= 2 for a covariance, got {features_NF.shape}")
    n = len(features_NF)
    mu = np.zeros(features_NF.shape[1])
    for start in range(0, n, _CHUNK):
        mu += features_NF[start : start + _CHUNK].sum(0, dtype=np.float64)
    mu /= n
    if n <= len(mu):
        factor = (features_NF.astype(np.float64) - mu) / np.sqrt(n - 1)
        stats = GaussianStats(mu, factor.T @ factor, factor)
    else:
        scatter = np.zeros((len(mu), len(mu)))
        for start in range(0, n, _CHUNK):
            centred = features_NF[start : start + _CHUNK].astype(np.float64) - mu
            scatter += centred.T @ centred
        stats = GaussianStats(mu, scatter / (n - 1))
    check_stats(stats, "features")
    return stats


def check_stats(stats: GaussianStats, what: str) -> None:
    """A ``ValueError`` unless ``stats`` is a finite ``(F,)`` mean and ``(F, F)`` covariance."""
    mu, sigma = stats.mu_F, stats.sigma_FF
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{what}: mu {mu.shape} and sigma {sigma.shape} are not (F,) and (F, F)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{what}: the statistics hold NaN or infinite values")


def _psd_sqrt(sigma_FF: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (round-off negative eigenvalues count as 0)."""
    w, v = np.linalg.eigh(sigma_FF)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _sum_sqrt_eigenvalues(m: np.ndarray) -> float:
    """The sum of the square roots of a PSD matrix's eigenvalues (round-off negatives count as 0)."""
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())


def trace_sqrt_product(a: GaussianStats, b: GaussianStats) -> float:
    """``tr((S1 S2)^(1/2))`` for covariances, the sum of the square roots of the eigenvalues of
    ``S1 S2``. With factors ``S = f.T f`` on both sides: the singular values of ``f1 f2.T`` summed
    (their squares are those eigenvalues; no square root of round-off). With one: the eigenvalues
    of the small ``f S2 f.T`` (those of ``f.T (f S2)``). Otherwise those of ``R S2 R``, ``R = S1^(1/2)``."""
    if a.factor_NF is not None and b.factor_NF is not None:
        return float(np.linalg.svd(a.factor_NF @ b.factor_NF.T, compute_uv=False).sum())
    if a.factor_NF is None and b.factor_NF is not None:
        a, b = b, a  # S1 S2 and S2 S1 have the same eigenvalues
    if a.factor_NF is not None:
        f = a.factor_NF
        return _sum_sqrt_eigenvalues(f @ b.sigma_FF @ f.T)
    r = _psd_sqrt(a.sigma_FF)
    return _sum_sqrt_eigenvalues(r @ b.sigma_FF @ r)


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """The Fréchet distance between two Gaussians (FID on pool_3 statistics, sFID on spatial ones)."""
    check_stats(a, "first statistics")
    check_stats(b, "second statistics")
    if a.mu_F.shape != b.mu_F.shape:
        raise ValueError(f"the statistics have {len(a.mu_F)} and {len(b.mu_F)} features")
    diff = a.mu_F - b.mu_F
    return float(diff @ diff + np.trace(a.sigma_FF) + np.trace(b.sigma_FF) - 2.0 * trace_sqrt_product(a, b))


def _log_softmax(logits_NK: np.ndarray) -> np.ndarray:
    shifted = logits_NK - logits_NK.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def inception_score(
    logits_NK: np.ndarray, split_size: int = IS_SPLIT_SIZE, shuffle_seed: int | None = None
) -> float:
    """The evaluator's Inception Score of ``(N, K)`` logits: splits of ``split_size`` samples.

    The splits are runs of consecutive rows, so the score depends on their order: samples stored
    class by class (``sample.py --fid_npz``) put 100 ImageNet classes in each split of 50,000 and
    cap the score near 100. ``shuffle_seed``: split a random permutation of the rows instead (as
    the arbitrary file order of a PNG folder packed into an ``.npz`` does); None keeps the order.
    """
    if logits_NK.ndim != 2 or len(logits_NK) < 1:
        raise ValueError(f"need (N, K) logits with N >= 1, got {logits_NK.shape}")
    if shuffle_seed is not None:
        logits_NK = logits_NK[np.random.default_rng(shuffle_seed).permutation(len(logits_NK))]
    logp_NK = _log_softmax(np.asarray(logits_NK, np.float64))
    scores = []
    for start in range(0, len(logp_NK), split_size):
        logp = logp_NK[start : start + split_size]
        p = np.exp(logp)
        # log of the split's mean class distribution, without underflow
        top = logp.max(0)
        log_marginal = top + np.log(np.exp(logp - top).mean(0))
        scores.append(np.exp(np.mean(np.sum(p * (logp - log_marginal), 1))))
    return float(np.mean(scores))
