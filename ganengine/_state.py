"""``restored(tensors)``: run something, then put the tensors' values back in place.
``version(t)``: a tensor's version counter (bumped by every in-place change), for staleness checks.

Used wherever ganengine runs a network for its own purposes (export's trial call, evaluation and
sample draws in training mode) and must leave its running statistics, spectral-norm vectors or
weights as the training left them."""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch


@contextlib.contextmanager
def restored(tensors: Iterable[torch.Tensor]):
    saved = [(t, t.detach().clone()) for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, v in saved:
                t.copy_(v)


def version(t: torch.Tensor) -> int:
    """``t._version``; -1 for an inference tensor, which keeps no version counter (and cannot be
    changed in place outside inference mode)."""
    return -1 if t.is_inference() else t._version
