"""Error scales of convolutions, for tests/_tolerance.py's bounds: sum |terms| of each product
(y, dx, dw, db) and its reduction length n, in fp64, for the direct form (oneDNN, im2col + GEMM)
and for the Winograd form the cpu backend runs (csrc/cpu/winograd_engine.h).

Direct form: output i of a product is sum_j a_j b_j; any summation order gives
|fl - exact| <= gamma_n sum_j |a_j b_j|, so the scale is the same convolution on |x|, |w|
(and its adjoints on |dy|): conv(|x|, |w|) + |b| for y, conv^T(|dy|, |w|) for dx,
corr(|x|, |dy|) for dw, sum |dy| for db.

Winograd F(m, r): y_tile = A^T [(G w G^T) o (B^T d B)] A summed over channels. Each of the
products is a short sum, so (Higham 3.5, componentwise bound of a product of matrices)
|fl - exact| <= gamma_n |A^T| [(|G| |w| |G^T|) o (|B^T| |d| |B|)] |A|, with n = the channel
reduction plus the transform lengths. That absolute-value pipeline is a bilinear form in |w|
and |d| with nonnegative coefficients M[i, a, b] = sum_xi |AT[i, xi]| |G[xi, a]| |BT[xi, b]|
(per axis), computed here from the exact transform matrices of the header (the amplification
of the transforms is in the scale itself, c = 1). It is not bounded by conv(|x|, |w|) element
by element: a tile mixes input/tap pairs that do not meet in the exact convolution, whose
products cancel only in exact arithmetic. The backward passes are the adjoints of the same
steps (dx = B (U^T (A dy A^T)) B^T summed over overlapping tiles, dw = G^T (dM V^T) G), so their
scales are the gradients of T(e_in, w, e_out) = sum e_out * P(e_in, w) with respect to e_in
and w: one autograd call gives all three.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@functools.lru_cache(maxsize=None)
def winograd_coefficients(m: int, r: int) -> torch.Tensor:
    """M[i, a, b] = sum_xi |AT[i, xi]| |G[xi, a]| |BT[xi, b]| of the engine's F(m, r), fp64 (m, r, m + r - 1)."""
    from ganengine.tools import winograd_matrices as wm

    AT, G, BT = wm.parse_header()[(m, r)]
    at, g, bt = (torch.tensor([[abs(float(v)) for v in row] for row in X], dtype=torch.float64) for X in (AT, G, BT))
    return torch.einsum("ix,xa,xb->iab", at, g, bt)


def winograd_chain(m: int, r: int) -> int:
    """Rounding steps of F(m, r) besides the GEMM reduction, the longest of the three passes:
    2a (B^T d B or B dV B^T) + 2r + 2 (G w G^T, G's fp32-rounded entries) + 2a (A^T M A, or
    A dy A^T and G^T dU G) + ceil(a/m)^2 (dx summed over overlapping tiles) + 4 (reflect
    padding folding dx back) + 1 (bias) + 1, with a = m + r - 1."""
    a = m + r - 1
    return 4 * a + 2 * r + math.ceil(a / m) ** 2 + 8


def _winograd_abs_conv(e_in, w, stride, padding, m, r, reflect):
    """The engine's F(m, r) pipeline on absolute values (stride S: S*S phase planes with r x r
    phase kernels, as winograd_engine.h decomposes it); e_in (N, C, H, W) and w (K, C, S r, S r)
    nonnegative fp64; returns (N, K, Ho, Wo)."""
    S = stride
    N, C, H, W = e_in.shape
    K = w.shape[0]
    ph, pw = padding
    a = m + r - 1
    Ho, Wo = (H + 2 * ph - S * r) // S + 1, (W + 2 * pw - S * r) // S + 1
    TY, TX = -(-Ho // m), -(-Wo // m)
    rows, cols = TY * m + r - 1, TX * m + r - 1  # phase-plane extent the tiles read
    xp = F.pad(e_in, (pw, pw, ph, ph), mode="reflect" if reflect and (ph or pw) else "constant")
    xp = xp[..., :S * rows, :S * cols]
    xp = F.pad(xp, (0, S * cols - xp.shape[-1], 0, S * rows - xp.shape[-2]))
    planes = xp.reshape(N, C, rows, S, cols, S).permute(0, 1, 3, 5, 2, 4).reshape(N, C * S * S, rows, cols)
    # the engine reads zeros past the last plane row/column the exact convolution uses
    keep = ((torch.arange(rows) < Ho + r - 1)[:, None] & (torch.arange(cols) < Wo + r - 1)[None, :]).double()
    planes = planes * keep
    wv = w.reshape(K, C, r, S, r, S).permute(0, 1, 3, 5, 2, 4).reshape(K, C * S * S, r, r)
    tiles = planes.unfold(2, a, m).unfold(3, a, m)  # (N, Cv, TY, TX, a, a)
    M = winograd_coefficients(m, r)
    wt = torch.einsum("iac,jbd,kvab->kvijcd", M, M, wv)
    out = torch.einsum("kvijcd,nvyxcd->nkyixj", wt, tiles).reshape(N, K, TY * m, TX * m)
    return out[:, :, :Ho, :Wo]


@dataclass
class ConvScales:
    """sum |terms| per element of y, dx, dw, db (fp64) and the reduction length n of each."""
    y: torch.Tensor
    dx: torch.Tensor
    dw: torch.Tensor
    db: torch.Tensor
    n_y: int
    n_dx: int
    n_dw: int
    n_db: int

    def items(self):
        return (("y", self.y, self.n_y), ("dx", self.dx, self.n_dx), ("dw", self.dw, self.n_dw),
                ("db", self.db, self.n_db))


def conv_scales(x, w, grad, bias=None, stride=1, padding=0, transposed=False, winograd=None,
                reflect=False) -> ConvScales:
    """Error scales of y = conv2d(x, w, bias) (or conv_transpose2d) and of its dx, dw, db for
    the upstream gradient ``grad`` (shape of y). ``winograd=(m, r)`` for the Winograd route
    (r = taps of the stride-1 phase kernel: 4 or 3 at stride 1, 2 for a 4x4 stride-2 conv),
    None for a direct/GEMM one. ``reflect``: reflect padding (conv3x3)."""
    S, P = _pair(stride), _pair(padding)
    xa = x.detach().double().abs()
    wa = w.detach().double().abs().requires_grad_()
    ga = grad.detach().double().abs()
    # the convolution whose data gradient a transposed one is: input of y's shape
    e_in = (ga if transposed else xa).clone().requires_grad_()
    e_out = xa if transposed else ga
    if winograd is not None:
        assert S[0] == S[1], "the Winograd route has equal strides"
        p_ = _winograd_abs_conv(e_in, wa, S[0], P, *winograd, reflect)
    elif reflect:
        p_ = F.conv2d(F.pad(e_in, (P[1], P[1], P[0], P[0]), mode="reflect"), wa, None, S)
    else:
        p_ = F.conv2d(e_in, wa, None, S, P)
    d_in, d_w = torch.autograd.grad((p_ * e_out).sum(), (e_in, wa))  # (grad of zeros: y alone)
    fwd, adj = p_.detach(), d_in
    ba = 0.0 if bias is None else bias.detach().double().abs()[None, :, None, None]
    y, dx = (adj + ba, fwd) if transposed else (fwd + ba, adj)
    K, Ce = w.shape[0], w.shape[1]  # the engine conv: K outputs from Ce inputs
    kh, kw = w.shape[2], w.shape[3]
    n_out_px = e_out.shape[0] * e_out.shape[2] * e_out.shape[3]  # the engine conv's output pixels
    if winograd is not None:
        m, r = winograd
        chain = winograd_chain(m, r)
        TY, TX = -(-e_out.shape[2] // m), -(-e_out.shape[3] // m)
        n_fwd, n_adj, n_w = Ce * S[0] * S[1] + chain, K + chain, e_out.shape[0] * TY * TX + chain
    else:  # terms per element (+1: the bias, or a col2im add)
        n_fwd = Ce * kh * kw + 1
        n_adj = K * math.ceil(kh / S[0]) * math.ceil(kw / S[1]) + 1
        n_w = n_out_px
    n_y, n_dx = (n_adj, n_fwd) if transposed else (n_fwd, n_adj)
    db = ga.sum((0, 2, 3))
    n_db = grad.shape[0] * grad.shape[2] * grad.shape[3]
    return ConvScales(y, dx, d_w, db, n_y, n_dx, n_w, n_db)


def cpu_winograd_route(layer, x):
    """(m, r) of the Winograd route the cpu backend takes for this conv layer at input x under
    the current policies, or None (call inside the backend context of the run it bounds)."""
    from ganengine import _ext
    from ganengine.ops import conv as cv

    if not _ext.has_kernel("conv_uses_winograd", "CPU") or tuple(layer.weight.shape[-2:]) != (4, 4):
        return None
    tr = type(layer).__name__ == "ConvTranspose2d"
    op = tuple(getattr(layer, "output_padding", (0, 0)))
    if not cv.uses_winograd(x.float(), layer.weight.detach().float(), tuple(layer.stride), tuple(layer.padding), tr, op):
        return None
    s1, s2 = tuple(_ext.op("conv_winograd_config")(-1, -1, -1))[1:]
    return (s1, 4) if layer.stride[0] == 1 else (s2, 2)


def winograd_amplification(stride: int) -> float:
    """Normwise amplification of a layer's own rounding on the Winograd route the cpu backend
    has configured for a 4x4 conv of this stride: (max_i sum_ab M[i, a, b] / r)^2, the
    absolute-value pipeline over the direct form's sum |terms| on a constant input (9 for the
    default F(3, 2), 49 for F(2, 4), up to 178 for F(3, 4))."""
    from ganengine import _ext

    tiles = (2, 3)
    if _ext.has_kernel("conv_winograd_config", "CPU"):
        tiles = tuple(_ext.op("conv_winograd_config")(-1, -1, -1))[1:]
    return amplification(*((tiles[0], 4) if stride == 1 else (tiles[1], 2)))


def amplification(m: int, r: int) -> float:
    """(max_i sum_ab M[i, a, b] / r)^2 for F(m, r): 7.1 for F(2, 3), 256 for F(4, 3), 9 for F(3, 2)."""
    M = winograd_coefficients(m, r)
    return float((M.sum((1, 2)).max() / r) ** 2)
