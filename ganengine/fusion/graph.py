"""Graph-level fusion: patterns written as calls in ``forward`` (BigGAN's
``self.activation(self.bn1(h, y))``), found by tracing the forward with torch.fx.

One module at a time: ``forward`` is traced with every child module as a leaf (the children have
already been through the module rules), in training and in eval mode. Where a child that can
take a fused activation (a norm or conv on the fused ops: see ``head``) has exactly one user and
that user is ReLU / LeakyReLU (a module, ``F.relu``, ``F.leaky_relu``, ``torch.relu``,
``x.relu()``, in place or not: the activation then overwrites a temporary only it reads), the
pair becomes one call ``act_forward(self.<child>, activation, slope, *inputs)``. The module keeps
its object, class (a ``Fused<Class>`` subclass), children, keys, Parameters and methods; only its
forward is the rewritten graph's code.

Plain attributes the trace reads (``self.alpha``, ``if self.use_act:``, a slope, ``self.opt.x``,
a child's plain attribute) are frozen into the graph by fx; the trace records them (``TraceLog``:
while traced, the classes of the module, its submodules and the options objects they read carry a
recording ``__getattribute__`` that notes the traced instances' reads from the tracing thread; no
instance changes class) and the rewritten forward
compares them per call with their values at trace time (``guard_ok``: one tuple compare); on a
difference that call runs the class's own forward. Tensors the module holds (plain tensor
attributes, buffers, Parameters) are handed to the traced code as get_attr proxies (read per call;
Python control flow on them raises, so it is declined) and only their type is compared
(``type:`` / ``param:`` / ``buffer:`` guard names: a tensor set to None runs the own forward).

Declined, with the reason in ``report.not_traced`` (the children keep their module rules):
forwards fx cannot trace (data-dependent control flow, iterating a tensor, modules called that
are not children), forwards whose graph differs between training and eval mode, and forwards
whose Python fx would not record faithfully: ``with`` blocks (``torch.no_grad()`` is not
recorded), ``is None`` tests or ``isinstance`` on arguments (decided once, at trace time),
assignments to attributes of the module or its submodules (seen in the source, with the
method's own first parameter, and while traced: run once at trace time, undone after it), method
calls on non-module attributes, activation checkpointing / saved-tensor hooks and autograd
Functions (fx keeps the ops inside and drops the recomputation or the custom backward), reads of
attribute values the guard cannot compare, decorated forwards, type tests on the module's tensors
(the proxy would answer), and draws from a host RNG (``random``, ``numpy.random``, a numpy
Generator, ``secrets``: in the source, or Python's / numpy's global state moving while traced) or
from torch's RNG on real values at trace time (the outcome would be frozen into the graph).
"""
from __future__ import annotations

import ast
import enum
import importlib
import inspect
import linecache
import os
import keyword
import sys
import threading
import types

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ganengine.fusion import checks
from ganengine.fusion.copying import FusedModule, retype
from ganengine.fusion.mixins import conv_apply
from ganengine.fusion.report import FuseReport


# ----------------------------------------------------------------------------- heads
def head_kind(m: nn.Module) -> str | None:
    """The family of a child that can run ``act(child(*inputs))`` as one fused call."""
    from ganengine.fusion.mixins import BatchNormLikeMixin, ConditionalBatchNormMixin, ConvMixin, ConvTransposeMixin
    from ganengine.nn import Conv2d, Conv3x3, InstanceNormAct2d
    from ganengine.nn.batch_norm_act import BATCH_NORM_ACT_CLASSES

    if isinstance(m, ConvTransposeMixin):
        return None
    if isinstance(m, ConvMixin):
        return "conv2d" if m._ganengine_slope is None else None
    if isinstance(m, ConditionalBatchNormMixin):
        return "conditional_batch_norm" if m._ganengine_activation == "none" else None
    if isinstance(m, BatchNormLikeMixin):
        return "batch_norm" if m._ganengine_activation == "none" else None
    if type(m) in BATCH_NORM_ACT_CLASSES:
        return "batch_norm" if m.activation == "none" else None
    if type(m) is InstanceNormAct2d:
        return "instance_norm" if m.activation == "none" else None
    if type(m) in (Conv2d, Conv3x3):
        return "conv2d"
    return None


_ACT_KINDS: tuple = ()


def _act_kinds() -> tuple:
    """(Conv2d, Conv3x3, InstanceNormAct2d, BATCH_NORM_ACT_CLASSES), imported once
    (ganengine.nn imports this package; an import statement per call cost ~1 us each)."""
    global _ACT_KINDS
    if not _ACT_KINDS:
        from ganengine.nn import Conv2d, Conv3x3, InstanceNormAct2d
        from ganengine.nn.batch_norm_act import BATCH_NORM_ACT_CLASSES

        _ACT_KINDS = (Conv2d, Conv3x3, InstanceNormAct2d, BATCH_NORM_ACT_CLASSES)
    return _ACT_KINDS


def act_forward(m: nn.Module, activation: str, negative_slope: float, *inputs):
    """``act(m(*inputs))`` on one fused op (what the rewritten graphs call)."""
    Conv2d, Conv3x3, InstanceNormAct2d, bn_classes = _ACT_KINDS or _act_kinds()
    kind = type(m)
    if checks.hooked(m):  # hooks registered since fuse() (it declined hooked modules): they see the call
        y = m(*inputs)
        return F.relu(y) if activation == "relu" else F.leaky_relu(y, negative_slope)
    if isinstance(m, FusedModule) and head_kind(m):
        return m._ganengine_act_forward(activation, negative_slope, *inputs)
    if kind is InstanceNormAct2d and m.activation == "none" and len(inputs) == 1:
        return m._norm_call(inputs[0], activation, negative_slope)  # forward() with another activation
    if kind in bn_classes and m.activation == "none" and len(inputs) == 1:
        return m._bn_call(inputs[0], activation, negative_slope)  # forward() with another activation
    if kind in (Conv2d, Conv3x3) and len(inputs) == 1:
        return conv_apply(m, inputs[0], m.weight, 0.0 if activation == "relu" else float(negative_slope))
    # the child was swapped after fuse(): run it and the activation as they are
    y = m(*inputs)
    return F.relu(y) if activation == "relu" else F.leaky_relu(y, negative_slope)


# ----------------------------------------------------------------------------- activations
_RELU_FNS = {F.relu, torch.relu, torch.relu_, getattr(F, "relu_", None)} - {None}
_LEAKY_FNS = {F.leaky_relu, getattr(F, "leaky_relu_", None), getattr(torch._C._nn, "leaky_relu", None),
              getattr(torch._C._nn, "leaky_relu_", None)} - {None}


def _activation(node: fx.Node, head: fx.Node, root: nn.Module):
    """(activation, slope, module or None) when ``node`` applies ReLU / LeakyReLU(>= 0) to ``head``."""
    if not node.args or node.args[0] is not head:
        return None
    rest = list(node.args[1:])
    kwargs = dict(node.kwargs)
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        if rest or kwargs:
            return None
        if type(mod) is nn.ReLU:
            return "relu", 0.0, mod
        if type(mod) is nn.LeakyReLU and mod.negative_slope >= 0:
            return "leaky_relu", float(mod.negative_slope), mod
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_") and not rest and not kwargs:
        return "relu", 0.0, None
    if node.op != "call_function":
        return None
    kwargs.pop("inplace", None)
    if node.target in _RELU_FNS:
        if len(rest) > 1 or kwargs or (rest and not isinstance(rest[0], bool)):
            return None
        return "relu", 0.0, None
    if node.target in _LEAKY_FNS:
        slope = kwargs.pop("negative_slope", rest.pop(0) if rest else 0.01)
        if rest and isinstance(rest[0], bool):
            rest.pop(0)
        if rest or kwargs or isinstance(slope, bool) or not isinstance(slope, (int, float)) or slope < 0:
            return None
        return ("relu", 0.0, None) if slope == 0 else ("leaky_relu", float(slope), None)
    return None


# ----------------------------------------------------------------------------- source checks
# functions whose effect fx does not record: it traces through them and keeps only the ops inside
# (activation checkpointing: no recomputation in backward, running statistics updated once)
_UNRECORDED_FNS = {"checkpoint", "checkpoint_sequential"}


def _unrecorded_call(node: ast.Call, fn_globals: dict) -> str | None:
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr in _UNRECORDED_FNS:
        return func.attr
    if isinstance(func, ast.Name):
        target = fn_globals.get(func.id)
        mod = getattr(target, "__module__", "") or ""
        if func.id in _UNRECORDED_FNS or (mod.startswith("torch.utils.checkpoint")
                                          and getattr(target, "__name__", "") in _UNRECORDED_FNS):
            return func.id
    return None


# host random number generators: a draw in forward runs once, at trace time, and its outcome (the
# branch taken, the number) is frozen into the graph; the graph would never draw again
_HOST_RNG_MODULES = ("random", "secrets")


def _host_rng(obj) -> bool:
    """Whether ``obj`` (a module, function or object a forward's source names) is or belongs to a
    host RNG: Python's ``random`` / ``secrets``, ``numpy.random`` (its functions, ``RandomState``,
    ``Generator``, bit generators), a ``random.Random`` instance or its bound methods, ``os.urandom``."""
    import random as _random

    if isinstance(obj, types.ModuleType):
        name = obj.__name__
        return name in _HOST_RNG_MODULES or name == "numpy.random" or name.startswith("numpy.random.")
    owner = getattr(obj, "__self__", None)
    if owner is not None and not isinstance(owner, types.ModuleType) and owner is not obj and _host_rng(owner):
        return True
    if isinstance(obj, _random.Random) or obj is os.urandom:
        return True
    mod = getattr(obj, "__module__", None)
    if not isinstance(mod, str):
        mod = getattr(type(obj), "__module__", "") or ""
    return mod in _HOST_RNG_MODULES or mod == "numpy.random" or mod.startswith("numpy.random.")


def _host_rng_call(node: ast.Call, fn_globals: dict) -> str | None:
    """The dotted name of a host RNG that the call ``node`` reaches through names of the function's
    globals (``random.random()``, ``np.random.rand()``, ``rng.normal()`` on a global numpy
    Generator, ``randint()`` imported from random), else None."""
    import builtins

    chain, cur = [], node.func
    while isinstance(cur, ast.Attribute):
        chain.append(cur.attr)
        cur = cur.value
    if not isinstance(cur, ast.Name):
        return None
    chain.append(cur.id)
    chain.reverse()
    if cur.id in fn_globals:
        obj = fn_globals[cur.id]
    elif hasattr(builtins, cur.id):
        obj = getattr(builtins, cur.id)
    else:
        return None
    for i, part in enumerate(chain):
        if i:
            try:
                obj = inspect.getattr_static(obj, part) if not isinstance(obj, types.ModuleType) \
                    else getattr(obj, part)
            except AttributeError:
                return None
        try:
            if _host_rng(obj):
                return ".".join(chain)
        except Exception:   # an object whose attributes raise: not an RNG we know
            return None
    return None


def source_reason(m: nn.Module) -> str | None:
    """Why fx would not record ``m.forward`` faithfully (None when it would)."""
    cls = type(m)
    tensor_attrs = set(m._parameters) | set(m._buffers) | {k for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)}
    for name, tree in checks.self_calls(cls, "forward")[1]:
        where = f"{cls.__name__}.{name}"
        if tree is None:
            return f"cannot read the source of {where}"
        if tree.decorator_list:
            return f"{where} is decorated"
        me = checks.self_name(tree)
        args = {a.arg for a in tree.args.args[1:] + tree.args.kwonlyargs}
        if tree.args.vararg:
            args.add(tree.args.vararg.arg)
        fn_globals = getattr(getattr(cls, name, None), "__globals__", {})
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                ck = _unrecorded_call(node, fn_globals)
                if ck:
                    return (f"{where} calls {ck}() (fx would trace through it and drop the checkpoint: "
                            "no recomputation in backward)")
                rng = _host_rng_call(node, fn_globals)
                if rng:
                    return (f"{where} calls {rng}(), a host random number generator (drawn once at trace time: "
                            "the outcome would be frozen into the graph)")
                if (isinstance(node.func, ast.Name) and node.func.id in ("type", "isinstance")
                        and node.func.id not in fn_globals
                        and any(isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == me
                                and n.attr in tensor_attrs for a in node.args[:1] for n in ast.walk(a))):
                    return (f"{where} calls {node.func.id}() on a tensor attribute of the module (fx traces it as a "
                            "proxy: decided once at trace time)")
            if isinstance(node, (ast.With, ast.AsyncWith)):
                return f"{where} has a `with` block (fx does not record grad-mode or autocast changes)"
            if isinstance(node, (ast.Global, ast.Nonlocal, ast.Yield, ast.YieldFrom, ast.Try)):
                return f"{where} uses {type(node).__name__.lower()} (not traceable faithfully)"
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
                names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                if names & args:
                    return f"{where} tests an argument with `is` (decided once at trace time)"
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("isinstance", "type", "callable", "hasattr", "len")
                    and any(isinstance(n, ast.Name) and n.id in args for a in node.args for n in ast.walk(a))):
                return f"{where} calls {node.func.id}() on an argument (decided once at trace time)"
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == me:
                        return f"{where} assigns {me}.{n.attr} (would run once, at trace time)"
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Attribute) and isinstance(node.func.value.value, ast.Name)
                    and node.func.value.value.id == me):
                owner = node.func.value.attr
                if owner not in m._modules and owner not in tensor_attrs and node.func.attr != "forward":
                    return f"{where} calls {me}.{owner}.{node.func.attr}() (would run once, at trace time)"
    return None


# ----------------------------------------------------------------------------- tracing
class _Unfaithful(Exception):
    """Raised from inside a trace that would not record the forward faithfully (the message says why)."""


class _LeafTracer(fx.Tracer):
    # registered buffers become get_attr proxies, as Parameters do (fx's default hands the forward the
    # real tensor: `if self.flag:` / `.item()` on a buffer would be decided once, at trace time)
    proxy_buffer_attributes = True

    def __init__(self):
        super().__init__()
        self.unfaithful: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        if node.op == "get_attr":
            return _TensorAttrProxy(node, self)
        return super().proxy(node)


_FX_DIR = os.path.join(os.path.dirname(torch.__file__), "fx") + os.sep


class _TensorAttrProxy(fx.Proxy):
    """The proxy of a tensor the module holds (a Parameter, a buffer, a plain tensor attribute). Code
    outside torch that asks its type (``isinstance(self.style, torch.Tensor)``, ``torch.is_tensor``)
    would get the proxy's answer, not the tensor's, once, at trace time: the trace is declined."""

    @property
    def __class__(self):
        f = sys._getframe(1)
        # torch's own helpers (torch.is_tensor, Parameter's __instancecheck__) ask for their caller
        while f is not None and f.f_code.co_filename.startswith(_TORCH_DIR) \
                and not f.f_code.co_filename.startswith(_FX_DIR):
            f = f.f_back
        fn = f.f_code.co_filename if f is not None else _FX_DIR
        if fn.startswith(_FX_DIR) or fn.startswith(_FUSION_DIR):
            return type(self)
        tracer = self.tracer
        why = (f"its forward tests the type of self.{self.node.target} (isinstance / is_tensor on a tensor that fx "
               "traces as a proxy: decided once at trace time)")
        if isinstance(tracer, _LeafTracer):
            tracer.unfaithful = tracer.unfaithful or why
        raise _Unfaithful(why)


# ----------------------------------------------------------------------------- what a trace reads
# fx runs forward's Python once: a plain attribute it reads (``self.alpha``, ``if self.use_act:``,
# ``F.leaky_relu(h, self.slope)``, ``self.conv.out_channels``) is frozen into the graph as a
# constant or as the branch taken. The trace records every such read (instance attributes of the
# module and of its submodules, read from code outside torch), and every write; the rewritten
# forward checks per call that the values read are unchanged (one tuple compare) and otherwise
# runs the module's own forward (see GraphForwardMixin).
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FUSION_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_UNWATCHED = frozenset({"training"})   # both modes are traced and must give the same graph
_MISSING = object()


class TraceLog:
    def __init__(self):
        self.reads: dict[str, tuple[object, str]] = {}   # dotted path from the traced module -> (owner, name)
        self.writes: dict[str, tuple[object, str, object]] = {}  # path -> (owner, name, value before)
        self.unrecorded: str | None = None
        self.watched: set[int] = set()   # ids of the plain (config) objects whose own reads are recorded
        self.whole: set[int] = set()     # ... of those whose __dict__ itself was read (vars(opt)): compared whole


def _user_frame() -> bool:
    fn = sys._getframe(2).f_code.co_filename
    return not (fn.startswith(_TORCH_DIR) or fn.startswith(_FUSION_DIR))


# While a trace runs, the classes of the traced modules (and of the config objects their forwards
# read) carry recording __getattribute__ / __setattr__ / __delattr__; the instances keep their class
# (a forward testing ``type(self.act) is nn.LeakyReLU`` sees the real one) and no subclass is made.
# The hooks record only for the instances of a trace running in the calling thread; a class is
# patched once however many traces (threads) use it, and restored when the last one ends.
_LOCK = threading.RLock()
_ACTIVE: dict[int, "_Watch"] = {}          # thread id -> the watch of the trace that thread runs
_HOOKED: dict[type, list] = {}             # class -> [users, {hook name: the class's own value or _MISSING}]
_HOOK_NAMES = ("__getattribute__", "__setattr__", "__delattr__")


class _Watch:
    def __init__(self, log: TraceLog):
        self.log = log
        self.ids: dict[int, str] = {}       # id of a watched object -> its path prefix ("", "conv.", "opt.")
        self.keep: list = []                # the watched objects (their ids stay theirs)
        self.classes: list[type] = []
        self.tracer: _LeafTracer | None = None
        self.proxies: dict[str, fx.Proxy] = {}   # path -> the get_attr proxy of a plain tensor attribute

    def tensor_proxy(self, path: str) -> fx.Proxy:
        """A plain tensor attribute read by the traced code: a get_attr node, read per call (fx would hand
        the forward the real tensor, and `if self.use_skip:`, `is None`, `.item()` on it would be
        decided once, at trace time)."""
        p = self.proxies.get(path)
        if p is None:
            p = self.proxies[path] = self.tracer.create_proxy("get_attr", path, (), {})
        return p

    def add(self, obj, prefix: str) -> bool:
        if id(obj) in self.ids:
            return True
        cls = type(obj)
        if cls not in self.classes:
            try:
                _hook(cls)
            except (TypeError, AttributeError):   # a class whose attributes cannot be set (builtin / extension)
                return False
            self.classes.append(cls)
        self.ids[id(obj)] = prefix
        self.keep.append(obj)
        return True

    def read(self, obj, prefix: str, name: str, value):
        path = prefix + name
        if path in self.log.reads:
            return
        self.log.reads[path] = (obj, name)
        if _config_object(value) and prefix.count(".") < 8 and self.add(value, path + "."):
            self.log.watched.add(id(value))

    def close(self):
        for cls in reversed(self.classes):
            _unhook(cls)
        self.classes.clear()


def _config_object(v) -> bool:
    """A plain object whose fields a forward may read (SPADE's ``opt``): not a module, tensor,
    function, scalar or container, and whose attributes are read the ordinary way (no
    ``__getattr__`` / ``__getattribute__`` of its own class: fields served from elsewhere would
    not be seen as read)."""
    cls = type(v)
    return (hasattr(v, "__dict__") and not isinstance(v, (nn.Module, torch.Tensor, type, types.ModuleType, enum.Enum))
            and not callable(v) and cls.__getattribute__ is object.__getattribute__
            and getattr(cls, "__getattr__", None) is None)


def _make_hooks(cls: type, own: dict):
    get_own, set_own, del_own = (own[n] for n in _HOOK_NAMES)
    get_ident = threading.get_ident

    def __getattribute__(self, name):
        w = _ACTIVE.get(get_ident())
        if w is not None:
            prefix = w.ids.get(id(self))
            if prefix is not None and name not in _UNWATCHED and _user_frame():
                d = object.__getattribute__(self, "__dict__")
                if name in d:
                    value = d[name]
                    w.read(self, prefix, name, value)
                    if isinstance(value, torch.Tensor) and w.tracer is not None and prefix.count(".") < 8:
                        return w.tensor_proxy(prefix + name)
                elif name == "__dict__":      # vars(opt), opt.__dict__[...]: its fields are read unseen
                    w.log.whole.add(id(self))
                elif name in (d.get("_parameters") or ()) or name in (d.get("_buffers") or ()):
                    # a Parameter / buffer slot (fx proxies its tensor; a None is a Python value): its
                    # type is watched (`if self.bias is not None:` decided at trace time)
                    w.read(self, prefix, name, None)
        if get_own is not _MISSING:
            return get_own(self, name)
        return super(cls, self).__getattribute__(name)

    def _note_write(self, name):
        w = _ACTIVE.get(get_ident())
        if w is not None:
            prefix = w.ids.get(id(self))
            if prefix is not None and _user_frame_at(3):
                d = object.__getattribute__(self, "__dict__")
                w.log.writes.setdefault(prefix + name, (self, name, d.get(name, _MISSING)))

    def __setattr__(self, name, value):
        _note_write(self, name)
        if set_own is not _MISSING:
            return set_own(self, name, value)
        return super(cls, self).__setattr__(name, value)

    def __delattr__(self, name):
        _note_write(self, name)
        if del_own is not _MISSING:
            return del_own(self, name)
        return super(cls, self).__delattr__(name)

    return {"__getattribute__": __getattribute__, "__setattr__": __setattr__, "__delattr__": __delattr__}


def _user_frame_at(depth: int) -> bool:
    fn = sys._getframe(depth).f_code.co_filename
    return not (fn.startswith(_TORCH_DIR) or fn.startswith(_FUSION_DIR))


def _hook(cls: type):
    with _LOCK:
        entry = _HOOKED.get(cls)
        if entry is not None:
            entry[0] += 1
            return
        own = {n: cls.__dict__.get(n, _MISSING) for n in _HOOK_NAMES}
        hooks = _make_hooks(cls, own)
        done = []
        try:
            for n in _HOOK_NAMES:
                type.__setattr__(cls, n, hooks[n])
                done.append(n)
        except BaseException:
            _restore(cls, own, done)
            raise
        _HOOKED[cls] = [1, own]


def _restore(cls: type, own: dict, names):
    for n in reversed(list(names)):
        if own[n] is _MISSING:
            type.__delattr__(cls, n)
        else:
            type.__setattr__(cls, n, own[n])


def _unhook(cls: type):
    with _LOCK:
        entry = _HOOKED[cls]
        entry[0] -= 1
        if entry[0] == 0:
            del _HOOKED[cls]
            _restore(cls, entry[1], _HOOK_NAMES)


# saved-tensor hooks and autograd Functions while a trace runs: patched once for all traces
# (threads), restored when the last ends; a call is noted in the log of the trace running in the
# calling thread only
_UNRECORDED_LOGS: dict[int, list] = {}     # thread id -> logs of the traces it runs (innermost last)
_UNRECORDED_STATE: dict = {"depth": 0, "saved": None}


def _note_unrecorded(why: str):
    logs = _UNRECORDED_LOGS.get(threading.get_ident())
    if logs:
        log = logs[-1]
        log.unrecorded = log.unrecorded or why


class _Unrecorded:
    """While tracing: notes calls fx cannot record (saved-tensor hooks: activation checkpointing,
    offloading; autograd.Function.apply: a custom backward) instead of letting them vanish."""

    def __init__(self, log: TraceLog):
        self.log = log

    def __enter__(self):
        from torch.autograd import graph as ag
        from torch.autograd.function import Function

        with _LOCK:
            _UNRECORDED_LOGS.setdefault(threading.get_ident(), []).append(self.log)
            if _UNRECORDED_STATE["depth"] == 0:
                saved = [(ag.saved_tensors_hooks, "__enter__", ag.saved_tensors_hooks.__dict__["__enter__"]),
                         (Function, "apply", Function.__dict__["apply"])]
                enter = ag.saved_tensors_hooks.__enter__
                apply = Function.apply.__func__ if hasattr(Function.apply, "__func__") else None

                def hooks_enter(hooks_self):
                    _note_unrecorded("it installs saved-tensor hooks (activation checkpointing or offloading), "
                                     "which fx does not record")
                    return enter(hooks_self)

                def fn_apply(cls, *args, **kwargs):
                    _note_unrecorded(f"it calls the autograd Function {cls.__name__} (fx would record its "
                                     "forward ops without its backward)")
                    return apply(cls, *args, **kwargs) if apply else super(Function, cls).apply(*args, **kwargs)

                ag.saved_tensors_hooks.__enter__ = hooks_enter
                Function.apply = classmethod(fn_apply)
                _UNRECORDED_STATE["saved"] = saved
            _UNRECORDED_STATE["depth"] += 1
        return self

    def __exit__(self, *exc):
        with _LOCK:
            logs = _UNRECORDED_LOGS.get(threading.get_ident(), [])
            for i in range(len(logs) - 1, -1, -1):
                if logs[i] is self.log:
                    del logs[i]
                    break
            if not logs:
                _UNRECORDED_LOGS.pop(threading.get_ident(), None)
            _UNRECORDED_STATE["depth"] -= 1
            if _UNRECORDED_STATE["depth"] == 0:
                for owner, name, value in _UNRECORDED_STATE["saved"]:
                    setattr(owner, name, value)
                _UNRECORDED_STATE["saved"] = None
        return False


_MODULE_DICTS = ("_modules", "_buffers", "_parameters")


def rng_states() -> list:
    """The global host random streams a forward may draw from at trace time (Python's ``random``,
    numpy's global ``RandomState`` when numpy is loaded): (name, get, set, state) each, to compare
    after the trace (``_rng_moved``) and for fuse() to put back when it ends
    (``restore_rng_states``), as torch.random.fork_rng does torch's. (Not put back after each
    trace: another thread may have drawn meanwhile. A draw from another thread during the trace
    makes the forward declined: conservative.)"""
    import random

    states = [("Python's random", random.getstate, random.setstate, random.getstate())]
    np = sys.modules.get("numpy")
    if np is not None and hasattr(np, "random"):
        states.append(("numpy.random", np.random.get_state, np.random.set_state, np.random.get_state()))
    return states


def restore_rng_states(states: list) -> None:
    for _, _, put, state in states:
        put(state)


def _same_state(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    if type(a).__module__ == "numpy":
        np = sys.modules["numpy"]
        return type(b) is type(a) and bool(np.array_equal(a, b))
    return a == b


def _rng_moved(states: list) -> str | None:
    """The name of the first stream that moved since ``rng_states()``."""
    for name, get, _, before in states:
        if not _same_state(get(), before):
            return name
    return None


# torch's random ops: called on traced values they are graph nodes (a draw per call); called at trace
# time on real values (`if torch.rand(1) < self.p:`, torchvision's RandomHorizontalFlip written into a
# forward) they draw once and the outcome is frozen into the graph
_TORCH_RANDOM = frozenset({
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli", "bernoulli_",
    "multinomial", "normal", "normal_", "poisson", "uniform_", "random_", "exponential_", "geometric_", "cauchy_",
    "log_normal_", "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "alpha_dropout_",
    "feature_dropout", "feature_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_", "rrelu", "rrelu_",
    "gumbel_softmax", "binomial", "_standard_gamma", "_sample_dirichlet"})


def _has_proxy(args, kwargs) -> bool:
    from torch.utils._pytree import tree_leaves

    return any(isinstance(v, fx.Proxy) for v in tree_leaves((args, kwargs)))


class _TraceTimeDraws(TorchFunctionMode):
    """While tracing (this thread only: modes are per thread): notes a torch random op run on real
    values, which draws at trace time instead of becoming a node of the graph."""

    def __init__(self):
        super().__init__()
        self.drawn: str | None = None

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.drawn is None and getattr(func, "__name__", "") in _TORCH_RANDOM and not _has_proxy(args, kwargs):
            self.drawn = f"torch's {func.__name__}"
        return func(*args, **kwargs)


# fx's tracer patches nn.Module.__call__ (and other globals) process-wide while it runs: two traces
# at once in two threads restore each other's patches out of order and leave one in place, which
# breaks every later trace in the process. Traces run one at a time.
_TRACE_LOCK = threading.RLock()


def _trace(m: nn.Module, training: bool, log: TraceLog | None = None) -> fx.Graph:
    with _TRACE_LOCK:
        return _trace_locked(m, training, log)


def _trace_locked(m: nn.Module, training: bool, log: TraceLog | None) -> fx.Graph:
    subs = list(m.modules())
    flags = [(sub, sub.training) for sub in subs]
    # what nn.Module.__setattr__ routes to _modules / _buffers / _parameters (a write while traced)
    dicts = [(sub, {k: dict(sub.__dict__[k]) for k in _MODULE_DICTS if type(sub.__dict__.get(k)) is dict},
              set(sub.__dict__.get("_non_persistent_buffers_set", ()))) for sub in subs]
    watch = None
    me = threading.get_ident()
    before = None
    rng = rng_states()
    draws = _TraceTimeDraws()
    tracer = _LeafTracer()
    try:
        m.train(training)
        if log is None:
            with draws:
                graph = tracer.trace(m)
        else:
            watch = _Watch(log)
            watch.tracer = tracer
            for where, sub in m.named_modules():
                if not watch.add(sub, f"{where}." if where else ""):
                    log.unrecorded = log.unrecorded or f"cannot watch what the trace reads of {type(sub).__name__}"
            before = _ACTIVE.get(me)
            _ACTIVE[me] = watch
            with _Unrecorded(log), draws:
                graph = tracer.trace(m)
        if tracer.unfaithful:   # (raised inside the trace, where the forward's own code may have caught it)
            raise _Unfaithful(tracer.unfaithful)
        return graph
    finally:
        moved = _rng_moved(rng) or draws.drawn
        if watch is not None:
            if before is None:
                _ACTIVE.pop(me, None)
            else:
                _ACTIVE[me] = before
            watch.close()
        if log is not None:   # undo what forward wrote while traced (it is declined anyway)
            for sub, name, value in reversed(list(log.writes.values())):
                d = object.__getattribute__(sub, "__dict__")
                if value is _MISSING:
                    d.pop(name, None)
                else:
                    d[name] = value
            for sub, saved, nonpersistent in dicts:
                for k, v in saved.items():
                    d = sub.__dict__.get(k)
                    if type(d) is dict:
                        if list(d) != list(v) or any(d[k2] is not x for k2, x in v.items()):
                            d.clear()
                            d.update(v)
                    else:
                        sub.__dict__[k] = v
                npb = sub.__dict__.get("_non_persistent_buffers_set")
                if isinstance(npb, set) and npb != nonpersistent:
                    npb.clear()
                    npb.update(nonpersistent)
        for sub, mode in flags:
            sub.training = mode
        if moved:
            # raised from `finally`, after the clean-up: a draw at trace time is frozen into the graph
            # whatever else happened
            raise _Unfaithful(f"its forward draws from {moved} while traced (the draw would run once, at trace "
                              "time, and its outcome be frozen into the graph)")


_SCALARS = (bool, int, float, complex, str, bytes, type(None), type(Ellipsis), torch.dtype, torch.device,
            torch.memory_format, torch.layout, enum.Enum)


def _by_identity(v) -> bool:
    """Modules and functions: compared by identity (a new one is a change; their insides are code,
    parameters and buffers, which the graph reads per call)."""
    return isinstance(v, nn.Module) or _callable_value(v)


def _watchable(v, depth: int = 0) -> bool:
    """Values the guard can compare: scalars (by value), modules and functions (by identity), and
    lists / tuples / dicts / sets of them (element by element)."""
    if isinstance(v, _SCALARS) or _by_identity(v):
        return True
    if depth < 4 and type(v) in (list, tuple, set, frozenset):
        return all(_watchable(x, depth + 1) for x in v)
    if depth < 4 and type(v) is dict:
        return all(_watchable(k, depth + 1) and _watchable(x, depth + 1) for k, x in v.items())
    return False


def _snapshot(v):
    """A copy of the containers of ``v`` holding the same leaves (never a module's copy)."""
    if type(v) in (list, tuple, set, frozenset):
        return type(v)(_snapshot(x) for x in v)
    if type(v) is dict:
        return {k: _snapshot(x) for k, x in v.items()}
    return v


class _Same:
    """Compares equal to ``obj`` only (a callable whose class defines another ``==``)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return other is self.obj

    __hash__ = None


def _callable_value(v) -> bool:
    return isinstance(v, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type,
                          types.BuiltinMethodType)) or type(v).__name__ in ("partial", "method-wrapper") \
        or (callable(v) and not hasattr(v, "__dict__"))


def watch_spec(log: TraceLog):
    """``(names, expected, numeric)`` for the guard, or a reason the reads cannot be watched."""
    names, expected, numeric = [], [], []
    for path in sorted(log.reads):
        owner, name = log.reads[path]
        value = owner.__dict__.get(name, _MISSING)
        slot = value is _MISSING and isinstance(owner, nn.Module) and (
            name in owner.__dict__.get("_parameters", ()) or name in owner.__dict__.get("_buffers", ()))
        if value is _MISSING and not slot:
            continue
        if slot or isinstance(value, torch.Tensor):
            # a tensor the graph reads per call (a get_attr node: its values, shape, dtype are read by the
            # ops), or a Parameter / buffer slot holding None: its type is compared (a tensor set to None
            # later, or None to a tensor, would make the graph's `is None` branch and ops wrong)
            # (a slot's guard reads the module dicts by key, `convs.0.bias` included; a plain attribute's
            # is `m.<path>`, which needs identifiers)
            if not slot and not all(part.isidentifier() and not keyword.iskeyword(part) for part in path.split(".")):
                return f"its forward reads the attribute {path!r}, whose name is not an identifier or is a Python keyword"
            if slot:
                kind = _PARAM_OF if name in owner.__dict__["_parameters"] else _BUFFER_OF
                value = owner.__dict__["_parameters" if kind == _PARAM_OF else "_buffers"][name]
            else:
                kind = _TYPE_OF
            names.append(kind + path)
            expected.append(type(value))
            continue
        if isinstance(value, (int, float, complex)) and not isinstance(value, bool):
            numeric.append(len(expected))          # 1, 1.0 and True are ==, not the same in arithmetic
        if isinstance(value, _SCALARS):
            item = value
        elif _by_identity(value) or (id(value) in log.watched and id(value) not in log.whole):
            # a config object whose fields' reads were recorded as their own paths ("opt.use_act"):
            # its identity here, the fields read next to it
            item = value if type(value).__eq__ is object.__eq__ else _Same(value)
        elif _watchable(value):
            item = _snapshot(value)
        elif hasattr(value, "__dict__") and not callable(value) and _watchable(dict(vars(value))):
            # (the object's field dict, compared as a dict: plain Python that torch.compile traces,
            # where a SimpleNamespace's own C-level == is not)
            path, item = f"{path}.__dict__", _snapshot(dict(vars(value)))
        else:
            return (f"its forward reads {path}, a {type(value).__name__} that fx would freeze into the graph "
                    "and whose changes fuse cannot watch")
        if not all(part.isidentifier() and not keyword.iskeyword(part) for part in path.split(".")):
            return f"its forward reads the attribute {path!r}, whose name is not an identifier or is a Python keyword"
        names.append(path)
        expected.append(item)
    return tuple(names), tuple(expected), tuple(numeric)


# guard names for tensors: "type:style" -> type(m.style) (a plain tensor attribute); "param:conv.gain" /
# "buffer:conv.mean" -> the type of what the Parameter / buffer slot holds (a tensor or None), read from
# the slot dicts (nn.Module.__getattr__ costs ~1.5 us a call: it runs after a failed lookup)
_TYPE_OF, _PARAM_OF, _BUFFER_OF = "type:", "param:", "buffer:"


def _guard_item(n: str) -> str:
    for kind, slots in ((_PARAM_OF, "_parameters"), (_BUFFER_OF, "_buffers")):
        if n.startswith(kind):
            *mods, name = n[len(kind):].split(".")
            owner = "m" + "".join(f"._modules.get({part!r})" for part in mods)
            return f"type({owner}.{slots}.get({name!r})), "
    if n.startswith(_TYPE_OF):
        return f"type(m.{n[len(_TYPE_OF):]}), "
    return f"m.{n}, "


def guard_getter(names: tuple):
    """``m -> (m.a, m.conv.out_channels, type(m.style), ...)``: plain Python (torch.compile traces it;
    about as fast as operator.attrgetter), or None when nothing is watched."""
    if not names:
        return None
    src = f"def get(m):\n    return ({''.join(_guard_item(n) for n in names)})\n"
    scope: dict = {}
    exec(compile(src, "<ganengine fused forward guard>", "exec"), scope)
    return scope["get"]


def guard_ok(m: nn.Module, d: dict) -> bool:
    """Whether what the trace read is unchanged (the rewritten graph is still the forward)."""
    try:
        now = d["_ganengine_guard_get"](m)
    except AttributeError:
        return False
    expected = d["_ganengine_guard_expected"]
    if now != expected:
        return False
    for i in d["_ganengine_guard_numeric"]:
        if type(now[i]) is not type(expected[i]):
            return False
    return True


def _resolvable(m: nn.Module, graph: fx.Graph) -> str | None:
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            try:
                obj = m
                for part in node.target.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                return f"its graph refers to {node.target!r}, which is not an attribute of the module"
    return None


def _compile(src: str, globals_: dict, key: str):
    filename = f"<ganengine fused forward {key}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    scope = dict(globals_)
    exec(compile(src, filename, "exec"), scope)
    return scope["forward"]


class GraphForwardMixin(FusedModule):
    """A module whose forward is its own forward traced and rewritten (see module doc)."""

    fused_name = "fused: traced forward"

    def forward(self, *args, **kwargs):
        d = self.__dict__
        if d["_ganengine_guard_get"] is None or guard_ok(self, d):
            return d["_ganengine_graph_fn"](self, *args, **kwargs)
        # an attribute the trace read (and fx froze) has changed since fuse(): the module's own forward
        return type(self).__ganengine_base__.forward(self, *args, **kwargs)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_ganengine_graph_fn", None)
        state.pop("_ganengine_guard_get", None)
        state["_ganengine_graph_globals"] = {k: _ref(v) for k, v in state["_ganengine_graph_globals"].items()}
        return state

    def __setstate__(self, state):
        state = dict(state)
        state["_ganengine_graph_globals"] = {k: _deref(v) for k, v in state["_ganengine_graph_globals"].items()}
        nn.Module.__setstate__(self, state)
        names = state.get("_ganengine_guard_names", ())
        object.__setattr__(self, "_ganengine_guard_get", guard_getter(names))
        object.__setattr__(self, "_ganengine_graph_fn",
                           _compile(state["_ganengine_graph_src"], state["_ganengine_graph_globals"], type(self).__name__))


class _ModuleRef(tuple):
    pass


def _ref(v):
    return _ModuleRef((v.__name__,)) if isinstance(v, types.ModuleType) else v


def _deref(v):
    return importlib.import_module(v[0]) if isinstance(v, _ModuleRef) else v


def rewrite(m: nn.Module, path: str, report: FuseReport) -> nn.Module | None:
    """The module with its traced forward rewritten, or None (nothing to fuse, or not traced)."""
    if not any(head_kind(c) for c in m.children()):
        return None
    why = source_reason(m)
    log = TraceLog()
    if why is None:
        try:
            graph = _trace(m, True, log)
            if graph.python_code("self").src != _trace(m, False, log).python_code("self").src:
                why = "its traced forward differs between training and eval mode"
        except _Unfaithful as exc:
            why = str(exc)
        except Exception as exc:  # TraceError, NameError (a module not installed as a child), ...
            msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            why = f"torch.fx could not trace it ({type(exc).__name__}: {msg})"
    if why is None and log.writes:
        why = f"its forward (or a function it calls) assigns self.{next(iter(log.writes))} (would run once, at trace time)"
    if why is None and log.unrecorded:
        why = log.unrecorded
    spec = watch_spec(log) if why is None else None
    if isinstance(spec, str):
        why = spec
    if why is None:
        why = _resolvable(m, graph)
    if why is not None:
        report.not_traced.append((path, why))
        return None
    fused = []
    for node in list(graph.nodes):
        if node.op != "call_module" or node.kwargs:
            continue
        child = m.get_submodule(node.target)
        kind = head_kind(child)
        users = list(node.users)
        if kind is None or len(users) != 1:
            continue
        act = _activation(users[0], node, m)
        if act is None:
            continue
        activation, slope, act_mod = act
        rule = f"graph:{kind}+act"
        where = f"{path}.{node.target}" if path else node.target
        bad = checks.hooks_reason(child) or (checks.hooks_reason(act_mod) if act_mod is not None else None)
        if bad:
            report.decline(rule, where, bad)
            continue
        with graph.inserting_before(node):
            holder = graph.get_attr(node.target)
            call = graph.call_function(act_forward, (holder, activation, slope, *node.args))
        users[0].replace_all_uses_with(call)
        graph.erase_node(users[0])
        graph.erase_node(node)
        fused.append((rule, where))
    fused += _upsample_convs(m, graph, path, report)
    if not fused:
        return None
    graph.lint()
    code = graph.python_code("self")
    names, expected, numeric = spec
    new = retype(m, GraphForwardMixin, _ganengine_graph_src=code.src, _ganengine_graph_globals=dict(code.globals),
                 _ganengine_guard_names=names, _ganengine_guard_expected=expected, _ganengine_guard_numeric=numeric,
                 _ganengine_guard_get=guard_getter(names))
    object.__setattr__(new, "_ganengine_graph_fn", _compile(code.src, code.globals, type(new).__name__))
    for rule, where in fused:
        report.add(rule, where)
    report.traced.append(path)
    return new



# ----------------------------------------------------------------------------- upsample -> conv
_INTERP = inspect.signature(F.interpolate)
# which of the two rewrites run ("conv1x1", "conv3x3"): benchmarks/bench_fuse.py --ablate leaves one out
UPSAMPLE_RULES = {"conv1x1", "conv3x3"}


def _nearest_scale(node: fx.Node, m: nn.Module):
    """(input node, interpolate's keyword arguments, scales) when ``node`` is a nearest upsampling
    by scale factors >= 1 (``F.interpolate`` or an ``nn.Upsample`` child without hooks), else None."""
    if node.op == "call_function" and node.target is F.interpolate:
        try:
            bound = _INTERP.bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        a = bound.arguments
        kwargs = {k: v for k, v in a.items() if k != "input"}
        src, size, scale, mode, antialias = a["input"], a["size"], a["scale_factor"], a["mode"], a["antialias"]
        if a["align_corners"] is not None:   # an error for "nearest": keep the call that raises it
            return None
    elif node.op == "call_module" and type(m.get_submodule(node.target)) is nn.Upsample and len(node.args) == 1 \
            and not node.kwargs:
        up = m.get_submodule(node.target)
        if checks.hook_kinds(up) or up.align_corners is not None:
            return None
        src, size, scale, mode, antialias = node.args[0], up.size, up.scale_factor, up.mode, False
        kwargs = {"size": None, "scale_factor": scale, "mode": mode, "align_corners": up.align_corners,
                            "recompute_scale_factor": getattr(up, "recompute_scale_factor", None)}
    else:
        return None
    if not isinstance(src, fx.Node) or size is not None or mode != "nearest" or antialias is not False:
        return None
    scales = tuple(scale) if isinstance(scale, (tuple, list)) else (scale, scale)
    if len(scales) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 for v in scales):
        return None
    return src, kwargs, scales


def _plain_conv_child(c: nn.Module) -> bool:
    """A conv whose forward is exactly conv2d(x, <its weight>, bias, stride, padding) with no
    hook or activation: nn.Conv2d, ganengine's Conv2d / Conv3x3, a fused conv of fuse()'s own."""
    from ganengine.fusion.mixins import ConvMixin, ConvTransposeMixin
    from ganengine.nn import Conv2d, Conv3x3

    if checks.hook_kinds(c) or checks.patched_forward(c) or isinstance(c, ConvTransposeMixin):
        return False
    if isinstance(c, ConvMixin):
        return c._ganengine_slope is None
    return type(c) in (nn.Conv2d, Conv2d, Conv3x3)


def _upsample_conv_kind(c: nn.Module, scales) -> str | None:
    pad = c.padding
    if isinstance(pad, str) or tuple(c.stride) != (1, 1):
        return None
    if tuple(c.kernel_size) == (1, 1) and tuple(pad) == (0, 0):
        return "conv1x1"
    if (tuple(c.kernel_size) == (3, 3) and tuple(pad) == (1, 1) and tuple(c.dilation) == (1, 1) and c.groups == 1
            and c.padding_mode == "zeros" and all(float(v) == 2.0 for v in scales)):
        return "conv3x3"
    return None


def _upsample_convs(m: nn.Module, graph: fx.Graph, path: str, report: FuseReport) -> list:
    """``conv(upsample(x))`` -> one call of ganengine/fusion/upsample.py: a 1x1 conv runs before
    the upsample (they commute), a 3x3 conv after a 2x upsample runs in the sub-pixel form where
    that pays (decided per call). Only where the upsampled map has no other reader."""
    from ganengine.fusion import upsample

    done = []
    for node in list(graph.nodes):
        spec = _nearest_scale(node, m)
        if spec is None or len(node.users) != 1:
            continue
        conv_node = next(iter(node.users))
        if conv_node.op != "call_module" or conv_node.args != (node,) or conv_node.kwargs:
            continue
        child = m.get_submodule(conv_node.target)
        if not isinstance(child, nn.Conv2d) or not _plain_conv_child(child):
            continue
        kind = _upsample_conv_kind(child, spec[2])
        if kind not in UPSAMPLE_RULES:
            continue
        fn = upsample.upsample_conv1x1 if kind == "conv1x1" else upsample.upsample_conv3x3
        src, kwargs, scales = spec
        # F.interpolate's own scale list for 4-D nearest, unless it recomputes them per call
        fast = None if kwargs.get("recompute_scale_factor") else tuple(float(v) for v in scales)
        with graph.inserting_before(conv_node):
            holder = graph.get_attr(conv_node.target)
            call = graph.call_function(fn, (holder, src, fast, kwargs))
        conv_node.replace_all_uses_with(call)
        graph.erase_node(conv_node)
        graph.erase_node(node)
        where = f"{path}.{conv_node.target}" if path else conv_node.target
        done.append((f"graph:upsample+{kind}", where))
    return done
