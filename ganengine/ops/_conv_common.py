"""Helpers shared by the convolution families (ops/conv.py, ops/conv3x3.py, ops/conv_act.py):
argument checks, autocast, layouts, the vendor convolution and its gradients, and the double-backward
rule (their lean C++ entries are looked up with _dispatch.lean_op, their Python fast entries with
``fast_entry``).

Layout rule of every conv family: outputs and dx are channels_last when x is NHWC-dense and not
NCHW-contiguous, NCHW-contiguous otherwise (``out_format``); a tensor that is both (a 1x1 map, one
channel) or neither (a slice) is read by its strides as PyTorch's convolution reads it
(``suggest_memory_format``: a 1x1 map with channels_last strides, e.g. the U-Net's innermost
ConvTranspose input in a channels_last model, or a slice of a channels_last map, e.g. CUT's
anti-aliased upsampling, gives channels_last outputs there).
"""
from __future__ import annotations

import torch

from ganengine import _ext
from ganengine.ops import _dispatch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every family: fp64 for fp64 data, fp32 for fp32/fp16/bf16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def out_format(t: torch.Tensor) -> torch.memory_format:
    """The layout the conv families write for outputs shaped like ``t`` (see module docstring)."""
    if t.is_contiguous():
        # (NCHW-contiguous with a unit channel stride: both layouts at once, a 1x1 map or one channel)
        if t.dim() == 4 and t.stride(1) == 1 and suggests_channels_last(t.shape, t.stride()):
            return torch.channels_last
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    # (neither layout dense, e.g. a slice: by its strides' order, as PyTorch's convolution)
    if t.dim() == 4 and suggests_channels_last(t.shape, t.stride()):
        return torch.channels_last
    return torch.contiguous_format


def dense_copy(t: torch.Tensor) -> torch.Tensor:
    """A dense copy of a tensor that is neither NCHW- nor NHWC-dense (a slice), in the layout its
    strides suggest (``suggests_channels_last``), as PyTorch's ops allocate their outputs for it:
    a sliced channels_last activation stays channels_last through the fused ops."""
    if t.dim() == 4 and suggests_channels_last(t.shape, t.stride()):
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def suggests_channels_last(sizes, strides) -> bool:
    """c10's is_channels_last_strides_2d_s4 (what ``suggest_memory_format`` and so PyTorch's
    convolution ask), for a 4-d tensor: the strides' order, with its tie rules for size-1 dims."""
    if strides[1] == 0:
        return False
    low = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < low:
            return False
        if d == 0 and low == strides[1]:
            return False
        low = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def input_in_weight_layout(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """``x`` as a module's convolution should read it for eager's output layout. PyTorch's convolution
    writes its output channels_last where the input or the weight suggests it (their strides' order,
    ``suggest_memory_format``: a model moved to channels_last); the fused ops follow the input's
    layout (``out_format``), so a module hands them x in channels_last where the weight suggests it
    and x does not (dropout after it draws its mask in memory order; a .view() needs the layout).
    A weight or input that is both layouts at once (a 1x1 kernel or map, one channel) is read by
    its strides, as eager reads it: the DCGAN generator's N x nz x 1 x 1 noise in a channels_last
    model gives a channels_last output, as eager's. Eager's convolution makes the same copy of x
    (none where x is both layouts: then the same memory with channels_last strides). None where no
    strides of x give it: one channel on a 1x1 map (N x 1 x 1 x 1 reads as NCHW in every order) with
    a channels_last weight; the module then runs PyTorch's own convolution (a layer of N numbers)."""
    if w.is_contiguous():
        # (an NCHW weight, unless a 1x1 kernel or one input channel makes it both layouts: only
        # then can its unit stride be the channels', see suggests_channels_last)
        if w.dim() != 4 or w.stride(1) != 1 or not suggests_channels_last(w.shape, w.stride()):
            return x
    elif w.dim() != 4 or not (w.is_contiguous(memory_format=torch.channels_last)
                              or suggests_channels_last(w.shape, w.stride())):
        return x
    if x.dim() != 4:
        return x
    if not x.is_contiguous(memory_format=torch.channels_last):
        return x.contiguous(memory_format=torch.channels_last)
    if x.is_contiguous() and not (x.stride(1) == 1 and suggests_channels_last(x.shape, x.stride())):
        # both layouts at once with NCHW strides: its memory is the NHWC order too, viewed so
        # (views: no copy, and autograd's backward of a view)
        n, c, h, w_ = x.shape
        return x.view(n, h, w_, c).permute(0, 3, 1, 2) if c * h * w_ > 1 else None
    return x


def pair(name: str, v, minimum: int) -> list[int]:
    """An int or a pair of ints as [a, b], each >= minimum; else the public error naming ``name``."""
    if type(v) is int and v >= minimum:  # the common call, without the general checks below
        return [v, v]
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(v)}")
    return [int(v[0]), int(v[1])]


def check_conv(fn: str, x, weight, bias, transposed: bool = False):
    """x (N, C, H, W); weight (C_out, C_in, kH, kW), or (C_in, C_out, kH, kW) when transposed."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fn}: x and weight must be Tensors")
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    layout = "(C_in, C_out, kH, kW)" if transposed else "(C_out, C_in, kH, kW)"
    if weight.dim() != 4:
        raise ValueError(f"{fn}: weight must be {layout}, got shape {tuple(weight.shape)}")
    c_in, c_out = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
    if c_out == 0:  # (eager: "expected weight to be at least 1 at dimension 0"; the GEMM route: a reshape error)
        raise ValueError(f"{fn}: weight {layout} = {tuple(weight.shape)} has 0 output channels; a convolution "
                         "needs at least one")
    if c_in != x.shape[1]:
        where = f" {layout} = {tuple(weight.shape)}" if transposed else ""
        raise ValueError(f"{fn}: weight{where} expects {c_in} input channels (groups=1) but x has "
                         f"{x.shape[1]} (shape {tuple(x.shape)})")
    if x.dtype not in FLOATS:
        raise TypeError(f"{fn}: x must be fp16, bf16, fp32 or fp64, got {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{fn}: weight is on {weight.device} but x is on {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (c_out,):
            raise ValueError(f"{fn}: bias must be None or a ({c_out},) tensor, got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        # (F.conv2d refuses it; the kernels would read a pointer of another device, e.g. meta's)
        if bias.device != x.device:
            raise ValueError(f"{fn}: bias is on {bias.device} but x is on {x.device}")
        # (its dtype: autocast_args, F.conv2d's rule)


def autocast_args(x, *tensors):
    """F.conv2d's autocast rule: run in the autocast dtype when autocast is on for x's device."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return [t.to(dt) if t is not None and t.is_floating_point() else t for t in (x, *tensors)]
    for name, t in zip(("weight", "bias"), tensors):  # (F.conv2d refuses either)
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"x is {x.dtype} but {name} is {t.dtype}: they must match (outside autocast)")
    return [x, *tensors]


# ----------------------------------------------------------------------------- autocast: eager's own call
# Under autocast every route of the conv families runs ATen's convolution on operands cast to the
# autocast dtype (the GEMM / Winograd kernels are fp32 only; the GPU backends are cuDNN), but the
# route's casts are plain .to() calls, one per operand per call (on CUDA a cast kernel each),
# where ATen's autocast caches a weight's cast for the region. Its ~50 us of Python checks and
# dispatch plus those casts put a small layer at 1.3-1.5x eager's host time. So a plain call under
# autocast runs ATen's op itself, as eager code calls it: eager's casts (cache included), numbers,
# autograd and cost. Bad input still raises the route's own error (``eager_autocast_error``).
any_autocast = torch._C._is_any_autocast_enabled  # (one C call: the fp32 calls' only cost of this path)


def _autocast_unknown(x):
    return None


# autocast_for(x): whether autocast is on for CPU or CUDA tensor x's device, None for anything else
# (then ask any_autocast()): the extension's METH_O function (csrc/cpu/conv_py.cpp), a thread-local
# read at ~30 ns a call, where any_autocast, a pybind11 function, costs 0.1-0.2 us, a fifth of a tiny
# conv's Python. The public functions ask
#     (on := autocast_for(x)) or (on is None and any_autocast())
# before their autocast shortcut (which then asks about x's device itself).
autocast_for = getattr(_ext._C, "autocast_for", None) or _autocast_unknown


def _autocast_for_traced(x):
    return None


# (dynamo cannot trace the builtin: it traces this instead, and the callers' any_autocast, as before)
if autocast_for is not _autocast_unknown and hasattr(torch.compiler, "substitute_in_graph"):
    torch.compiler.substitute_in_graph(autocast_for, skip_signature_check=True)(_autocast_for_traced)
_autocast_enabled = torch.is_autocast_enabled
# the dtypes ATen's autocast casts to the autocast dtype; it keeps fp64, which autocast_args casts
_CASTS = (torch.float32, torch.float16, torch.bfloat16)
_PLAIN = (torch.Tensor, torch.nn.Parameter)
# what ATen raises for a bad argument: the caller's full route then raises its own (named) error
eager_autocast_error = (RuntimeError, ValueError, TypeError, IndexError)


def eager_autocast(x, weight, bias, vendor_entry: tuple | None = None) -> bool:
    """Whether autocast is on for x's device and ATen's own convolution on these operands is what
    the family's route would run, cast as it casts them: plain tensors (subclasses take the route,
    whose dispatcher op honours them), x 4-d (ATen would also take an unbatched x, which the route
    refuses), every operand of a dtype ATen's autocast casts; the requested backend 'auto', or on
    a CUDA tensor a GPU one the family's vendor route serves (``vendor_entry``: the
    (name, kernels, fast entry) of _dispatch.conv_routes). A backend named otherwise keeps its
    route, as in fp32: its own kernels ('torch': the custom op's reference body), or its fallback
    to 'torch' (a warning, or strict mode's error). Asked only where ``any_autocast()``; every
    check a C call or two (at DCGAN's layers this is part of what is compared with eager)."""
    if (type(x) not in _PLAIN or type(weight) not in _PLAIN or x.dtype not in _CASTS or weight.dtype not in _CASTS
            or x.dim() != 4 or (bias is not None and (type(bias) not in _PLAIN or bias.dtype not in _CASTS))):
        return False
    if x.is_cpu:  # (is_cpu / is_cuda: a tenth of x.device.type's cost, which builds a device object)
        return _autocast_enabled("cpu") and _dispatch._requested_backend() == "auto"
    if not _autocast_enabled("cuda" if x.is_cuda else x.device.type):
        return False
    return _dispatch._requested_backend() == "auto" or _vendor_cuda(x, vendor_entry)


def module_autocast(x) -> bool:
    """Whether a drop-in conv module (gnn.Conv2d, ConvTranspose2d, Conv3x3, Conv2dAct) or a conv
    module of ganengine.fuse (fusion/mixins.py) runs nn's own forward for this call: autocast on for
    x's device and the backend left to 'auto'. Its call is then eager's exactly (casts,
    weight-cast cache, fp64 kept, layout, autograd), where even the public function's autocast
    shortcut adds ~8 us of checks to a tiny layer; a named backend keeps its route, as in fp32.
    Outside autocast (every fp32 call) one cheap ask (autocast_for)."""
    if not ((on := autocast_for(x)) or (on is None and any_autocast())):
        return False
    return (isinstance(x, torch.Tensor) and _autocast_enabled("cpu" if x.is_cpu else x.device.type)
            and _dispatch._requested_backend() == "auto")


def _vendor_cuda(x, vendor_entry) -> bool:
    """Whether the requested backend runs the family's vendor route on CUDA tensor x."""
    return bool(x.is_cuda and vendor_entry is not None
                and _dispatch.conv_routes(*vendor_entry) & _dispatch.ROUTE_VENDOR_CUDA)


def eager_autocast_backend(y, vendor_entry: tuple | None = None) -> str:
    """What a call eager_autocast admitted records in _dispatch.last_used: the GPU backend the
    family's vendor route stands for on CUDA (as the route records it), else 'torch'."""
    if y.is_cpu or not _vendor_cuda(y, vendor_entry):
        return "torch"
    return _dispatch.conv_gpu(*vendor_entry)


def check_fits(fn: str, x, weight, padding) -> None:
    """A kernel no larger than the padded input (an empty output map is refused, as F.conv2d)."""
    if x.shape[2] + 2 * padding[0] < weight.shape[2] or x.shape[3] + 2 * padding[1] < weight.shape[3]:
        raise ValueError(f"{fn}: input {tuple(x.shape)} with padding {tuple(padding)} is smaller than the "
                         f"{tuple(weight.shape[2:])} kernel")


# ATen's convolution through torch's own binding (the Python argument parser): the same op as
# torch.ops.aten.convolution, whose OpOverloadPacket / schema-matching layers cost ~5 us more a
# call (on a GPU at GAN batch sizes a step is host-bound); convolution_backward has no such
# binding: its raw overload (~1 us less than the packet)
_convolution = torch.convolution
_convolution_backward = torch.ops.aten.convolution_backward.default._op
_ONES = (1, 1)
_ZEROS = (0, 0)


def vendor_conv(x, w, bias, stride, padding, transposed=False, output_padding=_ZEROS):
    """ATen's convolution (cuDNN / oneDNN), output in ``out_format(x)``."""
    return _convolution(x, w, bias, stride, padding, _ONES, transposed, output_padding, 1).contiguous(
        memory_format=out_format(x))


def _backward(gz, x, w, bias_sizes, stride, padding, mask, transposed, output_padding):
    """ATen's convolution_backward: (dx, dw, db), dx and dw in their operands' formats, an empty
    tensor for each one not in ``mask``."""
    dx, dw, db = _convolution_backward(gz, x, w, bias_sizes, stride, padding, _ONES, transposed, output_padding, 1,
                                       [mask[0], mask[1], mask[2]])
    dx = dx.contiguous(memory_format=out_format(x)) if mask[0] else x.new_empty((0,))
    dw = dw.contiguous(memory_format=out_format(w)) if mask[1] else w.new_empty((0,))
    return dx, dw, db if mask[2] else gz.new_empty((0,))


def conv_grads(gz, x, w, stride, padding, mask, transposed=False, output_padding=_ZEROS):
    """(dx, dw) of ATen's convolution for the output gradient gz; an empty tensor where not in mask."""
    dx, dw, _ = _backward(gz, x, w, None, stride, padding, (mask[0], mask[1], False), transposed, output_padding)
    return dx, dw


def conv_grads_bias(gz, x, w, stride, padding, mask):
    """(dx, dw, db) of ATen's convolution with a bias (groups 1, not transposed): ``mask[2]`` asks
    for db = sum(gz) over (N, H, W), which convolution_backward computes as eager's own backward
    does (no separate reduction op around it); an empty tensor where not in mask."""
    return _backward(gz, x, w, [gz.shape[1]], stride, padding, mask, False, _ZEROS)


def grads_by_reference(fn, tensors, needs, grad):
    """Gradients of ``fn(*tensors)`` with create_graph=True, for second derivatives."""
    wanted = [t for t, n in zip(tensors, needs) if n and t is not None]
    with torch.enable_grad():
        out = fn(*tensors)
        got = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
    return [next(got) if (n and t is not None) else None for t, n in zip(tensors, needs)]


def bias_grad(db, bias):
    """db as autograd wants it: with C_in = 0, ATen's convolution returns an output with 0
    channels (not the broadcast bias), so grad.sum over it has 0 entries; eager's bias gradient
    is then zeros of the bias's shape."""
    if db is not None and bias is not None and db.shape != bias.shape:
        return torch.zeros_like(bias)
    return db


# The lean routes' compile gate, written out in each public function as
#     not (dynamo_compiling() or torch.compiler._is_compiling_flag)
# which is torch.compiler.is_compiling() (outside TorchScript, which never reaches these functions)
# at a third of its cost (~100 ns less a call under load, at tiny shapes part of what is compared
# with eager): dynamo folds is_dynamo_compiling() to True while it traces, so the flag is neither
# read nor guarded on there, and export's non-strict tracing sets the flag.
dynamo_compiling = torch.compiler.is_dynamo_compiling


def _to_dispatcher(*args):
    return NotImplemented


def fast_entry(name: str):
    """``ganengine._C.<name>``, a lean route's Python fast entry (csrc/cpu/conv_py.cpp: y, None where
    it declines, NotImplemented for the dispatcher op), or, in an extension built without it, a
    stand-in sending every call to the dispatcher op. Asked only where _dispatch.lean_op found the
    entry's dispatcher op."""
    return getattr(_ext._C, name, None) or _to_dispatcher
