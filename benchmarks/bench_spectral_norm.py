"""Benchmark: spectral normalisation of a whole discriminator per training step.

Every spectral-normed layer of a SAGAN or BigGAN discriminator computes its normalised weight
(train mode: one power iteration, sigma, W / sigma) and backpropagates a gradient into the
weight, as one D forward + backward does; the convolutions themselves are left out. Variants:

  PyTorch      ``torch.nn.utils.parametrizations.spectral_norm`` on every layer (eager)
  compile      ``torch.compile`` of that step
  per-layer    ``ganengine.nn.spectral_norm`` on every layer (backend as given)
  grouped      the same, plus ``ganengine.nn.spectral_norm_group``: one grouped call per step

Layer lists (weight shapes of the reference models):
  sagan    heykeetae SAGAN D at image_size 64, conv_dim 64: four 4x4 stride-2 SN convs
  biggan   ajbrock BigGAN D at 128x128, D_ch 96 (D_attn 64): 23 SN layers, 3x3/1x1 convs of
           six DBlocks, the attention's four 1x1 convs, the linear head and the class embedding
``--scale k`` divides every channel count by k (host-time view at small shapes).

    python -m benchmarks.bench_spectral_norm [--model sagan|biggan] [--backend cpu] [--scale 1]
        [--repeats 30] [--threads N] [--no-compile] [--launches] [--json F]

``--launches`` counts kernels per step without a GPU (it turns the Triton interpreter on): the
aten ops of PyTorch's parametrization (each one kernel on a GPU) against the Triton launches
(+ aten ops around them) of ganengine's per-layer and grouped paths, at --scale 8 (the counts do
not depend on the sizes).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch
from torch import nn

import ganengine
import ganengine.nn as gnn
from ganengine.bench import timing


def sagan_layers(scale=1):
    c = [3] + [64 * m // scale for m in (1, 2, 4, 8)]
    return [("conv", c[i + 1], c[i], 4) for i in range(4)]


def biggan_layers(scale=1, ch=96, n_classes=1000):
    ins = [3] + [ch * m // scale for m in (1, 2, 4, 8, 16)]
    outs = [ch * m // scale for m in (1, 2, 4, 8, 16, 16)]
    down = [True] * 5 + [False]
    layers = []
    for i, (cin, cout) in enumerate(zip(ins, outs)):
        layers += [("conv", cout, cin, 3), ("conv", cout, cout, 3)]
        if cin != cout or down[i]:
            layers.append(("conv", cout, cin, 1))
        if i == 0:  # attention at 64x64 on ch channels
            a = outs[0]
            layers += [("conv", a // 8, a, 1), ("conv", a // 8, a, 1), ("conv", a // 2, a, 1), ("conv", a, a // 2, 1)]
    layers += [("linear", 1, outs[-1], 0), ("embedding", n_classes, outs[-1], 0)]
    return layers


MODELS = {"sagan": sagan_layers, "biggan": biggan_layers}


def build(layers, wrap, seed=0):
    torch.manual_seed(seed)
    mods = []
    for kind, cout, cin, k in layers:
        if kind == "conv":
            m = nn.Conv2d(cin, cout, k, bias=False)
        elif kind == "linear":
            m = nn.Linear(cin, cout, bias=False)
        else:
            m = nn.Embedding(cout, cin)
        mods.append(wrap(m))
    return nn.ModuleList(mods)


def make_step(model, grads):
    def step():
        ws = [m.weight for m in model]
        torch.autograd.backward(ws, grads)
    return step


def time_interleaved(variants, repeats, rounds=10, warmup=2):
    """{name: median seconds}, the variants taking turns in ``rounds`` rounds (timing.interleave)."""
    res = timing.interleave(variants, repeats, warmup=0, per_round=max(1, repeats // rounds), round_warmup=warmup)
    return {name: s["median"] / 1e3 for name, s in res.items()}


def variants_for(layers, backend, with_compile=True):
    torch_model = build(layers, torch.nn.utils.parametrizations.spectral_norm)
    ours = build(layers, gnn.spectral_norm)
    grouped = build(layers, gnn.spectral_norm)
    group = gnn.spectral_norm_group(grouped, attach=False)
    grads = [torch.randn_like(m.weight) for m in torch_model]
    out = {"PyTorch parametrization": make_step(torch_model, grads)}
    if with_compile:
        compiled_model = build(layers, torch.nn.utils.parametrizations.spectral_norm)
        out["torch.compile"] = torch.compile(make_step(compiled_model, grads))
    out[f"ganengine per-layer ({backend})"] = make_step(ours, grads)
    grouped_step = make_step(grouped, grads)

    def grouped_call():
        group.refresh()
        grouped_step()

    out[f"ganengine grouped ({backend})"] = grouped_call
    return out, (torch_model, ours, grouped)


def count_launches(layers, backend="triton"):
    """{variant: kernels per step} under the Triton interpreter (no GPU needed; timing.count_kernels)."""
    out = {}
    variants, _ = variants_for(layers, backend, with_compile=False)
    for name, fn in variants.items():
        scope = contextlib.nullcontext() if name.startswith("PyTorch") else ganengine.use_backend(backend)
        with scope, ganengine.backends.strict():
            fn()  # warm (caches, tables), on the backend counted below
            c = timing.count_kernels(fn, "cpu")
        out[name] = {k: c[k] for k in ("kernels", "triton_launches", "aten_ops")}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sagan", choices=sorted(MODELS))
    ap.add_argument("--backend", default="cpu", choices=ganengine.backends.CHOICES)
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--launches", action="store_true", help="count kernels per step (TRITON_INTERPRET=1)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"model": args.model, "scale": args.scale, "backend": args.backend}
    if args.launches:
        import sys

        if "triton" not in sys.modules:  # the interpreter must be on before triton is imported
            os.environ.setdefault("TRITON_INTERPRET", "1")
        layers = MODELS[args.model](scale=max(args.scale, 8))
        counts = count_launches(layers)
        result["launches"] = counts
        print(f"{args.model} D ({len(layers)} SN layers), kernels per training step (forward + backward of the "
              f"normalised weights), counted under the Triton interpreter")
        print("| variant | kernels | Triton launches | aten ops |")
        print("| --- | ---: | ---: | ---: |")
        for name, c in counts.items():
            print(f"| {name} | {c['kernels']} | {c['triton_launches']} | {c['aten_ops']} |")
    else:
        layers = MODELS[args.model](scale=args.scale)
        with ganengine.use_backend(args.backend), ganengine.backends.strict(args.backend != "auto"):
            variants, models = variants_for(layers, args.backend, with_compile=not args.no_compile)
            med = time_interleaved(variants, args.repeats)
        n_params = sum(m.parametrizations.weight.original.numel() for m in models[0])
        base = med["PyTorch parametrization"]
        result["seconds"] = med
        print(f"{args.model} D spectral norm per step ({len(layers)} layers, {n_params / 1e6:.2f} M weights, "
              f"scale 1/{args.scale}), forward+backward, fp32, {torch.get_num_threads()} threads, median of "
              f"{args.repeats} repeats in 10 interleaved rounds; {timing.load_note()}")
        print("| variant | time | vs PyTorch |")
        print("| --- | ---: | ---: |")
        for name, t in med.items():
            print(f"| {name} | {t * 1e3:.3f} ms | {base / t:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


# ----------------------------------------------------------------------------- pytest-benchmark
def _bench(benchmark, name):
    import pytest

    layers = sagan_layers(scale=4)
    variants, _ = variants_for(layers, "auto", with_compile=False)
    fn = variants.get(name)
    if fn is None:
        pytest.skip(f"no variant {name}")
    benchmark(fn)


def test_pytorch_parametrization(benchmark):
    _bench(benchmark, "PyTorch parametrization")


def test_ganengine_grouped(benchmark):
    _bench(benchmark, "ganengine grouped (auto)")


if __name__ == "__main__":
    main()
