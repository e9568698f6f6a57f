"""Regression tests of the s16 acceptance findings on the ops: EMA over tied parameters with a target
network, batch norm's torch backend in eval with strided running statistics, and the cpu backend's
conv + instance norm epilogue in the centred form (a one-pixel map normalises to exactly 0)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ganengine.functional as GF
from ganengine.train import EMA
from tests._backends import backend_params, on_backend


# ----------------------------------------------------------------------------- EMA, tied parameters
class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 3)
        self.out = nn.Linear(3, 4, bias=False)
        self.out.weight = self.emb.weight  # one Parameter under two state-dict keys


def test_ema_target_averages_a_tied_parameter_once_per_update():
    torch.manual_seed(0)
    live, target = _Tied(), _Tied()
    target.load_state_dict(live.state_dict())
    for ema in (EMA(live, decay=0.5), EMA(live, decay=0.5, target=target)):
        before = {k: v.clone() for k, v in ema.shadow.items()}
        with torch.no_grad():
            live.emb.weight += 1.0
        ema.update()
        for key in ("emb.weight", "out.weight"):  # lerp(s, s + 1, 0.5): +0.5 (twice would be +0.75)
            torch.testing.assert_close(ema.shadow[key], before[key] + 0.5, rtol=0, atol=1e-6)
        with torch.no_grad():
            live.emb.weight -= 1.0


# ----------------------------------------------------------------------------- batch norm, strided stats
@pytest.mark.parametrize("per_sample", [False, True])
def test_batch_norm_eval_with_strided_running_stats_channels_last(per_sample):
    """Eval mode reads the running statistics only: strided views of one buffer (a slice) must give
    the same gradients as dense ones (torch's CPU batch-norm backward does not, channels_last)."""
    torch.manual_seed(0)
    n, c = 3, 4
    x = (torch.randn(n, c, 3, 5, dtype=torch.float64) * 2 + 1).contiguous(memory_format=torch.channels_last)
    buf_m, buf_v = 0.1 * torch.randn(2 * c, dtype=torch.float64), 1 + torch.rand(2 * c, dtype=torch.float64)
    rm, rv = buf_m[::2], buf_v[::2]
    if per_sample:
        w, b = 1 + 0.3 * torch.randn(n, c, dtype=torch.float64), 0.3 * torch.randn(n, c, dtype=torch.float64)
        shape = (n, c, 1, 1)
    else:
        w, b = 1 + 0.3 * torch.randn(c, dtype=torch.float64), 0.3 * torch.randn(c, dtype=torch.float64)
        shape = (1, c, 1, 1)
    g = torch.randn(5, 3, c, n, dtype=torch.float64).permute(3, 2, 1, 0)  # (a permuted gradient too)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    z = (xr - rm.view(1, c, 1, 1)) / (rv.view(1, c, 1, 1) + 1e-5).sqrt() * wr.view(shape) + b.view(shape)
    F.leaky_relu(z, 0.2).backward(g)
    for backend in [p.values[0] for p in backend_params() if not p.marks]:
        xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
        with on_backend(backend):
            if per_sample:
                y = GF.conditional_batch_norm_act(xo, wo, b, rm, rv, training=False, activation="leaky_relu")
            else:
                y = GF.batch_norm_act(xo, rm, rv, wo, b, training=False, activation="leaky_relu")
        y.backward(g)
        torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-12, atol=1e-12, msg=backend)
        torch.testing.assert_close(wo.grad, wr.grad, rtol=1e-12, atol=1e-12, msg=backend)


# ----------------------------------------------------------------------------- conv + IN, one pixel
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", ["leaky_relu", "relu", "none"])
def test_conv_instance_norm_one_pixel_map_is_exactly_the_activated_bias(backend, channels_last, act):
    """A 1x1 conv output per (n, c): x - mean is exactly 0, so every backend gives act(norm_bias)
    (the uncentred x * a + (b - mean * a) gave rounding noise scaled by 1 / sqrt(eps))."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 4, 4) * 3 + 5, torch.randn(20, 3, 4, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    nb = torch.randn(20)
    with on_backend(backend):
        y = GF.conv2d_instance_norm_act(x, w, None, 1, 0, torch.rand(20) + 0.5, nb, activation=act)
    expected = {"leaky_relu": F.leaky_relu(nb, 0.2), "relu": F.relu(nb), "none": nb}[act]
    assert torch.equal(y, expected.view(1, 20, 1, 1).expand(2, 20, 1, 1)), (y - expected.view(1, 20, 1, 1)).abs().max()


# ----------------------------------------------------------------------------- relu and non-finite values
def _relu_cases(dtype=torch.float32):
    """(name, fn(x), eager fn(x)) over one (1, 3, 6, 6) input: each op with activation relu."""
    torch.manual_seed(0)
    w3 = (torch.randn(2, 3, 3, 3) * 0.3).to(dtype)
    cases = [
        ("instance_norm_act", lambda t: GF.instance_norm_act(t, activation="relu"),
         lambda t: F.relu(F.instance_norm(t))),
        ("conv2d_instance_norm_act", lambda t: GF.conv2d_instance_norm_act(t, w3, None, 1, 1, activation="relu"),
         lambda t: F.relu(F.instance_norm(F.conv2d(t, w3, None, 1, 1)))),
        ("batch_norm_act", lambda t: GF.batch_norm_act(t, training=True, activation="relu"),
         lambda t: F.relu(F.batch_norm(t, None, None, training=True))),
        ("conv2d_act", lambda t: GF.conv2d_act(t, w3, None, 1, 1, negative_slope=0.0),
         lambda t: F.relu(F.conv2d(t, w3, None, 1, 1))),
    ]
    return cases


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", range(4), ids=lambda i: _relu_cases()[i][0])
def test_relu_gradient_is_zero_where_inactive_even_for_an_inf_upstream_gradient(backend, case):
    """relu's gradient is threshold_backward's: 0 where z <= 0 also for an inf upstream gradient
    (g * slope with slope 0 gave NaN, spread over the plane by the norm's sums)."""
    dtype = torch.float32  # (float64 takes the differentiable composition on the torch backend)
    name, fn, ref = _relu_cases(dtype)[case]
    torch.manual_seed(1)
    x = torch.randn(1, 3, 6, 6, dtype=dtype)
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    g = torch.ones_like(y_ref)
    idx = (y_ref == 0).nonzero()[0]
    g[tuple(idx)] = float("inf")
    (dx_ref,) = torch.autograd.grad(y_ref, xr, g)
    assert torch.isfinite(dx_ref).all()
    xo = x.clone().requires_grad_()
    with on_backend(backend):  # (the backward too: it runs on the backend selected when it runs)
        (dx,) = torch.autograd.grad(fn(xo), xo, g)
    assert torch.isfinite(dx).all(), f"{name}: {dx.isnan().sum().item()} NaN of {dx.numel()}"
    # (fp32 norm backward against eager's fp32: a few hundred u at most at these sizes)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", backend_params())
def test_relu_of_a_minus_inf_preactivation_is_zero(backend):
    """F.relu(-inf) is 0 (-inf * 0 would be NaN): a -inf norm bias, on every backend."""
    x = torch.randn(2, 2, 3, 3)
    bias = torch.tensor([float("-inf"), 0.5])
    with on_backend(backend):
        y = GF.instance_norm_act(x, torch.ones(2), bias, activation="relu")
        yc = GF.conv2d_instance_norm_act(x, torch.randn(2, 2, 3, 3), None, 1, 1, None, bias, activation="relu")
    for out in (y, yc):
        assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0])), out[:, 0]
        assert torch.isfinite(out).all()
