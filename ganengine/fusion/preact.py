"""Pre-activation blocks: the activation a block applies first to its input, moved into the
epilogue of the op that produced that input (the ``pre_activation`` sequence rule).

pix2pix's U-Net (junyanz ``UnetSkipConnectionBlock``) is a Sequential
``[LeakyReLU(0.2, inplace), Conv, BN, <inner block>, ReLU(inplace), ConvT, BN]`` whose inner
block starts its own Sequential with ``LeakyReLU(0.2, inplace)`` and returns
``torch.cat([x, self.model(x)], 1)``. The BN's output ``x`` is read by the activation *and*, as
the skip connection, by the ``cat``; because the activation is in place, the ``cat`` reads the
activated tensor (the reference's quirk). So every reader of ``x`` sees ``act(x)``, and
``BN -> act`` can be one fused op with the block's activation replaced by ``nn.Identity()``.

``fold_slot(block, parents)`` decides whether that is exact, per block:

* the block is a plain ``nn.Sequential`` whose first entry is the activation (its input's only
  reader), or a module with its own forward, traced with torch.fx (children as leaves, the same
  graph in training and eval mode, a forward fx records faithfully: graph.source_reason), where
  the first node that reads the input is one call of a child that is the activation or a plain
  Sequential (only called) starting with it;
* if the input has other readers (the skip connection), they come after that call in the graph
  and the activation is in place: they read ``act(x)`` in the original too. A non-in-place
  activation leaves them the raw input: declined;
* the block, and the Sequential holding the activation, have one parent each and no hooks (a
  forward pre-hook would see the activated input), and that child is called once.

The answer is ``(container, name, act)``: the slot to set to ``nn.Identity()`` once the
producer's fused build succeeded; ``None`` when the block does not start with an activation of
its input (silent); a ``Decline`` when it does and the move is not exact.
"""
from __future__ import annotations

from torch import nn

from ganengine.fusion import checks
from ganengine.fusion.recognise import Decline


def _act(m) -> bool:
    return type(m) in (nn.ReLU, nn.LeakyReLU)


def _first(seq: nn.Module):
    for name, m in seq._modules.items():
        if m is not None:
            return name, m
    return None, None


def _user_block(m: nn.Module) -> bool:
    from ganengine.fusion.copying import FusedModule

    cls = type(m)
    return not (isinstance(m, FusedModule) or checks.is_torch_class(cls) or cls.__module__.startswith("ganengine.")
                or checks.patched_forward(m))


def starts_with_act(m: nn.Module) -> bool:
    """Cheap structural test: a plain Sequential whose first entry is ReLU / LeakyReLU, or a user
    block with such a child (an activation, or a plain Sequential starting with one)."""
    if isinstance(m, nn.Sequential):
        return checks.plain_sequential(m) and _act(_first(m)[1])
    if not _user_block(m):
        return False
    return any(_act(c) or (isinstance(c, nn.Sequential) and checks.plain_sequential(c) and _act(_first(c)[1]))
               for c in m._modules.values() if c is not None)


def _hooked(*mods) -> str | None:
    for m in mods:
        why = checks.hooks_reason(m)
        if why:
            return why
    return None


def _shared(m: nn.Module, parents: dict) -> str | None:
    n = parents.get(id(m), 0)
    if n > 1:
        return f"{type(m).__name__} is used in {n} places (its input would be activated for all of them)"
    return None


def fold_slot(block: nn.Module, parents: dict):
    """Where ``block``'s leading activation sits, if moving it before the block is exact (see the
    module doc): ``(container, name, act)``, ``None`` or ``Decline(reason)``."""
    cls = type(block).__name__
    if isinstance(block, nn.Sequential):
        name, act = _first(block)
        why = _shared(block, parents) or _hooked(block, act)
        return Decline(why) if why else (block, name, act)

    from ganengine.fusion import graph as G

    why = G.source_reason(block)
    if why is None:
        try:
            g = G._trace(block, True)
            if g.python_code("self").src != G._trace(block, False).python_code("self").src:
                why = "its traced forward differs between training and eval mode"
        except Exception as exc:  # fx could not trace it: we cannot see what reads the input
            why = f"torch.fx could not trace it ({type(exc).__name__})"
    if why is not None:
        return Decline(f"cannot follow what reads {cls}'s input: {why}")
    x = next((n for n in g.nodes if n.op == "placeholder"), None)
    first = next((n for n in g.nodes if x is not None and x in n.all_input_nodes), None)
    if first is None or first.op != "call_module" or "." in first.target or first.args != (x,) or first.kwargs:
        return None
    child = block._modules.get(first.target)
    if _act(child):
        slot = (block, first.target, child)
        holder = None
    elif isinstance(child, nn.Sequential) and checks.plain_sequential(child) and _act(_first(child)[1]):
        name, act = _first(child)
        slot, holder = (child, name, act), child
    else:
        return None
    act = slot[2]
    calls = [n for n in g.nodes if n.op in ("call_module", "get_attr") and n is not first
             and (n.target == first.target or n.target.startswith(first.target + "."))]
    if calls:
        return Decline(f"{cls}.forward uses self.{first.target} more than once")
    others = [u for u in x.users if u is not first]
    if others and not getattr(act, "inplace", False):
        return Decline(f"{cls}'s input is also read by {others[0].name} (a skip connection) and the activation "
                       f"is not in place, so that reader sees the raw input: the activation must stay in the block")
    why = _shared(block, parents) or _hooked(block, act)
    if why is None and holder is not None:
        why = _shared(holder, parents) or _hooked(holder) or checks.child_only_called(block, first.target)
    return Decline(why) if why else slot


def apply(slot) -> None:
    """Replace the activation in its slot by ``nn.Identity()`` (after the producer took it)."""
    container, name, act = slot
    ident = nn.Identity()
    ident.train(act.training)
    container._modules[name] = ident

