"""Fused instance norm + activation: custom ops, fake impls, autograd, autocast, dispatch.

Ops (namespace ``ganengine``):
  instance_norm_act_fwd(x, weight?, bias?, eps, activation, slope) -> (y, mean, rstd)
  instance_norm_act_bwd(grad_y, x, weight?, bias?, mean, rstd, activation, slope)
      -> (grad_x, grad_weight_per_instance, grad_bias_per_instance)

``mean``/``rstd`` are per (n, c) statistics in the accumulation dtype (fp32; fp64 for fp64
input); the per-instance weight/bias gradients (N, C) are summed over N here, in a fixed order,
so every backend is deterministic. The activation is applied to ``z = x_hat * w + b``; its
derivative needs only the sign of z, which the backward recomputes from x (no y is saved).

Autocast rule: like ``F.instance_norm`` (which autocast leaves alone), the op runs in x's own
dtype, with statistics accumulated in fp32 and weight/bias read in fp32 whatever their dtype;
so no autocast kernel is registered (autocast falls through) and no cast is inserted.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ganengine import _ext
from ganengine.ops import _dispatch, _eager

ACTIVATIONS = ("leaky_relu", "relu", "none")
_lean = _eager.lean_ok  # the tensors the lean C++ entries take
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- helpers
def act_slope(activation: str, negative_slope: float) -> tuple[bool, float]:
    """(apply_activation, slope): relu is leaky_relu with slope 0."""
    if activation == "none":
        return False, 1.0
    if activation == "relu":
        return True, 0.0
    return True, float(negative_slope)


def activate(z: torch.Tensor, slope: float) -> torch.Tensor:
    """leaky_relu(z, slope); slope 0 is F.relu (0 at -inf, where z * 0 is NaN)."""
    return F.relu(z) if slope == 0.0 else F.leaky_relu(z, slope)


def act_grad(g: torch.Tensor, z: torch.Tensor, slope: float) -> torch.Tensor:
    """The activation's gradient at z: leaky relu's; slope 0 relu's threshold_backward (0 where
    z <= 0, also for an inf g, where g * 0 is NaN; g where z is NaN), as the kernels."""
    if slope == 0.0:
        return torch.where(z <= 0, torch.zeros((), dtype=g.dtype, device=g.device), g)
    return torch.where(z > 0, g, g * slope)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


# ----------------------------------------------------------------------------- torch backend
def inv_std(var: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(var + eps), with ATen's rule: a zero variance with eps = 0 gives 0, not inf (a
    constant plane then normalises to 0 and the output is act(bias), as F.instance_norm)."""
    rstd = torch.rsqrt(var + eps)
    if eps == 0:
        rstd = torch.where(var == 0, torch.zeros_like(rstd), rstd)
    return rstd


def _torch_fwd(x, weight, bias, eps, activation, slope):
    acc = stat_dtype(x.dtype)
    xf = x.to(acc)
    var, mean = torch.var_mean(xf, dim=(2, 3), unbiased=False)
    rstd = inv_std(var, eps)
    z = (xf - mean[:, :, None, None]) * rstd[:, :, None, None]
    if weight is not None:
        z = z * weight.to(acc)[None, :, None, None]
    if bias is not None:
        z = z + bias.to(acc)[None, :, None, None]
    apply, s = act_slope(activation, slope)
    if apply:
        z = activate(z, s)
    y = torch.empty_like(x)
    y.copy_(z)
    return y, mean, rstd


def _torch_bwd(grad_y, x, weight, bias, mean, rstd, activation, slope):
    acc = mean.dtype
    xf = x.to(acc)
    g = grad_y.to(acc)
    xhat = (xf - mean[:, :, None, None]) * rstd[:, :, None, None]
    apply, s = act_slope(activation, slope)
    if apply:
        z = xhat
        if weight is not None:
            z = z * weight.to(acc)[None, :, None, None]
        if bias is not None:
            z = z + bias.to(acc)[None, :, None, None]
        g = act_grad(g, z, s)
    db_nc = g.sum(dim=(2, 3))
    dw_nc = (g * xhat).sum(dim=(2, 3))
    hw = x.shape[2] * x.shape[3]
    k = rstd if weight is None else rstd * weight.to(acc)[None, :]
    dx = k[:, :, None, None] * (g - (db_nc / hw)[:, :, None, None] - xhat * (dw_nc / hw)[:, :, None, None])
    out = torch.empty_like(x)
    out.copy_(dx)
    return out, dw_nc, db_nc


# ----------------------------------------------------------------------------- dispatch
def _triton_verdict(x: torch.Tensor) -> str | None:
    if x.dtype not in _FLOAT_DTYPES:
        return f"dtype {x.dtype} is not supported"
    return None


# Plane size (H * W) up to which auto takes the CUDA C++ kernels first on channels_last planes as
# well (_dispatch.AUTO_ORDER_BY_OP, "channels_last_small"): the largest plane where the first GPU
# run had them ahead there
SMALL_PLANE = 4096


def _layout(x: torch.Tensor) -> str | None:
    """The auto order's variant on CUDA (_dispatch.AUTO_ORDER_BY_OP): for NHWC-dense x (what the
    kernels then read) "channels_last_small" or "channels_last" (nhwc_variant), None for NCHW and
    for anything copied to NCHW first."""
    if x.is_cuda and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return nhwc_variant(x.shape[2] * x.shape[3])
    return None


def nhwc_variant(plane: int) -> str:
    """The variant of NHWC planes of ``plane`` elements (conv2d_instance_norm_act asks it of its
    conv output's planes)."""
    return "channels_last_small" if plane <= SMALL_PLANE else "channels_last"


def _backend_for(x: torch.Tensor, op: str) -> str:
    return _dispatch.choose("instance_norm_act", x, {
        "triton": _triton_verdict(x),
        "cpu": _dispatch.ext_reason(op, x.device),
        "cuda": _dispatch.ext_reason(op, x.device),
    }, _layout(x))


def _dense_4d(t: torch.Tensor) -> torch.Tensor:
    """Native kernels need NCHW- or NHWC-dense memory; anything else is copied once."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()  # (NCHW: eager's instance norm gives a slice of a channels_last map NCHW out)


def _fwd_body(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          eps: float, activation: str, negative_slope: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _backend_for(x, "norm_act_fwd")
    x = _dense_4d(x)  # (on every backend: the outputs' layout is the fake's, whichever runs)
    if backend == "torch":
        return _torch_fwd(x, weight, bias, eps, activation, negative_slope)
    apply, slope = act_slope(activation, negative_slope)
    if backend == "triton":
        return _dispatch.triton_kernels("norm_act").forward(x, weight, bias, eps, apply, slope)
    y, mean, rstd = _ext.raw_op("norm_act_fwd")(x, weight, bias, eps, apply, slope)
    return y, mean, rstd


instance_norm_act_fwd = torch.library.custom_op("ganengine::instance_norm_act_fwd", mutates_args=())(_fwd_body)


@instance_norm_act_fwd.register_fake
def _(x, weight, bias, eps, activation, negative_slope):
    n, c = x.shape[0], x.shape[1]
    acc = stat_dtype(x.dtype)
    return torch.empty_like(_dense_4d(x)), x.new_empty((n, c), dtype=acc), x.new_empty((n, c), dtype=acc)


def _bwd_body(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                          bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                          activation: str, negative_slope: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _backend_for(x, "norm_act_bwd")
    x = _dense_4d(x)  # (as the forward: dx's layout is the fake's on every backend)
    if backend == "torch":
        return _torch_bwd(grad_y, x, weight, bias, mean, rstd, activation, negative_slope)
    apply, slope = act_slope(activation, negative_slope)
    if backend == "triton":
        return _dispatch.triton_kernels("norm_act").backward(grad_y, x, weight, bias, mean, rstd, apply, slope)
    # the C++/CUDA kernels bring grad_y into x's layout (a stride-0 grad becomes dense once)
    dx, dw_nc, db_nc = _ext.raw_op("norm_act_bwd")(grad_y, x, weight, bias, mean, rstd, apply, slope)
    return dx, dw_nc, db_nc


instance_norm_act_bwd = torch.library.custom_op("ganengine::instance_norm_act_bwd", mutates_args=())(_bwd_body)


@instance_norm_act_bwd.register_fake
def _(grad_y, x, weight, bias, mean, rstd, activation, negative_slope):
    return torch.empty_like(_dense_4d(x)), torch.empty_like(mean), torch.empty_like(mean)


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, activation, negative_slope = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.eps, ctx.activation, ctx.negative_slope = eps, activation, negative_slope
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, bwd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():
        # create_graph=True: differentiate the reference composition so that second
        # derivatives (gradient penalties) are exact.
        inputs = [t for t, need in zip((x, weight, bias), needs[:3]) if need and t is not None]
        with torch.enable_grad():
            # the torch backend is plain differentiable ops (copy_ included)
            y, _, _ = _torch_fwd(x, weight, bias, ctx.eps, ctx.activation, ctx.negative_slope)
            grads = iter(torch.autograd.grad(y, inputs, grad_y, create_graph=True, allow_unused=True))
        return tuple(next(grads) if (need and t is not None) else None
                     for t, need in zip((x, weight, bias), needs[:3])) + (None, None, None)
    dx, dw_nc, db_nc = bwd(grad_y, x, weight, bias, mean, rstd, ctx.activation, ctx.negative_slope)
    dw = dw_nc.sum(0).to(weight.dtype) if weight is not None and needs[1] else None
    db = db_nc.sum(0).to(bias.dtype) if bias is not None and needs[2] else None
    return (dx if needs[0] else None), dw, db, None, None, None


torch.library.register_autograd("ganengine::instance_norm_act_fwd",
                                _eager.backward_via(_backward, instance_norm_act_bwd), setup_context=_setup_context)
# plain eager calls (the CUDA path's, and the CPU's where the C++ entry declines): no custom-op layer
_eager_fwd = _eager.twin("ganengine::instance_norm_act_fwd", _fwd_body, _setup_context,
                         _eager.backward_via(_backward, _bwd_body))


# ----------------------------------------------------------------------------- lean entry (CPU, and CUDA where the cuda backend is chosen)
# (apply, slope) of the activations with a fixed slope; leaky_relu takes the caller's slope
_FIXED_ACT = {"relu": (True, 0.0), "none": (False, 1.0)}
_IN_KERNELS = ("norm_act_fwd", "norm_act_bwd")  # what ganengine_C::instance_norm_act calls
_IN_RS_KERNELS = _IN_KERNELS + ("instance_norm_running_update",)  # and instance_norm_act_rs
# the message prefix of the C++ entry's refusals (csrc/cpu/norm_act_autograd.cpp, check()); a
# weight or bias the dispatcher cannot take (not a Tensor) is declined too (_dispatch.refused)
_REFUSAL = "instance_norm_act: not served by the C++ entry"


# ----------------------------------------------------------------------------- public function
def _check_param(name: str, t, c: int, x: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"instance_norm_act: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.shape != (c,):
        raise ValueError(f"instance_norm_act: {name} must have shape ({c},) for {c} channels, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"instance_norm_act: {name} is on {t.device} but x is on {x.device}")
    if not t.is_floating_point():
        raise TypeError(f"instance_norm_act: {name} must be floating point, got {t.dtype}")
    if name in ("weight", "bias") and t.dtype != x.dtype:
        check_param_dtype("instance_norm_act", name, t, x, "F.instance_norm")


_REDUCED = (torch.float16, torch.bfloat16)  # x dtypes whose parameters may be float32 (torch's mixed mode)


def param_dtype_ok(t: torch.Tensor, x: torch.Tensor) -> bool:
    """The norms' rule for a parameter's (or running statistic's) dtype, F.batch_norm's and
    F.instance_norm's: x's, or float32 for a half / bfloat16 x."""
    return t.dtype == x.dtype or (t.dtype == torch.float32 and x.dtype in _REDUCED)


def check_param_dtype(op: str, name: str, t: torch.Tensor, x: torch.Tensor, torch_fn: str) -> None:
    """param_dtype_ok, else a TypeError naming the parameter."""
    if not param_dtype_ok(t, x):
        raise TypeError(f"{op}: {name} must have x's dtype ({x.dtype})"
                        f"{' or torch.float32' if x.dtype in _REDUCED else ''}, got {t.dtype} (as {torch_fn})")


def _running_stats_act(x, weight, bias, running_mean, running_var, eps, activation, negative_slope):
    """Eval with running statistics (``use_input_stats=False``): a per-channel affine map, then the
    activation. What ``F.instance_norm`` does there is ``F.batch_norm`` in eval mode on a copy of x
    reshaped to (1, N*C, H, W) with every parameter repeated N times; the same per-channel map is
    ``F.batch_norm(x, ...)`` on x itself (one pass: no copy, no repeats), and the activation then
    runs in place on that fresh output (batch norm's backward does not read its output), as
    ``nn.LeakyReLU(inplace=True)`` after the norm: eager's numbers in eager's two passes.
    A layout other than contiguous / channels_last is copied contiguous first, as F.instance_norm
    does. ``F.batch_norm`` takes its parameters in one dtype, x's or float32 for a half / bfloat16 x, and
    running statistics that need no gradient; anything else (mixed parameter dtypes, fp64 running
    statistics for an fp32 x, running statistics requiring grad, a tensor eps, an empty x) takes
    the composition below: the same map in the accumulation dtype, rounded once."""
    apply, s = act_slope(activation, negative_slope)
    pdt = running_mean.dtype
    if (type(eps) in (float, int) and x.numel() != 0 and running_var.dtype == pdt
            and (pdt == x.dtype or (pdt == torch.float32 and x.dtype in _REDUCED))
            and (weight is None or weight.dtype == pdt) and (bias is None or bias.dtype == pdt)
            and not (running_mean.requires_grad or running_var.requires_grad)):
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            # (another layout: ATen's batch norm would take its elementwise path, which computes a
            # half / bfloat16 x's map in x's dtype for same-dtype parameters; F.instance_norm's copy)
            x = x.contiguous()
        y = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
        if not apply:
            return y
        if s == 0.0:
            return F.relu_(y)
        # (in place only for a slope >= 0: autograd cannot invert a negative slope from the output)
        return F.leaky_relu_(y, s) if s > 0.0 else F.leaky_relu(y, s)
    acc = stat_dtype(x.dtype)
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = -running_mean.to(acc) * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    z = x.to(acc) * scale[None, :, None, None] + shift[None, :, None, None]
    return (activate(z, s) if apply else z).to(x.dtype)


def instance_norm_act(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                      running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
                      use_input_stats: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                      activation: str = "leaky_relu", negative_slope: float = 0.2) -> torch.Tensor:
    """``activation(F.instance_norm(x, ...))`` in one fused pass.

    Same arguments and numbers as ``F.instance_norm`` followed by the activation
    (``"leaky_relu"`` with ``negative_slope``, ``"relu"``, or ``"none"``), including the
    running-statistics update when ``running_mean``/``running_var`` are given and
    ``use_input_stats`` is true. ``x`` is (N, C, H, W) or unbatched (C, H, W); contiguous,
    channels_last or strided; fp32/fp16/bf16/fp64. A single pixel (H*W == 1) normalises to 0,
    so the output is ``activation(bias)`` (F.instance_norm raises there; the modules,
    ``InstanceNormAct2d`` and what ``fuse()`` builds, raise as ``nn.InstanceNorm2d`` does).
    ``weight`` / ``bias`` have x's dtype, or float32 for a half / bfloat16 x (F.instance_norm's rule).
    """
    # the lean route: the C++ op with C++ autograd (instance_norm_act_rs when running statistics are
    # updated), on a CPU tensor (the cpu backend's kernels) or on a CUDA tensor where the cuda
    # backend is the one chosen (its kernels; _dispatch.cuda_entry). An unknown activation or a
    # non-number eps, slope or momentum skips it; it declines what else it does not serve (3-D,
    # empty, odd parameters, one pixel with running statistics) before any work
    # (_dispatch.refused). The full route below then handles the case or raises the public error.
    # Any other error is the call's own: raised once, as is.
    # (_eager.lean_ok: plain tensors, or subclasses of concrete sizes; make_fx's symbolic
    # FakeTensors, whose sizes the entry's checks cannot read, take the full route)
    if (use_input_stats is True and _lean(x) and (weight is None or _lean(weight))
            and (bias is None or _lean(bias)) and not torch.compiler.is_compiling()):
        if running_mean is None and running_var is None:
            name, kernels = "instance_norm_act", _IN_KERNELS
        elif _lean(running_mean) and _lean(running_var):
            # (a momentum the schema's float would not take: the full route raises the public error)
            name, kernels = ("instance_norm_act_rs", _IN_RS_KERNELS) if type(momentum) in (float, int) else (None, ())
        else:
            name = None  # the full route raises the public error
        op = None if name is None else _dispatch.entry(x, name, "instance_norm_act", kernels, _layout)
        if op is not None:
            try:
                apply, slope = (True, float(negative_slope)) if activation == "leaky_relu" else _FIXED_ACT[activation]
                eps = float(eps)
            except (KeyError, TypeError, ValueError):
                pass  # the full route raises the public error
            else:
                try:
                    if running_mean is None:
                        y = op(x, weight, bias, eps, apply, slope)
                    else:
                        y = op(x, weight, bias, running_mean, running_var, float(momentum), eps, apply, slope)
                except RuntimeError as e:  # (NotImplementedError is one)
                    if not _dispatch.refused(e, _REFUSAL, weight, bias, running_mean, running_var):
                        raise
                else:
                    _dispatch.last_used["instance_norm_act"] = "cpu" if x.is_cpu else "cuda"
                    return y
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"instance_norm_act: x must be a Tensor, got {type(x).__name__}")
    if x.dim() == 3:
        return instance_norm_act(x.unsqueeze(0), weight, bias, running_mean, running_var, use_input_stats,
                                 momentum, eps, activation, negative_slope).squeeze(0)
    if x.dim() != 4:
        raise ValueError(f"instance_norm_act: x must be (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"instance_norm_act: x must be fp16, bf16, fp32 or fp64, got {x.dtype}")
    _check_activation(activation)
    n, c, h, w = x.shape
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_param(name, t, c, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("instance_norm_act: running_mean and running_var must be given together")

    if not use_input_stats:
        if running_mean is None:
            raise ValueError("instance_norm_act: use_input_stats=False needs running_mean and running_var")
        return _running_stats_act(x, weight, bias, running_mean, running_var, eps, activation, negative_slope)

    if running_mean is not None:
        if h * w == 1:
            raise ValueError(
                "instance_norm_act: updating running statistics needs more than 1 spatial element per "
                f"instance (got input of shape {tuple(x.shape)}); the unbiased variance is undefined")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
            raise TypeError("instance_norm_act: momentum must be a float (instance norm keeps no batch count "
                            "for a cumulative average; nn.InstanceNorm2d passes 0.0 for momentum=None), got "
                            f"{momentum!r}")
    if x.numel() == 0:
        # an empty map (N, C or H*W of 0): the differentiable composition keeps the autograd graph
        # (zero weight/bias gradients) where the kernels have nothing to do
        with warnings.catch_warnings():  # (var_mean's "degrees of freedom <= 0" on an empty plane)
            warnings.simplefilter("ignore", UserWarning)
            y, mean, rstd = _torch_fwd(x, weight, bias, float(eps), activation, float(negative_slope))
        if running_mean is None or n * c == 0:
            return y
    else:
        fwd = _eager_fwd if _eager.plain_eager(x, weight, bias) else instance_norm_act_fwd
        y, mean, rstd = fwd(x, weight, bias, float(eps), activation, float(negative_slope))
    if running_mean is not None:
        with torch.no_grad():
            hw = h * w
            # a zero rstd: an infinite variance (a plane whose sum of squares overflowed: inf, as
            # eager's running_var), or with eps = 0 ATen's invstd for a zero variance
            var = rstd.double().pow(-2) - eps
            if eps == 0:
                var = torch.where(rstd == 0, 0.0, var)
            var = var.clamp_min(0) * (hw / (hw - 1))
            running_mean.mul_(1 - momentum).add_(mean.mean(0).to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.mean(0).to(running_var.dtype), alpha=momentum)
    return y


# ----------------------------------------------------------------------------- fake impl of the C++ entry
if _ext.loaded() and _ext.has_kernel("instance_norm_act", "CompositeExplicitAutograd"):
    @torch.library.register_fake("ganengine_C::instance_norm_act")
    def _(x, weight, bias, eps, apply_act, slope):
        return torch.empty_like(_dense_4d(x))

# the raw kernels the C++ entries call: under FakeTensorMode the entries' autograd kernels still run
# and call them (the Python custom ops above have their own fakes)
if _ext.loaded() and _ext.has_kernel("norm_act_fwd", "CPU"):
    @torch.library.register_fake("ganengine_C::norm_act_fwd")
    def _(x, weight, bias, eps, apply_act, slope):
        n, c = x.shape[0], x.shape[1]
        acc = stat_dtype(x.dtype)
        return torch.empty_like(x), x.new_empty((n, c), dtype=acc), x.new_empty((n, c), dtype=acc)

if _ext.loaded() and _ext.has_kernel("norm_act_bwd", "CPU"):
    @torch.library.register_fake("ganengine_C::norm_act_bwd")
    def _(grad_y, x, weight, bias, mean, rstd, apply_act, slope):
        return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)

if _ext.loaded() and _ext.has_kernel("instance_norm_act_rs", "CompositeExplicitAutograd"):
    @torch.library.register_fake("ganengine_C::instance_norm_act_rs")
    def _(x, weight, bias, running_mean, running_var, momentum, eps, apply_act, slope):
        return torch.empty_like(_dense_4d(x))

    @torch.library.register_fake("ganengine_C::instance_norm_running_update")
    def _(running_mean, running_var, mean, rstd, momentum, eps, hw):
        return None
