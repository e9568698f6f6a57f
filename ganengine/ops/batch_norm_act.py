"""Fused (conditional) batch norm + activation: dispatch, autograd, custom ops, torch reference.

Public functions (re-exported by ``ganengine.functional``):

* ``batch_norm_act(x, running_mean, running_var, weight, bias, training, momentum, eps,
  activation, negative_slope)``: ``act(F.batch_norm(...))``, running statistics updated as
  ``F.batch_norm`` updates them (biased variance to normalise, unbiased in the running
  estimate).
* ``conditional_batch_norm_act(x, gain, bias, ...)``: ``act(F.batch_norm(x, ..., None, None, ...)
  * gain[n, c] + bias[n, c])`` with per-sample (N, C) gain and bias (BigGAN's ccbn).

``momentum=None`` is nn.BatchNorm's cumulative average, which needs the batch count: pass the
module's ``num_batches_tracked`` (keyword-only). With it, a training call with running
statistics counts the batch (``num_batches_tracked += 1``, as nn.BatchNorm does before calling
F.batch_norm) and uses the factor ``momentum``, or ``1 / num_batches_tracked`` when momentum is
None: exactly nn.BatchNorm's ``exponential_average_factor``. Without it, momentum=None raises.

Four routes, one set of numbers:

* backend ``torch``: the reference composition (F.batch_norm + affine + activation); natively
  differentiable to any order.
* ``cpu`` / ``cuda``, eager: one C++ op, ``ganengine_C::batch_norm_act``, with its own C++
  autograd (csrc/cpu/batch_norm_act_autograd.cpp): the running statistics are updated inside the
  forward kernel and no Python runs per call beyond this module's few lines. A Python custom op
  or autograd.Function costs more host time per call than eager's whole F.batch_norm + F.relu at
  small shapes (measured figures in docs/batch_norm_act.md).
* ``triton``, eager: a ``torch.autograd.Function`` around the kernels, which update the running
  statistics themselves (1 kernel per pass when a channel's data fits one program, else 2); a
  call that records no graph (no_grad, eval, frozen weights and input) runs the launcher alone.
  The launcher's plans are cached per call signature (kernels/batch_norm_act.py).
* under ``torch.compile`` (cpu, cuda, triton), and on triton under any other tracing (make_fx,
  FakeTensorMode, torch.export, jit.trace, tensor subclasses: ``_kernels_can_run``): the custom
  ops ``ganengine::batch_norm_act_fwd`` / ``_bwd`` (fake impls, registered autograd, no graph
  break); they do not mutate, so the running statistics are updated here with torch ops, which
  the compiler fuses. The cpu / cuda C++ op traces as it is (fake impl, C++ autograd).

Double backward (WGAN-GP / R1 through a batch-normed discriminator): every backward, when grad
mode is on (create_graph=True), differentiates the reference composition instead of calling
the fused backward, so second derivatives are exact.

Autocast: like F.batch_norm, the op runs in x's own dtype with statistics in fp32 (fp64 for fp64
input) and weight/bias/running statistics read in their own dtype (fp32 beside fp16/bf16 x is
the AMP case); no autocast kernel is registered.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ganengine import _ext, backends
from ganengine.ops import _dispatch, _eager
from ganengine.ops._conv_common import dense_copy
from ganengine.ops.norm_act import act_grad, activate, check_param_dtype, inv_std

ACTIVATIONS = ("relu", "leaky_relu", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# the `flags` argument of the C++ ops and the Triton launchers
TRAINING, APPLY_ACT, PER_SAMPLE = 1, 2, 4


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _act(activation: str, negative_slope) -> tuple[bool, float]:
    """(apply, slope): relu is leaky_relu with slope 0."""
    if activation == "relu":
        return True, 0.0
    if activation == "leaky_relu":
        try:
            return True, float(negative_slope)
        except (TypeError, ValueError):
            raise TypeError(f"negative_slope must be a number, got {negative_slope!r}") from None
    if activation == "none":
        return False, 0.0
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


# ----------------------------------------------------------------------------- checks
def _validate(op, x, w, b, rm, rv, training, eps, per_sample, nbt=None):
    """The checks of the C++ op (csrc/cpu/batch_norm_act.h), for the routes that do not run it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be (N, C) or (N, C, *spatial), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be fp16, bf16, fp32 or fp64, got {x.dtype}")
    n, c = x.shape[0], x.shape[1]
    dev = x.device
    if w is not None:
        _check_param(op, "gain" if per_sample else "weight", w, x, dev, n, c, per_sample)
    if b is not None:
        _check_param(op, "bias", b, x, dev, n, c, per_sample)
    if rm is not None:
        _check_param(op, "running_mean", rm, x, dev, n, c, False)
    if rv is not None:
        _check_param(op, "running_var", rv, x, dev, n, c, False)
    if (rm is None) != (rv is None):
        raise ValueError(f"{op}: running_mean and running_var must be given together")
    if nbt is not None and training and rm is not None:  # (read only to count a training batch, as the C++ op)
        if not isinstance(nbt, torch.Tensor):
            raise TypeError(f"{op}: num_batches_tracked must be a Tensor or None (nn.BatchNorm's one-element "
                            f"count), got {type(nbt).__name__}")
        if nbt.numel() != 1:
            raise ValueError(f"{op}: num_batches_tracked must hold one count, got shape {tuple(nbt.shape)}")
        if nbt.device != dev:
            raise ValueError(f"{op}: num_batches_tracked is on {nbt.device} but x is on {x.device}")
    if training:
        if x.numel() == c and x.numel() != 0:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
        if not eps > 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    else:
        if rm is None:
            raise RuntimeError(f"{op}: running_mean must be defined in evaluation mode (training=False)")
        if eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _check_param(op, name, t, x, dev, n, c, per_sample):
    # (dim() and shape[i] compared one by one: no tuple built per tensor; this runs on every call
    # of the Python route, the CUDA path's)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
    if t.device != dev:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if not per_sample and t.dtype != x.dtype:
        check_param_dtype(op, name, t, x, "F.batch_norm")
    if per_sample:
        if not (t.dim() >= 2 and t.shape[0] == n and t.shape[1] == c and t.numel() == n * c):
            raise ValueError(f"{op}: {name} must have shape (N, C) = ({n}, {c}) for x of shape "
                             f"{tuple(x.shape)}, got {tuple(t.shape)}")
    elif t.dim() != 1 or t.shape[0] != c:
        raise ValueError(f"{op}: {name} must have shape ({c},) for {c} channels, got {tuple(t.shape)}")


def _factor(op, rm, nbt, training, momentum, as_tensor=False):
    """nn.BatchNorm's exponential_average_factor; counts this batch in ``nbt``."""
    update = training and rm is not None
    if update and nbt is not None:
        nbt.add_(1)
        if momentum is None:
            return 1.0 / nbt if as_tensor else 1.0 / float(nbt)
        return float(momentum)
    if momentum is None:
        if update:
            raise ValueError(f"{op}: momentum=None (a cumulative average) needs num_batches_tracked, the batch "
                             "count nn.BatchNorm keeps; pass it, or a float momentum")
        return 0.0
    return float(momentum)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels read it: NCHW-dense, or dense with channels innermost; else a copy."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    c, expected = x.shape[1], x.shape[1]
    for i in range(x.dim() - 1, 1, -1):
        if x.shape[i] != 1 and x.stride(i) != expected:
            return dense_copy(x)
        expected *= x.shape[i]
    if (c == 1 or x.stride(1) == 1) and (x.shape[0] == 1 or x.stride(0) == expected):
        return x
    return dense_copy(x)


def _param_view(t: torch.Tensor, x: torch.Tensor, per_sample: bool) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[1] = x.shape[1]
    if per_sample:
        shape[0] = x.shape[0]
    return t.reshape(shape)


# ----------------------------------------------------------------------------- torch reference
def reference(x, w, b, stats, training, eps, apply, slope, per_sample):
    """act(batch_norm(x) * w + b) in the accumulation dtype with differentiable ops; eval mode
    normalises with ``stats`` ((3, C): mean, rstd, var of the running statistics)."""
    acc = stat_dtype(x.dtype)
    xf = x.to(acc)
    if training:
        z = F.batch_norm(xf, None, None, None, None, True, 0.0, eps)
    else:
        shape = [1] * x.dim()
        shape[1] = x.shape[1]
        z = (xf - stats[0].to(acc).reshape(shape)) * stats[1].to(acc).reshape(shape)
    if w is not None:
        z = z * _param_view(w.to(acc), x, per_sample)
    if b is not None:
        z = z + _param_view(b.to(acc), x, per_sample)
    return activate(z, slope) if apply else z


def _torch_path(op, x, w, b, rm, rv, nbt, training, momentum, eps, apply, slope, per_sample):
    """The reference composition a user would write (backend "torch")."""
    factor = _factor(op, rm, nbt, training, momentum)
    if not training and rm is not None:
        # (dense running statistics where they are only read: torch 2.14's CPU batch-norm backward
        # gives a wrong dx and dweight for a channels_last x with strided ones, as for the weight below)
        rm = rm if rm.is_contiguous() else rm.contiguous()
        rv = rv if rv is None or rv.is_contiguous() else rv.contiguous()
    if per_sample:
        z = F.batch_norm(x, rm, rv, None, None, training, factor, eps)
        acc = stat_dtype(x.dtype)
        if w is not None or b is not None:
            z = z.to(acc)
            if w is not None:
                z = z * _param_view(w.to(acc), x, True)
            if b is not None:
                z = z + _param_view(b.to(acc), x, True)
    else:
        # (dense weight and bias: torch 2.14's CPU batch-norm backward gives a wrong dx for a
        # channels_last x with a strided weight)
        w = w if w is None or w.is_contiguous() else w.contiguous()
        b = b if b is None or b.is_contiguous() else b.contiguous()
        z = F.batch_norm(x, rm, rv, w, b, training, factor, eps)
    if apply:
        z = activate(z, slope)
    return z.to(x.dtype)


def _torch_fwd_parts(x, w, b, rm, rv, training, eps, apply, slope, per_sample):
    """(y, stats) as the fused forward returns them, with torch ops (the custom op's torch body)."""
    acc = stat_dtype(x.dtype)
    xf = x.to(acc)
    c = x.shape[1]
    if training:
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(xf, dim=dims, unbiased=False)
        count = x.numel() // c
        unbiased = var * (count / max(count - 1, 1))
        rstd = inv_std(var, eps)  # (ATen's zero-variance rule for eps = 0)
    else:
        mean, unbiased = rm.to(acc), rv.to(acc)
        rstd = torch.rsqrt(unbiased + eps)
    stats = torch.stack([mean, rstd, unbiased])
    y = reference(x, w, b, stats, False, eps, apply, slope, per_sample)  # normalise with these stats
    out = torch.empty_like(x)
    out.copy_(y)
    return out, stats


def _torch_bwd_parts(grad_y, x, w, b, stats, training, eps, apply, slope, per_sample):
    acc = stats.dtype
    xf, g = x.to(acc), grad_y.to(acc)
    shape = [1] * x.dim()
    shape[1] = x.shape[1]
    mean, rstd = stats[0].reshape(shape), stats[1].reshape(shape)
    xhat = (xf - mean) * rstd
    wv = _param_view(w.to(acc), x, per_sample) if w is not None else None
    bv = _param_view(b.to(acc), x, per_sample) if b is not None else None
    if apply:
        z = xhat if wv is None else xhat * wv
        z = z if bv is None else z + bv
        g = act_grad(g, z, slope)
    sdims = list(range(2, x.dim()))
    sg_nc = g.sum(dim=sdims) if sdims else g
    sgx_nc = (g * xhat).sum(dim=sdims) if sdims else g * xhat
    wn = wv.reshape(wv.shape[0], -1) if wv is not None else torch.ones((1, x.shape[1]), dtype=acc, device=x.device)
    dxhat = g * wv if wv is not None else g
    if training:
        m = x.numel() // x.shape[1]
        a = (wn * sg_nc).sum(0) / m
        bb = (wn * sgx_nc).sum(0) / m
        dx = rstd * (dxhat - a.reshape(shape) - xhat * bb.reshape(shape))
    else:
        dx = rstd * dxhat
    out = torch.empty_like(x)
    out.copy_(dx)
    if per_sample:
        return out, sgx_nc, sg_nc
    return out, sgx_nc.sum(0), sg_nc.sum(0)


# ----------------------------------------------------------------------------- dispatch
@functools.lru_cache(maxsize=None)
def _ext_reason(device_type: str) -> str | None:
    return _dispatch.ext_reason("batch_norm_act_fwd", torch.device(device_type))


# The lean route: 'auto' (or 'cpu') on a CPU tensor calls the C++ op ganengine_C::batch_norm_act
# (autograd in C++) at once, resolved by _dispatch.lean_op (a few attribute reads per call: at small
# shapes that cost is part of what is compared with eager).
#
# No size rule routes small calls to the torch composition: the C++ op costs less host time than
# eager's F.batch_norm + F.relu already at 2x4x4x4 (one thread, `python -m ganengine.bench.host_cost
# --ops batch_norm_act`: 0.68-0.75x forward, 0.67-0.89x forward+backward; conditional 0.25-0.40x /
# 0.31-0.47x), and more so at larger sizes (docs/batch_norm_act.md).
_BN_KERNELS = ("batch_norm_act_fwd", "batch_norm_act_bwd")


@functools.lru_cache(maxsize=None)
def _verdicts(device_type: str) -> dict:
    """The verdicts _dispatch.choose reads (never mutated)."""
    return {"triton": None, "cpu": _ext_reason(device_type), "cuda": _ext_reason(device_type)}


# Elements per channel up to which auto takes the CUDA C++ kernels first on an NCHW batch norm
# (_dispatch.AUTO_ORDER_BY_OP, "small"): the largest map where the first GPU run had them ahead.
SMALL_MAP = 4096


def _variant(x: torch.Tensor) -> str | None:
    """auto's order variant of a call: "small" for an NCHW-contiguous (N, C, *spatial) input of at
    most SMALL_MAP elements per channel; None for (N, C), channels-last or larger maps."""
    if x.dim() < 3 or not x.is_contiguous():
        return None
    return "small" if x.numel() <= SMALL_MAP * x.shape[1] else None


def _backend(op: str, x: torch.Tensor) -> str:
    return _dispatch.choose(op, x, _verdicts(x.device.type), None if x.is_cpu else _variant(x))


def _c_op():
    return _ext.raw_op("batch_norm_act")


# ----------------------------------------------------------------------------- custom ops (torch.compile)
@torch.library.custom_op("ganengine::batch_norm_act_fwd", mutates_args=())
def batch_norm_act_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       running_mean: torch.Tensor | None, running_var: torch.Tensor | None, eps: float,
                       negative_slope: float, flags: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, stats): stats (3, C) = mean, rstd, unbiased variance (of the batch in training, of
    running_mean/running_var in eval, which are only read). No running-statistics update."""
    training, apply, per_sample = bool(flags & TRAINING), bool(flags & APPLY_ACT), bool(flags & PER_SAMPLE)
    backend = _backend("conditional_batch_norm_act" if per_sample else "batch_norm_act", x)
    if backend == "torch":
        return _torch_fwd_parts(x, weight, bias, running_mean, running_var, training, eps, apply,
                                negative_slope, per_sample)
    if backend == "triton":
        return _tk().forward(x, weight, bias, running_mean, running_var, 0.0, eps, negative_slope, flags,
                          update_running=False)
    return _ext.op("batch_norm_act_fwd")(x, weight, bias, running_mean, running_var, 0.0, eps, negative_slope, flags)


@batch_norm_act_fwd.register_fake
def _(x, weight, bias, running_mean, running_var, eps, negative_slope, flags):
    return torch.empty_like(x), x.new_empty((3, x.shape[1]), dtype=stat_dtype(x.dtype))


@torch.library.custom_op("ganengine::batch_norm_act_bwd", mutates_args=())
def batch_norm_act_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, stats: torch.Tensor, eps: float, negative_slope: float,
                       flags: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight or grad_gain, grad_bias) in the accumulation dtype, (C) or (N, C)."""
    training, apply, per_sample = bool(flags & TRAINING), bool(flags & APPLY_ACT), bool(flags & PER_SAMPLE)
    backend = _backend("conditional_batch_norm_act" if per_sample else "batch_norm_act", x)
    if backend == "torch":
        return _torch_bwd_parts(grad_y, x, weight, bias, stats, training, eps, apply, negative_slope, per_sample)
    if backend == "triton":
        return _tk().backward(grad_y, x, weight, bias, stats, negative_slope, flags)
    return _ext.op("batch_norm_act_bwd")(grad_y, x, weight, bias, stats, negative_slope, flags)


@batch_norm_act_bwd.register_fake
def _(grad_y, x, weight, bias, stats, eps, negative_slope, flags):
    n, c = x.shape[0], x.shape[1]
    shape = (n, c) if flags & PER_SAMPLE else (c,)
    return torch.empty_like(x), stats.new_empty(shape), stats.new_empty(shape)


def _param_grad(d, t, need):
    """A parameter's gradient from the kernels' (C) or (N, C) accumulation-dtype sums (no no-op
    .to() / reshape: host time per call)."""
    if t is None or not need:
        return None
    if d.dtype != t.dtype:
        d = d.to(t.dtype)
    return d if t.dim() == d.dim() else d.reshape(t.shape)


def _param_grads(dw, db, w, b, needs):
    return _param_grad(dw, w, needs[0]), _param_grad(db, b, needs[1])


def _double_backward(x, w, b, stats, grad_y, needs, eps, slope, flags):
    """create_graph=True: the gradient of the reference composition, itself differentiable."""
    tensors = (x, w, b)
    inputs = [t for t, need in zip(tensors, needs) if need and t is not None]
    if not inputs:
        return (None, None, None)
    with torch.enable_grad():
        y = reference(x, w, b, stats, bool(flags & TRAINING), eps, bool(flags & APPLY_ACT), slope,
                      bool(flags & PER_SAMPLE))
        grads = iter(torch.autograd.grad(y, inputs, grad_y.to(y.dtype), create_graph=True, allow_unused=True))
    return tuple(next(grads) if (need and t is not None) else None for t, need in zip(tensors, needs))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _rm, _rv, eps, negative_slope, flags = inputs
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.eps, ctx.slope, ctx.flags = eps, negative_slope, flags
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_stats):
    x, w, b, stats = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():
        gx, gw, gb = _double_backward(x, w, b, stats, grad_y, needs, ctx.eps, ctx.slope, ctx.flags)
    else:
        dx, dw, db = batch_norm_act_bwd(grad_y, x, w, b, stats, ctx.eps, ctx.slope, ctx.flags)
        gx = dx if needs[0] else None
        gw, gb = _param_grads(dw, db, w, b, needs[1:])
    return gx, gw, gb, None, None, None, None, None


torch.library.register_autograd("ganengine::batch_norm_act_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- triton (eager)
def _tk():
    return _dispatch.triton_kernels("batch_norm_act")


class _TritonFn(torch.autograd.Function):
    # stats is an intermediate (neither input nor output): kept on ctx, not saved (one SavedVariable
    # less to pack and unpack per call); x, weight and bias are saved (version checks)
    @staticmethod
    def forward(ctx, x, w, b, rm, rv, factor, eps, slope, flags):
        y, stats = _tk().forward(x, w, b, rm, rv, factor, eps, slope, flags, update_running=True)
        ctx.save_for_backward(x, w, b)
        ctx.cfg = (stats, eps, slope, flags)  # one attribute: fewer ctx writes and reads per call
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w, b = ctx.saved_tensors
        stats, eps, slope, flags = ctx.cfg
        needs = ctx.needs_input_grad
        if _eager.grad_enabled():
            gx, gw, gb = _double_backward(x, w, b, stats, grad_y, needs[:3], eps, slope, flags)
        else:
            gx, gw, gb = _tk().backward(grad_y, x, w, b, stats, slope, flags)
            if not needs[0]:
                gx = None
            gw, gb = _param_grad(gw, w, needs[1]), _param_grad(gb, b, needs[2])
        return gx, gw, gb, None, None, None, None, None, None


_is_compiling = torch.compiler.is_compiling
_increment_version = torch.autograd.graph.increment_version


# ----------------------------------------------------------------------------- the call
def _kernels_can_run(*tensors) -> bool:
    """Whether _TritonFn may serve the call: ``_eager.plain_eager`` (a dispatch or torch function
    mode that does not trace keeps it: ganengine.bench.traffic.EagerTraffic, the kernel counter of
    the CUDA path; FlopCounterMode; ``with torch.device(...)``). Unlike a twin, the custom-op route
    issues more kernels (6 torch ops for the running statistics, which _TritonFn updates in its
    kernel): only tracing, where _TritonFn cannot launch (make_fx, FakeTensorMode, functionalization,
    torch.export, jit.trace, torch.compile, tensor subclasses), takes it."""
    return _eager.plain_eager(*tensors)


def _run(op, x, w, b, rm, rv, nbt, training, momentum, eps, activation, negative_slope, per_sample):
    apply, slope = _act(activation, negative_slope)
    flags = (TRAINING if training else 0) | (APPLY_ACT if apply else 0) | (PER_SAMPLE if per_sample else 0)
    if not _is_compiling():
        # (not make_fx's symbolic FakeTensors: the lean entries take concrete sizes, _eager.lean_ok; the
        # C++ op itself traces, opcheck's aot_dispatch tests, but the torch composition serves them here)
        lean = (_dispatch.lean_op("batch_norm_act", _BN_KERNELS) if _eager.lean_ok(x) and x.is_cpu
                else None)
        if lean is not None:
            _dispatch.last_used[op] = backend = "cpu"
        else:
            backend = _backend(op, x) if isinstance(x, torch.Tensor) else "torch"
            if backend in ("cpu", "cuda") and not _eager.lean_ok(x):
                backend = "torch"  # (symbolic sizes, make_fx's: as the lean route above)
        if backend in ("cpu", "cuda"):
            try:
                return (lean if lean is not None else _c_op())(x, w, b, rm, rv, nbt, momentum, eps, slope, flags)
            except (TypeError, RuntimeError) as exc:
                # arguments the dispatcher could not even convert: say what is wrong in our words
                _validate(op, x, w, b, rm, rv, training, eps, per_sample, nbt)
                if torch._C._functorch.peek_interpreter_stack() is not None:  # (its tensors have no storage)
                    raise RuntimeError(f"ganengine.{op}: torch.func transforms (grad, vjp, jacrev, vmap) are not "
                                       "supported over the fused ops (README); use torch.autograd.grad") from exc
                raise
        _validate(op, x, w, b, rm, rv, training, eps, per_sample, nbt)
        if backend == "torch":
            return _torch_path(op, x, w, b, rm, rv, nbt, training, momentum, eps, apply, slope, per_sample)
        if _kernels_can_run(x, w, b, rm, rv, nbt):
            factor = _factor(op, rm, nbt, training, momentum)
            x = _dense(x)
            if _eager.records_graph((x, w, b)):
                y = _TritonFn.apply(x, w, b, rm, rv, factor, float(eps), slope, flags)
            else:  # no graph to record (no_grad, eval, frozen weights): Function.apply costs ~10 us
                y = _tk().forward(x, w, b, rm, rv, factor, float(eps), slope, flags, update_running=True)[0]
            if training and rm is not None:
                _increment_version((rm, rv))  # the kernel wrote them, as F.batch_norm's in-place update would
            return y
        # triton under make_fx / FakeTensorMode / functionalization, torch.jit.trace or on a tensor
        # subclass: _TritonFn would launch kernels on tensors without storage; the custom op traces
    else:
        # torch.compile: the backend is chosen inside the custom ops at run time; "torch" compiles
        # the composition itself
        _validate(op, x, w, b, rm, rv, training, eps, per_sample, nbt)
        if backends.current() == "torch":
            return _torch_path(op, x, w, b, rm, rv, nbt, training, momentum, eps, apply, slope, per_sample)
    # the custom ops do not mutate: the running statistics are updated here
    x = _dense(x)
    factor = _factor(op, rm, nbt, training, momentum, as_tensor=True)
    y, stats = batch_norm_act_fwd(x, w, b, None if training else rm, None if training else rv, float(eps),
                                  slope, flags)
    if training and rm is not None:
        with torch.no_grad():
            rm.mul_(1 - factor).add_(stats[0].to(rm.dtype) * factor)
            rv.mul_(1 - factor).add_(stats[2].to(rv.dtype) * factor)
    return y


def batch_norm_act(x: torch.Tensor, running_mean: torch.Tensor | None = None,
                   running_var: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, training: bool = True, momentum: float | None = 0.1,
                   eps: float = 1e-5, activation: str = "relu", negative_slope: float = 0.2, *,
                   num_batches_tracked: torch.Tensor | None = None) -> torch.Tensor:
    """``activation(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))``
    in one pass over x for the statistics and one for the output.

    ``x`` is (N, C), (N, C, L) or (N, C, *spatial), contiguous, channels_last or strided;
    fp16/bf16/fp32/fp64 (statistics in fp32, fp64 for fp64; weight/bias/running statistics may be
    fp32 beside fp16/bf16 x). ``activation`` is "relu", "leaky_relu" (with ``negative_slope``) or
    "none". In training mode the running statistics, when given, are updated in place as
    F.batch_norm updates them; ``num_batches_tracked`` (keyword-only) makes the call count the
    batch and allows ``momentum=None`` (cumulative average), as nn.BatchNorm does.
    """
    return _run("batch_norm_act", x, weight, bias, running_mean, running_var, num_batches_tracked, training,
                momentum, eps, activation, negative_slope, False)


def conditional_batch_norm_act(x: torch.Tensor, gain: torch.Tensor | None, bias: torch.Tensor | None,
                               running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
                               training: bool = True, momentum: float | None = 0.1, eps: float = 1e-5,
                               activation: str = "relu", negative_slope: float = 0.2, *,
                               num_batches_tracked: torch.Tensor | None = None) -> torch.Tensor:
    """``act(F.batch_norm(x, running_mean, running_var, None, None, training, momentum, eps)
    * gain[:, :, None, None] + bias[:, :, None, None])`` with per-sample ``gain`` and ``bias`` of
    shape (N, C) (BigGAN's ccbn passes ``1 + gain``); gradients to x, gain and bias. Same
    arguments, layouts and dtypes as :func:`batch_norm_act`; the result has x's dtype.
    """
    return _run("conditional_batch_norm_act", x, gain, bias, running_mean, running_var, num_batches_tracked,
                training, momentum, eps, activation, negative_slope, True)


# ----------------------------------------------------------------------------- fake impls of the C++ ops
def _fake_y(x: torch.Tensor) -> torch.Tensor:
    """The output layout of the C++ kernels: x's when x is NCHW- or channels-last-dense, else that of
    its dense copy (the layout its strides suggest)."""
    return torch.empty_like(_dense(x))


if _ext.loaded() and _ext.has_kernel("batch_norm_act_fwd", "CPU"):
    @torch.library.register_fake("ganengine_C::batch_norm_act")
    def _(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, slope, flags):
        return _fake_y(x)

    @torch.library.register_fake("ganengine_C::batch_norm_act_fwd")
    def _(x, weight, bias, running_mean, running_var, momentum, eps, slope, flags):
        return _fake_y(x), x.new_empty((3, x.shape[1]), dtype=stat_dtype(x.dtype))

    @torch.library.register_fake("ganengine_C::batch_norm_act_bwd")
    def _(grad_y, x, weight, bias, stats, slope, flags):
        n, c = x.shape[0], x.shape[1]
        shape = (n, c) if flags & PER_SAMPLE else (c,)
        return _fake_y(x), stats.new_empty(shape, dtype=stat_dtype(x.dtype)), stats.new_empty(shape, dtype=stat_dtype(x.dtype))
