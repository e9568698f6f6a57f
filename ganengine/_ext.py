"""Loads the compiled extension ``ganengine._C`` if it was built, and says why not otherwise.

Importing ganengine never fails because of the extension: the torch backend always works.
The C++ ops register themselves in the ``ganengine_C`` torch.library namespace on import
(one TORCH_LIBRARY_FRAGMENT per op family), with CPU and, when built, CUDA kernels.
"""
from __future__ import annotations

import torch

_C = None
load_error: str | None = None
try:  # noqa: SIM105 - we want the message
    from ganengine import _C  # type: ignore[attr-defined, no-redef]
except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
    import glob as _glob
    import os as _os

    _here = _os.path.dirname(_os.path.abspath(__file__))
    if isinstance(exc, ImportError) and not _glob.glob(_os.path.join(_here, "_C.*")):
        # (Python's own message for a missing submodule of a package being imported blames a
        # circular import)
        why = f"no extension file ganengine/_C.*.so in {_here}: it was not built (GANENGINE_SKIP_EXT=1 or a failed build)"
    else:
        why = f"{type(exc).__name__}: {exc}"
    load_error = (
        f"ganengine._C is not importable ({why}). "
        "Build it with `pip install -e .` (or `python setup.py build_ext --inplace`) "
        "against the torch you run with."
    )

NAMESPACE = "ganengine_C"


def loaded() -> bool:
    return _C is not None


def build_info() -> dict:
    """Flags the extension was built with (empty dict if it is not loaded)."""
    if _C is None:
        return {}
    return dict(_C.build_info())


_HAS_KERNEL: dict[tuple[str, str], bool] = {}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True if ``ganengine_C::op`` exists and has a kernel for ``dispatch_key`` ("CPU"/"CUDA").
    Asked of the dispatcher once per (op, key): the extension registers its kernels when it is
    loaded, and the dispatcher query costs ~5 us, on every op's dispatch path."""
    if _C is None:
        return False
    key = (op, dispatch_key)
    found = _HAS_KERNEL.get(key)
    if found is None:
        try:
            found = bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", dispatch_key))
        except RuntimeError:  # op not registered at all
            found = False
        _HAS_KERNEL[key] = found
    return found


def op(name: str):
    """The ``torch.ops.ganengine_C.<name>`` overload packet."""
    return getattr(getattr(torch.ops, NAMESPACE), name)


_RAW: dict = {}


def raw_op(name: str):
    """The raw builtin of ``ganengine_C::<name>`` (its default overload's ``_op``): no
    OpOverloadPacket layer, ~1.2 us less per call on the host; looked up once per name."""
    try:
        return _RAW[name]
    except KeyError:
        found = _RAW[name] = op(name).default._op
        return found
