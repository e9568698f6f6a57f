"""Profile training steps (or an op's forward+backward) with torch.profiler.

Writes a Chrome trace and a table of the top operators by self time, each tagged with who ran
it: ``ganengine`` (the fused custom ops in the ``ganengine::`` / ``ganengine_C::`` namespaces,
ganengine's Triton kernels, and aten ops those call, such as the Winograd conv's GEMMs) or
``pytorch`` (everything else: what is left to fuse).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import pkgutil
from typing import Callable

import torch

FUSED_PREFIXES = ("ganengine::", "ganengine_C::")
_PROFILER_KEYS = ("ProfilerStep", "ganengine.profile", "[memory]")


def ganengine_kernel_names() -> set[str]:
    """Names of the @triton.jit kernels in ganengine.kernels (how their launches are named)."""
    names: set[str] = set()
    try:
        import ganengine.kernels as kpkg
        from triton.runtime.jit import JITFunction
    except Exception:
        return names
    for info in pkgutil.iter_modules(kpkg.__path__):
        try:
            mod = importlib.import_module(f"ganengine.kernels.{info.name}")
        except Exception:
            continue
        for attr, obj in vars(mod).items():
            if isinstance(obj, JITFunction):
                names.add(getattr(obj, "__name__", attr))
    return names


def ganengine_function_names() -> set[str]:
    """Names the profiler records for ganengine's own autograd.Functions, forward and backward node
    (the eager twins are named "ganengine::<op>"; _TritonFn, _AdvFn, SpectralNormFn, ... are not)."""
    names: set[str] = set()
    todo = list(torch.autograd.Function.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("ganengine."):
            names.update((cls.__name__, cls.__name__ + "Backward"))
    # ganengine's optimisers: torch.optim.Optimizer names each step "Optimizer.step#<Class>.step"
    # (the aten ops inside it, e.g. the fused update, are then ganengine's via their cpu_parent)
    try:
        importlib.import_module("ganengine.models.fused_rmsprop")
    except Exception:
        pass
    todo = list(torch.optim.Optimizer.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("ganengine."):
            names.add(f"Optimizer.step#{cls.__name__}.step")
    return names


def classify(key: str, kernel_names: set[str]) -> str:
    """"ganengine" | "pytorch" | "profiler" for one profiler event name (``kernel_names``: the
    Triton kernels' names and ganengine_function_names())."""
    if key.startswith(_PROFILER_KEYS):
        return "profiler"
    if key.startswith(FUSED_PREFIXES) or key in kernel_names:
        return "ganengine"
    if key.startswith("GeneratedBackwardFor_ganengine_"):  # autograd node of a ganengine op
        return "ganengine"
    # the C++ autograd Functions' nodes (the lean entries): "autograd::engine::evaluate_function:
    # torch::autograd::CppNode<ganengine::bn::(anonymous namespace)::BatchNormActFn>"
    if "CppNode<ganengine::" in key:
        return "ganengine"
    return "pytorch"


def op_workload(case_name: str, device, dtype, size: str) -> Callable[[], object]:
    """forward+backward of an op case (the profile target until/unless a model is named), or its
    forward where the case has no backward mode (an optimiser step: ``modes=("forward",)``)."""
    from ganengine.bench.registry import all_cases
    from ganengine.bench.runner import make_call

    case = all_cases()[case_name]
    work = case.setup(case.shape_list(size)[0], device, dtype)
    return make_call(case, work, op_mode(case), "ganengine:auto")


def op_mode(case) -> str:
    """The mode an op case is profiled in: forward+backward when the case registers it, else
    the case's first mode."""
    return "forward_backward" if "forward_backward" in case.modes else case.modes[0]


def model_workload(name: str, device, size: str) -> Callable[[], object]:
    from ganengine.bench.registry import all_cases

    case = all_cases()[name]
    return case.setup(case.shape_list(size)[0], device, torch.float32).step


def resolve_target(target: str) -> tuple[str, str]:
    """("model" | "op", case name) for a model name, op case name or op family."""
    from ganengine.bench.registry import all_cases
    from ganengine.bench.cases_models import MODEL_SPECS

    cases = all_cases()
    if target in cases:
        return cases[target].kind, target
    for c in cases.values():
        if c.kind == "op" and c.family == target:
            return "op", c.name
    available = sorted(cases)
    if target in MODEL_SPECS:
        raise ValueError(f"model {target!r} is not available in this build (ganengine.models does not "
                         f"provide it yet); profile targets available: {available}")
    raise ValueError(f"unknown profile target {target!r}; expected a model or op, one of {available}")


def _group_of(evt, kernel_names: set[str], cache: dict, creators: dict | None = None) -> str:
    """An event's group. An aten op called from inside a ganengine op (the Winograd conv's GEMMs,
    say) belongs to ganengine: it is work ganengine chose to do, not something left to fuse. So
    does the backward of such an op (the 1x1 convs inside attention: ConvolutionBackward0): the
    autograd engine's events carry the sequence number of the forward op that created their
    node and the forward thread (``sequence_nr``, ``fwd_thread``); ``creators`` maps
    (thread, sequence number) to that forward op (:func:`_creators`)."""
    key = id(evt)
    if key in cache:
        return cache[key]
    cache[key] = "pytorch"  # (provisional: no cycle can make an event its own ancestor)
    group = classify(evt.name, kernel_names)
    if group == "pytorch":
        creator = _creator_of(evt, creators)
        parent = getattr(evt, "cpu_parent", None)
        if creator is not None and _group_of(creator, kernel_names, cache, creators) == "ganengine":
            group = "ganengine"
        elif parent is not None and _group_of(parent, kernel_names, cache, creators) == "ganengine":
            group = "ganengine"
    cache[key] = group
    return group


def _is_backward(evt) -> bool:
    return bool(getattr(evt, "fwd_thread", 0)) and getattr(evt, "sequence_nr", -1) >= 0


def _creator_of(evt, creators: dict | None):
    if not creators or not _is_backward(evt):
        return None
    creator = creators.get((evt.fwd_thread, evt.sequence_nr))
    return None if creator is evt else creator


def _depth(evt) -> int:
    n, parent = 0, getattr(evt, "cpu_parent", None)
    while parent is not None:
        n, parent = n + 1, getattr(parent, "cpu_parent", None)
    return n


def _creators(events) -> dict:
    """(thread, sequence number) -> the forward op event that created the autograd node with that
    number. Every op that goes through autograd records the thread's next sequence number (it only
    advances when a node is created), so several events share one: an outer composite op, ops that
    created no node, and last the op that created the node. The creator is the latest to start
    (ties: the deepest)."""
    out: dict = {}
    rank: dict = {}
    for evt in events:
        seq = getattr(evt, "sequence_nr", -1)
        if seq is None or seq < 0 or _is_backward(evt):
            continue
        k = (getattr(evt, "thread", None), seq)
        r = (getattr(getattr(evt, "time_range", None), "start", 0), _depth(evt))
        if k not in out or r >= rank[k]:
            out[k], rank[k] = evt, r
    return out


def top_table(prof, kernel_names: set[str], use_device: bool, top: int = 25) -> dict:
    agg: dict[tuple[str, str], dict] = {}
    cache: dict = {}
    events = prof.events()
    creators = _creators(events)
    for evt in events:
        group = _group_of(evt, kernel_names, cache, creators)
        if group == "profiler":
            continue
        row = agg.setdefault((evt.name, group), {"name": evt.name, "group": group, "calls": 0, "self_time_us": 0.0,
                                                 "self_cpu_time_us": 0.0, "self_device_time_us": 0.0})
        row["calls"] += 1
        row["self_cpu_time_us"] += float(evt.self_cpu_time_total)
        row["self_device_time_us"] += float(getattr(evt, "self_device_time_total", 0.0) or 0.0)
    rows = []
    for row in agg.values():
        row["self_time_us"] = row["self_device_time_us"] if use_device else row["self_cpu_time_us"]
        if row["self_time_us"] > 0 or row["calls"] > 0:
            rows.append(row)
    rows.sort(key=lambda r: r["self_time_us"], reverse=True)
    total = sum(r["self_time_us"] for r in rows) or 1.0
    groups: dict[str, dict] = {}
    for r in rows:
        r["percent"] = 100.0 * r["self_time_us"] / total
        g = groups.setdefault(r["group"], {"self_time_us": 0.0, "ops": 0, "calls": 0})
        g["self_time_us"] += r["self_time_us"]
        g["ops"] += 1
        g["calls"] += r["calls"]
    for g in groups.values():
        g["percent"] = 100.0 * g["self_time_us"] / total
    return {"time_kind": "device" if use_device else "cpu", "total_self_time_us": total,
            "groups": groups, "top": rows[:top], "all_ops": len(rows)}


def markdown(result: dict) -> str:
    t = result["table"]
    what = result["target_kind"] + (f", {result['mode']}" if result.get("mode") not in (None, "step") else "")
    lines = [f"Profile of `{result['target']}` ({what}), {result['steps']} steps on "
             f"{result['device']}, backend {result['backend']}; self {t['time_kind']} time.", "",
             "| group | self time ms | share | operators | calls |", "|---|---|---|---|---|"]
    for name, g in sorted(t["groups"].items(), key=lambda kv: -kv[1]["self_time_us"]):
        lines.append(f"| {name} | {g['self_time_us'] / 1e3:.2f} | {g['percent']:.1f}% | {g['ops']} | {g['calls']} |")
    lines += ["", f"Top {len(t['top'])} of {t['all_ops']} operators by self time:", "",
              "| operator | ran by | calls | self time ms | share |", "|---|---|---|---|---|"]
    for r in t["top"]:
        lines.append(f"| `{r['name']}` | {r['group']} | {r['calls']} | {r['self_time_us'] / 1e3:.3f} | "
                     f"{r['percent']:.1f}% |")
    return "\n".join(lines) + "\n"


def run_profile(target: str, steps: int = 5, warmup: int = 1, output: str = "profile_results",
                device: str | None = None, quick: bool = False, backend: str = "auto",
                top: int = 25) -> dict:
    """Profile ``steps`` steps of ``target``; writes trace.json, profile.json, profile.md."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from ganengine import backends
    from ganengine.bench.runner import backend_scope

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    if backend not in backends.CHOICES:
        raise ValueError(f"backend must be one of {backends.CHOICES}, got {backend!r}")
    if backend not in ("auto", "torch") and not backends.serves(backend, dev):
        raise ValueError(f"backend {backend!r} cannot run on {dev.type} in this process "
                         f"({backends.status().get(backend, 'unavailable')})")
    kind, name = resolve_target(target)
    size = "quick" if quick else "ref"
    os.makedirs(output, exist_ok=True)
    scope = backend_scope(backend) if backend != "auto" else contextlib.nullcontext()
    with scope:
        fn = model_workload(name, dev, size) if kind == "model" else op_workload(name, dev, torch.float32, size)
        for _ in range(warmup):
            fn()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=activities, record_shapes=False) as prof:
            for i in range(steps):
                with record_function(f"ganengine.profile.step{i}"):
                    fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
    trace_path = os.path.join(output, "trace.json")
    prof.export_chrome_trace(trace_path)
    table = top_table(prof, ganengine_kernel_names() | ganengine_function_names(), use_device=dev.type == "cuda", top=top)
    from ganengine.bench.machine import machine_info
    from ganengine.bench.registry import all_cases

    result = {"format": "ganengine-profile", "version": 1, "target": target, "target_kind": kind,
              "case": name, "mode": op_mode(all_cases()[name]) if kind == "op" else "step", "steps": steps, "warmup": warmup, "device": dev.type, "size": size,
              "backend": backend, "trace": os.path.basename(trace_path), "table": table,
              "machine": machine_info()}
    with open(os.path.join(output, "profile.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(output, "profile.md"), "w") as f:
        f.write("# ganengine profile\n\n" + markdown(result))
    return result
