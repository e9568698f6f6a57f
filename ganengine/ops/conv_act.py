"""PatchGAN convolutions with fused epilogues: custom ops, fake impls, autograd, dispatch.

Ops (namespace ``ganengine``):
  conv2d_act_fwd(x, weight, bias?, stride, padding, slope) -> y
      y = leaky_relu(conv2d(x, weight, bias), slope)
  conv2d_act_bwd(grad_y, x, weight, y, stride, padding, slope, mask) -> (dx, dw, db)
      needs only the sign of y (slope >= 0), so autograd saves the output, not the conv result
  conv2d_in_act_fwd(x, weight, gamma?, beta?, stride, padding, eps, slope) -> (y, c, mean, rstd)
      c = conv2d(x, weight) (no bias: instance norm removes it exactly),
      y = leaky_relu((c - mean) * rstd * gamma + beta, slope); mean/rstd per (n, c) in fp32
  conv2d_in_act_bwd(grad_y, x, weight, c, mean, rstd, gamma?, beta?, stride, padding, slope, mask)
      -> (dx, dw, dgamma, dbeta)
Entries of ``mask`` say which gradients are wanted; an unwanted one comes back as an empty
tensor, as do dgamma / dbeta for an absent gamma / beta (on every backend: nothing to read, no
kernel to fill it). "relu" is slope 0 and "none" is slope 1, so one kernel serves every activation.

Layout: outputs and dx are channels_last when x is (NHWC-dense and not NCHW-contiguous),
NCHW-contiguous otherwise; dw follows weight the same way.

Backends: torch (F.conv2d composition, the reference), cpu (oneDNN conv + fused C++ epilogues,
csrc/cpu/conv_act.cpp), cuda (ATen's convolution, cuDNN, + CUDA C++ epilogue kernels for
conv2d_act and the instance norm's CUDA C++ kernels for conv2d_instance_norm_act,
csrc/cuda/conv_act_launcher.cpp; on CUDA tensors their C++ entries ganengine_C::conv2d_act /
conv2d_in_act, one dispatcher call with C++ autograd, serve the plain calls where `auto` or
`cuda` takes them),
triton (kernels/conv_act.py). The triton backend has two convolution
implementations: "vendor" (cuDNN / oneDNN convolution + Triton epilogue kernels) and "igemm"
(Triton implicit-GEMM convolutions with the epilogue fused, data and weight gradients as
implicit GEMMs too). ``triton_conv_impl(name)`` / ``GANENGINE_CONV_IMPL`` pick one; "auto" is
vendor on CUDA (cuDNN is expected to beat a hand-written conv; not measured here, no GPU) and
igemm on CPU tensors under the interpreter, where the point is exercising our kernels.

Autocast rule: like F.conv2d, the convolution runs in the autocast dtype (inputs are cast in
the public functions); statistics accumulate in fp32 and gamma/beta are read in fp32.
"""
from __future__ import annotations

import contextvars
import os

import torch
import torch.nn.functional as F

from ganengine import _ext, settings
from ganengine.ops import _dispatch, _eager
from ganengine.ops.conv import autocast_conv_entry as _autocast_conv_entry
from ganengine.ops._conv_common import FLOATS as _FLOATS
from ganengine.ops._conv_common import acc_dtype as _acc
from ganengine.ops._conv_common import autocast_args as _autocast
from ganengine.ops._conv_common import bias_grad as _bias_grad
from ganengine.ops._conv_common import check_conv as _check_conv
from ganengine.ops._conv_common import check_fits as _check_fits
from ganengine.ops._conv_common import conv_grads as _conv_bwd
from ganengine.ops._conv_common import conv_grads_bias as _conv_bwd_bias
from ganengine.ops._conv_common import dense_copy
from ganengine.ops._conv_common import dynamo_compiling as _dynamo_compiling
from ganengine.ops._conv_common import any_autocast, autocast_for, eager_autocast, eager_autocast_error
from ganengine.ops._conv_common import fast_entry
from ganengine.ops._conv_common import grads_by_reference as _grads_by_reference
from ganengine.ops._conv_common import out_format
from ganengine.ops._conv_common import pair as _pair
from ganengine.ops._conv_common import vendor_conv as _vendor_conv
from ganengine.ops.norm_act import check_param_dtype as _check_param_dtype
from ganengine.ops.norm_act import param_dtype_ok
from ganengine.ops.norm_act import inv_std as _inv_std  # ATen's zero-variance rule for eps = 0
from ganengine.ops.norm_act import nhwc_variant as _nhwc_variant
from ganengine.ops.norm_act import act_grad as _act_grad
from ganengine.ops.norm_act import activate as _activate
CONV_IMPLS = ("auto", "vendor", "igemm")
_lean = _eager.lean_ok  # the tensors the lean C++ entries take
_compiler = torch.compiler  # (read per call: through the torch module ~40 ns more, as ops/conv.py's)
_conv_impl: contextvars.ContextVar[str | None] = contextvars.ContextVar("ganengine_conv_impl", default=None)


class triton_conv_impl:
    """Pick the triton backend's convolution: ``"vendor"``, ``"igemm"`` or ``"auto"``.

    ``triton_conv_impl("igemm")`` sets it; ``with triton_conv_impl("igemm"):`` scopes it.
    """

    def __init__(self, name: str):
        if name not in CONV_IMPLS:
            raise ValueError(f"triton_conv_impl: name must be one of {CONV_IMPLS}, got {name!r}")
        self._token = _conv_impl.set(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _conv_impl.reset(self._token)
        return False


# GANENGINE_CONV_IMPL read from os.environ's own dict (as _dispatch.lean_op reads
# GANENGINE_BACKEND): os.environ.get costs ~1-4 us a call when the variable is unset, and every
# triton call asks this once in the forward and once in the backward. Each raw value is
# validated by settings.get once (a bad value raises there, every time, and is never cached).
try:
    _ENV_DATA, _ENV_KEY = os.environ._data, os.environ.encodekey("GANENGINE_CONV_IMPL")
except AttributeError:  # not CPython's os._Environ: the public mapping
    _ENV_DATA, _ENV_KEY = os.environ, "GANENGINE_CONV_IMPL"
_ENV_PARSED: dict = {}  # raw value (None when unset) -> the validated name


def _resolved_conv_impl(device: torch.device) -> str:
    name = _conv_impl.get()
    if not name:
        raw = _ENV_DATA.get(_ENV_KEY)
        name = _ENV_PARSED.get(raw)
        if name is None:
            name = _ENV_PARSED[raw] = settings.get("GANENGINE_CONV_IMPL")
    if name == "auto":
        return "vendor" if device.type == "cuda" else "igemm"
    return name


# ----------------------------------------------------------------------------- helpers
def _dense(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return dense_copy(t)  # (in the layout its strides suggest, as eager's output)


def _out_shape(x, w, stride, padding):
    n, _, h, wd = x.shape
    oh = (h + 2 * padding[0] - w.shape[2]) // stride[0] + 1
    ow = (wd + 2 * padding[1] - w.shape[3]) // stride[1] + 1
    return (n, w.shape[0], oh, ow)


def _empty_or(t_like, shape, fmt, wanted):
    if not wanted:
        return t_like.new_empty((0,))
    return torch.empty(shape, dtype=t_like.dtype, device=t_like.device, memory_format=fmt)


# ----------------------------------------------------------------------------- torch backend
def _torch_act_fwd(x, w, b, stride, padding, slope):
    y = _activate(_vendor_conv(x, w, b, stride, padding), slope)
    return y.contiguous(memory_format=out_format(x))


def _torch_act_bwd(grad, x, w, y, stride, padding, slope, mask):
    gz = _act_grad(grad, y, slope).contiguous(memory_format=out_format(y))
    dx, dw = _conv_bwd(gz, x, w, stride, padding, mask)
    db = gz.sum(dim=(0, 2, 3), dtype=_acc(gz.dtype)).to(gz.dtype) if mask[2] else gz.new_empty((0,))
    return dx, dw, db


def _var_mean(cf, keepdim):
    """torch.var_mean over the planes (biased), without its "degrees of freedom <= 0" warning on an
    empty batch (N = 0: no planes, (0, C) statistics; eager's F.instance_norm warns nothing there)."""
    if cf.shape[0] == 0:
        stats = cf.sum(dim=(2, 3), keepdim=keepdim)  # (the right shape, no entries)
        return stats, stats.clone()
    return torch.var_mean(cf, dim=(2, 3), unbiased=False, keepdim=keepdim)


def _in_act_apply(c, gamma, beta, eps, slope):
    acc = _acc(c.dtype)
    cf = c.to(acc)
    var, mean = _var_mean(cf, keepdim=False)
    rstd = _inv_std(var, eps)
    z = (cf - mean[:, :, None, None]) * rstd[:, :, None, None]
    if gamma is not None:
        z = z * gamma.to(acc)[None, :, None, None]
    if beta is not None:
        z = z + beta.to(acc)[None, :, None, None]
    y = _activate(z, slope).to(c.dtype).contiguous(memory_format=out_format(c))
    return y, mean, rstd


def _torch_in_fwd(x, w, gamma, beta, stride, padding, eps, slope):
    c = _vendor_conv(x, w, None, stride, padding)
    y, mean, rstd = _in_act_apply(c, gamma, beta, eps, slope)
    return y, c, mean, rstd


def _in_act_grad(grad, c, mean, rstd, gamma, beta, slope):
    """dc and the per-(n, c) sums A = sum dz, B = sum dz * xhat (torch composition)."""
    acc = mean.dtype
    xhat = (c.to(acc) - mean[:, :, None, None]) * rstd[:, :, None, None]
    z = xhat
    if gamma is not None:
        z = z * gamma.to(acc)[None, :, None, None]
    if beta is not None:
        z = z + beta.to(acc)[None, :, None, None]
    g = grad.to(acc)
    dz = _act_grad(g, z, slope)
    a = dz.sum(dim=(2, 3))
    b = (dz * xhat).sum(dim=(2, 3))
    hw = c.shape[2] * c.shape[3]
    k = rstd if gamma is None else rstd * gamma.to(acc)[None, :]
    dc = k[:, :, None, None] * (dz - (a / hw)[:, :, None, None] - xhat * (b / hw)[:, :, None, None])
    return dc.to(c.dtype).contiguous(memory_format=out_format(c)), a, b


def _affine_grads(gsum, bsum, mean, gamma, beta):
    """(dgamma, dbeta) from the per-instance sums: summed over the batch where gamma / beta exist
    (a kernel each on a GPU), else an empty (0,) tensor (no kernel, nothing to read), as the C++
    backends return them."""
    return (gsum.sum(0) if gamma is not None else mean.new_empty((0,)),
            bsum.sum(0) if beta is not None else mean.new_empty((0,)))


def _affine_grad_fakes(mean, gamma, beta):
    """The shapes _affine_grads returns: (C,) where the parameter exists, else (0,)."""
    c = mean.shape[1]
    return mean.new_empty((c if gamma is not None else 0,)), mean.new_empty((c if beta is not None else 0,))


def _torch_in_bwd(grad, x, w, c, mean, rstd, gamma, beta, stride, padding, slope, mask):
    dc, a, b = _in_act_grad(grad, c, mean, rstd, gamma, beta, slope)
    dx, dw = _conv_bwd(dc, x, w, stride, padding, mask)
    return (dx, dw, *_affine_grads(b, a, mean, gamma, beta))


# ----------------------------------------------------------------------------- dispatch
def _triton_verdict(x: torch.Tensor, impl: str) -> str | None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype} is not supported (fp16, bf16, fp32)"
    if impl == "igemm":
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return "tl.dot on bf16 is broken in the Triton interpreter"
    return None


def _backend(op: str, ext_op: str, x: torch.Tensor, variant: str | None = None) -> tuple[str, str]:
    """(backend, the triton convolution implementation): the implementation is resolved once per
    body, for the verdict and for the body's own branch. ``variant``: the auto order's (see
    _in_variant)."""
    impl = _resolved_conv_impl(x.device)
    # the C++ kernels for x's device: cpu's on CPU tensors, cuda's (csrc/cuda/conv_act_launcher.cpp)
    # on CUDA tensors; choose asks each only of the device it serves
    ext_reason = _dispatch.ext_reason(ext_op, x.device)
    if ext_reason is None and x.dtype not in _FLOATS:
        ext_reason = f"dtype {x.dtype} is not supported"
    verdicts = {"triton": _triton_verdict(x, impl), "cpu": ext_reason, "cuda": ext_reason}
    return _dispatch.choose(op, x, verdicts, variant), impl


def _tk():
    return _dispatch.triton_kernels("conv_act")


def _nk():
    """The instance-norm kernels (kernels/norm_act.py): statistics and apply in one or two
    launches, where conv_act's own tile kernels need a statistics pass, a merge of per-tile
    partials in torch ops (about ten tiny kernels) and an apply pass."""
    return _dispatch.triton_kernels("norm_act")


def _act_fwd_body(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                  padding: list[int], negative_slope: float) -> torch.Tensor:
    backend, impl = _backend("conv2d_act", "conv_act_fwd", x)
    if backend == "torch":
        return _torch_act_fwd(x, weight, bias, stride, padding, negative_slope)
    x = _dense(x)
    if backend == "cpu" or backend == "cuda":
        return _ext.op("conv_act_fwd")(x, weight, bias, stride, padding, negative_slope)
    tk = _tk()
    if impl == "igemm":
        return tk.conv2d(x, weight, bias, stride, padding, slope=negative_slope, fmt=out_format(x))
    y = _vendor_conv(x, weight, None, stride, padding)
    tk.bias_act_(y, bias, negative_slope)
    return y


conv2d_act_fwd = torch.library.custom_op("ganengine::conv2d_act_fwd", mutates_args=())(_act_fwd_body)


@conv2d_act_fwd.register_fake
def _(x, weight, bias, stride, padding, negative_slope):
    return torch.empty(_out_shape(x, weight, stride, padding), dtype=x.dtype, device=x.device,
                       memory_format=out_format(x))


def _act_bwd_body(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
                  stride: list[int], padding: list[int], negative_slope: float, mask: list[bool]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend, impl = _backend("conv2d_act", "conv_act_bwd", x)
    if backend == "torch":
        return _torch_act_bwd(grad, x, weight, y, stride, padding, negative_slope, mask)
    x = _dense(x)
    if backend == "cpu" or backend == "cuda":
        return _ext.op("conv_act_bwd")(grad, x, weight, y, stride, padding, negative_slope, mask)
    tk = _tk()
    # the bias gradient sum(gz) comes from the convolution's backward launch, not a reduction of
    # its own (the kernel count of eager's leaky_relu_backward + convolution_backward): the vendor
    # convolution_backward's bias output (eager's very computation), the implicit GEMM's weight-
    # gradient kernel (its first column of programs reads every pixel of gz anyway)
    if impl == "vendor":
        gz, _ = tk.act_grad(grad, y, negative_slope, bias_grad=False)
        return _conv_bwd_bias(gz, x, weight, stride, padding, mask)
    gz, db = tk.act_grad(grad, y, negative_slope, bias_grad=mask[2] and not mask[1])
    dx = tk.conv2d_grad_input(gz, weight, x.shape, stride, padding, out_format(x)) if mask[0] else x.new_empty((0,))
    if mask[1]:
        dw = tk.conv2d_grad_weight(gz, x, weight.shape, stride, padding, bias_grad=mask[2])
        if mask[2]:
            dw, db = dw
        dw = dw.contiguous(memory_format=out_format(weight))
    else:
        dw = weight.new_empty((0,))
    db = db.to(y.dtype) if mask[2] else y.new_empty((0,))
    return dx, dw, db


conv2d_act_bwd = torch.library.custom_op("ganengine::conv2d_act_bwd", mutates_args=())(_act_bwd_body)


@conv2d_act_bwd.register_fake
def _(grad, x, weight, y, stride, padding, negative_slope, mask):
    return (_empty_or(x, x.shape, out_format(x), mask[0]), _empty_or(weight, weight.shape, out_format(weight), mask[1]),
            _empty_or(y, (y.shape[1],), torch.contiguous_format, mask[2]))


def _in_fwd_body(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None,
                  beta: torch.Tensor | None, stride: list[int], padding: list[int], eps: float,
                  negative_slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    backend, impl = _backend("conv2d_instance_norm_act", "conv_in_act_fwd", x,
                             _in_variant(x, weight, stride, padding) if x.is_cuda else None)
    if backend == "torch":
        return _torch_in_fwd(x, weight, gamma, beta, stride, padding, eps, negative_slope)
    x = _dense(x)
    if backend == "cpu" or backend == "cuda":
        return _ext.op("conv_in_act_fwd")(x, weight, gamma, beta, stride, padding, eps, negative_slope)
    # (the triton dtypes are fp16 / bf16 / fp32: the kernels' fp32 statistics are already the
    # accumulation dtype, no conversion)
    if impl == "igemm":  # statistics from the GEMM's epilogue
        tk = _tk()
        c, mean, rstd = tk.conv2d(x, weight, None, stride, padding, fmt=out_format(x), stats_eps=eps)
        y = tk.norm_act(c, mean, rstd, gamma, beta, negative_slope)
        return y, c, mean, rstd
    c = _vendor_conv(x, weight, None, stride, padding)
    y, mean, rstd = _nk().forward(c, gamma, beta, eps, True, float(negative_slope))
    return y, c, mean, rstd


conv2d_in_act_fwd = torch.library.custom_op("ganengine::conv2d_in_act_fwd", mutates_args=())(_in_fwd_body)


@conv2d_in_act_fwd.register_fake
def _(x, weight, bias, gamma, beta, stride, padding, eps, negative_slope):
    shape = _out_shape(x, weight, stride, padding)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=out_format(x))
    stats = x.new_empty(shape[:2], dtype=_acc(x.dtype))
    return y, torch.empty_like(y), stats, torch.empty_like(stats)


def _in_bwd_body(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, c: torch.Tensor,
                  mean: torch.Tensor, rstd: torch.Tensor, gamma: torch.Tensor | None,
                  beta: torch.Tensor | None, stride: list[int], padding: list[int],
                  negative_slope: float, mask: list[bool]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    backend, impl = _backend("conv2d_instance_norm_act", "conv_in_act_bwd", x,
                             _in_variant(x, weight, stride, padding) if x.is_cuda else None)
    if backend == "torch":
        return _torch_in_bwd(grad, x, weight, c, mean, rstd, gamma, beta, stride, padding, negative_slope, mask)
    x = _dense(x)
    if backend == "cpu" or backend == "cuda":
        return _ext.op("conv_in_act_bwd")(grad, x, weight, c, mean, rstd, gamma, beta, stride, padding,
                                          negative_slope, mask[:2])
    # dc, and per instance b = sum(dz * xhat) (gamma's gradient) and a = sum(dz) (beta's)
    dc, b, a = _nk().backward(grad, c, gamma, beta, mean.contiguous(), rstd.contiguous(), True,
                              float(negative_slope))
    if impl == "vendor":
        dx, dw = _conv_bwd(dc, x, weight, stride, padding, mask)
    else:
        tk = _tk()
        dx = tk.conv2d_grad_input(dc, weight, x.shape, stride, padding, out_format(x)) if mask[0] else x.new_empty((0,))
        dw = tk.conv2d_grad_weight(dc, x, weight.shape, stride, padding).contiguous(
            memory_format=out_format(weight)) if mask[1] else weight.new_empty((0,))
    # (_affine_grads inline: the CUDA path's host time per call; an absent one costs no kernel)
    return (dx, dw, b.sum(0) if gamma is not None else mean.new_empty((0,)),
            a.sum(0) if beta is not None else mean.new_empty((0,)))


conv2d_in_act_bwd = torch.library.custom_op("ganengine::conv2d_in_act_bwd", mutates_args=())(_in_bwd_body)


@conv2d_in_act_bwd.register_fake
def _(grad, x, weight, c, mean, rstd, gamma, beta, stride, padding, negative_slope, mask):
    return (_empty_or(x, x.shape, out_format(x), mask[0]), _empty_or(weight, weight.shape, out_format(weight), mask[1]),
            *_affine_grad_fakes(mean, gamma, beta))


# ----------------------------------------------------------------------------- autograd
def reference_conv2d_act(x, weight, bias, stride, padding, negative_slope):
    """The differentiable torch composition (double backward, and slope < 0)."""
    return _activate(F.conv2d(x, weight, bias, stride, padding), negative_slope)


def reference_conv2d_in_act(x, weight, bias, stride, padding, gamma, beta, eps, negative_slope):
    c = F.conv2d(x, weight, bias, stride, padding)
    acc = _acc(c.dtype)
    var, mean = _var_mean(c.to(acc), keepdim=True)
    z = (c.to(acc) - mean) * _inv_std(var, eps)
    if gamma is not None:
        z = z * gamma.to(acc)[None, :, None, None]
    if beta is not None:
        z = z + beta.to(acc)[None, :, None, None]
    return _activate(z, negative_slope).to(c.dtype)


def _act_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, slope = inputs
    ctx.save_for_backward(x, weight, bias, output)
    ctx.conf = (list(stride), list(padding), slope)


def _act_backward(ctx, grad, bwd):
    x, weight, bias, y = ctx.saved_tensors
    stride, padding, slope = ctx.conf
    needs = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():
        dx, dw, db = _grads_by_reference(
            lambda a, b, c: reference_conv2d_act(a, b, c, stride, padding, slope), (x, weight, bias), needs, grad)
        return dx, dw, db, None, None, None
    mask = [bool(needs[0]), bool(needs[1]), bool(needs[2] and bias is not None)]
    dx, dw, db = bwd(grad, x, weight, y, stride, padding, slope, mask)
    return (dx if mask[0] else None), (dw if mask[1] else None), _bias_grad(db if mask[2] else None, bias), None, None, None


torch.library.register_autograd("ganengine::conv2d_act_fwd", _eager.backward_via(_act_backward, conv2d_act_bwd),
                                setup_context=_act_setup)
# plain eager calls (the CUDA path's, and the CPU's where the C++ entry declines): no custom-op layer
_act_eager = _eager.twin("ganengine::conv2d_act_fwd", _act_fwd_body, _act_setup,
                         _eager.backward_via(_act_backward, _act_bwd_body))


def _in_setup(ctx, inputs, output):
    x, weight, bias, gamma, beta, stride, padding, eps, slope = inputs
    _, c, mean, rstd = output
    ctx.save_for_backward(x, weight, gamma, beta, c, mean, rstd)
    ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype, bias.device)
    ctx.conf = (list(stride), list(padding), eps, slope)
    ctx.mark_non_differentiable(c, mean, rstd)
    # c, mean and rstd never carry a gradient: without this the engine makes a zeros tensor for
    # each of them every backward (three kernels on a GPU, 8 per call against eager's 6)
    ctx.set_materialize_grads(False)


def _in_backward(ctx, grad, bwd):
    if grad is None:  # (only y is differentiable: a backward without its gradient has nothing to do)
        return None, None, None, None, None, None, None, None, None
    x, weight, gamma, beta, c, mean, rstd = ctx.saved_tensors
    stride, padding, eps, slope = ctx.conf
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1]) + tuple(ctx.needs_input_grad[3:5])
    # the conv bias is removed exactly by the normalisation: its gradient is exactly zero
    db = torch.zeros(ctx.bias_meta[0], dtype=ctx.bias_meta[1], device=ctx.bias_meta[2]) if ctx.bias_meta is not None and ctx.needs_input_grad[2] else None
    if torch.is_grad_enabled():
        dx, dw, dg, dbt = _grads_by_reference(
            lambda a, b, g, bt: reference_conv2d_in_act(a, b, None, stride, padding, g, bt, eps, slope),
            (x, weight, gamma, beta), needs, grad)
        return dx, dw, db, dg, dbt, None, None, None, None
    mask = [bool(needs[0]), bool(needs[1])]
    dx, dw, dg, dbt = bwd(grad, x, weight, c, mean, rstd, gamma, beta, stride, padding, slope, mask)
    dg = dg.to(gamma.dtype) if gamma is not None and needs[2] else None
    dbt = dbt.to(beta.dtype) if beta is not None and needs[3] else None
    return (dx if mask[0] else None), (dw if mask[1] else None), db, dg, dbt, None, None, None, None


torch.library.register_autograd("ganengine::conv2d_in_act_fwd", _eager.backward_via(_in_backward, conv2d_in_act_bwd),
                                setup_context=_in_setup)
_in_eager = _eager.twin("ganengine::conv2d_in_act_fwd", _in_fwd_body, _in_setup,
                        _eager.backward_via(_in_backward, _in_bwd_body))


# ----------------------------------------------------------------------------- lean cpu entry
# conv2d_act on CPU tensors under 'auto' / 'cpu': one call of the C++ entry
# (csrc/cpu/conv_act_autograd.cpp: the same conv_act_fwd / _bwd kernels, autograd in C++), which
# skips the custom op's Python layers (50-70 us per call more than eager, at every size). Plain
# eager calls reach it through ganengine._C.conv2d_act_entry (csrc/cpu/conv_py.cpp: without the
# dispatcher op's own entry, ~1 us), tensor subclasses and torch function modes through the
# dispatcher op ganengine_C::conv2d_act.
# what ganengine_C::conv2d_act calls: the forward, and conv_act_bwd's two halves (its autograd drops the
# saved output between them, as eager's graph does; conv_act_autograd.cpp)
_ACT_KERNELS = ("conv_act_fwd", "conv_act_bwd.act", "conv_act_bwd.conv")
# the message prefix of the C++ entry's refusals (conv_act_autograd.cpp, check()); a weight that
# is not a Tensor, or a bias neither None nor a Tensor, is declined too (_dispatch.refused; stride,
# padding and slope are handed over only when of plain types)
_REFUSAL = "conv2d_act: not served by the C++ entry"


def _plain_pair(v) -> bool:
    """An int or a pair of ints, as _pair takes them (the dispatcher would also take a bool)."""
    t = type(v)
    if t is int:
        return True
    return (t is tuple or t is list) and len(v) == 2 and type(v[0]) is int and type(v[1]) is int


# ganengine._C.conv2d_act_entry (csrc/cpu/conv_py.cpp): the same entry without the dispatcher op's
# own layer (plain eager calls)
_act_entry = fast_entry("conv2d_act_entry")
# its ``routes`` argument: 1 CPU tensors (the default), 8 CUDA tensors on the cuda backend's kernels
ACT_ROUTE_CPU, ACT_ROUTE_CUDA = 1, 8


def _act_dispatcher_entry(x, weight, bias, stride, padding, negative_slope):
    """conv2d_act's lean route through the dispatcher op ganengine_C::conv2d_act (the one that
    honours tensor subclasses and torch function modes; on CUDA tensors the one entry): y, or None
    where it declines or the requested backend would not run its kernels (CPU tensors: lean_op;
    CUDA tensors: cuda_entry, the cuda backend chosen). (stride, padding and slope of exactly the
    types _pair / float() take: the dispatcher would also take a bool, or convert a tensor)"""
    if not (isinstance(x, torch.Tensor) and _plain_pair(stride) and _plain_pair(padding)
            and (type(negative_slope) is float or type(negative_slope) is int)):
        return None
    op = _dispatch.entry(x, "conv2d_act", "conv2d_act", _ACT_KERNELS)
    if op is None:
        return None
    try:
        return op(x, weight, bias, stride, padding, negative_slope)
    except RuntimeError as e:  # (NotImplementedError is one)
        if not _dispatch.refused(e, _REFUSAL, bias, required=(weight,)):
            raise
    return None


def _act_cuda_entry(x, weight, bias, stride, padding, negative_slope):
    """conv2d_act on a CUDA tensor where the cuda backend is the one chosen (_dispatch.cuda_entry):
    the fast entry on its CUDA route (one C++ call: the dispatcher op's check and body without its
    layer), or the dispatcher op for what the fast entry hands it (tensor subclasses, torch function
    modes) and in an extension built before the entry took ``routes``. y, or None (the Python route
    serves the call or raises its public error)."""
    if _dispatch.cuda_entry("conv2d_act", "conv2d_act", _ACT_KERNELS) is None:
        return None
    if getattr(_ext._C, "conv2d_act_entry_routes", False):
        y = _act_entry(x, weight, bias, stride, padding, negative_slope, ACT_ROUTE_CUDA)
        if y is not NotImplemented:
            return y
    return _act_dispatcher_entry(x, weight, bias, stride, padding, negative_slope)


# conv2d_instance_norm_act's lean entry: ganengine_C::conv2d_in_act (same file, same rules)
_IN_KERNELS = ("conv_in_act_fwd", "conv_in_act_bwd")
_IN_REFUSAL = "conv2d_instance_norm_act: not served by the C++ entry"


def _lean_norm_params(x, norm_weight, norm_bias) -> bool:
    """Whether the lean entry may take these norm_weight / norm_bias (one given at least): tensors
    _eager.lean_ok takes, of F.instance_norm's dtypes for x (norm_act.param_dtype_ok; the entry
    would take any floating dtype). Else the Python route serves the call or
    raises the public error."""
    for t in (norm_weight, norm_bias):
        if t is not None:
            if not _lean(t):
                return False
            if not param_dtype_ok(t, x):
                return False
    return True


def _in_variant(x, weight, stride, padding) -> str | None:
    """The auto order's variant of a conv2d_instance_norm_act call on CUDA: the instance norm's
    (ops/norm_act._layout) for the conv output's planes, which take x's layout."""
    if (not isinstance(weight, torch.Tensor) or x.dim() != 4 or weight.dim() != 4 or x.is_contiguous()
            or not x.is_contiguous(memory_format=torch.channels_last)):
        return None
    s = (stride, stride) if type(stride) is int else stride
    if s[0] < 1 or s[1] < 1:  # (bad input: the route raises the public error)
        return None
    _, _, oh, ow = _out_shape(x, weight, s, (padding, padding) if type(padding) is int else padding)
    return _nhwc_variant(oh * ow)


# ----------------------------------------------------------------------------- public functions
def _act_autocast_call(x, weight, bias, stride, padding, negative_slope):
    """conv2d_act under autocast (_conv_common.eager_autocast; stride, padding and slope of plain
    types): eager's own calls, nn.Conv2d's convolution (its casts, weight-cast cache, autograd)
    then the activation in place on its fresh output, where the route would cast per call and
    run the same convolution (~1.3x eager's host time). In out_format(x); None where the route
    serves the call, or raises its public error (what ATen refuses)."""
    if not (eager_autocast(x, weight, bias) and _plain_pair(stride) and _plain_pair(padding)
            and (type(negative_slope) is float or type(negative_slope) is int)):
        return None
    try:
        y = torch.conv2d(x, weight, bias, stride, padding)
    except eager_autocast_error:
        return None
    _dispatch.last_used["conv2d_act"] = "torch"
    return act_on_fresh(y.contiguous(memory_format=out_format(x)), negative_slope)


def _in_autocast_call(x, weight, bias, stride, padding, norm_weight, norm_bias, eps, slope):
    """conv2d_instance_norm_act under autocast (as _act_autocast_call; the caller checked stride,
    padding, eps and the norm parameters): eager's own calls, the convolution, F.instance_norm and
    the activation, where the route casts per call and runs the same convolution (1.7-1.9x
    eager's host time forward, 1.3-1.4x forward + backward at the tiny bench shape). The conv
    bias's gradient is then eager's (rounding noise around zero, not the route's exact zero). In out_format(x); None where the route serves
    the call (``slope`` None: an activation it names in its error; a negative slope) or raises its
    public error (what ATen refuses), and for a one-pixel output map (F.instance_norm refuses it;
    the route normalises it to exactly 0)."""
    if slope is None or slope < 0 or not eager_autocast(x, weight, bias):
        return None
    try:
        y = F.instance_norm(torch.conv2d(x, weight, bias, stride, padding), weight=norm_weight, bias=norm_bias,
                            eps=eps)
    except eager_autocast_error:
        return None
    _dispatch.last_used["conv2d_instance_norm_act"] = "torch"
    y = y.contiguous(memory_format=out_format(x))
    # (out of place, as eager's modules: F.instance_norm's output is a view, in place on it costs
    # ~12 us of autograd's view handling; ReLU for slope 0: relu's +0 below zero)
    return y if slope == 1 else torch.relu(y) if slope == 0 else F.leaky_relu(y, slope)


def act_on_fresh(y: torch.Tensor, negative_slope: float) -> torch.Tensor:
    """conv2d_act's activation on a conv's fresh output ``y``, as eager's modules apply it: ReLU for
    slope 0 (relu's +0 below zero, as nn.ReLU), else LeakyReLU, in place where its backward allows
    (a slope >= 0: leaky_relu_'s backward reads the output's sign)."""
    if negative_slope == 0:
        return torch.relu_(y)
    return _leaky_relu_(y, negative_slope) if negative_slope > 0 else F.leaky_relu(y, negative_slope)


_leaky_relu_ = torch._C._nn.leaky_relu_


def conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
               negative_slope: float = 0.2) -> torch.Tensor:
    """``F.leaky_relu(F.conv2d(x, weight, bias, stride, padding), negative_slope)``, fused.

    groups=1, dilation=1, zero padding. ``negative_slope=0`` is ReLU and 1 the identity.
    x: (N, C, H, W), contiguous / channels_last / strided, fp32 / fp16 / bf16 / fp64.
    Twice differentiable (the double backward differentiates the torch composition).
    A negative slope runs the plain torch composition (the fused backward reads only the sign of
    the output, which needs slope >= 0).
    """
    # the lean route (see _ACT_KERNELS): the fast entry serves a plain eager call (Tensor), declines
    # what it does not serve (wrong shapes, dtypes or devices, a negative slope, autocast, empty
    # tensors, stride / padding / slope of other types than _pair / float() take) before any work
    # (None: the route below serves the call or raises the public error), or hands a tensor subclass
    # or a call under a torch function mode to the dispatcher op (NotImplemented). Any other error is
    # the call's own: raised once.
    # (_eager.lean_ok: plain tensors, or subclasses of concrete sizes; make_fx's symbolic
    # FakeTensors, whose sizes the entry's checks cannot read, take the full route)
    if (not (_dynamo_compiling() or _compiler._is_compiling_flag) and _lean(x)
            and _lean(weight) and (bias is None or _lean(bias))):
        if (on := autocast_for(x)) or (on is None and any_autocast()):
            if ((type(negative_slope) is float or type(negative_slope) is int)
                    and (y := _autocast_conv_entry(x, weight, bias, stride, padding, "conv2d_act")) is not None):
                return act_on_fresh(y, negative_slope)
            if (y := _act_autocast_call(x, weight, bias, stride, padding, negative_slope)) is not None:
                return y
        if x.is_cuda:  # the cuda backend's C++ entry, where chosen
            y = _act_cuda_entry(x, weight, bias, stride, padding, negative_slope)
            if y is not None:
                _dispatch.last_used["conv2d_act"] = "cuda"
                return y
        elif _dispatch.lean_op("conv2d_act", _ACT_KERNELS):
            y = _act_entry(x, weight, bias, stride, padding, negative_slope)
            if y is NotImplemented:
                y = _act_dispatcher_entry(x, weight, bias, stride, padding, negative_slope)
            if y is not None:
                _dispatch.last_used["conv2d_act"] = "cpu"
                return y
    _check_conv("conv2d_act", x, weight, bias)
    stride, padding = _pair("conv2d_act: stride", stride, 1), _pair("conv2d_act: padding", padding, 0)
    _check_fits("conv2d_act", x, weight, padding)
    x, weight, bias = _autocast(x, weight, bias)
    slope = float(negative_slope)
    if slope < 0:
        return reference_conv2d_act(x, weight, bias, stride, padding, slope)
    fwd = _act_eager if _eager.plain_eager(x, weight, bias) else conv2d_act_fwd
    return fwd(x, weight, bias, stride, padding, slope)


def conv2d_instance_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
                             padding=0, norm_weight: torch.Tensor | None = None,
                             norm_bias: torch.Tensor | None = None, eps: float = 1e-5,
                             activation: str = "leaky_relu", negative_slope: float = 0.2) -> torch.Tensor:
    """``act(F.instance_norm(F.conv2d(x, weight, bias, stride, padding), weight=norm_weight,
    bias=norm_bias, eps=eps))``, fused: the instance statistics are taken from the conv output
    (in the conv's epilogue on the implicit-GEMM path) and one pass normalises and activates.

    Instance norm with input statistics only (``track_running_stats=False``, as in the CycleGAN
    and pix2pix references; a module with running statistics keeps its separate norm layer).
    ``activation`` is "leaky_relu" (with ``negative_slope``), "relu" or "none". The conv
    ``bias`` cancels exactly in the normalisation: it is not added, and its gradient is exactly
    zero (torch's is rounding noise around zero). A one-pixel output map (H_out * W_out == 1)
    normalises to exactly 0, so the output is ``act(norm_bias)`` on every backend, as
    ``instance_norm_act`` (``F.instance_norm`` raises there).
    """
    # the lean route (ganengine_C::conv2d_in_act, as conv2d_act's above): it declines what it does
    # not serve (wrong shapes, dtypes or devices, a negative slope, an empty output map, autocast)
    # before any work; the route below then serves the call or raises the public error
    # On CUDA tensors the same entry runs the cuda backend's kernels where that backend is chosen
    # (_dispatch.cuda_entry, with the instance norm's variant of the conv output's planes).
    # Under autocast (backend "auto") eager's own calls serve it (_in_autocast_call).
    # (_eager.lean_ok, as conv2d_act's; norm_weight / norm_bias of a dtype F.instance_norm
    # refuses, which the entry would take, go to the route below and its public error)
    if (_lean(x) and _lean(weight) and (bias is None or _lean(bias))
            and ((norm_weight is None and norm_bias is None) or _lean_norm_params(x, norm_weight, norm_bias))
            and _plain_pair(stride) and _plain_pair(padding)
            and (type(eps) is float or type(eps) is int) and not torch.compiler.is_compiling()):
        if activation == "leaky_relu":
            lean_slope = negative_slope if (type(negative_slope) is float or type(negative_slope) is int) else None
        else:
            lean_slope = 0.0 if activation == "relu" else 1.0 if activation == "none" else None
        if (((on := autocast_for(x)) or (on is None and any_autocast()))
                and (y := _in_autocast_call(x, weight, bias, stride, padding, norm_weight, norm_bias, eps,
                                            lean_slope)) is not None):
            return y
        op = None if lean_slope is None else _dispatch.entry(
            x, "conv2d_in_act", "conv2d_instance_norm_act", _IN_KERNELS, _in_variant, weight, stride, padding)
        if op is not None:
            try:
                y = op(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, lean_slope)
            except RuntimeError as e:  # (NotImplementedError is one)
                if not _dispatch.refused(e, _IN_REFUSAL, bias, norm_weight, norm_bias, required=(weight,)):
                    raise
            else:
                _dispatch.last_used["conv2d_instance_norm_act"] = "cpu" if x.is_cpu else "cuda"
                return y
    fn = "conv2d_instance_norm_act"
    _check_conv(fn, x, weight, bias)
    stride, padding = _pair(f"{fn}: stride", stride, 1), _pair(f"{fn}: padding", padding, 0)
    _check_fits(fn, x, weight, padding)
    c_out = weight.shape[0]
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None:
            if not isinstance(t, torch.Tensor) or t.shape != (c_out,):
                raise ValueError(f"{fn}: {name} must be None or a ({c_out},) tensor")
            # (F.instance_norm refuses it; the kernels would read a pointer of another device)
            if t.device != x.device:
                raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")
    if activation == "leaky_relu":
        slope = float(negative_slope)
    elif activation == "relu":
        slope = 0.0
    elif activation == "none":
        slope = 1.0
    else:
        raise ValueError(f"{fn}: activation must be one of ('leaky_relu', 'relu', 'none'), got {activation!r}")
    x, weight, bias = _autocast(x, weight, bias)
    # norm_weight / norm_bias: F.instance_norm's dtype rule on the conv output (x's dtype after
    # autocast): that dtype, or float32 for a half / bfloat16 output
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None and t.dtype != x.dtype:
            _check_param_dtype(fn, name, t, x, "F.instance_norm")
    n_out = _out_shape(x, weight, stride, padding)
    if slope < 0 or n_out[2] * n_out[3] == 0:
        return reference_conv2d_in_act(x, weight, bias, stride, padding, norm_weight, norm_bias, eps, slope)
    fwd = _in_eager if _eager.plain_eager(x, weight, bias, norm_weight, norm_bias) else conv2d_in_act_fwd
    y, _, _, _ = fwd(x, weight, bias, norm_weight, norm_bias, stride, padding, float(eps), slope)
    return y


# ----------------------------------------------------------------------------- fake impls of the C++ entry
# (the entry's C++ autograd calls the raw kernels through the dispatcher: under a FakeTensorMode
# those need their own fakes, as ops/batch_norm_act.py registers for its kernels)
if _ext.loaded() and _ext.has_kernel("conv2d_act", "CompositeExplicitAutograd"):
    @torch.library.register_fake("ganengine_C::conv2d_act")
    def _(x, weight, bias, stride, padding, slope):
        return torch.empty(_out_shape(x, weight, stride, padding), dtype=x.dtype, device=x.device,
                           memory_format=out_format(x))

    @torch.library.register_fake("ganengine_C::conv_act_fwd")
    def _(x, weight, bias, stride, padding, slope):
        return torch.empty(_out_shape(x, weight, stride, padding), dtype=x.dtype, device=x.device,
                           memory_format=out_format(x))

    @torch.library.register_fake("ganengine_C::conv_act_bwd")
    def _(grad, x, weight, y, stride, padding, slope, mask):
        return (_empty_or(x, x.shape, out_format(x), mask[0]),
                _empty_or(weight, weight.shape, out_format(weight), mask[1]),
                _empty_or(y, (y.shape[1],), torch.contiguous_format, mask[2]))

if _ext.loaded() and _ext.has_kernel("conv_act_bwd.act", "CPU"):
    @torch.library.register_fake("ganengine_C::conv_act_bwd.act")
    def _(grad, y, slope, bias):
        gz = torch.empty_like(y, memory_format=out_format(y))
        return gz, _empty_or(y, (y.shape[1],), torch.contiguous_format, bias)

    @torch.library.register_fake("ganengine_C::conv_act_bwd.conv")
    def _(gz, x, weight, stride, padding, mask):
        return (_empty_or(x, x.shape, out_format(x), mask[0]),
                _empty_or(weight, weight.shape, out_format(weight), mask[1]))

if _ext.loaded() and _ext.has_kernel("conv2d_in_act", "CompositeExplicitAutograd"):
    @torch.library.register_fake("ganengine_C::conv2d_in_act")
    def _(x, weight, bias, gamma, beta, stride, padding, eps, slope):
        return torch.empty(_out_shape(x, weight, stride, padding), dtype=x.dtype, device=x.device,
                           memory_format=out_format(x))

    @torch.library.register_fake("ganengine_C::conv_in_act_fwd")
    def _(x, weight, gamma, beta, stride, padding, eps, slope):
        shape = _out_shape(x, weight, stride, padding)
        y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=out_format(x))
        stats = x.new_empty(shape[:2], dtype=_acc(x.dtype))
        return y, torch.empty_like(y), stats, torch.empty_like(stats)

    @torch.library.register_fake("ganengine_C::conv_in_act_bwd")
    def _(grad, x, weight, c, mean, rstd, gamma, beta, stride, padding, slope, mask):
        return (_empty_or(x, x.shape, out_format(x), mask[0]),
                _empty_or(weight, weight.shape, out_format(weight), mask[1]), *_affine_grad_fakes(mean, gamma, beta))
