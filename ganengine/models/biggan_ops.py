"""The computations of BigGAN's layers (ganengine/models/layers_biggan.py): the reference's
spectral-norm power iteration, and the fused forms the networks run with ``fused=True``.

Reference numerics kept exactly (what the equality tests check):

* spectral norm (``layers.SN.W_``): per power iteration and singular vector i,
  ``v = normalize(gram_schmidt(u_i W, vs))``, ``u = normalize(gram_schmidt(v W^T, us))``
  (``F.normalize``: x / max(||x||, eps)), written to ``u_i`` in training mode;
  ``sv_i = squeeze((v W^T) u^T)`` (differentiable in W); ``weight / sv_0``.
* fused, ``num_svs == 1``: the same GEMVs in the same order, but ``v W^T`` is computed once and
  reused for ``sv`` (the reference computes the same product twice, bit-identical), and
  ``weight / sv`` is one autograd node whose backward is ``g / sv - (<g, W> / sv^2) u^T v``
  (one pass, ``torch.addr``) instead of autograd's walk through the GEMVs. The eval-mode
  repetitions of ``num_itrs > 1`` (identical, as u is not written back) run once.
* fused, a whole network at once (``layers_biggan.grouped_spectral_norms``): on the CPU every
  such layer in one call of ganengine's C++ spectral-norm op (``sn_weights_native``: the same
  GEMVs, sigma from the last half step, equal to rounding), elsewhere same-shaped small weights
  batched (``sn_weights_grouped``); their buffer writes handed back, so that only the layers the
  forward reaches are written (as the reference's per-call iteration does when a forward raises).
* under a torch.func transform (functionalize, grad, vmap) the reference composition
  (``unfused_under_transform``): no autograd.Function, no fused op, buffers written with ``out=``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# a jit trace (ganengine.export) records an autograd.Function as a Python call that TorchScript
# cannot save: the Functions below step aside for their plain-op forms while tracing
_is_tracing = torch._C._is_tracing
# under a torch.func transform (functionalize, grad, vmap) no autograd.Function runs (PyTorch has no
# functionalize rule for one) and ganengine's fused ops decline: the networks then run the
# reference composition (``unfused_under_transform``), a fused layer called alone its plain ops
functorch_active = torch._C._are_functorch_transforms_active


def _jit_tracing() -> bool:
    """Whether a jit trace is recording (checked after ``is_compiling``: dynamo cannot trace the C call)."""
    return not torch.compiler.is_compiling() and _is_tracing()


# ----------------------------------------------------------------------------- spectral norm
def _proj(x, y):
    return torch.mm(y, x.t()) * y / torch.mm(y, y.t())


def _gram_schmidt(x, ys):
    for y in ys:
        x = x - _proj(x, y)
    return x


def write_buffer(buf, value):
    """``buf[:] = value`` (the reference's write); under a torch.func transform as an ``out=`` op,
    the form ``torch.func.grad`` lets a function write a captured buffer with (it refuses
    ``copy_``), the same bits (x * 1)."""
    if functorch_active():
        torch.mul(value.reshape(buf.shape), 1, out=buf)
    else:
        buf[:] = value


def power_iteration(W, us, update: bool = True, eps: float = 1e-12):
    """One power-iteration pass for each singular vector in ``us`` (the buffers, written in place
    when ``update``). Returns (svs, new us, vs); ``svs`` carry the gradient with respect to W."""
    new_us, vs, svs = [], [], []
    for i, u in enumerate(us):
        with torch.no_grad():
            v = F.normalize(_gram_schmidt(torch.matmul(u, W), vs), eps=eps)
            vs.append(v)
            u = F.normalize(_gram_schmidt(torch.matmul(v, W.t()), new_us), eps=eps)
            new_us.append(u)
            if update:
                write_buffer(us[i], u)
        svs.append(torch.squeeze(torch.matmul(torch.matmul(v, W.t()), u.t())))
    return svs, new_us, vs


class _DivBySigma(torch.autograd.Function):
    """``weight / sigma`` where sigma = u W v^T (u, v constants; W = weight as a matrix, or its
    transpose): backward ``g / sigma - (<g, weight> / sigma^2) * outer(u, v)`` in one ``addr``."""

    @staticmethod
    def forward(ctx, weight, sigma, u, v, transpose: bool):
        ctx.save_for_backward(weight, sigma, u, v)
        ctx.transpose = transpose
        return weight / sigma

    @staticmethod
    def backward(ctx, g):
        weight, sigma, u, v = ctx.saved_tensors
        g2 = g.reshape(weight.shape[0], -1)
        inv = 1.0 / sigma
        c = torch.dot(g2.reshape(-1), weight.reshape(-1)) * inv * inv
        a, b = (v, u) if ctx.transpose else (u, v)
        gw = torch.addr(g2 * inv, a.reshape(-1) * -c, b.reshape(-1))
        return gw.view_as(weight), None, None, None, None


def sn_weight(weight, us, svs, training: bool, eps: float, num_itrs: int, transpose: bool = False,
              fused: bool = False):
    """The reference's ``SN.W_()``: ``weight / sigma_0`` with the power iteration's side effects
    (``us`` and ``svs`` written in training mode)."""
    W = weight.reshape(weight.size(0), -1)
    if transpose:
        W = W.t()
    if fused and len(us) == 1 and not functorch_active():  # (a transform: the reference's ops below)
        u_buf = us[0]
        with torch.no_grad():
            for _ in range(num_itrs if training else 1):
                v = F.normalize(torch.matmul(u_buf, W), eps=eps)
                wv = torch.matmul(v, W.t())
                u = F.normalize(wv, eps=eps)
                if training:
                    u_buf.copy_(u)
            sigma = torch.squeeze(torch.matmul(wv, u.t()))
            if training:
                svs[0].copy_(sigma)
        if weight.requires_grad and torch.is_grad_enabled() and not _jit_tracing():
            return _DivBySigma.apply(weight, sigma, u, v, transpose)
        return weight / sigma
    for _ in range(num_itrs):
        sv_list, _, _ = power_iteration(W, us, update=training, eps=eps)
    if training:
        with torch.no_grad():
            for i, sv in enumerate(sv_list):
                write_buffer(svs[i], sv)
    return weight / sv_list[0]


class unfused_under_transform:
    """``with unfused_under_transform(net):`` around a fused network's forward: under a torch.func
    transform every ``fused`` flag of ``net`` is False for the call (the reference composition,
    which the transforms handle: ganengine's fused ops and autograd.Functions have no functionalize
    or batching rules), then restored; eagerly (the check is one C call) nothing changes."""

    def __init__(self, net: nn.Module):
        self.saved = None
        if getattr(net, "fused", False) and functorch_active():
            self.saved = [(m, m.fused) for m in net.modules() if isinstance(getattr(m, "fused", None), bool)]
            for m, _ in self.saved:
                m.fused = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            for m, flag in self.saved:
                m.fused = flag
        return False


# Grouping pays where the per-layer iteration is host-bound (about a dozen small ops per layer):
# weights up to this many elements are stacked per shape; larger ones keep the per-layer path
# (their GEMVs dominate and a stack would copy them).
SN_GROUP_MAX_NUMEL = 1 << 20


def sn_group_key(m):
    """The group of an SN layer (layers_biggan.SN) whose fused power iteration can be batched
    with others', or None: one singular vector, a small weight."""
    w = m.weight
    if not m.fused or m.num_svs != 1 or w.numel() > SN_GROUP_MAX_NUMEL or w.dim() < 2:
        return None
    rows, cols = w.shape[0], w.numel() // w.shape[0]
    return ((cols, rows) if m.transpose else (rows, cols), m.transpose, w.dtype, w.device, m.training, m.eps,
            m.num_itrs if m.training else 1)


def _write_or_defer(layers, u_bufs, u_new, sv_bufs, sv_new, deferred):
    """Training mode's buffer writes: now, or (``deferred`` a list) handed to the caller, which
    writes only the layers its forward reached (layers_biggan.grouped_spectral_norms)."""
    if deferred is not None:
        deferred.append((layers, u_bufs, u_new, sv_bufs, sv_new))
        return
    with torch.no_grad():
        torch._foreach_copy_(u_bufs, u_new)
        torch._foreach_copy_(sv_bufs, sv_new)


def sn_weights_grouped(members: list, deferred: list | None = None) -> list:
    """``sn_weight(..., fused=True)`` for layers of one ``sn_group_key``, their power iterations
    batched: the same GEMVs per layer as one ``bmm`` each (the same function to rounding), the
    buffers written as there (training mode; with ``deferred`` a list, the writes are appended
    to it as (layers, u buffers, new u, sv buffers, new sv) instead); returns each layer's ``weight /
    sigma`` (``_DivBySigma`` when the weight takes a gradient)."""
    m0 = members[0]
    training, eps, transpose = m0.training, m0.eps, m0.transpose
    u_bufs = [m.u0 for m in members]
    with torch.no_grad():
        W = torch.stack([m.weight.reshape(m.weight.shape[0], -1) for m in members])
        if transpose:
            W = W.transpose(1, 2)
        u = torch.stack(u_bufs)  # (K, 1, rows)
        for _ in range(m0.num_itrs if training else 1):
            v = F.normalize(torch.bmm(u, W), dim=-1, eps=eps)
            wv = torch.bmm(v, W.transpose(1, 2))
            u = F.normalize(wv, dim=-1, eps=eps)
        sigma = torch.bmm(wv, u.transpose(1, 2)).view(-1)  # (K,)
    if training:  # (only the last iteration's u is kept: the earlier writes were overwritten)
        _write_or_defer(members, u_bufs, list(u.unbind(0)), [m.sv0 for m in members],
                        list(sigma.view(-1, 1).unbind(0)), deferred)
    grad = torch.is_grad_enabled()
    out = []
    for k, m in enumerate(members):
        weight = m.weight
        if grad and weight.requires_grad:
            out.append(_DivBySigma.apply(weight, sigma[k], u[k], v[k], transpose))
        else:
            out.append(weight / sigma[k])
    return out


def sn_native_key(m):
    """The group of an SN layer whose power iteration ganengine's C++ spectral-norm op can run
    with others' of any shape (``sn_weights_native``; only when ``native_sn_ops()`` serves the
    call: the op built, the requested backend auto or cpu), or None: fused, one singular vector,
    a contiguous fp32/fp64 CPU weight normalised over its rows (not ``transpose``)."""
    w = m.weight
    if (not m.fused or m.num_svs != 1 or m.transpose or w.dim() < 2 or not w.is_cpu
            or w.dtype not in (torch.float32, torch.float64) or not w.is_contiguous()):
        return None
    return ("native", w.dtype, m.training, m.eps, m.num_itrs if m.training else 1)


def native_sn_ops():
    """(spectral_norm_fwd, SpectralNormFn) when the C++ op serves this call, else None."""
    from ganengine.ops import _dispatch

    op = _dispatch.lean_op("spectral_norm_fwd")
    if op is None:
        return None
    from ganengine.ops.spectral_norm import SpectralNormFn

    return op, SpectralNormFn


def sn_weights_native(members: list, deferred: list | None = None) -> list:
    """``sn_weight(..., fused=True)`` for the layers of one ``sn_native_key``, every power
    iteration in one C++ call (ganengine.ops.spectral_norm, order "classic": v = normalize(u W),
    u = normalize(v W^T) per iteration, the reference's GEMVs; sigma = ||v W^T||^2 / max(||v
    W^T||, eps), equal to the reference's ``(v W^T) u^T`` up to rounding) and one autograd node
    for every weight that takes a gradient (backward ``g / sigma - (<g, W> / sigma^2) u v^T``
    per layer, one C++ call). The buffers are written as the reference writes them: ``u0`` and
    ``sv0`` in training mode only (or, ``deferred`` a list, handed back as ``sn_weights_grouped``
    does). Eval-mode repetitions of ``num_itrs > 1`` (identical, as u is
    not written back) run once."""
    from ganengine.ops.spectral_norm import V_STEP

    op, fn = native_sn_ops()
    m0 = members[0]
    training, eps = m0.training, float(m0.eps)
    steps = 2 * (m0.num_itrs if training else 1)
    grad = torch.is_grad_enabled()
    out = [None] * len(members)
    parts = ([i for i, m in enumerate(members) if grad and m.weight.requires_grad],
             [i for i, m in enumerate(members) if not (grad and m.weight.requires_grad)])
    for with_grad, idx in zip((True, False), parts):
        if not idx:
            continue
        weights = [members[i].weight for i in idx]
        us = [members[i].u0.view(-1) for i in idx]
        if with_grad:
            outs = fn.apply(("cpu", [0] * len(idx), us, [None] * len(idx), V_STEP, steps, eps, False), *weights)
            k = len(idx)
            w_sns, sigmas, u_outs = outs[:k], outs[k:2 * k], outs[2 * k:3 * k]
        else:  # (a V-first plan never reads v: u stands in, as ganengine.ops.spectral_norm does)
            w_sns, u_outs, _, sigma = op(weights, us, us, V_STEP, steps, eps, False)
            sigmas = sigma.unbind(0)
        if training:
            layers = members if len(idx) == len(members) else [members[i] for i in idx]
            _write_or_defer(layers, us, list(u_outs), [m.sv0 for m in layers], list(sigmas), deferred)
        for i, w in zip(idx, w_sns):
            out[i] = w
    return out


# ----------------------------------------------------------------------------- batch norm + ReLU
def relu_or_none(activation) -> bool:
    return activation is None or isinstance(activation, nn.ReLU) or activation is F.relu


def _gf():
    import ganengine.functional as GF

    return GF


def conditional_bn_act(x, gain, bias, running_mean, running_var, training: bool, eps: float, relu: bool):
    """``act(F.batch_norm(x, rm, rv, None, None, training, 0.1, eps) * gain + bias)``, the
    reference ccbn (momentum 0.1 fixed) and its ReLU, as one op when ganengine has it."""
    GF = _gf()
    fn = getattr(GF, "conditional_batch_norm_act", None)
    if fn is not None:
        return fn(x, gain, bias, running_mean, running_var, training=training, momentum=0.1, eps=eps,
                  activation="relu" if relu else "none")
    out = F.batch_norm(x, running_mean, running_var, None, None, training, 0.1, eps)
    out = torch.addcmul(bias[:, :, None, None], out, gain[:, :, None, None])
    return F.relu(out) if relu else out


def bn_act(x, weight, bias, running_mean, running_var, training: bool, momentum: float, eps: float, relu: bool):
    GF = _gf()
    fn = getattr(GF, "batch_norm_act", None)
    if fn is not None:
        return fn(x, running_mean, running_var, weight, bias, training=training, momentum=momentum, eps=eps,
                  activation="relu" if relu else "none")
    out = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.relu(out) if relu else out


def ccbn_gain_bias(m, y):
    """(1 + gain(y), bias(y)) as (N, C) tensors: ``gain`` / ``bias`` a linear layer or embedding, or
    (``self_modulation``, U-Net GAN's unconditional G) a Linear-ReLU-Linear MLP of z; either way
    per-sample tensors that ``conditional_bn_act`` takes as they are."""
    return 1 + m.gain(y), m.bias(y)


# ----------------------------------------------------------------------------- convolutions
def conv(m: nn.Conv2d, x, weight, negative_slope: float | None = None):
    """``m``'s convolution with ``weight`` on ganengine's conv ops (Winograd 3x3 / GEMM forms on
    the CPU where they pay, the vendor conv elsewhere); ``negative_slope`` fuses a
    (leaky) ReLU epilogue (0.0 = ReLU)."""
    GF = _gf()
    plain = m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    if plain and negative_slope is not None:
        return GF.conv2d_act(x, weight, m.bias, m.stride, m.padding, negative_slope=negative_slope)
    if plain and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding[0] == m.padding[1]:
        out = GF.conv3x3(x, weight, m.bias, padding=m.padding[0])
    elif plain:
        out = GF.conv2d(x, weight, m.bias, m.stride, m.padding)
    else:
        out = F.conv2d(x, weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
    if negative_slope is not None:
        out = F.leaky_relu(out, negative_slope) if negative_slope else F.relu(out)
    return out


def apply_conv(m: nn.Module, x, negative_slope: float | None = None):
    """Run conv module ``m`` (SN or plain) on ``x``, optionally with a fused ReLU after it."""
    if isinstance(m, nn.Conv2d) and getattr(m, "fused", True):
        weight = m.W_() if hasattr(m, "W_") else m.weight
        return conv(m, x, weight, negative_slope)
    out = m(x)
    return out if negative_slope is None else F.relu(out)


# ----------------------------------------------------------------------------- resampling folded into convs
# nearest 2x upsampling then a 3x3 conv (padding 1) == a 4x4 stride-2 transposed conv (padding 1)
# whose kernel, per axis, is M @ k3: output phase 0 reads rows (i-1, i, i) of x, phase 1 rows
# (i, i, i+1), so the taps that land on the same input row are summed. 4 instead of 9
# multiply-adds per output pixel (2.25x fewer), exactly the same function up to rounding.
_UP = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))
# a 3x3 conv (padding 1) then 2x2 average pooling == a 4x4 stride-2 conv (padding 1) whose
# kernel, per axis, is 0.5 * (k3 convolved with [1, 1]): again 2.25x fewer multiplies, and the
# full-resolution conv output is never written.
_POOL = ((0.5, 0.0, 0.0), (0.5, 0.5, 0.0), (0.0, 0.5, 0.5), (0.0, 0.0, 0.5))
_MATS: dict = {}


def _fold_matrix(rows, like):
    """(9, 16) matrix K of a fold: ``w.view(-1, 9) @ K`` is ``M w3 M^T`` per 3x3 kernel
    (K[(t, v), (s, p)] = M[s, t] M[p, v]), cached per dtype and device."""
    key = (rows, like.dtype, like.device)
    k = _MATS.get(key)
    if k is None:
        m = torch.tensor(rows, dtype=torch.float64)
        k = _MATS[key] = torch.einsum("st,pv->tvsp", m, m).reshape(9, 16).to(like.dtype).to(like.device)
    return k


# Both folds are one (Cout*Cin, 9) x (9, 16) GEMM (memory-bound: each kernel read once, its 4x4
# written once); an einsum over the two 4x3 matrices ran 4-10x slower forward and 3-6x
# fwd+bwd (permuted copies around two batched GEMMs; 512x256 kernels: 6.9 vs 1.3 ms forward).
def upsample_conv_weight(w3):
    """(Cout, Cin, 3, 3) conv weight -> (Cin, Cout, 4, 4) transposed-conv weight of up2x+conv."""
    o, i = w3.shape[:2]
    return torch.mm(w3.transpose(0, 1).reshape(i * o, 9), _fold_matrix(_UP, w3)).view(i, o, 4, 4)


def conv_pool_weight(w3):
    """(Cout, Cin, 3, 3) conv weight -> (Cout, Cin, 4, 4) stride-2 conv weight of conv+avgpool2."""
    o, i = w3.shape[:2]
    return torch.mm(w3.reshape(o * i, 9), _fold_matrix(_POOL, w3)).view(o, i, 4, 4)


def _is_conv3x3(m) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


def _weight(m):
    return m.W_() if hasattr(m, "W_") else m.weight


# Folding pays from this input side on (measured on the 2-core CPU, fwd+bwd, batch 8, oneDNN's
# deconvolution: 4 -> 8 at 512 channels 2.3x slower folded, 8 -> 16 1.3x faster, 16 -> 32 2x,
# 32 -> 64 2.8x). The folded convs run oneDNN / cuDNN directly:
# ganengine's 4x4 Winograd rule picked slower paths than oneDNN at these shapes (1.1-1.9x).
FOLD_UPSAMPLE_MIN_SIZE = 8


def upsample_then_conv(up, m, h):
    """``m(up(h))`` for the nearest 2x upsampling; folded into one transposed conv when m is a
    plain 3x3 conv and the map is large enough for it to pay."""
    if (up is upsample2x and _is_conv3x3(m) and getattr(m, "fused", True)
            and min(h.shape[-2:]) >= FOLD_UPSAMPLE_MIN_SIZE):
        return F.conv_transpose2d(h, upsample_conv_weight(_weight(m)), m.bias, 2, 1)
    return apply_conv(m, up(h) if up else h)


def _is_pool2(p) -> bool:
    return (isinstance(p, nn.AvgPool2d) and p.kernel_size in (2, (2, 2)) and p.stride in (2, (2, 2))
            and p.padding in (0, (0, 0)) and not p.ceil_mode and p.divisor_override is None)


class _AvgPool2(torch.autograd.Function):
    """2x2 average pooling (stride 2, even H and W): ``upsample_nearest2d_backward`` (the 2x2
    block sums, one pass) times 0.25, and backward the gradient times 0.25 replicated over each
    block by one strided copy: the same numbers as ``F.avg_pool2d`` (a sum of four, scaled by a
    power of two), 1.5-1.8x faster forward and 1.1-1.6x fwd+bwd on the CPU at BigGAN-deep D's
    shapes (16 x 16..256 channels, 8..64 pixels a side)."""

    @staticmethod
    def forward(ctx, x):
        n, c, h, w = x.shape
        ctx.x_shape = (n, c, h, w)
        return torch.ops.aten.upsample_nearest2d_backward(x, [h, w], [n, c, h // 2, w // 2], 2.0, 2.0).mul_(0.25)

    @staticmethod
    def backward(ctx, g):
        n, c, h, w = ctx.x_shape
        return (g * 0.25)[:, :, :, None, :, None].expand(n, c, h // 2, 2, w // 2, 2).reshape(n, c, h, w)


def downsample(pool, x):
    """``pool(x)``; a 2x2 average pooling of a dense NCHW CPU map with even sides runs
    ``_AvgPool2`` (on GPUs it would be two kernels for avg_pool2d's one)."""
    if (_is_pool2(pool) and x.is_cpu and x.dim() == 4 and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
            and x.is_contiguous()
            and x.is_floating_point() and not torch.compiler.is_compiling() and not _jit_tracing()):
        return _AvgPool2.apply(x)
    return pool(x)


def conv_then_pool(m, pool, h):
    """``pool(m(h))``; folded into one stride-2 conv for a 3x3 conv and 2x2 average pooling."""
    if pool is not None and _is_pool2(pool) and _is_conv3x3(m) and getattr(m, "fused", True):
        return F.conv2d(h, conv_pool_weight(_weight(m)), m.bias, 2, 1)
    h = apply_conv(m, h)
    return pool(h) if pool is not None else h


# ----------------------------------------------------------------------------- blocks
def upsample2x(x):
    return F.interpolate(x, scale_factor=2)


class _AddUpsampled(torch.autograd.Function):
    """``h + upsample2x(x)`` (nearest, x2): x doubled along W only (a copy half h's size), then
    added to h viewed as (N, C, H, 2, 2W), broadcast over the row pair, so the add's inner loop
    runs over 2W contiguous elements. Same numbers as eager. On the CPU at BigGAN's shortcut shapes
    (8 x 64..512 channels, 4..32 pixels a side) 1.4-4x faster than F.interpolate + add
    (F.interpolate converted x to channels-last and its output back; a broadcast over (N, C, H,
    2, W, 2), inner length 2, ran 1.7x slower than this). Backward: eager's
    ``upsample_nearest2d_backward`` (5x faster than autograd's strided sum of a broadcast)."""

    @staticmethod
    def forward(ctx, h, x):
        n, c, hh, ww = x.shape
        ctx.x_shape = (n, c, hh, ww)
        xw = x[..., None].expand(n, c, hh, ww, 2).reshape(n, c, hh, 1, 2 * ww)
        return torch.add(h.view(n, c, hh, 2, 2 * ww), xw).view(h.shape)

    @staticmethod
    def backward(ctx, g):
        n, c, hh, ww = ctx.x_shape
        gx = None
        if ctx.needs_input_grad[1]:
            gx = torch.ops.aten.upsample_nearest2d_backward(g, [2 * hh, 2 * ww], [n, c, hh, ww], 2.0, 2.0)
        return g, gx


def add_upsampled(h, x):
    """``h + upsample2x(x)`` (the residual add of an upsampling block) as ``_AddUpsampled`` when h
    is a dense NCHW CPU tensor of twice x's spatial size (measured on the CPU only; elsewhere the
    eager pair, whose kernel count it would not beat)."""
    if (x.dim() == 4 and h.dim() == 4 and h.is_cpu and h.is_contiguous()
            and h.shape[:2] == x.shape[:2] and h.shape[2] == 2 * x.shape[2] and h.shape[3] == 2 * x.shape[3]
            and h.dtype == x.dtype and not torch.compiler.is_compiling()
            and not _jit_tracing()):
        return _AddUpsampled.apply(h, x)
    return h + upsample2x(x)


def gblock_forward(m, x, y):
    """BigGAN GBlock: the norms run with their ReLU as one op; upsampling + conv1 is one
    transposed conv (above); the shortcut's 1x1 conv runs on the low-resolution input before
    the upsampling (a 1x1 conv and nearest replication commute exactly), 4x fewer multiplies."""
    act = m.activation
    h = m.bn1(x, y, activation=act)
    h = upsample_then_conv(m.upsample, m.conv1, h)
    h = m.bn2(h, y, activation=act)
    h = apply_conv(m.conv2, h)
    if m.learnable_sc:
        x = apply_conv(m.conv_sc, x)
    if m.upsample is upsample2x:
        return add_upsampled(h, x)
    if m.upsample:
        x = m.upsample(x)
    return h + x


def dblock_forward(m, x):
    """BigGAN DBlock: conv1 + ReLU as one op; conv2 + average pooling as one stride-2 conv; the
    shortcut pools before its 1x1 conv when pre-activated (pooling and a 1x1 conv commute)."""
    h = F.relu(x) if m.preactivation else x
    h = apply_conv(m.conv1, h, negative_slope=0.0)
    h = conv_then_pool(m.conv2, m.downsample, h)
    s = x
    if m.downsample:
        s = downsample(m.downsample, s)
    if m.learnable_sc:
        s = apply_conv(m.conv_sc, s)
    return h + s


def deep_gblock_forward(m, x, y):
    act = m.activation
    h = apply_conv(m.conv1, m.bn1(x, y, activation=act))
    h = m.bn2(h, y, activation=act)
    if m.in_channels != m.out_channels:
        x = x[:, :m.out_channels]
    h = upsample_then_conv(m.upsample, m.conv2, h)
    h = apply_conv(m.conv3, m.bn3(h, y, activation=act))
    h = apply_conv(m.conv4, m.bn4(h, y, activation=act))
    if m.upsample is upsample2x:
        return add_upsampled(h, x)
    if m.upsample:
        x = m.upsample(x)
    return h + x


def deep_dblock_forward(m, x):
    h = apply_conv(m.conv1, F.relu(x), negative_slope=0.0)
    h = apply_conv(m.conv2, h, negative_slope=0.0)
    h = apply_conv(m.conv3, h, negative_slope=0.0)
    if m.downsample:
        h = downsample(m.downsample, h)
    h = apply_conv(m.conv4, h)
    s = downsample(m.downsample, x) if m.downsample else x  # (the block's shortcut)
    if m.learnable_sc:
        s = torch.cat([s, apply_conv(m.conv_sc, s)], 1)
    return h + s
