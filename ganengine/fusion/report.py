"""What ``ganengine.fuse(model, return_report=True)`` tells the caller.

``FuseReport`` is a ``dict`` ``{rule name: number of replacements}`` (the shape the report has
always had, so ``report["conv2d"]`` and ``report.get("batch_norm+act", 0)`` keep working), with
the details beside it:

* ``replaced``: ``(where, rule)`` for every replacement, ``where`` the module's qualified name
  in the fused model (``"model.3"``; ``""`` is the model itself);
* ``declined``: ``Declined(where, rule, reason)`` for every candidate a rule matched by structure
  and then refused because it could not keep the numbers exactly (hooks, a forward it does not
  know, a state it does not understand, ...);
* ``traced``: the qualified names of the modules whose ``forward`` was traced (torch.fx) and
  rewritten, and ``not_traced``: ``(where, reason)`` for those it tried and could not trace
  (data-dependent control flow, ...); their children still went through the module rules.

``print(report)`` gives all of it in a few lines.
"""
from __future__ import annotations

from typing import NamedTuple


class Declined(NamedTuple):
    where: str
    rule: str
    reason: str


class FuseReport(dict):
    """``{rule: count}`` plus ``replaced``, ``declined``, ``traced`` and ``not_traced``."""

    def __init__(self):
        super().__init__()
        self.replaced: list[tuple[str, str]] = []
        self.declined: list[Declined] = []
        self.traced: list[str] = []
        self.not_traced: list[tuple[str, str]] = []

    def add(self, rule: str, where: str) -> None:
        self[rule] = self.get(rule, 0) + 1
        self.replaced.append((where, rule))

    def decline(self, rule: str, where: str, reason: str) -> None:
        entry = Declined(where, rule, reason)
        if entry not in self.declined:  # a shared module is met once per path: say it once
            self.declined.append(entry)

    def declined_by_rule(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.declined:
            out[d.rule] = out.get(d.rule, 0) + 1
        return out

    def __str__(self) -> str:
        lines = ["fused: " + (", ".join(f"{rule} x{n}" for rule, n in self.items()) or "nothing")]
        for d in self.declined:
            lines.append(f"declined {d.rule} at {d.where or '<model>'}: {d.reason}")
        if self.traced:
            lines.append("traced: " + ", ".join(w or "<model>" for w in self.traced))
        for where, reason in self.not_traced:
            lines.append(f"not traced {where or '<model>'}: {reason}")
        return "\n".join(lines)


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
