"""The questions ``fuse`` asks before it touches a module: hooks, forwards, how a parent uses it.

Everything here answers conservatively: when in doubt, the caller declines and says why.
"""
from __future__ import annotations

import ast
import builtins
import dis
import functools
import inspect
import re
import sys
import textwrap
import types

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
    """The kinds of hooks on ``m`` that could observe or change what it computes, or what its
    ``state_dict()`` / ``load_state_dict()`` give and take (a rule's new module would not carry them)."""
    kinds = []
    if m._forward_pre_hooks:
        kinds.append("forward pre-hook")
    if m._forward_hooks:
        kinds.append("forward hook")
    if m._backward_hooks:
        kinds.append("backward hook")
    if getattr(m, "_backward_pre_hooks", None):
        kinds.append("backward pre-hook")
    return kinds + state_dict_hook_kinds(m)


# the module attributes holding state-dict hooks -> what the report calls them
_STATE_DICT_HOOKS = (("_state_dict_pre_hooks", "state_dict pre-hook"), ("_state_dict_hooks", "state_dict hook"),
                     ("_load_state_dict_pre_hooks", "load_state_dict pre-hook"),
                     ("_load_state_dict_post_hooks", "load_state_dict post-hook"))


def _spectral_norm_state_hook(hook) -> bool:
    """One of the state-dict hooks torch.nn.utils.spectral_norm registers with its weight pre-hook
    (they go with it: the rules that keep that pre-hook keep the module, and with it these)."""
    hook = getattr(hook, "hook", hook)   # load pre-hooks are stored wrapped (_WrappedHook)
    return type(hook).__module__ == "torch.nn.utils.spectral_norm"


def state_dict_hook_kinds(m: nn.Module) -> list[str]:
    """The state-dict hooks on ``m`` (besides spectral_norm's own): a module put in its place would
    drop them, changing the model's state_dict keys and what loading a checkpoint runs."""
    return [kind for attr, kind in _STATE_DICT_HOOKS
            if any(not _spectral_norm_state_hook(h) for h in (getattr(m, attr, None) or {}).values())]


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
    state = state_dict_hook_kinds(m)
    why = ("it would see the fused values" if len(state) < len(kinds) else
           f"the module put in its place would not carry {'them' if len(kinds) > 1 else 'it'}: "
           "state_dict keys or checkpoint loading would change")
    return f"{type(m).__name__} has a {' and a '.join(kinds)} ({why})"


def shared_reason(m: nn.Module, parents: dict) -> str | None:
    """Why a rule may not put a new module in place of ``m``: several parents hold it (or one parent
    in two places), so each place would get its own fused object and a mode, momentum or hook set
    through one would miss the other. None where it is held once."""
    n = parents.get(id(m), 0)
    if n <= 1:
        return None
    return f"the {type(m).__name__} is shared (held in {n} places): a fused module here would split it into two objects"


def compiled(m: nn.Module) -> bool:
    """A torch.compile'd module (``OptimizedModule``): its forward is bound to the module it compiled,
    and setting an attribute it does not have sets it on that module (the user's)."""
    return type(m).__name__ == "OptimizedModule" and "_orig_mod" in m.__dict__.get("_modules", {})


COMPILED_REASON = "a torch.compile'd module: fuse() the model first, then compile the fused one"


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
        raw = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    try:
        body = ast.parse(textwrap.dedent(raw)).body
    except SyntaxError:
        # dedent finds no common indent when a continuation line is indented otherwise (a tab
        # where the def has spaces: boschresearch/unetgan's BigGAN.py): parse it where it stands,
        # under a block header, as the file's parser saw it inside its class
        try:
            body = ast.parse("if 1:\n" + raw).body[0].body
        except SyntaxError:
            return None
    node = body[0] if body else None
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def self_name(tree: ast.FunctionDef) -> str:
    """The name a method calls its instance by (its first parameter: ``self``, ``this``, ``s``...)."""
    args = tree.args.posonlyargs + tree.args.args
    return args[0].arg if args else "self"


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


def _rebinds_itself(node: ast.AST, parents: dict, child_name: str, me: str = "self") -> bool:
    """Whether ``node`` (a load of ``self.<child_name>``) lies in the value of ``self.<child_name> =
    ...``: in __init__ the attribute is then re-bound from what it held before (junyanz's
    ``self.net = nn.Sequential(*self.net)``, a list becoming the module), and the module the
    parent calls is the one assigned, with no other reference to it kept."""
    up = parents.get(node)
    while up is not None and not isinstance(up, ast.stmt):
        up = parents.get(up)
    return (isinstance(up, ast.Assign) and len(up.targets) == 1 and isinstance(up.targets[0], ast.Attribute)
            and up.targets[0].attr == child_name and isinstance(up.targets[0].value, ast.Name)
            and up.targets[0].value.id == me)


# what walks a module's children one by one (``for block in self.children():``; ``self.__dict__["_modules"]``)
_CHILD_ITERATORS = frozenset({"children", "named_children", "modules", "named_modules", "_modules", "__dict__"})
# ... and what reaches every descendant, not only the children
_DESCENDANT_ITERATORS = frozenset({"modules", "named_modules"})


def _chain(node: ast.AST, me: str, aliases: dict | None = None) -> tuple[str, ...] | None:
    """``("a", "b")`` for the expression ``me.a.b`` (``()`` for ``me`` itself), else None. An index
    (``me.blocks[i]``) is ``"*"`` (any entry), ``getattr(me, "a")`` is ``me.a``, and a loop variable
    in ``aliases`` stands for the path it iterates (``for b in me.blocks``: ``("blocks", "*")``)."""
    names = []
    while True:
        if isinstance(node, ast.Attribute):
            names.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            names.append("*")
            node = node.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) in (2, 3) and not node.keywords and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str)):
            names.append(node.args[1].value)
            node = node.args[0]
        else:
            break
    if isinstance(node, ast.Name):
        if node.id == me:
            return tuple(reversed(names))
        if aliases and node.id in aliases:
            return aliases[node.id] + tuple(reversed(names))
    return None


def _matches(got: tuple, chain: tuple) -> bool:
    """Whether the path ``got`` (``"*"``: any entry) may be the module at ``chain``."""
    return len(got) == len(chain) and all(g in (c, "*") for g, c in zip(got, chain))


def _on_the_way(got: tuple, chain: tuple) -> bool:
    """Whether the path ``got`` may be a module holding (at some depth) the one at ``chain``."""
    return len(got) < len(chain) and all(g in (c, "*") for g, c in zip(got, chain))


def _loop_aliases(tree: ast.AST, me: str) -> dict:
    """The loop variables that stand for an entry of a path from ``me``: ``for b in me.blocks``,
    ``for i, b in enumerate(me.blocks)``, nested (``for block in blocklist``: BigGAN's
    ``self.blocks``), comprehensions: ``{"b": ("blocks", "*")}``."""
    aliases = {}
    for node in ast.walk(tree):   # (breadth first: an outer loop before the loops inside it)
        if not isinstance(node, (ast.For, ast.comprehension)):
            continue
        it, target = node.iter, node.target
        if (isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "enumerate"
                and len(it.args) == 1 and isinstance(target, ast.Tuple) and len(target.elts) == 2):
            it, target = it.args[0], target.elts[1]
        got = _chain(it, me, aliases)
        if got is not None and isinstance(target, ast.Name):
            aliases[target.id] = got + ("*",)
    return aliases


def self_calls(cls: type, start: str) -> tuple[set[str], list]:
    """``start`` and the methods of cls it calls as ``self.name(...)``, transitively (``self`` is each
    method's own first parameter, whatever its name): ``(every name reached, [(name, ast or None)
    for those that are Python functions defined outside torch])``."""
    seen, todo, found = set(), [start], []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        fn = getattr(cls, name, None)
        if not inspect.isfunction(fn) or (fn.__module__ or "").startswith("torch."):
            continue
        tree = function_ast(fn)
        found.append((name, tree))
        if tree is None:
            continue
        me = self_name(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == me):
                todo.append(node.func.attr)
    return seen, found


def _init_methods(cls: type) -> set[str]:
    """__init__ and the methods it calls on ``self`` (transitively): they run before fuse()."""
    return self_calls(cls, "__init__")[0]


def _module_callers() -> tuple:
    """torch functions that only call the module passed as their first argument, with that
    parameter's name: handing the module over counts as a call of it.

    * ``torch.nn.parallel.data_parallel(self.main, x, device_ids)`` (pytorch/examples' DCGAN) runs
      ``self.main`` on replicas sharing its parameters and buffers: a fused Sequential replicates
      (its modules hold only parameters, buffers and plain values) and runs the same;
    * ``torch.utils.checkpoint.checkpoint(self.main, x, ...)`` runs it, then runs it again in
      backward (both ``use_reentrant`` modes). The fused modules are, like the eager ones, functions
      of their inputs and state with the same effects per call (batch norm running statistics
      updated on each run, twice in all as eager), and they choose their kernels from shapes,
      dtypes and devices, never by timing, so the recomputation saves the same tensors as the
      first run (checkpoint's determinism check)."""
    found = []
    try:
        from torch.nn.parallel.data_parallel import data_parallel
        found.append((data_parallel, "module"))
    except ImportError:  # pragma: no cover  (a torch without it, or a stand-in)
        pass
    try:
        from torch.utils.checkpoint import checkpoint
        found.append((checkpoint, "function"))
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)


_MODULE_CALLERS = _module_callers()


def global_value(names: tuple[str, ...], fn_globals: dict):
    """The object ``a.b.c`` names, ``names`` being ``("a", "b", "c")`` and ``a`` a global of the
    function (``_NOT_SET`` when it cannot be known without running code: an attribute of anything
    but a module, a missing name). Modules' ``__dict__`` is read, never ``getattr`` (a module's
    ``__getattr__`` could import or compute)."""
    obj = fn_globals.get(names[0], _NOT_SET)
    for name in names[1:]:
        if not isinstance(obj, types.ModuleType):
            return _NOT_SET
        obj = vars(obj).get(name, _NOT_SET)
    return obj


def module_parameter(obj) -> str | None:
    """The name of the module parameter when ``obj`` is one of the torch functions that only call
    the module they are given (``_MODULE_CALLERS``); None otherwise."""
    return next((param for f, param in _MODULE_CALLERS if obj is f), None)


@functools.lru_cache(maxsize=None)
def _bound_names(tree: ast.AST) -> frozenset:
    """Every name the method binds anywhere in it, nested code included (assignments, loop and
    comprehension targets, parameters of inner functions and lambdas, imports, definitions)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not tree:
            names.add(node.name)
    return frozenset(names)


def _ast_callee(func: ast.AST, fn, tree: ast.AST) -> object:
    """The object a call's ``func`` expression names when it is a global of ``fn`` or an attribute
    path through modules from one (``nn.parallel.data_parallel``); ``_NOT_SET`` otherwise (a name
    the method binds anywhere, ``tree`` its AST, or a closure variable: its value is not known
    before the call)."""
    names = []
    while isinstance(func, ast.Attribute):
        names.append(func.attr)
        func = func.value
    code = getattr(fn, "__code__", None)
    if not isinstance(func, ast.Name) or code is None:
        return _NOT_SET
    if func.id in _bound_names(tree) or func.id in code.co_freevars or func.id in code.co_cellvars:
        return _NOT_SET
    return global_value((func.id,) + tuple(reversed(names)), getattr(fn, "__globals__", {}))


def _handed_to_module_caller(node: ast.AST, parents: dict, fn, tree: ast.AST) -> bool:
    """``data_parallel(self.main, x, ...)`` (or ``module=self.main``; ``checkpoint(self.main, x)``):
    ``node`` is the module argument of a call to a torch function that only calls it."""
    up, keyword = parents.get(node), None
    if isinstance(up, ast.keyword):
        up, keyword = parents.get(up), up.arg
    elif not (isinstance(up, ast.Call) and up.args[:1] == [node]):
        return False
    if not isinstance(up, ast.Call):
        return False
    param = module_parameter(_ast_callee(up.func, fn, tree))
    return param is not None and keyword in (None, param)


def _only_called(node: ast.AST, parents: dict, tree: ast.AST, fn=None) -> bool:
    """Whether the value of ``node`` is only called: ``node(...)``, ``node.forward(...)``, a whole-module
    method, or assigned to a local name that is itself only called (pix2pixHD's
    ``model = getattr(self, 'model' + str(n)); model(x)``), or handed to a torch function that only
    calls it (``nn.parallel.data_parallel(self.main, x, ids)``, resolved through ``fn``'s globals)."""
    up = parents.get(node)
    if isinstance(up, ast.Call) and up.func is node or isinstance(up, ast.Expr):
        return True   # (called, or a value dropped: `self.model.train(mode)` as a statement)
    if _handed_to_module_caller(node, parents, fn, tree):
        return True
    if (isinstance(up, ast.Attribute) and up.attr in _WHOLE_MODULE_METHODS
            and isinstance(parents.get(up), ast.Call) and parents[up].func is up):
        # (`self.model.train()` returns the module itself: what is done with it counts too)
        return up.attr not in _RETURNS_SELF or _only_called(parents[up], parents, tree, fn)
    if isinstance(up, ast.FormattedValue) and up.value is node:
        return True   # (its repr in an f-string: it reads no entry's output)
    if (isinstance(up, ast.Call) and isinstance(up.func, ast.Name) and up.func.id in _TESTS
            and up.args and up.args[0] is node and node not in up.args[1:] and not up.keywords):
        return True   # (`isinstance(self.model, nn.Sequential)`: a test of the one module)
    if (isinstance(up, ast.Assign) and up.value is node and len(up.targets) == 1
            and isinstance(up.targets[0], ast.Name)):
        var = up.targets[0].id
        loads = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == var and isinstance(n.ctx, ast.Load)]
        return all(isinstance(parents.get(n), ast.Call) and parents[n].func is n
                   or _handed_to_module_caller(n, parents, fn, tree) for n in loads)
    return False


# what a loop may do with each module it yields without reading a Sequential's entries one by one
_ITEM_TESTS = frozenset({"isinstance", "type", "hasattr", "id"})
_ITEM_DESCENDS = _CHILD_ITERATORS | {"forward", "__call__", "__getitem__", "__iter__", "__len__"}


def _item_use_ok(n: ast.Name, parents: dict, may_call: bool) -> bool:
    """Whether this use of a loop's module keeps it one module: tested (``isinstance(m, nn.BatchNorm2d)``,
    ``type(m)``), a whole-module method (``m.eval()``, ``m.apply(fn)``, ``m.requires_grad_(False)``,
    ``m.register_forward_hook(h)``), the receiver of an attribute read or write (``m.momentum = 0.0``,
    ``m.weight``); and, where ``may_call`` (the loop yields children, each a whole module), called.
    Indexing, iterating, collecting (passing it on, storing it) or, over every descendant, calling
    it with tensors reads a Sequential's entries one by one."""
    up = parents.get(n)
    if isinstance(up, ast.Call):
        if up.func is n:
            return may_call
        return (isinstance(up.func, ast.Name) and up.func.id in _ITEM_TESTS and len(up.args) >= 1
                and up.args[0] is n and n not in up.args[1:])
    if isinstance(up, ast.Attribute) and up.value is n:
        if up.attr in _ITEM_DESCENDS:
            return may_call and up.attr == "forward" and isinstance(parents.get(up), ast.Call) \
                and parents[up].func is up
        return True
    return False


def _loop_items_only_called(attr: ast.Attribute, parents: dict, tree: ast.AST, entries: bool = False) -> bool:
    """``for sub in self.children(): sub(x)`` (SPADE's discriminator), ``for m in self.modules(): if
    isinstance(m, nn.BatchNorm2d): m.eval()`` (a freeze-BN helper): the iteration uses each module it
    yields as one module (``named_children()``: ``for name, sub in ...``; see ``_item_use_ok``)."""
    call = parents.get(attr)
    loop = parents.get(call)
    if not (isinstance(call, ast.Call) and call.func is attr and isinstance(loop, ast.For) and loop.iter is call):
        return False
    target = loop.target
    if attr.attr.startswith("named_") and isinstance(target, ast.Tuple) and len(target.elts) == 2:
        target = target.elts[1]
    if not isinstance(target, ast.Name):
        return False
    may_call = not entries and attr.attr not in _DESCENDANT_ITERATORS   # (``entries``: the Sequential's own)
    loads = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == target.id and isinstance(n.ctx, ast.Load)]
    return all(_item_use_ok(n, parents, may_call) for n in loads)


@functools.lru_cache(maxsize=None)
def _tree_paths(tree: ast.FunctionDef, me: str) -> tuple[dict, list]:
    """What ``chain_only_called`` looks at in one method, found once (fuse() asks about every
    Sequential below the class): ``(parents, [(node, kind, path)])`` in walk order, ``kind`` one of
    "path" (``node`` is ``me.<path>``), "iterator" (``node`` is ``<me.path>.children``...) and
    "getattr" (``getattr(me.<path>, <computed name>)``)."""
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    aliases = _loop_aliases(tree, me)
    paths = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Subscript, ast.Name, ast.Call)):
            got = _chain(node, me, aliases)
            if got:
                paths.append((node, "path", got))
        if isinstance(node, ast.Attribute) and node.attr in _CHILD_ITERATORS:
            got = _chain(node.value, me, aliases)
            if got is not None:
                paths.append((node, "iterator", got))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and len(node.args) >= 2 and _chain(node, me, aliases) is None):
            got = _chain(node.args[0], me, aliases)
            if got is not None:
                paths.append((node, "getattr", got))
    return parents, paths


def chain_only_called(holder: nn.Module, chain: tuple[str, ...]) -> str | None:
    """None when the code of ``holder``'s class uses the module at ``holder.<chain[0]>.<chain[1]>...``
    only by calling it as one module; else why it may be used as a container (its entries read one
    by one) — then rewriting the entries could change what ``holder`` computes. Looked for, in every
    method of the class (``self`` being each method's own first parameter):

    * ``self.a.b`` itself used other than by calling it (indexed, iterated, sliced, passed to a
      function, kept; a whole-module method that returns it, ``self.a.b.train()[:4]``, counts as
      it). Its repr in an f-string, a test (``isinstance``) and a local name only called are fine.
      Paths go through constant ``getattr``s, indexing (``self.blocks[i]``: any entry) and loop
      variables (``for b in self.blocks``, ``enumerate``, nested: BigGAN's blocks);
    * in the methods that can run after fuse() (not __init__ and what it calls: weight
      initialisation is fine): iterating the children of the module holding it
      (``self.a.children()``, ``named_children()``, ``_modules``), or every descendant of any module
      on the way (``self.modules()``, ``self.a.named_modules()``), unless the loop only calls each
      module it yields (``self.__dict__`` counts as iterating); ``getattr(<a module on the way>,
      <computed name>)`` whose value is not only called (directly, or through the local name it is
      assigned to).

    A method whose source cannot be read is asked the same question of its bytecode
    (``bytecode_chain_use``), which declines where it cannot prove a plain call.
    """
    cls = type(holder)
    if is_torch_class(cls) or cls.__module__.startswith("ganengine.nn") or not chain:
        return None  # containers (Sequential, ModuleList, ModuleDict, ...) or our own modules
    dotted = ".".join(chain)
    init = _init_methods(cls)
    for name, fn in _methods(cls):
        tree = function_ast(fn)
        if tree is None:   # (exec, `python -c`, a generated class, a .pyc-only install): ask its bytecode
            why = bytecode_chain_use(fn, chain, after_fuse=name not in init)
            if why:
                return f"cannot read the source of {cls.__name__}.{name}, and its bytecode {why}"
            continue
        me = self_name(tree)
        where = f"{cls.__name__}.{name}"
        parents, paths = _tree_paths(tree, me)
        after_fuse = name not in init
        for node, kind, got in paths:
            if kind == "iterator":
                if (after_fuse and _on_the_way(got, chain)
                        and (node.attr in _DESCENDANT_ITERATORS or len(got) == len(chain) - 1)
                        and not _loop_items_only_called(node, parents, tree)):
                    what = "modules" if node.attr in _DESCENDANT_ITERATORS else "children"
                    return (f"{where} iterates the {what} of {'.'.join((me,) + got)} ({node.attr}), "
                            f"which reach {me}.{dotted}")
                continue
            if kind == "getattr":   # (a computed name: the value may be the module, or one on the way to it)
                if after_fuse and _on_the_way(got, chain) and not _only_called(node, parents, tree, inspect.unwrap(fn)):
                    return (f"{where} reads a child of {'.'.join((me,) + got)} by a computed name (getattr, line "
                            f"{getattr(node, 'lineno', '?')} of the method) and uses it other than by calling it")
                continue
            if _matches(got, chain):
                if not isinstance(getattr(node, "ctx", ast.Load()), ast.Load):
                    continue  # assigned (in __init__) or deleted
                up = parents.get(node)
                if isinstance(up, ast.Attribute) and up.attr in _CHILD_ITERATORS:
                    # (its own children are its entries: calling them one by one reads it as a list)
                    if after_fuse and not _loop_items_only_called(up, parents, tree, entries=True):
                        return f"{where} iterates the children of {me}.{dotted} ({up.attr})"
                    continue
                if name == "__init__" and len(chain) == 1 and _rebinds_itself(node, parents, chain[0], me):
                    continue
                if _only_called(node, parents, tree, inspect.unwrap(fn)):
                    continue
                return (f"{where} uses {me}.{dotted} other than by calling it "
                        f"(line {getattr(node, 'lineno', '?')} of the method)")
    return None


# ----------------------------------------------------------------------------- bytecode (no source)
# When a class's source cannot be read (defined through exec, `python -c`, stdin, a generated
# class, a .pyc-only install), its methods' bytecode still says how they use a child: the same
# question as above, answered conservatively. The value a load leaves on the stack is followed
# through the instructions that evaluate the rest of its expression (both ways of a conditional
# expression, `and`/`or`, an inlined comprehension's loop) to the instruction that consumes it;
# a consumer this does not recognise as a plain call is reported as a use of the child as a
# container. Python 3.10-3.13 layouts (LOAD_METHOD / LOAD_ATTR's method flag, PRECALL, KW_NAMES,
# CALL_KW, CALL_FUNCTION_EX, superinstructions); an instruction not known here declines.

_NEW_CALL_LAYOUT = sys.version_info >= (3, 13)   # the callable below NULL / self, not above it
_OLD_CALLS = sys.version_info < (3, 11)          # CALL_FUNCTION / CALL_METHOD, no NULL for CALL_FUNCTION_EX

# instructions that only push (they read no value of the stack)
_PUSH_ONLY = frozenset({"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_AND_CLEAR", "LOAD_FAST_LOAD_FAST", "LOAD_CONST",
                        "LOAD_DEREF", "LOAD_GLOBAL", "LOAD_NAME", "LOAD_CLOSURE", "PUSH_NULL", "LOAD_ASSERTION_ERROR",
                        "LOAD_BUILD_CLASS", "LOAD_SMALL_INT", "LOAD_CLASSDEREF", "LOAD_LOCALS"})
# instructions that leave the stack alone
_NO_STACK = frozenset({"NOP", "CACHE", "EXTENDED_ARG", "KW_NAMES", "RESUME", "PRECALL", "COPY_FREE_VARS",
                       "MAKE_CELL", "NOT_TAKEN"})
# instructions -> how many values they read off the stack (the effect on the depth is dis's)
_READS = {"LOAD_ATTR": 1, "LOAD_METHOD": 1, "LOAD_SUPER_ATTR": 3, "UNARY_NEGATIVE": 1, "UNARY_POSITIVE": 1,
          "UNARY_NOT": 1, "UNARY_INVERT": 1, "TO_BOOL": 1, "BINARY_OP": 2, "BINARY_SUBSCR": 2, "COMPARE_OP": 2,
          "IS_OP": 2, "CONTAINS_OP": 2, "BINARY_SLICE": 3, "STORE_SLICE": 4, "GET_ITER": 1, "GET_LEN": 1,
          "STORE_FAST": 1, "STORE_FAST_LOAD_FAST": 1, "STORE_FAST_STORE_FAST": 2, "STORE_DEREF": 1,
          "STORE_GLOBAL": 1, "STORE_NAME": 1, "STORE_ATTR": 2, "DELETE_ATTR": 1, "STORE_SUBSCR": 3, "DELETE_SUBSCR": 2,
          "POP_TOP": 1,
          "END_FOR": None, "UNPACK_SEQUENCE": 1, "UNPACK_EX": 1, "RETURN_VALUE": 1, "YIELD_VALUE": 1,
          "FORMAT_SIMPLE": 1, "FORMAT_WITH_SPEC": 2, "CONVERT_VALUE": 1, "CALL_INTRINSIC_1": 1,
          "CALL_INTRINSIC_2": 2,
          # (building `*args` / `**kwargs` / a comprehension's result: the value on top goes into a
          # list, set or dict further down, which stays)
          "LIST_EXTEND": 1, "LIST_APPEND": 1, "SET_ADD": 1, "SET_UPDATE": 1, "DICT_MERGE": 1, "DICT_UPDATE": 1,
          "MAP_ADD": 2, "LIST_TO_TUPLE": 1}
_READS_N = {"BUILD_TUPLE", "BUILD_LIST", "BUILD_SET", "BUILD_SLICE", "BUILD_STRING", "RAISE_VARARGS"}
# jumps -> how many values they read (a conditional jump tests the value on top)
_JUMP_READS = {"JUMP_FORWARD": 0, "JUMP_BACKWARD": 0, "JUMP_ABSOLUTE": 0, "JUMP_BACKWARD_NO_INTERRUPT": 0,
               "JUMP": 0, "JUMP_NO_INTERRUPT": 0, "FOR_ITER": 1, "JUMP_IF_FALSE_OR_POP": 1,
               "JUMP_IF_TRUE_OR_POP": 1}
_JUMP_READS.update({f"POP_JUMP{way}_IF_{what}": 1 for way in ("", "_FORWARD", "_BACKWARD")
                    for what in ("FALSE", "TRUE", "NONE", "NOT_NONE")})
_UNCONDITIONAL = frozenset(name for name, reads in _JUMP_READS.items() if reads == 0)
# what a consuming instruction does with the value, in the report's words
_CONSUMER_WORDS = {"BINARY_SUBSCR": "indexes or slices it", "BINARY_SLICE": "slices it", "STORE_SUBSCR": "indexes it",
                   "STORE_SLICE": "slices it", "GET_ITER": "iterates it", "STORE_DEREF": "keeps it in a variable",
                   "STORE_ATTR": "keeps it in an attribute", "BUILD_TUPLE": "collects it", "BUILD_LIST": "collects it",
                   "BUILD_SET": "collects it", "RETURN_VALUE": "returns it", "CONTAINS_OP": "tests membership in it",
                   "YIELD_VALUE": "yields it", "UNARY_NOT": "tests its truth (its length)",
                   "TO_BOOL": "tests its truth (its length)", "GET_LEN": "measures it",
                   "UNPACK_SEQUENCE": "unpacks it", "UNPACK_EX": "unpacks it"}
# builtins whose calls fuse() recognises: tests of one module (they read no entry), `super(C, self)`,
# `getattr(self, name)`, `enumerate(self.blocks)`
_TESTS = frozenset({"isinstance", "type", "hasattr", "id", "callable"})
_FOLLOWED_BUILTINS = _TESTS | {"super", "getattr", "enumerate"}
# what `super(C, self).<name>` may name: methods on the whole module (each method of the class's own
# MRO is checked in its turn), not a way to the children
_SUPER_ATTRS = _WHOLE_MODULE_METHODS | {"__init__", "__setattr__", "__delattr__", "__repr__", "__str__"}
# whole-module methods that return the module itself (`self.model.train()[:4]` slices it)
_RETURNS_SELF = frozenset({"apply", "to", "cuda", "cpu", "half", "float", "double", "bfloat16", "type", "train",
                           "eval", "requires_grad_", "share_memory"})
_MAX_STATES = 4096   # (a value followed through more states than this is not followed: declined)


def _call_shape(ins) -> tuple[int, int] | None:
    """For a call instruction: (how many values lie above the callable when it runs, how many
    values it reads off the stack); None for any other instruction."""
    name, n = ins.opname, ins.arg
    if name == "CALL":   # 3.11+: NULL / `self` beside the callable (below it up to 3.12, above from 3.13)
        return (n + 1 if _NEW_CALL_LAYOUT else n), n + 2
    if name == "CALL_KW":   # 3.13: the keyword names' tuple on top
        return n + 2, n + 3
    if name == "CALL_FUNCTION_EX":   # the argument tuple (and the keyword dict) above; NULL from 3.11
        kw = n & 1
        if _OLD_CALLS:
            return 1 + kw, 2 + kw
        return (2 + kw if _NEW_CALL_LAYOUT else 1 + kw), 3 + kw
    if name == "CALL_FUNCTION":
        return n, n + 1
    if name == "CALL_FUNCTION_KW":
        return n + 1, n + 2
    if name == "CALL_METHOD":
        return n, n + 2
    return None


def _call_args(ins) -> int | None:
    """How many arguments a call instruction passes, when they are all positional (a keyword-names
    tuple on the stack, or an argument tuple, gives None)."""
    if ins.opname in ("CALL", "CALL_FUNCTION", "CALL_METHOD"):
        return ins.arg
    return None


def _pushed_above(ins) -> int:
    """How many values a load leaves above the one it loaded: from 3.13 a load with the method /
    NULL flag pushes the NULL (or `self`) on top of the callable."""
    if _NEW_CALL_LAYOUT and ins.opname in ("LOAD_ATTR", "LOAD_GLOBAL", "LOAD_SUPER_ATTR") and ins.arg & 1:
        return 1
    return 0


def _stack_effect(ins, jump: bool | None = None) -> int:
    if ins.opcode < dis.HAVE_ARGUMENT:
        return dis.stack_effect(ins.opcode)
    return dis.stack_effect(ins.opcode, ins.arg) if jump is None else dis.stack_effect(ins.opcode, ins.arg, jump=jump)


def _reads(ins) -> int | None:
    name = ins.opname
    if name in _READS_N:
        return ins.arg
    if name == "BUILD_MAP":
        return 2 * ins.arg
    if name == "BUILD_CONST_KEY_MAP":
        return ins.arg + 1
    if name == "FORMAT_VALUE":
        return 2 if ins.arg & 4 else 1   # (with a format spec)
    if name == "END_FOR" or (name.startswith(("BINARY_", "INPLACE_")) and name not in _READS):
        return -_stack_effect(ins) if name == "END_FOR" else 2   # (3.10's BINARY_ADD ...)
    return _READS.get(name)


def _moved(ins, above: int) -> int | None | bool:
    """Where a stack shuffle (COPY, SWAP, ROT_*, DUP_TOP*) puts the value ``above`` values deep:
    its new depth; False for another instruction; None when the value is copied (not followed)."""
    name = ins.opname
    if name in ("COPY", "DUP_TOP", "DUP_TOP_TWO"):
        n = ins.arg if name == "COPY" else (1 if name == "DUP_TOP" else 2)
        if name == "COPY":
            return None if above == n - 1 else above + 1
        return None if above < n else above + n
    if name in ("SWAP", "ROT_TWO"):
        n = ins.arg if name == "SWAP" else 2
        return n - 1 if above == 0 else 0 if above == n - 1 else above
    if name in ("ROT_THREE", "ROT_FOUR", "ROT_N"):
        n = {"ROT_THREE": 3, "ROT_FOUR": 4}.get(name, ins.arg)
        return n - 1 if above == 0 else above - 1 if above < n else above
    return False


class _Code:
    """One code object's instructions, read once, and where a value it loads goes."""

    def __init__(self, code, fn_globals: dict):
        self.code = code
        self.instrs = list(dis.get_instructions(code))
        self.index = {ins.offset: i for i, ins in enumerate(self.instrs)}
        self.fn_globals = fn_globals
        self._callees = None
        self._module_calls = None
        self._targets = None
        self._fates: dict = {}   # (start, above) -> fates (each method is asked once per Sequential)

    def fates(self, start: int, above: int) -> list[tuple]:
        """What becomes of the value loaded by the instruction at ``start`` (``above`` values left on
        top of it): one entry per way the code can go, ``(kind, index of the consumer, detail)``:
        "called" (the callable of a call), "arg" (an argument; detail: values above it), "attr"
        (an attribute read off it; detail: the name), "super-attr", "owner" (an attribute set on
        it), "iter", "subscr" (indexed or sliced), "store" (detail: the local variable), "format"
        (formatted into an f-string: its repr), "dropped", "copy" (a copy is on top after it: detail,
        how deep), "use" (anything else; detail: in words)."""
        key = (start, above)
        if key in self._fates:
            return self._fates[key]
        out, todo, seen = [], [(start + 1, above)], set()
        self._fates[key] = out
        while todo:
            pc, above = todo.pop()
            if (pc, above) in seen:
                continue
            seen.add((pc, above))
            if len(seen) > _MAX_STATES or pc >= len(self.instrs):
                out.append(("use", pc, "uses it in a way fuse() does not follow"))
                continue
            nxt = self._step(self.instrs[pc], pc, above, out)
            if nxt is not None:
                todo.extend(nxt)
        return out

    def _step(self, ins, pc: int, above: int, out: list):
        """The states after ``ins`` (a list), or None when ``ins`` consumed the value (recorded in ``out``)."""
        name = ins.opname
        if name in _NO_STACK:
            return [(pc + 1, above)]
        call = _call_shape(ins)
        if call is not None:
            slot, pops = call
            if above == slot:
                out.append(("called", pc, None))
            elif above < pops:
                out.append(("arg", pc, above))
            else:
                return [(pc + 1, above + 1 - pops)]
            return None
        if name in _PUSH_ONLY:
            return [(pc + 1, above + _stack_effect(ins))]
        moved = _moved(ins, above)
        if moved is None:   # (copied: `self.n += 1` reads `self` twice; the copy is followed on its own)
            n = 2 if name == "DUP_TOP_TWO" else 1
            out.append(("copy", pc, above))
            return [(pc + 1, above + n)]
        if moved is not False:
            return [(pc + 1, moved)]
        reads = _JUMP_READS.get(name)
        if reads is not None:
            if above < reads:
                out.append(("use", pc, "tests its truth (its length)" if name != "FOR_ITER" else "iterates it"))
                return None
            target = self.index.get(ins.argval)
            if target is None:
                out.append(("use", pc, f"uses it in a way fuse() does not follow ({name})"))
                return None
            states = [(target, above + _stack_effect(ins, jump=True))]
            if name not in _UNCONDITIONAL:
                states.append((pc + 1, above + _stack_effect(ins, jump=False)))
            return states
        reads = _reads(ins)
        if reads is None or ins.opcode in dis.hasjrel or ins.opcode in dis.hasjabs:
            out.append(("use", pc, _CONSUMER_WORDS.get(name, f"uses it in a way fuse() does not follow ({name})")))
            return None
        if above >= reads:
            return [(pc + 1, above + _stack_effect(ins))]
        out.append(self._consumer(ins, pc, above))
        return None

    def _consumer(self, ins, pc: int, above: int) -> tuple:
        """The fate of the value ``above`` values deep when ``ins`` reads it."""
        name = ins.opname
        if name in ("LOAD_ATTR", "LOAD_METHOD"):
            return ("attr", pc, ins.argval)
        if name == "LOAD_SUPER_ATTR" and above == 0:
            return ("super-attr", pc, ins.argval)
        if name in ("STORE_ATTR", "DELETE_ATTR") and above == 0:
            return ("owner", pc, ins.argval)
        if name == "GET_ITER":
            return ("iter", pc, None)
        if name == "POP_TOP":
            return ("dropped", pc, None)
        if (name == "BINARY_SUBSCR" and above == 1) or (name == "BINARY_SLICE" and above == 2):
            return ("subscr", pc, None)
        if name in ("STORE_FAST", "STORE_FAST_LOAD_FAST", "STORE_FAST_STORE_FAST"):
            var = ins.argval if name == "STORE_FAST" else ins.argval[above if name == "STORE_FAST_STORE_FAST" else 0]
            if var not in self.code.co_cellvars:
                return ("store", pc, var)
            return ("use", pc, "keeps it in a variable that a nested function reads")
        if ((name in ("FORMAT_VALUE", "FORMAT_WITH_SPEC") and above == reads_minus_one(ins))
                or name in ("FORMAT_SIMPLE", "CONVERT_VALUE")):
            return ("format", pc, None)
        return ("use", pc, _CONSUMER_WORDS.get(name, f"uses it in {name}"))

    def loads_of(self, var: str) -> list[tuple[int, int]] | None:
        """Every load of the local variable ``var``: ``(index, values left above it)``; None when
        something else reads it (a nested function, a deletion aside)."""
        if var in self.code.co_cellvars or var in self.code.co_freevars:
            return None
        found = []
        for i, ins in enumerate(self.instrs):
            name = ins.opname
            if name in ("LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_AND_CLEAR") and ins.argval == var:
                found.append((i, 0))
            elif name == "LOAD_FAST_LOAD_FAST":
                found.extend((i, 1 - k) for k, v in enumerate(ins.argval) if v == var)
            elif name == "STORE_FAST_LOAD_FAST" and ins.argval[1] == var:
                found.append((i, 0))
        return found

    def callee(self, pc: int) -> str | None:
        """The builtin (one of ``_FOLLOWED_BUILTINS``, not shadowed by a global) that the call at
        ``pc`` calls, if it is one."""
        if self._callees is None:
            self._callees = {}
            for i, ins in enumerate(self.instrs):
                if (ins.opname == "LOAD_GLOBAL" and ins.argval in _FOLLOWED_BUILTINS
                        and self.fn_globals.get(ins.argval, _NOT_SET) is _NOT_SET
                        and getattr(builtins, ins.argval, None) is _REAL_BUILTINS[ins.argval]):
                    fates = self.fates(i, _pushed_above(ins))
                    if fates and all(f[0] == "called" and f[1] == fates[0][1] for f in fates):
                        self._callees[fates[0][1]] = ins.argval
        return self._callees.get(pc)

    def module_parameter(self, pc: int) -> str | None:
        """The module parameter's name when the call at ``pc`` calls one of the torch functions that
        only call the module they are given (``_MODULE_CALLERS``), loaded as a global or an attribute
        path through modules from one (``nn.parallel.data_parallel``): each LOAD_GLOBAL followed
        through its attribute reads to the call that consumes it. None for any other call."""
        if self._module_calls is None:
            self._module_calls = {}
            for i, ins in enumerate(self.instrs):
                if ins.opname != "LOAD_GLOBAL":
                    continue
                obj, at, above = global_value((ins.argval,), self.fn_globals), i, _pushed_above(ins)
                while obj is not _NOT_SET:
                    fates = self.fates(at, above)
                    if not fates or any(f[:2] != fates[0][:2] for f in fates):
                        break   # (consumed in two places, or none: not followed)
                    kind, at, detail = fates[0]
                    if kind == "called":
                        param = module_parameter(obj)
                        if param is not None:
                            self._module_calls[at] = param
                        break
                    if kind != "attr" or not isinstance(obj, types.ModuleType):
                        break
                    obj, above = vars(obj).get(detail, _NOT_SET), _pushed_above(self.instrs[at])
        return self._module_calls.get(pc)

    def passes_module(self, call: int, above: int) -> bool:
        """Whether the argument ``above`` values deep when the call at ``call`` runs is the module
        argument of one of ``_MODULE_CALLERS``: the first positional one, or the keyword of that
        name (3.10's CALL_FUNCTION_KW and 3.13's CALL_KW: the names' tuple a constant on top; 3.11 /
        3.12: KW_NAMES before the call). ``*args`` (CALL_FUNCTION_EX) is not followed."""
        param = self.module_parameter(call)
        ins = self.instrs[call]
        if param is None or not ins.arg:
            return False
        if ins.opname in ("CALL_KW", "CALL_FUNCTION_KW"):
            kw, deepest = self.constant_argument(call, 0), ins.arg
            if not isinstance(kw, tuple):
                return False
        elif ins.opname in ("CALL", "CALL_FUNCTION", "CALL_METHOD"):
            kw, deepest = self.keyword_names(call), ins.arg - 1
        else:
            return False
        return above == deepest and (len(kw) < ins.arg or kw[0] == param)

    def keyword_names(self, call: int) -> tuple:
        """The keyword names of the call at ``call`` on 3.11 / 3.12 (a KW_NAMES just before it); ()
        where there are none."""
        k = call - 1
        while k >= 0 and self.instrs[k].opname in ("CACHE", "PRECALL", "EXTENDED_ARG"):
            k -= 1
        if k >= 0 and self.instrs[k].opname == "KW_NAMES":
            names = self.instrs[k].argval
            return names if isinstance(names, tuple) else self.code.co_consts[self.instrs[k].arg]
        return ()

    def constant_argument(self, call: int, depth: int):
        """The constant ``depth`` values below the top of the stack when the call at ``call`` runs,
        when the instructions before it push it and then ``depth`` values one instruction each, and no
        jump lands between them (``getattr(self, 'model', None)``); ``_NOT_SET`` otherwise."""
        k = call
        for _ in range(depth + 1):
            k -= 1
            while k > 0 and self.instrs[k].opname in _NO_STACK:
                k -= 1
            if k < 0 or _pushed_one(self.instrs[k]) is False:
                return _NOT_SET
        if self.instrs[k].opname not in ("LOAD_CONST", "LOAD_SMALL_INT"):
            return _NOT_SET
        if self._targets is None:
            jumps = set(dis.hasjrel) | set(dis.hasjabs)
            self._targets = {ins.argval for ins in self.instrs if ins.opcode in jumps}
        if any(ins.offset in self._targets for ins in self.instrs[k + 1:call + 1]):
            return _NOT_SET
        return self.instrs[k].argval

    def line(self, at: int) -> str:
        """Where the instruction at ``at`` comes from: "line 6 of <string>"."""
        lines = (getattr(ins, "line_number", None) or (ins.starts_line if type(ins.starts_line) is int else None)
                 for ins in reversed(self.instrs[:at + 1]))
        line = next((n for n in lines if n), "?")
        return f"line {line} of {self.code.co_filename}"


def _pushed_one(ins) -> bool:
    """Whether ``ins`` only pushes one value."""
    return ins.opname in _PUSH_ONLY and _stack_effect(ins) == 1


def reads_minus_one(ins) -> int:
    """The depth of the formatted value under FORMAT_VALUE / FORMAT_WITH_SPEC (under its spec, if any)."""
    return (_reads(ins) or 1) - 1


_NOT_SET = object()
_REAL_BUILTINS = {name: getattr(builtins, name) for name in _FOLLOWED_BUILTINS}


class _Walk:
    """One question to one code object: does it use ``me.<chain>`` other than by calling it?"""

    def __init__(self, cx: _Code, me: str, chain: tuple[str, ...], after_fuse: bool):
        self.cx, self.me, self.chain, self.after_fuse = cx, me, chain, after_fuse
        self.dotted = ".".join((me,) + chain)
        self.vars_seen: set = set()

    def name(self, got) -> str:
        return ".".join((self.me,) + got) if isinstance(got, tuple) else got

    def follow(self, pc: int, above: int, got) -> str | None:
        """Why the value at ``pc`` is not used safely. ``got``: the path from ``me`` it holds (a prefix
        of the chain, or the chain), or "item"/"descendant" for a module a loop yields (one of the
        children / of every descendant of a module on the way)."""
        for fate in self.cx.fates(pc, above):
            why = self.judge(fate, got)
            if why:
                return why
        return None

    def follow_var(self, var: str, got) -> str | None:
        """The same question for every load of the local variable the value was stored in."""
        if (var, got) in self.vars_seen:
            return None
        self.vars_seen.add((var, got))
        loads = self.cx.loads_of(var)
        if loads is None:
            return f"keeps {self.name(got)} in a variable ({var}) that nested code reads"
        for i, above in loads:
            why = self.follow(i, above, got)
            if why:
                return why
        return None

    def result_only_called(self, call_pc: int, got) -> str | None:
        """A call's result that holds the same module (``self.model.train()``, ``getattr(self, name)``)."""
        return self.follow(call_pc, 0, got)

    def judge(self, fate: tuple, got) -> str | None:
        kind, at, detail = fate
        cx = self.cx
        where = cx.line(at)
        if kind in ("called", "format", "dropped"):
            if kind == "called" and got == "descendant":
                return f"calls each module of {self.dotted}'s ancestors' descendants one by one ({where})"
            return None
        if kind == "store":
            return self.follow_var(detail, got)
        if kind == "copy":   # (the copy, on top after the instruction at `at`; the original goes on)
            return self.follow(at, 0 if self.cx.instrs[at].opname != "DUP_TOP_TWO" else detail, got)
        if isinstance(got, str):   # a module a loop yields
            return self.judge_item(kind, at, detail, got, where)
        full = len(got) == len(self.chain)   # (a path follows the chain's names, or "*" for any entry)
        if kind == "attr":
            return self.judge_attr(at, detail, got, where)
        if got == () and kind == "use" and cx.instrs[at].opname == "RETURN_VALUE":
            return None   # (`return self`: a `train()` override; its callers are not this class's code)
        if not full and (not self.after_fuse or kind == "owner"):
            # (__init__ and what it calls run before fuse(): only the child itself is watched; setting
            # or deleting an attribute of `self` or of a module on the way reads no entry)
            return None
        if kind == "super-attr" and got == ():
            return None if detail in _SUPER_ATTRS else f"reads {detail} through super() ({where})"
        if kind == "arg":
            return self.judge_arg(at, detail, got, where)
        if kind == "iter" and not full:   # (`for block in self.blocks: x = block(x)`: each entry, maybe ours)
            var = self.loop_target(at, pairs=False)
            if var:
                return self.follow_var(var, got + ("*",))
        if kind == "subscr" and not full:   # (`self.blocks[i](x)`: an entry, maybe on the way to ours)
            return self.follow(at, 0, got + ("*",))
        words = detail if kind == "use" else _CONSUMER_WORDS.get(cx.instrs[at].opname, f"uses it ({kind})")
        if kind == "owner":
            words = "sets an attribute of it"
        text = f"{_naming(words, self.name(got))} ({where})"
        return text if full else text.replace(f" ({where})", f", which could reach {self.dotted} ({where})")

    def judge_attr(self, at: int, attr: str, got: tuple, where: str) -> str | None:
        cx, full = self.cx, len(got) == len(self.chain)
        if not full and attr == self.chain[len(got)]:
            return self.follow(at, _pushed_above(cx.instrs[at]), got + (attr,))
        if full and attr in _WHOLE_MODULE_METHODS:
            if attr not in _RETURNS_SELF:
                return None
            for fate in cx.fates(at, _pushed_above(cx.instrs[at])):   # (the method's call returns the module)
                if fate[0] != "called":
                    return f"uses {self.dotted}.{attr} other than by calling it ({cx.line(fate[1])})"
                why = self.result_only_called(fate[1], got)
                if why:
                    return why
            return None
        descend = attr in _CHILD_ITERATORS and (full or attr in _DESCENDANT_ITERATORS
                                                or len(got) == len(self.chain) - 1)
        if not full and not descend:
            return None   # (another attribute: self.other, self.D.head)
        if not self.after_fuse and attr in _CHILD_ITERATORS:
            return None   # (weight initialisation in __init__)
        if descend:
            # (the chain's own children are its entries: called one by one, with what comes out
            # between them kept, they are read as a list: only tests and whole-module methods, as
            # for every descendant)
            item = "descendant" if full or attr in _DESCENDANT_ITERATORS else "item"
            var = self.children_loop(at, attr)
            if var is not None and not self.follow_var(var, item):
                return None
            what = "modules" if attr in _DESCENDANT_ITERATORS else "children"
            if full:
                return f"reads the children of {self.dotted} ({attr}) ({where})"
            return (f"iterates the {what} of {self.name(got)} ({attr}), which reach {self.dotted} ({where})")
        return f"reads the attribute {self.dotted} ({attr}) ({where})"

    def judge_arg(self, at: int, above: int, got: tuple, where: str) -> str | None:
        """``got`` passed to a call: fine for ``super(C, self)``, a test (``isinstance(self.model, X)``), a
        computed ``getattr(self, name)`` whose value is only called, ``enumerate(self.blocks)`` in a loop
        that only calls each block."""
        cx, full = self.cx, len(got) == len(self.chain)
        nargs = _call_args(cx.instrs[at])
        nargs = -1 if nargs is None else nargs
        fn = cx.callee(at)
        if fn in _TESTS and above == nargs - 1:
            return None
        if cx.passes_module(at, above):   # (`data_parallel(self.main, x, ids)`, `checkpoint(self.main, x)`)
            return None
        if fn == "super" and got == () and nargs == 2 and above == 0:
            nxt = next((ins for ins in cx.instrs[at + 1:] if ins.opname not in _NO_STACK), None)
            if nxt is not None and nxt.opname in ("LOAD_ATTR", "LOAD_METHOD") and nxt.argval in _SUPER_ATTRS:
                return None
            return f"uses super({self.me}) other than to call one of its methods ({where})"
        if fn == "getattr" and not full and nargs in (2, 3) and above == nargs - 1:
            key = cx.constant_argument(at, nargs - 2)
            if isinstance(key, str):   # (`getattr(self, "model"[, default])`: the attribute)
                if key != self.chain[len(got)]:
                    return None   # (another attribute)
                return self.follow(at, 0, got + (key,))
            why = self.result_only_called(at, self.chain)   # (a computed name: maybe the module itself)
            if why is None:
                return None
            return (f"reads a child of {self.name(got)} by a computed name (getattr) and uses it other than by "
                    f"calling it ({where})")
        if fn == "enumerate" and not full and nargs == 1:
            fates = cx.fates(at, 0)
            if len(fates) == 1 and fates[0][0] == "iter":
                var = self.loop_target(fates[0][1], pairs=True)
                if var and not self.follow_var(var, got + ("*",)):
                    return None
        text = f"{_naming('passes it to a call', self.name(got))} ({where})"
        return text if full else text.replace(f" ({where})", f", which could reach {self.dotted} ({where})")

    def judge_item(self, kind: str, at: int, detail, got: str, where: str) -> str | None:
        """A module a loop over children (``item``) or descendants (``descendant``) yields: it may be
        called (children only), tested, have an attribute read or set, a whole-module method called."""
        if kind == "owner":
            return None
        if kind == "attr":
            if detail not in _ITEM_DESCENDS:
                return None
            if detail == "forward" and got == "item":
                fates = self.cx.fates(at, _pushed_above(self.cx.instrs[at]))
                if all(f[0] == "called" for f in fates):
                    return None
            return f"reads {detail} of each module a loop over {self.dotted}'s ancestors yields ({where})"
        if kind == "arg" and self.cx.callee(at) in _TESTS:
            nargs = _call_args(self.cx.instrs[at])
            if nargs is not None and detail == nargs - 1:   # (the first argument: the module tested)
                return None
        return (f"uses each module a loop over {self.dotted}'s ancestors yields other than as one module "
                f"({_naming(detail, 'it') if kind == 'use' else kind}, {where})")

    def loop_target(self, iter_pc: int, pairs: bool) -> str | None:
        """The loop variable of ``for var in <value>`` (``for _, var in ...`` where ``pairs``) whose
        GET_ITER is at ``iter_pc``; None for another shape (a comprehension, a second target)."""
        rest = [ins for ins in self.cx.instrs[iter_pc + 1:iter_pc + 12] if ins.opname not in _NO_STACK]
        if not rest or rest[0].opname != "FOR_ITER":
            return None
        rest = rest[1:]
        if pairs:
            if not rest or rest[0].opname != "UNPACK_SEQUENCE" or rest[0].arg != 2:
                return None
            rest = rest[1:]
            if rest and rest[0].opname == "STORE_FAST_STORE_FAST":
                return rest[0].argval[1]
            if len(rest) < 2 or rest[0].opname != "STORE_FAST":
                return None
            rest = rest[1:]
        if rest and rest[0].opname == "STORE_FAST":
            return rest[0].argval
        if rest and rest[0].opname == "STORE_FAST_LOAD_FAST":
            return rest[0].argval[0]
        return None

    def children_loop(self, attr_pc: int, attr: str) -> str | None:
        """The loop variable of ``for m in <module>.children():`` (``named_children()``, ``modules()``...)
        whose attribute read is at ``attr_pc``; None for another shape."""
        if attr in ("_modules", "__dict__"):
            return None
        fates = self.cx.fates(attr_pc, _pushed_above(self.cx.instrs[attr_pc]))
        if len(fates) != 1 or fates[0][0] != "called" or self.cx.instrs[fates[0][1]].arg not in (0, None):
            return None
        after = self.cx.fates(fates[0][1], 0)
        if len(after) != 1 or after[0][0] != "iter":
            return None
        return self.loop_target(after[0][1], pairs=attr.startswith("named_"))

    def run(self) -> str | None:
        """Every load of ``me`` in the code, followed."""
        for i, ins in enumerate(self.cx.instrs):
            if ins.opcode not in _VARIABLE_OPS:
                continue
            names = ins.argval if isinstance(ins.argval, tuple) else (ins.argval,)
            if self.me not in names:
                continue   # (a constant, attribute or global may share the instance's name)
            name = ins.opname
            if name == "LOAD_CLOSURE" or name.startswith(("STORE_", "DELETE_", "MAKE_CELL", "COPY_FREE")):
                if name != "STORE_FAST_LOAD_FAST":
                    continue
            if name not in _SELF_LOADS and name not in ("LOAD_FAST_LOAD_FAST", "STORE_FAST_LOAD_FAST"):
                return f"reads {self.me} with {name}, which fuse() does not follow ({self.cx.line(i)})"
            if name == "STORE_FAST_LOAD_FAST":
                aboves = [0] if names[1] == self.me else []
            elif name == "LOAD_FAST_LOAD_FAST":
                aboves = [1 - k for k, v in enumerate(names) if v == self.me]
            else:
                aboves = [0]
            for above in aboves:
                why = self.follow(i, above, ())
                if why:
                    return why
        return None


# loads of a variable that fuse() follows (any other instruction naming `self` is not followed)
_SELF_LOADS = frozenset({"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_DEREF"})
# the instructions that name a local or closure variable
_VARIABLE_OPS = frozenset(dis.haslocal) | frozenset(dis.hasfree)


def _code_objects(code, me: str):
    """``code`` and the code nested in it (comprehensions, lambdas, inner functions) that sees
    ``me`` (as a free variable)."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and me in const.co_freevars:
            yield from _code_objects(const, me)


def _naming(use: str, what: str) -> str:
    """A fate's words with the value named: "indexes or slices self.D.model"."""
    return re.sub(r"\bit\b", what, use, count=1)


def bytecode_chain_use(fn, chain: tuple[str, ...], after_fuse: bool) -> str | None:
    """``chain_only_called``'s question for a method whose source cannot be read, asked of its
    bytecode (and of the code nested in it): None when every use of ``self.<chain>`` is a call
    of it as one module (or a whole-module method) and nothing iterates the children on its way;
    else what the code does with it."""
    for f in {fn, inspect.unwrap(fn)}:
        code = getattr(f, "__code__", None)
        if code is None:
            return "has no Python bytecode to read"
        if code.co_argcount + code.co_posonlyargcount < 1:
            continue   # no instance parameter (a staticmethod): it cannot name the child as `self.<...>`
        me = code.co_varnames[0]
        for cx in _code_readers(f, code):
            why = _Walk(cx, me, chain, after_fuse).run()
            if why:
                return why
    return None


@functools.lru_cache(maxsize=256)
def _code_readers(f, code) -> tuple:
    """A ``_Code`` for ``f``'s code and each code nested in it that sees its instance (read once:
    fuse() asks the same methods about every Sequential below them; keyed by the code too, which
    can be swapped)."""
    return tuple(_Code(sub, getattr(f, "__globals__", {})) for sub in _code_objects(code, code.co_varnames[0]))


def child_only_called(parent: nn.Module, child_name: str) -> str | None:
    """``chain_only_called`` for a direct child (the parent's class code; see there)."""
    return chain_only_called(parent, (child_name,))


def used_as_container(chains) -> str | None:
    """The first reason ``chain_only_called`` gives for ``(holder, chain)`` pairs: a module and the
    path from each of its ancestors (the parent's class, the grandparent's, ...: a wrapper iterating
    ``self.G.model``)."""
    for holder, chain in chains:
        why = chain_only_called(holder, chain)
        if why:
            return why
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
