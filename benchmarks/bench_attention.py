"""Benchmark the SAGAN attention block: ganengine vs the reference formulation, SDPA, compile.

    python benchmarks/bench_attention.py --quick            # CPU subset, ~5 minutes on 2 cores
    python benchmarks/bench_attention.py                    # full grid (long on CPU)
    python benchmarks/bench_attention.py --device cuda

Every implementation runs the whole block (three 1x1 convs + attention + residual) on the same
inputs, in training mode (inputs and weights require grad), fp32:
  reference     heykeetae ``Self_Attn`` formulation: bmm -> softmax -> bmm (builds B x N x N)
  sdpa_math     F.scaled_dot_product_attention(scale=1), math backend (unequal head dims)
  sdpa_flash    the same with q, k zero-padded from C/8 to C channels so the flash backend
                accepts them (it needs equal head dims); exact, but 8x the q.k work
  compile       torch.compile(reference) (inductor, default mode)
  ganengine     ganengine.functional.self_attention2d (auto backend: the C++ kernel on CPU)
Time: median of --repeats runs after one warm-up, the implementations taking turns
(ganengine.bench.timing.interleave). Peak memory, measured on one more call of each: CPU, the growth of the
process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) over the
resident size before the call, with glibc's mmap threshold pinned so freed buffers leave the
RSS; CUDA, torch.cuda.max_memory_allocated over the allocation before the call.
"""
from __future__ import annotations

import argparse
import gc
import warnings
import json
import os
import sys

if "MALLOC_MMAP_THRESHOLD_" not in os.environ and __name__ == "__main__":
    # large buffers must go back to the OS when freed, or RSS cannot show per-call peaks
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ganengine.functional as GF  # noqa: E402
from ganengine.bench import timing  # noqa: E402
from ganengine.ops import _dispatch  # noqa: E402


def reference(x, qw, qb, kw, kb, vw, vb, gamma):
    b, c, h, w = x.shape
    q = F.conv2d(x, qw, qb).view(b, -1, h * w).permute(0, 2, 1)
    k = F.conv2d(x, kw, kb).view(b, -1, h * w)
    attn = torch.softmax(torch.bmm(q, k), dim=-1)
    v = F.conv2d(x, vw, vb).view(b, -1, h * w)
    out = torch.bmm(v, attn.permute(0, 2, 1)).view(b, c, h, w)
    return gamma * out + x


def _sdpa(x, qw, qb, kw, kb, vw, vb, gamma, pad):
    b, c, h, w = x.shape
    q = F.conv2d(x, qw, qb).flatten(2).transpose(1, 2)[:, None]   # (B, 1, N, d)
    k = F.conv2d(x, kw, kb).flatten(2).transpose(1, 2)[:, None]
    v = F.conv2d(x, vw, vb).flatten(2).transpose(1, 2)[:, None]   # (B, 1, N, C)
    if pad:  # the flash kernel wants equal head dims and unit stride on the last dim
        q, k = F.pad(q, (0, c - q.shape[-1])), F.pad(k, (0, c - k.shape[-1]))
        v = v.contiguous()
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            o = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    else:
        with sdpa_kernel([SDPBackend.MATH]):
            o = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    return gamma * o[:, 0].transpose(1, 2).reshape(b, c, h, w) + x


_compiled = {}


def compiled(*args):
    fn = _compiled.get("f")
    if fn is None:
        fn = _compiled["f"] = torch.compile(reference)
    return fn(*args)


IMPLS = {
    "reference": reference,
    "sdpa_math": lambda *a: _sdpa(*a, pad=False),
    "sdpa_flash": lambda *a: _sdpa(*a, pad=True),
    "compile": compiled,
    "ganengine": GF.self_attention2d,
}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Meter:
    def __init__(self, device):
        self.device = device

    def start(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _rss_kb("VmRSS") * 1024

    def peak_extra(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return max(0, _rss_kb("VmHWM") * 1024 - self.base)


def make_inputs(b, c, hw, device):
    g = torch.Generator().manual_seed(0)
    d = c // 8
    s = c ** -0.5
    ts = [torch.randn(b, c, hw, hw, generator=g), torch.randn(d, c, 1, 1, generator=g) * s,
          torch.zeros(d), torch.randn(d, c, 1, 1, generator=g) * s, torch.zeros(d),
          torch.randn(c, c, 1, 1, generator=g) * s, torch.zeros(c), torch.tensor([0.5])]
    return [t.to(device).requires_grad_() for t in ts]


def make_call(fn, inputs, backward):
    def call():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        if backward:
            out.backward(torch.ones_like(out))
    return call


def peak_mb(call, meter) -> float:
    meter.start()
    call()
    return meter.peak_extra() / 2 ** 20


def bench(calls: dict, repeats, meter) -> dict:
    """{name: (median ms, peak extra MB)}: the calls take turns (one warm-up each, which
    compiles), then one more call each under the memory meter."""
    times = timing.medians(timing.interleave(calls, repeats, warmup=1, sync=timing.cuda_sync(meter.device)))
    return {name: (times[name], peak_mb(call, meter)) for name, call in calls.items()}


def parse_shape(text: str) -> tuple[int, int, int]:
    """"B,C,HW" -> (B, C, HW), three positive integers (ValueError otherwise)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"--shapes expects B,C,HW (three positive integers, e.g. 8,64,64), got {text!r}")
    return values


def grid(args):
    if args.shapes:
        return [parse_shape(s) for s in args.shapes]
    if args.quick:
        # batch 1 over the whole C x H grid, plus the target shape at batch 8
        cases = [(1, c, hw) for c in (64, 128, 256) for hw in (16, 32, 64)] + [(8, 64, 64)]
    else:
        cases = [(b, c, hw) for b in (1, 8) for c in (64, 128, 256) for hw in (16, 32, 64)]
    return cases


def impls_for(args, b, c, hw):
    names = list(args.impls)
    if args.quick:
        n = hw * hw
        # keep the CPU run short: the slow baselines only where they finish in seconds
        if n * n * b * c > 2 ** 30:
            names = [x for x in names if x not in ("sdpa_math", "sdpa_flash")]
        if (b, c, hw) not in ((8, 64, 64), (1, 64, 32)):
            names = [x for x in names if x != "compile"]
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="CPU subset (see grid())")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shapes", nargs="+", metavar="B,C,HW", help="only these cases, e.g. 8,64,64")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--json", help="write rows to this file")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1 (timed repeats per case), got {args.repeats}")
    for s in args.shapes or ():
        try:
            parse_shape(s)
        except ValueError as exc:
            p.error(str(exc))
    warnings.filterwarnings("ignore", message=".*(Flash attention|fused kernels).*")
    device = torch.device(args.device)
    meter = Meter(device)
    rows = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}; {timing.load_note()}",
          flush=True)
    print("| B | C | HxW | pass | impl | time (ms) | peak extra (MB) | vs reference |")
    print("| ---: | ---: | --- | --- | --- | ---: | ---: | ---: |", flush=True)
    for b, c, hw in grid(args):
        inputs = make_inputs(b, c, hw, device)
        for backward in (False, True):
            names = impls_for(args, b, c, hw)
            _dispatch.last_used.clear()  # only ganengine's calls set it: read after the run
            res = bench({n: make_call(IMPLS[n], inputs, backward) for n in names}, args.repeats, meter)
            ref_ms = res["reference"][0] if "reference" in res else None
            for name in names:
                ms, mb = res[name]
                used = _dispatch.last_used.get("attention", "") if name == "ganengine" else ""
                speed = f"{ref_ms / ms:.2f}x" if ref_ms else ""
                label = f"{name} ({used})" if used else name
                pas = "fwd+bwd" if backward else "fwd"
                print(f"| {b} | {c} | {hw}x{hw} | {pas} | {label} | {ms:.1f} | {mb:.1f} | {speed} |", flush=True)
                rows.append(dict(batch=b, channels=c, hw=hw, backward=backward, impl=name, backend=used,
                                 ms=ms, peak_mb=mb))
        _compiled.clear()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
