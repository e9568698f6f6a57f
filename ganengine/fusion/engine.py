"""The walk that applies the rule table (ganengine/fusion/rules.py) to a module tree.

Per module, children first in this order: early module rules on the children, sequence rules (if
the module is a plain nn.Sequential that its parent only calls), late module rules on the
children, the same walk inside each child, and last the module's own forward through the graph
rules (its children are then in their final form). Modules shared by several parents are
visited once and replaced by the same object everywhere.
"""
from __future__ import annotations

from torch import nn

from ganengine.fusion import checks, copying, graph, rules
from ganengine.fusion.copying import FusedModule
from ganengine.fusion.recognise import Decline
from ganengine.fusion.report import FuseReport, join
from ganengine.nn.attention import SelfAttention2d


def _skip(m: nn.Module) -> bool:
    """Modules whose insides fuse leaves alone: already fused, or ganengine modules whose own
    forward already runs the fused ops over their children (PatchDiscriminator: one built with
    fused=False has its fused forward turned on instead, Fuser.patch_discriminator; a SelfAttention2d
    whose three convs are plain 1x1 convs: it runs them itself, as one C++ block or one stacked
    projection, which a conv rule on any of them would turn off)."""
    if isinstance(m, FusedModule) or m.__dict__.get("_ganengine_fused_wrapper") or checks.compiled(m):
        return True
    if isinstance(m, SelfAttention2d) and m.runs_own_convs():
        return True
    return type(m).__module__ == "ganengine.nn.patch_discriminator"


def _unfused_patch_discriminator(m: nn.Module) -> bool:
    """A ganengine PatchDiscriminator built with ``fused=False``: skipped as the others (its
    children are not rewritten), but its plain forward runs no fused op (Fuser.patch_discriminator)."""
    return type(m).__module__ == "ganengine.nn.patch_discriminator" and not getattr(m, "fused", True)


def _plain_call(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _custom_forward(m: nn.Module) -> bool:
    cls = type(m)
    if _skip(m) or checks.is_torch_class(cls) or cls.__module__.startswith("ganengine.nn"):
        return False
    if checks.plain_sequential(m) or checks.patched_forward(m):
        return False
    fwd = getattr(cls, "forward", None)
    return fwd is not None and not (getattr(fwd, "__module__", "") or "").startswith("torch.")


def _named_modules_outside_compiled(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``root.named_modules()`` without what lies inside a torch.compile'd module: fuse()'s copy
    shares those with the caller's model (structural_copy), so nothing may be rewritten there."""
    inside = [f"{name}." if name else "" for name, m in root.named_modules() if checks.compiled(m)]
    return [(where, m) for where, m in root.named_modules()
            if not checks.compiled(m) and not any(where.startswith(p) for p in inside)]


class Fuser:
    def __init__(self, report: FuseReport):
        self.report = report
        self.replaced: dict[int, nn.Module] = {}   # id(original) -> replacement (shared modules)
        self.settled: set[tuple[int, str]] = set()  # (id, stage) already tried
        self.done: dict[int, nn.Module] = {}       # id(module) -> the module after its walk
        # every module whose id is a key above stays alive until the walk ends: a replaced
        # module freed mid-walk could hand its id to a new one (an Identity) and alias it
        self.keep: list[nn.Module] = []
        self.parents: dict[int, int] = {}           # id(module) -> how many parents hold it (run)
        self.aliased: dict[int, str] = {}           # id(module) -> the plain attribute also holding it (run)

    # ------------------------------------------------------------------ module rules
    def single(self, m: nn.Module, where: str, stage: str) -> nn.Module:
        if id(m) in self.replaced:
            return self.replaced[id(m)]
        if _skip(m) or (id(m), stage) in self.settled:
            return m
        self.settled.add((id(m), stage))
        self.keep.append(m)
        for rule in rules.module_rules(stage):
            if not rule.match(m):
                continue
            if id(m) in self.aliased:
                self.report.decline(rule.name, where, self._alias_reason(m))
                break
            out = rule.build(m)
            if out is None:
                continue
            if isinstance(out, Decline):
                self.report.decline(rule.name, where, out.reason)
                break
            out.train(m.training)
            self.replaced[id(m)] = out
            self.report.add(rule.name, where)
            return out
        return m

    def children_rules(self, m: nn.Module, where: str, stage: str) -> None:
        for name, child in list(m._modules.items()):
            if child is not None:
                new = self.single(child, join(where, name), stage)
                if new is not child:
                    m._modules[name] = new

    # ------------------------------------------------------------------ sequences
    def sequences(self, seq: nn.Sequential, where: str, refuse: str | None) -> None:
        names = list(seq._modules)
        i = 0
        while i < len(names):
            step = 1
            for rule in rules.sequence_rules():
                k = len(rule.pattern)
                group = [seq._modules[n] for n in names[i:i + k]]
                if len(group) < k or any(g is None or _skip(g) for g in group):
                    continue
                if not all(match(g) for match, g in zip(rule.pattern, group)):
                    continue
                alias = next((g for g in group if id(g) in self.aliased), None)
                why = self._alias_reason(alias) if alias is not None else refuse
                if why:
                    self.report.decline(rule.name, join(where, names[i]), why)
                    break
                out = rule.build(*group, parents=self.parents) if rule.needs_parents else rule.build(*group)
                if out is None:
                    continue
                if isinstance(out, Decline):
                    self.report.decline(rule.name, join(where, names[i]), out.reason)
                    continue
                split = self._split_by(group, out)
                if split is not None:
                    self.report.decline(rule.name, join(where, names[i]), split)
                    break
                for n, old, new in zip(names[i:i + k], group, out):
                    if new is not old:   # a module kept (edited inside) keeps its children's modes
                        new.train(old.training)
                    seq._modules[n] = new
                fused_at = next((n for n, new in zip(names[i:i + k], out) if not isinstance(new, nn.Identity)), names[i])
                self.report.add(rule.name, join(where, fused_at))
                step = k
                break
            i += step

    def _split_by(self, group, out) -> str | None:
        """Why a sequence rule's replacements would split a shared module (checks.shared_reason), or
        None. (An activation the rule folds away leaves an Identity in this place only; the module
        itself is untouched wherever else it sits. A rule that edits inside a module checks before
        its edit: pre_activation.)"""
        for old, new in zip(group, out):
            if new is not old and not isinstance(new, nn.Identity):
                why = checks.shared_reason(old, self.parents)
                if why:
                    return why
        return None

    # ------------------------------------------------------------------ the walk
    def walk(self, m: nn.Module, where: str, refuse_sequences: str | None = None,
             above: tuple = ()) -> nn.Module:
        """``above``: ``(ancestor, path from it to m)`` for each ancestor of ``m`` on this walk's path
        (whose code may reach into ``m``: ``self.G.model``)."""
        if id(m) in self.done:
            return self.done[id(m)]
        self.done[id(m)] = m
        self.keep.append(m)
        if checks.compiled(m):   # (the copy shares it with the caller's model: see structural_copy)
            self.report.decline("*", where, checks.COMPILED_REASON)
            return m
        if _skip(m):
            if _unfused_patch_discriminator(m):
                self.patch_discriminator(m, where)
            return m
        self.children_rules(m, where, "early")
        if isinstance(m, nn.Sequential):
            refuse = refuse_sequences
            if not checks.plain_sequential(m):
                refuse = f"{type(m).__name__} is an nn.Sequential with its own forward"
            self.sequences(m, where, refuse)
        self.children_rules(m, where, "late")
        for name, child in list(m._modules.items()):
            if child is None:
                continue
            chains = ((m, (name,)),) + tuple((holder, path + (name,)) for holder, path in above)
            refuse = checks.used_as_container(chains) if isinstance(child, nn.Sequential) else None
            new = self.walk(child, join(where, name), refuse, chains)
            if new is not child:
                m._modules[name] = new
        if _custom_forward(m):
            new = graph.rewrite(m, where, self.report)
            if new is not None:
                new.train(m.training)
                self.done[id(m)] = new
                return new
        return m

    def patch_discriminator(self, m: nn.Module, where: str) -> None:
        """A PatchDiscriminator built with ``fused=False`` keeps its plain layers and runs
        ``self.model(x)``; its own fused forward (what ``fused=True`` builds) runs the fused ops
        over the same modules: turn it on (same modules, keys and tensors, the same numbers within
        the fused ops' rounding) and report the groups it fuses (``fused_groups``)."""
        model = m._modules.get("model")
        rule = "patch_discriminator"
        if checks.patched_forward(m):
            self.report.decline(rule, where, "the PatchDiscriminator's forward is patched on the instance")
            return
        if type(model) is not nn.Sequential or checks.patched_forward(model) or not _plain_call(model):
            # (the fused forward walks the children without calling `model`: its hooks would not run)
            self.report.decline(rule, join(where, "model"),
                                "its `model` is not a plain nn.Sequential without hooks, which the fused "
                                "forward walks without calling it")
            return
        groups = m.fused_groups()
        if not groups:
            return
        m.fused = True
        for i, name in groups:
            self.report.add(name, join(where, f"model.{i}"))

    def _alias_reason(self, m: nn.Module) -> str:
        return (f"the {type(m).__name__} is also held by the attribute `{self.aliased[id(m)]}` (not a submodule): "
                "code calling it through that attribute would not see a replacement")

    def run(self, root: nn.Module) -> nn.Module:
        why = checks.global_hooks()
        if why is None and checks.compiled(root):
            # (its forward is bound to the module it compiled: a fused copy of the tree would never run)
            why = checks.COMPILED_REASON
        if why:
            self.report.decline("*", "", why)
            return root
        self.aliased = copying.aliased_modules(root)
        self.parametrizations(root)
        for m in root.modules():                    # each module once: count its children's parents
            for child in m._modules.values():
                if child is not None:
                    self.parents[id(child)] = self.parents.get(id(child), 0) + 1
        for stage in ("early", "late"):
            root = self.single(root, "", stage)
        return self.walk(root, "")

    def parametrizations(self, root: nn.Module) -> None:
        """Module rules on the parametrizations themselves (PyTorch's spectral norm -> ganengine's,
        ganengine/nn/spectral_norm.py), first: a conv the sequence rules then fuse keeps the
        swapped parametrization (their fused modules are not walked into)."""
        from torch.nn.utils import parametrize

        for where, m in _named_modules_outside_compiled(root):
            if parametrize.is_parametrized(m) and not _skip(m):
                for name, plist in m.parametrizations.items():
                    self.children_rules(plist, join(where, f"parametrizations.{name}"), "early")

