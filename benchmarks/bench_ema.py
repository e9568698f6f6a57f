"""Benchmark: one EMA update of a generator's parameters and buffers.

Variants (all update the same tensors of the same model):

  loop         BigGAN-PyTorch's ``utils.ema.update``: per state-dict entry
               ``target.copy_(target * decay + source * (1 - decay))`` (4 aten ops per tensor)
  AveragedModel  ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` (PyTorch's
               multi-tensor EMA of the parameters; buffers with ``use_buffers=True``)
  ganengine    ``ganengine.train.EMA.update``: one ``_foreach_lerp_`` per (device, dtype) group,
               one ``_foreach_copy_`` for the copied entries

Model: the BigGAN-128 generator (ajbrock layout, G_ch 96, shared embedding, hier), every channel
count divided by ``--scale``; its state dict has 166 tensors (any scale), which is what the update costs on
the host. ``--ops`` counts aten ops per update (each is one kernel on a GPU, the foreach ops one
per chunk of tensors).

    python -m benchmarks.bench_ema [--scale 4] [--repeats 30] [--threads N] [--ops] [--json F]

The variants take turns in 10 rounds (ganengine.bench.timing.interleave), 2 untimed updates at
the start of each turn; median of --repeats.
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

from ganengine.bench import timing
from ganengine.train import EMA


def biggan_G(scale=4):
    from ganengine.models.networks_biggan import BigGANGenerator

    torch.manual_seed(0)
    return BigGANGenerator(G_ch=max(1, 96 // scale), dim_z=120, resolution=128, G_attn="64", n_classes=1000,
                           shared_dim=128, hier=True, G_init="N02")


class LoopEMA:
    """BigGAN-PyTorch utils.ema (rewritten): per-entry arithmetic over the state dict."""

    def __init__(self, source, target, decay):
        self.src, self.tgt, self.decay = source.state_dict(), target.state_dict(), decay

    @torch.no_grad()
    def update(self):
        d = self.decay
        for key in self.src:
            if self.tgt[key].is_floating_point():
                self.tgt[key].copy_(self.tgt[key] * d + self.src[key] * (1 - d))


def variants_for(model, decay=0.999):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    loop = LoopEMA(model, copy.deepcopy(model), decay)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ours = EMA(model, decay=decay)
    return {"loop (BigGAN utils.ema)": loop.update,
            "AveragedModel (multi-tensor)": lambda: averaged.update_parameters(model),
            "ganengine EMA": ours.update}


def time_interleaved(variants, repeats, rounds=10, warmup=2):
    """{name: median seconds}, the variants taking turns in ``rounds`` rounds."""
    res = timing.interleave(variants, repeats, warmup=0, per_round=max(1, repeats // rounds), round_warmup=warmup)
    return {name: s["median"] / 1e3 for name, s in res.items()}


def count_ops(variants):
    """{name: aten ops per update} (each one kernel on a GPU)."""
    out = {}
    for name, fn in variants.items():
        fn()
        out[name] = timing.count_kernels(fn, "cpu")["aten_ops"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ops", action="store_true", help="count aten ops per update")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.scale < 1:
        ap.error(f"--scale must be >= 1 (channel widths divided by it; 1: the reference BigGAN-128 G), "
                 f"got {args.scale}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1 (timed updates), got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1 (leave it out for the default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = biggan_G(args.scale)
    n_tensors = len(model.state_dict())
    n_elems = sum(t.numel() for t in model.state_dict().values())
    variants = variants_for(model)
    result = {"scale": args.scale, "tensors": n_tensors, "elements": n_elems}
    if args.ops:
        result["aten_ops"] = count_ops(variants)
    med = time_interleaved(variants, args.repeats)
    result["seconds"] = med
    base = med["loop (BigGAN utils.ema)"]
    print(f"BigGAN-128 G (scale 1/{args.scale}): {n_tensors} state tensors, {n_elems / 1e6:.2f} M elements; "
          f"one EMA update, fp32, {torch.get_num_threads()} threads, median of {args.repeats} in 10 interleaved rounds; "
          f"{timing.load_note()}")
    print("| variant | time | vs loop |" + (" aten ops |" if args.ops else ""))
    print("| --- | ---: | ---: |" + (" ---: |" if args.ops else ""))
    for name, t in med.items():
        ops = f" {result['aten_ops'][name]} |" if args.ops else ""
        print(f"| {name} | {t * 1e3:.3f} ms | {base / t:.2f}x |{ops}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


# ----------------------------------------------------------------------------- pytest-benchmark
def _bench(benchmark, name):
    benchmark(variants_for(biggan_G(16))[name])


def test_loop_ema(benchmark):
    _bench(benchmark, "loop (BigGAN utils.ema)")


def test_ganengine_ema(benchmark):
    _bench(benchmark, "ganengine EMA")


if __name__ == "__main__":
    main()
