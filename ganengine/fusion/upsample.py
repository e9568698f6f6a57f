"""Nearest upsampling followed by a conv, computed without the upsampled map (BigGAN's GBlock:
``conv1(interpolate(h, scale_factor=2))`` and ``conv_sc(interpolate(x, scale_factor=2))``).

* **1x1 conv after a nearest upsample**: a pointwise conv commutes with any nearest upsampling
  (each output pixel is a copy of one input pixel, and the conv maps each pixel on its own), so
  ``conv1x1(up(x)) == up(conv1x1(x))``: the conv runs on the small map (scale**2 fewer
  multiplications) and the upsample copies the conv's output channels instead of its input's.
* **3x3 conv (padding 1) after a 2x nearest upsample** ("sub-pixel" form): each of the four
  output phases ``out[2i+a, 2j+b]`` reads only a 2x2 window of the *small* map, with the 3x3
  taps that land on the same small pixel summed (rows: phase 0 reads ``[w0 | w1+w2]`` at rows
  ``i-1, i``, phase 1 ``[w0+w1 | w2]`` at ``i, i+1``; columns likewise). So one 2x2 conv with
  ``4*out`` channels over the small map padded by 1 gives all four phases (each phase is the
  ``H x W`` window of that conv's ``(H+1) x (W+1)`` output at offset ``(a, b)``), then one
  interleave. 16 multiplications per output pixel group of 4 instead of 36, no upsampled copy of
  the input. The phase weights are one small matrix product with the 3x3 weight (weight-sized,
  16/9 of it), so the form pays only where the map is large against the weight: chosen per call
  (``subpixel_pays``; CPU tensors only, where it was measured), else the original
  ``conv(interpolate(x))`` runs.

Both are the same function up to floating-point rounding (summed taps multiply once); the
gradients follow by autograd. Spectral-norm convs (``ConvMixin`` with BigGAN's sigma) divide the
smaller of the phase weight and the output by sigma, as ``conv_apply`` does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# rows (and columns) of the summed taps: _TAPS[a][s] = which of the 3 taps phase a's tap s sums
_TAPS = ((0,), (1, 2)), ((0, 1), (2,))


def _phase_matrix(dtype, device) -> torch.Tensor:
    """(16, 9): row (a, b, s, t) has ones at the 3x3 taps (i, j) phase (a, b)'s 2x2 tap (s, t) sums."""
    k = torch.zeros(2, 2, 2, 2, 3, 3, dtype=dtype, device=device)
    for a in range(2):
        for b in range(2):
            for s in range(2):
                for t in range(2):
                    for i in _TAPS[a][s]:
                        for j in _TAPS[b][t]:
                            k[a, b, s, t, i, j] = 1
    return k.reshape(16, 9)


def phase_weight(w: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) -> (4*out, in, 2, 2), channel index (a*2 + b)*out + o."""
    out, cin = w.shape[:2]
    k = _phase_matrix(w.dtype, w.device)
    wc = torch.matmul(k, w.reshape(out * cin, 9).t())           # (16, out*in): (a, b, s, t) x (o, c)
    return wc.reshape(2, 2, 2, 2, out, cin).permute(0, 1, 4, 5, 2, 3).reshape(4 * out, cin, 2, 2)


# the sub-pixel form saves 20 of every 36 multiply-adds per pixel and output channel pair, for
# weight-sized passes that do not shrink with the map (the phase weight is a (16, 9) x (9, out*in)
# product, forward and backward): what decides is the small map's pixel count. Measured at BigGAN's
# ch 96 GBlock shapes (docs/fuse.md, "upsample -> conv"): n*h*w = 32, 128, 512 slower (0.27x,
# 0.64x, 0.91x), 2048 and 8192 faster (1.23x, 1.46x).
MIN_PIXELS = 1024


def subpixel_pays(x: torch.Tensor) -> bool:
    """Whether the sub-pixel form is the cheaper one for an (n, in, h, w) input: n*h*w >= MIN_PIXELS."""
    s = x.shape
    return s[0] * s[2] * s[3] >= MIN_PIXELS


def subpixel_conv3x3(x: torch.Tensor, w: torch.Tensor, bias, sigma=None) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2), w / sigma, bias, padding=1)`` without the
    upsampled map. ``sigma`` (a 0-d tensor) divides whichever is smaller, the phase weight or the
    phase output."""
    n, cin, h, wd = x.shape
    out = w.shape[0]
    wc = phase_weight(w)
    on_weight = sigma is not None and wc.numel() <= n * 4 * out * (h + 1) * (wd + 1)
    if on_weight:
        wc = wc / sigma
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), wc)                # (n, 4*out, h+1, w+1)
    if sigma is not None and not on_weight:
        y = y / sigma
    y = y.view(n, 2, 2, out, h + 1, wd + 1)
    phases = torch.stack([y[:, a, b, :, a:a + h, b:b + wd] for a in (0, 1) for b in (0, 1)], dim=2)
    o = phases.view(n, out, 2, 2, h, wd).permute(0, 1, 4, 2, 5, 3).reshape(n, out, 2 * h, 2 * wd)
    if bias is not None:
        o = o + bias.view(1, -1, 1, 1)
    return o


# ----------------------------------------------------------------------------- graph calls
def _spec(m: nn.Module):
    """(weight, sigma or None) of a conv child: a ganengine-fused SN conv gives its raw weight and
    sigma, other fused convs their computed weight, plain convs their Parameter."""
    from ganengine.fusion.mixins import ConvMixin

    if isinstance(m, ConvMixin):
        if m._ganengine_sigma == "biggan":
            from ganengine.fusion.spectral import biggan_sigma
            return m.weight, biggan_sigma(m)
        return m._fused_weight(), None
    return m.weight, None


def _upsample(x: torch.Tensor, scales, interp_kwargs: dict) -> torch.Tensor:
    """``F.interpolate(x, **interp_kwargs)``. ``scales``: the call's constant nearest scale factors
    as F.interpolate passes them on (resolved once when the graph is rewritten; None where it
    recomputes them): a plain 4-D tensor then goes straight to the aten op F.interpolate ends in,
    without the ~1 us of argument handling F.interpolate repeats every call."""
    if scales is not None and type(x) is torch.Tensor and x.dim() == 4:
        return torch._C._nn.upsample_nearest2d(x, None, scales)
    return F.interpolate(x, **interp_kwargs)


def upsample_conv3x3(conv: nn.Module, x: torch.Tensor, scales, interp_kwargs: dict) -> torch.Tensor:
    """What the rewritten graph calls for ``conv(F.interpolate(x, **interp_kwargs))`` (nearest by
    2, 3x3 conv, stride 1, padding 1, zero padding): the sub-pixel form where it pays, else as
    written. ``scales``: see ``_upsample``. (Positional arguments: the call costs no more host time
    than the pair it replaces at tiny maps.)"""
    s = x.shape
    # subpixel_pays, inlined; measured on the CPU only (oneDNN): elsewhere the pair runs as written
    if len(s) == 4 and s[0] * s[2] * s[3] >= MIN_PIXELS and x.is_cpu and x.is_floating_point():
        w, sigma = _spec(conv)
        return subpixel_conv3x3(x, w, conv.bias, sigma)
    return conv(_upsample(x, scales, interp_kwargs))


def upsample_conv1x1(conv: nn.Module, x: torch.Tensor, scales, interp_kwargs: dict) -> torch.Tensor:
    """``conv(F.interpolate(x, **interp_kwargs))`` for a pointwise conv and nearest upsampling, as
    ``interpolate(conv(x))`` (they commute; the conv runs on the small map). ``scales``: see
    ``_upsample``."""
    if x.dim() != 4:
        return conv(F.interpolate(x, **interp_kwargs))
    return _upsample(conv(x), scales, interp_kwargs)
