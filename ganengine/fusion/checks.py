"""The questions ``fuse`` asks before it touches a module: hooks, forwards, how a parent uses it.

Everything here answers conservatively: when in doubt, the caller declines and says why.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch
from torch import nn

# Forward pre-hooks that only (re)compute a weight attribute from parameters before forward:
# torch.nn.utils.spectral_norm / weight_norm. A module that keeps them keeps its meaning when
# its forward is replaced by one that reads the same attribute.
_WEIGHT_PREHOOKS: tuple[type, ...] = ()
try:
    from torch.nn.utils.spectral_norm import SpectralNorm as _HookSN
    _WEIGHT_PREHOOKS += (_HookSN,)
except ImportError:  # pragma: no cover
    pass
try:
    from torch.nn.utils.weight_norm import WeightNorm as _HookWN
    _WEIGHT_PREHOOKS += (_HookWN,)
except ImportError:  # pragma: no cover
    pass


_module = nn.modules.module


def any_global_hooks() -> bool:
    """Hooks registered for every module (checked per call by the fused forwards: cheap)."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or getattr(_module, "_global_backward_pre_hooks", None))


def hooked(m: nn.Module) -> bool:
    """Whether a call of ``m`` is seen by a hook (its own, or every module's): the fused forwards
    then run it as a module."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None)) or any_global_hooks()


def hook_kinds(m: nn.Module) -> list[str]:
    """The kinds of hooks on ``m`` that could observe or change what it computes."""
    kinds = []
    if m._forward_pre_hooks:
        kinds.append("forward pre-hook")
    if m._forward_hooks:
        kinds.append("forward hook")
    if m._backward_hooks:
        kinds.append("backward hook")
    if getattr(m, "_backward_pre_hooks", None):
        kinds.append("backward pre-hook")
    return kinds


def weight_prehooks_only(m: nn.Module) -> bool:
    """Only torch's spectral_norm / weight_norm pre-hooks (which set ``m.weight``), nothing else."""
    return (bool(m._forward_pre_hooks) and not (m._forward_hooks or m._backward_hooks
                                                 or getattr(m, "_backward_pre_hooks", None))
            and all(isinstance(h, _WEIGHT_PREHOOKS) for h in m._forward_pre_hooks.values()))


def global_hooks() -> str | None:
    """Hooks registered for every module (``nn.modules.module.register_module_forward_hook``...):
    they would see the fused modules' outputs instead of the originals'."""
    mod = nn.modules.module
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        if getattr(mod, name, None):
            return f"global module hooks are registered ({name.strip('_').replace('_', ' ')})"
    return None


def hooks_reason(m: nn.Module) -> str | None:
    kinds = hook_kinds(m)
    if not kinds:
        return None
    return f"{type(m).__name__} has a {' and a '.join(kinds)} (it would see the fused values)"


def patched_forward(m: nn.Module) -> bool:
    return "forward" in m.__dict__ or "__call__" in m.__dict__


def plain_sequential(m: nn.Module) -> bool:
    """An nn.Sequential (or subclass) that runs the standard Sequential forward."""
    cls = type(m)
    return (isinstance(m, nn.Sequential) and cls.forward is nn.Sequential.forward
            and cls.__iter__ is nn.Sequential.__iter__ and cls.__call__ is nn.Module.__call__
            and cls._call_impl is nn.Module._call_impl and not patched_forward(m))


def is_torch_class(cls: type) -> bool:
    return cls.__module__.startswith("torch.")


# ----------------------------------------------------------------------------- source (AST)
@functools.lru_cache(maxsize=None)
def function_ast(fn) -> ast.FunctionDef | None:
    """The AST of a plain Python function or method (None when its source cannot be read)."""
    fn = inspect.unwrap(fn)
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return None
    node = tree.body[0] if tree.body else None
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _methods(cls: type):
    """Every function defined in cls's own MRO (outside torch), with the class that defines it."""
    seen = set()
    for klass in cls.__mro__:
        if klass is object or is_torch_class(klass) or klass.__module__.startswith("ganengine.fusion"):
            continue
        for name, value in vars(klass).items():
            if name in seen:
                continue
            fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if isinstance(value, property):
                fn = value.fget
            if inspect.isfunction(fn):
                seen.add(name)
                yield name, fn


# methods that use a Sequential as one module (not its entries one by one)
_WHOLE_MODULE_METHODS = frozenset({
    "forward", "apply", "to", "cuda", "cpu", "half", "float", "double", "bfloat16", "type", "train", "eval",
    "parameters", "named_parameters", "buffers", "named_buffers", "state_dict", "load_state_dict",
    "requires_grad_", "zero_grad", "register_forward_hook", "register_forward_pre_hook",
    "register_full_backward_hook", "share_memory", "extra_repr"})


def _rebinds_itself(node: ast.AST, parents: dict, child_name: str) -> bool:
    """Whether ``node`` (a load of ``self.<child_name>``) lies in the value of ``self.<child_name> =
    ...``: in __init__ the attribute is then re-bound from what it held before (junyanz's
    ``self.net = nn.Sequential(*self.net)``, a list becoming the module), and the module the
    parent calls is the one assigned, with no other reference to it kept."""
    up = parents.get(node)
    while up is not None and not isinstance(up, ast.stmt):
        up = parents.get(up)
    return (isinstance(up, ast.Assign) and len(up.targets) == 1 and isinstance(up.targets[0], ast.Attribute)
            and up.targets[0].attr == child_name and isinstance(up.targets[0].value, ast.Name)
            and up.targets[0].value.id == "self")


def child_only_called(parent: nn.Module, child_name: str) -> str | None:
    """None when every use of ``self.<child_name>`` in the parent's class is a call
    (``self.name(...)``, ``self.name.forward(...)``), an assignment, or a method that treats it as
    one module (``.apply``, ``.to``, ``.parameters()``...); else why it may be used as a container
    (indexed, iterated, sliced, passed to a function), in which case rewriting the child's entries
    could change what the parent computes."""
    cls = type(parent)
    if is_torch_class(cls) or cls.__module__.startswith("ganengine.nn"):
        return None  # containers (Sequential, ModuleList, ModuleDict, ...) or our own modules
    for name, fn in _methods(cls):
        tree = function_ast(fn)
        if tree is None:
            return f"cannot read the source of {cls.__name__}.{name} to see how it uses {child_name!r}"
        parents = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == child_name
                    and isinstance(node.value, ast.Name) and node.value.id == "self"):
                if not isinstance(node.ctx, ast.Load):
                    continue  # assigned (in __init__) or deleted
                up = parents.get(node)
                if isinstance(up, ast.Call) and up.func is node:
                    continue
                if name == "__init__" and _rebinds_itself(node, parents, child_name):
                    continue
                if (isinstance(up, ast.Attribute) and up.attr in _WHOLE_MODULE_METHODS
                        and isinstance(parents.get(up), ast.Call) and parents[up].func is up):
                    continue
                return (f"{cls.__name__}.{name} uses self.{child_name} other than by calling it "
                        f"(line {getattr(node, 'lineno', '?')} of the method)")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value == child_name):
                return f"{cls.__name__}.{name} reads {child_name!r} with getattr"
    return None


def has_data(m: nn.Module) -> str | None:
    """Why ``m``'s tensors cannot be probed (meta tensors, uninitialised lazy parameters)."""
    for t in list(m.parameters()) + list(m.buffers()):
        if isinstance(t, nn.parameter.UninitializedTensorMixin):
            return "it has uninitialised (lazy) parameters"
        if t.is_meta:
            return "its tensors are on the meta device"
    return None


def first_tensor(m: nn.Module) -> torch.Tensor | None:
    for t in m.parameters():
        return t
    for t in m.buffers():
        return t
    return None
