"""``ganengine.fuse(model)``: rewrite an existing model onto the fused ops.

Two kinds of rewrite rules, registered by the op families' module files (ganengine/nn/*.py):

* pair rules: inside an ``nn.Sequential``, a child ``a`` immediately followed by ``b`` (for
  example InstanceNorm2d -> LeakyReLU) becomes ``fused(a, b)`` at a's index and ``nn.Identity()``
  at b's index. Indices, and so state_dict keys, stay the same: the fused module owns a's
  parameters and buffers under the same names, and Identity owns none. A rule whose parameters
  live in ``b`` (ReflectionPad2d -> Conv2d) registers ``place="second"``: the fused module goes
  to b's index and Identity to a's.
* module rules: a module that matches (for example a SAGAN ``Self_Attn``) is swapped for a
  fused module with the same parameter names. A rule registered ``after_pairs=True`` (the plain
  Conv2d / ConvTranspose2d rules) runs after the pair rules, on what they left, so that a
  Conv2d -> LeakyReLU pair still fuses as a pair.

A rule's builder returns None to decline a match it cannot represent exactly (an activation
with ``inplace`` semantics it cannot keep, a module in a state it does not understand...);
the original modules then stay as they are. Outputs and training behaviour are unchanged.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn


@dataclass
class PairRule:
    name: str
    first: Callable[[nn.Module], bool]
    second: Callable[[nn.Module], bool]
    build: Callable[[nn.Module, nn.Module], Optional[nn.Module]]
    place: str = "first"


@dataclass
class ModuleRule:
    name: str
    match: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], Optional[nn.Module]]
    after_pairs: bool = False


PAIR_RULES: list[PairRule] = []
MODULE_RULES: list[ModuleRule] = []


def register_pair_rule(name, first, second, build, place: str = "first") -> None:
    if place not in ("first", "second"):
        raise ValueError(f"register_pair_rule: place must be 'first' or 'second', got {place!r}")
    PAIR_RULES.append(PairRule(name, first, second, build, place))


def register_module_rule(name, match, build, after_pairs: bool = False) -> None:
    MODULE_RULES.append(ModuleRule(name, match, build, after_pairs))


def _copy_training_state(new: nn.Module, old: nn.Module) -> nn.Module:
    new.train(old.training)
    return new


def _has_hooks(m: nn.Module) -> bool:
    # forward (pre-)hooks (e.g. the hook-based torch.nn.utils.spectral_norm recomputing `weight`
    # before each call) cannot be carried over exactly: such modules are declined
    return bool(m._forward_pre_hooks or m._forward_hooks)


def _apply_module_rules(module: nn.Module, counts: dict[str, int], after_pairs: bool) -> None:
    for child_name, child in list(module.named_children()):
        if _has_hooks(child):
            if not after_pairs:
                counts["declined: forward hooks"] = counts.get("declined: forward hooks", 0) + 1
            continue
        for rule in MODULE_RULES:
            if rule.after_pairs == after_pairs and rule.match(child):
                new = rule.build(child)
                if new is not None:
                    setattr(module, child_name, _copy_training_state(new, child))
                    counts[rule.name] = counts.get(rule.name, 0) + 1
                break


def _fuse_children(module: nn.Module, counts: dict[str, int]) -> None:
    # module rules first, on every child
    _apply_module_rules(module, counts, after_pairs=False)
    # pair rules inside Sequential containers
    if isinstance(module, nn.Sequential):
        names = list(module._modules.keys())
        i = 0
        while i + 1 < len(names):
            a, b = module._modules[names[i]], module._modules[names[i + 1]]
            fused = None
            for rule in PAIR_RULES:
                if rule.first(a) and rule.second(b) and not (_has_hooks(a) or _has_hooks(b)):
                    fused = rule.build(a, b)
                    if fused is not None:
                        owner = a if rule.place == "first" else b
                        keep, drop = (names[i], names[i + 1]) if rule.place == "first" else (names[i + 1], names[i])
                        module._modules[keep] = _copy_training_state(fused, owner)
                        module._modules[drop] = nn.Identity()
                        counts[rule.name] = counts.get(rule.name, 0) + 1
                        break
            i += 2 if fused is not None else 1
    _apply_module_rules(module, counts, after_pairs=True)
    for child in module.children():
        _fuse_children(child, counts)


def fuse(module: nn.Module, inplace: bool = False, return_report: bool = False):
    """Rewrite ``module`` so that fusable layer patterns run on ganengine's fused ops.

    Same state_dict keys, same outputs, same training behaviour. Returns the rewritten module
    (a deep copy unless ``inplace``), and with ``return_report=True`` also ``{rule: count}``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fuse(module): expected an nn.Module, got {type(module).__name__}")
    # make sure every op family has registered its rules
    import ganengine.nn  # noqa: F401

    target = module if inplace else copy.deepcopy(module)
    counts: dict[str, int] = {}
    # the root itself may match a module rule
    for rule in sorted(MODULE_RULES, key=lambda r: r.after_pairs):
        if rule.match(target) and not _has_hooks(target):
            new = rule.build(target)
            if new is not None:
                target = _copy_training_state(new, target)
                counts[rule.name] = counts.get(rule.name, 0) + 1
            break
    _fuse_children(target, counts)
    return (target, counts) if return_report else target
