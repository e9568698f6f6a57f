"""Host time of fuse()'s replacements at tiny maps, against the eager code they replace (the cost
rule: a rewrite may not cost more host time than the ops it replaces, at any size): the
upsample -> conv graph calls (no grad) and SAGAN's ``Self_Attn`` block returning its map
(forward, and forward + backward with the map in the loss).

    python benchmarks/bench_fuse_calls.py [--repeats 15] [--calls 2000]

One thread, thread CPU time per call (us), interleaved, median.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import copy
import os
import sys

from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ganengine  # noqa: E402
from ganengine.bench import timing  # noqa: E402
from ganengine.fusion import upsample as U  # noqa: E402
from tests import reference_nets_attention as R  # noqa: E402

# what the graph rule passes: F.interpolate's bound keyword arguments and the resolved scales
_KW = dict(size=None, scale_factor=2, mode="nearest", align_corners=None, recompute_scale_factor=None,
           antialias=False)
_SCALES = (2.0, 2.0)


def rows(repeats: int, calls: int):
    out = []
    for shape in ((1, 4, 2, 2), (1, 8, 4, 4), (2, 16, 8, 8)):
        x = torch.randn(shape)
        c = shape[1]
        for k, rule in ((3, U.upsample_conv3x3), (1, U.upsample_conv1x1)):
            conv = nn.Conv2d(c, c, k, padding=k // 2)
            fns = {"eager": lambda conv=conv: conv(F.interpolate(x, scale_factor=2)),
                   "graph call": lambda conv=conv, rule=rule: rule(conv, x, _SCALES, _KW)}
            with torch.no_grad():
                torch.testing.assert_close(fns["graph call"](), fns["eager"](), rtol=1e-5, atol=1e-5)
                t = timing.interleave(fns, repeats, warmup=3, calls_per_sample=calls, alternate=True,
                                      clock=time.process_time)
            e, g = t["eager"]["median"] * 1e3, t["graph call"]["median"] * 1e3
            out.append((f"{'x'.join(map(str, shape))} up2 -> {k}x{k} {c}", e, g))
    return out


def attention_rows(repeats: int, calls: int):
    out = []
    for b, c, s in ((1, 16, 2), (1, 16, 4), (2, 32, 4), (8, 64, 8)):
        torch.manual_seed(0)
        ref = R.Self_Attn(c, "relu")
        fused = ganengine.fuse(copy.deepcopy(ref))
        x = torch.randn(b, c, s, s, requires_grad=True)

        def step(m):
            def run():
                o, a = m(x)
                (o.sum() + a.sum()).backward()
            return run
        with torch.no_grad():
            f = timing.interleave({"eager": lambda: ref(x), "fused": lambda: fused(x)}, repeats, warmup=3,
                                  calls_per_sample=calls, alternate=True, clock=time.process_time)
        fb = timing.interleave({"eager": step(ref), "fused": step(fused)}, repeats, warmup=3,
                               calls_per_sample=max(1, calls // 4), alternate=True, clock=time.process_time)
        for what, t in (("forward", f), ("fwd+bwd", fb)):
            out.append((f"Self_Attn {b}x{c}x{s}x{s} {what}", t["eager"]["median"] * 1e3, t["fused"]["median"] * 1e3))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--calls", type=int, default=2000)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| case | eager us | fused us | eager / fused |")
    print("| --- | --- | --- | --- |")
    for name, e, g in rows(a.repeats, a.calls) + attention_rows(a.repeats, max(1, a.calls // 10)):
        print(f"| {name} | {e:.2f} | {g:.2f} | {e / g:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
