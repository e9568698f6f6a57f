"""3x3 stride-1 convolutions (ResNet blocks, U-Net/StackGAN up-blocks): custom ops, dispatch.

Ops (namespace ``ganengine``):
  conv3x3_fwd(x, weight, bias?, padding, reflect) -> y
      y = conv2d(pad(x, padding, "reflect" if reflect else "zeros"), weight, bias)
  conv3x3_bwd(grad, x, weight, padding, reflect, mask) -> (dx, dw, db)

Backends: torch (F.pad + F.conv2d, the reference) and cpu: Winograd F(2x2, 3x3) (C++ input /
output transforms and the 16 GEMMs per call as batched GEMMs, csrc/cpu/conv_winograd3x3.cpp).
oneDNN's direct convolution already runs at the FMA peak of this CPU class; Winograd does 2.25x
fewer multiplies, so it wins where the GEMMs dominate (enough channels and tiles) and the cpu
backend runs oneDNN's direct convolution elsewhere. The rule is the conv family's router
(csrc/cpu/conv_route.cpp, ``decide3x3``), asked once per call; ``winograd_profitable`` and
``_use_winograd`` query it, and the module attributes ``MIN_CHANNELS`` / ``MIN_TILES`` read and
set its thresholds (``GANENGINE_WINOGRAD_MIN_CHANNELS`` is the first's initial value).
``GANENGINE_WINOGRAD_TILE=4`` switches to F(4x4, 3x3) (4x fewer multiplies, ~30x the fp32
rounding error of the direct convolution: 8e-6 of the output's range at 256 channels).
Reflect padding is read through index maps inside the input transform, so
``ReflectionPad2d(1) -> Conv2d(3x3)`` never writes the padded tensor.
The triton and cuda backends run the vendor convolution (cuDNN picks Winograd / FFT / implicit
GEMM per shape itself).

Eager calls on CPU tensors (backend auto or cpu) go to the lean entry (csrc/cpu/conv_autograd.cpp):
one C++ call that routes, runs, and records C++ autograd (ATen's own where the route is oneDNN),
reached through the Python fast entry ganengine._C.conv3x3_entry (csrc/cpu/conv_py.cpp: no
dispatcher op of its own to enter) or, for tensor subclasses and torch function modes, the
dispatcher op ganengine_C::conv3x3. Eager calls on CUDA tensors (backend auto, triton or cuda) go to the
same fast entry's vendor route (csrc/cpu/conv_vendor.cpp: the public function's checks, then ATen's
convolution with its autograd, in C++: the GPU backends' route at the host cost of one binding
call; ``_dispatch.conv_routes``). torch.compile / export use the custom ops below.

Layout: y and dx follow ``_conv_common.out_format(x)`` (channels_last in, channels_last out).
"""
from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

from ganengine import _ext, settings
from ganengine.ops import _dispatch, _eager
from ganengine.ops import conv as _conv
from ganengine.ops._conv_common import (acc_dtype, any_autocast, autocast_args, autocast_for, bias_grad, check_conv,
                                        conv_grads, dynamo_compiling as _dynamo_compiling, eager_autocast,
                                        eager_autocast_backend, eager_autocast_error, fast_entry,
                                        grads_by_reference, out_format, pair)

# the router's thresholds where ganengine._C is not built (then only the torch backend runs, and
# these only answer winograd_profitable); with it, MIN_CHANNELS / MIN_TILES are the C++ values
_PY_THRESHOLDS = {"MIN_CHANNELS": settings.get_or_default("GANENGINE_WINOGRAD_MIN_CHANNELS"),  # (bad: reported)
                  "MIN_TILES": 256}
_CONFIG_SLOT = {"MIN_CHANNELS": 0, "MIN_TILES": 1}


def _routed() -> bool:
    return _ext.has_kernel("conv3x3_route", "CPU")


def _threshold(name: str) -> int:
    if _routed():
        return int(_ext.op("conv3x3_winograd_config")(-1, -1)[_CONFIG_SLOT[name]])
    return _PY_THRESHOLDS[name]


def _set_threshold(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"conv3x3.{name} must be an int >= 0, got {value!r}")
    if _routed():
        args = [-1, -1]
        args[_CONFIG_SLOT[name]] = value
        _ext.op("conv3x3_winograd_config")(*args)
    _PY_THRESHOLDS[name] = value
    _PAYS_CACHE.clear()


class _Module(types.ModuleType):
    """This module, with MIN_CHANNELS / MIN_TILES reading and setting the C++ router's thresholds
    (``monkeypatch.setattr(conv3x3, "MIN_CHANNELS", 0)`` then reaches every route, the lean
    entry's included)."""

    MIN_CHANNELS = property(lambda self: _threshold("MIN_CHANNELS"),
                            lambda self, v: _set_threshold("MIN_CHANNELS", v))
    MIN_TILES = property(lambda self: _threshold("MIN_TILES"), lambda self, v: _set_threshold("MIN_TILES", v))


sys.modules[__name__].__class__ = _Module


def winograd_tile() -> int:
    return settings.get("GANENGINE_WINOGRAD_TILE")


_PAYS: list = []  # [the raw ganengine_C::conv3x3_winograd_pays builtin, or None]
# its answers by (x_shape, w_shape, padding, tile): the builtin's call through the dispatcher
# costs 5-13 us (its int[] arguments parsed against the schema), a dict lookup ~0.5 us; the
# thresholds change only through _set_threshold, which clears it (a direct call of the raw
# ganengine_C::conv3x3_winograd_config op would not: use conv3x3.MIN_CHANNELS / MIN_TILES)
_PAYS_CACHE: dict = {}
_PAYS_CACHE_MAX = 1024


def winograd_profitable(x_shape, w_shape, padding: int, tile: int = 2) -> bool:
    """Whether the router sends an fp32 cpu call of these shapes to Winograd F(tile, 3) (ganengine.fuse's
    modules ask it per forward: one C++ call per new shape, then a cached answer)."""
    key = (x_shape, w_shape, padding, tile)   # (torch.Size hashes as the tuple it is)
    try:
        hit = _PAYS_CACHE.get(key)
    except TypeError:  # shapes given as lists, or symbolic (make_fx: SymInts do not hash)
        key = (tuple(x_shape), tuple(w_shape), padding, tile)
        try:
            hit = _PAYS_CACHE.get(key)
        except TypeError:
            return _winograd_pays(*key)   # (asked, never kept)
    if hit is None:
        hit = _PAYS_CACHE[key] = _winograd_pays(*key)
        if len(_PAYS_CACHE) > _PAYS_CACHE_MAX:
            _PAYS_CACHE.clear()
    return hit


def _winograd_pays(x_shape, w_shape, padding: int, tile: int) -> bool:
    if not _PAYS:
        _PAYS.append(_ext.op("conv3x3_winograd_pays").default._op if _routed() else None)
    if _PAYS[0] is not None:
        return bool(_PAYS[0](x_shape, w_shape, padding, tile))
    n, c, h, w = x_shape
    tiles = n * -(-(h + 2 * padding - 2) // tile) * -(-(w + 2 * padding - 2) // tile)
    return min(c, w_shape[0]) >= _PY_THRESHOLDS["MIN_CHANNELS"] and tiles >= _PY_THRESHOLDS["MIN_TILES"]


# ----------------------------------------------------------------------------- torch backend
_nn_pad = torch._C._nn.pad  # what F.pad runs for "reflect" (its Python layer adds nothing for that mode)


def _pad(x, padding: int, reflect: bool):
    if reflect and padding:
        return F.pad(x, (padding,) * 4, mode="reflect"), 0
    return x, padding


def reference_conv3x3(x, weight, bias, padding: int, reflect: bool):
    """The differentiable torch composition."""
    xp, p = _pad(x, padding, reflect)
    return F.conv2d(xp, weight, bias, 1, p)


def _torch_fwd(x, weight, bias, padding, reflect):
    return reference_conv3x3(x, weight, bias, padding, reflect).contiguous(memory_format=out_format(x))


def _torch_bwd(grad, x, weight, padding, reflect, mask):
    # custom op bodies run below autograd: call the backward kernels directly
    xp, p = _pad(x, padding, reflect)
    dx, dw = conv_grads(grad, xp, weight, [1, 1], [p, p], mask)
    if mask[0] and xp is not x:
        dx = torch.ops.aten.reflection_pad2d_backward(dx, x, [padding] * 4).contiguous(memory_format=out_format(x))
    if mask[1]:
        dw = dw.contiguous()  # this op's dw is NCHW-contiguous on every backend (see the fake)
    db = grad.sum(dim=(0, 2, 3), dtype=acc_dtype(grad.dtype)).to(grad.dtype) if mask[2] else x.new_empty((0,))
    return dx, dw, db


# ----------------------------------------------------------------------------- cpu backend (Winograd)
def _cpu_fwd(x, weight, bias, padding, reflect, tile):
    y = _ext.op("conv3x3_fwd")(x, weight, bias, padding, reflect, tile)
    return y.contiguous(memory_format=out_format(x))


def _cpu_bwd(grad, x, weight, padding, reflect, mask, tile):
    dx, dw, db = _ext.op("conv3x3_bwd")(grad, x, weight, padding, reflect, tile, [int(m) for m in mask])
    if mask[0]:
        dx = dx.contiguous(memory_format=out_format(x))
    return dx, dw, db


# ----------------------------------------------------------------------------- custom ops
def _backend(x: torch.Tensor) -> str:
    reason = _dispatch.ext_reason("conv3x3_fwd", x.device)
    if reason is None and x.dtype != torch.float32:
        reason = f"the Winograd kernel is fp32 only, got {x.dtype}"
    # GPU backends (triton, cuda) run the vendor convolution: cuDNN already chooses Winograd /
    # FFT / implicit GEMM per shape, so there is nothing for us to add to a bare 3x3 conv there
    return _dispatch.choose("conv3x3", x, {"cpu": reason, "triton": None, "cuda": None})


# backends whose conv3x3 is the vendor convolution itself (see _backend)
_VENDOR_BACKENDS = ("triton", "cuda")


def _use_winograd(x, weight, padding):
    """The Winograd tile the router runs this call with on the cpu backend, or None (oneDNN)."""
    if _routed() and type(x) in _eager._TENSOR_TYPES:  # (the router takes real tensors, not fake ones)
        return _ext.op("conv3x3_route")(x, weight, padding) or None
    tile = winograd_tile()
    return tile if winograd_profitable(x.shape, weight.shape, padding, tile) else None


def _fwd_body(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int,
              reflect: bool) -> torch.Tensor:
    if _backend(x) == "cpu":
        tile = _use_winograd(x, weight, padding)
        if tile is not None:
            return _cpu_fwd(x, weight, bias, padding, reflect, tile)
    return _torch_fwd(x, weight, bias, padding, reflect)


conv3x3_fwd = torch.library.custom_op("ganengine::conv3x3_fwd", mutates_args=())(_fwd_body)


@conv3x3_fwd.register_fake
def _(x, weight, bias, padding, reflect):
    n, _, h, w = x.shape
    return torch.empty((n, weight.shape[0], h + 2 * padding - 2, w + 2 * padding - 2), dtype=x.dtype,
                       device=x.device, memory_format=out_format(x))


def _bwd_body(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: int, reflect: bool,
              mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _backend(x) == "cpu":
        tile = _use_winograd(x, weight, padding)
        if tile is not None:
            return _cpu_bwd(grad, x, weight, padding, reflect, mask, tile)
    return _torch_bwd(grad, x, weight, padding, reflect, mask)


conv3x3_bwd = torch.library.custom_op("ganengine::conv3x3_bwd", mutates_args=())(_bwd_body)


@conv3x3_bwd.register_fake
def _(grad, x, weight, padding, reflect, mask):
    def maybe(t, shape, fmt):
        return torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=fmt)

    return (maybe(x, x.shape, out_format(x)) if mask[0] else x.new_empty((0,)),
            maybe(weight, weight.shape, torch.contiguous_format) if mask[1] else weight.new_empty((0,)),
            maybe(x, (weight.shape[0],), torch.contiguous_format) if mask[2] else x.new_empty((0,)))


def _setup(ctx, inputs, output):
    x, weight, bias, padding, reflect = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.conf = (padding, reflect)


def _backward(ctx, grad, bwd):
    x, weight, bias = ctx.saved_tensors
    padding, reflect = ctx.conf
    needs = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # double backward: differentiate the torch composition
        dx, dw, db = grads_by_reference(lambda a, b, c: reference_conv3x3(a, b, c, padding, reflect),
                                         (x, weight, bias), needs, grad)
        return dx, dw, db, None, None
    mask = [bool(needs[0]), bool(needs[1]), bool(needs[2] and bias is not None)]
    dx, dw, db = bwd(grad, x, weight, padding, reflect, mask)
    return (dx if mask[0] else None), (dw if mask[1] else None), bias_grad(db if mask[2] else None, bias), None, None


torch.library.register_autograd("ganengine::conv3x3_fwd", _eager.backward_via(_backward, conv3x3_bwd),
                                setup_context=_setup)
# plain eager calls (the CPU's Winograd route where the C++ entry declines, the torch backend's):
# no custom-op layer
_eager_fwd = _eager.twin("ganengine::conv3x3_fwd", _fwd_body, _setup,
                         _eager.backward_via(_backward, _bwd_body))


# ----------------------------------------------------------------------------- public function
_REFUSAL = "conv3x3: not served by the C++ entry"  # the prefix of the lean entry's refusals
_KERNELS = ("conv3x3_fwd", "conv3x3_bwd")  # what the lean entry calls
# ganengine._C.conv3x3_entry (csrc/cpu/conv_py.cpp): the lean route's Python fast entry
_entry = fast_entry("conv3x3_entry")
_VENDOR_ENTRY = ("conv3x3", _KERNELS, "conv3x3_entry")  # (conv_routes' arguments)
# (per call, as ops/conv.py's: torch.compiler through the torch module ~40 ns, y.is_cpu ~80 ns)
_compiler = torch.compiler
_last_used = _dispatch.last_used
_LEAN_CPU = _dispatch.ROUTE_LEAN_CPU


def _declines(*args):
    return None


# ganengine._C.conv3x3_autocast_entry (csrc/cpu/conv_py.cpp): a CPU call under autocast in the
# default state (backend 'auto', bound by ops/conv.py _bind_default), both padding modes: eager's own
# F.conv2d(F.pad(x, (p,) * 4, mode="reflect"), w, b) (or the zero-padded conv2d) with every check in
# C, recorded as last_used["conv3x3"] = "torch"; None for anything else (nothing ran), which
# _autocast_call or the route then serves. Asked in Python, the same call cost 1.15x eager's host
# time forward at a tiny layer (the checks, _requested_backend, out_format: ~2 us).
_autocast_entry = getattr(_ext._C, "conv3x3_autocast_entry", None) or _declines


def _dispatcher_entry(x, weight, bias, padding, padding_mode):
    """The lean route through the dispatcher op ganengine_C::conv3x3 (the one that honours tensor
    subclasses and torch function modes): y, or None where it declines."""
    if not (type(padding) is int and _eager.lean_ok(x) and x.is_cpu
            and (padding_mode == "zeros" or padding_mode == "reflect")):
        return None
    op = _dispatch.lean_op("conv3x3", _KERNELS)
    if op is None:  # (the routes allowed only the vendor route)
        return None
    try:
        return op(x, weight, bias, padding, padding_mode == "reflect")
    except RuntimeError as e:  # (NotImplementedError is one)
        if not _dispatch.refused(e, _REFUSAL, bias, required=(weight,)):
            raise
    return None


def _autocast_call(x, weight, bias, padding, padding_mode):
    """Under autocast (_conv_common.eager_autocast; a 3x3 weight, an int padding, a mode the op
    takes): eager's own call of nn.Conv2d(3, padding_mode=...) (F.pad's reflect padding, then
    ATen's convolution with its casts, weight-cast cache and autograd; the route would run the same
    ops on the same casts, at ~1.5x eager's host time), in out_format(x). None where the route
    serves the call, or raises its public error (what ATen refuses)."""
    if not (eager_autocast(x, weight, bias, _VENDOR_ENTRY) and type(padding) is int and padding >= 0
            and (padding_mode == "zeros" or padding_mode == "reflect") and weight.dim() == 4
            and weight.shape[2] == 3 and weight.shape[3] == 3):
        return None
    try:
        if padding_mode == "reflect" and padding:
            y = torch.conv2d(_nn_pad(x, (padding, padding, padding, padding), "reflect", None), weight, bias, 1, 0)
        else:
            y = torch.conv2d(x, weight, bias, 1, padding)
    except eager_autocast_error:
        return None
    _dispatch.last_used["conv3x3"] = "torch" if y.is_cpu else eager_autocast_backend(y, _VENDOR_ENTRY)
    return y.contiguous(memory_format=out_format(x))


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, padding: int = 1,
            padding_mode: str = "zeros") -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=padding)`` for 3x3 kernels, with
    ``padding_mode`` "zeros" or "reflect" (= ``F.pad(x, (p,)*4, mode="reflect")`` first).

    On the cpu backend, fp32 calls with enough channels run as a Winograd F(2x2, 3x3)
    convolution (2.25x fewer multiplies than the direct one, fp32 error within 2x of it).
    x: (N, C, H, W) contiguous / channels_last / strided; weight (K, C, 3, 3); groups=1.
    Twice differentiable (the double backward differentiates the torch composition).
    """
    # the lean route (see the module docstring): the fast entry serves a plain eager call (Tensor),
    # declines what it does not serve before any work (None: the full route below serves the call or
    # raises the public error), or hands a tensor subclass / torch function mode to the dispatcher op
    # (NotImplemented). Any other error is the call's own: raised once.
    # On CUDA tensors the same entry serves the GPU backends' vendor route (conv_routes).
    # Under autocast, eager's own call first: from C (_autocast_entry) in the default state, else
    # from Python (_autocast_call: a CUDA tensor, the state not yet bound).
    # (the compile check first: under dynamo the routes' first resolution is not traceable)
    if not (_dynamo_compiling() or _compiler._is_compiling_flag):
        if (on := autocast_for(x)) or (on is None and any_autocast()):
            if (y := _autocast_entry(x, weight, bias, padding, padding_mode)) is not None:
                return y
            if not _conv._default_bound:  # (the first call under backend 'auto': bind the C entry's state)
                _conv._bind_default()
                if _conv._default_bound and (y := _autocast_entry(x, weight, bias, padding,
                                                                   padding_mode)) is not None:
                    return y
            if (y := _autocast_call(x, weight, bias, padding, padding_mode)) is not None:
                return y
        if routes := _dispatch.conv_routes("conv3x3", _KERNELS, "conv3x3_entry"):
            y = _entry(x, weight, bias, padding, padding_mode, routes)
            if y is NotImplemented:
                y = _dispatcher_entry(x, weight, bias, padding, padding_mode)
            if y is not None:
                _last_used["conv3x3"] = "cpu" if routes == _LEAN_CPU or y.is_cpu else _dispatch.conv_gpu(*_VENDOR_ENTRY)
                return y
    fn = "conv3x3"
    check_conv(fn, x, weight, bias)
    ws = weight.shape
    if ws[2] != 3 or ws[3] != 3:
        raise ValueError(f"{fn}: weight must be (K, C, 3, 3), got {tuple(ws)}")
    if type(padding) is not int or padding < 0:
        padding = pair(f"{fn}: padding", padding, 0)
        if padding[0] != padding[1]:
            raise ValueError(f"{fn}: padding must be the same on both axes, got {tuple(padding)}")
        padding = padding[0]
    if padding_mode == "reflect":
        reflect = padding > 0
    elif padding_mode == "zeros":
        reflect = False
    else:
        raise ValueError(f"{fn}: padding_mode must be 'zeros' or 'reflect', got {padding_mode!r}")
    h, w = x.shape[2], x.shape[3]
    if reflect and (padding >= h or padding >= w):
        raise ValueError(f"{fn}: reflect padding {padding} must be smaller than the input's H and W, "
                         f"got {tuple(x.shape)}")
    if h + 2 * padding < 3 or w + 2 * padding < 3:
        raise ValueError(f"{fn}: input {tuple(x.shape)} with padding {padding} is smaller than the 3x3 kernel")
    x, weight, bias = autocast_args(x, weight, bias)
    backend = _backend(x)
    # (the compile check first: under dynamo the route query is a dispatcher-state read it cannot trace)
    if not (_dynamo_compiling() or torch.compiler._is_compiling_flag) and (
            backend in _VENDOR_BACKENDS or (backend == "cpu" and _use_winograd(x, weight, padding) is None)):
        # the GPU backends run cuDNN either way, and the cpu backend oneDNN where Winograd does
        # not pay: the plain composition skips the custom op's host cost (its dispatch, forward
        # and backward: 8x eager's at a tiny shape) and runs the same kernels, called directly
        # (reference_conv3x3's ops without F.pad's Python wrapper: on a GPU at GAN batch sizes
        # host time is the step time)
        if reflect:
            y = _nn_pad(x, (padding, padding, padding, padding), "reflect", None)
            y = torch.conv2d(y, weight, bias, 1, 0)
        else:
            y = torch.conv2d(x, weight, bias, 1, padding)
        return y.contiguous(memory_format=out_format(x))
    fwd = _eager_fwd if _eager.plain_eager(x, weight, bias) else conv3x3_fwd
    return fwd(x, weight, bias, padding, reflect)


# ----------------------------------------------------------------------------- fakes of the C++ kernels
# (the lean entry's C++ autograd calls them through the dispatcher: under a FakeTensorMode they
# need their own fakes, as ops/conv_act.py registers for its kernels)
if _ext.loaded() and _ext.has_kernel("conv3x3_fwd", "CPU"):
    @torch.library.register_fake("ganengine_C::conv3x3_fwd")
    def _(x, weight, bias, padding, reflect, tile):
        n, _, h, w = x.shape
        return x.new_empty((n, weight.shape[0], h + 2 * padding - 2, w + 2 * padding - 2))

    @torch.library.register_fake("ganengine_C::conv3x3_bwd")
    def _(grad, x, weight, padding, reflect, tile, mask):
        return (x.new_empty(x.shape) if mask[0] else x.new_empty((0,)),
                weight.new_empty(weight.shape) if mask[1] else weight.new_empty((0,)),
                weight.new_empty((weight.shape[0],)) if mask[2] else weight.new_empty((0,)))
