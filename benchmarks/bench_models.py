"""One full training step (all networks forward + backward + optimiser steps) per model:
ganengine (fused ops, fused Adam) vs the reference's step (the model built with ``fused=False``:
the reference's own layers and plain losses, on the torch backend, with the reference's
per-parameter Adam), eager, and (``--compile``) that step with every network wrapped in
``torch.compile``; ``--split`` adds that step with only the fused Adam.

    python benchmarks/bench_models.py                       # CPU-sized defaults, table to stdout
    python benchmarks/bench_models.py --models cyclegan --size 256 --batch 1 --repeats 5
    python benchmarks/bench_models.py --reference-sizes     # `ganengine bench --models`' reference settings
    python benchmarks/bench_models.py --quick               # `ganengine bench --quick`'s tiny models

Each (model, variant) runs in its own process and builds the model from the same seed; after
``--warmup`` steps, ``--repeats`` timed steps; the table shows the medians and the speed-up over
the torch-backend eager step. Keep the machine otherwise idle: variants are timed one after
another, not interleaved.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import subprocess
import time

import torch

import ganengine
from ganengine.bench import timing
from ganengine.bench.cases_models import MODEL_SPECS
from ganengine.bench.cases_models import make_batch as case_batch
from ganengine.models import build_model


def registry_setting(name: str, **extra) -> tuple[dict, int, int]:
    """(options, image size, batch) of `ganengine bench`'s reference case of model ``name``
    (ganengine/bench/cases_models.py MODEL_SPECS[name]: its "ref" options and batch), plus ``extra``."""
    spec = MODEL_SPECS[name]
    batch, size = spec["batch"]["ref"]
    return ({**spec["ref"], **extra}, size, batch)


# --reference-sizes: the registered cases' reference settings, one source of truth with
# `ganengine bench --models` (the papers' resolutions and options; their batches where a 2-core
# CPU steps them in seconds to a minute, the BigGAN family's 4-16 images otherwise: --batch for
# the papers' 50-256). stackgan1 is the registry's StackGAN (stage 1); stackgan2 has no case there.
REFERENCE = {name: registry_setting(name) for name in MODEL_SPECS if name != "stackgan"}
REFERENCE["stackgan1"] = registry_setting("stackgan", stage=1)
REFERENCE["stackgan2"] = (dict(stage=2), 256, 16)   # StackGAN-v1 stage II's reference setting (the script's own)
# DCGAN and PyTorch-GAN's models run at their reference settings in the CPU-sized table too
# (MNIST-sized, seconds per step); WGAN/WGAN-GP with n_critic 1 so that every timed step has the
# critic and the generator step
SYNTHESIS = {
    "dcgan": (dict(), 64, 64),
    "wgan": (dict(n_critic=1), 28, 64),
    "wgan_gp": (dict(n_critic=1), 28, 64),
    "cgan": (dict(), 32, 64),
    "acgan": (dict(), 32, 64),
    "adcgan": (dict(), 32, 64),
    "infogan": (dict(), 32, 64),
}
# the models whose image size is the option ``resolution`` (BigGAN's; SAGAN's ``imsize``)
REFERENCE_COMPOSITION = ("sagan", "biggan", "biggan_deep", "unetgan", "icgan")
CPU_DEFAULT = {
    "cyclegan": (dict(), 256, 1),
    "pix2pix": (dict(), 256, 1),
    "stargan": (dict(n_critic=1), 128, 2),
    "stackgan1": (dict(stage=1), 64, 16),
    "stackgan2": (dict(stage=2), 256, 2),
    **SYNTHESIS,
    # attention / spectral-norm synthesis (CPU-sized: the papers' 128x128 batch-256 steps take minutes)
    "csgan": (dict(), 128, 1),
    "sagan": (dict(), 64, 8),
    "biggan": (dict(G_ch=32, D_ch=32, G_attn="32", D_attn="32", G_shared=True, hier=True, dim_z=120, shared_dim=128,
                    num_D_steps=1, n_classes=10), 64, 8),
    "biggan_deep": (dict(G_ch=32, D_ch=32, G_attn="32", D_attn="32", dim_z=128, shared_dim=128, num_D_steps=1,
                         n_classes=10), 64, 8),
    "unetgan": (dict(G_ch=16, D_ch=16, G_attn="0", D_attn="0", G_shared=True, hier=True, dim_z=120, n_classes=10),
                64, 8),
    # BigGAN's setting above plus the instances (docs/synthesis.md's IC-GAN speed figure: 64-d features)
    "icgan": (dict(G_ch=32, D_ch=32, G_attn="32", D_attn="32", G_shared=True, hier=True, dim_z=120, shared_dim=128,
                   num_D_steps=1, n_classes=10, G_shared_feat=True, shared_dim_feat=128, instance_sz=64), 64, 8),
}


def quick_table() -> dict:
    """--quick: `ganengine bench --quick`'s model settings (ganengine/bench/cases_models.py
    MODEL_SPECS "quick"; stackgan1 is its StackGAN, stage 1), as (options, image size, batch)."""
    table = {}
    for name in CPU_DEFAULT:
        spec = MODEL_SPECS.get("stackgan" if name == "stackgan1" else name)
        if spec is not None:
            n, size = spec["batch"]["quick"]
            table[name] = ({**spec["quick"], **(dict(stage=1) if name == "stackgan1" else {})}, size, n)
    return table


def make_batch(name: str, model, size: int, batch: int) -> dict:
    """`ganengine bench`'s synthetic batch (docs/INTERFACES.md's layout; IC-GAN: with a synthetic
    instance bank, the same for every variant)."""
    return case_batch("stackgan" if name.startswith("stackgan") else name, model, batch, size, "cpu")


def build(name: str, opts: dict, size: int):
    model_name = "stackgan" if name.startswith("stackgan") else name
    extra = {}
    if model_name in ("cyclegan", "pix2pix", "csgan"):
        extra["crop_size"] = size
        if model_name == "pix2pix":
            if size not in (128, 256):
                raise SystemExit(f"pix2pix's U-Nets take 256x256 (unet_256) or 128x128 (unet_128) images, not {size}")
            extra["netG"] = "unet_128" if size == 128 else "unet_256"
    if model_name == "dcgan" and size != 64:  # (its reference networks: 64x64 only)
        raise SystemExit(f"dcgan's reference networks (pytorch/examples) take 64x64 images only, not {size}")
    if model_name == "stargan":
        extra["image_size"] = size
    if model_name in SYNTHESIS and model_name != "dcgan":
        extra["img_size"] = size
    if model_name in REFERENCE_COMPOSITION:
        extra["imsize" if model_name == "sagan" else "resolution"] = size
    torch.manual_seed(0)
    return build_model(model_name, **{**opts, **extra})  # (the --quick options name the size too)


# variant -> (kernel backend, model options): "torch" is the reference's step (fused=False: the
# reference's own layers, no folded resampling, its plain losses; torch ops; the reference's
# per-parameter Adam); "torch+fused-adam" isolates what the optimiser alone gives
VARIANTS = {
    "torch": ("torch", dict(fused=False, fused_optimizer=False)),
    "ganengine": ("auto", dict()),
    "torch+fused-adam": ("torch", dict(fused=False, fused_optimizer=True)),
    "compile": ("torch", dict(fused=False, fused_optimizer=False)),
}


def setup_variant(name, opts, size, batch, variant):
    backend, extra = VARIANTS[variant]
    model = build(name, {**opts, **extra}, size)
    data = make_batch(name, model, size, batch)
    if variant == "compile":
        for net_name in model.network_names:
            setattr(model, net_name, torch.compile(getattr(model, net_name)))
    return model, data, model.make_optimizers(), backend


# --clock cpu: the calling thread's CPU time instead of wall time (with one thread every op runs
# on it, so the figure leaves out the time other jobs kept the process descheduled)
CLOCK = [time.perf_counter]


def time_variants(name, opts, size, batch, variants, warmup, repeats, verbose=False) -> dict:
    """Median step time per variant in seconds (main passes one variant per process; with
    several, their steps take turns: ganengine.bench.timing.interleave)."""
    setups = {v: setup_variant(name, opts, size, batch, v) for v in variants}
    failed = {}

    def step_of(v, model, data, optimizers):
        if not verbose:
            return functools.partial(model.train_step, data, optimizers)

        def step():
            t0 = time.perf_counter()
            model.train_step(data, optimizers)
            print(f"  {name} {v} step: {time.perf_counter() - t0:.3f} s", file=sys.stderr, flush=True)
        return step

    def on_error(v, exc):  # torch.compile cannot run every step (double backward in WGAN-GP)
        if v == "torch":
            raise exc
        failed[v] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        print(f"  {name} {v} failed: {failed[v]}", file=sys.stderr, flush=True)

    times = timing.interleave({v: step_of(v, m, d, o) for v, (m, d, o, _) in setups.items()}, repeats,
                              warmup=warmup, on_error=on_error, clock=CLOCK[0],
                              scopes={v: functools.partial(ganengine.use_backend, b) for v, (_, _, _, b) in setups.items()})
    res = {v: (times[v]["median"] / 1e3 if v in times else None) for v in variants}
    res["_failed"] = failed
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(CPU_DEFAULT), choices=list(CPU_DEFAULT))
    p.add_argument("--reference-sizes", action="store_true",
                   help="`ganengine bench --models`' reference settings (ganengine/bench/cases_models.py MODEL_SPECS "
                        "\"ref\"): the papers' resolutions and options; the BigGAN family at 4-16 images (--batch "
                        "for the papers' batches)")
    p.add_argument("--quick", action="store_true",
                   help="`ganengine bench --quick`'s tiny widths, images and batches (every model but stackgan2)")
    p.add_argument("--size", type=int, help="override the image size for every model")
    p.add_argument("--batch", type=int, help="override the batch size for every model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--verbose", action="store_true", help="print every step's time to stderr")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    p.add_argument("--no-header", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--only-variant", help=argparse.SUPPRESS)
    p.add_argument("--split", action="store_true",
                   help="also time the torch backend with the fused Adam alone (what the optimiser contributes)")
    p.add_argument("--interleave", action="store_true",
                   help="time the variants of a model in one process, taking turns (both see the same load; "
                        "the ratio to quote on a shared machine), instead of one process per variant")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or the thread's CPU time (use with OMP_NUM_THREADS=1 / --threads 1)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK[0] = time.thread_time
    if args.quick and args.reference_sizes:
        p.error("--quick and --reference-sizes pick different settings: give one")
    table = quick_table() if args.quick else REFERENCE if args.reference_sizes else CPU_DEFAULT
    missing = [m for m in args.models if m not in table]
    if missing:
        p.error(f"--models {' '.join(missing)}: no {'--quick ' if args.quick else ''}setting; "
                f"available: {' '.join(table)}")
    variants = ["torch", "ganengine"] + (["torch+fused-adam"] if args.split else []) + (["compile"] if args.compile else [])
    if not args.no_header:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
              f"{os.getloadavg()[0]:.1f}, backends: "
              f"{ {k: v for k, v in ganengine.backends.available().items() if v} }; "
              + (f"variants interleaved in one process, {args.clock} clock" if args.interleave
                 else "one process per model and variant"))
        print("| model | image | batch | " + " | ".join(f"{v} (s)" for v in variants) + " | ganengine speed-up |")
        print("| --- | --- | --- | " + " | ".join("---" for _ in variants) + " | --- |", flush=True)
    notes = []
    for name in args.models:
        opts, size, batch = table[name]
        size, batch = args.size or size, args.batch or batch
        if args.only_variant:  # (the child process of the loop below)
            res = time_variants(name, opts, size, batch, [args.only_variant], args.warmup, args.repeats, args.verbose)
            print(json.dumps(res))
            return
        if args.interleave:
            res = time_variants(name, opts, size, batch, variants, args.warmup, args.repeats, args.verbose)
            cells = " | ".join(f"{res[v]:.3f}" if res[v] is not None else "failed" for v in variants)
            print(f"| {name} | {size}x{size} | {batch} | {cells} | {res['torch'] / res['ganengine']:.2f}x |", flush=True)
            notes += [f"{name}, {v}: {why}" for v, why in res["_failed"].items()]
            continue
        # one process per model and variant: glibc's heap left by other steps (another model's,
        # another variant's, torch.compile's) makes the eager step's allocations cheaper than a
        # user training that one model alone gets (pix2pix's eager step was 1.19-1.40x
        # ganengine's across runs before this)
        res = {"_failed": {}}
        for v in variants:
            argv_v = list(argv if argv is not None else sys.argv[1:])
            if "--models" in argv_v:  # this model only
                i = j = argv_v.index("--models")
                j += 1
                while j < len(argv_v) and not argv_v[j].startswith("--"):
                    j += 1
                del argv_v[i:j]
            argv_v += ["--models", name, "--no-header", "--only-variant", v]
            out = subprocess.run([sys.executable, __file__] + argv_v, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name} {v}: benchmark failed\n{out.stderr[-3000:]}")
            got = json.loads(out.stdout.strip().splitlines()[-1])
            res[v] = got[v]
            res["_failed"].update(got["_failed"])
        cells = " | ".join(f"{res[v]:.3f}" if res[v] is not None else "failed" for v in variants)
        print(f"| {name} | {size}x{size} | {batch} | {cells} | {res['torch'] / res['ganengine']:.2f}x |", flush=True)
        notes += [f"{name}, {v}: {why}" for v, why in res["_failed"].items()]
    if notes:  # after the table: a text line inside it would end it
        print("\n" + "\n".join(f"{n}  " for n in notes), flush=True)

if __name__ == "__main__":
    main()
