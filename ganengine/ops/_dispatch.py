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

import importlib
import logging
import os
import warnings

import torch

from ganengine import _ext, backends

log = logging.getLogger("ganengine.dispatch")

# auto order per device type; "torch" is always the last resort
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
# Per-op exceptions, keyed (op, device type) or (op, device type, variant), each from a measurement
# on a GPU (docs/gpu.md, "First GPU run", H100, `python -m ganengine.tools.gpu_check`):
# * the losses' one-call CUDA C++ kernels beat the Triton ones: discriminator_loss 30x30
#   forward+backward 61 vs 125 us, cycle_loss 4x3x256x256 120 vs 351 us, a forward call including
#   host time 28 vs 86 us;
# * instance norm on NCHW planes: the CUDA C++ kernel ran at or under the Triton one's time at the
#   batch-1 maps of CycleGAN and pix2pix (forward, bf16 / fp32: 1x256x64x64 12 / 13 us vs 13 / 14;
#   1x64x256x256 18 / 26 us vs the Triton split-plane kernel's 419 / 423, a defect fixed since
#   but not re-measured), Triton ahead only at 16x64x128x128 (29 / 52 vs 33 / 74 us); and its call is
#   one C++ op with C++ autograd (the C++ entry, cuda_entry below) where Triton's is the Python
#   route plus Triton's launch: on this project's CPU proxy 37 against 75 us of host time per
#   forward+backward (eager 64). On channels_last planes the Triton kernels were 2-3x faster at
#   1x64x256x256 and 16x64x128x128 (45 / 57 us vs 134 / 132): Triton first there; on channels_last
#   planes of at most 4096 elements (variant "channels_last_small", ops/norm_act._layout) the CUDA
#   C++ kernel was ahead (1x256x64x64: 32 / 21 us vs 44 / 45): cuda first, with its C++ entry.
# * batch norm (training) on NCHW maps of at most 4096 elements per channel (variant "small",
#   ops/batch_norm_act._variant): the CUDA C++ kernel ran under the Triton one's time at 1x256x64x64
#   (forward, bf16 / fp32: 22 / 22 us vs 32 / 34), and its call is one C++ op with C++ autograd
#   where Triton's is the Python route: on the CPU proxy 34 against 57-78 us of host time per
#   forward+backward (eager 36-40). Triton was ahead on larger NCHW maps (1x64x256x256: 35 / 37 vs
#   51 / 53 us; 16x64x128x128: 69 / 94 vs 178 / 188) and on every NHWC map measured: Triton first
#   there. pix2pix's and DCGAN's batch norms at batch 1-64 are mostly small maps. Conditional batch
#   norm runs the same kernels with a per-sample affine: the same rule (not measured on its own).
# * conv2d_act: the cuda backend runs the Triton backend's CUDA default route (ATen's convolution,
#   cuDNN, then elementwise epilogue kernels: bias + activation forward, the activation's gradient
#   backward, one launch each way) with the epilogues as CUDA C++ kernels, so the device work is
#   the same cuDNN convolution and one memory-bound pass either way; its call is the C++ entry
#   (one dispatcher call, C++ autograd) where Triton's is the Python route: on the CPU proxy
#   eager 193 us per forward+backward, the Triton route 260 (docs/gpu.md). The epilogue kernels'
#   own speed is not measured on a GPU yet (gpu-check's speed_models [triton] / [cuda] variants).
# * conv2d_instance_norm_act: the cuda backend is the same convolution followed by the CUDA C++
#   instance norm kernels in place of the Triton ones, so it follows instance norm's order on the
#   conv output's planes (ops/conv_act._in_variant): cuda first on NCHW and on small NHWC planes,
#   Triton first on larger NHWC planes; its call is the C++ entry (CPU proxy: the Triton route 293
#   us per forward+backward, eager 226).
# The other ops keep the device order until a GPU run measures them (docs/gpu.md says which
# figures decide it).
AUTO_ORDER_BY_OP = {("gan_loss", "cuda"): ("cuda", "triton"), ("cycle_loss", "cuda"): ("cuda", "triton"),
                    ("instance_norm_act", "cuda"): ("cuda", "triton"),
                    ("instance_norm_act", "cuda", "channels_last"): ("triton", "cuda"),
                    ("instance_norm_act", "cuda", "channels_last_small"): ("cuda", "triton"),
                    ("batch_norm_act", "cuda", "small"): ("cuda", "triton"),
                    ("conditional_batch_norm_act", "cuda", "small"): ("cuda", "triton"),
                    ("conv2d_act", "cuda"): ("cuda", "triton"),
                    ("conv2d_instance_norm_act", "cuda"): ("cuda", "triton"),
                    ("conv2d_instance_norm_act", "cuda", "channels_last"): ("triton", "cuda"),
                    ("conv2d_instance_norm_act", "cuda", "channels_last_small"): ("cuda", "triton")}

last_used: dict[str, str] = {}


from ganengine.backends import BackendFallbackError  # noqa: E402 (defined there: public name)


_EXT_REASON: dict = {}  # (op, device type) -> ext_reason's answer: fixed once the extension is loaded


@torch.compiler.assume_constant_result  # (see _serves)
def ext_reason(op: str, device: torch.device) -> str | None:
    """None if ganengine._C has a kernel for ``op`` on ``device``, else why not (asked per call of
    every op, once per backend: answered from a cache)."""
    try:
        return _EXT_REASON[(op, device.type)]
    except KeyError:
        pass
    key = "CUDA" if device.type == "cuda" else "CPU"
    if not _ext.loaded():
        why = "ganengine._C is not built"
    elif not _ext.has_kernel(op, key):
        why = f"ganengine._C has no {key} kernel for {op}"
    else:
        why = None
    _EXT_REASON[(op, device.type)] = why
    return why


_KERNEL_MODULES: dict = {}


def triton_kernels(family: str):
    """``ganengine.kernels.<family>`` (a family's Triton launchers), imported on first use: it imports
    Triton, which may be absent, and an import statement per call costs ~1 us of host time."""
    try:
        return _KERNEL_MODULES[family]
    except KeyError:
        module = _KERNEL_MODULES[family] = importlib.import_module(f"ganengine.kernels.{family}")
        return module


def _fallback(op: str, wanted: str, reason: str) -> None:
    """Only on a fallback away from a requested backend (never on a served call)."""
    msg = f"ganengine.{op}: backend {wanted!r} cannot serve this call ({reason})"
    if backends.is_strict():
        raise BackendFallbackError(f"{msg}; strict mode (ganengine.backends.strict() / GANENGINE_STRICT=1) "
                                   "makes this an error instead of a fallback to 'torch'")
    msg += "; using 'torch'"
    if backends.debug():
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    log.debug(msg)


# (backend, device type, serves function) -> whether the backend serves that device type here: fixed
# for a process (the extension, Triton's import and interpreter mode, CUDA's presence), and asked on
# every call of every op (~1.5 us each for triton, which reads the environment); keyed on
# backends.serves itself so that a test replacing it is seen. These lookups are constants to
# Dynamo (assume_constant_result: it calls them while it traces and keeps the answer, no guard;
# for eager a mark on the function, no wrapper): traced, it guarded on what it read of the dict
# and wrote to it, which the op's eager run then changed: one recompile per process, also under
# dynamic=True.
_SERVED: dict = {}


@torch.compiler.assume_constant_result
def _serves(name: str, device: torch.device) -> bool:
    key = (name, device.type, backends.serves)
    found = _SERVED.get(key)
    if found is None:
        found = _SERVED[key] = backends.serves(name, device)
    return found


def _requested_backend() -> str:
    """backends.current() at a fraction of its cost (GANENGINE_BACKEND read as lean_op reads it)."""
    requested = _requested.value
    if requested is None:
        return backends.current() if _ENV_DATA.get(_ENV_KEY) else "auto"
    return requested


def auto_order(op: str, device_type: str, variant: str | None = None) -> tuple:
    """The backends ``auto`` tries, in order, for ``op`` on a device type (and a variant of the
    call, such as a memory layout, where the op's order depends on it)."""
    return ((variant is not None and AUTO_ORDER_BY_OP.get((op, device_type, variant)))
            or AUTO_ORDER_BY_OP.get((op, device_type)) or AUTO_ORDER.get(device_type, ()))


def choose(op: str, x: torch.Tensor, verdicts: dict[str, str | None], variant: str | None = None) -> str:
    """Pick the backend for one call of ``op`` on tensors like ``x``.

    ``verdicts`` maps backend name -> None (can serve) or a reason (cannot). A backend missing
    from ``verdicts`` is not implemented for this op. ``variant``: see ``auto_order``.
    """
    requested = _requested_backend()
    device = x.device

    def reason_for(name: str) -> str | None:
        if name == "torch":
            return None
        if name not in verdicts:
            return f"{op} has no {name} implementation"
        if not _serves(name, device):
            return f"{name} does not serve {device.type} tensors here: {backends.status()[name]}"
        return verdicts[name]

    if requested == "auto":
        declined = []
        for name in auto_order(op, device.type, variant):
            why = reason_for(name)
            if why is None:
                return _chose(op, name)
            declined.append(f"{name}: {why}")
        if declined and backends.debug():  # (never an error: auto asked for no backend in particular)
            msg = f"ganengine.{op}: auto falls back to 'torch' ({'; '.join(declined)})"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.debug(msg)
        return _chose(op, "torch")

    why = reason_for(requested)
    if why is None:
        return _chose(op, requested)
    _fallback(op, requested, why)
    return _chose(op, "torch")


@torch.compiler.assume_constant_result
def _chose(op: str, name: str) -> str:
    """Record ``name`` as the backend of the last call of ``op`` (a constant to Dynamo, which
    otherwise guarded on the dict's contents: a recompile once an eager call changed them)."""
    last_used[op] = name
    return name


# ----------------------------------------------------------------------------- lean cpu entries
# Several families have a "lean entry" on CPU tensors: one C++ op with its autograd in C++
# (csrc/cpu/*_autograd.cpp), called at the top of the public function in place of the Python
# custom-op route, whose layers cost more host time per call than the eager ops at small shapes.
# The entry declines what it does not serve before any work (NotImplementedError with a message
# starting "<op>: not served by the C++ entry"); the public function then takes its full route,
# which serves the call or raises the public error (docs/DEVELOPING.md, "Lean entries").
_LEAN: dict = {}  # entry name -> raw C++ op, or None once known not to serve CPU tensors here
_ENTRY_KEYS = ("CPU", "CompositeExplicitAutograd", "CompositeImplicitAutograd")


def _lean_resolve(name: str, kernels: tuple) -> object | None:
    cpu = torch.device("cpu")
    if not (_ext.loaded() and backends.serves("cpu", cpu)):
        return None
    for op in (name, *kernels):  # the entry itself, and every kernel it calls, present
        if not any(_ext.has_kernel(op, key) for key in _ENTRY_KEYS):
            return None
    return _ext.raw_op(name)  # the raw builtin: no OpOverloadPacket layer


# The requested backend without use_backend(): GANENGINE_BACKEND read from os.environ's own dict.
# os.environ.get costs about 4 us per call when the variable is unset (a KeyError raised and caught
# inside), more than a whole lean call's Python; the dict lookup is the same read (os.environ's
# setters and monkeypatch.setenv update it) for a few tens of ns.
_requested = backends._requested
try:
    _ENV_DATA, _ENV_KEY, _ENV_DECODE = os.environ._data, os.environ.encodekey("GANENGINE_BACKEND"), os.environ.decodevalue
except AttributeError:  # not CPython's os._Environ: the public mapping
    _ENV_DATA, _ENV_KEY, _ENV_DECODE = os.environ, "GANENGINE_BACKEND", str


def lean_op(name: str, kernels: tuple = ()):
    """The raw ``ganengine_C::<name>`` op when the requested backend ('auto' or 'cpu') would run the
    C++ kernels on CPU tensors, else None. ``kernels``: the ganengine_C ops the entry calls (each
    must be registered for the CPU, or be a composite entry itself). Resolved once per process;
    per call a few attribute reads, because at small shapes this cost is part of what is compared
    with eager."""
    requested = _requested.value
    if requested is None:
        raw = _ENV_DATA.get(_ENV_KEY)
        requested = (_ENV_DECODE(raw).strip().lower() or "auto") if raw else "auto"  # (as settings.py)
    if requested == "auto" or requested == "cpu":
        try:
            return _LEAN[name]
        except KeyError:
            op = _LEAN[name] = _lean_resolve(name, kernels)
            return op
    return None


# The same C++ entries serve CUDA tensors where their kernels have CUDA implementations (norm_act):
# called on a CUDA tensor only where the requested backend would run those kernels, 'cuda' itself or
# 'auto' with cuda first in the op's order. On the CUDA path this replaces the Python route (checks,
# the backend choice, an autograd.Function) by one dispatcher call, as eager's own ops are.
_CUDA_ENTRY: dict = {}  # (entry name, op, variant, requested backend, serves) -> raw C++ op or None


def _cuda_entry_resolve(name: str, op: str, variant: str | None, requested: str, kernels: tuple) -> object | None:
    cuda = torch.device("cuda")
    if requested == "auto":
        first = next((b for b in auto_order(op, "cuda", variant) if _serves(b, cuda)), None)
        if first != "cuda":
            return None
    elif requested != "cuda":
        return None
    if not (_ext.loaded() and _serves("cuda", cuda)):
        return None
    if not any(_ext.has_kernel(name, key) for key in _ENTRY_KEYS):
        return None
    if not all(_ext.has_kernel(k, "CUDA") or _ext.has_kernel(k, "CompositeExplicitAutograd") for k in kernels):
        return None
    return _ext.raw_op(name)


def cuda_entry(name: str, op: str, kernels: tuple = (), variant: str | None = None):
    """The raw ``ganengine_C::<name>`` entry for a call of ``op`` on a CUDA tensor when the requested
    backend would run the CUDA C++ kernels (``kernels``: the ganengine_C ops the entry calls, each
    with a CUDA or a composite kernel), else None. Resolved once per (entry, variant, requested
    backend, read as ``choose`` reads it); per call a few attribute reads and a dict lookup."""
    requested = _requested_backend()
    key = (name, op, variant, requested, backends.serves)
    try:
        return _CUDA_ENTRY[key]
    except KeyError:
        found = _CUDA_ENTRY[key] = _cuda_entry_resolve(name, op, variant, requested, kernels)
        return found


def entry(x: torch.Tensor, name: str, op: str, kernels: tuple = (), variant=None, *variant_args):
    """The C++ entry ``ganengine_C::<name>`` a call of ``op`` on ``x`` takes, by x's device: on a CPU
    tensor the lean entry (``lean_op``), on a CUDA tensor the same entry where the cuda backend is
    the one chosen (``cuda_entry``, with the auto order's variant ``variant(x, *variant_args)``,
    asked of CUDA calls only), else None (the caller's Python route serves the call)."""
    if x.is_cpu:
        return lean_op(name, kernels)
    if x.is_cuda:
        return cuda_entry(name, op, kernels, None if variant is None else variant(x, *variant_args))
    return None


# The conv family's fast entries (ganengine._C.conv3x3_entry / conv_entry, csrc/cpu/conv_py.cpp)
# serve two routes and take the one for x's device: on CPU tensors the lean route (the cpu backend's
# router), on CUDA tensors the vendor route (ATen's convolution, cuDNN: what the triton and cuda
# backends run for a bare convolution, there in one C++ call in place of the Python route's checks
# and backend choice). Their ``routes`` argument says which the requested backend allows:
ROUTE_LEAN_CPU, ROUTE_VENDOR_CUDA, ROUTE_VENDOR_CPU = 1, 2, 4  # (4: the CPU proxy of the CUDA path)
_CONV_ROUTES: dict = {}  # entry -> {requested backend: (serves, lean_op, routes, gpu)}


def _conv_routes_resolve(name: str, kernels: tuple, fast: str, requested: str) -> tuple:
    routes, gpu = 0, None
    # (an extension built before the entries took ``routes`` would refuse the argument: Python route)
    if _ext.loaded() and getattr(_ext._C, fast, None) is not None and getattr(_ext._C, "conv_entry_routes", False):
        if lean_op(name, kernels) is not None:
            routes |= ROUTE_LEAN_CPU
        cuda = torch.device("cuda")
        if requested == "auto":  # the GPU backend choose() would pick (both run the vendor convolution)
            gpu = next((b for b in auto_order(name, "cuda") if _serves(b, cuda)), None)
        elif requested in ("triton", "cuda") and _serves(requested, cuda):
            gpu = requested
        if gpu is not None:
            routes |= ROUTE_VENDOR_CUDA
    return backends.serves, lean_op, routes, gpu


def _conv_routes_entry(name: str, kernels: tuple, fast: str, requested: str) -> tuple:
    by_requested = _CONV_ROUTES.get(fast)
    if by_requested is None:
        by_requested = _CONV_ROUTES[fast] = {}
    found = by_requested.get(requested)
    # (resolved afresh where a test replaced backends.serves or lean_op: what turns lean_op off
    # turns the lean route off)
    if found is None or found[0] is not backends.serves or found[1] is not lean_op:
        found = by_requested[requested] = _conv_routes_resolve(name, kernels, fast, requested)
    return found


def conv_routes(name: str, kernels: tuple, fast: str) -> int:
    """The ``routes`` argument of the conv op ``name``'s fast entry ``fast`` under the requested
    backend: the lean route on CPU tensors where ``lean_op(name, kernels)`` finds the entry's
    dispatcher op, the vendor route on CUDA tensors where choose() would pick a GPU backend; 0: the
    Python route serves every call. Resolved once per (entry, requested backend); per call a few
    attribute reads and two dict lookups (at tiny shapes this is part of what is compared with
    eager)."""
    requested = _requested.value
    if requested is None:
        raw = _ENV_DATA.get(_ENV_KEY)
        requested = (_ENV_DECODE(raw).strip().lower() or "auto") if raw else "auto"  # (as settings.py)
    try:
        found = _CONV_ROUTES[fast][requested]
        if found[0] is backends.serves and found[1] is lean_op:
            return found[2]
    except KeyError:
        pass
    return _conv_routes_entry(name, kernels, fast, requested)[2]


def conv_gpu(name: str, kernels: tuple, fast: str) -> str | None:
    """The GPU backend a CUDA call served by the fast entry records in ``last_used`` (asked only
    after such a call: the requested backend is then a valid name, which conv_routes read raw)."""
    return _conv_routes_entry(name, kernels, fast, _requested_backend())[3]


def refused(e: BaseException, prefix: str, *optional_tensors, required=()) -> bool:
    """Whether ``e``, raised by a lean entry, declines the call before any work (the full route then
    serves it or raises the public error), rather than being an error of the call, which must
    propagate as it is, raised once. Declining: the entry's own refusal (NotImplementedError whose
    message starts with ``prefix``), or the dispatcher not converting an argument: a ``required``
    tensor that is not a Tensor, or an optional one that is neither None nor a Tensor ("Expected a
    value of type ..."; the callers pass their other arguments only when of plain types). A
    NotImplementedError from further in (a dtype dispatch, say) is an error of the call. Asked only
    once something was raised, so that a served call pays nothing for it."""
    if isinstance(e, NotImplementedError):
        return str(e).startswith(prefix)
    return not (all(isinstance(t, torch.Tensor) for t in required)
                and all(t is None or isinstance(t, torch.Tensor) for t in optional_tensors))
