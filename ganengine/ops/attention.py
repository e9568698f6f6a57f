"""SAGAN self-attention without the N x N map: custom ops, fake impls, autograd, dispatch.

The block is ``out = gamma * attn(x) + x`` with (SAGAN, heykeetae ``Self_Attn``)::

    q = conv1x1(x) (B, d, N), k = conv1x1(x) (B, d, M), v = conv1x1(x) (B, C, M)
    P = softmax_over_keys(q^T k)          # no 1/sqrt(d) scale, (B, N, M)
    o = v P^T                             # (B, C, N)
    out = gamma * o + x

The 1x1 convolutions are GEMMs that cuBLAS/oneDNN already do optimally, so they run as
``F.conv2d``; the fused op is the flash-attention core with unequal head dims (d = C/8 for
q/k, C for v) and the residual in its epilogue. M may differ from N (BigGAN pools k and v).

Ops (namespace ``ganengine``), all tensors "channel-major" 3-D views of any strides:
  attention_fwd(q (B,d,N), k (B,d,M), v (B,C,M), x (B,C,N), gamma (numel 1))
      -> (out like x, o like x in v's dtype, lse (B,N))
  attention_bwd(grad_out, q, k, v, o, lse, gamma) -> (dq, dk, dv, rowdot)
where ``lse`` is the natural-log sum-exp of each query row (fp32; fp64 for fp64 input) and
``rowdot = rowsum(grad_out * o)`` (B,N) in lse's dtype, from which each backend forms
``delta = gamma * rowdot`` (the Triton kernels in their first pass). Only O(N * C) is saved for
the backward; P is recomputed. dgamma = sum(rowdot) and dx = grad_out are done with torch.
A plain eager call (the CUDA path's, and the CPU's where the C++ entry declines) runs the same
bodies and backward in an autograd.Function instead (``_eager_fwd``, ops/_eager.py: no custom-op
layer on the host); torch.compile, export, fake tensors and the tracing dispatch modes see the
custom ops.

Saturated softmax (one-hot rows, |scores| >> 1): dS = P * (dP - delta) cancels two dot products
formed in different orders, leaving eps * |dO||v| where eager's softmax backward (which forms
sum(P * dP) from the same dP) gives ~0. The torch backend forms delta from P and dP per chunk as
eager does; the cpu backend recomputes dS of each row's dominant key (P > 1/2) as
P * dO . (v_j - o_i), exact 0 when o_i == v_j, which is why ``o`` is an argument.

Double backward (gradient penalties): when the backward runs with grad mode on
(``create_graph=True``), it uses differentiable torch ops (the reference math, which builds
the N x N map for that call only), so second derivatives are exact.

dtypes: q, k, v share one dtype; x and out share one (they may differ, as under autocast,
where the convs produce fp16/bf16 q, k, v and x stays fp32: the residual keeps x's precision);
gamma is read in fp32. Autocast rule: none registered (autocast falls through), on purpose:
the convs in front of the op already follow autocast, and casting x down would lose the
residual's precision. Accumulation is fp32 (fp64 for fp64 input) in every backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ganengine import _ext, backends
from ganengine.ops import _dispatch, _eager
from ganengine.ops._conv_common import module_autocast
from ganengine.ops._flags import flag

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch backend: query rows per chunk are chosen so a score chunk stays near this many elements
_TORCH_CHUNK_ELEMS = 1 << 24


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like(template: Tensor, value: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``value`` (a kernel's dense output of ``template``'s shape) with the dtype (``template``'s
    unless given) and strides of ``torch.empty_like(template, dtype=dtype)``: what the fake impl
    promises. Equal strides need no probe tensor: a dense ``value`` with ``template``'s strides
    makes ``template`` dense, and empty_like keeps a dense tensor's strides (no allocation on the
    usual contiguous call: ~1.5 us each)."""
    dtype = template.dtype if dtype is None else dtype
    if value.dtype == dtype and value.stride() == template.stride():
        return value
    out = torch.empty_like(template, dtype=dtype)
    if out.stride() == value.stride() and out.dtype == value.dtype:
        return value
    out.copy_(value)
    return out


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when it would return ``t`` (a no-op ``to`` costs ~0.5 us of
    host time: 22 per forward+backward on the Python route)."""
    return t if t.dtype == dtype else t.to(dtype)


def _dense(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype).contiguous()`` for the C++ kernels, skipping the no-op calls."""
    t = _as(t, dtype)
    return t if t.is_contiguous() else t.contiguous()


# ----------------------------------------------------------------------------- checks
def check_core(q: Tensor, k: Tensor, v: Tensor, x: Tensor, gamma: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("x", x)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"attention: {name} must be a 3-D (batch, channels, positions) tensor, "
                             f"got {tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"attention: {name} must be a floating tensor, got {t.dtype}")
    b, d, n = q.shape
    if k.shape[0] != b or k.shape[1] != d:
        raise ValueError(f"attention: k must be (B={b}, d={d}, M), got {tuple(k.shape)}")
    m = k.shape[2]
    if v.shape[0] != b or v.shape[2] != m:
        raise ValueError(f"attention: v must be (B={b}, C, M={m}), got {tuple(v.shape)}")
    if x.shape[0] != b or x.shape[1] != v.shape[1] or x.shape[2] != n:
        raise ValueError(f"attention: x must be (B={b}, C={v.shape[1]}, N={n}), got {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(gamma, Tensor) or gamma.numel() != 1:
        raise ValueError(f"attention: gamma must be a tensor with one element, got "
                         f"{tuple(gamma.shape) if isinstance(gamma, Tensor) else type(gamma).__name__}")
    dev = q.device
    if not (k.device == dev and v.device == dev and x.device == dev and gamma.device == dev):
        devs = {t.device for t in (q, k, v, x, gamma)}
        raise ValueError(f"attention: all tensors must be on one device, got {sorted(map(str, devs))}")
    if n == 0 or m == 0 or d == 0:  # (an empty batch is served: _core)
        raise ValueError(f"attention: empty input (B={b}, d={d}, N={n}, M={m})")


# ----------------------------------------------------------------------------- torch backend
def _chunk_rows(b: int, m: int) -> int:
    return max(1, _TORCH_CHUNK_ELEMS // max(1, b * m))


@_eager.autocast_off
def _torch_fwd(q, k, v, x, gamma):
    ct = acc_dtype(q.dtype)
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    g = gamma.to(ct).reshape(())
    b, _, n = q.shape
    out = torch.empty_like(x)
    o = torch.empty_like(x, dtype=v.dtype)
    lse = x.new_empty((b, n), dtype=ct)
    step = _chunk_rows(b, k.shape[2])
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        s = torch.bmm(qf[:, :, i0:i1].transpose(1, 2), kf)          # (B, c, M)
        l = torch.logsumexp(s, dim=-1)
        oc = torch.bmm(vf, torch.exp(s - l[..., None]).transpose(1, 2))  # (B, C, c)
        o[:, :, i0:i1] = oc
        out[:, :, i0:i1] = g * oc + x[:, :, i0:i1].to(ct)
        lse[:, i0:i1] = l
    return out, o, lse


@_eager.autocast_off
def _torch_bwd(grad, q, k, v, lse, delta, gamma):
    # ``delta`` is not read: each chunk holds whole rows of P, so sum(P * dP) is formed from
    # the same dP as eager's softmax backward does (exact cancellation when P saturates)
    ct = acc_dtype(q.dtype)
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    d_o = grad.to(ct) * gamma.to(ct).reshape(())
    lse = lse.to(ct)
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    n = q.shape[2]
    step = _chunk_rows(q.shape[0], k.shape[2])
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        qc, doc = qf[:, :, i0:i1], d_o[:, :, i0:i1]
        p = torch.exp(torch.bmm(qc.transpose(1, 2), kf) - lse[:, i0:i1, None])  # (B, c, M)
        dv += torch.bmm(doc, p)
        dp = torch.bmm(doc.transpose(1, 2), vf)
        ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
        dq[:, :, i0:i1] = torch.bmm(kf, ds.transpose(1, 2))
        dk += torch.bmm(qc, ds)
    return _like(q, dq.to(q.dtype)), _like(k, dk.to(k.dtype)), _like(v, dv.to(v.dtype))


def reference_attention(q, k, v, x, gamma, return_attention=False):
    """Differentiable reference (builds the (B, N, M) map): the ground truth of the tests."""
    ct = acc_dtype(q.dtype)
    p = torch.softmax(torch.bmm(q.to(ct).transpose(1, 2), k.to(ct)), dim=-1)
    o = torch.bmm(v.to(ct), p.transpose(1, 2))
    out = (gamma.to(ct).reshape(()) * o + x.to(ct)).to(x.dtype)
    return (out, p.to(q.dtype)) if return_attention else out


# ----------------------------------------------------------------------------- dispatch
def _triton_verdict(q: Tensor) -> str | None:
    if q.dtype == torch.float64:
        return "the Triton kernels support float16/bfloat16/float32, got float64"
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return "bfloat16 tl.dot is wrong under the Triton interpreter"
    return None


_VERDICTS: dict = {}  # (op, dtype, device type) -> the verdicts dict: fixed once the extension is loaded


_CHOSEN: dict = {}  # (op, dtype, device type, requested backend, serves) -> choose()'s answer


def _backend_for(q: Tensor, op: str) -> str:
    # the verdicts depend on the dtype and the device type only (asked twice per forward+backward:
    # building them cost ~1.5 us a call), and so does choose()'s answer for a requested backend:
    # kept where choose() served it without a fallback (auto, or the requested backend itself;
    # a fallback is asked each time, so that it warns in debug mode and raises in strict mode)
    requested = _dispatch._requested_backend()
    device_type = q.device.type
    key = (op, q.dtype, device_type, requested, backends.serves)
    name = _CHOSEN.get(key)
    if name is not None:
        _dispatch.last_used["attention"] = name
        return name
    vkey = (op, q.dtype, device_type)
    verdicts = _VERDICTS.get(vkey)
    if verdicts is None:
        verdicts = _VERDICTS[vkey] = {"triton": _triton_verdict(q), "cpu": _dispatch.ext_reason(op, q.device)}
    name = _dispatch.choose("attention", q, verdicts)
    if requested == "auto" or name == requested:
        _CHOSEN[key] = name
    return name


def _cpu_dtype(dtype: torch.dtype) -> torch.dtype:
    # the C++ kernels run in fp32/fp64; half inputs are widened (O(N*C) copies)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_body(q: Tensor, k: Tensor, v: Tensor, x: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    backend = _backend_for(q, "attention_fwd")
    if backend == "triton":
        return _dispatch.triton_kernels("attention").forward(q, k, v, x, gamma)
    if backend == "cpu":
        ct = _cpu_dtype(q.dtype)
        out, o, lse = _ext.raw_op("attention_fwd")(
            _dense(q, ct), _dense(k, ct), _dense(v, ct), _dense(x, ct), _as(gamma, ct).reshape(1))
        return _like(x, _as(out, x.dtype)), _like(x, _as(o, v.dtype), v.dtype), lse
    return _torch_fwd(q, k, v, x, gamma)


attention_fwd = torch.library.custom_op("ganengine::attention_fwd", mutates_args=())(_fwd_body)


@attention_fwd.register_fake
def _(q, k, v, x, gamma):
    return (torch.empty_like(x), torch.empty_like(x, dtype=v.dtype),
            x.new_empty((q.shape[0], q.shape[2]), dtype=acc_dtype(q.dtype)))


def _rowdot(grad: Tensor, o: Tensor, ct: torch.dtype) -> Tensor:
    """rowsum(grad * o) over the channels, (B, N) in ``ct``: dgamma is its sum, and the backward
    kernels take delta = gamma * rowdot."""
    return (_as(grad, ct) * _as(o, ct)).sum(dim=1)


def _bwd_body(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
              gamma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, rowdot) with rowdot = rowsum(grad * o) in lse's dtype (the Triton kernels form
    it in their first pass, saving the host two elementwise ops and the device a pass over grad
    and o)."""
    backend = _backend_for(q, "attention_bwd")
    if backend == "triton":
        return _dispatch.triton_kernels("attention").backward(grad, q, k, v, o, gamma)
    ct = lse.dtype
    rowdot = _rowdot(grad, o, ct)
    delta = rowdot * _as(gamma, ct)   # gamma (1,) or (): broadcasts to (B, N), the same products
    if backend == "cpu":
        ct = _cpu_dtype(q.dtype)
        dq, dk, dv = _ext.raw_op("attention_bwd")(
            _dense(grad, ct), _dense(q, ct), _dense(k, ct), _dense(v, ct), _dense(o, ct), _dense(lse, ct),
            _dense(delta, ct), _as(gamma, ct).reshape(1))
        return _like(q, _as(dq, q.dtype)), _like(k, _as(dk, k.dtype)), _like(v, _as(dv, v.dtype)), rowdot
    return (*_torch_bwd(grad, q, k, v, lse, delta, gamma), rowdot)


attention_bwd = torch.library.custom_op("ganengine::attention_bwd", mutates_args=())(_bwd_body)


@attention_bwd.register_fake
def _(grad, q, k, v, o, lse, gamma):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), lse.new_empty(lse.shape)


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    q, k, v, _x, gamma = inputs
    _, o, lse = output
    ctx.save_for_backward(q, k, v, gamma, o, lse)


def _grads_differentiable(g, q, k, v, gamma):
    """dq, dk, dv, dgamma with differentiable torch ops (double backward; builds P)."""
    ct = acc_dtype(q.dtype)
    qf, kf, vf, gf = q.to(ct), k.to(ct), v.to(ct), g.to(ct)
    gam = gamma.to(ct).reshape(())
    p = torch.softmax(torch.bmm(qf.transpose(1, 2), kf), dim=-1)   # (B, N, M)
    o = torch.bmm(vf, p.transpose(1, 2))
    dgamma = (gf * o).sum()
    d_o = gam * gf
    dv = torch.bmm(d_o, p)
    dp = torch.bmm(d_o.transpose(1, 2), vf)
    ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
    dq = torch.bmm(kf, ds.transpose(1, 2))
    dk = torch.bmm(qf, ds)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dgamma


def _backward(ctx, grad_out, bwd):
    if grad_out is None:  # (the twin does not materialize zero gradients: see _twin_setup_context)
        return None, None, None, None, None
    q, k, v, gamma, o, lse = ctx.saved_tensors
    if _eager.grad_enabled():
        dq, dk, dv, dgamma = _grads_differentiable(grad_out, q, k, v, gamma)
    else:
        dq, dk, dv, rowdot = bwd(grad_out, q, k, v, o, lse, gamma)
        dgamma = rowdot.sum()
    return dq, dk, dv, grad_out, _like_gamma(dgamma, gamma)


def _like_gamma(dgamma: Tensor, gamma: Tensor) -> Tensor:
    """gamma's gradient (a 0-d sum) in gamma's dtype and shape ((1,) in SAGAN, () in BigGAN)."""
    dgamma = _as(dgamma, gamma.dtype)
    return dgamma if gamma.dim() == 0 else dgamma.reshape(gamma.shape)


def _twin_setup_context(ctx, inputs, output):
    # o and lse are outputs only for the backward: no caller ever gets them, so their gradients are
    # always None, which autograd would materialize as two zero tensors (two fill kernels and ~3 us
    # of host time per backward on the CUDA path). The custom op's registration keeps the default.
    ctx.set_materialize_grads(False)
    _setup_context(ctx, inputs, output)


attention_fwd.register_autograd(_eager.backward_via(_backward, attention_bwd),
                                setup_context=_setup_context)
# plain eager calls (the CUDA path's, and the CPU's where the C++ entry declines): no custom-op layer
_eager_fwd = _eager.twin("ganengine::attention_fwd", _fwd_body, _twin_setup_context,
                         _eager.backward_via(_backward, _bwd_body))


# The SAGAN block's core on its stacked projection (plain eager calls): the Function takes the one
# conv output qkv (B, 2d + C, H, W) and x (B, C, H, W) as they are, and flattens and splits them
# inside, so its backward writes dq, dk, dv into one gradient of qkv's layout (the Triton kernels
# into its channel slices) where three gradients would be concatenated by the split's backward: one
# allocation, and no cat (an op, and on a GPU a copy of the projection's gradient) per backward;
# and the graph has no view nodes for the flattens (each a node recorded in the forward and run in
# the backward: host time per call on the CUDA path).
def _stacked_fwd(qkv: Tensor, x: Tensor, gamma: Tensor, d: int):
    q, k, v = qkv.flatten(2).split_with_sizes((d, d, qkv.shape[1] - 2 * d), 1)
    return _fwd_body(q, k, v, x.flatten(2), gamma)


def _stacked_setup_context(ctx, inputs, output):
    qkv, _x, gamma, d = inputs
    _, o, lse = output
    ctx.set_materialize_grads(False)  # (as _twin_setup_context)
    ctx.save_for_backward(qkv, gamma, o, lse)
    ctx.d = d


def _stacked_backward(ctx, grad_out, *_other_grads):
    if grad_out is None:
        return None, None, None, None
    qkv, gamma, o, lse = ctx.saved_tensors
    d = ctx.d
    sizes = (d, d, qkv.shape[1] - 2 * d)
    q, k, v = qkv.flatten(2).split_with_sizes(sizes, 1)
    if _eager.grad_enabled():  # double backward: differentiable ops (as _backward)
        dq, dk, dv, dgamma = _grads_differentiable(grad_out, q, k, v, gamma)
        dqkv = torch.cat((dq, dk, dv), 1).view(qkv.shape)
    elif _backend_for(q, "attention_bwd") == "triton":
        dqkv = torch.empty_like(qkv)
        rowdot = _dispatch.triton_kernels("attention").backward(
            grad_out, q, k, v, o, gamma, out=dqkv.flatten(2).split_with_sizes(sizes, 1))[3]
        dgamma = rowdot.sum()
    else:
        dq, dk, dv, rowdot = _bwd_body(grad_out, q, k, v, o, lse, gamma)
        dqkv = torch.cat((dq, dk, dv), 1).view(qkv.shape)
        dgamma = rowdot.sum()
    # x's gradient: the residual's, grad_out (B, C, N) seen as x's (B, C, H, W)
    return dqkv, grad_out.view(qkv.shape[0], -1, *qkv.shape[2:]), _like_gamma(dgamma, gamma), None


_eager_stacked = _eager.twin("ganengine::attention_fwd", _stacked_fwd, _stacked_setup_context, _stacked_backward)


# ----------------------------------------------------------------------------- lean cpu entry
# The C++ ops ganengine_C::attention (its autograd in C++) and ganengine_C::self_attention2d
# (csrc/cpu/attention_autograd.cpp) run the cpu route above step by step without the Python
# custom-op layer. They refuse (NotImplementedError, before any work) what they do not serve;
# the full route below then raises the public errors or serves the call.
# What each entry calls: the block entry runs the core entry (_dispatch.lean_op resolves them).
_CORE_KERNELS = ("attention_fwd", "attention_bwd")
_BLOCK_KERNELS = ("attention", "attention_fwd", "attention_bwd")


# ----------------------------------------------------------------------------- forward-only calls
# A call that records no autograd graph (torch.no_grad / inference_mode, or no input requiring grad:
# sampling, evaluation, a discriminator on detached images) needs none of the flash pass's saved
# O(N C) state, and at mid sizes the plain composition (bmm, softmax, bmm: MKL GEMMs over the map)
# beats the C++ flash forward, whose 64 x 256 tiles with d = C/8 = 2..32 keep the GEMMs thin.
# Measured on the CPU, one thread, forward only under torch.no_grad, host time vs the eager SAGAN
# block (/tmp/acc/fix17c/micro*.py, 2026-12-07; B = 1, 4; C = 16, 64, 256): the C++ forward
# 1.04-1.37x at N = 256..1024 where the composition ran 0.72-1.04x; at N = 64 (N M = 4096) the C++
# forward 0.58-0.94x vs 0.62-0.92x; at N >= 2048 (the map, 16 MB a image, out of cache) the C++
# forward 0.45-0.99x vs 0.92-1.17x. Between N = 64 and 256 the review measured the crossover
# (/tmp/acc/rev17/b6_sagan_low.py, r1_*.py): the C++ forward 0.70-0.86x at N = 81 / 121 where the
# composition ran 0.96-1.08x; N = 144 0.99x vs 1.02x; N = 196 1.06x vs 1.00x. So forward-only calls
# with N > 144 query positions and N M <= 2^20 position pairs (SAGAN: 144 < N <= 1024; BigGAN,
# M = N / 4: 144 < N <= 2048) on the CPU, backend "auto", take the composition; it builds the
# (B, N, M) map for the call (4 MB a image at most), as the eager block does. Graph-recording calls
# keep the flash op (forward + backward: 0.26-1.03x the eager block, docs/attention.md
# "Forward-only calls").
COMPOSED_FWD_MIN_POSITIONS = 144   # exclusive, on N
COMPOSED_FWD_MAX_PAIRS = 1 << 20   # inclusive, on N * M


def composes(n: int, m: int, *tensors) -> bool:
    """Whether a call of the core on (N = n, M = m) positions with these tensors (q/x first) takes
    the forward-only composition: CPU, backend "auto", no graph recorded, 144 < N, N M <= 2^20,
    a plain eager call (not compiling, tracing or under a dispatch mode: those see the custom ops),
    not under CPU autocast (``autocast_eager``: the core serves those calls with eager's ops)."""
    return (n > COMPOSED_FWD_MIN_POSITIONS and n * m <= COMPOSED_FWD_MAX_PAIRS and tensors[0].is_cpu
            and not _eager.records_graph(tensors, forward_ad=False) and _dispatch._requested_backend() == "auto"
            and not autocast_eager(tensors[0], n) and _eager.plain_eager(*tensors))


@_eager.autocast_off
def composed_forward(q: Tensor, k: Tensor, v: Tensor, x: Tensor, gamma: Tensor, return_attention: bool = False):
    """``gamma * v softmax(q^T k)^T + x`` (and the map) as bmm, softmax, bmm, addcmul in fp32 / fp64
    (the accumulation dtype of the fused op; autocast off): out has x's dtype and x's strides, the
    map q's dtype. The eager block's own formula, for calls that record no graph (``composes``)."""
    qt = q.dtype
    ct = acc_dtype(qt)
    if qt != ct:
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
    p = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)      # (B, N, M)
    o = torch.bmm(v, p.transpose(1, 2))                               # (B, C, N)
    out = torch.addcmul(_as(x, ct), _as(gamma, ct), o)                # gamma (1,) or (): broadcasts
    out = _like(x, _as(out, x.dtype))
    _dispatch.last_used["attention"] = "torch"
    return (out, _as(p, qt)) if return_attention else out


@_eager.autocast_off
def composed_attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``v softmax(q^T k)^T`` (B, C, N) in the accumulation dtype (bmm, softmax, bmm; autocast off):
    the attention of ``composed_forward`` without the residual (BigGAN's forward-only route, which
    applies its output conv after it where that is cheaper)."""
    ct = acc_dtype(q.dtype)
    q, k, v = _as(q, ct), _as(k, ct), _as(v, ct)
    _dispatch.last_used["attention"] = "torch"
    return torch.bmm(v, torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1).transpose(1, 2))


# ----------------------------------------------------------------------------- CPU autocast: eager's ops
# Under CPU autocast (bfloat16 / float16) the eager block runs its two products as low-precision
# GEMMs (oneDNN, on bf16 dot-product hardware ~2x fp32's rate) and a softmax of the low-precision
# scores; the fused routes widen q, k, v to fp32 (the C++ flash kernels and the forward-only
# composition are fp32 / fp64 only), so under autocast they ran 0.53-0.68x the eager block's
# forward and 0.71-0.96x its forward + backward (SAGAN c = 64 / 128, N = 1024, one thread;
# docs/attention.md "CPU autocast"). So a call under CPU autocast with the backend left to
# "auto" and more than AUTOCAST_EAGER_MIN_POSITIONS query positions (below) runs eager's ops:
# bmm, softmax, bmm in the autocast dtype (autocast casts them), the residual x + gamma o as one
# addcmul with eager's type promotion (SAGAN's fp32 (1,) gamma makes a bf16 x's output fp32, as
# eager's gamma * o + x does; BigGAN's 0-dim gamma keeps x's dtype): eager's numbers, output
# dtypes, autograd and cost. A named backend keeps its route. (A bf16 flash kernel in C++ would
# be the way to beat eager here.)
# At up to AUTOCAST_EAGER_MIN_POSITIONS query positions the call is host-bound and the fused route
# (the C++ entry: one call; fp32 products) stays cheaper than eager's ops under autocast (thread
# time, one thread, B = 1 / 4, C = 16 / 64, forward and forward + backward: the fused route
# 1.39-2.47x eager at N = 16..144 where eager's ops ran 1.34-2.01x; at N = 256 0.97-1.48x vs
# 1.16-1.43x; at N = 576 0.44-1.10x vs 0.71-1.16x: /tmp/amptfix/sweep.py, 2026-12-07), and its
# output is fp32 as eager's is for an fp32 x; a half / bf16 residual x takes eager's ops at every
# N (eager's gamma * o + x promotes to fp32, the fused route keeps x's dtype).
AUTOCAST_EAGER_MIN_POSITIONS = 144   # exclusive, on N


def autocast_eager(t, n: int, residual=None) -> bool:
    """Whether a call on CPU tensor ``t`` (q or x) with ``n`` query positions runs eager's ops
    (above): CPU autocast on, backend "auto", and n > AUTOCAST_EAGER_MIN_POSITIONS or a half /
    bf16 ``residual`` x. Outside autocast one thread-local read (``module_autocast``: every fp32
    call's only cost)."""
    return (module_autocast(t) and t.is_cpu  # (the conv modules' question: autocast on, backend auto)
            and (n > AUTOCAST_EAGER_MIN_POSITIONS
                 or (isinstance(residual, Tensor) and residual.dtype in (torch.float16, torch.bfloat16))))


def autocast_core(q: Tensor, k: Tensor, v: Tensor, x: Tensor, gamma: Tensor, return_attention: bool = False):
    """``x + gamma * v softmax(q^T k)^T`` (and the map) as eager's ops under the caller's autocast
    (``autocast_eager``): the products in the autocast dtype, the residual with eager's type
    promotion. x may be (B, C, N) or any shape whose flattening is (B, C, N); out has x's shape."""
    p = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)      # (B, N, M)
    o = torch.bmm(v, p.transpose(1, 2))                               # (B, C, N)
    out = torch.addcmul(x, gamma, o.view(x.shape))                    # gamma (1,) or (): broadcasts
    _dispatch.last_used["attention"] = "torch"
    return (out, p) if return_attention else out


def _autocast_block(x, qw, qb, kw, kb, vw, vb, gamma, return_attention: bool):
    """The block as eager's ops under CPU autocast (``autocast_eager``), or None where the checked
    route must decide (arguments it would refuse or reshape: its public errors)."""
    if not (x.dim() == 4 and x.is_floating_point() and isinstance(gamma, Tensor) and gamma.numel() == 1
            and gamma.device == x.device):
        return None
    b, c, h, w = x.shape
    if not (b and h * w and _plain_block_args(c, qw, qb, kw, kb, vw, vb) and qw.shape[0]):
        return None
    d = qw.shape[0]
    qkv = stacked_conv1x1(x, (qw, kw, vw), (qb, kb, vb))   # one conv (autocast casts it), else three
    if qkv is not None:
        q, k, v = qkv.flatten(2).split_with_sizes((d, d, c), 1)
    else:
        q, k, v = F.conv2d(x, qw, qb).flatten(2), F.conv2d(x, kw, kb).flatten(2), F.conv2d(x, vw, vb).flatten(2)
    return autocast_core(q, k, v, x, gamma, return_attention)


# ----------------------------------------------------------------------------- public
def attention(q: Tensor, k: Tensor, v: Tensor, x: Tensor, gamma: Tensor) -> Tensor:
    """``gamma * (v softmax(q^T k)^T) + x`` on channel-major (B, d, N) / (B, d, M) / (B, C, M) /
    (B, C, N) tensors, without the N x M map. The core under both attention modules."""
    if not isinstance(gamma, Tensor):
        gamma = torch.tensor(float(gamma), device=x.device)
    if isinstance(q, Tensor) and q.dim() == 3 and autocast_eager(q, q.shape[2], x):
        check_core(q, k, v, x, gamma)
        if q.shape[0]:
            return autocast_core(q, k, v, x, gamma)
    if (isinstance(q, Tensor) and q.dim() == 3 and isinstance(k, Tensor) and k.dim() == 3
            and composes(q.shape[2], k.shape[2], q, k, v, x, gamma)):
        check_core(q, k, v, x, gamma)   # (the public errors first; a few us at these sizes)
        if q.shape[0]:
            return composed_forward(q, k, v, x, gamma)
    # (_eager.lean_ok: plain tensors, or subclasses of concrete sizes; make_fx's symbolic
    # FakeTensors, whose sizes the entry's checks cannot read, take the full route)
    lean = _eager.lean_ok
    if (isinstance(q, Tensor) and lean(q) and q.is_cpu and isinstance(k, Tensor) and lean(k)
            and isinstance(v, Tensor) and lean(v) and isinstance(x, Tensor) and lean(x)
            and not torch.compiler.is_compiling()):
        op = _dispatch.lean_op("attention", _CORE_KERNELS)
        if op is not None:
            try:
                out = op(q, k, v, x, gamma)
            except NotImplementedError:  # refused before any work: the full route decides
                pass
            else:
                _dispatch.last_used["attention"] = "cpu"
                return out
    check_core(q, k, v, x, gamma)
    return _core(q, k, v, x, gamma)


def _core(q: Tensor, k: Tensor, v: Tensor, x: Tensor, gamma: Tensor) -> Tensor:
    """The checked core call: the eager twin for a plain eager call, the custom op otherwise."""
    if q.shape[0] == 0:  # an empty batch (the empty last shard of a split batch): empty output, as eager's
        return reference_attention(q, k, v, x, gamma)
    fwd = _eager_fwd if _eager.plain_eager(q, k, v, x, gamma) else attention_fwd
    return fwd(q, k, v, x, gamma)[0]


def _conv_weight(name: str, w: Tensor, out_ch: int | None, in_ch: int) -> Tensor:
    if not isinstance(w, Tensor):
        raise TypeError(f"self_attention2d: {name} must be a tensor, got {type(w).__name__}")
    dim = w.dim()
    if dim == 2:  # accept a (out, in) matrix too
        w = w[:, :, None, None]
        dim = 4
    # (shape entries compared one by one: a torch.Size compared with a tuple goes through sym_eq, ~2 us)
    if dim == 4 and w.shape[1] != in_ch and w.shape[2] == 1 and w.shape[3] == 1:
        raise ValueError(f"self_attention2d: x has {in_ch} channels but {name} {tuple(w.shape)} expects "
                         f"{w.shape[1]} input channels")
    if (dim != 4 or w.shape[1] != in_ch or w.shape[2] != 1 or w.shape[3] != 1
            or (out_ch is not None and w.shape[0] != out_ch)):
        want = f"({out_ch if out_ch is not None else 'd'}, {in_ch}, 1, 1)"
        raise ValueError(f"self_attention2d: {name} must be a 1x1 conv weight {want}, got {tuple(w.shape)}")
    return w


def _conv_bias(name: str, b: Tensor | None, out_ch: int) -> Tensor | None:
    if b is not None and (not isinstance(b, Tensor) or b.dim() != 1 or b.shape[0] != out_ch):
        raise ValueError(f"self_attention2d: {name} must be None or a ({out_ch},) tensor, got "
                         f"{tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
    return b


def _plain_block_args(c: int, qw, qb, kw, kb, vw, vb) -> bool:
    """The module's own call, checked at once (on the CUDA path this route is the call's host
    cost): three 4-D 1x1 conv weights (d, c), (d, c), (c, c) and biases None or (d,), (d,), (c,).
    False sends the call through the checks one by one (_conv_weight, _conv_bias), which raise
    the public errors or take 2-D weights."""
    types = _eager._TENSOR_TYPES
    if not (type(qw) in types and type(kw) in types and type(vw) in types):
        return False
    qs, ks, vs = qw.shape, kw.shape, vw.shape
    if not (len(qs) == 4 and len(ks) == 4 and len(vs) == 4):
        return False
    d = qs[0]
    if not (qs[1] == c and ks[0] == d and ks[1] == c and vs[0] == c and vs[1] == c
            and qs[2] == 1 and qs[3] == 1 and ks[2] == 1 and ks[3] == 1 and vs[2] == 1 and vs[3] == 1):
        return False
    for bias, n in ((qb, d), (kb, d), (vb, c)):
        if bias is not None and not (type(bias) in types and bias.dim() == 1 and bias.shape[0] == n):
            return False
    return True



def _check_block_dtypes(x, qw, qb, kw, kb, vw, vb) -> None:
    """The dtype errors of the block's convs, naming the argument (checked where a conv failed or
    the weights' dtypes differ, never on the served path)."""
    if not x.is_floating_point():
        raise TypeError(f"self_attention2d: x must be a floating-point tensor, got {x.dtype}")
    if torch.is_autocast_enabled(x.device.type):
        return  # (the convs cast)
    for name, t in (("query_weight", qw), ("query_bias", qb), ("key_weight", kw), ("key_bias", kb),
                    ("value_weight", vw), ("value_bias", vb)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"self_attention2d: {name} is {t.dtype} but x is {x.dtype}: they must match "
                            "(outside autocast)")


def self_attention2d(x: Tensor, query_weight: Tensor, query_bias: Tensor | None,
                     key_weight: Tensor, key_bias: Tensor | None,
                     value_weight: Tensor, value_bias: Tensor | None,
                     gamma: Tensor, return_attention: bool = False):
    """The SAGAN block ``gamma * attn(x) + x`` (heykeetae ``Self_Attn``), never building the
    N x N attention map unless ``return_attention=True``; then returns ``(out, attention)``
    with ``attention`` of shape (B, N, N) as the reference does.

    Weights are 1x1 conv weights: query/key (d, C, 1, 1), value (C, C, 1, 1); biases (d,) /
    (C,) or None; ``gamma`` a one-element tensor (the reference's ``(1,)`` parameter).
    """
    if return_attention is not False and return_attention is not True:
        return_attention = flag(return_attention, "self_attention2d", "return_attention")
    # (CPU autocast: eager's ops, see autocast_eager)
    if isinstance(x, Tensor) and x.dim() == 4 and autocast_eager(x, x.shape[2] * x.shape[3], x):
        res = _autocast_block(x, query_weight, query_bias, key_weight, key_bias, value_weight, value_bias,
                              gamma, return_attention)
        if res is not None:
            return res
    # forward-only calls (no graph recorded) on the CPU: the composition (``composes``) where it wins
    # without the map, and always with it (the map is built anyway: one softmax, not two)
    compose = (isinstance(x, Tensor) and x.dim() == 4 and x.is_cpu and isinstance(gamma, Tensor)
               and (return_attention
                    or COMPOSED_FWD_MIN_POSITIONS < x.shape[2] * x.shape[3]
                    and (x.shape[2] * x.shape[3]) ** 2 <= COMPOSED_FWD_MAX_PAIRS)
               and not _eager.records_graph((x, query_weight, query_bias, key_weight, key_bias, value_weight,
                                             value_bias, gamma), forward_ad=False)
               and _dispatch._requested_backend() == "auto")
    if (not return_attention and not compose and isinstance(x, Tensor) and _eager.lean_ok(x) and x.is_cpu
            and isinstance(gamma, Tensor)
            and isinstance(query_weight, Tensor)
            and isinstance(key_weight, Tensor) and isinstance(value_weight, Tensor)
            and isinstance(query_bias, (Tensor, type(None))) and isinstance(key_bias, (Tensor, type(None)))
            and isinstance(value_bias, (Tensor, type(None))) and not torch.compiler.is_compiling()):
        op = _dispatch.lean_op("self_attention2d", _BLOCK_KERNELS)
        if op is not None:
            try:
                out = op(x, query_weight, query_bias, key_weight, key_bias, value_weight, value_bias, gamma)
            except NotImplementedError:  # refused before any work: the full route decides
                pass
            except RuntimeError:  # (a dtype the convs refuse: said with the argument's name)
                _check_block_dtypes(x, query_weight, query_bias, key_weight, key_bias, value_weight, value_bias)
                raise
            else:
                _dispatch.last_used["attention"] = "cpu"
                return out
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"self_attention2d: x must be a 4-D (B, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not x.is_floating_point():  # (integer weights too would run the convs in integers)
        raise TypeError(f"self_attention2d: x must be a floating-point tensor, got {x.dtype}")
    b, c, h, w = x.shape
    if not _plain_block_args(c, query_weight, query_bias, key_weight, key_bias, value_weight, value_bias):
        # (the checks one by one, with the public errors; 2-D weights taken as 1x1 convs)
        query_weight = _conv_weight("query_weight", query_weight, None, c)
        key_weight = _conv_weight("key_weight", key_weight, query_weight.shape[0], c)
        value_weight = _conv_weight("value_weight", value_weight, c, c)
        d = query_weight.shape[0]
        query_bias = _conv_bias("query_bias", query_bias, d)
        key_bias = _conv_bias("key_bias", key_bias, d)
        value_bias = _conv_bias("value_bias", value_bias, c)
    d = query_weight.shape[0]
    if not isinstance(gamma, Tensor):
        gamma = torch.tensor([float(gamma)], device=x.device)
    # q, k, v and x are consistent by construction (the convs check them against x): of
    # check_core's checks only gamma's and the empty sizes are left (check_core raises them)
    core_ok = bool(gamma.numel() == 1 and b and h * w and d and gamma.device == x.device)
    try:
        qkv = stacked_conv1x1(x, (query_weight, key_weight, value_weight), (query_bias, key_bias, value_bias))
    except RuntimeError:
        _check_block_dtypes(x, query_weight, query_bias, key_weight, key_bias, value_weight, value_bias)
        raise
    if qkv is not None:
        if core_ok and not return_attention and not compose and _eager.plain_eager(qkv, x, gamma):
            return _eager_stacked(qkv, x, gamma, d)[0].view(b, c, h, w)
        x3 = x.flatten(2)
        q, k, v = qkv.flatten(2).split_with_sizes((d, d, c), 1)
    else:  # (mixed biases or dtypes: the three convs, which raise what they raise)
        _check_block_dtypes(x, query_weight, query_bias, key_weight, key_bias, value_weight, value_bias)
        q = F.conv2d(x, query_weight, query_bias).flatten(2)
        k = F.conv2d(x, key_weight, key_bias).flatten(2)
        v = F.conv2d(x, value_weight, value_bias).flatten(2)
        # (x's view after the convs: the order in which autograd sums x's four gradients, as the
        # C++ entry's graph has it)
        x3 = x.flatten(2)
    if not core_ok:
        check_core(q, k, v, x3, gamma)
    if compose and _eager.plain_eager(x, query_weight, key_weight, value_weight, gamma):
        res = composed_forward(q, k, v, x3, gamma, return_attention)
        return (res[0].view(b, c, h, w), res[1]) if return_attention else res.view(b, c, h, w)
    out = _core(q, k, v, x3, gamma).view(b, c, h, w)
    return (out, attention_map(q, k)) if return_attention else out


def stacked_conv1x1(x: Tensor, weights: tuple, biases: tuple) -> Tensor | None:
    """The 1x1 convs ``F.conv2d(x, w_i, b_i)`` of one input as ONE conv with the weights stacked
    (its output's channel slices are the convs' outputs), or None where they cannot stack: biases
    not all present or all absent, weights/biases of different dtypes (which the separate convs
    would refuse and ``torch.cat`` would promote).

    Why: the projections of the attention blocks (q/k/v; BigGAN's theta/phi/g) are three GEMMs
    on the same x. One conv is one GEMM launch instead of three (plus, on cuDNN, one bias add
    instead of three), and its backward one convolution backward instead of three whose input
    gradients the autograd engine adds up pairwise. The price: two small ``torch.cat`` of the
    weights and biases (O(out * C), 1 / (B H W) of the conv's work) per call, and one cat of the
    output gradients in the backward (the callers split the output with ``split_with_sizes``,
    whose backward is that cat, rather than slicing it, which would give one zero-filled
    gradient per slice, summed). Each output channel is still its own dot product over C, so
    the error bounds are those of the separate convs; the bits may differ (the GEMM blocks
    differently: seen on oneDNN).
    """
    dtype = weights[0].dtype
    for w in weights:
        if w.dtype != dtype:
            return None
    if biases[0] is None:
        for b in biases:
            if b is not None:
                return None
        bias = None
    else:
        for b in biases:
            if b is None or b.dtype != dtype:
                return None
        bias = torch.cat(biases)   # (tensors on different devices: cat raises, as the convs would)
    return F.conv2d(x, torch.cat(weights), bias)


@_eager.autocast_off
def attention_map(q: Tensor, k: Tensor) -> Tensor:
    """The (B, N, M) map softmax(q^T k) the reference returns, differentiable. Only built on
    request: ``out`` still comes from the fused op, so the (B, C, N) x (B, N, M) product
    and its backward never run through the map."""
    ct = acc_dtype(q.dtype)
    return torch.softmax(torch.bmm(q.to(ct).transpose(1, 2), k.to(ct)), dim=-1).to(q.dtype)


# ----------------------------------------------------------------------------- fakes of the raw C++ kernels
# The lean C++ entries' autograd kernels still run under FakeTensorMode and call these.
if _ext.loaded() and _ext.has_kernel("attention_fwd", "CPU"):
    @torch.library.register_fake("ganengine_C::attention_fwd")
    def _(q, k, v, x, gamma):
        return torch.empty_like(x), torch.empty_like(x), x.new_empty((q.shape[0], q.shape[2]))

if _ext.loaded() and _ext.has_kernel("attention_bwd", "CPU"):
    @torch.library.register_fake("ganengine_C::attention_bwd")
    def _(grad, q, k, v, o, lse, delta, gamma):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
