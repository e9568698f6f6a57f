"""Host time of fuse()'s graph calls at tiny maps, against the eager pair they replace (the cost
rule: a rewrite may not cost more host time than the ops it replaces, at any size).

    python benchmarks/bench_fuse_calls.py [--repeats 15] [--calls 2000]

No grad, one thread, thread CPU time per call (us), interleaved, median.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from ganengine.bench import timing
from ganengine.fusion import upsample as U

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--calls", type=int, default=2000)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| case | eager us | graph call us | eager / graph call |")
    print("| --- | --- | --- | --- |")
    for name, e, g in rows(a.repeats, a.calls):
        print(f"| {name} | {e:.2f} | {g:.2f} | {e / g:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
