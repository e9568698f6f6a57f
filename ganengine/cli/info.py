"""``ganengine info``: versions, build flags, and which backends serve here (and why not)."""
from __future__ import annotations

import json
import platform


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions, build flags, backends and why each is on or off")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def collect() -> dict:
    import torch

    from ganengine import __version__, _ext, backends, settings

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # pragma: no cover - depends on the install
        triton_version = f"not importable ({exc})"
    return {
        "ganengine": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "triton": triton_version,
        "threads": torch.get_num_threads(),
        "requested_backend": _safe(backends.current),
        "extension": _ext.build_info() if _ext.loaded() else {"error": _ext.load_error},
        "available": backends.available(),
        "status": backends.status(),
        "settings": settings.report(),
        "setting_problems": settings.problems(),
    }


def _safe(fn):
    try:
        return fn()
    except ValueError as exc:  # a bad GANENGINE_* value: shown, not a traceback
        return f"invalid ({exc})"


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    for key in ("ganengine", "python", "platform", "torch", "torch_cuda", "cuda_available", "device", "triton",
                "threads", "requested_backend"):
        print(f"{key:18s} {info[key]}")
    print(f"{'extension':18s} {info['extension']}")
    print("backends:")
    for name, reason in info["status"].items():
        print(f"  {name:7s} {'yes' if info['available'][name] else 'no ':3s}  {reason}")
    print("settings (environment variables):")
    for row in info["settings"]:
        print(f"  {row['name']:32s} {str(row['value']):10s} {row['source']:11s} {row['read_by']:16s} {row['allowed']}")
    for line in info["setting_problems"]:
        print(f"  problem: {line}")
    return 0
