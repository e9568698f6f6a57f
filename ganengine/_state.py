"""``restored(tensors)``: run something, then put the tensors' values back in place.

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
