"""Regression tests for the non-finite cases tests/test_properties.py found in the Triton kernels
(run under TRITON_INTERPRET=1 on CPU tensors; on every backend, so the cpu and torch ones are
held to the same eager numbers). docs/nonfinite.md states the policies.

* relu (slope 0) at z = -inf: eager 0; `z > 0 ? z : z * slope` gave -inf * 0 = NaN.
* relu's gradient: eager's threshold_backward gives 0 where z <= 0 even for an inf / NaN upstream
  gradient, and the gradient where z is NaN; `g * slope` gave NaN / 0.
* batch norm eval backward: dx = grad * scale; the training formula's x_hat * 0 term gave NaN
  at an infinite x.
* batch norm training at |x| ~ 1e20: the Chan merge's first step delta^2 * 0 = inf * 0 gave NaN
  statistics; eager: inf M2, invstd 0, act(bias), running_var inf.
* attention with a NaN gamma on a saturated (one-hot) row: the exact-zero dS shortcut hid the
  NaN; eager's dq, dk, dv are NaN.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ganengine.functional as GF
from ganengine.ops import attention as A
from tests._backends import backend_params, on_backend

BACKENDS = backend_params(["torch", "cpu", "triton"])
INF, NAN = float("inf"), float("nan")


def _same_nonfinite(a, e, what):
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN positions differ: {a} vs {e}"
    assert torch.equal(a.isinf(), e.isinf()) and torch.equal(a[a.isinf()], e[e.isinf()]), f"{what}: inf differ"
    fin = e.isfinite()
    # (eval batch norm is elementwise: a few fp32 roundings of values O(1) on both sides, so
    # 16 u relative + 16 u absolute; a wrong formula or branch is off by O(1))
    u = 2.0 ** -24
    assert torch.allclose(a[fin], e[fin], rtol=16 * u, atol=16 * u), f"{what}: {a} vs {e}"


def _bn_case(conditional):
    x = torch.tensor([-INF, NAN, -1.0, 2.0, INF, 0.5]).reshape(1, 1, 2, 3)
    grad = torch.tensor([1.0, 1.0, NAN, INF, 1.0, -2.0]).reshape(1, 1, 2, 3)
    w, b = torch.tensor([1.5]), torch.tensor([-0.25])
    rm, rv = torch.tensor([0.3]), torch.tensor([0.8])
    if conditional:
        w, b = w[None], b[None]
    return x, grad, w, b, rm, rv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
@pytest.mark.parametrize("conditional", [False, True], ids=["bn", "cbn"])
def test_batch_norm_eval_nonfinite(backend, act, conditional):
    """Eval mode: inf / NaN inputs and upstream gradients, per element, as eager."""
    x, grad, w, b, rm, rv = _bn_case(conditional)

    def eager(a, ww, bb):
        if conditional:
            z = F.batch_norm(a, rm, rv, None, None, False) * ww[:, :, None, None] + bb[:, :, None, None]
        else:
            z = F.batch_norm(a, rm, rv, ww, bb, False)
        return F.relu(z) if act == "relu" else F.leaky_relu(z, 0.2)

    def fused(a, ww, bb):
        fn = GF.conditional_batch_norm_act if conditional else GF.batch_norm_act
        if conditional:
            return fn(a, ww, bb, rm, rv, training=False, activation=act)
        return fn(a, rm, rv, ww, bb, training=False, activation=act)

    results = []
    for f, ctx in ((eager, None), (fused, backend)):
        ins = [t.clone().requires_grad_() for t in (x, w, b)]
        if ctx is None:
            y = f(*ins)
        else:
            with on_backend(ctx):
                y = f(*ins)
        y.backward(grad)
        results.append((y.detach(), ins[0].grad))
    (ye, dxe), (y, dx) = results
    _same_nonfinite(y, ye, "y")
    _same_nonfinite(dx, dxe, "dx")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_training_overflow_not_nan(backend):
    """|x| ~ 1e20 in training: eager's M2 overflows fp32: invstd 0, y = act(bias), running_var inf."""
    x = (torch.tensor([1.0, -2.0, 3.0, -0.5, 2.5, -1.5], dtype=torch.float64).reshape(1, 1, 2, 3) * 1e20).float()
    w, b = torch.tensor([1.5]), torch.tensor([0.25])
    rm, rv, erm, erv = torch.zeros(1), torch.ones(1), torch.zeros(1), torch.ones(1)
    ye = F.relu(F.batch_norm(x, erm, erv, w, b, True))
    with on_backend(backend):
        y = GF.batch_norm_act(x, rm, rv, w, b, training=True, activation="relu")
    assert torch.equal(y, ye) and torch.equal(ye, torch.full_like(x, 0.25))
    assert rv.isinf().all() and erv.isinf().all() and torch.allclose(rm, erm)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [1, 3])
def test_attention_nan_gamma_saturated(backend, m):
    """One key (m = 1) or a one-hot softmax (scores 1e4 apart): dS's shortcut must keep NaN."""
    q = torch.tensor([[[1.0, -2.0]]]) * (100.0 if m > 1 else 1.0)          # (b, d=1, n=2)
    k = torch.tensor([[[1.0, -1.0, 0.5]]])[..., :m] * (100.0 if m > 1 else 1.0)  # (b, 1, m)
    v = torch.randn(1, 2, m, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 2, 2, generator=torch.Generator().manual_seed(1))
    gam = torch.tensor([NAN])
    go = torch.ones(1, 2, 2)

    def grads(fn):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*ins)
        return torch.autograd.grad(out, ins, go)

    ge = grads(lambda a, bb, cc: A.reference_attention(a, bb, cc, x, gam))
    with on_backend(backend):
        gs = grads(lambda a, bb, cc: A.attention(a, bb, cc, x, gam))
    for a, e, name in zip(gs, ge, ["dq", "dk", "dv"]):
        assert torch.equal(a.isnan(), e.isnan()), f"{name}: {a} vs eager {e}"


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_triton_nonfinite_on_gpu(act):
    """The same cases compiled for the GPU (the interpreter runs numpy, a GPU runs PTX)."""
    x, grad, w, b, rm, rv = (t.cuda() for t in _bn_case(False))
    outs = []
    for backend in ("torch", "triton"):
        xx = x.clone().requires_grad_()
        with on_backend(backend):
            y = GF.batch_norm_act(xx, rm.clone(), rv.clone(), w, b, training=False, activation=act)
        y.backward(grad)
        outs.append((y.detach().cpu(), xx.grad.cpu()))
    _same_nonfinite(outs[1][0], outs[0][0], "y")
    _same_nonfinite(outs[1][1], outs[0][1], "dx")
    xh = (torch.tensor([1.0, -2.0, 3.0, -0.5, 2.5, -1.5], dtype=torch.float64).reshape(1, 1, 2, 3) * 1e20).float().cuda()
    with on_backend("triton"):
        y = GF.batch_norm_act(xh, None, None, w, b, training=True, activation=act)
    assert torch.equal(y.cpu(), F.relu(b.cpu()).expand(1, 1, 2, 3) if act == "relu" else
                       F.leaky_relu(b.cpu(), 0.2).expand(1, 1, 2, 3).reshape(1, 1, 2, 3))
    q, k = torch.ones(1, 1, 2, device="cuda"), torch.ones(1, 1, 1, device="cuda")
    v, xa = torch.ones(1, 2, 1, device="cuda"), torch.zeros(1, 2, 2, device="cuda")
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    with on_backend("triton"):
        out = A.attention(*ins, xa, torch.tensor([NAN], device="cuda"))
    for g_ in torch.autograd.grad(out, ins, torch.ones_like(out)):
        assert g_.isnan().all()
