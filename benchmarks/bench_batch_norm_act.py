"""Fused (conditional) batch norm + ReLU vs eager PyTorch vs torch.compile (and the copy floor),
plus host time per call at a tiny shape.

    python -m benchmarks.bench_batch_norm_act [--quick] [--device cpu|cuda] [--repeats N] [--json FILE]
    pytest benchmarks/bench_batch_norm_act.py --benchmark-only      (pytest-benchmark suite)

Training-mode batch norm with running statistics (what a GAN step runs), ReLU, fp32. All
variants are timed interleaved by ganengine.bench.timing.interleave (one call of each per round,
the order reversed every other round, rounds repeated; median per variant),
so load and frequency drift hit them alike; ratios are taken within the run. "copy" is
``x.clone()`` (one read + one write of x): the forward reads x twice and writes y once.

The host-time table measures at a tiny shape, one thread, through ``ganengine.bench.host_cost``
(the ganengine call against the eager composition it replaces, interleaved); with
``TRITON_INTERPRET=1`` it adds the kernels per call of the CUDA path (Triton launches + aten ops).
"""
from __future__ import annotations

import argparse
import functools
import json
import platform

import torch
import torch.nn.functional as F

import ganengine.functional as GF
from ganengine import backends
from ganengine.bench import timing
from ganengine.bench.runner import backend_scope

SHAPES = [(64, 512, 4, 4), (64, 256, 8, 8), (16, 128, 32, 32), (1, 64, 128, 128)]
QUICK_SHAPES = [(16, 64, 8, 8), (4, 32, 16, 16)]


def eager_bn(x, w, b, rm, rv):
    return F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))


def fused_bn(x, w, b, rm, rv):
    return GF.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, "relu")


def eager_cond(x, gain, bias, rm, rv):
    out = F.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5)
    return F.relu(out * gain[:, :, None, None] + bias[:, :, None, None])


def fused_cond(x, gain, bias, rm, rv):
    return GF.conditional_batch_norm_act(x, gain, bias, rm, rv, True, 0.1, 1e-5, "relu")


OPS = {"batch_norm_act": (eager_bn, fused_bn), "conditional_batch_norm_act": (eager_cond, fused_cond)}


def make_inputs(op, shape, device, dtype):
    n, c = shape[0], shape[1]
    x = torch.randn(shape, device=device, dtype=dtype)
    pshape = (n, c) if op == "conditional_batch_norm_act" else (c,)
    w = 1 + 0.1 * torch.randn(pshape, device=device)
    b = 0.1 * torch.randn(pshape, device=device)
    return x, w, b, torch.zeros(c, device=device), torch.ones(c, device=device)


def make_call(fn, inputs, grad, backward: bool):
    x, w, b, rm, rv = inputs
    if backward:
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]

        def run():
            y = fn(*leaves, rm, rv)
            torch.autograd.grad(y, leaves, grad)
    else:
        def run():
            with torch.no_grad():
                fn(x, w, b, rm, rv)
    return run


def fused_backends(device) -> list[str]:
    out = []
    for name in (("triton", "cuda") if device.type == "cuda" else ("cpu",)):
        if backends.serves(name, device):
            out.append(name)
    return out


def run_benchmark(shapes, ops, device, dtype, repeats: int, with_compile: bool = True,
                  kernels: bool = False) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for op in ops:
        eager, fused = OPS[op]
        compiled = torch.compile(eager, dynamic=False) if with_compile else None
        for shape in shapes:
            inputs = make_inputs(op, shape, device, dtype)
            grad = torch.randn(shape, device=device, dtype=dtype)
            x = inputs[0]
            for mode in ("forward", "forward+backward"):
                bwd = mode != "forward"
                calls = {"copy": lambda: x.clone(), "eager": make_call(eager, inputs, grad, bwd)}
                if compiled is not None:
                    calls["torch.compile"] = make_call(compiled, inputs, grad, bwd)
                scopes = {}
                for name in fused_backends(device):
                    calls[f"ganengine[{name}]"] = make_call(fused, inputs, grad, bwd)
                    scopes[f"ganengine[{name}]"] = functools.partial(backend_scope, name)  # strict
                ms = timing.medians(timing.interleave(calls, repeats, warmup=3, alternate=True, scopes=scopes,
                                                      sync=timing.cuda_sync(device)))
                row = {"op": op, "shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
                       "mode": mode, **{f"{k}_ms": v for k, v in ms.items()}}
                rows.append(row)
                print(format_row(row), flush=True)
                if kernels:
                    print(timing.kernel_table(calls, device, scopes), flush=True)
    return rows


def format_row(row: dict) -> str:
    parts = [f"{row['op']:>27s} {row['shape']:>14s} {row['mode']:>16s}"]
    parts += [f"{k[:-3]} {v:8.3f}" for k, v in row.items() if k.endswith("_ms")]
    return " | ".join(parts)


def markdown(rows: list[dict]) -> str:
    names = [k[:-3] for k in rows[0] if k.endswith("_ms")]
    fused = [n for n in names if n.startswith("ganengine")]
    head = ["op", "shape", "pass"] + [f"{n} (ms)" for n in names]
    for f in fused:
        head += [f"{f} vs eager"] + ([f"{f} vs compile"] if "torch.compile" in names else []) + [f"{f} / copy"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["op"], r["shape"], r["mode"]] + [f"{r[n + '_ms']:.3f}" for n in names]
        for f in fused:
            t = r[f + "_ms"]
            cells.append(f"{r['eager_ms'] / t:.2f}x")
            if "torch.compile" in names:
                cells.append(f"{r['torch.compile_ms'] / t:.2f}x")
            cells.append(f"{t / r['copy_ms']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def host_table(calls: int = 200, rounds: int = 9) -> str:
    """Host time per call (tiny shape, one thread) and, under the interpreter, kernels per call."""
    from ganengine.bench import host_cost, registry

    cases = [c for c in registry.all_cases().values() if c.family == "batch_norm_act"]
    return host_cost.markdown(host_cost.measure(cases, calls=calls, rounds=rounds,
                                                with_kernels=backends.triton_interpret()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--no-host", action="store_true", help="leave the host-time table out")
    parser.add_argument("--kernels", action="store_true", help="also count kernels per call of each variant")
    parser.add_argument("--json", help="write rows and machine facts to this JSON file")
    parser.add_argument("--markdown", help="write the tables to this Markdown file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = args.repeats or (5 if args.quick else 15)
    machine = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": repeats,
               "load": timing.load_note()}
    print(f"# (conditional) batch norm + relu on {machine}", flush=True)
    rows = run_benchmark(shapes, args.ops, device, getattr(torch, args.dtype), repeats, not args.no_compile,
                         args.kernels)
    table = markdown(rows)
    print("\n" + table)
    host = ""
    if not args.no_host:
        host = host_table()
        print("\nHost time per call at a tiny shape (one thread):\n\n" + host)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows, "host": host}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n\n" + host)
    return 0


# ------------------------------------------------------------------ pytest-benchmark suite
try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:
    _PARAMS = [(s, m) for s in QUICK_SHAPES for m in ("forward", "forward+backward")]

    @pytest.mark.parametrize("impl", ["eager", "fused"])
    @pytest.mark.parametrize("shape,mode", _PARAMS)
    def test_bench_batch_norm_act(benchmark, impl, shape, mode):
        eager, fused = OPS["batch_norm_act"]
        inputs = make_inputs("batch_norm_act", shape, torch.device("cpu"), torch.float32)
        benchmark(make_call(eager if impl == "eager" else fused, inputs, torch.randn(shape), mode != "forward"))


if __name__ == "__main__":
    raise SystemExit(main())
