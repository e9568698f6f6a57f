"""Inception Score (Salimans et al., "Improved Techniques for Training GANs", 2016).

    IS = exp( E_x KL( p(y|x) || p(y) ) )

computed as the original code does (openai/improved-gan ``inception_score.py``, also what
BigGAN-PyTorch's ``inception_utils`` and most papers report): the N samples are cut in
``splits`` consecutive parts, in their given order (no shuffling), the score is computed per
part with p(y) the part's mean prediction, and the mean and standard deviation over the parts
are reported. The parts are ``[i*N//splits, (i+1)*N//splits)``, so every sample is used.

Input is the classifier's logits (N, classes), turned into probabilities with a float64
log-softmax; the KL term is computed from log-probabilities, so confident predictions
(p(y|x) = 0 for most classes) give exact zeros instead of ``0 * log 0`` NaNs.
"""
from __future__ import annotations

import numpy as np
import torch

from ganengine.metrics._convert import as_count


class InceptionScore(float):
    """The score's mean (a float: compare, format, add it like one) with ``.std`` and
    ``.scores`` (one per split) attached; it also unpacks as ``mean, std = inception_score(...)``
    like the reference implementations' ``(mean, std)`` tuples."""

    std: float
    scores: tuple[float, ...]

    def __new__(cls, mean: float, std: float, scores):
        obj = super().__new__(cls, mean)
        obj.std = float(std)
        obj.scores = tuple(float(s) for s in scores)
        return obj

    @property
    def mean(self) -> float:
        return float(self)

    def __iter__(self):
        return iter((float(self), self.std))

    def __len__(self) -> int:
        return 2

    def __repr__(self) -> str:
        return f"InceptionScore(mean={float(self):.6g}, std={self.std:.6g}, splits={len(self.scores)})"


def _log_probs(logits) -> torch.Tensor:
    x = logits.detach() if isinstance(logits, torch.Tensor) else torch.as_tensor(np.asarray(logits))
    if x.dim() != 2:
        raise ValueError(f"inception_score: logits must be (N, classes), got shape {tuple(x.shape)}")
    if x.shape[1] < 2:
        raise ValueError(f"inception_score: logits need at least 2 classes, got {x.shape[1]}")
    if not x.is_floating_point():
        raise TypeError(f"inception_score: logits must be floating point, got {x.dtype}")
    x = x.to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("inception_score: logits contain NaN or infinite values")
    return torch.log_softmax(x, dim=1)


def inception_score(logits, splits: int = 10) -> InceptionScore:
    """Inception Score of (N, classes) classifier logits (torch tensor or array), over ``splits``
    consecutive parts. Returns an :class:`InceptionScore`: a float (the mean over the parts)
    carrying ``.std`` and ``.scores``, which unpacks as ``(mean, std)``.

    Pass logits, not softmax outputs: probabilities given as logits would be re-normalised.
    Bounds: 1 <= IS <= classes (1 when every prediction is the same; the number of classes when
    each part's predictions are confident and spread evenly over the classes).
    """
    splits = as_count(splits, 1, "inception_score: splits")
    log_p = _log_probs(logits)
    n = log_p.shape[0]
    if n < splits:
        raise ValueError(f"inception_score: {n} samples cannot be cut into splits={splits} parts; "
                         f"pass at least {splits} samples or fewer splits")
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        # log p(y) = log mean_x p(y|x), computed stably
        log_py = torch.logsumexp(part, dim=0) - np.log(part.shape[0])
        p = part.exp()
        kl = (p * (part - log_py)).sum(dim=1)
        scores.append(float(torch.exp(kl.mean())))
    arr = np.asarray(scores, dtype=np.float64)
    return InceptionScore(arr.mean(), arr.std(), scores)


__all__ = ["inception_score", "InceptionScore"]
