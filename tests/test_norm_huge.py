"""Norm statistics at huge finite values, as eager: ATen's CPU batch / instance norm accumulates in
double but stores the variance sum M2 = sum (x - mean)^2 in fp32, so a plane (channel) whose M2
exceeds fp32 max (n var > 3.4e38: |x| = 1e20, 1e30, or 16 values of +-4.7e18) gets invstd 0 and
the output act(bias); below that it normalises. The cpu kernels, accumulating in fp32, redo an
overflowed plane in double and round its M2 to fp32 (csrc/cpu/stats_fp64.h), so they take the
same decision at the boundary, and a plane near fp32 max (whose fp32 *sum* overflows: mean inf,
NaN output before) gives eager's act(bias). Forward and backward, NCHW and channels_last.
docs/nonfinite.md states the policy (and the triton backend's difference)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ganengine.functional as GF
from tests._backends import backend_params, on_backend
from tests._norm_bounds import instance_norm_act_bounds
from tests._tolerance import assert_below, gamma

BACKENDS = backend_params(["torch", "cpu"])
FP32_MAX = torch.finfo(torch.float32).max


def _planes(shape, mag, channels_last, seed=0, offset=0.5):
    g = torch.Generator().manual_seed(seed)
    x = ((torch.randn(shape, generator=g, dtype=torch.float64) + offset) * mag).float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _run(fn, inputs, grad):
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*ins)
    return y, torch.autograd.grad(y, ins, grad)


def _instance(backend, x, w, b, go):
    with on_backend(backend):
        return _run(lambda a, ww, bb: GF.instance_norm_act(a, ww, bb), [x, w, b], go)


def _instance_eager(x, w, b, go):
    return _run(lambda a, ww, bb: F.leaky_relu(F.instance_norm(a, weight=ww, bias=bb), 0.2), [x, w, b], go)


def _assert_collapsed_as_eager(got, eager, n_red, what, go):
    """Eager's collapse: y = act(bias) and dx = dw = 0 exactly (invstd 0); db = sum g' in any
    order: within gamma_n sum |g| (normwise: the total |go| bounds every channel's sum)."""
    (y, (dx, dw, db)), (ye, (dxe, dwe, dbe)) = got, eager
    assert torch.equal(y, ye), f"{what}: y is not eager's act(bias)"
    assert torch.equal(dx, dxe) and not dx.any(), f"{what}: dx"
    assert torch.equal(dw, dwe), f"{what}: dw"
    assert ((db - dbe).abs() <= 2 * gamma(n_red, torch.float32) * go.abs().sum()).all(), f"{what}: db"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mag", [1e20, 1e30])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_instance_norm_act_huge_collapses_as_eager(backend, mag, channels_last):
    x = _planes((2, 3, 5, 7), mag, channels_last)
    g = torch.Generator().manual_seed(1)
    w, b, go = torch.randn(3, generator=g), torch.randn(3, generator=g), torch.randn(x.shape, generator=g)
    eager = _instance_eager(x, w, b, go)
    assert torch.equal(eager[0], F.leaky_relu(b, 0.2)[None, :, None, None].expand(x.shape)), "eager's rule changed"
    _assert_collapsed_as_eager(_instance(backend, x, w, b, go), eager, 2 * 35, "instance_norm_act", go)


# (the torch backend takes var_mean's fp32 variance: it collapses only at var > fp32 max, so
# between n var > max and var > max it normalises where eager does not; not swept here)
@pytest.mark.parametrize("backend", backend_params(["cpu"]))
@pytest.mark.parametrize("sd", [4.5e18, 4.7e18], ids=["normalises", "collapses"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_instance_norm_act_overflow_boundary(backend, sd, channels_last):
    """16 values +-sd per plane: M2 = 16 sd^2 is 3.24e38 (fits fp32) or 3.53e38 (does not)."""
    x = (torch.tensor([1.0, -1.0] * 8, dtype=torch.float64).reshape(1, 1, 4, 4).repeat(2, 3, 1, 1) * sd).float()
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    g = torch.Generator().manual_seed(1)
    w, b, go = torch.randn(3, generator=g), torch.randn(3, generator=g), torch.randn(x.shape, generator=g)
    got, eager = _instance(backend, x, w, b, go), _instance_eager(x, w, b, go)
    if 16 * sd * sd > FP32_MAX:
        _assert_collapsed_as_eager(got, eager, 2 * 16, "instance_norm_act", go)
        return
    ref, (rdx, rdw, rdb) = _instance_eager(x.double(), w.double(), b.double(), go.double())
    bnd = instance_norm_act_bounds(x, w, b, go)
    for a, r, e, name in zip([got[0], *got[1]], [ref, rdx, rdw, rdb], [bnd.y, bnd.dx, bnd.dw, bnd.db],
                             ["y", "dx", "dw", "db"]):
        assert_below(a, r, e, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_instance_norm_act_near_fp32_max(backend, channels_last):
    """Values near 1e38: the fp32 sum overflows (mean inf: NaN out before); eager's double sum does
    not, its M2 (~1e71) does: act(bias). (Not a constant plane of 1e38: eager's shift form
    b - mean * invstd overflows there and gives -inf; the cpu kernels give act(bias) exactly.)"""
    x = _planes((2, 3, 4, 4), 1e37, channels_last, offset=10.0)  # (10 + randn) 1e37: finite, sum > 1e39
    assert x.isfinite().all() and (x.double().sum((2, 3)) > torch.finfo(torch.float32).max).all()
    g = torch.Generator().manual_seed(1)
    w, b, go = torch.randn(3, generator=g), torch.randn(3, generator=g), torch.randn(x.shape, generator=g)
    got, eager = _instance(backend, x, w, b, go), _instance_eager(x, w, b, go)
    assert got[0].isfinite().all(), "NaN / inf where eager is finite"
    assert torch.equal(got[0], eager[0])


def _bn(backend, x, w, b, go, conditional, rm, rv):
    n, c = x.shape[:2]
    with on_backend(backend):
        if conditional:  # (the per-sample pair repeats one per-channel pair: batch norm's numbers)
            y, (dx, dw, db) = _run(lambda a, ww, bb: GF.conditional_batch_norm_act(a, ww, bb, rm, rv),
                                   [x, w.expand(n, c), b.expand(n, c)], go)
            return y, (dx, dw.sum(0), db.sum(0))
        return _run(lambda a, ww, bb: GF.batch_norm_act(a, rm, rv, ww, bb), [x, w, b], go)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mag", [1e20, 1e30])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("conditional", [False, True], ids=["bn", "cbn"])
def test_batch_norm_act_huge_collapses_as_eager(backend, mag, channels_last, conditional):
    x = _planes((3, 4, 3, 5), mag, channels_last)
    g = torch.Generator().manual_seed(1)
    w, b, go = 1 + torch.randn(4, generator=g), torch.randn(4, generator=g), torch.randn(x.shape, generator=g)
    rm, rv, erm, erv = torch.zeros(4), torch.ones(4), torch.zeros(4), torch.ones(4)
    got = _bn(backend, x, w, b, go, conditional, rm, rv)
    eager = _run(lambda a, ww, bb: F.relu(F.batch_norm(a, erm, erv, ww, bb, True, 0.1, 1e-5)), [x, w, b], go)
    assert torch.equal(eager[0], F.relu(b)[None, :, None, None].expand(x.shape)), "eager's rule changed"
    _assert_collapsed_as_eager(got, eager, 45, "batch_norm_act", go)
    # running statistics as eager's: the mean (finite) and the variance (inf: M2 overflowed)
    assert torch.equal(rv.isinf(), erv.isinf()) and rv.isinf().all()
    # rm = 0.1 * mean: each side's channel mean within gamma_{n+2} sum|x| / n (the sum's order, which
    # the thread count picks; the values cancel, so relative to the mean this exceeds a few u), the
    # momentum products a few u of |rm|
    n = x.numel() // 4
    e_mean = 0.1 * gamma(n + 2, torch.float32) * x.double().abs().transpose(0, 1).reshape(4, -1).sum(1) / n
    assert ((rm.double() - erm.double()).abs() <= 2 * e_mean + 4 * 2 ** -24 * erm.double().abs()).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sd", [4.5e18, 4.7e18], ids=["normalises", "collapses"])
@pytest.mark.parametrize("conditional", [False, True], ids=["bn", "cbn"])
def test_batch_norm_act_overflow_boundary(backend, sd, conditional):
    x = (torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(8).reshape(2, 1, 2, 4).repeat(1, 3, 1, 1) * sd).float()
    g = torch.Generator().manual_seed(1)
    w, b, go = 1 + torch.randn(3, generator=g), torch.randn(3, generator=g), torch.randn(x.shape, generator=g)
    got = _bn(backend, x, w, b, go, conditional, torch.zeros(3), torch.ones(3))
    eager = _run(lambda a, ww, bb: F.relu(F.batch_norm(a, None, None, ww, bb, True, 0.1, 1e-5)), [x, w, b], go)
    if 16 * sd * sd > FP32_MAX:
        _assert_collapsed_as_eager(got, eager, 2 * 16, "batch_norm_act", go)
        return
    # normalises: within the bound of the (1, C, N, H*W) view (batch norm's channel = one plane)
    def view(t):
        return t.transpose(0, 1).reshape(1, 3, 2, 8)

    def back(t):
        return t.reshape(3, 2, 2, 4).transpose(0, 1)

    ref, (rdx, rdw, rdb) = _run(lambda a, ww, bb: F.relu(F.batch_norm(a, None, None, ww, bb, True, 0.1, 1e-5)),
                                [x.double(), w.double(), b.double()], go.double())
    bnd = instance_norm_act_bounds(view(x), w, b, view(go), "relu")
    assert_below(got[0], ref, back(bnd.y), name="y")
    assert_below(got[1][0], rdx, back(bnd.dx), name="dx")
    assert_below(got[1][1], rdw, 2 * bnd.dw, name="dw")  # (2: cbn sums per sample, then over n)
    assert_below(got[1][2], rdb, 2 * bnd.db, name="db")
