"""Error bounds of instance norm + activation (forward and backward), in fp64, for the tests'
tolerances (tests/_tolerance.py explains the approach). Optionally with an error already in the
norm's input (a convolution's, tests/_conv_bounds.py), carried through to first order.

Per (n, c) plane of L elements, with r = 1/sqrt(var + eps), xh = (x - mean) r, z = w xh + b,
y = act(z) and the plane's conditioning k = mean|x| r (large when the mean dominates the spread):
  mean    |d mean| <= gamma_L mean|x|                                  (a sum of L terms)
  var     relative error <= gamma_L (1 + k): a two-pass (centred) variance is insensitive to the
          mean's error to first order (sum (x - mean) = 0); merging per-chunk mean/M2 (Chan)
          adds the chunk means' errors through delta^2 n_a n_b / n, <= gamma_L k relative
  rstd    half the variance's relative error plus the sqrt and the division (<= gamma_L (1 + k))
  xh      |d xh| <= gamma (k_i + (1 + k) |xh|), k_i = (|x_i| + mean|x|) r: the mean's error
          times r, rstd's relative error times |xh|, and the shift form x (r w) + (b - mean r w)
          that some implementations use (its last add cancels (|x_i| + |mean|) |w| r)
with gamma = gamma~_{L + 8}(acc) (8: the elementwise operations and the merge steps) and c = 2 for
the second-order terms and a few-ulp exp/rsqrt. gamma~ is Higham & Mary's probabilistic gamma
(tests/_tolerance.gamma_prob, ~8 sqrt(n) u, failing with probability < 3e-14 n): the worst-case
n u multiplied by the conditioning k (up to 25 on the tests' offset planes) would be ~6x looser
at the tests' largest planes. Limit: the k-linear variance term (Welford's, torch's var_mean;
chunk merges') is as large as a one-pass E[x^2] - E[x]^2 variance's error u k^2 at k = 25, so
these bounds cannot tell the two apart there (it would take k ~ 1e3). Backward, with g' = g act'(z) and a = w g':
  dx = r (a - mean(a) - xh mean(a xh)); dw = sum g' xh; db = sum g'
each reduction contributes gamma sum|terms|, xh its error above, rstd its relative error.
Where |z| is within z's own bound the computed activation may take the other branch: g' may be
g or slope*g there, which the bound allows in full (|1 - slope| |g|) instead of assuming it away.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tests._tolerance import gamma, gamma_prob, unit_roundoff

C_NORM = 2.0  # second-order terms, few-ulp exp/rsqrt (see the docstring)


def _slope(activation: str, slope: float) -> float:
    return {"leaky_relu": slope, "relu": 0.0, "none": 1.0}[activation]


def _pmean(t):  # mean over each (n, c) plane
    return t.mean((2, 3), keepdim=True)


@dataclass
class NormBounds:
    y: torch.Tensor
    dx: torch.Tensor | None = None
    dw: torch.Tensor | None = None
    db: torch.Tensor | None = None


def instance_norm_act_bounds(x, weight=None, bias=None, grad=None, activation="leaky_relu", slope=0.2,
                             eps=1e-5, acc_dtype=torch.float32, x_err=None, grad_err=None) -> NormBounds:
    """Allowed |error| (fp64, elementwise) of y = act(instance_norm(x) w + b) and, given the
    upstream ``grad``, of dx, dw, db, all with the accumulation dtype ``acc_dtype``.
    ``x_err`` / ``grad_err``: bounds on errors already in x / grad (carried through)."""
    xd = x.detach().double()
    N, C, H, W = xd.shape
    L = H * W
    s = _slope(activation, slope)
    wd = torch.ones(C, dtype=torch.float64, device=xd.device) if weight is None else weight.detach().double()
    bd = torch.zeros(C, dtype=torch.float64, device=xd.device) if bias is None else bias.detach().double()
    wa, ba = wd.abs()[None, :, None, None], bd.abs()[None, :, None, None]
    u = unit_roundoff(acc_dtype)
    g_ = gamma_prob(L + 8, acc_dtype)
    if L == 1:  # xh = 0 in exact arithmetic, r = 1/sqrt(eps): the same formulas (a kernel that
        # computes x - mean or a - mean(a) with a rounded mean leaves u-sized noise times r)
        mu, xh = xd, torch.zeros_like(xd)
        r = torch.full_like(xd, eps ** -0.5)
    else:
        mu = _pmean(xd)
        r = (_pmean((xd - mu) ** 2) + eps).rsqrt()
        xh = (xd - mu) * r
    axh = xh.abs()
    kbar = _pmean(xd.abs()) * r
    ki = (xd.abs() + _pmean(xd.abs())) * r
    rho = C_NORM * g_ * (1 + kbar)  # relative error of rstd
    e_xh = C_NORM * g_ * (ki + (1 + kbar) * axh)
    if x_err is not None:  # d xh = r (e - mean e - xh mean(xh e)), |.| bounded
        e = x_err.double()
        e_xh = e_xh + r * (e + _pmean(e) + axh * _pmean(axh * e))
        rho = rho + r * _pmean(axh * e)
    z = wd[None, :, None, None] * xh + bd[None, :, None, None]
    e_z = wa * e_xh + 2 * u * (wa * axh + ba)
    # activation: slope |s| below zero, 1 above; either where the sign is not certain
    near = z.abs() <= e_z
    act_gain = torch.where(z > 0, 1.0, abs(s))
    act_gain = torch.where(near, max(1.0, abs(s)), act_gain)
    out = NormBounds(y=act_gain * e_z)
    if grad is None:
        return out
    gd = grad.detach().double()
    gp = gd * torch.where(z > 0, 1.0, s)  # g' of the exact z
    kink = gd.abs() * abs(1 - s) * near  # the other branch's g', where z's sign is uncertain
    if grad_err is not None:
        kink = kink + grad_err.double() * max(1.0, abs(s))
    a = wa * gp.abs()
    s_dx = r * (a + _pmean(a) + axh * _pmean(a * axh))
    out.dx = (C_NORM * g_ * s_dx + rho * s_dx
              + r * (axh * _pmean(a * e_xh) + e_xh * _pmean(a * axh))
              + r * wa * (kink + _pmean(kink) + axh * _pmean(kink * axh)))
    if weight is not None:
        g2 = gamma_prob(N * L + 8, acc_dtype)
        out.dw = (g2 * (gp.abs() * axh) + gp.abs() * e_xh + kink * axh).sum((0, 2, 3))
        out.db = (g2 * gp.abs() + kink).sum((0, 2, 3))
    return out


def batch_stat_bounds(x, x_err=None, acc_dtype=torch.float32):
    """Bounds of the per-channel batch mean and unbiased variance (what running statistics
    accumulate) over (N, H, W): the mean gamma_n mean|x| + mean(e); the variance
    gamma_{n+8} (1 + k) var (the two-pass / Chan analysis above) + 2 mean(|x - mean| e) n/(n-1)."""
    xd = x.detach().double()
    n = xd.shape[0] * xd.shape[2] * xd.shape[3]
    dims = (0, 2, 3)
    mu = xd.mean(dims, keepdim=True)
    var = xd.var(dims, unbiased=True)
    e = torch.zeros_like(xd) if x_err is None else x_err.double()
    k = xd.abs().mean(dims) / var.clamp_min(1e-300).sqrt()
    g_ = gamma(n + 8, acc_dtype)
    e_mean = g_ * xd.abs().mean(dims) + e.mean(dims)
    e_var = C_NORM * g_ * (1 + k) * var + 2 * ((xd - mu).abs() * e).mean(dims) * n / max(n - 1, 1)
    return e_mean, e_var


def instance_stat_bounds(x, acc_dtype=torch.float32):
    """Bounds of the per-channel values an instance norm's running statistics accumulate (the
    batch average of each plane's mean and unbiased variance), from the per-plane analysis above."""
    xd = x.detach().double()
    L = xd.shape[2] * xd.shape[3]
    g_ = gamma(L + 8, acc_dtype)
    var = xd.var((2, 3), unbiased=True)
    k = xd.abs().mean((2, 3)) / var.clamp_min(1e-300).sqrt()
    e_mean = (g_ * xd.abs().mean((2, 3))).mean(0)
    e_var = (C_NORM * g_ * (1 + k) * var).mean(0)
    return e_mean, e_var
