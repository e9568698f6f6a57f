"""Kernel Inception Distance (Binkowski et al., "Demystifying MMD GANs", 2018).

The unbiased estimate of the squared MMD with the polynomial kernel
k(x, y) = (gamma * x.y + coef0)^degree (gamma = 1/D by default, i.e. (x.y/D + 1)^3), averaged
over random subsets. Defaults follow torch-fidelity (100 subsets of 1000 samples, seed 2020,
subsets drawn without replacement with numpy's RandomState in the same order), so the same
features give the same number; the subset size is clipped to the smaller set instead of failing.
"""
from __future__ import annotations

import numpy as np

from ganengine.metrics._convert import as_count, as_features, check_same_dim


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    if gamma is None:
        gamma = 1.0 / x.shape[1]
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 from kernel matrices of two equal-size samples (m x m each)."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def _subset_values(a, b, m, rng, values, degree, gamma, coef0) -> None:
    for i in range(values.shape[0]):
        xa = a[rng.choice(a.shape[0], m, replace=False)]
        xb = b[rng.choice(b.shape[0], m, replace=False)]
        values[i] = mmd2_unbiased(polynomial_kernel(xa, xa, degree, gamma, coef0),
                                  polynomial_kernel(xa, xb, degree, gamma, coef0),
                                  polynomial_kernel(xb, xb, degree, gamma, coef0))


def kernel_inception_distance(features_a, features_b, subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, gamma: float | None = None, coef0: float = 1.0,
                              seed: int = 2020, return_std: bool = False):
    """KID between (N, D) feature sets (torch tensors or numpy arrays), computed in float64.

    Returns the mean over ``subsets`` of the unbiased MMD^2 on random subsets of
    ``min(subset_size, N_a, N_b)`` samples each, or ``(mean, std)`` with ``return_std=True``.
    Deterministic for a given ``seed``. Identical sets give about 0 (the estimate is unbiased,
    so it can be slightly negative).
    """
    a = as_features(features_a, "features_a")
    b = as_features(features_b, "features_b")
    check_same_dim(a, b, "features_a", "features_b")
    subsets = as_count(subsets, 1, "kernel_inception_distance: subsets")
    subset_size = as_count(subset_size, 2, "kernel_inception_distance: subset_size")
    m = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.RandomState(seed)
    values = np.empty(subsets, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # (an overflow is reported below)
        _subset_values(a, b, m, rng, values, degree, gamma, coef0)
        mean, std = float(values.mean()), float(values.std())
        if np.isfinite(values).all() and not np.isfinite(std):  # (the squares overflow: values near 1e154+)
            exponent = int(np.frexp(np.abs(values).max())[1])
            std = float(np.ldexp(np.ldexp(values, -exponent).std(), exponent))  # (powers of two: exact)
    if not (np.isfinite(values).all() and np.isfinite(mean) and (np.isfinite(std) or not return_std)):
        # finite inputs (as_features checks) whose kernel values overflow float64: a NaN or inf here
        # would be a silent wrong answer (KID is not scale-invariant, so nothing to rescale to)
        big = max(float(np.abs(a).max()), float(np.abs(b).max()))
        raise ValueError(f"kernel_inception_distance: the polynomial kernel of features_a and features_b "
                         f"overflows float64 (largest |feature| {big:.3g}, degree {degree}): expected features "
                         "of moderate size (e.g. Inception pool features, |x| of order 1-10); KID is not "
                         "scale-invariant, so rescaled features give another value")
    return (mean, std) if return_std else mean
