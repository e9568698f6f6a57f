"""Streaming mean / covariance of feature vectors: constant memory, float64, mergeable.

``FeatureStats`` keeps the count, the mean and the sum of centred outer products (``M2``) in
float64 on the features' device, and updates them batch by batch with Chan et al.'s pairwise
formula, which stays accurate where the textbook ``E[xx^T] - mu mu^T`` loses digits. The result
depends only on the batches and their order (no atomics), so it is deterministic; two partial
statistics (other processes, other loaders) combine exactly with ``merge``.
"""
from __future__ import annotations

import numpy as np
import torch


class FeatureStats:
    """Running statistics of (N, D) feature batches. ``update(batch)``, then ``mean``/``covariance()``."""

    def __init__(self, dim: int | None = None, device: torch.device | str | None = None):
        self.dim = dim
        self.device = torch.device(device) if device is not None else None
        self.count = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    def _init(self, dim: int, device: torch.device) -> None:
        self.dim = dim
        self.device = device
        self._mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self._m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features) -> "FeatureStats":
        """Add an (N, D) batch (torch tensor or numpy array). Returns self."""
        x = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
        if x.dim() != 2:
            raise ValueError(f"FeatureStats.update: features must be (N, D), got shape {tuple(x.shape)}")
        if self._mean is None:
            if self.dim is not None and x.shape[1] != self.dim:
                raise ValueError(f"FeatureStats.update: expected {self.dim} features per row, got {x.shape[1]}")
            self._init(x.shape[1], self.device if self.device is not None else x.device)
        elif x.shape[1] != self.dim:
            raise ValueError(f"FeatureStats.update: expected {self.dim} features per row, got {x.shape[1]}")
        n_b = x.shape[0]
        if n_b == 0:
            return self
        x = x.detach().to(self.device, torch.float64)
        if not bool(torch.isfinite(x).all()):  # (else FID fails later in an eigen-solver, unexplained)
            raise ValueError("FeatureStats.update: the features contain NaN or infinite values: were the "
                             "images finite? (a diverged generator gives NaN images)")
        mean_b = x.mean(0)
        xc = x - mean_b
        m2_b = xc.T @ xc
        self._combine(n_b, mean_b, m2_b)
        return self

    def _combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Fold another FeatureStats into this one (as if its batches had been added here)."""
        if not isinstance(other, FeatureStats):
            raise TypeError(f"FeatureStats.merge: expected a FeatureStats, got {type(other).__name__}")
        if other.count == 0:
            return self
        if self._mean is None:
            self._init(other.dim, self.device if self.device is not None else other.device)
        elif other.dim != self.dim:
            raise ValueError(f"FeatureStats.merge: dimensions differ ({self.dim} vs {other.dim})")
        self._combine(other.count, other._mean.to(self.device), other._m2.to(self.device))
        return self

    @property
    def mean(self) -> np.ndarray:
        self._check_ready(1)
        return self._mean.cpu().numpy()

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """Sample covariance (``ddof=1``, as numpy.cov and pytorch-fid) as a float64 array."""
        self._check_ready(ddof + 1)
        return (self._m2 / (self.count - ddof)).cpu().numpy()

    def _check_ready(self, need: int) -> None:
        if self.count < need:
            raise ValueError(f"FeatureStats: need at least {need} samples, have {self.count}")

    def state_dict(self) -> dict:
        """Plain tensors, for checkpoints or for all-gathering across processes."""
        return {"count": self.count, "mean": self._mean, "m2": self._m2}

    @classmethod
    def from_state_dict(cls, state: dict) -> "FeatureStats":
        stats = cls()
        if state["count"]:
            stats._init(state["mean"].shape[0], state["mean"].device)
            stats.count = int(state["count"])
            stats._mean = state["mean"].to(torch.float64)
            stats._m2 = state["m2"].to(torch.float64)
        return stats
