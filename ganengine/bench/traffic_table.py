"""Per-op memory-traffic table: Triton kernel bytes vs the minimum vs eager PyTorch.

For each op case and mode, on the case's ``traffic_shape`` (bytes scale with the tensor
sizes, so the ratios hold at the reference shapes for these memory-bound ops):

  minimum    every input (and upstream gradient) read once, every output (and input gradient)
             written once
  eager      the plain PyTorch reference, one kernel per aten op (EagerTraffic)
  ganengine  the fused op on the triton backend: bytes its Triton kernels load and store
             (TritonTraffic under the interpreter) + any plain aten ops around them
             (e.g. attention's 1x1 convs, gradient sums), counted like eager. Two figures:
             "issued" counts every active lane of every load/store (a tile re-loaded by many
             programs, as in an implicit-GEMM convolution, counts each time); "DRAM" counts each
             launch's distinct bytes per tensor once (the re-reads within a launch are served by
             L1/L2), which is what eager's per-kernel figure measures too. Tensors a kernel reaches
             through a pointer table rather than as an argument (the spectral-norm kernels' weights)
             count too: the case's inputs and upstream gradients are tracked by name, and bytes at
             any other address count once per distinct address (``<unattributed>``).

predicted speedup = eager bytes / ganengine DRAM bytes (what a memory-bound GPU kernel gains);
efficiency = minimum / ganengine DRAM bytes (1.0: the op moves nothing it does not have to).
"""
from __future__ import annotations

import torch

from ganengine.bench.registry import BenchCase, shape_label
from ganengine.bench.runner import backend_scope, parse_dtype
from ganengine.bench.traffic import EagerTraffic, TritonTraffic, _tensors, footprint_bytes, minimum_bytes


def _fb_call(fn, args, grad_args, grads):
    leaves = list(args)
    for i in grad_args:
        leaves[i] = args[i].detach().requires_grad_(True)
    inputs = [leaves[i] for i in grad_args]

    def call():
        outs = [t for t in _tensors(fn(*leaves)) if t.is_floating_point()]
        return outs, torch.autograd.grad(outs, inputs, grads, allow_unused=True)

    return call


def measure_case(case: BenchCase, dtype="float32", params: dict | None = None) -> list[dict]:
    """Traffic records (one per mode) for one op case on CPU tensors: bytes and kernels of one
    call after a warm-up call of each (the first call's lazy work is not what every call costs)."""
    dtype = parse_dtype(dtype)
    params = params or case.traffic_shape or case.shape_list("quick")[0]
    if case.family == "autocast":
        return _autocast_skipped(case, params, dtype)
    work = case.setup(params, torch.device("cpu"), dtype)
    args = work.args
    out = []
    with torch.no_grad():
        ref_out = [t for t in _tensors(work.reference(*args)) if t.is_floating_point()]
    grads = [torch.randn_like(t) for t in ref_out]
    for mode in case.modes:
        rec = {"case": case.name, "family": case.family, "mode": mode, "shape": params,
               "shape_label": shape_label(params), "dtype": str(dtype).replace("torch.", ""),
               "status": "ok", "reason": None}
        try:
            if mode == "forward":
                ref_call = lambda: work.reference(*args)  # noqa: E731
                fused_call = lambda: work.fused(*args)  # noqa: E731
                ctx = torch.no_grad
                rec["min_bytes"] = minimum_bytes(args, ref_out)
            else:
                ref_call = _fb_call(work.reference, args, work.grad_args, grads)
                fused_call = _fb_call(work.fused, args, work.grad_args, grads)
                ctx = torch.enable_grad
                # + one gradient per trained input, of that input's size
                rec["min_bytes"] = (minimum_bytes(list(args) + grads, ref_out)
                                    + sum(footprint_bytes(args[i]) for i in work.grad_args))
            # one untimed, uncounted call of each first: what a steady-state call issues, not the
            # first call's lazy work (caches, tables, a module's buffers: timing.count_kernels)
            with ctx():
                ref_call()
            with backend_scope("triton"), ctx():
                first = fused_call()
            if mode != "forward":
                # a constant gradient (a linear loss's: +-1/n everywhere) may be returned broadcast,
                # one element in storage: its minimum is that storage, not the input's size
                given = [g for g in first[1]]
                rec["min_bytes"] -= sum(footprint_bytes(args[i]) - footprint_bytes(g)
                                        for i, g in zip(work.grad_args, given)
                                        if g is not None and footprint_bytes(g) < footprint_bytes(args[i]))
            with ctx(), EagerTraffic() as eager:
                ref_call()
            rec["eager_bytes"] = eager.total_bytes
            rec["eager_kernels"] = eager.num_kernels
            rec["eager_ops"] = eager.per_op()
            # the case's tensors, which a kernel may reach through a table of pointers
            known = {f"input{i}": t for i, t in enumerate(args) if isinstance(t, torch.Tensor)}
            if mode != "forward":
                known.update({f"grad_output{i}": g for i, g in enumerate(grads)})
            with backend_scope("triton"), ctx(), TritonTraffic(known) as tt, \
                    EagerTraffic(skip_namespaces=("ganengine", "ganengine_C")) as around:
                fused_call()
            if not tt.launches and case.triton_kernels:
                raise RuntimeError("the triton backend launched no Triton kernel")
            rec["triton_bytes"] = tt.total_bytes
            rec["triton_unique_bytes"] = sum(a.unique_load_bytes + a.unique_store_bytes
                                             for launch in tt.launches for a in launch.args.values())
            rec["triton_launches"] = len(tt.launches)
            rec["kernels"] = _kernel_table(tt)
            rec["aten_around_bytes"] = around.total_bytes
            rec["aten_around_ops"] = around.per_op()
            rec["ganengine_issued_bytes"] = tt.total_bytes + around.total_bytes
            rec["ganengine_bytes"] = rec["triton_unique_bytes"] + around.total_bytes
            rec["ganengine_kernels"] = len(tt.launches) + around.num_kernels
            g = rec["ganengine_bytes"]
            rec["predicted_speedup"] = rec["eager_bytes"] / g if g else None
            rec["efficiency"] = rec["min_bytes"] / g if g else None
            rec["eager_vs_min"] = rec["eager_bytes"] / rec["min_bytes"] if rec["min_bytes"] else None
        except Exception as exc:
            rec.update(status="error", reason=f"{type(exc).__name__}: {exc}")
        out.append(rec)
    return out


def _autocast_skipped(case: BenchCase, params: dict, dtype) -> list[dict]:
    """The autocast family's records: not counted. The table runs the triton backend strictly,
    which is not the route an autocast call takes (ATen's convolution under autocast is taken on
    backend "auto" only), so its bytes and kernels would describe another call."""
    why = ("autocast case: the traffic table times the triton backend strictly, not the route a call under "
           "autocast takes (backend auto: ATen's convolution for the conv family)")
    return [{"case": case.name, "family": case.family, "mode": mode, "shape": params,
             "shape_label": shape_label(params), "dtype": str(dtype).replace("torch.", ""),
             "status": "skipped", "reason": why} for mode in case.modes]


def _kernel_table(tt: TritonTraffic) -> list[dict]:
    """Per launch: kernel, grid, loaded/stored bytes, and per argument total vs unique bytes."""
    rows = []
    for launch in tt.launches:
        rows.append({
            "kernel": launch.kernel, "grid": list(launch.grid), "load_bytes": launch.load_bytes,
            "store_bytes": launch.store_bytes, "atomic_bytes": launch.atomic_bytes,
            "args": {a.name: {"load_bytes": a.load_bytes, "store_bytes": a.store_bytes,
                              "unique_load_bytes": a.unique_load_bytes,
                              "unique_store_bytes": a.unique_store_bytes}
                     for a in launch.args.values()},
        })
    return rows


def measure(cases, dtype="float32", progress=None, size: str = "traffic") -> list[dict]:
    """Traffic records of every op case. ``size``: "traffic" (each case's small traffic shape),
    "ref" (its first reference shape: slow under the interpreter) or "quick"."""
    from ganengine import backends

    if size not in ("traffic", "ref", "quick"):
        raise ValueError(f"size must be 'traffic', 'ref' or 'quick', got {size!r}")
    if not backends.triton_interpret():
        raise RuntimeError("the traffic table needs TRITON_INTERPRET=1 set before triton is imported")
    out = []
    for case in cases:
        if case.kind != "op":
            continue
        if progress:
            progress(f"traffic {case.name}")
        params = None if size == "traffic" else case.shape_list(size)[0]
        out.extend(measure_case(case, dtype, params=params))
    return out


def _kb(n) -> str:
    return "" if n is None else f"{n / 1024:.1f}"


def _r(v) -> str:
    return "" if v is None else f"{v:.2f}"


def traffic_markdown(records: list[dict]) -> str:
    head = ["op", "shape", "dtype", "mode", "minimum KiB", "eager KiB (kernels)",
            "ganengine DRAM KiB (Triton + aten around)", "ganengine issued KiB", "kernels",
            "eager / ganengine (predicted speedup)", "minimum / ganengine (efficiency)", "eager / minimum"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in records:
        if r["status"] != "ok":
            notes.append(f"- {r['case']} {r['mode']}: {r['reason']}")
            continue
        gan = f"{_kb(r['ganengine_bytes'])} ({_kb(r['triton_unique_bytes'])} + {_kb(r['aten_around_bytes'])})"
        lines.append("| " + " | ".join([
            r["case"], r["shape_label"], r["dtype"], r["mode"], _kb(r["min_bytes"]),
            f"{_kb(r['eager_bytes'])} ({r['eager_kernels']})", gan, _kb(r["ganengine_issued_bytes"]),
            f"{r['triton_launches']} + {r['ganengine_kernels'] - r['triton_launches']}",
            _r(r["predicted_speedup"]) + "x", _r(r["efficiency"]), _r(r["eager_vs_min"]) + "x"]) + " |")
    if notes:
        lines += ["", "Not measured:", ""] + notes
    return "\n".join(lines) + "\n"


def kernel_markdown(records: list[dict]) -> str:
    """Per Triton launch: bytes per argument, total vs unique (re-reads show as total > unique)."""
    lines = ["| op | mode | kernel | argument | loaded KiB (unique) | stored KiB (unique) |",
             "|---|---|---|---|---|---|"]
    for r in records:
        if r["status"] != "ok":
            continue
        for k in r["kernels"]:
            for name, a in k["args"].items():
                if not (a["load_bytes"] or a["store_bytes"]):
                    continue
                lines.append(f"| {r['case']} | {r['mode']} | {k['kernel']} | {name} | "
                             f"{_kb(a['load_bytes'])} ({_kb(a['unique_load_bytes'])}) | "
                             f"{_kb(a['store_bytes'])} ({_kb(a['unique_store_bytes'])}) |")
    return "\n".join(lines) + "\n"
