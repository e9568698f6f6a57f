"""Copying module trees without copying their tensors, and giving a module a fused forward.

``structural_copy(model)``: a new tree of module objects (each module copied once, so modules
shared by several parents stay shared) whose containers (``_modules``, ``_parameters``,
``_buffers``, the hook dicts) are new dicts holding the SAME Parameter, buffer and hook
objects. ``fuse(model)`` (not in place) rewrites that copy: the caller's model keeps its own
tree, and an optimiser built on ``model.parameters()`` before ``fuse()`` trains the fused model,
because they are the same Parameters. (``copy.deepcopy`` with a memo would do the same for
parameters but also copies every other attribute, and fails on non-leaf tensor attributes such
as the ``weight`` that ``torch.nn.utils.spectral_norm`` keeps.) A torch.compile'd module is not
copied (shared as it is; fuse() declines it); a torch.fx GraphModule's copy compiles its own
copy of the graph.

``retype(module, Mixin, **attrs)``: a module of class ``Fused<Base>`` (a subclass of ``Mixin`` and
of the module's own class, made once per pair and cached) with the same ``__dict__``
contents: the same Parameters, buffers, children and hooks, every method and attribute of the
original, ``isinstance(m, Base)`` still true; only ``forward`` (the mixin's) differs. The
mixin's forward computes the same function on the fused ops. Pickling and ``copy.deepcopy``
work: the class is rebuilt from ``(Mixin, Base)``, so ``Base`` must be importable, as it must
be to pickle the original.
"""
from __future__ import annotations

import copy

from torch import fx, nn

try:  # (private: how torch keeps a hook bound to its module weakly; absent, there is nothing to rebind)
    from torch.nn.modules.module import _WrappedHook
except ImportError:  # pragma: no cover
    _WrappedHook = None

from ganengine.fusion import checks

# the container attributes every nn.Module has (hooks, parameters, ...): copied, not shared
_CONTAINERS = frozenset(nn.Module().__dict__) - {"training"}


def _copy_dict(d: dict) -> dict:
    out = {}
    for key, value in d.items():
        if key in _CONTAINERS and isinstance(value, (dict, set)):
            value = type(value)(value)
        out[key] = value
    return out


def _rebind_hooks(new: nn.Module, old: nn.Module) -> None:
    """Hooks torch stored bound to ``old`` (``register_load_state_dict_pre_hook`` keeps a weak
    reference to its module: ``_WrappedHook``) are bound to ``new`` in ``new``'s copied dicts: else
    they would act on ``old``, and raise once it is gone ("the hook of a dead Module")."""
    if _WrappedHook is None:
        return
    for key in _CONTAINERS:
        hooks = new.__dict__.get(key)
        if not isinstance(hooks, dict):
            continue
        for k, h in list(hooks.items()):
            if isinstance(h, _WrappedHook) and h.with_module and h.module() is old:
                hooks[k] = _WrappedHook(h.hook, new)


def clone(module: nn.Module) -> nn.Module:
    """A new module object of the same class, with copied containers holding the same objects."""
    new = type(module).__new__(type(module))
    new.__dict__.update(_copy_dict(module.__dict__))
    _rebind_hooks(new, module)
    if isinstance(module, fx.GraphModule):
        _own_graph(new, module)
    return new


def _own_graph(new: fx.GraphModule, old: fx.GraphModule) -> None:
    """GraphModule.__new__ makes a fresh class per instance, and its forward is generated onto that
    class by recompile(): the copy's new class has none until the copy compiles its own graph (a
    copy of the graph, owned by the copy: the graph's setter recompiles; the nodes name children
    and attributes, which resolve on the copy's own tree)."""
    try:
        new.graph = copy.deepcopy(old.graph)
    except Exception:   # a graph that cannot be copied: the copy compiles the shared one
        new.recompile()


def structural_copy(root: nn.Module) -> nn.Module:
    memo: dict[int, nn.Module] = {}

    def visit(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        if checks.compiled(m):
            # not copied (its forward stays bound to the module it compiled, so a copy would run
            # the original) and not walked into: fuse() declines it, the copy shares it as it is
            memo[id(m)] = m
            return m
        new = clone(m)
        memo[id(m)] = new
        # through __dict__: a class's own __setattr__ may send the name elsewhere
        # (torch.compile's OptimizedModule sets unknown names on the user's module)
        new.__dict__["_modules"] = {name: (visit(c) if c is not None else None) for name, c in m._modules.items()}
        return new

    out = visit(root)
    # plain attributes that hold modules of the tree (``self.norms = [self.norm]``): the copy's point
    # at the copy's modules, as copy.deepcopy's would (train() / eval() reach those)
    for new in memo.values():
        for key, value in list(new.__dict__.items()):
            if key not in _CONTAINERS:
                remapped = _remap_modules(value, memo)
                if remapped is not value:
                    new.__dict__[key] = remapped
    return out


def _remap_modules(value, memo: dict):
    """``value`` with the modules of ``memo`` (by id) replaced by their copies, in a list / tuple /
    dict (one level: what models keep their aliases in), or ``value`` itself if it holds none."""
    if isinstance(value, nn.Module):
        return memo.get(id(value), value)
    if type(value) in (list, tuple):
        items = [memo.get(id(v), v) if isinstance(v, nn.Module) else v for v in value]
        return type(value)(items) if any(a is not b for a, b in zip(items, value)) else value
    if type(value) is dict:
        items = {k: memo.get(id(v), v) if isinstance(v, nn.Module) else v for k, v in value.items()}
        return items if any(items[k] is not value[k] for k in value) else value
    return value


def aliased_modules(root: nn.Module) -> dict[int, str]:
    """id -> where, for the modules of ``root``'s tree that a plain attribute also holds (a module,
    or one in a list / tuple / dict attribute: ``self.norms = [self.norm]``): code calling them
    through that attribute would not see a replacement put in the tree."""
    tree = {id(m) for m in root.modules()}
    out: dict[int, str] = {}
    for name, m in root.named_modules():
        for key, value in m.__dict__.items():
            if key in _CONTAINERS:
                continue
            if isinstance(value, nn.Module):
                held = [value]
            elif type(value) in (list, tuple):
                held = [v for v in value if isinstance(v, nn.Module)]
            elif type(value) is dict:
                held = [v for v in value.values() if isinstance(v, nn.Module)]
            else:
                continue
            for v in held:
                if id(v) in tree:
                    out.setdefault(id(v), f"{name + '.' if name else ''}{key}")
    return out


# ----------------------------------------------------------------------------- fused classes
class FusedModule:
    """Base of every mixin that ``retype`` puts in front of a module's own class."""

    # set on each generated class
    __ganengine_mixin__: type
    __ganengine_base__: type
    fused_name = "fused"   # shown in repr

    def __reduce_ex__(self, protocol):
        return (_rebuild, (type(self).__ganengine_mixin__, type(self).__ganengine_base__), self.__getstate__())

    def __getstate__(self):
        return dict(self.__dict__)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, {self.fused_name}" if base else self.fused_name


_CLASSES: dict[tuple[type, type], type] = {}
# what a class body holds of its own that is not the class's behaviour
_CLASS_HOUSEKEEPING = frozenset({"__module__", "__qualname__", "__dict__", "__weakref__", "__doc__"})


def _parametrized_original(base: type) -> type | None:
    """The class torch.nn.utils.parametrize put a ``Parametrized<Name>`` class over (it holds the
    parametrized tensors' properties, and ``remove_parametrizations`` deletes them from the module's
    own class, then sets the module's class back to that class's first base), or None."""
    bases = base.__bases__
    if len(bases) == 1 and base.__name__ == f"Parametrized{bases[0].__name__}" and "__getstate__" in base.__dict__:
        return bases[0]
    return None


def fused_class(mixin: type, base: type) -> type:
    original = _parametrized_original(base)
    if original is not None:
        # the parametrization's layer kept on top, as torch builds it: Parametrized over the fused
        # class of the original (so remove_parametrizations finds the properties in the module's own
        # class and leaves a fused conv of the original class). One class per call, as torch makes
        # one per module: remove_parametrizations deletes from it (a shared one would break every
        # other module of that class, e.g. a second fuse() of the same model)
        inner = fused_class(mixin, original)
        name = f"Parametrized{inner.__name__}"
        body = {k: v for k, v in base.__dict__.items() if k not in _CLASS_HOUSEKEEPING}
        body.update({"__module__": base.__module__, "__qualname__": name, "__ganengine_mixin__": mixin,
                     "__ganengine_base__": base})
        return type(name, (inner,), body)
    key = (mixin, base)
    cls = _CLASSES.get(key)
    if cls is None:
        name = f"Fused{base.__name__}"
        cls = type(name, (mixin, base), {"__module__": base.__module__, "__qualname__": name,
                                         "__ganengine_mixin__": mixin, "__ganengine_base__": base})
        _CLASSES[key] = cls
    return cls


def _rebuild(mixin: type, base: type):
    cls = fused_class(mixin, base)
    return cls.__new__(cls)


def retype(module: nn.Module, mixin: type, **attrs) -> nn.Module:
    base = type(module)
    if isinstance(module, FusedModule):
        base = type(module).__ganengine_base__
    cls = fused_class(mixin, base)
    new = cls.__new__(cls)
    new.__dict__.update(_copy_dict(module.__dict__))
    _rebind_hooks(new, module)
    for key, value in attrs.items():
        object.__setattr__(new, key, value)
    return new


def base_class(module: nn.Module) -> type:
    """The module's own class (the user's), under a fused mixin if it has one."""
    return type(module).__ganengine_base__ if isinstance(module, FusedModule) else type(module)
