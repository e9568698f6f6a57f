"""Fused instance norm + LeakyReLU vs eager PyTorch vs torch.compile (and the copy floor).

    python -m benchmarks.bench_norm_act [--quick] [--device cpu|cuda] [--repeats N] [--json FILE]
        [--no-compile] [--kernels]
    pytest benchmarks/bench_norm_act.py --benchmark-only      (pytest-benchmark suite)

All variants are timed in one run, interleaved per shape and pass (ganengine.bench.timing.interleave),
median of repeats; ratios are taken within the run. "floor" is a copy of the same tensor (one read +
one write): a fused forward that reads x once and writes y once cannot beat it. ``--kernels`` adds
the kernels per call of each variant (torch.profiler on CUDA; aten ops / Triton launches on CPU).
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

SHAPES = [(1, 64, 256, 256), (1, 128, 128, 128), (1, 256, 64, 64), (4, 128, 128, 128)]
QUICK_SHAPES = [(1, 64, 128, 128), (1, 128, 64, 64)]


def eager(x, w, b):
    return F.leaky_relu(F.instance_norm(x, weight=w, bias=b), 0.2)


def fused(x, w, b):
    return GF.instance_norm_act(x, w, b, negative_slope=0.2)


def make_case(impl, x, w, b, g, backward: bool):
    if not backward:
        def run():
            with torch.no_grad():
                impl(x, w, b)
        return run
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))

    def run():
        xr.grad = wr.grad = br.grad = None
        impl(xr, wr, br).backward(g)
    return run


def variants(device, with_compile: bool = True):
    out = {"eager": eager}
    if with_compile:
        out["torch.compile"] = torch.compile(eager, dynamic=False)
    for name in ("cpu", "cuda", "triton"):
        if backends.serves(name, device) and not (name == "triton" and device.type == "cpu"):
            out[f"ganengine[{name}]"] = (name, fused)
    return out


def run_benchmark(shapes, dtypes, device, repeats: int, with_compile: bool = True,
                  kernels: bool = False) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    impls = variants(device, with_compile)
    for dtype in dtypes:
        for shape in shapes:
            x = torch.randn(shape, device=device, dtype=dtype)
            w = torch.randn(shape[1], device=device)
            b = torch.randn(shape[1], device=device)
            g = torch.randn_like(x)
            for mode in ("forward", "forward+backward"):
                calls, scopes = {"copy": lambda: x.clone()}, {}
                for name, impl in impls.items():
                    fn = impl[1] if isinstance(impl, tuple) else impl
                    calls[name] = make_case(fn, x, w, b, g, mode != "forward")
                    if isinstance(impl, tuple):
                        scopes[name] = functools.partial(backend_scope, impl[0])  # strict: no silent fallback
                res = timing.interleave(calls, repeats, warmup=3, scopes=scopes, sync=timing.cuda_sync(device))
                row = {"shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
                       "mode": mode, "copy_ms": res["copy"]["median"]}
                for name in impls:
                    row[f"{name}_ms"] = res[name]["median"]
                    row[f"{name}_spread_ms"] = res[name]["max"] - res[name]["min"]
                rows.append(row)
                print(format_row(row), flush=True)
                if kernels:
                    print(timing.kernel_table(calls, device, scopes), flush=True)
    return rows


def format_row(row: dict) -> str:
    parts = [f"{row['shape']:>14s} {row['dtype']:>8s} {row['mode']:>16s} copy {row['copy_ms']:7.2f} ms"]
    for key, value in row.items():
        if key.endswith("_ms") and not key.endswith("spread_ms") and key != "copy_ms":
            parts.append(f"{key[:-3]} {value:8.2f}")
    return " | ".join(parts)


def markdown(rows: list[dict]) -> str:
    names = [k[:-3] for k in rows[0] if k.endswith("_ms") and not k.endswith("spread_ms") and k != "copy_ms"]
    fused_names = [n for n in names if n.startswith("ganengine")]
    head = ["shape", "dtype", "pass", "copy floor (ms)"] + [f"{n} (ms)" for n in names]
    for f in fused_names:
        head += [f"{f} vs eager", f"{f} vs compile", f"{f} / floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["shape"], r["dtype"], r["mode"], f"{r['copy_ms']:.2f}"] + [f"{r[n + '_ms']:.2f}" for n in names]
        for f in fused_names:
            t = r[f + "_ms"]
            comp = f"{r['torch.compile_ms'] / t:.2f}x" if "torch.compile_ms" in r else "n/a"
            cells += [f"{r['eager_ms'] / t:.2f}x", comp, f"{t / r['copy_ms']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes, fp32 only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--dtypes", nargs="+", default=None, help="e.g. float32 bfloat16")
    parser.add_argument("--json", help="write rows and machine facts to this JSON file")
    parser.add_argument("--markdown", help="write the table to this Markdown file")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--kernels", action="store_true", help="also count kernels per call of each variant")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:  # (0 is not a way to ask for the default)
        parser.error(f"--repeats must be >= 1 (leave it out for the default: 5 with --quick, else 15), "
                     f"got {args.repeats}")
    device = torch.device(args.device)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    dtypes = [getattr(torch, d) for d in (args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"]))]
    repeats = args.repeats or (5 if args.quick else 15)
    machine = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": repeats,
               "load": timing.load_note()}
    print(f"# instance_norm + leaky_relu on {machine}", flush=True)
    rows = run_benchmark(shapes, dtypes, device, repeats, not args.no_compile, args.kernels)
    table = markdown(rows)
    print("\n" + table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
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
    def test_bench_norm_act(benchmark, impl, shape, mode):
        x = torch.randn(shape)
        w, b = torch.randn(shape[1]), torch.randn(shape[1])
        fn = make_case(eager if impl == "eager" else fused, x, w, b, torch.randn_like(x), mode != "forward")
        benchmark(fn)


if __name__ == "__main__":
    raise SystemExit(main())
