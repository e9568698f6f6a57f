"""Host time per call of the fused ops' Python route, the route every call on a CUDA tensor takes,
measured on a CPU without a GPU.

On a GPU at GAN batch sizes a training step is host-bound (the first H100 run: eager CycleGAN
76 ms per step in fp32 and in bf16 alike), so the Python a fused op runs per call decides its
speed there. The CPU's lean C++ entries do not serve CUDA tensors; a CUDA call goes through the
op's Python route: argument checks, the backend choice, then the Triton launcher or the CUDA C++
kernel. This script times that route on CPU tensors at each op's tiny shape, one thread,
interleaved, median us per call, forward (no grad) and forward+backward:

* ``eager``: the plain PyTorch composition the op replaces;
* ``custom op``: the Python route through the op's ``torch.library.custom_op`` (what every CUDA
  call ran before the eager route), on the cpu backend's C++ kernels;
* ``eager route``: the same route through its autograd.Function twin (``ganengine/ops/_eager.py``);
* ``eager route, triton``: the same with the Triton backend under ``TRITON_INTERPRET=1``, every
  Triton launch replaced by a no-op: the launchers' own Python (planning, allocation, device
  guard), **without Triton's launch itself**, which needs a GPU driver (outputs are garbage; only
  the time counts), and conv_act on the vendor convolution, its CUDA default (the convolution
  itself runs, on oneDNN). Only with ``TRITON_INTERPRET=1``.
* ``auto order``: what ``auto`` runs on a CUDA tensor: the same, except the ops whose C++ entry
  the auto order takes there (``CUDA_ENTRIES``, batch norm on small NCHW maps), which run that
  entry on the cpu backend's kernels (their arithmetic included), and conv3x3 / conv, whose fast
  entry's vendor route runs here on CPU tensors (``CUDA_CONV_ENTRIES``: oneDNN, as the other
  variants' vendor branch). (cycle_loss, which auto runs on
  the CUDA C++ kernels through its Python route, shows the Triton route here; its ``eager route``
  column is the closer figure.)

What it cannot give: the CUDA runtime's and Triton's launch cost, and the device's CPU speed.
The differences between the rows are what the Python layers add or save on any machine.

``--models cyclegan pix2pix``: the same for whole training steps at the ``quick`` size (the
networks' structure, small maps): the eager model's step (``fused=False``, on the torch backend:
plain PyTorch) against the fused model's on the CUDA
path's route (Triton backend, launches stubbed, the vendor convolution as on CUDA), through the
custom ops and through the eager route, and (``auto order``) with the C++ entries the auto order
takes on CUDA tensors (instance norm on NCHW planes, the adversarial losses, conv2d_act's and
conv2d_instance_norm_act's entries (conv2d_act's fast entry, which on CUDA runs the same C++ with
routes=8): ``CUDA_ENTRIES``; batch norm on small NCHW maps:
``_cuda_bn_backend``),
which here run the cpu backend's kernels, arithmetic included; ms per step. The convolutions (oneDNN here) run in every
variant; what differs is the fused layers' host cost (the Triton kernels' own time is missing).

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python benchmarks/bench_cuda_path_host.py [--ops ...]
    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python benchmarks/bench_cuda_path_host.py --models cyclegan pix2pix
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ganengine import backends  # noqa: E402
from ganengine.bench import registry, timing  # noqa: E402
from ganengine.bench.host_cost import case_calls  # noqa: E402
from ganengine.bench.runner import pinned_threads  # noqa: E402
from ganengine.ops import _dispatch, _eager  # noqa: E402


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _stubbed_triton_launches():
    """Triton launches as no-ops, and denormals flushed to zero: a stubbed kernel leaves its output
    uninitialised, and recycled memory (int64 indices, say) reads as denormal floats, which the
    ATen ops after it (conv_act's convolution_backward on the activation gradient) then run through
    x86's slow denormal path: 20-25 us per conv_act call of time a GPU never spends (the route's
    real data has no denormals; eager's inputs are normal floats either way)."""
    from triton.runtime.interpreter import InterpretedFunction

    with _patched(InterpretedFunction, "__getitem__", lambda self, grid: (lambda *a, **k: None)):
        torch.set_flush_denormal(True)
        try:
            yield
        finally:
            torch.set_flush_denormal(False)


# The C++ entries the auto order takes on CUDA tensors (_dispatch.cuda_entry: instance norm on NCHW
# planes and the adversarial losses, cuda first); on CPU tensors the same entries run the cpu
# backend's kernels, which also do their arithmetic here (more than the CUDA path's host cost).
CUDA_ENTRIES = ("instance_norm_act", "instance_norm_act_rs", "gan_loss", "discriminator_loss", "conv2d_act",
                "conv2d_in_act")
# The conv entries whose fast entry serves CUDA tensors on the vendor route (_dispatch.conv_routes:
# ATen's convolution, cuDNN there); here the same route on CPU tensors (oneDNN, as the Python route's
# vendor branch runs it in the other variants).
CUDA_CONV_ENTRIES = ("conv3x3", "conv")


def _cuda_bn_backend(op, x):
    """The batch norms' backend as auto picks it on a CUDA tensor of x's shape and layout (the CUDA
    C++ op on small NCHW maps, ops/batch_norm_act._variant; Triton otherwise): "cuda" runs the same
    C++ op here, on the cpu kernels."""
    from ganengine.ops import batch_norm_act

    return "cuda" if _dispatch.auto_order(op, "cuda", batch_norm_act._variant(x))[0] == "cuda" else "triton"


def _scope(backend: str, twin: bool, stub: bool, vendor_conv: bool = False, entries: tuple = ()):
    real_lean = _dispatch.lean_op
    conv_entries = CUDA_CONV_ENTRIES if entries else ()

    @contextlib.contextmanager
    def scope():
        with contextlib.ExitStack() as st:
            st.enter_context(backends.use_backend(backend))
            if vendor_conv:  # conv_act's CUDA default (the interpreter's is the implicit GEMM)
                from ganengine.ops.conv_act import triton_conv_impl

                st.enter_context(triton_conv_impl("vendor"))
            # no CPU lean entry, except those in ``entries`` (as the cuda backend's C++ entries)
            resolved = {}

            def lean(name, kernels=()):
                if name not in entries:
                    return None
                try:
                    return resolved[name]
                except KeyError:
                    with backends.use_backend("cpu"):  # (resolved once, outside the timed calls' cost)
                        op = resolved[name] = real_lean(name, kernels)
                    return op
            st.enter_context(_patched(_dispatch, "lean_op", lean))
            st.enter_context(_patched(_dispatch, "conv_routes", lambda name, kernels, fast: (
                _dispatch.ROUTE_VENDOR_CPU if name in conv_entries else 0)))
            if entries:  # the auto order's batch norm choice on CUDA, by map size
                from ganengine.ops import batch_norm_act

                st.enter_context(_patched(batch_norm_act, "_backend", _cuda_bn_backend))
            if not twin:
                st.enter_context(_patched(_eager, "plain_eager", lambda *a: False))
            if stub:
                st.enter_context(_stubbed_triton_launches())
            yield
    return scope


def measure(cases, calls: int, rounds: int) -> list[dict]:
    variants = {"custom op": ("cpu", False, False, False, ()), "eager route": ("cpu", True, False, False, ())}
    if backends.triton_interpret() and backends.serves("triton", torch.device("cpu")):
        variants["eager route, triton"] = ("triton", True, True, True, ())  # (vendor conv, as on CUDA)
        # what auto runs on CUDA: the C++ entries where the auto order takes the CUDA C++ kernels
        variants["auto order"] = ("triton", True, True, True, CUDA_ENTRIES)
    out = []
    for case in cases:
        if case.kind != "op":
            continue
        params, calls_by_mode = case_calls(case, "cpu")
        for mode, (reference, fused) in calls_by_mode.items():
            calls_ = {"eager": reference}
            scopes = {}
            for label, (backend, twin, stub, vendor, entries) in variants.items():
                calls_[label] = fused
                scopes[label] = _scope(backend, twin, stub, vendor, entries)
            # a variant the route does not serve (an op with no Python route on that backend) is
            # reported, not timed
            errors = {}
            with pinned_threads(1):
                res = timing.interleave(calls_, rounds, warmup=10, calls_per_sample=calls, alternate=True,
                                        scopes=scopes, on_error=lambda n, e: errors.__setitem__(n, e))
            rec = {"case": case.name, "shape": params, "mode": mode}
            rec.update({k: v["median"] * 1e3 for k, v in res.items()})
            rec["errors"] = {k: f"{type(e).__name__}: {e}"[:120] for k, e in errors.items()}
            out.append(rec)
            print(f"  {case.name} {mode}: " + ", ".join(f"{k} {v['median'] * 1e3:.1f} us" for k, v in res.items()),
                  flush=True)
    return out


def measure_models(names, rounds: int) -> list[dict]:
    from ganengine.bench.cases_models import MODEL_SPECS, make_batch
    from ganengine.models import build_model
    from ganengine.train.context import AmpContext

    out = []
    for name in names:
        spec = MODEL_SPECS[name]
        n, img = spec["batch"]["quick"]
        steps = {}
        for label, fused in (("eager", False), ("fused", True)):
            torch.manual_seed(0)
            model = build_model(name, **dict(spec["quick"]), fused=fused, fused_optimizer=fused)
            model.train()
            opts = model.make_optimizers()
            batch = make_batch(name, model, n, img, torch.device("cpu"))
            step_ctx = AmpContext("off", torch.device("cpu"), list(opts))
            steps[label] = functools.partial(model.train_step, batch, opts, step_ctx)
        calls_ = {"eager": steps["eager"], "CUDA path, custom op": steps["fused"],
                  "CUDA path, eager route": steps["fused"], "CUDA path, auto order": steps["fused"]}
        # eager: the plain model (fused=False) as a user without ganengine runs it: on the torch
        # backend, so the layers and losses it shares with the fused model run no ganengine kernel
        scopes = {"eager": functools.partial(backends.use_backend, "torch"),
                  "CUDA path, custom op": _scope("triton", False, True, vendor_conv=True),
                  "CUDA path, eager route": _scope("triton", True, True, vendor_conv=True),
                  "CUDA path, auto order": _scope("triton", True, True, vendor_conv=True, entries=CUDA_ENTRIES)}
        with pinned_threads(1):
            res = timing.interleave(calls_, rounds, warmup=2, alternate=True, scopes=scopes)
        rec = {"model": name, "size": f"{n}x{img}x{img}", **{k: v["median"] for k, v in res.items()}}
        out.append(rec)
        print(f"  {name}: " + ", ".join(f"{k} {v['median']:.2f} ms" for k, v in res.items()), flush=True)
    return out


def markdown_models(recs: list[dict]) -> str:
    cols = ["eager", "CUDA path, custom op", "CUDA path, eager route", "CUDA path, auto order"]
    lines = ["| model | batch | " + " | ".join(f"{c} ms" for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    lines += [f"| {r['model']} | {r['size']} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |" for r in recs]
    return "\n".join(lines) + "\n"


def markdown(recs: list[dict]) -> str:
    cols = ["eager", "custom op", "eager route", "eager route, triton", "auto order"]
    lines = ["| op | mode | " + " | ".join(f"{c} us" for c in cols) + " | eager route / custom op |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    for r in recs:
        cells = [f"{r[c]:.1f}" if c in r else "" for c in cols]
        ratio = f"{r['eager route'] / r['custom op']:.2f}x" if "eager route" in r and "custom op" in r else ""
        lines.append(f"| {r['case']} | {r['mode']} | " + " | ".join(cells) + f" | {ratio} |")
    notes = [f"- {r['case']} {r['mode']} {k}: {v}" for r in recs for k, v in r["errors"].items()]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="*", default=[], help="op cases or families (default: every op case)")
    p.add_argument("--calls", type=int, default=100, help="calls per timed sample")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--models", nargs="*", default=None, help="time training steps of these models instead "
                   "(needs TRITON_INTERPRET=1)")
    a = p.parse_args(argv)
    if a.models is not None:
        if not backends.triton_interpret():
            p.error("--models needs TRITON_INTERPRET=1 (the Triton route, launches stubbed)")
        print(markdown_models(measure_models(a.models or ["cyclegan", "pix2pix"], a.rounds)))
        return 0
    print(markdown(measure(registry.select(a.ops, None), a.calls, a.rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
