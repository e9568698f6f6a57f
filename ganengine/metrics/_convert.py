"""Turning user inputs (torch tensors, numpy arrays) into float64 arrays, with clear errors."""
from __future__ import annotations

import numbers

import numpy as np
import torch


def as_features(x, name: str) -> np.ndarray:
    """An (N, D) float64 numpy array from a torch tensor or array-like of features."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    else:
        x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be an (N, D) array of features, got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples (rows), got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} must have the same feature dimension, got "
                         f"{a.shape[1]} and {b.shape[1]}")


def as_count(value, minimum: int, what: str) -> int:
    """``value`` as a Python int >= ``minimum``: any integer (Python's, numpy's, a 0-d integer
    tensor), not a bool or a float; ``what`` is the error's opening, e.g. "inception_score: splits"."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{what} must be {kind}, got {value!r}")
    return int(value)
