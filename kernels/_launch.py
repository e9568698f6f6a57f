"""Launch plumbing shared by the Triton launchers: device guard, grid limits, target facts.

* ``device_guard(t)``: Triton launches on the *current* CUDA device, not on the tensors'
  device; tensors on ``cuda:1`` while ``cuda:0`` is current (``nn.DataParallel`` replicas do
  exactly this) would run on the wrong device or fault. Every launcher enters this guard with
  its input tensor (a no-op for CPU tensors under the interpreter).
* ``grid(name, *axes)``: CUDA caps grid axes 1 and 2 at 65535 (axis 0 at 2**31 - 1). Launchers
  put the large dimension on axis 0; this check turns a violation into a clear error instead of
  a failed launch.
* ``sm_count(t)`` / ``on_gpu(t)``: launch plans are sized from the device's SM count. The AOT
  report and the grid tests plan launches for a GPU without having one: ``planning_for_gpu``
  makes ``meta`` tensors plan as CUDA tensors on a GPU with the given SM count.

(Module name starts with "_": the AOT report does not look for kernels here.)
"""
from __future__ import annotations

import contextlib
import functools

import torch

MAX_GRID = (2 ** 31 - 1, 65535, 65535)
# the interpreter runs each program in Python: few large programs are fastest there
CPU_SM_COUNT = 2

# device types whose launches are guarded; tests widen this (with a mocked device context) to
# check, on CPU tensors, that every launch happens inside the guard with the tensors' device
_GUARDED = ("cuda",)
_planning_sms: int | None = None
_planning_cc: tuple[int, int] = (9, 0)


def _device_context(device: torch.device):
    return torch.cuda.device(device)


def device_guard(t: torch.Tensor):
    """Context in which launches run on ``t``'s device."""
    dev = t.device
    if dev.type in _GUARDED:
        return _device_context(dev)
    return contextlib.nullcontext()


def grid(name: str, *axes: int) -> tuple:
    """The launch grid ``axes``, checked against CUDA's limits per axis."""
    for i, n in enumerate(axes):
        if n > MAX_GRID[i]:
            raise RuntimeError(f"{name}: grid axis {i} would be {n}, over CUDA's limit of {MAX_GRID[i]} "
                               f"(grid {axes}); the input is too large for this kernel")
    return axes


# triton.cdiv and triton.next_power_of_2 are constexpr functions in Triton 3.8: called from host code
# they cost 1.5-4 us each (argument unwrapping), and a launch plan asks for a dozen; these are the
# same integer functions in plain Python
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2: the smallest power of two >= n (0 for n = 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.lru_cache(maxsize=16)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def on_gpu(t: torch.Tensor) -> bool:
    """Plan for a GPU: a CUDA tensor, or a meta tensor inside ``planning_for_gpu``."""
    return t.is_cuda or (_planning_sms is not None and t.device.type == "meta")


def sm_count(t: torch.Tensor) -> int:
    if t.is_cuda:
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return _cuda_sm_count(index)
    if _planning_sms is not None and t.device.type == "meta":
        return _planning_sms
    return CPU_SM_COUNT


@functools.lru_cache(maxsize=16)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def capability(t: torch.Tensor) -> tuple[int, int]:
    """Compute capability the launch plans for ((9, 0) for CPU tensors under the interpreter)."""
    if t.is_cuda:
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return _cuda_capability(index)
    return _planning_cc


@contextlib.contextmanager
def planning_for_gpu(sms: int = 132, cc: int = 90):
    """Inside: launchers given ``meta`` tensors plan as on a GPU with ``sms`` SMs (H100 SXM: 132,
    H200: 132, A100: 108) and compute capability ``cc`` (90: sm_90)."""
    global _planning_sms, _planning_cc
    old = _planning_sms, _planning_cc
    _planning_sms, _planning_cc = int(sms), (cc // 10, cc % 10)
    try:
        yield
    finally:
        _planning_sms, _planning_cc = old
