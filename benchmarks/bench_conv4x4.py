"""4x4 convolutions and transposed convolutions at the models' shapes, forward and
forward+backward: oneDNN (NCHW and NHWC) vs ganengine's Winograd form (csrc/cpu/conv_winograd.cpp).

    python benchmarks/bench_conv4x4.py [--repeats 5] [--threads 2] [--tiles] [--only patchgan unet ...]

Every column runs the same ganengine.functional call on the cpu backend, the columns taking turns
(ganengine.bench.timing.interleave, median of --repeats), with the Winograd form
forced off ("oneDNN", x in NCHW or in channels_last) or on ("winograd", NCHW, the default tiles:
F(2, 4) at stride 1, F(3, 2) at stride 2); ``--tiles`` adds the larger tiles (F(3, 4), F(4, 2)).
"auto" says what the cpu backend's threshold picks (how the rule in use() was chosen). The
GEMM form is off in every column. Rows: the PatchGAN discriminator's layers (pix2pix/CycleGAN at
256x256), the U-Net's encoder and decoder layers with big maps (pix2pix at 256x256) and
StarGAN's (128x128). fwd+bwd computes dx and dw.
"""
from __future__ import annotations

import argparse
import contextlib
import functools

import torch

import ganengine
import ganengine.functional as GF
from ganengine.bench import timing
from ganengine.ops.conv import gemm_policy, uses_winograd, winograd_policy

# (group, transposed, N, C_in, C_out, H, stride, padding)
SHAPES = [
    ("patchgan", False, 1, 3, 64, 256, 2, 1), ("patchgan", False, 1, 64, 128, 128, 2, 1),
    ("patchgan", False, 1, 128, 256, 64, 2, 1), ("patchgan", False, 1, 256, 512, 32, 1, 1),
    ("patchgan", False, 1, 512, 1, 31, 1, 1),
    ("patchgan", False, 4, 64, 128, 128, 2, 1), ("patchgan", False, 4, 128, 256, 64, 2, 1),
    ("patchgan", False, 4, 256, 512, 32, 1, 1),
    ("unet", False, 1, 3, 64, 256, 2, 1), ("unet", False, 1, 64, 128, 128, 2, 1),
    ("unet", False, 1, 128, 256, 64, 2, 1), ("unet", False, 1, 256, 512, 32, 2, 1),
    ("unet", True, 1, 1024, 256, 16, 2, 1), ("unet", True, 1, 512, 128, 32, 2, 1),
    ("unet", True, 1, 256, 64, 64, 2, 1), ("unet", True, 1, 128, 3, 128, 2, 1),
    ("stargan", False, 2, 64, 128, 128, 2, 1), ("stargan", False, 2, 128, 256, 64, 2, 1),
    ("stargan", True, 2, 256, 128, 32, 2, 1), ("stargan", True, 2, 128, 64, 64, 2, 1),
    ("stargan", False, 2, 3, 64, 128, 2, 1), ("stargan", False, 2, 64, 128, 64, 2, 1),
    ("stargan", False, 2, 128, 256, 32, 2, 1), ("stargan", False, 2, 256, 512, 16, 2, 1),
]


@contextlib.contextmanager
def _forced(policy):
    """The cpu backend, the GEMM form off, the Winograd form as ``policy()`` says."""
    with ganengine.use_backend("cpu"), gemm_policy("never"), policy():
        yield


def variants(tiles: bool):
    """name -> (memory format, policy context factory)"""
    out = {
        "oneDNN NCHW": (torch.contiguous_format, lambda: winograd_policy("never")),
        "oneDNN NHWC": (torch.channels_last, lambda: winograd_policy("never")),
        "winograd": (torch.contiguous_format, lambda: winograd_policy("always", 2, 3)),
    }
    if tiles:
        out["winograd F(3,4)/F(4,2)"] = (torch.contiguous_format, lambda: winograd_policy("always", 3, 4))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiles", action="store_true", help="also time the larger tiles")
    ap.add_argument("--only", nargs="*", default=None, help="groups to run (patchgan, unet, stargan)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    vs = variants(args.tiles)
    print(f"threads={torch.get_num_threads()} repeats={args.repeats} (ms, median, interleaved; {timing.load_note()})")
    print("| group | kind | N | C_in -> C_out | H | stride | pass | " + " | ".join(vs) +
          " | winograd vs best oneDNN | auto picks |")
    print("| --- " * (8 + len(vs) + 2) + "|")
    torch.manual_seed(0)
    for group, tr, n, ci, co, h, s, p in SHAPES:
        if args.only and group not in args.only:
            continue
        x0 = torch.randn(n, ci, h, h)
        w0 = torch.randn(*((ci, co) if tr else (co, ci)), 4, 4) * 0.02
        with ganengine.use_backend("cpu"), gemm_policy("never"):
            auto = uses_winograd(x0, w0, (s, s), (p, p), tr)
        for backward in (False, True):
            calls, scopes = {}, {}
            for name, (fmt, policy) in vs.items():
                x = x0.contiguous(memory_format=fmt).requires_grad_(backward)
                w = w0.contiguous(memory_format=fmt).requires_grad_(backward)

                def run(x=x, w=w):
                    y = GF.conv_transpose2d(x, w, None, s, p) if tr else GF.conv2d(x, w, None, s, p)
                    if backward:
                        torch.autograd.grad(y, (x, w), torch.ones_like(y))

                calls[name] = run
                scopes[name] = functools.partial(_forced, policy)
            times = timing.medians(timing.interleave(calls, args.repeats, warmup=2, scopes=scopes))
            best = min(times["oneDNN NCHW"], times["oneDNN NHWC"])
            cells = " | ".join(f"{t:.2f}" for t in times.values())
            print(f"| {group} | {'convT' if tr else 'conv'} | {n} | {ci} -> {co} | {h} | {s} | "
                  f"{'fwd+bwd' if backward else 'fwd'} | {cells} | {best / times['winograd']:.2f}x | "
                  f"{'winograd' if auto else 'oneDNN'} |", flush=True)


if __name__ == "__main__":
    main()
