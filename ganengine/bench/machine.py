"""Where a figure came from: machine, versions, git revision."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import torch

from ganengine.bench.memory import physical_cores


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def git_revision(path: str | None = None) -> dict:
    """{commit, dirty} of the checkout holding ganengine (commit None outside git/no commits)."""
    path = path or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args):
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 else None
        status = git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def machine_info() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_physical_cores": physical_cores(),
        "memory_bytes": _mem_total_bytes(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton_version,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "git": git_revision(),
        # other processes competing for the cores make CPU timings noise: record the load
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_bytes": props.total_memory,
                       "capability": f"{props.major}.{props.minor}",
                       "multiprocessors": props.multi_processor_count}
    try:
        from ganengine import backends

        info["backends"] = backends.status()
    except Exception as exc:  # pragma: no cover
        info["backends"] = {"error": str(exc)}
    return info
