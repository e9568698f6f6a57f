"""Which kernel backends exist in this process, and which one the ops should use.

Backends:
  torch   plain PyTorch composition: ground truth and benchmark baseline; always available.
  triton  Triton kernels (``ganengine.kernels``): CUDA tensors, and CPU tensors only when
          ``TRITON_INTERPRET=1`` was set before triton was imported.
  cpu     C++ kernels in ``ganengine._C`` for CPU tensors.
  cuda    CUDA C++ kernels in ``ganengine._C`` for CUDA tensors (built when nvcc and a CUDA
          torch were present at build time).

Selection: ``use_backend(name)`` sets the backend for the whole process (and, used as a context
manager, restores the previous one on exit); ``GANENGINE_BACKEND`` sets the default; ``"auto"`` (the default) picks
per call from the tensor's device. A backend that cannot serve a call falls back to torch:
silently by default, with a warning when ``GANENGINE_DEBUG=1``, and with an error in strict mode
(``strict()`` or ``GANENGINE_STRICT=1``), which the tests use to prove a backend really ran.
The setting is read when a kernel runs: a backward pass runs on the backend selected when the
backward runs, so a ``with use_backend(...)`` block around the forward only leaves the backward to
the setting outside it (put ``.backward()`` inside the block to run both on one backend).
"""
from __future__ import annotations

import functools
import os
import sys
import threading

import torch

from ganengine import _ext

NAMES = ("torch", "triton", "cpu", "cuda")
CHOICES = ("auto",) + NAMES

class BackendFallbackError(RuntimeError):
    """Raised in strict mode when the requested backend cannot serve a call (``strict()``)."""


class _Setting:
    """A process-wide setting with nested, restorable scopes.

    Process-wide on purpose: autograd runs CUDA backward passes on its own worker threads, which
    would not see a thread- or context-local choice, so a backward would silently use "auto".
    The value is the newest live entry: a scope (a ``with`` block) removes its own entry when it
    ends, so blocks that overlap in two threads leave the value right whatever their order of
    exit (restoring "the value before me" would leave a stale one). A plain setter's entry stays
    until a newer setter replaces it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: list[list] = []  # [token, value, scoped]
        self.value = None

    def push(self, value) -> list:
        with self._lock:
            # setters superseded by a newer setter can never be the value again
            setters = [e for e in self._entries if not e[2]]
            stale = {id(e) for e in setters[:-1]}
            entry = [object(), value, False]
            self._entries = [e for e in self._entries if id(e) not in stale] + [entry]
            self.value = value
        return entry

    def scoped(self, entry: list) -> None:
        entry[2] = True

    def pop(self, entry: list) -> None:
        with self._lock:
            self._entries = [e for e in self._entries if e is not entry]
            self.value = self._entries[-1][1] if self._entries else None

    def get(self):
        return self.value


_requested = _Setting()
_strict = _Setting()


def _check_name(name: str, what: str = "backend") -> str:
    if not isinstance(name, str) or name.lower() not in CHOICES:
        raise ValueError(f"{what} must be one of {CHOICES}, got {name!r}")
    return name.lower()


def current() -> str:
    """The backend requested now: set by use_backend(), else $GANENGINE_BACKEND, else 'auto'."""
    name = _requested.get()
    if name is not None:
        return name
    from ganengine import settings

    return settings.get("GANENGINE_BACKEND")


class use_backend:
    """Select a backend. ``use_backend("cpu")`` sets it; ``with use_backend("cpu"):`` scopes it."""

    def __init__(self, name: str):
        self.name = _check_name(name)
        self._entry = _requested.push(self.name)

    def __enter__(self):
        _requested.scoped(self._entry)
        return self

    def __exit__(self, *exc):
        _requested.pop(self._entry)
        return False

    def __repr__(self):
        return f"use_backend({self.name!r})"


class strict:
    """``with strict():`` makes a fallback away from an explicitly requested backend an error."""

    def __init__(self, enabled: bool = True):
        self._entry = _strict.push(bool(enabled))

    def __enter__(self):
        _strict.scoped(self._entry)
        return self

    def __exit__(self, *exc):
        _strict.pop(self._entry)
        return False


def is_strict() -> bool:
    value = _strict.get()
    if value is not None:
        return value
    from ganengine import settings

    return settings.get("GANENGINE_STRICT")


def debug() -> bool:
    from ganengine import settings

    return settings.get_or_default("GANENGINE_DEBUG")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernels_interpreted() -> bool | None:
    """Whether Triton's jitted functions run under the interpreter in this process: triton.jit
    decides when a module is imported (triton.language's own helpers, tl.sum and the like, at
    Triton's import), so TRITON_INTERPRET=1 set after Triton was imported leaves GPU kernels,
    which fail on CPU tensors. None: Triton is not imported yet."""
    language = sys.modules.get("triton.language")
    fn = getattr(language, "sum", None) if language is not None else None
    if fn is None:
        return None
    return type(fn).__name__ == "InterpretedFunction"


def _triton_on_cpu() -> bool:
    return triton_interpret() and _kernels_interpreted() is not False


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    return None


def _cuda_runtime() -> bool:
    return torch.cuda.is_available()


def status() -> dict[str, str]:
    """{backend: reason} in words: why each backend can or cannot serve tensors here."""
    out = {"torch": f"available: PyTorch {torch.__version__} composition (reference)"}

    err = _triton_import_error()
    if err:
        out["triton"] = f"unavailable: {err}"
    elif _cuda_runtime() and _triton_on_cpu():
        out["triton"] = "available: CUDA tensors, and CPU tensors through the interpreter (TRITON_INTERPRET=1)"
    elif _cuda_runtime():
        out["triton"] = "available: CUDA tensors"
    elif _triton_on_cpu():
        out["triton"] = "available: CPU tensors through the Triton interpreter (TRITON_INTERPRET=1)"
    elif triton_interpret():
        out["triton"] = ("unavailable: TRITON_INTERPRET=1 was set after triton was imported (its kernels are GPU "
                         "kernels in this process); set it before importing triton or ganengine")
    else:
        out["triton"] = ("unavailable: no CUDA device, and TRITON_INTERPRET=1 was not set before "
                         "triton was imported (set it to run the kernels on CPU tensors)")

    if not _ext.loaded():
        out["cpu"] = f"unavailable: {_ext.load_error}"
        out["cuda"] = f"unavailable: {_ext.load_error}"
        return out
    info = _ext.build_info()
    out["cpu"] = f"available: C++ kernels ({info.get('cpu_flags', 'built')})"
    if not info.get("with_cuda", False):
        out["cuda"] = ("unavailable: ganengine._C was built without CUDA kernels "
                       f"({info.get('cuda_reason', 'no nvcc or CPU-only torch at build time')})")
    elif not _cuda_runtime():
        out["cuda"] = (f"unavailable: CUDA kernels are built (arch {info.get('cuda_arch', '?')}) "
                       "but no CUDA device is visible")
    else:
        out["cuda"] = f"available: CUDA kernels built for {info.get('cuda_arch', '?')}"
    return out


def available() -> dict[str, bool]:
    """{backend: bool}: whether that backend can serve CPU or CUDA tensors in this process."""
    return {name: reason.startswith("available") for name, reason in status().items()}


def serves(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on tensors of ``device`` in this process."""
    if name == "torch":
        return True
    if name == "triton":
        if _triton_import_error():
            return False
        return (device.type == "cuda" and _cuda_runtime()) or (device.type == "cpu" and _triton_on_cpu())
    if name == "cpu":
        return device.type == "cpu" and _ext.loaded()
    if name == "cuda":
        return device.type == "cuda" and _ext.loaded() and bool(_ext.build_info().get("with_cuda", False))
    raise ValueError(f"unknown backend {name!r}")
