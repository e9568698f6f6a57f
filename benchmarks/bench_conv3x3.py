"""3x3 stride-1 convolution, forward and forward+backward: ganengine[cpu] (Winograd) vs
oneDNN's direct convolution (eager) vs torch.compile, at the shapes of the models' 3x3 layers.

    python benchmarks/bench_conv3x3.py [--repeats 7] [--tile 2] [--all]

The variants take turns (ganengine.bench.timing.interleave), median of --repeats.
``--all`` bypasses the profitability threshold so every shape runs Winograd (how the
threshold in ganengine/ops/conv3x3.py was chosen). Rows: (N, C, K, H, W, padding mode).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from ganengine.bench import timing

SHAPES = [  # CycleGAN resnet block, StarGAN block (b16), StackGAN blocks, U-Net-ish widths
    (1, 256, 256, 64, 64, "reflect"), (16, 256, 256, 32, 32, "zeros"), (4, 512, 512, 16, 16, "zeros"),
    (16, 128, 128, 64, 64, "zeros"), (1, 128, 128, 64, 64, "zeros"), (1, 128, 128, 128, 128, "zeros"),
    (1, 64, 64, 128, 128, "zeros"), (64, 64, 64, 32, 32, "zeros"), (1, 32, 32, 64, 64, "zeros"),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tile", type=int, default=2, choices=(2, 4))
    ap.add_argument("--all", action="store_true", help="run Winograd on every shape (ignore the threshold)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    os.environ["GANENGINE_WINOGRAD_TILE"] = str(args.tile)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ganengine.ops import conv3x3 as cm

    if args.all:
        cm.MIN_CHANNELS, cm.MIN_TILES = 0, 0
    print(f"threads={torch.get_num_threads()} tile={args.tile} repeats={args.repeats} (ms, median, interleaved; "
          f"{timing.load_note()})")
    print("| N,C,K,H,W,pad | winograd used | pass | eager | torch.compile | ganengine | vs eager | vs compile |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, c, k, h, w, mode in SHAPES:
        x = torch.randn(n, c, h, w, requires_grad=True)
        wt = (torch.randn(k, c, 3, 3) * 0.05).requires_grad_()
        b = torch.randn(k, requires_grad=True)
        used = cm.winograd_profitable(x.shape, wt.shape, 1, args.tile)

        def ref(x, wt, b):
            return cm.reference_conv3x3(x, wt, b, 1, mode == "reflect")

        def ours(x, wt, b):
            return cm.conv3x3(x, wt, b, 1, mode)

        comp = None if args.no_compile else torch.compile(ref)
        g = torch.randn(n, k, h, w)
        impls = {"eager": ref, "compile": comp, "ganengine": ours}
        for pass_ in ("forward", "forward+backward"):
            calls = {}
            for name, f in impls.items():
                if f is None:
                    continue
                if pass_ == "forward":
                    def run(f=f):
                        with torch.no_grad():
                            f(x, wt, b)
                else:
                    def run(f=f):
                        torch.autograd.grad(f(x, wt, b), (x, wt, b), g)
                calls[name] = run
            res = {"compile": float("nan"), **timing.medians(timing.interleave(calls, args.repeats, warmup=2))}
            print(f"| {n},{c},{k},{h},{w},{mode} | {'yes' if used else 'no'} | {pass_} | {res['eager']:.2f} | "
                  f"{res['compile']:.2f} | {res['ganengine']:.2f} | {res['eager'] / res['ganengine']:.2f}x | "
                  f"{res['compile'] / res['ganengine']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
