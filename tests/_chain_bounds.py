"""Error bounds of a chain of layers (a PatchGAN, a fused nn.Sequential, a ResNet block), carried
layer by layer: each layer adds its own rounding (tests/_conv_bounds.py, tests/_norm_bounds.py,
a few ulps for the pointwise ones) and passes on, to first order, the error of its input through
the absolute value of its linearisation (|w| for a conv; r (e + mean e + |xh| mean(|xh| e)) for
a norm; the slope for an activation, either slope where the sign is uncertain). Backward
likewise, from the output's gradient down, with the forward errors entering through what the
backward reads (a conv's dw reads x; a norm's backward reads xh; an activation's its sign).

All in fp64 on the reference modules (copied), so the bound holds for any backend that computes
the same function with fp32 accumulation (or ``acc_dtype``), in any summation order. 4x4
convolutions may run as Winograd on the cpu backend: with ``winograd=True`` their own rounding
is the larger of the direct and the Winograd bound (the route the policy picks need not be known).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from tests._conv_bounds import conv_scales
from tests._norm_bounds import instance_norm_act_bounds
from tests._tolerance import gamma, unit_roundoff

POINTWISE_ULPS = 4  # tanh/sigmoid/exp: a few ulps (libm and SIMD versions are within 1-4)


def _conv_own(layer, x, g, acc, winograd, product_u=0.0):
    """Own rounding bounds [y, dx, dw, db] of a conv layer at input x, upstream grad g: the direct
    form's, and where ``winograd`` (a callable (layer, x) -> (m, r) or None) names a Winograd
    route, the larger of the two (so the bound holds for a backend on either route)."""
    tr = isinstance(layer, nn.ConvTranspose2d)
    routes = [None]
    if winograd and winograd(layer, x) is not None:
        routes.append(winograd(layer, x))
    out = None
    for route in routes:
        sc = _grouped(conv_scales, layer.groups, x, layer.weight, g, layer.bias, stride=layer.stride,
                      padding=layer.padding, transposed=tr, winograd=route)
        # (product_u: the products' inputs rounded to a narrower format first, TF32: 2 u each)
        b = [(gamma(n, acc) + 2 * product_u) * t for _, t, n in sc.items()]
        out = b if out is None else [torch.maximum(o, t) for o, t in zip(out, b)]
    return out


def _grouped(fn, groups, x, w, g, b, **kw):
    if groups == 1:
        return fn(x, w, g, b, **kw)
    parts = [fn(xi, wi, gi, None if b is None else bi, **kw)
             for xi, wi, gi, bi in zip(x.chunk(groups, 1), w.chunk(groups, 0), g.chunk(groups, 1),
                                       (b if b is not None else w).chunk(groups, 0))]
    cat = lambda name, dim: torch.cat([getattr(p, name) for p in parts], dim)  # noqa: E731
    out = parts[0]
    out.y, out.dx, out.dw, out.db = cat("y", 1), cat("dx", 1), cat("dw", 0), cat("db", 0)
    return out


def _conv_prop(layer, e_in, g_abs):
    """First-order propagation through the exact conv: (|w| applied to e_in, the adjoint on g_abs)."""
    tr = isinstance(layer, nn.ConvTranspose2d)
    w = layer.weight.detach().abs()
    if tr:
        f = lambda t: F.conv_transpose2d(t, w, None, layer.stride, layer.padding, layer.output_padding,  # noqa
                                         layer.groups)
    else:
        f = lambda t: F.conv2d(t, w, None, layer.stride, layer.padding, 1, layer.groups)  # noqa
    return f(e_in)


def _conv_backward_prop(layer, x_abs, e_x, g_abs, e_g):
    """Propagated parts of dx, dw, db: adjoint(|w|) e_g, corr(|x|, e_g) + corr(e_x, |g|), sum e_g."""
    tr = isinstance(layer, nn.ConvTranspose2d)
    w = layer.weight.detach().abs().requires_grad_()
    xi = x_abs.clone().requires_grad_()
    if tr:
        y = F.conv_transpose2d(xi, w, None, layer.stride, layer.padding, layer.output_padding, layer.groups)
    else:
        y = F.conv2d(xi, w, None, layer.stride, layer.padding, 1, layer.groups)
    dx, dw1 = torch.autograd.grad(y, (xi, w), e_g)
    w2 = layer.weight.detach().abs().requires_grad_()
    y2 = (F.conv_transpose2d(e_x, w2, None, layer.stride, layer.padding, layer.output_padding, layer.groups) if tr
          else F.conv2d(e_x, w2, None, layer.stride, layer.padding, 1, layer.groups))
    (dw2,) = torch.autograd.grad(y2, (w2,), g_abs)
    return dx, dw1 + dw2, e_g.sum((0, 2, 3))


def _norm(layer, x, e_x, g, e_g, acc, stat_err=None):
    """Instance/batch norm with batch statistics (batch norm: the plane is the channel across
    the batch) or, in eval mode with running statistics, an elementwise affine map."""
    C = x.shape[1]
    w = layer.weight.detach() if layer.affine else None
    b = layer.bias.detach() if layer.affine else None
    batch = isinstance(layer, nn.modules.batchnorm._BatchNorm)
    use_running = (not layer.training) and layer.track_running_stats
    u = unit_roundoff(acc)
    if use_running:
        rm, rv = layer.running_mean.detach(), layer.running_var.detach()
        shape = (1, C, 1, 1)
        r = (rv + layer.eps).rsqrt().view(shape)
        wa = (w.abs() if w is not None else torch.ones(C, dtype=x.dtype, device=x.device)).view(shape)
        xh = (x - rm.view(shape)) * r
        e_y = wa * (r * e_x + 4 * u * (x.abs() + rm.abs().view(shape)) * r) + 2 * u * (b.abs().view(shape) if b is not None else 0)
        if stat_err is not None:  # errors in the running statistics themselves: d rm r + |xh| d rv r^2 / 2
            e_rm, e_rv = (t.view(shape) for t in stat_err)
            e_y = e_y + wa * r * (e_rm + xh.abs() * r * e_rv / 2)
        e_dx = wa * r * (e_g + 2 * u * g.abs())
        n = x.shape[0] * x.shape[2] * x.shape[3]
        e_w = (gamma(n, acc) * (g * xh).abs() + e_g * xh.abs() + g.abs() * r * e_x).sum((0, 2, 3))
        e_b = (gamma(n, acc) * g.abs() + e_g).sum((0, 2, 3))
        return e_y, e_dx, e_w, e_b
    if batch:
        fold = lambda t: t.transpose(0, 1).reshape(1, C, x.shape[0], -1)  # noqa: E731
        unfold = lambda t: t.reshape(C, x.shape[0], x.shape[2], x.shape[3]).transpose(0, 1)  # noqa: E731
        nb = instance_norm_act_bounds(fold(x), w, b, fold(g), "none", eps=layer.eps, acc_dtype=acc,
                                      x_err=fold(e_x), grad_err=fold(e_g))
        return unfold(nb.y), unfold(nb.dx), nb.dw, nb.db
    nb = instance_norm_act_bounds(x, w, b, g, "none", eps=layer.eps, acc_dtype=acc, x_err=e_x, grad_err=e_g)
    return nb.y, nb.dx, nb.dw, nb.db


def _act(slope, x, e_x, g, e_g, acc):
    u = unit_roundoff(acc)
    near = x.abs() <= e_x
    gain = torch.where(near, max(1.0, abs(slope)), torch.where(x > 0, 1.0, abs(slope)))
    y = torch.where(x > 0, x, slope * x)
    dx = torch.where(x > 0, g, slope * g)
    return gain * e_x + u * y.abs(), gain * e_g + g.abs() * abs(1 - slope) * near + u * dx.abs()


class ChainBounds:
    """Reference values (fp64) and bounds of the output, the input gradient and every parameter's
    gradient of ``layers`` at input ``x`` for the upstream gradient ``grad`` (None: forward only).
    ``x_err`` / ``grad_err``: errors already in x / grad. Parameters' gradient bounds and
    references are looked up by the original parameter: ``param_errs[id(p)]``, ``param_refs``."""

    def __init__(self, layers, x, grad=None, acc_dtype=torch.float32, winograd=None, x_err=None, grad_err=None,
                 running_stat_err=None, store_dtype=None, product_u=0.0):
        self.layers = list(layers)
        mods = [copy.deepcopy(m).double() for m in self.layers]
        for sub in (s for m in mods for s in m.modules()):
            if getattr(sub, "inplace", False):
                sub.inplace = False  # the intermediate values are kept
        self.acc, self.winograd = acc_dtype, winograd
        self.stat_err = running_stat_err or {}  # layer index -> bounds of (running_mean, running_var)
        xs = [x.detach().double().requires_grad_()]
        x0 = xs[0]
        for m in mods:
            y = _forward(m, xs[-1])
            y.retain_grad()
            xs.append(y)
        self.y = xs[-1].detach()
        params = [p for m in mods for p in m.parameters()]
        gs = [None] * len(xs)
        if grad is not None:
            torch.autograd.backward(xs[-1], grad.detach().double())
            gs = [None] + [t.grad for t in xs[1:]]
            gs[-1] = grad.detach().double()
        self.dx_ref = x0.grad
        xs = [t.detach() for t in xs]
        es = [torch.zeros_like(xs[0]) if x_err is None else x_err.double()]
        own = {}
        for i, m in enumerate(mods):
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                own[i] = _conv_own(m, xs[i], gs[i + 1] if grad is not None else torch.zeros_like(xs[i + 1]),
                                   acc_dtype, winograd, product_u)
            es.append(self._fwd_err(m, xs[i], es[i], gs[i + 1], own.get(i), self.stat_err.get(i)))
            if store_dtype is not None:  # every layer's output stored in a narrower format
                es[-1] = es[-1] + unit_roundoff(store_dtype) * xs[i + 1].abs()
        self.e_y = es[-1]
        self.inputs, self.errs = xs, es  # every layer's input (fp64) and the bound of its error
        self.param_refs, self.param_errs = {}, {}
        if grad is None:
            return
        e_g = torch.zeros_like(self.y) if grad_err is None else grad_err.double()
        for i in reversed(range(len(mods))):
            e_g, perr = self._bwd_err(mods[i], xs[i], es[i], gs[i + 1], e_g, own.get(i))
            if store_dtype is not None and i > 0:
                e_g = e_g + unit_roundoff(store_dtype) * gs[i].abs()
            for p, e in zip(self.layers[i].parameters(), perr):
                self.param_errs[id(p)] = e
        self.e_dx = e_g
        for src, p in zip((p for m in self.layers for p in m.parameters()), params):
            self.param_refs[id(src)] = p.grad

    def _fwd_err(self, m, x, e_x, g, own, stat_err=None):
        acc = self.acc
        u = unit_roundoff(acc)
        if _is_residual(m):
            sub = ChainBounds(list(m.conv_block), x, g, acc, self.winograd, x_err=e_x)
            return e_x + sub.e_y + u * (x + sub.y).abs()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            return own[0] + _conv_prop(m, e_x, None)
        if isinstance(m, (nn.InstanceNorm2d, nn.BatchNorm2d)):
            gg = torch.zeros_like(x) if g is None else g
            return _norm(m, x, e_x, gg, torch.zeros_like(x), acc, stat_err)[0]
        if isinstance(m, (nn.LeakyReLU, nn.ReLU)):
            s = m.negative_slope if isinstance(m, nn.LeakyReLU) else 0.0
            return _act(s, x, e_x, x, e_x, acc)[0]
        if isinstance(m, (nn.Tanh, nn.Sigmoid)):
            y = m(x)
            deriv = 1 - y ** 2 if isinstance(m, nn.Tanh) else y * (1 - y)
            return deriv.abs() * e_x + POINTWISE_ULPS * u * y.abs()
        if isinstance(m, nn.ReflectionPad2d):
            return F.pad(e_x, m.padding, mode="reflect")
        if type(m).__name__ == "Identity" or (isinstance(m, nn.Dropout) and not m.training):
            return e_x
        raise NotImplementedError(f"no error rule for {type(m).__name__}")

    def _bwd_err(self, m, x, e_x, g, e_g, own):
        """(bound of the error of dL/dx, [bounds of the parameters' gradients, in order])."""
        acc = self.acc
        u = unit_roundoff(acc)
        if _is_residual(m):
            sub = ChainBounds(list(m.conv_block), x, g, acc, self.winograd, x_err=e_x, grad_err=e_g)
            dx = g + sub.dx_ref
            return e_g + sub.e_dx + u * dx.abs(), [sub.param_errs[id(p)] for p in m.conv_block.parameters()]
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            dx, dw, db = _conv_backward_prop(m, x.abs(), e_x, g.abs(), e_g)
            return own[1] + dx, [own[2] + dw] + ([own[3] + db] if m.bias is not None else [])
        if isinstance(m, (nn.InstanceNorm2d, nn.BatchNorm2d)):
            _, e_dx, e_w, e_b = _norm(m, x, e_x, g, e_g, acc)
            return e_dx, ([e_w, e_b] if m.affine else [])
        if isinstance(m, (nn.LeakyReLU, nn.ReLU)):
            s = m.negative_slope if isinstance(m, nn.LeakyReLU) else 0.0
            return _act(s, x, e_x, g, e_g, acc)[1], []
        if isinstance(m, (nn.Tanh, nn.Sigmoid)):
            y = m(x)
            deriv = 1 - y ** 2 if isinstance(m, nn.Tanh) else y * (1 - y)
            dd = (2 * y.abs() if isinstance(m, nn.Tanh) else (1 - 2 * y).abs()) * deriv.abs()  # |d deriv / dx|
            return deriv.abs() * e_g + g.abs() * dd * e_x + POINTWISE_ULPS * u * (g * deriv).abs(), []
        if isinstance(m, nn.ReflectionPad2d):
            xi = x.clone().requires_grad_()
            (dx,) = torch.autograd.grad(F.pad(xi, m.padding, mode="reflect"), xi, e_g + 4 * u * g.abs())
            return dx, []
        if type(m).__name__ == "Identity" or (isinstance(m, nn.Dropout) and not m.training):
            return e_g, []
        raise NotImplementedError(f"no error rule for {type(m).__name__}")


def _forward(m, x):
    return x + m.conv_block(x) if _is_residual(m) else m(x)


def _is_residual(m):
    """A ResNet block x + conv_block(x) (CycleGAN's ResnetBlock and the tests' copies)."""
    return hasattr(m, "conv_block") and type(m).__name__ == "ResnetBlock"
