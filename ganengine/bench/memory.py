"""Peak memory of one call: CUDA allocator statistics on GPU, resident-set high-water on CPU.

Both report the extra memory the call needs above what was allocated before it (inputs and
parameters excluded): activations, outputs, workspaces, saved tensors.

CPU: Linux keeps a per-process RSS high-water mark (``VmHWM``) that writing ``5`` to
``/proc/self/clear_refs`` resets to the current RSS. :func:`cpu_peak_bytes` resets it, reads
``VmRSS`` as the baseline, runs the call and reads ``VmHWM``: a high-water mark without a child
process per measurement. Where clear_refs is not writable (not Linux, a restricted
container), the call is measured in a spawned child process instead (``ru_maxrss`` of a fresh
process minus its baseline), through :func:`cpu_peak_bytes_in_child`. Small allocations are
served from the C allocator's free lists without growing RSS, so figures below ~1 MiB are noise.
"""
from __future__ import annotations

import os
from typing import Callable

import torch


def cuda_peak_bytes(fn: Callable[[], object], device=None) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def hwm_resettable() -> bool:
    """Whether this process can reset its RSS high-water mark (Linux clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``).

    After warm-up calls, memory freed by the previous call stays resident in malloc's arenas
    (glibc raises its mmap threshold after large frees), so the measured call would reuse it
    without growing RSS and read as ~0. Trimming first makes the call fault its memory in again.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def cpu_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Extra resident memory during ``fn()`` (bytes), or None where it cannot be measured."""
    _release_free_heap()
    if not hwm_resettable():
        return None
    base = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if base is None or peak is None:
        return None
    return max(0, peak - base) * 1024


def _child(conn, builder, args):  # runs in the spawned process
    import resource

    try:
        fn = builder(*args)
        # no warm-up: ru_maxrss never goes down, so a warm-up call would hide the measured one
        # (first-call lazy initialisation is therefore included in this fallback's figure)
        _release_free_heap()
        before_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        before_rss = _status_kib("VmRSS")  # what is resident now, not the import-time peak
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # no growth: the call stayed under an earlier peak (imports), so its size is unknown
        if peak <= before_peak or before_rss is None:
            conn.send(("ok", None))
        else:
            conn.send(("ok", max(0, peak - before_rss) * 1024))
    except Exception as exc:  # report, do not hang the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def cpu_peak_bytes_in_child(builder: Callable, args: tuple, timeout_s: float = 300.0) -> int | None:
    """Peak extra RSS of ``builder(*args)()`` measured in a fresh spawned process.

    ``builder`` must be a picklable module-level function returning the call to measure. The
    child's ``ru_maxrss`` after building (inputs allocated) is the baseline; a call that stays
    below an earlier peak of the child (import time) cannot be seen and gives None.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, builder, args), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            return None
        status, value = parent.recv()
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
    return value if status == "ok" else None


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    if device.type == "cuda":
        return cuda_peak_bytes(fn, device)
    return cpu_peak_bytes(fn)


def physical_cores() -> int:
    """Physical cores (threads pinned to this for CPU timing); logical count if unknown."""
    try:
        cores = set()
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((phys, core))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1
