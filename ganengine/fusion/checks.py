"""The questions ``fuse`` asks before it touches a module: hooks, forwards, how a parent uses it.

Everything here answers conservatively: when in doubt, the caller declines and says why.
"""
from __future__ import annotations

import ast
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


# what walks a module's children one by one (``for block in self.children():``)
_CHILD_ITERATORS = frozenset({"children", "named_children", "modules", "named_modules", "_modules"})
# ... and what reaches every descendant, not only the children
_DESCENDANT_ITERATORS = frozenset({"modules", "named_modules"})


def _chain(node: ast.AST, me: str) -> tuple[str, ...] | None:
    """``("a", "b")`` for the expression ``me.a.b`` (``()`` for ``me`` itself), else None."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == me:
        return tuple(reversed(names))
    return None


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


def _only_called(node: ast.AST, parents: dict, tree: ast.AST) -> bool:
    """Whether the value of ``node`` is only called: ``node(...)``, ``node.forward(...)``, a whole-module
    method, or assigned to a local name that is itself only called (pix2pixHD's
    ``model = getattr(self, 'model' + str(n)); model(x)``)."""
    up = parents.get(node)
    if isinstance(up, ast.Call) and up.func is node:
        return True
    if (isinstance(up, ast.Attribute) and up.attr in _WHOLE_MODULE_METHODS
            and isinstance(parents.get(up), ast.Call) and parents[up].func is up):
        return True
    if (isinstance(up, ast.Assign) and up.value is node and len(up.targets) == 1
            and isinstance(up.targets[0], ast.Name)):
        var = up.targets[0].id
        loads = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == var and isinstance(n.ctx, ast.Load)]
        return all(isinstance(parents.get(n), ast.Call) and parents[n].func is n for n in loads)
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


def _loop_items_only_called(attr: ast.Attribute, parents: dict, tree: ast.AST) -> bool:
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
    may_call = attr.attr not in _DESCENDANT_ITERATORS
    loads = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == target.id and isinstance(n.ctx, ast.Load)]
    return all(_item_use_ok(n, parents, may_call) for n in loads)


def chain_only_called(holder: nn.Module, chain: tuple[str, ...]) -> str | None:
    """None when the code of ``holder``'s class uses the module at ``holder.<chain[0]>.<chain[1]>...``
    only by calling it as one module; else why it may be used as a container (its entries read one
    by one) — then rewriting the entries could change what ``holder`` computes. Looked for, in every
    method of the class (``self`` being each method's own first parameter):

    * ``self.a.b`` itself used other than by calling it (indexed, iterated, sliced, passed to a
      function, read with a constant ``getattr``);
    * in the methods that can run after fuse() (not __init__ and what it calls: weight
      initialisation is fine): iterating the children of the module holding it
      (``self.a.children()``, ``named_children()``, ``_modules``), or every descendant of any module
      on the way (``self.modules()``, ``self.a.named_modules()``), unless the loop only calls each
      module it yields; for a direct child, ``getattr(self, <computed name>)`` whose value is not
      only called (directly, or through the local name it is assigned to).
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
        parents = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node
        after_fuse = name not in init
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                got = None
            else:
                got = _chain(node, me)
            if got is not None and got == chain:
                if not isinstance(node.ctx, ast.Load):
                    continue  # assigned (in __init__) or deleted
                up = parents.get(node)
                if isinstance(up, ast.Attribute) and up.attr in _CHILD_ITERATORS:
                    if after_fuse and not _loop_items_only_called(up, parents, tree):
                        return f"{where} iterates the children of {me}.{dotted} ({up.attr})"
                    continue
                if name == "__init__" and len(chain) == 1 and _rebinds_itself(node, parents, chain[0], me):
                    continue
                if _only_called(node, parents, tree):
                    continue
                return (f"{where} uses {me}.{dotted} other than by calling it "
                        f"(line {getattr(node, 'lineno', '?')} of the method)")
            if after_fuse and isinstance(node, ast.Attribute) and node.attr in _CHILD_ITERATORS:
                got = _chain(node.value, me)
                if (got is not None and len(got) < len(chain) and got == chain[:len(got)]
                        and (node.attr in _DESCENDANT_ITERATORS or len(got) == len(chain) - 1)
                        and not _loop_items_only_called(node, parents, tree)):
                    what = "modules" if node.attr in _DESCENDANT_ITERATORS else "children"
                    return (f"{where} iterates the {what} of {'.'.join((me,) + got)} ({node.attr}), "
                            f"which reach {me}.{dotted}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                    and len(node.args) >= 2):
                got = _chain(node.args[0], me)
                if got is None or got != chain[:len(got)] or len(got) >= len(chain):
                    continue
                key = node.args[1]
                if isinstance(key, ast.Constant):
                    if len(got) == len(chain) - 1 and key.value == chain[-1]:
                        return f"{where} reads {dotted!r} with getattr"
                elif after_fuse and len(got) == len(chain) - 1 and not _only_called(node, parents, tree):
                    return (f"{where} reads a child of {'.'.join((me,) + got)} by a computed name (getattr, line "
                            f"{getattr(node, 'lineno', '?')} of the method) and uses it other than by calling it")
    return None


# ----------------------------------------------------------------------------- bytecode (no source)
# When a class's source cannot be read (defined through exec, `python -c`, stdin, a generated
# class, a .pyc-only install), its methods' bytecode still says how they use a child: the same
# question as above, answered conservatively. A use this does not recognise as a plain call is
# reported as a use of the child as a container.

# instructions that only push (they read no value of the stack)
_PUSH_ONLY = frozenset({"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_CONST", "LOAD_DEREF", "LOAD_GLOBAL", "LOAD_NAME",
                        "LOAD_CLOSURE", "PUSH_NULL", "LOAD_ASSERTION_ERROR", "LOAD_BUILD_CLASS",
                        "LOAD_SMALL_INT", "LOAD_CLASSDEREF"})
# instructions that leave the stack alone
_NO_STACK = frozenset({"NOP", "CACHE", "EXTENDED_ARG", "KW_NAMES", "RESUME", "PRECALL"})
# instructions -> how many values they read off the stack (the rest are not followed)
_POPS_FIXED = {"LOAD_ATTR": 1, "LOAD_METHOD": 1, "UNARY_NEGATIVE": 1, "UNARY_POSITIVE": 1, "UNARY_NOT": 1,
               "UNARY_INVERT": 1, "BINARY_OP": 2, "BINARY_SUBSCR": 2, "COMPARE_OP": 2, "IS_OP": 2,
               "CONTAINS_OP": 2, "BINARY_SLICE": 3, "GET_ITER": 1, "STORE_FAST": 1, "STORE_DEREF": 1, "STORE_ATTR": 2,
               "STORE_SUBSCR": 3, "POP_TOP": 1,
               # (building `*args` / `**kwargs`: they add the value on top to a list or dict below it)
               "LIST_EXTEND": 1, "LIST_APPEND": 1, "DICT_MERGE": 1, "DICT_UPDATE": 1, "LIST_TO_TUPLE": 1}
_POPS_N = {"BUILD_TUPLE", "BUILD_LIST", "BUILD_SET", "BUILD_SLICE", "BUILD_STRING"}
# what a consuming instruction does with the child, in the report's words
_CONSUMER_WORDS = {"BINARY_SUBSCR": "indexes or slices it", "BINARY_SLICE": "slices it", "STORE_SUBSCR": "indexes it",
                   "GET_ITER": "iterates it", "STORE_FAST": "keeps it in a local variable",
                   "STORE_DEREF": "keeps it in a variable", "STORE_ATTR": "sets an attribute of it",
                   "BUILD_TUPLE": "collects it", "BUILD_LIST": "collects it", "BUILD_SET": "collects it",
                   "RETURN_VALUE": "returns it", "CONTAINS_OP": "tests membership in it",
                   "YIELD_VALUE": "yields it"}


def _call_shape(ins) -> tuple[int, int] | None:
    """For a call instruction: (how many values lie above the callable when it runs, how many
    values it reads off the stack); None for any other instruction. ``CALL n``: the n arguments
    above the callable, with NULL or a bound method's ``self`` next to it (below it up to 3.12,
    above it from 3.13); ``CALL_FUNCTION_EX``: the argument tuple (and the keyword dict) above
    (followed up to 3.12 only)."""
    new_layout = sys.version_info >= (3, 13)
    if ins.opname == "CALL":
        return (ins.arg + 1 if new_layout else ins.arg), ins.arg + 2
    if ins.opname == "CALL_FUNCTION_EX" and not new_layout:
        return 1 + (ins.arg & 1), 3 + (ins.arg & 1)
    return None


def _stack_effect(ins) -> int:
    return dis.stack_effect(ins.opcode, ins.arg) if ins.opcode >= dis.HAVE_ARGUMENT else dis.stack_effect(ins.opcode)


def _value_use(start: int, instrs: list) -> str | None:
    """None when the value the instruction at ``start`` left on top of the stack is called
    (``CALL`` with it as the callable); else what the code does with it instead. Follows the
    stack through the instructions that evaluate the call's arguments; a jump, or an instruction
    it does not know, before the value is used is an answer too (it cannot tell)."""
    above = 0   # values pushed on top of ours and not yet consumed
    for ins in instrs[start + 1:]:
        name = ins.opname
        if name in _NO_STACK:
            continue
        call = _call_shape(ins)
        if call is not None:
            slot, pops = call
            if above == slot:
                return None
            if above < pops:
                return "passes it to a call"
            above += 1 - pops
            continue
        if name in _PUSH_ONLY:
            above += _stack_effect(ins)
            continue
        pops = _POPS_FIXED.get(name)
        if name in _POPS_N:
            pops = ins.arg
        elif name == "BUILD_MAP":
            pops = 2 * ins.arg
        elif name == "BUILD_CONST_KEY_MAP":
            pops = ins.arg + 1
        elif name == "FORMAT_VALUE":
            pops = 2 if ins.arg & 4 else 1   # (with a format spec)
        if pops is None:
            return _CONSUMER_WORDS.get(name, f"uses it in a way fuse() does not follow ({name})")
        if above < pops:
            return _CONSUMER_WORDS.get(name, f"uses it in {name}")
        above += _stack_effect(ins)
    return "uses it in a way fuse() does not follow"


# loads of a variable that fuse() follows (any other instruction naming `self` is not followed)
_SELF_LOADS = frozenset({"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_DEREF"})
_ATTR_LOADS = frozenset({"LOAD_ATTR", "LOAD_METHOD"})
# the instructions that name a local or closure variable
_VARIABLE_OPS = frozenset(dis.haslocal) | frozenset(dis.hasfree)


def _code_objects(code, me: str):
    """``code`` and the code nested in it (comprehensions, lambdas, inner functions) that sees
    ``me`` (as a free variable), each with the name it calls the instance by."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and me in const.co_freevars:
            yield from _code_objects(const, me)


def _bytecode_use(code, me: str, chain: tuple[str, ...], after_fuse: bool) -> str | None:
    """What one code object does with ``me.<chain>`` other than calling it as one module (see
    ``chain_only_called``), or None."""
    dotted = ".".join((me,) + chain)
    instrs = list(dis.get_instructions(code))
    for i, ins in enumerate(instrs):
        if ins.opcode not in _VARIABLE_OPS or (ins.argval != me and not (isinstance(ins.argval, tuple)
                                                                         and me in ins.argval)):
            continue   # (not the instance variable: a constant, attribute or global may share its name)
        if ins.opname == "LOAD_CLOSURE" or ins.opname.startswith(("STORE_", "DELETE_", "MAKE_CELL", "COPY_FREE")):
            continue
        if ins.opname not in _SELF_LOADS:
            return f"reads {me} with {ins.opname}, which fuse() does not follow"
        got: tuple[str, ...] = ()
        at = i
        while True:
            nxt = instrs[at + 1] if at + 1 < len(instrs) else None
            if got == chain:
                if nxt is not None and nxt.opname in _ATTR_LOADS:
                    if nxt.argval in _WHOLE_MODULE_METHODS:
                        break
                    what = "the children of" if nxt.argval in _CHILD_ITERATORS else "the attribute"
                    return f"reads {what} {dotted} ({nxt.argval}) ({_line(code, instrs, at)})"
                use = _value_use(at, instrs)
                if use:
                    return f"{_naming(use, dotted)} ({_line(code, instrs, at)})"
                break
            # a strict prefix of the chain: `self`, `self.D` for `self.D.model`
            if nxt is not None and nxt.opname in _ATTR_LOADS:
                attr = nxt.argval
                if attr == chain[len(got)]:
                    got, at = got + (attr,), at + 1
                    continue
                if after_fuse and attr in _CHILD_ITERATORS and (
                        attr in _DESCENDANT_ITERATORS or len(got) == len(chain) - 1):
                    what = "modules" if attr in _DESCENDANT_ITERATORS else "children"
                    return (f"iterates the {what} of {'.'.join((me,) + got)} ({attr}), which reach {dotted} "
                            f"({_line(code, instrs, at)})")
                break
            if nxt is None or nxt.opname in ("STORE_ATTR", "DELETE_ATTR") or not after_fuse:
                break
            use = _value_use(at, instrs)
            if use:   # (getattr(self, name), vars(self), a helper given `self`: could reach the child)
                return (f"{_naming(use, '.'.join((me,) + got))}, which could reach {dotted} "
                        f"({_line(code, instrs, at)})")
            break
    return None


def _naming(use: str, what: str) -> str:
    """``_value_use``'s words with the value named: "indexes or slices self.D.model"."""
    return re.sub(r"\bit\b", what, use, count=1)


def _line(code, instrs: list, at: int) -> str:
    """Where the instruction at ``at`` comes from: "line 6 of <string>"."""
    lines = (getattr(ins, "line_number", None) or (ins.starts_line if type(ins.starts_line) is int else None)
             for ins in reversed(instrs[:at + 1]))
    line = next((n for n in lines if n), "?")
    return f"line {line} of {code.co_filename}"


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
        for sub in _code_objects(code, me):
            why = _bytecode_use(sub, me, chain, after_fuse)
            if why:
                return why
    return None


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
