"""Benchmark: the CycleGAN generator loss block, forward + backward.

Two adversarial lsgan terms on 30x30 PatchGAN maps (batch 1), two cycle and two identity L1
terms on 1x3x256x256 images, summed and backpropagated, as in the CycleGAN reference's
``backward_G``: ganengine (``GF.gan_loss`` on both maps + ``GF.cycle_loss``) vs eager PyTorch (the
reference's GANLoss/L1Loss composition) vs ``torch.compile`` of that composition.

    python -m benchmarks.bench_losses [--backend cpu] [--device cpu|cuda] [--repeats 200] [--threads N] [--json F]
        [--size 256] [--no-compile] [--kernels]
    pytest benchmarks/bench_losses.py --benchmark-only      (pytest-benchmark suite)

prints a markdown table: all variants in one run, taking turns in 10 rounds
(ganengine.bench.timing.interleave), median of repeats.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import ganengine
import ganengine.functional as GF
from ganengine.bench import timing

LAMBDA_A = LAMBDA_B = 10.0
LAMBDA_IDT = 0.5


def make_inputs(batch=1, size=256, patch=30, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, grad):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)

    img = (batch, 3, size, size)
    return dict(pred_a=t(batch, 1, patch, patch, grad=True), pred_b=t(batch, 1, patch, patch, grad=True),
                real_a=t(*img, grad=False), rec_a=t(*img, grad=True), real_b=t(*img, grad=False),
                rec_b=t(*img, grad=True), idt_a=t(*img, grad=True), idt_b=t(*img, grad=True))


def eager_block(pred_a, pred_b, real_a, rec_a, real_b, rec_b, idt_a, idt_b):
    # the reference: GANLoss('lsgan') = MSELoss against the label expanded to the map, L1Loss
    one = torch.ones((), dtype=pred_a.dtype)
    loss_g_a = F.mse_loss(pred_a, one.expand_as(pred_a))
    loss_g_b = F.mse_loss(pred_b, one.expand_as(pred_b))
    loss_cycle_a = F.l1_loss(rec_a, real_a) * LAMBDA_A
    loss_cycle_b = F.l1_loss(rec_b, real_b) * LAMBDA_B
    loss_idt_a = F.l1_loss(idt_a, real_b) * LAMBDA_B * LAMBDA_IDT
    loss_idt_b = F.l1_loss(idt_b, real_a) * LAMBDA_A * LAMBDA_IDT
    return loss_g_a + loss_g_b + loss_cycle_a + loss_cycle_b + loss_idt_a + loss_idt_b


def ganengine_block(pred_a, pred_b, real_a, rec_a, real_b, rec_b, idt_a, idt_b):
    total, _terms = GF.cycle_loss(real_a, rec_a, real_b, rec_b, idt_a, idt_b, LAMBDA_A, LAMBDA_B, LAMBDA_IDT)
    return GF.gan_loss([pred_a, pred_b], True, "lsgan") + total  # both adversarial terms in one pass


def step(fn, inputs):
    for v in inputs.values():
        v.grad = None
    fn(**inputs).backward()


def time_interleaved(variants, inputs, repeats, rounds=10, warmup=5):
    """{name: median seconds}: the variants take turns in rounds of repeats // rounds steps, so a
    noisy neighbour (this machine is shared) hits all of them alike, while each variant still
    runs a few steps in a row (its own allocation pattern, as in a training loop)."""
    device = next(iter(inputs.values())).device
    calls = {name: (lambda fn=fn: step(fn, inputs)) for name, fn in variants.items()}
    res = timing.interleave(calls, repeats, warmup=0, per_round=max(1, repeats // rounds), round_warmup=warmup,
                            sync=timing.cuda_sync(device))
    return {name: s["median"] / 1e3 for name, s in res.items()}


def check_same(inputs):
    a = eager_block(**inputs)
    b = ganengine_block(**inputs)
    if not torch.allclose(a, b, rtol=1e-5, atol=1e-5):
        raise SystemExit(f"ganengine result {b.item()} differs from eager {a.item()}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="cpu", choices=ganengine.backends.CHOICES)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--size", type=int, default=256, help="image height and width (256: the reference)")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    ap.add_argument("--kernels", action="store_true", help="also count kernels per step of each variant")
    args = ap.parse_args(argv)
    for option, what in (("repeats", "timed steps"), ("batch", "images per step"), ("size", "image height and width")):
        if getattr(args, option) < 1:
            ap.error(f"--{option} must be >= 1 ({what}), got {getattr(args, option)}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1 (leave it out for the default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = {k: v.detach().to(args.device).requires_grad_(v.requires_grad)
              for k, v in make_inputs(batch=args.batch, size=args.size).items()}
    variants = {"eager PyTorch": eager_block}
    if not args.no_compile:
        variants["torch.compile"] = torch.compile(eager_block)
    variants[f"ganengine ({args.backend})"] = ganengine_block
    with ganengine.use_backend(args.backend), ganengine.backends.strict(args.backend != "auto"):
        check_same(inputs)
        med = time_interleaved(variants, inputs, args.repeats)
        if args.kernels:
            kernels = timing.kernel_table({n: (lambda fn=fn: step(fn, inputs)) for n, fn in variants.items()},
                                          args.device)
    eager, comp = med["eager PyTorch"], med.get("torch.compile")  # (None with --no-compile: "-")
    s = args.size
    print(f"CycleGAN loss block (2 lsgan {args.batch}x1x30x30 + 2 cycle + 2 identity L1 at {args.batch}x3x{s}x{s}), "
          f"forward+backward, fp32, {args.device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} repeats taken in 10 interleaved rounds; {timing.load_note()}")
    print("| variant | time | vs eager | vs torch.compile |")
    print("| --- | --- | --- | --- |")
    for name, t in med.items():
        vs_compile = "-" if comp is None else f"{comp / t:.2f}x"
        print(f"| {name} | {t * 1e6:.0f} us | {eager / t:.2f}x | {vs_compile} |")
    if args.kernels:
        print("\nKernels per step:\n\n" + kernels)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "threads": torch.get_num_threads(), "repeats": args.repeats,
                       "median_s": med}, f, indent=2)


# ---------------------------------------------------------------- pytest-benchmark suite
def _bench(benchmark, fn, backend="cpu"):
    inputs = make_inputs()
    with ganengine.use_backend(backend):
        benchmark(step, fn, inputs)


def test_bench_eager(benchmark):
    _bench(benchmark, eager_block)


def test_bench_compile(benchmark):
    _bench(benchmark, torch.compile(eager_block))


def test_bench_ganengine(benchmark):
    _bench(benchmark, ganengine_block)


if __name__ == "__main__":
    main()
