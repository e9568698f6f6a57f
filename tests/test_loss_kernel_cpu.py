"""The CPU adversarial-loss kernel itself (ganengine_C::losses_adv_fwd, csrc/cpu/losses.cpp):

* the BCE term's log1p(exp(-|x|)) is a fitted polynomial in fp32 (log1p_unit: relative error
  4.8e-9 in exact arithmetic, under 2 ulp in fp32), not Sleef's log1p: checked element by element
  over the whole range of logits, relative to each term, where the loss is tiny (x >> 0 against a
  real target: log1p(e^-x) ~ e^-x) as well as where it is large, and at +-inf / NaN against eager;
* every mode over lengths around the vector widths (four accumulators of 8 or 16 lanes, then a
  scalar tail; fp16/bf16 converted in blocks of 512), forward and the gradient written in the pass.

Bounds (tests/_tolerance.py): 32 copies of one logit summed in fp32: |error| <= gamma_32 * 32 s
for the summation plus 32 times the term's own error, <= 4 u s (exp 1 ulp, the polynomial 2, the
additions 1; s = what the formula adds in absolute value: (1 - t)|x| + |min(x, 0)| + log1p(e)).
A length-n total: gamma_{n + 8} * sum of the terms' s (tests/test_losses.py's rule).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ganengine import _ext
from tests._tolerance import gamma, unit_roundoff

pytestmark = pytest.mark.skipif(not (_ext.loaded() and _ext.has_kernel("losses_adv_fwd", "CPU")),
                                reason="needs the C++ loss kernels")

BCE, MSE, HINGE_REAL, HINGE_FAKE, LINEAR = range(5)


def _fwd(xs, modes, targets, scales, want_grad=False):
    return torch.ops.ganengine_C.losses_adv_fwd(xs, modes, targets, scales, want_grad)


def _bce64(x, t):
    x = x.double()
    return (1 - t) * x - torch.clamp(x, max=0) + torch.log1p(torch.exp(-x.abs()))


@pytest.mark.parametrize("t", [1.0, 0.0, 0.3])
def test_bce_term_relative_accuracy_over_the_range(t):
    # logits from -90 to 90 (exp(-|x|) from 1 down to below fp32's smallest normal), dense near 0
    xs = torch.cat([torch.linspace(-90, 90, 721), torch.linspace(-2, 2, 401), torch.tensor([0.0, 1e-30, -1e-30])])
    u = unit_roundoff(torch.float32)
    for x in xs.tolist():
        xv = torch.full((32,), x, dtype=torch.float32)
        total, _ = _fwd([xv], [BCE], [t], [1.0])
        x32 = xv[:1]
        ref = _bce64(x32, t).item() * 32
        s = ((1 - t) * abs(x32.item()) + abs(min(x32.item(), 0.0)) + math.log1p(math.exp(-abs(x32.item())))) * 32
        allowed = (gamma(32, torch.float32) + 4 * u) * s + 1e-45
        assert abs(total.item() - ref) <= allowed, (x, t, total.item(), ref)


def test_bce_special_values_as_eager():
    for t in (0.0, 1.0, 0.3):
        for x in (math.inf, -math.inf, math.nan):
            xv = torch.full((40,), x)  # vector lanes and a scalar tail
            total, (g,) = _fwd([xv], [BCE], [t], [1.0], want_grad=True)
            ref = F.binary_cross_entropy_with_logits(xv, torch.full_like(xv, t), reduction="sum")
            assert (math.isnan(total.item()) and math.isnan(ref.item())) or total.item() == ref.item(), (x, t)
            eg = torch.sigmoid(xv) - t
            assert torch.equal(g.isnan(), eg.isnan()) and torch.equal(g[~g.isnan()], eg[~eg.isnan()])


def _elem64(x, mode, t):
    """(l, s, dl/dx, s') in fp64: the term, its scale, its derivative and the derivative's scale."""
    x = x.double()
    one = torch.ones_like(x)
    if mode == BCE:
        return _bce64(x, t), x.abs() * (1 + t) + 1, torch.sigmoid(x) - t, one * (1 + abs(t))
    if mode == MSE:
        return (x - t) ** 2, (x.abs() + abs(t)) ** 2, 2 * (x - t), 2 * (x.abs() + abs(t))
    if mode == HINGE_REAL:
        return torch.relu(1 - x), 1 + x.abs(), -(x < 1).double(), one
    if mode == HINGE_FAKE:
        return torch.relu(1 + x), 1 + x.abs(), (x > -1).double(), one
    return x * t, x.abs(), torch.full_like(x, t), one


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 31, 33, 64, 65, 127, 1100])
def test_every_mode_over_lengths(dtype, n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for mode, t in ((BCE, 1.0), (BCE, 0.2), (MSE, 0.8), (HINGE_REAL, 0.0), (HINGE_FAKE, 0.0), (LINEAR, -1.0)):
        scale = 1.0 / n
        total, grads = _fwd([x], [mode], [t], [scale], want_grad=True)
        l64, s64, d64, sd64 = _elem64(x, mode, t)
        allowed = gamma(n + 8, acc) * scale * s64.sum().item() + 1e-300
        assert abs(total.item() - scale * l64.sum().item()) <= allowed, (mode, t)
        if mode == LINEAR:
            assert grads[0].numel() == 0  # a constant gradient is not written (an empty tensor)
            continue
        # elementwise: a few roundings of the derivative's scale, then the store in dtype
        ref = scale * d64
        gerr = gamma(8, acc) * scale * sd64 + unit_roundoff(dtype) * ref.abs() + 1e-300
        assert ((grads[0].double() - ref).abs() <= gerr).all(), (mode, t)
