"""Plain convolutions and transposed convolutions (the U-Net's 4x4 stride-2 layers, StackGAN's
and StarGAN's discriminator blocks): custom ops, dispatch.

Ops (namespace ``ganengine``):
  conv_fwd(x, weight, bias?, stride, padding, output_padding, transposed) -> y
      y = conv2d(x, weight, bias, stride, padding)                       (transposed=False)
      y = conv_transpose2d(x, weight, bias, stride, padding, output_padding)  (transposed=True)
  conv_bwd(grad, x, weight, stride, padding, output_padding, transposed, mask) -> (dx, dw, db)

Backends: torch (ATen's convolution, the reference) and cpu. On the cpu backend the conv family's
router (csrc/cpu/conv_route.cpp, ``decide``; one decision per call) picks the strategy:
an fp32 call whose output map is small (few GEMM columns, a large weight) runs as one GEMM over
im2col columns (csrc/cpu/conv_gemm.cpp), which reads the weight in place, where oneDNN's direct
convolution runs far below its large-map throughput (docs/conv.md; channels_last inputs run its
NHWC variant, with rules of their own: DCGAN's small maps and narrow layers); 4x4 kernels at stride 1 or 2
(PatchGAN, the U-Net, StarGAN) with enough channels run as Winograd convolutions
(csrc/cpu/conv_winograd.cpp: F(2, 4) at stride 1, F(3, 2) over the polyphase form at stride 2;
transposed convs as their adjoint; docs/conv4x4.md); everything else runs oneDNN. ``uses_gemm``
and ``uses_winograd`` ask the router.
``gemm_policy("always" | "never" | "auto")`` (or ``GANENGINE_CONV_GEMM``) and
``winograd_policy(...)`` (or ``GANENGINE_CONV_WINOGRAD``) override the choices, for tests and
benchmarks. The triton and cuda backends run the vendor convolution (cuDNN). groups = 1,
dilation = 1, zero padding.

Eager calls on CPU tensors (backend auto or cpu) go to the lean entry (csrc/cpu/conv_autograd.cpp):
one C++ call that routes, runs, and records C++ autograd (ATen's own where the route is oneDNN),
reached through the Python fast entry ganengine._C.conv_entry (csrc/cpu/conv_py.cpp: no
dispatcher op of its own to enter) or, for tensor subclasses and torch function modes, the
dispatcher op ganengine_C::conv; in the default state (backend 'auto', autocast off) through
ganengine._C.conv_entry_default, which asks for that state in C (_bind_default). Eager calls on
CUDA tensors (backend auto, triton or cuda) go to the same fast entry's vendor route
(csrc/cpu/conv_vendor.cpp: the public function's checks, then ATen's convolution with its autograd,
in C++: the GPU backends' route at the host cost of one binding call; ``_dispatch.conv_routes``).
torch.compile / export use the custom ops below.

Layout: y and dx follow ``_conv_common.out_format(x)``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ganengine import _ext, backends as _backends
from ganengine.ops import _dispatch, _eager
from ganengine.ops._conv_common import (acc_dtype, any_autocast, autocast_args, autocast_for, bias_grad, check_conv,
                                        check_fits, conv_grads, dynamo_compiling as _dynamo_compiling, eager_autocast,
                                        eager_autocast_backend, eager_autocast_error, fast_entry,
                                        grads_by_reference, out_format, pair, vendor_conv)

_POLICIES = {"auto": 0, "always": 1, "never": 2}
_ZEROS = (0, 0)


@contextlib.contextmanager
def gemm_policy(policy: str):
    """Process-wide override of the cpu backend's choice between the GEMM form and oneDNN:
    "auto" (measured threshold), "always" (every fp32 call), "never"."""
    if policy not in _POLICIES:
        raise ValueError(f"gemm_policy: policy must be one of {tuple(_POLICIES)}, got {policy!r}")
    if not _ext.loaded():
        yield
        return
    prev = _ext.op("conv_gemm_policy")(_POLICIES[policy])
    try:
        yield
    finally:
        _ext.op("conv_gemm_policy")(prev)


@contextlib.contextmanager
def winograd_policy(policy: str = "auto", s1_tile: int | None = None, s2_tile: int | None = None):
    """Process-wide override of the cpu backend's Winograd 4x4 convolutions: policy "auto"
    (measured threshold), "always" (every legal fp32 call: 4x4 kernel, stride 1 or 2) or "never";
    ``s1_tile`` the output tile of F(m, 4) at stride 1 (2 or 3), ``s2_tile`` of F(m, 2) at stride 2
    (2, 3 or 4). The GEMM form keeps the calls it takes under gemm_policy."""
    if policy not in _POLICIES:
        raise ValueError(f"winograd_policy: policy must be one of {tuple(_POLICIES)}, got {policy!r}")
    if s1_tile not in (None, 2, 3):
        raise ValueError(f"winograd_policy: s1_tile must be 2 or 3, got {s1_tile!r}")
    if s2_tile not in (None, 2, 3, 4):
        raise ValueError(f"winograd_policy: s2_tile must be 2, 3 or 4, got {s2_tile!r}")
    if not _ext.loaded():
        yield
        return
    config = _ext.op("conv_winograd_config")
    prev = config(_POLICIES[policy], -1 if s1_tile is None else s1_tile, -1 if s2_tile is None else s2_tile)
    try:
        yield
    finally:
        config(*prev)


def uses_winograd(x: torch.Tensor, weight: torch.Tensor, stride, padding, transposed: bool = False,
                  output_padding=(0, 0)) -> bool:
    """Whether the cpu backend runs this call as a Winograd convolution under the current
    policies (the rule itself lives in the router, csrc/cpu/conv_route.cpp)."""
    if _backend(x, weight) != "cpu":
        return False
    # (ints or pairs, as F.conv2d takes them)
    stride, padding = pair("uses_winograd: stride", stride, 1), pair("uses_winograd: padding", padding, 0)
    output_padding = pair("uses_winograd: output_padding", output_padding, 0)
    return bool(_ext.op("conv_uses_winograd")(x, weight, list(stride), list(padding), transposed,
                                              list(output_padding)))


def uses_gemm(x: torch.Tensor, weight: torch.Tensor, stride, padding, transposed: bool = False) -> bool:
    """Whether the cpu backend runs this call as the GEMM form under the current policy (the
    rule itself lives in the router, csrc/cpu/conv_route.cpp)."""
    if _backend(x, weight) != "cpu":
        return False
    stride, padding = pair("uses_gemm: stride", stride, 1), pair("uses_gemm: padding", padding, 0)
    return bool(_ext.op("conv_uses_gemm")(x, weight, list(stride), list(padding), transposed))


def _vendor_call(x, weight, stride, padding, transposed, output_padding) -> bool:
    """Whether this call would run the vendor convolution inside the custom op anyway (cuDNN on
    the GPU backends; oneDNN on the cpu backend where neither the GEMM form nor Winograd is
    taken): the public functions then call it directly and skip the custom op's host cost,
    forward and backward (2-3x eager's at a tiny shape)."""
    if _dynamo_compiling() or torch.compiler._is_compiling_flag:
        return False
    backend = _backend(x, weight)
    if backend in _VENDOR_BACKENDS:
        return True
    if backend != "cpu" or type(x) not in _eager._TENSOR_TYPES:  # (the router takes real tensors, not fake ones)
        return False
    return _ext.op("conv_route")(x, weight, list(stride), list(padding), transposed, list(output_padding))[0] == 0


def _out_size(x_shape, w_shape, stride, padding, output_padding, transposed):
    n, _, h, w = x_shape
    kh, kw = w_shape[2:]
    if transposed:
        return (n, w_shape[1], (h - 1) * stride[0] - 2 * padding[0] + kh + output_padding[0],
                (w - 1) * stride[1] - 2 * padding[1] + kw + output_padding[1])
    return (n, w_shape[0], (h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1)


# ----------------------------------------------------------------------------- torch backend
def reference_conv(x, weight, bias, stride, padding, output_padding, transposed):
    """The differentiable torch composition."""
    if transposed:
        return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)
    return F.conv2d(x, weight, bias, stride, padding)


def _torch_fwd(x, weight, bias, stride, padding, output_padding, transposed):
    return vendor_conv(x, weight, bias, stride, padding, transposed, output_padding)


def _torch_bwd(grad, x, weight, stride, padding, output_padding, transposed, mask):
    dx, dw = conv_grads(grad, x, weight, stride, padding, mask, transposed, output_padding)
    if mask[1]:
        dw = dw.contiguous()  # this op's dw is NCHW-contiguous on every backend (see the fake)
    db = grad.sum(dim=(0, 2, 3), dtype=acc_dtype(grad.dtype)).to(grad.dtype) if mask[2] else x.new_empty((0,))
    return dx, dw, db


# ----------------------------------------------------------------------------- custom ops
# backends whose convolution is the vendor one itself (see _backend)
_VENDOR_BACKENDS = ("triton", "cuda")


def _backend(x: torch.Tensor, weight: torch.Tensor) -> str:
    reason = _dispatch.ext_reason("conv_fwd", x.device)
    if reason is None and x.dtype != torch.float32:
        reason = f"the GEMM convolution is fp32 only, got {x.dtype}"
    # GPU backends run cuDNN, which already picks its algorithm per shape
    return _dispatch.choose("conv", x, {"cpu": reason, "triton": None, "cuda": None})


def _fwd_body(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
              padding: list[int], output_padding: list[int], transposed: bool) -> torch.Tensor:
    if _backend(x, weight) == "cpu":
        y = _ext.op("conv_fwd")(x, weight, bias, stride, padding, output_padding, transposed)
        return y.contiguous(memory_format=out_format(x))
    return _torch_fwd(x, weight, bias, stride, padding, output_padding, transposed)


conv_fwd = torch.library.custom_op("ganengine::conv_fwd", mutates_args=())(_fwd_body)


@conv_fwd.register_fake
def _(x, weight, bias, stride, padding, output_padding, transposed):
    return torch.empty(_out_size(x.shape, weight.shape, stride, padding, output_padding, transposed),
                       dtype=x.dtype, device=x.device, memory_format=out_format(x))


def _bwd_body(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int],
              output_padding: list[int], transposed: bool, mask: list[bool]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _backend(x, weight) == "cpu":
        dx, dw, db = _ext.op("conv_bwd")(grad, x, weight, stride, padding, output_padding, transposed,
                                         [int(m) for m in mask])
        if mask[0]:
            dx = dx.contiguous(memory_format=out_format(x))
        if mask[1]:
            dw = dw.contiguous()
        return dx, dw, db
    return _torch_bwd(grad, x, weight, stride, padding, output_padding, transposed, mask)


conv_bwd = torch.library.custom_op("ganengine::conv_bwd", mutates_args=())(_bwd_body)


@conv_bwd.register_fake
def _(grad, x, weight, stride, padding, output_padding, transposed, mask):
    def maybe(t, shape, fmt):
        return torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=fmt)

    return (maybe(x, x.shape, out_format(x)) if mask[0] else x.new_empty((0,)),
            maybe(weight, weight.shape, torch.contiguous_format) if mask[1] else weight.new_empty((0,)),
            maybe(x, (grad.shape[1],), torch.contiguous_format) if mask[2] else x.new_empty((0,)))


def _setup(ctx, inputs, output):
    x, weight, bias, stride, padding, output_padding, transposed = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.conf = (list(stride), list(padding), list(output_padding), transposed)


def _backward(ctx, grad, bwd):
    x, weight, bias = ctx.saved_tensors
    stride, padding, output_padding, transposed = ctx.conf
    needs = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # double backward (WGAN-GP, R1): differentiate the torch composition
        dx, dw, db = grads_by_reference(
            lambda a, b, c: reference_conv(a, b, c, stride, padding, output_padding, transposed),
            (x, weight, bias), needs, grad)
        return dx, dw, db, None, None, None, None
    mask = [bool(needs[0]), bool(needs[1]), bool(needs[2] and bias is not None)]
    dx, dw, db = bwd(grad, x, weight, stride, padding, output_padding, transposed, mask)
    return (dx if mask[0] else None), (dw if mask[1] else None), bias_grad(db if mask[2] else None, bias), None, None, None, None


torch.library.register_autograd("ganengine::conv_fwd", _eager.backward_via(_backward, conv_bwd),
                                setup_context=_setup)
# plain eager calls (the CPU's GEMM / Winograd routes where the C++ entry declines, the torch
# backend's): no custom-op layer
_eager_fwd = _eager.twin("ganengine::conv_fwd", _fwd_body, _setup,
                         _eager.backward_via(_backward, _bwd_body))


# ----------------------------------------------------------------------------- public functions
_REFUSAL = "conv: not served by the C++ entry"  # the prefix of the lean entry's refusals


def _plain_pair(v) -> bool:
    """An int or a pair of ints, as pair() takes them (the dispatcher would also take a bool)."""
    t = type(v)
    if t is int:
        return True
    return (t is tuple or t is list) and len(v) == 2 and type(v[0]) is int and type(v[1]) is int


_KERNELS = ("conv_fwd", "conv_bwd")  # what the lean entry calls
# ganengine._C.conv_entry (csrc/cpu/conv_py.cpp): the lean route's Python fast entry
_entry = fast_entry("conv_entry")
_VENDOR_ENTRY = ("conv", _KERNELS, "conv_entry")  # (conv_routes' arguments)
# (per call, at a tiny shape part of what is compared with eager: torch.compiler read through the
# torch module costs ~40 ns, y.is_cpu ~80 ns; autocast_for: _conv_common)
_compiler = torch.compiler
_last_used = _dispatch.last_used
_LEAN_CPU = _dispatch.ROUTE_LEAN_CPU


def _declines(*args):
    return None


# ganengine._C.conv_entry_default (csrc/cpu/conv_py.cpp): the fast entry for a CPU tensor in the
# state nearly every call meets (backend 'auto', autocast off, the routes' Python state as
# _bind_default recorded it), asking for that state in C; None for anything else (nothing ran), which
# the route below then serves in its order. Per call it saves the autocast probe, conv_routes and the
# last_used record in Python (~0.5 us: at host_cost's conv_small_kernels, 3x3 8 -> 8 at 8x8, the
# whole difference to eager's host time).
_default_entry = getattr(_ext._C, "conv_entry_default", None) or _declines
_default_bound = False
_AUTO = (None, "auto")  # (_dispatch._requested.value of backend 'auto')


def _bind_default() -> None:
    """Records for conv_entry_default the routes of backend 'auto' and what conv_routes resolved
    them with (its function, lean_op, backends.serves: a test replacing one turns the entry off).
    Asked by the route below until a call under backend 'auto' (use_backend's or the environment's)
    binds; never again where GANENGINE_BACKEND names another (then every call takes the route below,
    as before the entry). Callers ask ``not _default_bound`` first (a global read per call)."""
    global _default_bound
    if _default_bound or _dispatch._requested.value not in _AUTO:
        return
    _default_bound = True
    bind = getattr(_ext._C, "conv_default_bind", None)
    if bind is None or type(_dispatch._ENV_DATA) is not dict or _dispatch._requested_backend() != "auto":
        return
    dispatch, backends = vars(_dispatch), vars(_backends)  # (the C side reads these namespaces' entries)
    guards = ((dispatch, "conv_routes", _dispatch.conv_routes), (dispatch, "lean_op", _dispatch.lean_op),
              (backends, "serves", _backends.serves))
    bind(vars(_dispatch._requested), _dispatch._ENV_DATA, _dispatch._ENV_KEY, guards, _last_used,
         _dispatch.conv_routes("conv", _KERNELS, "conv_entry"))


def autocast_conv_entry(x, weight, bias, stride, padding, record: str):
    """A conv2d inside another conv family's call under CPU autocast (conv3x3 with zero padding,
    conv2d_act): eager's own convolution from conv_entry_default, recorded in last_used under
    ``record``, in out_format(x); None where the entry declines (the caller's Python route then
    serves the call: its own _autocast_call or its route). Its checks in C, not Python: ~5 us a
    call, at a tiny layer 1.04-1.14x eager's host time."""
    if not _default_bound:
        _bind_default()
    return _default_entry(x, weight, bias, stride, padding, 0, False, record)


def _dispatcher_entry(x, weight, bias, stride, padding, output_padding, transposed):
    """The lean route through the dispatcher op ganengine_C::conv (the one that honours tensor
    subclasses and torch function modes): y, or None where it declines."""
    if not (_eager.lean_ok(x) and x.is_cpu and _plain_pair(stride) and _plain_pair(padding)
            and _plain_pair(output_padding)):
        return None
    op = _dispatch.lean_op("conv", _KERNELS)
    if op is None:  # (the routes allowed only the vendor route)
        return None
    try:
        return op(x, weight, bias, stride, padding, output_padding, transposed)
    except RuntimeError as e:  # (NotImplementedError is one)
        if not _dispatch.refused(e, _REFUSAL, bias, required=(weight,)):
            raise
    return None


def _autocast_call(x, weight, bias, stride, padding, output_padding, transposed: bool):
    """Under autocast (_conv_common.eager_autocast; stride, padding, output_padding of plain
    types): ATen's own convolution as eager code calls it (its casts, weight-cast cache and
    autograd; the route would run the same convolution on the same casts, at 1.3-1.5x eager's host
    time), in out_format(x). None where the route serves the call, or raises its public error
    (what ATen refuses)."""
    if not (eager_autocast(x, weight, bias, _VENDOR_ENTRY) and _plain_pair(stride) and _plain_pair(padding)
            and (not transposed or _plain_pair(output_padding))):
        return None
    try:
        y = (torch.conv_transpose2d(x, weight, bias, stride, padding, output_padding) if transposed
             else torch.conv2d(x, weight, bias, stride, padding))
    except eager_autocast_error:
        return None
    if y.is_cpu:
        _dispatch.last_used["conv"] = "torch"
        if not _default_bound:
            _bind_default()  # (then conv_entry_default serves these calls in C: its autocast_call)
    else:
        _dispatch.last_used["conv"] = eager_autocast_backend(y, _VENDOR_ENTRY)
    return y.contiguous(memory_format=out_format(x))


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
           padding=0) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (groups 1, dilation 1, zero padding).

    On the cpu backend, fp32 calls with a small output map run as one GEMM over im2col columns
    (see the module docstring); the rest as oneDNN. Twice differentiable.
    """
    # the lean route (see the module docstring): the fast entry serves a plain eager call (Tensor),
    # declines what it does not serve before any work (None: the full route below serves the call or
    # raises the public error), or hands a tensor subclass / torch function mode to the dispatcher op
    # (NotImplemented). Any other error is the call's own: raised once.
    # In the default state (backend 'auto', CPU tensors) one C call asks for that state and serves the
    # call (_default_entry; under autocast with eager's own call, as _autocast_call, which serves it
    # where the C entry declines: the state not yet bound, a CUDA tensor).
    # (the compile check first: under dynamo the routes' first resolution is not traceable)
    if not (_dynamo_compiling() or _compiler._is_compiling_flag):
        if (y := _default_entry(x, weight, bias, stride, padding, 0, False)) is not None:
            return y
        if (((on := autocast_for(x)) or (on is None and any_autocast()))
                and (y := _autocast_call(x, weight, bias, stride, padding, 0, False)) is not None):
            return y
        if routes := _dispatch.conv_routes("conv", _KERNELS, "conv_entry"):
            if not _default_bound:
                _bind_default()
            y = _entry(x, weight, bias, stride, padding, 0, False, routes)
            if y is NotImplemented:
                y = _dispatcher_entry(x, weight, bias, stride, padding, 0, False)
            if y is not None:
                _last_used["conv"] = "cpu" if routes == _LEAN_CPU or y.is_cpu else _dispatch.conv_gpu(*_VENDOR_ENTRY)
                return y
    fn = "conv2d"
    check_conv(fn, x, weight, bias)
    stride, padding = pair(f"{fn}: stride", stride, 1), pair(f"{fn}: padding", padding, 0)
    check_fits(fn, x, weight, padding)
    x, weight, bias = autocast_args(x, weight, bias)
    if _vendor_call(x, weight, stride, padding, False, _ZEROS):
        return torch.conv2d(x, weight, bias, stride, padding).contiguous(memory_format=out_format(x))
    fwd = _eager_fwd if _eager.plain_eager(x, weight, bias) else conv_fwd
    return fwd(x, weight, bias, list(stride), list(padding), [0, 0], False)


def conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
                     padding=0, output_padding=0) -> torch.Tensor:
    """``F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)`` (groups 1,
    dilation 1). On the cpu backend, fp32 calls on a small input map run as one GEMM followed
    by col2im. Twice differentiable."""
    # (as conv2d's)
    if not (_dynamo_compiling() or _compiler._is_compiling_flag):
        if (y := _default_entry(x, weight, bias, stride, padding, output_padding, True)) is not None:
            return y
        if (((on := autocast_for(x)) or (on is None and any_autocast()))
                and (y := _autocast_call(x, weight, bias, stride, padding, output_padding, True)) is not None):
            return y
        if routes := _dispatch.conv_routes("conv", _KERNELS, "conv_entry"):
            if not _default_bound:
                _bind_default()
            y = _entry(x, weight, bias, stride, padding, output_padding, True, routes)
            if y is NotImplemented:
                y = _dispatcher_entry(x, weight, bias, stride, padding, output_padding, True)
            if y is not None:
                _last_used["conv"] = "cpu" if routes == _LEAN_CPU or y.is_cpu else _dispatch.conv_gpu(*_VENDOR_ENTRY)
                return y
    fn = "conv_transpose2d"
    check_conv(fn, x, weight, bias, transposed=True)
    stride, padding = pair(f"{fn}: stride", stride, 1), pair(f"{fn}: padding", padding, 0)
    output_padding = pair(f"{fn}: output_padding", output_padding, 0)
    if any(op >= s for op, s in zip(output_padding, stride)):
        raise ValueError(f"{fn}: output_padding {tuple(output_padding)} must be smaller than the stride "
                         f"{tuple(stride)}")
    if any(s <= 0 for s in _out_size(x.shape, weight.shape, stride, padding, output_padding, True)[2:]):
        raise ValueError(f"{fn}: input {tuple(x.shape)} with padding {tuple(padding)} gives an empty output")
    x, weight, bias = autocast_args(x, weight, bias)
    if _vendor_call(x, weight, stride, padding, True, output_padding):
        return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding).contiguous(
            memory_format=out_format(x))
    fwd = _eager_fwd if _eager.plain_eager(x, weight, bias) else conv_fwd
    return fwd(x, weight, bias, list(stride), list(padding), list(output_padding), True)


# ----------------------------------------------------------------------------- fakes of the C++ kernels
# (the lean entry's C++ autograd calls them through the dispatcher: under a FakeTensorMode they
# need their own fakes, as ops/conv_act.py registers for its kernels)
if _ext.loaded() and _ext.has_kernel("conv_fwd", "CPU"):
    @torch.library.register_fake("ganengine_C::conv_fwd")
    def _(x, weight, bias, stride, padding, output_padding, transposed, route=-1, tile=0):
        # (in x's layout, as the kernels write it: out_format)
        return x.new_empty(_out_size(x.shape, weight.shape, stride, padding, output_padding, transposed)).contiguous(
            memory_format=out_format(x))

    @torch.library.register_fake("ganengine_C::conv_bwd")
    def _(grad, x, weight, stride, padding, output_padding, transposed, mask, route=-1, tile=0):
        return (x.new_empty(x.shape).contiguous(memory_format=out_format(x)) if mask[0] else x.new_empty((0,)),
                weight.new_empty(weight.shape) if mask[1] else weight.new_empty((0,)),
                grad.new_empty((grad.shape[1],)) if mask[2] else grad.new_empty((0,)))
