"""The Fréchet distance between two sets of feature rows, in float64."""

import numpy as np


# Bump when the classifier or its training changes in a way ClassifierConfig does not show.
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
