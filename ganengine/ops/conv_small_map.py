"""4x4 stride-2 padding-1 convolutions on a small map as one GEMM (CPU, fp32, channels_last).

DCGAN's layers between the 4x4 and the 8x8 maps (D's ``Conv2d(8 ndf, 4 ndf)`` 8x8 -> 4x4, G's
``ConvTranspose2d(8 ngf, 4 ngf)`` 4x4 -> 8x8) are where oneDNN's direct convolution is least
efficient: a 4x4 output gives it 16 pixels per image to block over. Written as a GEMM over the
patch matrix (M = N * 16 rows, K = 16 * Cin) they run on MKL's sgemm instead. Measured at the
reference setting (batch 64, 256 <-> 512 channels, fwd + bwd, 1 thread, interleaved, under load):
oneDNN on channels_last 128 ms, this form 94 ms (the transposed conv 128 -> 90 ms); at the
8x8 -> 16x16 maps oneDNN wins (the patch matrix is 4x larger and its direct conv is near peak
there), and with few channels the patch copies cost more than the GEMM saves: ``small_map_route``.

* ``conv4x4s2_gemm(x, weight)`` = ``F.conv2d(x, weight, None, 2, 1)``: im2col of the padded NHWC
  input (one strided copy), ``cols @ W`` with W (16 Cin, Cout) in (kh, kw, cin) order; the output
  is channels_last. Backward: ``grad_W = cols^T g``, ``grad_cols = g W^T`` folded back with 16
  strided adds (col2im).
* ``conv_transpose4x4s2_gemm(x, weight)`` = ``F.conv_transpose2d(x, weight, None, 2, 1)``: the
  adjoint (GEMM, then col2im; backward im2col of the gradient and two GEMMs).

The same function as oneDNN's to rounding (a different summation order). First derivatives only:
a double backward (gradient penalty) through them raises instead of returning wrong numbers, and
``small_map_route`` only routes fp32 CPU tensors outside autocast, tracing (export) and
torch.compile, so callers keep PyTorch's conv for everything else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

SMALL_MAP = 16  # route when the small side's map (conv output / transposed-conv input) has <= this many pixels
WIDE, NARROW, FEW_ROWS = 256, 64, 64  # and these channels (see small_map_route)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) as a contiguous (N, H, W, C) tensor (a free view for channels_last input)."""
    return x.permute(0, 2, 3, 1).contiguous()


def _im2col(xh: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) -> (N * H/2 * W/2, C * 16) patches of the 4x4 stride-2 padding-1 conv in
    (c, kh, kw) order: the order of a contiguous (Cout, Cin, 4, 4) weight's rows, so the GEMMs take
    the weight and give its gradient without a transposing copy of the weight (20 ms at 512x256x4x4).
    Gathered in (kh, kw, c) order (contiguous runs of C) and transposed per patch: faster than a
    direct gather with stride 16."""
    n, h, w, c = xh.shape
    xp = F.pad(xh, (0, 0, 1, 1, 1, 1))
    sn, sh, sw, _ = xp.stride()
    patches = xp.as_strided((n, h // 2, w // 2, 4, 4, c), (sn, 2 * sh, 2 * sw, sh, sw, 1))
    return patches.reshape(-1, 16, c).transpose(1, 2).reshape(-1, c * 16)


def _col2im(cols: torch.Tensor, n: int, h: int, w: int, c: int) -> torch.Tensor:
    """The adjoint of ``_im2col``: (N * h/2 * w/2, C * 16) -> (N, h, w, C) contiguous, overlaps summed."""
    g = cols.view(-1, c, 16).transpose(1, 2).contiguous().view(n, h // 2, w // 2, 4, 4, c)
    out = cols.new_zeros(n, h + 2, w + 2, c)
    for kh in range(4):
        for kw in range(4):
            out[:, kh:kh + h:2, kw:kw + w:2, :] += g[:, :, :, kh, kw, :]
    return out[:, 1:h + 1, 1:w + 1, :].contiguous()


def _as_nchw(yh: torch.Tensor) -> torch.Tensor:
    return yh.permute(0, 3, 1, 2)  # (N, H, W, C) contiguous -> (N, C, H, W) channels_last


class _Conv4x4s2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        n, c, h, w = x.shape
        cout = weight.shape[0]
        wm = weight.contiguous().view(cout, c * 16)  # rows in (cin, kh, kw) order
        cols = _im2col(_nhwc(x))
        ctx.save_for_backward(cols, wm)
        ctx.shape = (n, c, h, w)
        ctx.needs = ctx.needs_input_grad[:2]
        return _as_nchw(torch.mm(cols, wm.t()).view(n, h // 2, w // 2, cout))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        cols, wm = ctx.saved_tensors
        n, c, h, w = ctx.shape
        g = _nhwc(grad).view(-1, wm.shape[0])
        gx = gw = None
        if ctx.needs[0]:
            gx = _as_nchw(_col2im(torch.mm(g, wm), n, h, w, c))
        if ctx.needs[1]:
            gw = torch.mm(g.t(), cols).view(-1, c, 4, 4)
        return gx, gw


class _ConvTranspose4x4s2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        n, cin, h, w = x.shape
        cout = weight.shape[1]
        wm = weight.contiguous().view(cin, cout * 16)  # the adjoint conv's (cout, kh, kw) columns
        rows = _nhwc(x).view(-1, cin)
        ctx.save_for_backward(rows, wm)
        ctx.shape = (n, cin, h, w, cout)
        ctx.needs = ctx.needs_input_grad[:2]
        return _as_nchw(_col2im(torch.mm(rows, wm), n, 2 * h, 2 * w, cout))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rows, wm = ctx.saved_tensors
        n, cin, h, w, cout = ctx.shape
        cols = _im2col(_nhwc(grad))  # (N h w, cout * 16)
        gx = gw = None
        if ctx.needs[0]:
            gx = _as_nchw(torch.mm(cols, wm.t()).view(n, h, w, cin))
        if ctx.needs[1]:
            gw = torch.mm(rows.t(), cols).view(cin, cout, 4, 4)
        return gx, gw


def conv4x4s2_gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, None, stride=2, padding=1)`` for a (Cout, Cin, 4, 4) weight and even H, W."""
    return _Conv4x4s2.apply(x, weight)


def conv_transpose4x4s2_gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv_transpose2d(x, weight, None, stride=2, padding=1)`` for a (Cin, Cout, 4, 4) weight."""
    return _ConvTranspose4x4s2.apply(x, weight)


def small_map_route(x: torch.Tensor, weight: torch.Tensor, small_hw: int) -> bool:
    """Whether the GEMM form serves this call: fp32 (N, C, H, W) CPU tensors outside autocast, a
    small map (the conv's output, the transposed conv's input) of at most ``SMALL_MAP`` pixels,
    and enough channels for the GEMM to pay for the patch copies (their cost per multiply-add
    falls as 1 / channels): at least ``WIDE`` channels on both sides, or ``NARROW`` with at most
    ``FEW_ROWS`` output rows (N x small map pixels), where oneDNN's direct conv has the fewest
    pixels to block over. Measured (fwd+bwd, 1 thread, interleaved, under load), GEMM vs oneDNN:
    256 <-> 512 channels 1.3x faster at batch 64, 1.7x at 16, 3x at 4; 128 <-> 256 1.16x slower
    at batch 64, 1.9x faster at 4; 64 <-> 128 1.75x slower at 64, 1.1x faster at 4; 32 <-> 64
    2.2x slower at 64, 1.2x slower at 4."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() == 4 and not torch.is_autocast_enabled("cpu") and 0 < small_hw <= SMALL_MAP):
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False  # export (ganengine.export traces) and torch.compile see PyTorch's conv
    channels = min(weight.shape[0], weight.shape[1])
    return channels >= WIDE or (channels >= NARROW and x.shape[0] * small_hw <= FEW_ROWS)
