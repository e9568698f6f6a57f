"""Per-call cost of every fused op at a tiny shape: host time and kernels per call.

At GAN batch sizes a GPU spends microseconds per op, so a fused call pays off only if it costs no
more host time, and launches no more kernels, than the eager ops it replaces (the cost rule).
At a tiny shape the arithmetic is negligible and what is left is exactly that per-call cost.

* host time: the fused op (on the CPU, through the backend ``auto`` picks: the path a user's
  call takes) against the plain PyTorch composition it replaces, forward and forward+backward,
  measured interleaved (rounds of ``calls`` calls of one, then the other, so drift and
  frequency changes hit both alike) with one thread; the median over rounds, per call.
* kernels per call on the CUDA path: counted without a GPU, under the Triton interpreter: every
  Triton launch of the fused op plus every aten op issued around it (each one kernel on a GPU),
  against the aten ops of the eager composition (``ganengine.bench.traffic_table``), each
  counted on a call after a warm-up call (the first call's lazy work is not a per-call cost).
* ``--autocast bf16`` (or fp16): both sides' calls each inside their own
  ``torch.autocast("cpu", dtype)`` region (``runner.autocast_workload``: what an AMP user runs, the
  backward outside the region). The kernel counts would be another call's (the traffic table
  runs the triton backend strictly and no autocast region), so the table leaves them out then, and
  for the ``autocast`` family.
"""
from __future__ import annotations

import time

import torch

from ganengine.bench import timing
from ganengine.bench.registry import BenchCase, shape_label
from ganengine.bench.runner import autocast_workload, parse_autocast, pinned_threads
from ganengine.bench.traffic import _tensors


def tiny_shape(case: BenchCase) -> dict:
    """The case's ``tiny`` shape if it registers one, else its smallest traffic/quick shape."""
    if "tiny" in case.shapes:
        return case.shapes["tiny"][0]
    return case.traffic_shape or case.shape_list("quick")[0]


def _calls(work, grads):
    """(reference, fused) zero-argument callables for forward and forward+backward."""
    args = work.args

    def fb(fn):
        leaves = list(args)
        for i in work.grad_args:
            leaves[i] = args[i].detach().requires_grad_(True)
        inputs = [leaves[i] for i in work.grad_args]

        def call():
            outs = [t for t in _tensors(fn(*leaves)) if t.is_floating_point()]
            return torch.autograd.grad(outs, inputs, grads, allow_unused=True)

        return call

    def fwd(fn):
        def call():
            with torch.no_grad():
                return fn(*args)

        return call

    return {"forward": (fwd(work.reference), fwd(work.fused)),
            "forward_backward": (fb(work.reference), fb(work.fused))}


def case_calls(case: BenchCase, device, params: dict | None = None, autocast=None) -> tuple[dict, dict]:
    """(params, {mode: (reference, fused)}) of an op case at ``params`` (its tiny shape by default)
    on ``device``, for the modes the case registers: zero-argument callables, forward under
    no_grad and forward+backward with fixed random output gradients; with ``autocast`` (a dtype
    or its name) each side's forward in its own autocast region."""
    params = params or tiny_shape(case)
    work = case.setup(params, torch.device(device), torch.float32)
    amp = parse_autocast(autocast)
    if amp is not None:
        work = autocast_workload(work, device, amp)
    with torch.no_grad():
        ref_out = [t for t in _tensors(work.reference(*work.args)) if t.is_floating_point()]
    grads = [torch.randn_like(t) for t in ref_out]
    return params, {m: c for m, c in _calls(work, grads).items() if m in case.modes}


# --clock: wall time, or the calling thread's CPU time (one thread: every op runs on it, and the
# figure leaves out the time other jobs kept the process descheduled, as on a shared machine)
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def interleaved_us(reference, fused, calls: int = 200, rounds: int = 9, warmup: int = 20,
                   clock=time.perf_counter) -> tuple[float, float]:
    """Median per-call microseconds of (reference, fused): ``rounds`` rounds of ``calls`` calls
    of each, alternating which goes first (timing.interleave), timed by ``clock``."""
    res = timing.interleave({"reference": reference, "fused": fused}, rounds, warmup=warmup,
                            calls_per_sample=calls, alternate=True, clock=clock)
    return res["reference"]["median"] * 1e3, res["fused"]["median"] * 1e3


def measure_case(case: BenchCase, params: dict | None = None, calls: int = 200, rounds: int = 9,
                 modes=None, autocast=None, clock=time.perf_counter) -> list[dict]:
    """Host-time records (one per mode) for one op case, CPU tensors, one thread, auto backend
    (under ``autocast``: both sides in their own CPU autocast regions of that dtype)."""
    from ganengine import backends
    from ganengine.ops import _dispatch

    amp = parse_autocast(autocast)
    params, calls_by_mode = case_calls(case, "cpu", params, amp)
    out = []
    with pinned_threads(1), backends.use_backend("auto"):
        for mode, (reference, fused) in calls_by_mode.items():
            if mode not in (modes or case.modes):
                continue
            rec = {"case": case.name, "family": case.family, "mode": mode, "shape": params,
                   "shape_label": shape_label(params), "status": "ok", "reason": None,
                   "autocast": None if amp is None else str(amp).replace("torch.", "")}
            try:
                _dispatch.last_used.clear()
                fused()
                rec["backends"] = dict(_dispatch.last_used)
                ref_us, fused_us = interleaved_us(reference, fused, calls, rounds, clock=clock)
                rec.update(eager_us=ref_us, ganengine_us=fused_us, ratio=fused_us / ref_us)
            except Exception as exc:  # one failing case must not end the table
                rec.update(status="error", reason=f"{type(exc).__name__}: {exc}")
            out.append(rec)
    return out


def measure(cases, calls: int = 200, rounds: int = 9, progress=None, with_kernels: bool = True,
            autocast=None, clock=time.perf_counter) -> list[dict]:
    """Host-time records of every op case, joined with the kernel counts of the CUDA path when
    the Triton interpreter is on (``TRITON_INTERPRET=1`` before triton is imported) and no
    ``autocast`` is asked for (the counts are the float32 calls')."""
    from ganengine import backends

    amp = parse_autocast(autocast)
    counts = {}
    if with_kernels and amp is None and backends.triton_interpret():
        from ganengine.bench import traffic_table

        for case in cases:
            if case.kind != "op" or case.family == "autocast":   # (traffic_table does not count autocast calls)
                continue
            if progress:
                progress(f"kernels {case.name}")
            for r in traffic_table.measure_case(case, params=tiny_shape(case)):
                if r["status"] == "ok":
                    counts[(r["case"], r["mode"])] = (r["eager_kernels"], r["ganengine_kernels"])
    out = []
    for case in cases:
        if case.kind != "op":
            continue
        if progress:
            progress(f"host time {case.name}")
        for rec in measure_case(case, calls=calls, rounds=rounds, autocast=amp, clock=clock):
            eager_k, gan_k = counts.get((rec["case"], rec["mode"]), (None, None))
            rec.update(eager_kernels=eager_k, ganengine_kernels=gan_k)
            out.append(rec)
    return out


def markdown(records: list[dict]) -> str:
    head = ["op", "tiny shape", "mode", "backend", "eager us/call", "ganengine us/call", "ganengine / eager",
            "kernels eager", "kernels ganengine (CUDA path)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in records:
        if r["status"] != "ok":
            notes.append(f"- {r['case']} {r['mode']}: {r['reason']}")
            continue
        k = lambda v: "" if v is None else str(v)  # noqa: E731
        used = ",".join(sorted(set(r.get("backends", {}).values()))) or "-"
        lines.append("| " + " | ".join([
            r["case"], r["shape_label"], r["mode"], used, f"{r['eager_us']:.1f}", f"{r['ganengine_us']:.1f}",
            f"{r['ratio']:.2f}x", k(r["eager_kernels"]), k(r["ganengine_kernels"])]) + " |")
    if notes:
        lines += ["", "Not measured:", ""] + notes
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse
    import json

    from ganengine.bench import registry

    p = argparse.ArgumentParser(prog="python -m ganengine.bench.host_cost", description=__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="*", default=[], help="op cases or families (default: all)")
    p.add_argument("--calls", type=int, default=200, help="calls per timed round (default: 200)")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds; the median is kept (default: 9)")
    p.add_argument("--json", default=None, help="also write the records here")
    p.add_argument("--autocast", default=None, choices=("bf16", "fp16"),
                   help="run both sides' calls under torch.autocast('cpu', dtype) (AMP users: bf16); "
                        "the kernel counts are left out then")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall time (default) or the thread's CPU time (a shared machine: one thread, "
                        "descheduled time left out)")
    a = p.parse_args(argv)
    for option in ("calls", "rounds"):
        if getattr(a, option) < 1:
            p.error(f"--{option} must be >= 1, got {getattr(a, option)}")
    try:
        cases = registry.select(a.ops or [], None)
    except ValueError as exc:
        p.error(f"--ops: {exc}")
    if a.json:  # before the measuring, not with a traceback after it
        from ganengine.cli._io import OutputError, writable_file

        try:
            writable_file(a.json, "--json", example="host_cost.json")
        except OutputError as exc:
            p.error(str(exc))
    recs = measure(cases, a.calls, a.rounds, progress=lambda s: print(f"  {s}", flush=True), autocast=a.autocast,
                   clock=CLOCKS[a.clock])
    if a.autocast:
        print(f"Under torch.autocast('cpu', dtype={parse_autocast(a.autocast)}), one region per call on both sides; "
              "no kernel counts (they are the float32 calls').\n")
    print(markdown(recs))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(recs, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
