"""Frechet distance between two Gaussians fitted to feature sets (FID when the features are Inception's).

    d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})

pytorch-fid computes the last term with ``scipy.linalg.sqrtm(S_a @ S_b)`` and adds ``eps * I`` to
both covariances when that product is near singular. Here it is computed from symmetric
eigendecompositions instead: with R = S_a^{1/2} (eigh, eigenvalues clipped at 0),
tr((S_a S_b)^{1/2}) = sum sqrt(eig(R S_b R)), because R S_b R is similar to S_a S_b and is
symmetric positive semi-definite. This is exact for singular covariances (fewer samples than
dimensions, constant features), needs no eps and never returns complex parts; on
well-conditioned inputs it agrees with the sqrtm formula to float64 rounding.
"""
from __future__ import annotations

import math

import numpy as np

from ganengine.metrics._convert import as_features
from ganengine.metrics.stats import FeatureStats


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


# largest |entry| of a covariance used as given; larger ones are divided by a power of two first,
# as R S_b R (about |S_a| |S_b| D^2) would overflow float64 long before the distance does
_SAFE_COV = 2.0 ** 256


def _even_power_scale(sigma: np.ndarray) -> int:
    """k such that sigma / 4**k has its largest |entry| below 1 (0 when it is below _SAFE_COV)."""
    big = float(np.abs(sigma).max()) if sigma.size else 0.0
    if not big <= _SAFE_COV:
        return (math.frexp(big)[1] + 1) // 2
    return 0


def trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """tr((sigma_a @ sigma_b)^{1/2}) for symmetric PSD matrices, in float64.

    Covariances with entries above 2^256 are divided by 4^k first (exact: powers of two) and
    the trace multiplied back by 2^(k_a + k_b) (tr((aA bB)^{1/2}) = sqrt(ab) tr((AB)^{1/2})),
    so huge but finite features do not overflow the product; smaller ones are used as given."""
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    for name, t in (("sigma_a", sigma_a), ("sigma_b", sigma_b)):
        if not np.isfinite(t).all():
            raise ValueError(f"trace_sqrt_product: {name} contains NaN or infinite values")
    k_a, k_b = _even_power_scale(sigma_a), _even_power_scale(sigma_b)
    if k_a:
        sigma_a = np.ldexp(sigma_a, -2 * k_a)
    if k_b:
        sigma_b = np.ldexp(sigma_b, -2 * k_b)
    root_a = _psd_sqrt(sigma_a)
    with np.errstate(over="ignore", invalid="ignore"):
        m = root_a @ sigma_b @ root_a
    if not np.isfinite(m).all():
        raise ValueError("trace_sqrt_product: sigma_a^(1/2) @ sigma_b @ sigma_a^(1/2) overflows float64 "
                         f"(largest |entry| of sigma_a {np.abs(sigma_a).max():.3g}, of sigma_b "
                         f"{np.abs(sigma_b).max():.3g}): expected covariances of moderate size")
    m = 0.5 * (m + m.T)  # symmetric up to rounding; eigvalsh needs it exactly
    w = np.linalg.eigvalsh(m)
    value = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    return math.ldexp(value, k_a + k_b) if (k_a or k_b) else value


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """Frechet distance from means (D,) and covariances (D, D)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    d = mu_a.shape[0]
    for name, mu, sigma in (("a", mu_a, sigma_a), ("b", mu_b, sigma_b)):
        if mu.shape != (d,) or sigma.shape != (d, d):
            raise ValueError(f"frechet_distance_from_stats: mu_{name} must be ({d},) and sigma_{name} "
                             f"({d}, {d}), got {mu.shape} and {sigma.shape}")
    for name, t in (("mu_a", mu_a), ("sigma_a", sigma_a), ("mu_b", mu_b), ("sigma_b", sigma_b)):
        if not np.isfinite(t).all():
            raise ValueError(f"frechet_distance_from_stats: {name} contains NaN or infinite values")
    diff = mu_a - mu_b
    with np.errstate(over="ignore", invalid="ignore"):
        value = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt_product(sigma_a, sigma_b)
    if not np.isfinite(value):  # finite statistics whose distance overflows float64
        raise ValueError("frechet_distance_from_stats: the distance overflows float64 (largest |entry| of "
                         f"mu_a, mu_b {max(np.abs(mu_a).max(), np.abs(mu_b).max()):.3g}, of sigma_a, sigma_b "
                         f"{max(np.abs(sigma_a).max(), np.abs(sigma_b).max()):.3g}): expected statistics of "
                         "features of moderate size (the distance grows with the square of their scale)")
    # rounding can leave a tiny negative number for identical distributions
    return float(max(value, 0.0))


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between (N, D) feature sets (torch tensors, numpy arrays or FeatureStats).

    Covariances are the unbiased sample covariances (numpy.cov, as pytorch-fid and
    torch-fidelity). Identical sets give 0 up to rounding.
    """
    stats = []
    for name, f in (("features_a", features_a), ("features_b", features_b)):
        if isinstance(f, FeatureStats):
            stats.append((f.mean, f.covariance()))
        else:
            arr = as_features(f, name)
            with np.errstate(over="ignore", invalid="ignore"):
                cov = np.cov(arr, rowvar=False).reshape(arr.shape[1], arr.shape[1])
            if not np.isfinite(cov).all():  # finite features (as_features checks) too large to square
                raise ValueError(f"frechet_distance: the covariance of {name} overflows float64 (largest "
                                 f"|feature| {np.abs(arr).max():.3g}): expected features of moderate size "
                                 "(e.g. Inception pool features, |x| of order 1-10)")
            stats.append((arr.mean(0), cov))
    if stats[0][0].shape != stats[1][0].shape:
        raise ValueError("features_a and features_b must have the same feature dimension, got "
                         f"{stats[0][0].shape[0]} and {stats[1][0].shape[0]}")
    return frechet_distance_from_stats(stats[0][0], stats[0][1], stats[1][0], stats[1][1])


__all__ = ["frechet_distance", "frechet_distance_from_stats", "trace_sqrt_product"]


def intra_class_frechet_distance(real_features, real_labels, fake_features, fake_labels,
                                 return_per_class: bool = False):
    """Intra-class FID (Miyato & Koyama, cGANs with projection discriminator, 2018): the
    Frechet distance between real and generated features of each class, averaged over the
    classes present in ``real_labels``. Every such class needs at least 2 samples on both sides.

    Returns the mean, or ``(mean, {label: distance})`` with ``return_per_class=True``.
    """
    real = as_features(real_features, "real_features")
    fake = as_features(fake_features, "fake_features")
    labels = {}
    for name, lab, feats in (("real_labels", real_labels, real), ("fake_labels", fake_labels, fake)):
        arr = lab.detach().cpu().numpy() if hasattr(lab, "detach") else np.asarray(lab)
        if arr.ndim != 1 or arr.shape[0] != feats.shape[0]:
            raise ValueError(f"intra_class_frechet_distance: {name} must be a 1-D array with one label per "
                             f"feature row ({feats.shape[0]}), got shape {arr.shape}")
        labels[name] = arr
    per_class = {}
    for c in np.unique(labels["real_labels"]).tolist():
        r, f = real[labels["real_labels"] == c], fake[labels["fake_labels"] == c]
        if r.shape[0] < 2 or f.shape[0] < 2:
            raise ValueError(f"intra_class_frechet_distance: class {c!r} has {r.shape[0]} real and {f.shape[0]} "
                             "generated samples; each class needs at least 2 of both")
        per_class[c] = frechet_distance(r, f)
    mean = float(np.mean(list(per_class.values())))
    return (mean, per_class) if return_per_class else mean


__all__ += ["intra_class_frechet_distance"]
