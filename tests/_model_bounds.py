"""Normwise error bounds of whole networks (generators, discriminators, training steps).

Carrying elementwise worst-case bounds through many layers (tests/_chain_bounds.py) makes them
vacuous: every conv's |w| ignores the cancellation of signs and every norm divides by a plane's
spread, so the bound grows ~10x per layer while the error does not. For a network the tests use
the normwise form of the same analysis instead (Higham 3.5, normwise):

    |fl(y) - y|_max <= c * gamma~_n(acc) * scale,    c = D (forward), 2 D (backward),

with gamma~ the probabilistic gamma of Higham & Mary (tests/_tolerance.gamma_prob, lam = 8:
~8 sqrt(n) u, failing with probability < 3e-14 n; the worst-case n u, compounded over a network,
would let a dropped term through), n the longest reduction a layer performs (forward: a conv's
C_in k^2, a norm's plane, a linear layer's width; backward also C_out k^2 for dx, N H_out W_out
for dw, the batch for a linear weight), D the number of layers
with a reduction (the depth of the chain of rounding errors: each layer's own error is at most
gamma_n of the values it produces, normalisation layers keep activations O(1) and pass relative
errors on with a gain of about 1, and to first order the layers' errors add) and scale the
largest magnitude of the compared quantity (the network's output, or its last layer's sum of
|terms| where that layer cancels, bounded by ||w_row||_1 max|x|; for gradients the network's
largest parameter gradient: a gradient that is 0 in exact arithmetic, a conv bias before an
instance norm, is rounding noise of that size). Both sides of a comparison of two fp32 computations are within it
of the exact value, so they are apart by at most twice it (``sides=2``).

The census of n and D is taken with forward hooks during a forward pass the test runs anyway.
"""
from __future__ import annotations

import contextlib

import torch

from tests._tolerance import assert_below, gamma_prob


class Census:
    """Longest forward reduction ``n_fwd``, longest of all (with the backward's) ``n`` and the
    number of reducing layers ``depth`` seen in forward passes."""

    def __init__(self):
        self.n_fwd, self.n, self.depth, self._seen = 1, 1, 0, set()
        self.extra = 0.0  # stages added for Winograd layers (census(..., winograd=True))
        self.last_scale = 0.0  # sum|terms| bound of the last conv/linear layer called (Hoelder)

    @classmethod
    def of(cls, n_fwd, n, depth):
        """A census stated by hand (a few ops whose reductions the test lists)."""
        cen = cls()
        cen.n_fwd, cen.n, cen.depth = n_fwd, max(n, n_fwd), depth
        return cen

    def add(self, key, fwd, bwd=()):
        if key not in self._seen:
            self._seen.add(key)
            self.depth += 1
        self.n_fwd = max([self.n_fwd] + [int(v) for v in fwd])
        self.n = max([self.n, self.n_fwd] + [int(v) for v in bwd])


def _lengths(m, inp, out):
    """(forward, backward) reduction lengths of one call of a leaf module, or None."""
    x = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
    y = out[0] if isinstance(out, (tuple, list)) else out
    if x is None or not isinstance(y, torch.Tensor):
        return None
    name = type(m).__name__
    w = getattr(m, "weight", None)
    fwd, bwd = [], []
    if isinstance(w, torch.Tensor) and w.dim() == 4:  # conv / transposed conv (ganengine's fused ones too)
        k = w.shape[2] * w.shape[3]
        tr = "Transpose" in name  # weight (C_in, C_out, k, k); dw sums over its input's pixels
        fwd.append((w.shape[0] if tr else w.shape[1]) * k)
        bwd += [(w.shape[1] if tr else w.shape[0]) * k, (x.numel() // x.shape[1]) if tr else (y.numel() // y.shape[1])]
    elif isinstance(w, torch.Tensor) and w.dim() == 2:  # linear
        fwd.append(w.shape[1])
        bwd += [w.shape[0], x.numel() // max(x.shape[-1], 1)]
    if "Norm" in name:  # instance/batch norm: a plane, at most the channel across the batch
        fwd.append(y.numel() // max(y.shape[1], 1) if y.dim() > 1 else y.numel())
    return (fwd, bwd) if fwd else None


@contextlib.contextmanager
def census(*modules, winograd=False):
    """Hooks on every leaf module (and attention blocks, whose bmm reductions have no module:
    n includes their H*W and C) of ``modules`` during the with-block. ``winograd``: a 4x4 conv
    the cpu backend would run as Winograd counts alpha stages (alpha from the exact transform
    matrices, tests/_conv_bounds.winograd_amplification: 9 for F(3, 2), 49 for F(2, 4)).
    Leaves whose hooks never fire (a module whose forward calls fused functions with its
    children's parameters, like ganengine's PatchDiscriminator) are counted from their shapes,
    with the largest N H W seen at the roots' inputs and outputs for their pixel sums."""
    cen = Census()
    handles, fired, leaves, pixels = [], set(), [], [1]

    def io_pixels(mod, inp, out=None):
        for t in list(inp) + ([out] if isinstance(out, torch.Tensor) else list(out or [])):
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                pixels[0] = max(pixels[0], t.numel() // t.shape[1])

    for root in modules:
        handles.append(root.register_forward_pre_hook(lambda m, inp: io_pixels(m, inp)))
        handles.append(root.register_forward_hook(lambda m, inp, out: io_pixels(m, inp, out)))
        for m in root.modules():
            attn = "Attention" in type(m).__name__ or "Attn" in type(m).__name__
            if next(m.children(), None) is not None and not attn:
                continue
            leaves.append(m)

            def hook(mod, inp, out, attn=attn):
                fired.add(id(mod))
                if attn:
                    x = inp[0]
                    if id(mod) not in cen._seen:
                        cen.depth += 1  # two products and a softmax: one more stage than a conv
                    cen.add(id(mod), [x.shape[1], x.numel() // (x.shape[0] * x.shape[1])])
                    return
                lengths = _lengths(mod, inp, out)
                w = getattr(mod, "weight", None)
                if lengths and isinstance(w, torch.Tensor) and w.dim() in (2, 4):
                    # sum_j |w_j x_j| <= ||w_row||_1 max|x| (+ |b|): the scale of this layer's result
                    rows = w.detach().abs().transpose(0, 1) if "Transpose" in type(mod).__name__ else w.detach().abs()
                    b = getattr(mod, "bias", None)
                    cen.last_scale = float(rows.flatten(1).sum(1).max()) * float(inp[0].detach().abs().max()) + (
                        float(b.detach().abs().max()) if isinstance(b, torch.Tensor) else 0.0)
                if lengths:
                    if winograd and id(mod) not in cen._seen:
                        _winograd_extra(cen, mod, inp[0])
                    cen.add(id(mod), *lengths)

            handles.append(m.register_forward_hook(hook))
    try:
        yield cen
    finally:
        for h in handles:
            h.remove()
        for m in leaves:  # counted from shapes where the forward bypassed the module
            if id(m) in fired:
                continue
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 4:
                k = w.shape[2] * w.shape[3]
                tr = "Transpose" in type(m).__name__
                cen.add(id(m), [(w.shape[0] if tr else w.shape[1]) * k], [(w.shape[1] if tr else w.shape[0]) * k, pixels[0]])
                stride = getattr(m, "stride", None)
                if winograd and tuple(w.shape[-2:]) == (4, 4) and stride in ((1, 1), (2, 2)):
                    from tests._conv_bounds import winograd_amplification

                    cen.extra += winograd_amplification(stride[0]) - 1
            elif isinstance(w, torch.Tensor) and w.dim() == 2:
                cen.add(id(m), [w.shape[1]], [w.shape[0]])
            elif "Norm" in type(m).__name__:
                cen.add(id(m), [pixels[0]])


def assert_normwise(actual, ref, cen: Census, scale=None, backward=False, sides=2, acc_dtype=torch.float32,
                    name="", extra_depth=0, out_round=1.0):
    """|actual - ref| <= sides * c * gamma~_n(acc) * scale (+ u(out)|ref|), c = D, or 2 D with n
    over the backward's reductions too (above); ``extra_depth``: stated extra stages."""
    if scale is None:  # the output's magnitude, or its last layer's sum|terms| where that cancels
        scale = max(ref.detach().double().abs().max().item(), cen.last_scale)
    c = sides * (cen.depth + cen.extra + extra_depth) * (2 if backward else 1)
    n = cen.n if backward else cen.n_fwd
    return assert_below(actual, ref, max(c, 1) * gamma_prob(n, acc_dtype) * scale, name=name, out_round=out_round)


def _winograd_extra(cen, mod, x):
    """Count (alpha - 1) more stages for a 4x4 conv the cpu backend would run as Winograd here."""
    import ganengine
    from tests._conv_bounds import cpu_winograd_route, winograd_amplification

    from ganengine.ops import conv3x3 as cm
    from tests._conv_bounds import amplification

    w = getattr(mod, "weight", None)
    if not (isinstance(w, torch.Tensor) and w.dim() == 4):
        return
    if type(mod).__name__ == "Conv3x3":  # ganengine's 3x3 family: F(tile, 3) above its threshold
        pad = mod.padding[0] if isinstance(mod.padding, tuple) else mod.padding
        tile = cm._use_winograd(x, w, pad)
        if tile is not None:
            cen.extra += amplification(tile, 3) - 1
        return
    if tuple(w.shape[-2:]) != (4, 4):
        return
    with ganengine.use_backend("cpu"):
        route = cpu_winograd_route(mod, x)
    if route is not None:
        cen.extra += winograd_amplification(mod.stride[0]) - 1


def assert_losses_close(got: dict, want: dict, cen: Census, steps: int = 1, sides: int = 2, msg=""):
    """A training step's losses, normwise over the step's loss values (the largest |loss| as the
    scale: a loss is a mean of terms of the networks' output size), with the backward's n and
    2 D per step: after the first step the weights carry the previous steps' rounding (Adam
    turns rounding-noise gradients into +-lr moves, but those weights change the losses only
    through the same noise-sized gradients, to first order)."""
    scale = max(float(v.detach().abs().max()) for v in want.values())
    for k in want:
        assert_normwise(got[k], want[k].detach(), cen, scale=scale, backward=True, sides=sides,
                        extra_depth=(steps - 1) * cen.depth, name=f"{msg}{k}")
