"""``restored(tensors)``: run something, then put the tensors' values back in place.
``running_state(module)``: the tensors a forward may change in place (for ``restored``).
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


def running_state(module: torch.nn.Module) -> list[torch.Tensor]:
    """What a forward may change in place: the buffers (running statistics, spectral-norm vectors)
    and the Parameters a submodule names in ``running_parameters()`` (SAGAN's reference
    SpectralNorm keeps its u / v as Parameters and steps them on every forward; their requires_grad
    says nothing: a model's ``set_requires_grad(G, True)`` turns it on with the rest, and an EMA
    copy's frozen weights, which no forward changes, would be cloned for nothing)."""
    out = list(module.buffers())
    seen = {id(t) for t in out}
    for m in module.modules():
        for p in getattr(m, "running_parameters", lambda: ())():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def version(t: torch.Tensor) -> int:
    """``t._version``; -1 for an inference tensor, which keeps no version counter (and cannot be
    changed in place outside inference mode)."""
    return -1 if t.is_inference() else t._version
