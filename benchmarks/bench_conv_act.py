"""PatchGAN discriminator forward + backward: ganengine vs eager PyTorch vs torch.compile.

    python benchmarks/bench_conv_act.py                       # the table for docs/conv_act.md
    python benchmarks/bench_conv_act.py --batch 1 --norm instance --repeats 5
    pytest benchmarks/bench_conv_act.py                       # pytest-benchmark suite

One step = ``D(x).mean().backward()`` with parameter gradients (the discriminator update; x
does not require grad) for the 70x70 PatchGAN (n_layers=3, ndf=64) at 256x256. "eager" and
"compile" run a copy of the reference module tree (``PatchDiscriminator.model``, the
reference ``NLayerDiscriminator``'s nn.Sequential) in PyTorch's default NCHW layout; "ganengine" runs ``PatchDiscriminator``
(fused ops, channels_last) with the selected backend. Times are medians of ``--repeats`` steps
after warm-up, all variants measured in one process, taking turns (ganengine.bench.timing.interleave).
``--size`` shrinks the input (default 256, the reference); ``--kernels`` adds kernels per step.
"""
from __future__ import annotations

import argparse
import copy
import functools

import torch

import ganengine
from ganengine.bench import timing
from ganengine.nn import PatchDiscriminator


def make(norm: str, input_nc: int):
    torch.manual_seed(0)
    return PatchDiscriminator(input_nc, 64, 3, norm=norm).init_weights()


def _step(fn, params, x):
    for p in params:
        p.grad = None
    fn(x).mean().backward()


def reference_copy(d: PatchDiscriminator) -> torch.nn.Module:
    """The reference module tree with the same weights, in PyTorch's default NCHW layout."""
    return copy.deepcopy(d.model).to(memory_format=torch.contiguous_format)


def run_case(norm: str, batch: int, repeats: int, backend: str, size: int = 256, compile_: bool = True,
             kernels: bool = False):
    input_nc = 3 if norm == "instance" else 6  # CycleGAN D (3 channels), pix2pix D (A+B = 6 channels)
    d = make(norm, input_nc)
    params = list(d.parameters())
    ref = reference_copy(d)
    ref_params = list(ref.parameters())
    x = torch.randn(batch, input_nc, size, size)

    variants = {"eager": lambda: _step(ref, ref_params, x)}
    if compile_:
        torch._dynamo.reset()
        compiled = torch.compile(ref)
        variants["compile"] = lambda: _step(compiled, ref_params, x)
    variants["ganengine"] = lambda: _step(d, params, x)
    scopes = {"ganengine": functools.partial(ganengine.use_backend, backend)}
    # the variants take turns, so a load change on this shared machine hits all of them alike
    ms = timing.medians(timing.interleave(variants, repeats, warmup=2, scopes=scopes))
    if kernels:
        print(timing.kernel_table(variants, "cpu", scopes), flush=True)
    return {"norm": norm, "batch": batch, **{f"{k}_ms": v for k, v in ms.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--norm", nargs="*", default=["instance", "batch"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--size", type=int, default=256, help="input height and width (256: the reference)")
    ap.add_argument("--kernels", action="store_true", help="also count kernels per step of each variant")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend={args.backend}, "
          f"{args.size}x{args.size}; {timing.load_note()}")
    print("| norm | batch | eager (ms) | torch.compile (ms) | ganengine (ms) | vs eager | vs compile |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for norm in args.norm:
        for b in args.batch:
            r = run_case(norm, b, args.repeats, args.backend, args.size, not args.no_compile, args.kernels)
            c = r.get("compile_ms")  # (None with --no-compile: the columns say "-")
            compiled = "-" if c is None else f"{c:.1f}"
            vs_compile = "-" if c is None else f"{c / r['ganengine_ms']:.2f}x"
            print(f"| {norm} | {b} | {r['eager_ms']:.1f} | {compiled} | {r['ganengine_ms']:.1f} | "
                  f"{r['eager_ms'] / r['ganengine_ms']:.2f}x | {vs_compile} |", flush=True)


# ------------------------------------------------------------------ pytest-benchmark suite
def _bench(benchmark, norm, variant):
    d = make(norm, 3)
    x = torch.randn(1, 3, 128, 128)
    if variant == "ganengine":
        with ganengine.use_backend("cpu"):
            benchmark(_step, d, list(d.parameters()), x)
    else:
        ref = reference_copy(d)
        benchmark(_step, ref, list(ref.parameters()), x)


def test_patchgan_instance_eager(benchmark):
    _bench(benchmark, "instance", "eager")


def test_patchgan_instance_ganengine(benchmark):
    _bench(benchmark, "instance", "ganengine")


if __name__ == "__main__":
    main()
