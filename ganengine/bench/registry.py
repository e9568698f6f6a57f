"""Registry of benchmark cases: one per op (forward, forward+backward) and per model step.

An op family plugs in with one call (see ``cases_ops.py``; eval / forward-only module calls:
``cases_eval.py``; op cases under autocast: ``cases_autocast.py``)::

    register(OpCase(
        name="instance_norm_act", family="norm_act",
        shapes={"ref": [dict(n=1, c=64, h=256, w=256)], "quick": [dict(n=2, c=8, h=16, w=16)]},
        setup=make_inputs,          # (params, device, dtype) -> Workload
    ))

A :class:`Workload` holds the inputs and two functions computing the same thing: ``reference``
(plain PyTorch, what a user writes without ganengine: the eager and torch.compile baseline) and
``fused`` (the ganengine op, run under each backend). Model cases give ``step`` instead: one
full training step (see ``cases_models.py``).

Registration is lazy: :func:`load_builtin` imports the case modules, and each registers only
what exists in this build (ops whose module imports, models once ``ganengine.models`` has them).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

MODES = ("forward", "forward_backward")
SIZES = ("ref", "quick")


@dataclasses.dataclass
class Workload:
    """Inputs plus the functions to time. ``args`` are passed positionally to both functions."""

    args: tuple = ()
    reference: Callable | None = None      # plain PyTorch composition
    fused: Callable | None = None          # ganengine public function
    grad_args: tuple[int, ...] = ()        # indices of args that get gradients in forward_backward
    step: Callable[[], Any] | None = None  # model cases: one training step on the fused model
    reference_step: Callable[[], Any] | None = None  # same step, plain PyTorch model (eager baseline)
    nbytes_note: str = ""


@dataclasses.dataclass
class BenchCase:
    """One benchmark subject. ``kind`` is "op" or "model"."""

    name: str
    family: str
    kind: str
    shapes: dict[str, list[dict]]
    setup: Callable[[dict, Any, Any], Workload]
    modes: tuple[str, ...] = MODES
    description: str = ""
    # torch.compile applies (op cases: compile the reference function)
    compile_ok: bool = True
    # shape used for traffic counting under the interpreter (None: the first quick shape)
    traffic_shape: dict | None = None
    # the fused function launches Triton kernels on the triton backend (False: aten ops only,
    # e.g. an optimiser step on torch's fused kernel; its kernels are counted as aten ops)
    triton_kernels: bool = True

    def shape_list(self, size: str) -> list[dict]:
        if size not in self.shapes:
            raise ValueError(f"size must be one of {tuple(self.shapes)}, got {size!r}")
        return self.shapes[size]


def shape_label(params: dict) -> str:
    """Short stable label for a shape dict, e.g. ``n=1,c=64,h=256,w=256``."""
    return ",".join(f"{k}={v}" for k, v in params.items())


_CASES: dict[str, BenchCase] = {}


def register(case: BenchCase, replace: bool = False) -> BenchCase:
    if case.kind not in ("op", "model"):
        raise ValueError(f"BenchCase.kind must be 'op' or 'model', got {case.kind!r}")
    bad = [m for m in case.modes if m not in MODES + ("step",)]
    if bad:
        raise ValueError(f"BenchCase.modes must be drawn from {MODES + ('step',)}, got {bad}")
    if case.name in _CASES and not replace:
        raise ValueError(f"benchmark case {case.name!r} is already registered")
    _CASES[case.name] = case
    return case


def unregister(name: str) -> None:
    _CASES.pop(name, None)


_loaded = False


def load_builtin() -> None:
    """Register the built-in op and model cases that exist in this build (idempotent)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from ganengine.bench import cases_autocast, cases_eval, cases_models, cases_ops

    cases_ops.register_all()
    cases_autocast.register_all(dict(_CASES))   # op cases under torch.autocast (family "autocast")
    cases_eval.register_all()   # eval / forward-only module calls (family "eval")
    cases_models.register_all()


def all_cases() -> dict[str, BenchCase]:
    load_builtin()
    return dict(_CASES)


def select(ops: list[str] | None = None, models: list[str] | None = None) -> list[BenchCase]:
    """Cases named in ``ops``/``models`` (case name or family name; "all" or None: every one).

    Passing only ``ops`` selects no models and vice versa; passing neither selects everything.
    """
    cases = all_cases()
    op_cases = [c for c in cases.values() if c.kind == "op"]
    model_cases = [c for c in cases.values() if c.kind == "model"]

    def pick(pool, wanted, what):
        if wanted is None:
            return []
        if wanted == [] or "all" in wanted:
            return pool
        out = []
        for w in wanted:
            hit = [c for c in pool if c.name == w or c.family == w]
            if not hit:
                names = sorted({c.name for c in pool} | {c.family for c in pool})
                raise ValueError(f"unknown {what} {w!r}; available in this build: {names or 'none'}")
            out.extend(c for c in hit if c not in out)
        return out

    if ops is None and models is None:
        return op_cases + model_cases
    return pick(op_cases, ops, "op") + pick(model_cases, models, "model")
