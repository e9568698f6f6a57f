"""Per-call backend choice shared by every op family.

An op implementation calls::

    backend = choose("norm_act", x, {
        "triton": None if triton can serve this call else "why not",
        "cpu":    ...,
        "cuda":   ...,
    })

and then runs that backend. ``choose`` combines the requested backend (``use_backend`` /
``GANENGINE_BACKEND``), whether that backend serves the tensor's device in this process, and the
op's own legality verdicts. A backend that cannot serve the call falls back to the next one in
the auto order and finally to "torch"; a fallback is never silent in debug mode and is an error
in strict mode. The last choice per op is recorded so tests and the profiler can see it.
"""
from __future__ import annotations

import logging
import warnings

import torch

from ganengine import _ext, backends

log = logging.getLogger("ganengine.dispatch")

# auto order per device type; "torch" is always the last resort
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}

last_used: dict[str, str] = {}


class BackendFallbackError(RuntimeError):
    """Raised in strict mode when the requested backend cannot serve a call."""


def ext_reason(op: str, device: torch.device) -> str | None:
    """None if ganengine._C has a kernel for ``op`` on ``device``, else why not."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    if not _ext.loaded():
        return "ganengine._C is not built"
    if not _ext.has_kernel(op, key):
        return f"ganengine._C has no {key} kernel for {op}"
    return None


def _fallback(op: str, wanted: str, reason: str) -> None:
    msg = f"ganengine.{op}: backend {wanted!r} cannot serve this call ({reason}); using 'torch'"
    if backends.is_strict():
        raise BackendFallbackError(msg)
    if backends.debug():
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    log.debug(msg)


def choose(op: str, x: torch.Tensor, verdicts: dict[str, str | None]) -> str:
    """Pick the backend for one call of ``op`` on tensors like ``x``.

    ``verdicts`` maps backend name -> None (can serve) or a reason (cannot). A backend missing
    from ``verdicts`` is not implemented for this op.
    """
    requested = backends.current()
    device = x.device

    def reason_for(name: str) -> str | None:
        if name == "torch":
            return None
        if name not in verdicts:
            return f"{op} has no {name} implementation"
        if not backends.serves(name, device):
            return f"{name} does not serve {device.type} tensors here: {backends.status()[name]}"
        return verdicts[name]

    if requested == "auto":
        for name in AUTO_ORDER.get(device.type, ()):
            if reason_for(name) is None:
                last_used[op] = name
                return name
        last_used[op] = "torch"
        return "torch"

    why = reason_for(requested)
    if why is None:
        last_used[op] = requested
        return requested
    _fallback(op, requested, why)
    last_used[op] = "torch"
    return "torch"
