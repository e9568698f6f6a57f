"""Shared test helpers: which backends can run CPU tensors here, and running an op on one."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

import ganengine
from ganengine import backends

CPU_BACKENDS = ["torch", "cpu", "triton"]


def backend_params(names=CPU_BACKENDS):
    """pytest params for backends; unavailable ones skip with the reason from backends.status()."""
    out = []
    status = backends.status()
    for name in names:
        ok = backends.serves(name, torch.device("cpu"))
        marks = [] if ok else [pytest.mark.skip(reason=f"{name}: {status[name]}")]
        out.append(pytest.param(name, id=name, marks=marks))
    return out


@contextlib.contextmanager
def on_backend(name: str):
    """Run on backend ``name`` with fallback forbidden, so a silent fallback fails the test."""
    with ganengine.use_backend(name), backends.strict():
        yield


def out_round(backend: str, dtype: torch.dtype, device="cpu") -> float:
    """Multiple of u(dtype) a backend's final conversion to ``dtype`` may cost: 1 (round to
    nearest), 2 for bf16 from the Triton interpreter, whose fp32 -> bf16 cast truncates
    (triton/runtime/interpreter.py, cast_impl without a rounding mode; measured: errors up to
    0.99996 ulp). On a GPU Triton rounds to nearest."""
    interp = os.environ.get("TRITON_INTERPRET") == "1" and torch.device(device).type == "cpu"
    return 2.0 if backend == "triton" and dtype == torch.bfloat16 and interp else 1.0


def tol(dtype: torch.dtype, n: int, scale: float = 1.0, c: float = 1.0, acc_dtype: torch.dtype | None = None) -> dict:
    """assert_close tolerances from the error bound (tests/_tolerance.py) of a length-n
    reduction accumulated in ``acc_dtype`` (fp32 for fp16/bf16/fp32 data, fp64 for fp64) with
    sum|terms| <= ``scale`` (normwise) and a stated constant ``c``: atol = c gamma_n(acc) scale,
    rtol = u(dtype) for storing the result in ``dtype``."""
    from tests._tolerance import _TINY, gamma, unit_roundoff

    acc = acc_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    return dict(atol=c * gamma(n, acc) * scale + _TINY[dtype], rtol=unit_roundoff(dtype))


def autograd_node_names(t: torch.Tensor, name=lambda fn: type(fn).__name__) -> set[str]:
    """Names of the autograd nodes behind ``t`` (which route served a call: an eager twin's node
    class is named after its custom op, "ganengine::<op>Backward"). ``name``: what to read off a
    node (its class name; ``fn.name()`` gives a C++ autograd Function's own name)."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(name(fn))
        todo.extend(nxt for nxt, _ in fn.next_functions)
    return names


def route_results(y: torch.Tensor, inputs, dtype) -> list[torch.Tensor]:
    """What two routes of one op must agree on bitwise: the output, the first-order gradients
    (backward body or op), the create_graph gradients and the double backward through the first
    two inputs' gradients, for a fixed output gradient."""
    gy = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(y.device)
    grads = torch.autograd.grad(y, inputs, gy, create_graph=True)
    first = torch.autograd.grad(y, inputs, gy)  # (create_graph=False: the backward body / op)
    gg = torch.autograd.grad(sum((g * g).sum() for g in grads[:2]), inputs[:2])
    return [y, *first, *grads, *gg]


def assert_same_bits(a_list, b_list) -> None:
    for a, b in zip(a_list, b_list, strict=True):
        assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)


class CudaEntryResolver:
    """``_dispatch.cuda_entry`` resolved afresh under a requested backend, with the build's CUDA
    kernels (``cuda_kernels``) and the backends serving CUDA tensors (``serving``) faked, so the
    rules of which C++ entry a CUDA call takes are tested without a GPU:
    ``resolve = CudaEntryResolver(monkeypatch); resolve("auto", "conv2d_act", "conv2d_act", kernels)``."""

    def __init__(self, monkeypatch):
        from ganengine import _ext

        self.cuda_kernels = True
        self.serving = {"cuda": True, "triton": True}
        self._mp = monkeypatch
        real_has = _ext.has_kernel
        monkeypatch.setattr(_ext, "has_kernel",
                            lambda op, key: self.cuda_kernels if key == "CUDA" else real_has(op, key))
        monkeypatch.setattr(backends, "serves", lambda name, device: self.serving.get(name, True))

    def __call__(self, backend: str, name: str, op: str, kernels: tuple = (), variant: str | None = None):
        from ganengine.ops import _dispatch

        self._mp.setattr(_dispatch, "_CUDA_ENTRY", {})
        self._mp.setattr(_dispatch, "_SERVED", {})
        with ganengine.use_backend(backend):
            return _dispatch.cuda_entry(name, op, kernels, variant)
