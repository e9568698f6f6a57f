"""``ganengine.fuse(model)``: rewrite an existing model onto the fused ops.

    fused = ganengine.fuse(model)                      # or fuse(model, inplace=True)
    fused, report = ganengine.fuse(model, return_report=True)
    print(report)                                      # what was fused, declined, traced

The fused model has the same state_dict keys, computes the same outputs and gradients, updates
the same running statistics and power-iteration buffers, and holds the SAME Parameter and
buffer objects as ``model``, with or without ``inplace``: an optimiser built before ``fuse()``
trains the fused model. Without ``inplace`` the module objects are copied (``model`` keeps its
own tree and stays usable; the two share their tensors); with it ``model``'s tree is rewritten.
Either way use the returned module: when ``model`` itself is replaced (a SAGAN block, a module
whose forward is rewritten) the return value is the fused one (in place, a rewritten forward is
installed on ``model`` itself as well).

What is rewritten, the rule table and its order: ganengine/fusion/rules.py; forwards written as
calls: ganengine/fusion/graph.py; why and what was measured: docs/fuse.md. A pattern a rule
cannot represent exactly is declined (left as it is, and listed in the report), never an error.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ganengine.fusion.report import Declined, FuseReport

__all__ = ["fuse", "FuseReport", "Declined", "register_pair_rule", "register_module_rule"]


def fuse(module: nn.Module, inplace: bool = False, return_report: bool = False,
         keep_channels_last: bool = False):
    """Rewrite ``module`` so that fusable layer patterns run on ganengine's fused ops.

    Args:
        module: any ``nn.Module`` (DataParallel / DistributedDataParallel wrappers included).
        inplace: rewrite ``module``'s own tree instead of a copy of its module objects. The
            Parameters and buffers are the same objects either way.
        return_report: also return a ``FuseReport``: ``{rule: count}`` (a dict) with
            ``.replaced``, ``.declined`` (where, rule, reason), ``.traced``, ``.not_traced``.
        keep_channels_last: the fused instance norms keep a channels_last input's layout (NHWC
            networks stay NHWC: no conversion per norm). By default they give what
            ``nn.InstanceNorm2d`` gives, a contiguous output, so that what follows behaves as
            before (dropout draws its mask in memory order; ``.view`` needs the layout).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fuse(module): expected an nn.Module, got {type(module).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"fuse(inplace=...): expected a bool, got {type(inplace).__name__}")
    if not isinstance(keep_channels_last, bool):
        raise TypeError(f"fuse(keep_channels_last=...): expected a bool, got {type(keep_channels_last).__name__}")
    from ganengine.fusion import graph
    from ganengine.fusion.copying import FusedModule, structural_copy
    from ganengine.fusion.engine import Fuser
    from ganengine.fusion.rules import KEEP_LAYOUT

    report = FuseReport()
    target = module if inplace else structural_copy(module)
    devices = sorted({t.device.index or 0 for t in list(target.parameters()) + list(target.buffers()) if t.is_cuda})
    threads = torch.get_num_threads()
    host_rng = graph.rng_states()   # (put back at the end: fuse() does not move a seeded run's streams)
    try:
        # the rules' probes run tiny tensors: one thread (several spin-wait on each other on a
        # busy machine: measured 10x slower); and they must not move the caller's RNG
        torch.set_num_threads(1)
        layout = KEEP_LAYOUT.set(keep_channels_last)
        with torch.random.fork_rng(devices=devices):
            fused = Fuser(report).run(target)
    finally:
        KEEP_LAYOUT.reset(layout)
        torch.set_num_threads(threads)
        graph.restore_rng_states(host_rng)
    if not inplace:  # a copy named the caller's spectral-norm group: it gets its own
        from ganengine.nn.spectral_norm import rebind_copied_groups

        rebind_copied_groups(fused)
    if inplace and fused is not module and isinstance(fused, FusedModule) \
            and isinstance(fused, type(module)):
        # the model's own forward was rewritten: install it on the caller's object too
        module.__class__ = type(fused)
        module.__dict__.clear()
        module.__dict__.update(fused.__dict__)
        fused = module
    return (fused, report) if return_report else fused


# ----------------------------------------------------------------------------- extension points
def register_pair_rule(name: str, first: Callable[[nn.Module], bool], second: Callable[[nn.Module], bool],
                       build: Callable[[nn.Module, nn.Module], Optional[nn.Module]], place: str = "first") -> None:
    """Add a rule for two consecutive children of an nn.Sequential: ``build(a, b)`` returns the
    fused module (owning the parameters of ``a`` for ``place="first"``, of ``b`` for "second")
    or None to decline. Tried after the built-in sequence rules. A pair where either module has
    hooks or a forward patched on the instance is declined with the reason before ``build``."""
    from ganengine.fusion import rules

    if place not in ("first", "second"):
        raise ValueError(f"register_pair_rule: place must be 'first' or 'second', got {place!r}")

    def build_pair(a, b):
        why = _hooks_reason(a) or _hooks_reason(b)
        if why:
            from ganengine.fusion.recognise import Decline

            return Decline(why)
        fused = build(a, b)
        if fused is None:
            return None
        return [fused, nn.Identity()] if place == "first" else [nn.Identity(), fused]

    rules.EXTRA_SEQUENCE_RULES.append(rules.SequenceRule(name, (first, second), build_pair))


def register_module_rule(name: str, match: Callable[[nn.Module], bool],
                         build: Callable[[nn.Module], Optional[nn.Module]], after_pairs: bool = False) -> None:
    """Add a rule replacing one module: ``build(m)`` returns the replacement (same function, same
    keys) or None. ``after_pairs`` runs it after the sequence rules. Tried after the built-in
    module rules of its stage. A matched module with hooks or a forward patched on the instance is
    declined with the reason before ``build`` is asked (its replacement would not carry them)."""
    from ganengine.fusion import rules

    rules.EXTRA_MODULE_RULES.append(rules.ModuleRule(name, match, _declining_hooked(build),
                                                     "late" if after_pairs else "early"))


def _hooks_reason(m: nn.Module) -> str | None:
    """Why a registered rule may not replace ``m``: hooks on it (forward / backward, state-dict) or a
    forward patched on the instance, which its replacement would not carry; else None."""
    from ganengine.fusion import checks

    why = checks.hooks_reason(m)
    if why is None and checks.patched_forward(m):
        why = f"{type(m).__name__}'s forward was replaced on the instance"
    return why


def _declining_hooked(build: Callable[[nn.Module], Optional[nn.Module]]):
    """``build`` behind the check every built-in rule makes (``_hooks_reason``): a hooked module is
    declined with the reason, so its hooks keep firing on the module left in place."""
    from ganengine.fusion.recognise import Decline

    def guarded(m: nn.Module):
        why = _hooks_reason(m)
        return Decline(why) if why else build(m)

    guarded.__name__ = getattr(build, "__name__", "build")
    return guarded
