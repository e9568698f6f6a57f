"""Runs benchmark cases under every runner and collects one record per measurement.

Runners:
  eager              the case's plain PyTorch reference (for models: the model built with
                     ``fused=False``, i.e. the reference's plain nn modules, run on the torch
                     backend so that no ganengine kernel runs inside it)
  compile            ``torch.compile`` of the same reference code (op cases)
  ganengine:auto     the ganengine function under backend "auto": the route a user's call takes
                     (it may leave a call on eager's own ops where a fused kernel would only add
                     host time: eval batch norm, forward-only attention)
  ganengine:<name>   the ganengine function under backend <name> in strict mode (a backend
                     that cannot serve the call is reported as skipped, never silently timed
                     as a fallback)

Modes: ``forward`` (under ``torch.no_grad``), ``forward_backward`` (forward + ``autograd.grad``
with respect to every input that is trained, random upstream gradients), ``step`` (models).

Autocast (``run(..., autocast="bf16")``; on the command line, the ``autocast`` family of
cases_autocast.py, ``ganengine bench --ops autocast``): every runner's op call, the eager
reference's and ganengine's alike, runs inside its own
``torch.autocast(device, dtype)`` region (:func:`autocast_workload`), the region an AMP training
step opens around its forward; the backward runs outside it, as autocast's documentation asks.
Model steps are not timed so (their mixed precision is the trainer's ``--amp``, with its scaler).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import traceback
from typing import Callable, Iterable

import torch

from ganengine import backends
from ganengine.bench import memory, timing
from ganengine.bench.registry import BenchCase, Workload, all_cases, shape_label

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64, "fp64": torch.float64}


# --autocast names -> the autocast dtype (CPU AMP users run bfloat16; CUDA: float16 or bfloat16)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                   "float16": torch.float16}


class Skip(Exception):
    """A runner that does not apply to a case (reported with its reason, not as an error)."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def parse_autocast(name: str | torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype ``name`` asks for (None: no autocast)."""
    if name is None or isinstance(name, torch.dtype) and name in AUTOCAST_DTYPES.values():
        return name
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be one of {sorted(AUTOCAST_DTYPES)} (or left out), got {name!r}")
    return AUTOCAST_DTYPES[name]


def under_autocast(fn: Callable, device_type: str, dtype: torch.dtype) -> Callable:
    """``fn`` run inside a fresh ``torch.autocast(device_type, dtype)`` region per call: the region
    an AMP step opens around its forward, so ATen's cache of a weight's cast lives for one call,
    as it lives for one step (a region held across calls would keep it warm: unlike training)."""
    def call(*args):
        with torch.autocast(device_type, dtype=dtype):
            return fn(*args)

    call.autocast = (device_type, dtype)   # (what the region is: reports and tests read it)
    return call


def autocast_workload(work: Workload, device: torch.device | str, dtype: torch.dtype) -> Workload:
    """``work`` with its reference and its fused function each under :func:`under_autocast`
    (same region, same inputs); the backward of a forward_backward call stays outside it."""
    if work.reference is None or work.fused is None:
        raise Skip("autocast applies to op cases (a reference and a fused function)")
    device_type = torch.device(device).type
    return dataclasses.replace(work, reference=under_autocast(work.reference, device_type, dtype),
                               fused=under_autocast(work.fused, device_type, dtype))


def default_runners(device: torch.device, with_compile: bool = True) -> list[str]:
    """eager, compile, ganengine:auto (what a user's call runs), and on CUDA every ganengine native
    backend that serves the device (each kernel family's own figure).

    On the CPU ``auto`` is the cpu backend wherever a fused kernel serves the call, so
    ``ganengine:cpu`` is not timed a second time (ask for it with ``--runners``); the Triton
    interpreter is left out (a correctness tool, not a speed figure): ``ganengine:triton``.
    """
    names = ["eager"] + (["compile"] if with_compile else []) + ["ganengine:auto"]
    if device.type == "cuda":
        names += [f"ganengine:{b}" for b in ("triton", "cuda") if backends.serves(b, device)]
    return names


def check_runner(name: str) -> str:
    if name in ("eager", "compile"):
        return name
    if name.startswith("ganengine:") and name.split(":", 1)[1] in backends.CHOICES:
        return name
    raise ValueError(f"runner must be 'eager', 'compile' or 'ganengine:<backend>' with backend in "
                     f"{backends.CHOICES}, got {name!r}")


@contextlib.contextmanager
def backend_scope(name: str):
    """Select backend ``name`` strictly ("auto": as a user's call, which has no backend to fall
    back from), in this thread (use_backend) and in autograd's device threads (they do not
    inherit context variables, so the environment is set too)."""
    saved = {k: os.environ.get(k) for k in ("GANENGINE_BACKEND", "GANENGINE_STRICT")}
    strict = name != "auto"
    os.environ["GANENGINE_BACKEND"] = name
    os.environ["GANENGINE_STRICT"] = "1" if strict else "0"
    try:
        with backends.use_backend(name), backends.strict(strict):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def pinned_threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def _float_tensors(obj) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def make_call(case: BenchCase, work: Workload, mode: str, runner: str) -> Callable[[], object]:
    """The zero-argument callable to time for (case, mode, runner)."""
    if case.kind == "model":
        if runner == "compile":
            raise Skip("torch.compile of a whole training step is not benchmarked")
        if runner == "eager" and work.reference_step is not None:
            return work.reference_step
        return work.step
    if runner == "compile":
        if not case.compile_ok:
            raise Skip("torch.compile does not apply to this case")
        fn = torch.compile(work.reference, dynamic=False)
    elif runner == "eager":
        fn = work.reference
    else:
        fn = work.fused
    args = work.args
    if mode == "forward":
        def call():
            with torch.no_grad():
                return fn(*args)
        return call
    if mode != "forward_backward":
        raise ValueError(f"mode {mode!r} does not apply to op cases")
    leaves = list(args)
    for i in work.grad_args:
        leaves[i] = args[i].detach().requires_grad_(True)
    inputs = [leaves[i] for i in work.grad_args]
    with torch.no_grad():
        outs = _float_tensors(work.reference(*args))
    grads = [torch.randn_like(o) for o in outs]

    def call_fb():
        out = _float_tensors(fn(*leaves))
        return torch.autograd.grad(out, inputs, grads, allow_unused=True)

    return call_fb


def _max_abs_err(a, b) -> float | None:
    ta, tb = _float_tensors(a), _float_tensors(b)
    if not ta or len(ta) != len(tb):
        return None
    return max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in zip(ta, tb))


def child_call(case_name: str, params: dict, mode: str, runner: str, device: str, dtype: str,
               autocast: str | None = None):
    """Rebuild one measurement's call in a fresh process (memory.cpu_peak_bytes_in_child)."""
    case = all_cases()[case_name]
    work = case.setup(params, torch.device(device), parse_dtype(dtype))
    if autocast is not None:
        work = autocast_workload(work, device, parse_autocast(autocast))
    call = make_call(case, work, mode, runner)
    scope = _scope_for(case, work, runner)

    def scoped():
        with scope():
            return call()
    return scoped


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _record(case: BenchCase, params: dict, mode, runner, device, dtype, autocast=None) -> dict:
    """One measurement's record with every field present (None until measured)."""
    return {"case": case.name, "family": case.family, "kind": case.kind, "mode": mode,
            "shape": params, "shape_label": shape_label(params), "device": device.type,
            "dtype": _dtype_name(dtype), "autocast": _dtype_name(autocast), "runner": runner,
            "status": "ok", "reason": None,
            "time_ms": None, "peak_mem_bytes": None, "max_abs_err": None, "first_call_s": None,
            "speedup_vs_eager": None, "speedup_vs_compile": None}


def _scope_for(case: BenchCase, work: Workload, runner: str):
    """The backend scope a runner's calls run in: ``ganengine:<b>`` -> backend b (strict but auto);
    a model's ``eager`` (and ``compile``) baseline -> the torch backend, always: the plain model
    (``fused=False``) still reaches ganengine's C++ ops through the layers and losses it shares
    with the fused one (conv_act, batch_norm_act, the losses), and on the auto backend those would
    run ganengine's kernels inside the baseline; without a plain model, the fused model on the
    torch backend is the baseline. Op cases' eager reference is plain PyTorch already."""
    backend = runner.split(":", 1)[1] if runner.startswith("ganengine:") else None
    if backend is None and case.kind == "model":
        backend = "torch"
    return (lambda: backend_scope(backend)) if backend else contextlib.nullcontext


def _fail(rec: dict, exc: BaseException) -> None:
    if isinstance(exc, Skip):
        rec.update(status="skipped", reason=str(exc))
    elif isinstance(exc, backends_fallback_error()):
        rec.update(status="skipped", reason=f"backend cannot serve this call: {exc}")
    else:
        rec.update(status="error", reason=f"{type(exc).__name__}: {exc}")
        if os.environ.get("GANENGINE_DEBUG"):
            traceback.print_exc()


def run_group(case: BenchCase, params: dict, work: Workload, mode: str, runners: list[str],
              device: torch.device, dtype: torch.dtype, cfg: dict) -> list[dict]:
    """Measure every runner on one (case, shape, mode).

    On CPU the runners' timed calls are interleaved by ``timing.interleave`` (one call of each
    per round), so a change in machine load hits all of them alike and the ratios stay fair.
    """
    recs, live = [], []
    region = getattr(work.fused, "autocast", None)   # (device type, dtype) of an autocast workload
    for runner in runners:
        rec = _record(case, params, mode, runner, device, dtype, region[1] if region else None)
        if runner == "ganengine:triton" and device.type == "cpu":
            rec["note"] = "Triton interpreter: a correctness path, its times are not performance figures"
        recs.append(rec)
        try:
            call = make_call(case, work, mode, runner)
            scope = _scope_for(case, work, runner)
            with scope():
                t0 = time.perf_counter()
                result = call()  # first call: compilation / autotuning / lazy init, not timed
                if device.type == "cuda":
                    torch.cuda.synchronize()
                rec["first_call_s"] = time.perf_counter() - t0
                if mode == "forward" and case.kind == "op":
                    with torch.no_grad():
                        rec["max_abs_err"] = _max_abs_err(result, work.reference(*work.args))
                if device.type == "cuda":
                    rec["time_ms"] = timing.time_cuda(call, warmup_ms=cfg["warmup_ms"], rep_ms=cfg["rep_ms"])
            live.append((rec, call, scope))
        except Exception as exc:
            _fail(rec, exc)
    if device.type == "cpu" and live:
        by_name = {rec["runner"]: rec for rec, _, _ in live}
        times = timing.interleave(
            {rec["runner"]: call for rec, call, _ in live}, cfg["repeats"], warmup=cfg["warmup"],
            scopes={rec["runner"]: scope for rec, _, scope in live}, min_repeats=cfg["min_repeats"],
            budget_s=cfg["budget_s"] * len(live), on_error=lambda name, exc: _fail(by_name[name], exc))
        for name, summary in times.items():
            by_name[name]["time_ms"] = summary
    for rec, call, scope in live:
        if rec["status"] != "ok" or not cfg["memory"]:
            continue
        try:
            with scope():
                rec["peak_mem_bytes"] = memory.peak_bytes(call, device)
            rec["peak_mem_method"] = "cuda_allocator" if device.type == "cuda" else "rss_hwm"
            if rec["peak_mem_bytes"] is None and device.type == "cpu":
                rec["peak_mem_bytes"] = memory.cpu_peak_bytes_in_child(
                    child_call, (case.name, params, mode, rec["runner"], device.type, rec["dtype"], rec["autocast"]))
                rec["peak_mem_method"] = "rss_child_process"
        except Exception as exc:
            _fail(rec, exc)
    return recs


def backends_fallback_error():
    from ganengine.ops._dispatch import BackendFallbackError

    return BackendFallbackError


def add_speedups(records: list[dict]) -> None:
    """speedup_vs_eager / speedup_vs_compile (median time ratios) on every ok record."""
    key = lambda r: (r["case"], r["shape_label"], r["mode"], r["device"], r["dtype"])
    base: dict = {}
    for r in records:
        if r["status"] == "ok" and r["runner"] in ("eager", "compile") and r["time_ms"] is not None:
            base[key(r) + (r["runner"],)] = r["time_ms"]["median"]
    for r in records:
        for ref in ("eager", "compile"):
            b = base.get(key(r) + (ref,))
            ok = (r["status"] == "ok" and b is not None and r["time_ms"] is not None
                  and r["time_ms"]["median"] > 0)
            r[f"speedup_vs_{ref}"] = (b / r["time_ms"]["median"]) if ok else None


def run(cases: Iterable[BenchCase], device: str | torch.device = "cpu", dtype="float32",
        quick: bool = False, runners: list[str] | None = None, modes: list[str] | None = None,
        threads: int | None = None, repeats: int | None = None, warmup: int | None = None,
        budget_s: float | None = None, measure_memory: bool = True,
        progress: Callable[[str], None] | None = None, autocast: str | torch.dtype | None = None) -> dict:
    """Benchmark ``cases``; returns ``{"settings": ..., "records": [...]}``. ``autocast`` ("bf16",
    "fp16"): every op call of every runner inside its own autocast region (module docstring)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available (use --device cpu)")
    dtype = parse_dtype(dtype)
    amp = parse_autocast(autocast)
    check_autocast(amp, dtype)
    if runners is not None and not list(runners):
        raise ValueError("no runner to measure (runners=[]): name at least one, or pass None for the defaults")
    # a name given twice is measured once (twice would be two records of one runner, with one timing)
    runners = list(dict.fromkeys(check_runner(r) for r in (runners or default_runners(device))))
    size = "quick" if quick else "ref"
    cfg = {"warmup": 1 if quick else 5, "repeats": repeats or (10 if quick else 30),
           "min_repeats": min(3 if quick else 5, repeats or 5),
           "budget_s": budget_s or (1.0 if quick else 10.0), "memory": measure_memory,
           "warmup_ms": 10 if quick else 25, "rep_ms": 30 if quick else 100}
    if warmup is not None:
        cfg["warmup"] = warmup
    records: list[dict] = []
    n_threads = threads or (memory.physical_cores() if device.type == "cpu" else None)
    with pinned_threads(n_threads) as used_threads:
        for case in cases:
            for params in case.shape_list(size):
                if amp is not None and case.kind != "op":
                    records.extend(_autocast_skips(case, params, runners, device, dtype, amp))
                    continue
                try:
                    work = case.setup(params, device, dtype)
                    if amp is not None:
                        work = autocast_workload(work, device, amp)
                except Exception as exc:
                    rec = _record(case, params, None, None, device, dtype, amp)
                    rec.update(status="error", reason=f"setup failed: {type(exc).__name__}: {exc}")
                    records.append(rec)
                    continue
                for mode in case.modes:
                    if modes and mode not in modes and not (case.kind == "model"):
                        continue
                    if progress:
                        progress(f"{case.name} [{shape_label(params)}] {mode}: {', '.join(runners)}")
                    records.extend(run_group(case, params, work, mode, runners, device, dtype, cfg))
                del work
    add_speedups(records)
    settings = {"device": device.type, "dtype": _dtype_name(dtype), "size": size,
                "runners": runners, "threads": used_threads if device.type == "cpu" else None,
                "timer": "triton.testing.do_bench" if device.type == "cuda" else "time.perf_counter",
                **{k: v for k, v in cfg.items()}, "autocast": _dtype_name(amp)}
    return {"settings": settings, "records": records}


def check_autocast(amp: torch.dtype | None, dtype: torch.dtype) -> None:
    """Autocast casts float32 inputs (what an AMP user's model holds): other input dtypes are a
    usage error, said before anything is measured."""
    if amp is not None and dtype != torch.float32:
        raise ValueError(f"autocast runs float32 inputs under an autocast region: with autocast "
                         f"{_dtype_name(amp)}, dtype must be float32, got {_dtype_name(dtype)}")


def _autocast_skips(case, params, runners, device, dtype, amp) -> list[dict]:
    """A model case under autocast: one skipped record per runner (the model is not built)."""
    recs = []
    for name in runners:
        rec = _record(case, params, "step", name, device, dtype, amp)
        rec.update(status="skipped", reason="autocast times op cases only: a model step's mixed precision "
                                            "is the trainer's --amp (autocast plus its gradient scaler)")
        recs.append(rec)
    return recs
