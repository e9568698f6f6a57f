"""Numerical check, at rewrite time, that a candidate replacement computes what the original does.

Rules that recognise a module by its structure (a conv subclass whose forward reads a computed
weight, a batch-norm-like class, BigGAN's conditional batch norm, a wrapper that sets its inner
module's weight) do not trust the structure alone: ``same_function`` runs the original and the
candidate on the same small random input, in training and in eval mode, each from the same
saved state, and compares the outputs, the gradients (input and every parameter) and the state
each run leaves behind (running statistics, power-iteration vectors). Everything is restored
afterwards: parameter and buffer values, tensor attributes, training flags and the global RNG
(the probe's inputs come from a private generator), so ``fuse()`` does not change what the
model computes next or the random stream a seeded training run sees.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


class _Saved:
    """Values of every parameter/buffer and the tensor attributes of a set of module trees."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.mods = []
        seen = set()
        for root in modules:
            for m in root.modules():
                if id(m) not in seen:
                    seen.add(id(m))
                    self.mods.append(m)
        self.tensors = {}
        for m in self.mods:
            for t in list(m._parameters.values()) + list(m._buffers.values()):
                if t is not None and id(t) not in self.tensors:
                    self.tensors[id(t)] = (t, t.detach().clone())
        self.attrs = [(m, {k: v for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)}) for m in self.mods]
        self.training = [(m, m.training) for m in self.mods]

    def values(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t, _ in self.tensors.values()]

    def restore(self, flags: bool = False) -> None:
        with torch.no_grad():
            for t, v in self.tensors.values():
                if t.shape == v.shape:
                    t.copy_(v)
        for m, attrs in self.attrs:
            for k in [k for k, v in m.__dict__.items() if isinstance(v, torch.Tensor) and k not in attrs]:
                del m.__dict__[k]
            m.__dict__.update(attrs)
        if flags:
            for m, mode in self.training:
                m.training = mode

    def params(self) -> list[torch.Tensor]:
        return [t for t, _ in self.tensors.values() if isinstance(t, nn.Parameter) and t.requires_grad]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach(), b.detach()
    tol = 1e-2 if a.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    fin = torch.isfinite(a)
    if not torch.equal(fin, torch.isfinite(b)):
        return False
    if not bool(fin.all()):
        an, bn = a[~fin], b[~fin]   # the same inf (with its sign) or NaN at each place
        if not bool(((an == bn) | (an.isnan() & bn.isnan())).all()):
            return False
        a, b = a[fin], b[fin]
    if a.numel() == 0:
        return True
    # probes are tiny: a wrong formula is off by O(1); reorderings (Winograd, GEMM) by ~1e-6. The
    # checks read the tensors in their own precision (fp32's rounding of a - b is ~1e-7 of the
    # larger value, far below tol): the probes of weight-sized tensors (BigGAN's 1536-channel SN
    # convs: weights, their gradients, the state left behind) are what fuse() spends its time on
    scale = 1.0 + a.abs().max().item()
    return (a - b).abs().max().item() <= tol * scale


def same_function(original: Callable, candidate: Callable, modules: Sequence[nn.Module],
                  make_inputs: Callable[[torch.Generator], tuple], modes=(True, False)) -> str | None:
    """None when ``candidate(*inputs)`` equals ``original(*inputs)`` (outputs, gradients, state
    left behind) in every training mode of ``modes``; else a short reason."""
    saved = _Saved(modules)
    devices = sorted({t.device.index or 0 for t, _ in saved.tensors.values() if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices):
            for mode in modes:
                results = []
                for fn in (original, candidate):
                    saved.restore()
                    for m in saved.mods:
                        m.training = mode
                    gen = torch.Generator(device="cpu").manual_seed(1234)
                    inputs = make_inputs(gen)
                    torch.manual_seed(4321)  # the same stream for both runs (dropout and the like)
                    with torch.enable_grad():
                        outs = _tensors(fn(*inputs))
                        if not outs:
                            return "it returned no tensor"
                        diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
                        diff += saved.params()
                        weights = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
                        loss = sum((o.float() * w.float()).sum() for o, w in zip(outs, weights) if o.is_floating_point())
                        grads = (torch.autograd.grad(loss, diff, allow_unused=True)
                                 if isinstance(loss, torch.Tensor) and loss.requires_grad else [])
                    results.append(([o.detach() for o in outs],
                                    [g.detach() if g is not None else None for g in grads], saved.values()))
                (oa, ga, sa), (ob, gb, sb) = results
                where = "training" if mode else "eval"
                if len(oa) != len(ob) or not all(_close(a, b) for a, b in zip(oa, ob)):
                    return f"a probe's outputs differ in {where} mode"
                if len(ga) != len(gb) or not all((a is None) == (b is None) and (a is None or _close(a, b))
                                                 for a, b in zip(ga, gb)):
                    return f"a probe's gradients differ in {where} mode"
                if not all(_close(a, b) for a, b in zip(sa, sb)):
                    return f"the state a probe leaves behind (buffers) differs in {where} mode"
    except Exception as exc:  # a module we do not understand: leave it alone, say why
        return f"the probe run failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    finally:
        saved.restore(flags=True)
    return None


def probe_like(ref: torch.Tensor, shape, gen: torch.Generator, requires_grad: bool = True) -> torch.Tensor:
    t = torch.randn(shape, generator=gen).to(device=ref.device, dtype=ref.dtype)
    return t.requires_grad_(requires_grad)
