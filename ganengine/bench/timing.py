"""The one timing core of ganengine's benchmarks (``ganengine bench`` and every
``benchmarks/bench_*.py`` script time through :func:`interleave`).

* :func:`interleave`: several variants (ganengine, eager, torch.compile, ...) timed in turns in
  one process, after warm-up, several repeats each, median per variant. Taking turns means a
  change in machine load (up to 8 agents share 2 cores here) hits every variant alike, so the
  ratios between them stay fair even where the absolute times do not.
* :func:`time_cpu` (one function), :func:`time_cuda` (``triton.testing.do_bench``).
* :func:`summarize`: median, interquartile range, min, max of the samples.
* :func:`load_note`: the machine's load, to print beside every figure.
* :func:`count_kernels`: kernels one call issues (torch.profiler on CUDA; aten ops, plus Triton
  launches under the interpreter, without a GPU).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, ContextManager, Mapping

import torch


def summarize(samples_ms: list[float]) -> dict:
    """{median, q1, q3, iqr, min, max, mean, repeats} of a list of times in ms."""
    if not samples_ms:
        raise ValueError("summarize: no samples")
    s = sorted(samples_ms)
    if len(s) >= 2:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        q1 = q3 = s[0]
    return {"median": statistics.median(s), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": s[0], "max": s[-1], "mean": statistics.fmean(s), "repeats": len(s)}


def cuda_sync(device) -> Callable[[], None] | None:
    """The ``sync`` argument of :func:`interleave` for ``device`` (None off CUDA)."""
    device = torch.device(device)
    return torch.cuda.synchronize if device.type == "cuda" else None


def interleave(calls: Mapping[str, Callable[[], object]], repeats: int, *, warmup: int = 2,
               per_round: int = 1, round_warmup: int = 0, calls_per_sample: int = 1,
               alternate: bool = False, scopes: Mapping[str, Callable[[], ContextManager]] | None = None,
               sync: Callable[[], None] | None = None, budget_s: float | None = None,
               min_repeats: int = 1, on_error: Callable[[str, BaseException], None] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, dict]:
    """Time every variant of ``calls`` ({name: zero-argument callable}) in turns.

    ``warmup`` untimed calls of each variant first (compilation, caches, allocator). Then
    rounds: in each, every variant takes one turn of ``round_warmup`` untimed calls and
    ``per_round`` timed samples (a few steps in a row keep a variant's own allocation pattern,
    as in a training loop), each sample ``calls_per_sample`` calls (their mean: for calls of a
    few microseconds, where the clock's own cost matters). Rounds repeat until every variant
    has ``repeats`` samples, or, with ``budget_s``, until the whole run took longer than that and
    there are at least ``min_repeats`` each. ``alternate`` reverses the turn order every other
    round (nobody always runs on the cache the other left warm).

    ``scopes[name]`` gives a context manager entered around each of that variant's calls,
    outside the clock (a backend selection, a policy). ``sync`` runs before each clock reading
    (``torch.cuda.synchronize`` on a GPU: see :func:`cuda_sync`). A variant that raises is
    dropped and reported to ``on_error(name, exc)`` (without ``on_error`` the error
    propagates). Returns {name: :func:`summarize` of its samples in ms}, for variants with
    samples, in the order of ``calls``.
    """
    if repeats < 1 or per_round < 1 or calls_per_sample < 1:
        raise ValueError(f"interleave: repeats, per_round and calls_per_sample must be >= 1, got "
                         f"{repeats}, {per_round}, {calls_per_sample}")
    scopes = scopes or {}
    live = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in calls}

    def fail(name, exc):
        if on_error is None:
            raise exc
        live.remove(name)
        on_error(name, exc)

    for name in list(live) if warmup else ():
        try:
            with scopes.get(name, contextlib.nullcontext)():
                for _ in range(warmup):
                    calls[name]()
        except Exception as exc:
            fail(name, exc)
    sync = sync or (lambda: None)
    start = clock()
    r = 0
    while live and min(len(samples[n]) for n in live) < repeats:
        order = live[::-1] if alternate and r % 2 else list(live)
        for name in order:
            fn = calls[name]
            try:
                with scopes.get(name, contextlib.nullcontext)():
                    for _ in range(round_warmup):
                        fn()
                    for _ in range(min(per_round, repeats - len(samples[name]))):
                        sync()
                        t0 = clock()
                        for _ in range(calls_per_sample):
                            fn()
                        sync()
                        samples[name].append((clock() - t0) * 1e3 / calls_per_sample)
            except Exception as exc:
                fail(name, exc)
        r += 1
        if (budget_s is not None and live and clock() - start > budget_s
                and min(len(samples[n]) for n in live) >= min_repeats):
            break
    return {name: summarize(s) for name, s in samples.items() if s and name in live}


def medians(results: Mapping[str, dict]) -> dict[str, float]:
    """{name: median ms} of :func:`interleave`'s result."""
    return {name: s["median"] for name, s in results.items()}


def time_cpu(fn: Callable[[], object], warmup: int = 3, repeats: int = 20,
             budget_s: float = 5.0, min_repeats: int = 5) -> dict:
    """Time ``fn`` on CPU: ``warmup`` untimed calls, then up to ``repeats`` timed calls (fewer
    if they exceed ``budget_s``, never fewer than ``min_repeats``). Threads are whatever
    ``torch.set_num_threads`` was pinned to by the caller (see runner.pinned_threads)."""
    return interleave({"fn": fn}, repeats, warmup=warmup, budget_s=budget_s, min_repeats=min_repeats)["fn"]


def time_cuda(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> dict:
    """Time ``fn`` on the current CUDA device with triton.testing.do_bench (CUDA events, L2
    flushed between calls); falls back to plain CUDA events when triton is missing."""
    try:
        from triton.testing import do_bench
    except Exception:  # pragma: no cover - triton ships with CUDA torch
        do_bench = None
    if do_bench is not None:
        samples = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        return summarize([float(x) for x in samples])
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b))
    return summarize(samples)


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def load_note() -> str:
    """One line saying how busy the machine was: print it with every table of timings."""
    load = load_average()
    cores = os.cpu_count()
    busy = "" if load is None or cores is None or load < 0.75 * cores else \
        " (busy: absolute times are noise, only the interleaved ratios mean something)"
    where = "n/a" if load is None else f"{load:.2f}"
    return (f"load average (1 min) {where} on {cores} logical cores, {torch.get_num_threads()} torch threads"
            f"{busy}")


def count_kernels(fn: Callable[[], object], device="cpu") -> dict:
    """Kernels one call of ``fn`` issues: {"kernels", "triton_launches", "aten_ops", "method"}.

    On a CUDA device: the device kernels torch.profiler records (``method="profiler"``).
    Without a GPU: the aten ops dispatched (each one kernel on a GPU; views and bare
    allocations excluded), and under the Triton interpreter (``TRITON_INTERPRET=1``) the Triton
    launches plus the aten ops around them, ganengine's own ops counted by their launches
    (``method="interpreter"``). Call it after a warm-up call (caches, lazy tables).
    """
    device = torch.device(device)
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset", "[memory]"))]
        from ganengine.bench.profile import ganengine_kernel_names

        ours = ganengine_kernel_names()  # ganengine's Triton kernels; inductor's are named triton_*
        triton = [e for e in kernels if e.name in ours or e.name.startswith("triton_")]
        return {"kernels": len(kernels), "triton_launches": len(triton), "aten_ops": None, "method": "profiler"}
    from ganengine import backends
    from ganengine.bench.traffic import EagerTraffic

    if backends.triton_interpret():
        from ganengine.bench.traffic import TritonTraffic

        with TritonTraffic() as tt, EagerTraffic(skip_namespaces=("ganengine", "ganengine_C")) as around:
            fn()
        return {"kernels": len(tt.launches) + around.num_kernels, "triton_launches": len(tt.launches),
                "aten_ops": around.num_kernels, "method": "interpreter"}
    with EagerTraffic() as eager:
        fn()
    return {"kernels": eager.num_kernels, "triton_launches": 0, "aten_ops": eager.num_kernels, "method": "aten"}


def kernel_table(calls: Mapping[str, Callable[[], object]], device="cpu",
                 scopes: Mapping[str, Callable[[], ContextManager]] | None = None) -> str:
    """Markdown table of :func:`count_kernels` per variant (each called once first, untimed;
    ``scopes`` as in :func:`interleave`)."""
    lines = ["| variant | kernels per call | Triton launches | aten ops | counted by |",
             "| --- | ---: | ---: | ---: | --- |"]
    for name, fn in calls.items():
        with (scopes or {}).get(name, contextlib.nullcontext)():
            fn()
            c = count_kernels(fn, device)
        cell = lambda v: "" if v is None else str(v)  # noqa: E731
        lines.append(f"| {name} | {c['kernels']} | {cell(c['triton_launches'])} | {cell(c['aten_ops'])} | "
                     f"{c['method']} |")
    return "\n".join(lines)
