"""Shared test helpers: which backends can run CPU tensors here, and running an op on one."""
from __future__ import annotations

import contextlib

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


def tol(dtype: torch.dtype) -> dict:
    return {
        torch.float64: dict(atol=1e-10, rtol=1e-10),
        torch.float32: dict(atol=2e-5, rtol=2e-5),
        torch.float16: dict(atol=1e-2, rtol=1e-2),
        torch.bfloat16: dict(atol=6e-2, rtol=4e-2),
    }[dtype]
