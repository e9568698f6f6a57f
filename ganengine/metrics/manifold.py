"""k-nearest-neighbour manifold metrics on feature sets: precision/recall and density/coverage.

* Precision and recall (Kynkaanniemi et al., "Improved Precision and Recall Metric for Assessing
  Generative Models", NeurIPS 2019): each sample's k-NN ball (radius = distance to its k-th
  nearest neighbour in its own set) approximates the set's manifold; precision is the fraction
  of fake samples inside some real ball, recall the fraction of real samples inside some fake
  ball.
* Density and coverage (Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative
  Models", ICML 2020): density = (1/k) * mean over fakes of the number of real balls containing
  it (can exceed 1); coverage = fraction of real samples whose ball contains at least one fake.

Conventions follow each metric's authors' code: Euclidean distances, the k-th neighbour counted
without the sample itself; a point is inside a ball at ``distance <= radius`` for precision/recall
(kynkaat/improved-precision-and-recall-metric, as NVlabs' stylegan2-ada-pytorch: with duplicated
samples the radius is 0 and a set still covers itself) and at ``distance < radius`` for
density/coverage (clovaai/generative-evaluation-prdc). Everything is computed in float64, in row chunks, so
memory stays bounded (about 256 MB of distances at a time) for 50k x 50k sets.
"""
from __future__ import annotations

import math
from collections import namedtuple

import numpy as np
import torch

from ganengine.metrics._convert import as_count, as_features, check_same_dim

_CHUNK_ELEMENTS = 1 << 25  # float64 distances held at once (256 MB)


def _keyed_tuple(name: str, fields: str, doc: str):
    """A named tuple that also reads like a dict: ``result["precision"]``, ``keys()``, ``items()``."""
    base = namedtuple(name, fields)

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._fields:
                raise KeyError(key)
            return getattr(self, key)
        return tuple.__getitem__(self, key)

    return type(name, (base,), {"__slots__": (), "__doc__": doc, "__getitem__": __getitem__,
                                "keys": lambda self: self._fields,
                                "items": lambda self: zip(self._fields, self),
                                "__module__": __name__})


PrecisionRecall = _keyed_tuple("PrecisionRecall", "precision recall", "(precision, recall), both in [0, 1].")
DensityCoverage = _keyed_tuple("DensityCoverage", "density coverage", "(density, coverage).")


def _tensor(features, name: str) -> torch.Tensor:
    return torch.from_numpy(as_features(features, name))


# |feature| bounds inside which the Euclidean distances neither overflow nor lose their squares to
# underflow (|a - b|^2 summed over D columns): inside them the features are used as given
_SAFE_MAX, _SAFE_MIN = 2.0 ** 64, 2.0 ** -64


def _common_scale(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets divided by one power of two when their largest |value| is outside
    [2^-64, 2^64] (huge features: the squared distances overflow to inf, and ``inf <= inf``
    holds; tiny ones: they underflow to 0), so that it lies in [0.5, 1). The metrics only
    compare distances within one common scale, so they are scale-invariant, and dividing by a
    power of two is exact (every distance is divided by the same power of two), so the answer
    is the unscaled one. Features inside the bounds are returned as they are (bit-identical)."""
    big = max(real.abs().max().item(), fake.abs().max().item())
    if big == 0.0 or _SAFE_MIN <= big <= _SAFE_MAX:
        return real, fake
    _, exponent = math.frexp(big)  # big = m * 2**exponent, 0.5 <= m < 1
    return (torch.from_numpy(np.ldexp(real.numpy(), -exponent)),
            torch.from_numpy(np.ldexp(fake.numpy(), -exponent)))


def _check_k(k, n_min: int, fn: str) -> int:
    k = as_count(k, 1, f"{fn}: k")
    if k >= n_min:
        raise ValueError(f"{fn}: k={k} needs more than k samples in each set (the k-th neighbour "
                         f"excludes the sample itself), got {n_min}")
    return k


def _chunks(n_rows: int, n_cols: int):
    step = max(1, _CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # direct differences, not the |a|^2 - 2ab + |b|^2 expansion: exact zeros for duplicates
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row (the sample itself excluded)."""
    out = torch.empty(features.shape[0], dtype=torch.float64)
    for s, e in _chunks(features.shape[0], features.shape[0]):
        d = _distances(features[s:e], features)
        # column k of the k+1 smallest: index 0 is the sample itself (distance 0)
        out[s:e] = torch.topk(d, k + 1, dim=1, largest=False).values[:, k]
    return out


def _inside_any(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each point: whether some centre's (closed) ball contains it."""
    out = torch.empty(points.shape[0], dtype=torch.bool)
    for s, e in _chunks(points.shape[0], centres.shape[0]):
        out[s:e] = (_distances(points[s:e], centres) <= radii[None, :]).any(dim=1)
    return out


def precision_recall(real_features, fake_features, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall of (N, D) fake features against (M, D) real features.

    Returns ``PrecisionRecall(precision, recall)``: a named tuple (``p, r = ...``), also
    readable as ``result.precision`` or ``result["precision"]``. Both lie in [0, 1].
    """
    real = _tensor(real_features, "real_features")
    fake = _tensor(fake_features, "fake_features")
    check_same_dim(real.numpy(), fake.numpy(), "real_features", "fake_features")
    real, fake = _common_scale(real, fake)
    _check_k(k, min(real.shape[0], fake.shape[0]), "precision_recall")
    precision = _inside_any(fake, real, knn_radii(real, k)).double().mean().item()
    recall = _inside_any(real, fake, knn_radii(fake, k)).double().mean().item()
    return PrecisionRecall(precision, recall)


def density_coverage(real_features, fake_features, k: int = 5) -> DensityCoverage:
    """Density and coverage of (N, D) fake features against (M, D) real features.

    Returns ``DensityCoverage(density, coverage)`` (named tuple, also ``result["density"]``).
    Coverage lies in [0, 1]; density is about 1 for matching distributions and can exceed 1.
    """
    real = _tensor(real_features, "real_features")
    fake = _tensor(fake_features, "fake_features")
    check_same_dim(real.numpy(), fake.numpy(), "real_features", "fake_features")
    real, fake = _common_scale(real, fake)
    _check_k(k, real.shape[0], "density_coverage")
    radii = knn_radii(real, k)
    count = torch.zeros(fake.shape[0], dtype=torch.float64)   # real balls containing each fake
    nearest = torch.full((real.shape[0],), float("inf"), dtype=torch.float64)  # nearest fake per real
    for s, e in _chunks(fake.shape[0], real.shape[0]):
        d = _distances(fake[s:e], real)                      # (fakes, reals)
        count[s:e] = (d < radii[None, :]).sum(dim=1).double()
        nearest = torch.minimum(nearest, d.min(dim=0).values)
    density = (count.mean() / k).item()
    coverage = (nearest < radii).double().mean().item()
    return DensityCoverage(density, coverage)


__all__ = ["precision_recall", "density_coverage", "PrecisionRecall", "DensityCoverage", "knn_radii"]
