"""The eager route of the Python custom ops: the same forward body and backward in an autograd.Function.

A ``torch.library.custom_op`` with ``register_autograd`` costs host time on every call that eager's
own ops do not pay: the Python custom-op layer on the way in, and a second custom op (the backward)
on the way back. At a tiny shape on the CPU (instance_norm_act 1x4x4x4, one thread, the same C++
kernels either way, the CPU lean entry off) a forward+backward took 107 us through the custom op
against 66 us through the twin, eager 66 us; a fused CycleGAN step on the CUDA route 107 -> 90 ms
(``TRITON_INTERPRET=1 python benchmarks/bench_cuda_path_host.py [--models]``). At GAN batch sizes
a GPU step is host-bound, and every fused op on the CUDA path (Triton launchers or the CUDA C++
kernels, which have no C++ autograd entry there) went through its custom op.

So a plain eager call runs ``twin(...)``: an autograd.Function whose forward is the custom op's
undecorated body, with the op's own ``setup_context`` and a backward that calls the backward body
directly. The custom op stays what everything that traces sees: torch.compile, torch.export,
make_fx / FakeTensorMode / functionalization, torch.jit.trace (ganengine.export), tensor subclasses
and ``torch.library.opcheck``; ``plain_eager`` tells the two apart. The
numbers are the same either way: one body, one backward.
"""
from __future__ import annotations

import functools

import torch

from ganengine.ops._conv_common import dynamo_compiling

_jit_tracing = torch._C._is_tracing
_get_dispatch_mode = torch._C._get_dispatch_mode
# the dispatch modes that trace (their tensors have no data, or the call must become a graph node);
# a mode that only watches (the CUDA-path kernel counter ganengine.bench.traffic.EagerTraffic,
# FlopCounterMode) and torch function modes (``with torch.device(...)``) see the eager route, which
# is what runs without them
_TRACING_MODES = (torch._C._TorchDispatchModeKey.PROXY, torch._C._TorchDispatchModeKey.FAKE,
                  torch._C._TorchDispatchModeKey.FUNCTIONAL)


def plain_eager(*tensors) -> bool:
    """True for a call the eager route may serve: plain Tensors (no subclass, FakeTensor included),
    not compiling, exporting or jit-tracing, no tracing dispatch mode (make_fx, FakeTensorMode,
    functionalization)."""
    for t in tensors:
        if t is not None and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return False
    if dynamo_compiling() or torch.compiler._is_compiling_flag or _jit_tracing():
        return False
    for key in _TRACING_MODES:
        if _get_dispatch_mode(key) is not None:
            return False
    return True


_any_autocast = torch._C._is_any_autocast_enabled


def run_without_autocast(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with autocast off (both device types: plain ``with`` statements,
    which Dynamo traces; an ExitStack of them broke torch.compile's graph). A backward called
    inside an autocast region (the engine runs it on the caller's thread, autocast's state with
    it) must not have its ops cast again (CPU autocast runs reflection_pad2d in fp32: the conv3x3
    backward's re-padded bf16 input came out fp32 beside a bf16 weight); eager's own backward
    kernels run below autocast."""
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        return fn(*args, **kwargs)


def autocast_off(fn):
    """``fn`` running with autocast off: a composition that picks its own dtypes (the torch
    backends' fp32 accumulation of half inputs), which autocast would cast back (``torch.bmm``
    to bf16 under CPU autocast). A custom op's body sees the caller's autocast state."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if _any_autocast():
            return run_without_autocast(fn, *args, **kwargs)
        return fn(*args, **kwargs)
    return wrapped


def without_autocast(run):
    """A Function backward ``run(ctx, *grads)`` that runs with autocast off (run_without_autocast);
    ``run`` itself if it already does."""
    if getattr(run, "_autocast_off", False):
        return run

    def backward(ctx, *grads):
        if _any_autocast():
            return run_without_autocast(run, ctx, *grads)
        return run(ctx, *grads)
    backward._autocast_off = True
    return backward


def backward_via(backward, bwd):
    """An op's backward as autograd calls it, ``(ctx, *grads)``: ``backward(ctx, grads[0], bwd)``,
    with ``bwd`` the backward custom op (for the registration: what tracing sees) or its body (for
    the twin), with autocast off. Only the first output is differentiable (the others are
    statistics or buffers the public functions never hand out), so the other gradients are dropped."""
    def run(ctx, grad, *_other_grads):
        return backward(ctx, grad, bwd)
    return without_autocast(run)


def twin(name: str, forward, setup_context, backward):
    """``Function.apply`` of an autograd.Function running ``forward(*inputs)`` with the custom op's
    ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` (which must call the
    backward body, not the backward custom op, to keep the saving). The forward takes ``ctx``
    itself and calls ``setup_context``: a Function that defines ``setup_context`` binds every
    call's arguments with ``inspect.signature`` (about 12 us a call).

    ``name``: the custom op's qualified name ("ganengine::<op>"). It becomes the Function's class
    name, which the profiler records for the forward (as it recorded the custom op) and, with
    "Backward" appended, for the backward node, so profiles (``ganengine profile``, which groups
    events by the "ganengine::" prefix) read as before, at no cost per call."""
    if not name.startswith("ganengine::"):
        raise ValueError(f"twin: name must be the custom op's qualified name 'ganengine::<op>', got {name!r}")
    def fwd(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    cls = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(fwd),
        "backward": staticmethod(without_autocast(backward)),
        "__doc__": f"eager twin of a ganengine custom op ({name})",
    })
    function_apply = cls.apply

    def apply(*inputs):
        # a call that records no graph (no_grad, inference, frozen weights) runs the body alone:
        # Function.apply costs ~10 us even then
        if records_graph(inputs):
            return function_apply(*inputs)
        return forward(*inputs)

    apply.__name__ = apply.__qualname__ = name
    return apply


def records_graph(tensors, forward_ad: bool = True) -> bool:
    """Whether a call on ``tensors`` (other arguments are skipped) records an autograd graph: grad
    mode on and a tensor requiring grad, or (``forward_ad``) forward-mode AD active: the Functions
    have no jvp and refuse it, as the custom ops do; a caller whose graph-free path is plain torch
    ops, which carry dual tensors, passes False. Where it is False an autograd.Function would only
    hand back its forward's outputs, for ~10 us of host time. Only plain tensors and Parameters
    count: a tensor subclass (FunctionalTensor under make_fx / AOT) takes the callers' graph-free
    route, whose ops (torch's, or a custom op's) record their own autograd."""
    return (grad_enabled() and any(type(t) in _TENSOR_TYPES and t.requires_grad for t in tensors)) \
        or (forward_ad and _forward_ad_level() >= 0)


grad_enabled = torch.is_grad_enabled
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def lean_ok(t) -> bool:
    """Whether a lean C++ entry (or router) may take tensor ``t``: a plain one, or a subclass of
    concrete sizes (the entries hand it to their dispatcher op, which honours __torch_function__);
    not make_fx's symbolic FakeTensors, whose sizes the entries' checks cannot read."""
    return type(t) in _TENSOR_TYPES or (isinstance(t, torch.Tensor)
                                        and not any(type(s) is torch.SymInt for s in t.shape))


def _forward_ad_level() -> int:
    return torch.autograd.forward_ad._current_level
