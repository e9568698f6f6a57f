"""Wall-clock timing: CUDA (triton.testing.do_bench, CUDA events) and CPU (perf_counter).

Every figure is a distribution summary over repeats: median, interquartile range, min, max.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

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


def time_cpu(fn: Callable[[], object], warmup: int = 3, repeats: int = 20,
             budget_s: float = 5.0, min_repeats: int = 5) -> dict:
    """Time ``fn`` on CPU: ``warmup`` untimed calls, then up to ``repeats`` timed calls (fewer
    if they exceed ``budget_s``, never fewer than ``min_repeats``). Threads are whatever
    ``torch.set_num_threads`` was pinned to by the caller (see runner.pinned_threads)."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if i + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return summarize(samples)


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
