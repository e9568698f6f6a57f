"""The lean CPU route of spectral_norm_weight / run_layer (ops/spectral_norm.py, _lean_layer).

It runs the same C++ kernel as the full route (choose_backend + SpectralNormFn) without the Python
layers around it, so it must give the same bits, forward and backward, leave its inputs alone,
update the module state as the full route does, and hand every call it does not serve (1-D, other
dtypes, strides, dim != 0, bad arguments) to the full route, which serves it or raises the public
error.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ganengine
import ganengine.functional as GF
import ganengine.nn as gnn
from ganengine import backends
from ganengine.ops import _dispatch
from ganengine.ops import spectral_norm as ops

pytestmark = pytest.mark.skipif(not backends.serves("cpu", torch.device("cpu")),
                                reason="the lean route needs the C++ extension")


def _full_route(monkeypatch):
    monkeypatch.setattr(ops, "_lean_layer", lambda *a, **k: None)


def _state(shape=(6, 5, 3, 3), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) * 0.3
    u = F.normalize(torch.randn(shape[0], generator=g, dtype=torch.float64), dim=0).to(dtype)
    v = F.normalize(torch.randn(w[0].numel(), generator=g, dtype=torch.float64), dim=0).to(dtype)
    return w, u, v


def _call(w, u, v, n, order, grad, create_graph=False):
    """(outputs, weight grad, second-order grad) of one call; the used route records last_used."""
    w = w.clone().requires_grad_(grad)
    u0, v0 = u.clone(), (v.clone() if v is not None else None)
    out = GF.spectral_norm_weight(w, u, n, 1e-12, v=v, order=order, return_v=True)
    assert torch.equal(u, u0) and (v is None or torch.equal(v, v0))  # inputs never modified
    gw = gg = None
    if grad:
        gy = torch.linspace(-1, 1, w.numel(), dtype=w.dtype).view_as(w)
        loss = (out[0] * gy).sum() + 0.5 * out[2]
        (gw,) = torch.autograd.grad(loss, w, create_graph=create_graph)
        if create_graph:
            (gg,) = torch.autograd.grad((gw * gw).sum(), w)
    return [t.detach() for t in out], gw, gg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("order", ["pytorch", "classic"])
@pytest.mark.parametrize("with_v", [True, False])
def test_lean_equals_full_route(monkeypatch, dtype, order, with_v):
    w, u, v = _state((7, 3, 3, 3), dtype)
    v = v if with_v else None
    for n in (0, 1, 2):
        if n == 0 and not with_v and order == "pytorch":
            continue  # (2n + 1 = 1 step: covered by n = 1's plan shapes; eval needs v)
        for grad, cg in ((False, False), (True, False), (True, True)):
            _dispatch.last_used.pop("spectral_norm", None)
            lean = _call(w, u, v, n, order, grad, cg)
            assert _dispatch.last_used["spectral_norm"] == "cpu"
            with monkeypatch.context() as m:
                _full_route(m)
                full = _call(w, u, v, n, order, grad, cg)
            for a, b in zip(lean[0], full[0]):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            for a, b in zip(lean[1:], full[1:]):
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_lean_is_the_route_taken(monkeypatch):
    """auto and cpu requests take it; a triton or torch request does not (lean_op says None)."""
    w, u, v = _state()
    seen = []
    real = ops._lean_layer
    def counted(*a):
        out = real(*a)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(ops, "_lean_layer", counted)
    for name, used in (("auto", 1), ("cpu", 1), ("torch", 0)):
        seen.clear()
        with ganengine.use_backend(name):
            GF.spectral_norm_weight(w, u, v=v)
        assert sum(seen) == used and _dispatch.last_used["spectral_norm"] == ("torch" if name == "torch" else "cpu")


@pytest.mark.parametrize("case", ["one_dim", "half", "strided", "dim1", "bad_u", "u_dtype", "bad_v", "bad_n",
                                  "bad_eps", "bad_order"])
def test_not_served_takes_the_full_route(monkeypatch, case):
    w, u, v = _state((6, 4, 3, 3))
    kw = dict(v=v)
    args = [w, u, 1, 1e-12]
    if case == "one_dim":
        args[:2] = [torch.randn(6), u]
        kw = {}
    elif case == "half":
        args[:2] = [w.half(), u.half()]
        kw = dict(v=v.half())
    elif case == "strided":  # (4, 6, 3, 3) transposed to (6, 4, 3, 3): not contiguous
        args[0] = w.transpose(0, 1).contiguous().transpose(0, 1)
    elif case == "dim1":
        kw = dict(v=torch.randn(6 * 9), dim=1)
        args[1] = F.normalize(torch.randn(4), dim=0)
    elif case == "bad_u":
        args[1] = torch.randn(5)
    elif case == "u_dtype":
        args[1] = u.double()
    elif case == "bad_v":
        kw = dict(v=torch.randn(7))
    elif case == "bad_n":
        args[2] = -1
    elif case == "bad_eps":
        args[3] = 0.0
    elif case == "bad_order":
        kw["order"] = "Classic"
    try:
        ours = GF.spectral_norm_weight(*args, **kw)
    except Exception as e:  # the full route's own error, raised once
        ours = e
    with monkeypatch.context() as m:
        _full_route(m)
        try:
            full = GF.spectral_norm_weight(*args, **kw)
        except Exception as e:
            full = e
    if isinstance(full, Exception):
        assert type(ours) is type(full) and str(ours) == str(full)
        assert case in ("bad_u", "u_dtype", "bad_v", "bad_n", "bad_eps", "bad_order")
    else:
        assert not isinstance(ours, Exception)
        assert all(torch.equal(a, b) for a, b in zip(ours, full))


@pytest.mark.parametrize("grad", [False, True])
def test_module_state_matches_full_route(monkeypatch, grad):
    """gnn.spectral_norm's forward (run_layer, in place): same outputs, u/v buffers and grads."""
    def run():
        torch.manual_seed(3)
        conv = gnn.spectral_norm(torch.nn.Conv2d(3, 5, 3))
        x = torch.randn(2, 3, 6, 6)
        outs = []
        for _ in range(2):
            with torch.set_grad_enabled(grad):
                y = conv(x)
                if grad:
                    y.square().sum().backward()
            outs.append(y.detach())
        bufs = [b.clone() for b in conv.buffers()]
        grads = [p.grad.clone() for p in conv.parameters() if p.grad is not None]
        return outs, bufs, grads

    lean = run()
    with monkeypatch.context() as m:
        _full_route(m)
        full = run()
    for a, b in zip(lean, full):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(lean[1]) >= 2 and (len(lean[2]) > 0) == grad


@pytest.mark.parametrize("grad", [False, True])
def test_kernel_error_that_is_not_a_refusal_propagates(monkeypatch, grad):
    """Only the kernel's own argument checks (messages starting with the op name) hand the call to
    the full route; any other error from the kernel is the call's error, raised as it is."""
    w, u, v = _state()
    w.requires_grad_(grad)

    def broken(*a, **k):
        raise RuntimeError("internal failure")

    def refusing(*a, **k):
        raise RuntimeError("spectral_norm_fwd: weights[0] must be contiguous")

    for fake, served_by_full_route in ((broken, False), (refusing, True)):
        with monkeypatch.context() as m:
            if grad:
                m.setattr(ops.SpectralNormFn, "apply", staticmethod(fake))
            else:
                m.setattr(_dispatch, "lean_op", lambda *a, **k: fake)
            if served_by_full_route:
                assert ops._lean_layer(w, u, v, 0, 1, 1e-12, False) is None
            else:
                with pytest.raises(RuntimeError, match="internal failure"):
                    ops._lean_layer(w, u, v, 0, 1, 1e-12, False)
