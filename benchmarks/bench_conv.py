"""Plain and transposed convolutions with small output maps, forward and forward+backward:
oneDNN (eager PyTorch) vs ganengine's GEMM form (csrc/cpu/conv_gemm.cpp), at the shapes of the
U-Net bottleneck (pix2pix), StarGAN's and StackGAN's last discriminator blocks.

    python benchmarks/bench_conv.py [--repeats 7] [--threads 2] [--shapes dcgan --layout channels_last] [--cpu-time]

Both columns run the same call through ganengine.functional, interleaved
(ganengine.bench.timing.interleave, median of --repeats), with the GEMM form forced on
("gemm") or off ("oneDNN"), the Winograd route (bench_conv4x4.py) off in both; "auto" says which one
the cpu backend's threshold picks (how the threshold in csrc/cpu/conv_gemm.cpp was chosen). Rows: kind, N, C_in -> C_out, input H=W,
4x4 kernel, stride 2, padding 1 (the models' layers).
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

import ganengine
import ganengine.functional as GF
from ganengine.bench import timing
from ganengine.ops.conv import gemm_policy, uses_gemm, winograd_policy

SHAPES = [  # (transposed, N, C_in, C_out, H)
    (False, 1, 512, 512, 16), (False, 1, 512, 512, 8), (False, 1, 512, 512, 4), (False, 1, 512, 512, 2),
    (True, 1, 512, 512, 1), (True, 1, 1024, 512, 2), (True, 1, 1024, 512, 4), (True, 1, 1024, 512, 8),
    (True, 1, 1024, 256, 16),
    (False, 16, 1024, 2048, 4), (False, 16, 512, 1024, 8), (False, 2, 1024, 2048, 4), (False, 2, 512, 1024, 8),
    (False, 16, 512, 1024, 4), (False, 64, 256, 512, 8),
]
# DCGAN's 4x4 stride-2 layers at its reference widths (ndf = ngf = 64), batch 64 and smaller: the
# shapes of the router's NHWC small-map rule (conv_route.cpp), timed with --layout channels_last
DCGAN_SHAPES = [(tr, n, ci, co, h) for n in (64, 16, 4) for tr, ci, co, h in (
    (False, 64, 128, 32), (False, 128, 256, 16), (False, 256, 512, 8),
    (True, 512, 256, 4), (True, 256, 128, 8), (True, 128, 64, 16))] + [  # --quick's widths (8), batch 4
    (tr, 4, ci, co, h) for tr, ci, co, h in ((False, 8, 16, 32), (False, 16, 32, 16), (False, 32, 64, 8),
                                             (True, 64, 32, 4), (True, 32, 16, 8), (True, 16, 8, 16),
                                             (True, 8, 3, 32))]


@contextlib.contextmanager
def forced(policy: str):
    """The cpu backend with the GEMM form forced on ("always") or off ("never"), Winograd off."""
    with ganengine.use_backend("cpu"), gemm_policy(policy), winograd_policy("never"):
        yield


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shapes", choices=("default", "dcgan"), default="default")
    ap.add_argument("--layout", choices=("nchw", "channels_last"), default="nchw",
                    help="the activations' memory format (channels_last: the NHWC GEMM form)")
    ap.add_argument("--cpu-time", action="store_true", help="time with process_time (CPU time: steadier under load)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    clock = {"clock": time.process_time} if args.cpu_time else {}
    print(f"threads={torch.get_num_threads()} repeats={args.repeats} layout={args.layout} "
          f"(ms, median, interleaved; {timing.load_note()})")
    print("| kind | N | C_in -> C_out | H | pass | oneDNN | gemm | speed-up | auto picks |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for tr, n, ci, co, h in (DCGAN_SHAPES if args.shapes == "dcgan" else SHAPES):
        x = torch.randn(n, ci, h, h).contiguous(memory_format=fmt).requires_grad_()
        w = (torch.randn(*((ci, co) if tr else (co, ci)), 4, 4) * 0.02).requires_grad_()

        def run(backward):
            y = GF.conv_transpose2d(x, w, None, 2, 1) if tr else GF.conv2d(x, w, None, 2, 1)
            if backward:
                torch.autograd.grad(y, (x, w), torch.ones_like(y))

        with ganengine.use_backend("cpu"):
            used = "gemm" if uses_gemm(x, w, (2, 2), (1, 1), tr) else "oneDNN"
        for backward in (False, True):
            times = timing.medians(timing.interleave(
                {p: (lambda: run(backward)) for p in ("never", "always")}, args.repeats, warmup=2,
                scopes={p: (lambda p=p: forced(p)) for p in ("never", "always")}, **clock))
            print(f"| {'convT' if tr else 'conv'} | {n} | {ci} -> {co} | {h} | {'fwd+bwd' if backward else 'fwd'} | "
                  f"{times['never']:.2f} | {times['always']:.2f} | {times['never'] / times['always']:.2f}x | "
                  f"{used} |", flush=True)


if __name__ == "__main__":
    main()
