"""``ganengine profile``: where a training step spends its time, fused vs plain PyTorch."""
from __future__ import annotations

import argparse
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="profile training steps with torch.profiler",
        description="Runs training steps of MODEL (or forward+backward of an op; forward only for an optimiser step) under "
                    "torch.profiler; writes trace.json (open in chrome://tracing or Perfetto), "
                    "profile.md and profile.json with the top operators by self time, grouped by "
                    "whether ganengine's fused ops or plain PyTorch ran them.")
    p.add_argument("model", metavar="MODEL",
                   help=f"a model ({' | '.join(model_case_names()) or 'see `ganengine bench --list`'}) or an "
                        "op case/family (see `ganengine bench --list`)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="unprofiled steps first (default: 1)")
    p.add_argument("--output", default="profile_results", metavar="DIR",
                   help="output folder (default: profile_results)")
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                   help="auto | cpu | cuda (default: auto, cuda when available, else cpu)")
    p.add_argument("--backend", default="auto", help="ganengine backend: auto | torch | triton | cpu | cuda")
    p.add_argument("--quick", action="store_true", help="tiny model widths / shapes")
    p.add_argument("--top", type=int, default=25, help="rows in the operator table (default: 25)")
    p.set_defaults(func=run)


def model_case_names() -> list[str]:
    """The models with a benchmark case in this build (ganengine.bench.cases_models, one per model
    of ganengine.models.MODELS): the help's list, never out of date. Empty where the bench package
    cannot be imported (the help still names the op cases' listing)."""
    try:
        from ganengine.bench.cases_models import model_case_names as names
    except ImportError:
        return []
    return names()


def _check_backend(backend: str, device: str | None) -> None:
    """--backend: a known name that can serve the profiled device in this process (said now,
    as a usage error, not as a BackendFallbackError traceback from inside the first step)."""
    import torch

    from ganengine import backends

    if backend not in backends.CHOICES:
        raise ValueError(f"--backend must be one of {' | '.join(backends.CHOICES)}, got {backend!r}")
    if backend in ("auto", "torch"):
        return
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not backends.serves(backend, dev):
        usable = [b for b in backends.CHOICES if b == "auto" or backends.serves(b, dev)]
        why = backends.status().get(backend, "unavailable")
        if why.startswith("available"):  # it serves the other device
            why = f"it does not serve {dev.type} tensors"
        raise ValueError(f"--backend {backend} cannot run on {dev.type} here ({why}); "
                         f"expected one of {' | '.join(usable)}")


def run(args: argparse.Namespace) -> int:
    from ganengine.bench.profile import markdown, resolve_target, run_profile
    from ganengine.cli._io import device_or_error, writable_dir
    from ganengine.ops._dispatch import BackendFallbackError

    if args.device == "auto":  # (the default: cuda when available, else cpu)
        args.device = None
    try:  # the options and the output folder, before the model is built and run
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1 (profiled steps), got {args.steps}")
        if args.warmup < 0:
            raise ValueError(f"--warmup must be >= 0 (unprofiled steps first), got {args.warmup}")
        if args.top < 1:
            raise ValueError(f"--top must be >= 1 (rows in the operator table), got {args.top}")
        if args.device is not None:
            device_or_error(args.device)
        _check_backend(args.backend, args.device)
        resolve_target(args.model)
        writable_dir(args.output, "--output")
        result = run_profile(args.model, steps=args.steps, warmup=args.warmup, output=args.output,
                             device=args.device, quick=args.quick, backend=args.backend, top=args.top)
    except ValueError as exc:
        print(f"ganengine profile: error: {exc}", file=sys.stderr)
        return 2
    except BackendFallbackError as exc:  # the backend serves the device, but not this workload
        print(f"ganengine profile: error: --backend {args.backend} cannot run {args.model}: {exc}",
              file=sys.stderr)
        return 2
    print(markdown(result))
    print("wrote " + ", ".join(os.path.join(args.output, f) for f in ("trace.json", "profile.json", "profile.md")))
    return 0
