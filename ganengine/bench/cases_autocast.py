"""Benchmark cases under autocast (family "autocast": ``ganengine bench --ops autocast``,
``python -m ganengine.bench.host_cost --ops autocast``).

Mixed precision is how AMP users run ganengine: on the CPU, ``torch.autocast("cpu",
dtype=torch.bfloat16)`` around the forward. There the conv family takes ATen's own convolution
(ops/_conv_common.py, "autocast: eager's own call") and the norm, attention and loss ops their own
autocast handling, so the float32 figures do not say what an AMP step costs. Each case here is an
op case of ``cases_ops`` (its shapes, inputs, reference and fused function) with both sides'
forward inside its own autocast region (``runner.autocast_workload``: one region per call, as a
training step opens one around its forward; the backward outside it). The inputs stay float32,
as an AMP model's parameters and data are.

The autocast dtype: ``--dtype bfloat16`` or ``--dtype float16`` names it; the default float32
(the inputs' dtype) means bfloat16, CPU AMP's dtype (also CUDA's on Ampere and later; ask for
float16 with ``--dtype float16`` on a GPU). Records keep the dtype asked for.

``runner.run(..., autocast="bf16")`` and ``host_cost --autocast bf16`` put any op case under
autocast the same way; this family is the set the project measures.
"""
from __future__ import annotations

import torch

from ganengine.bench.registry import BenchCase, register

FAMILY = "autocast"
# the base op cases: the conv family (ATen's conv under autocast), the norms, the attention block
# and the losses, each with its own autocast handling
BASES = ("conv", "conv2d_act", "conv2d_instance_norm_act", "conv3x3", "instance_norm_act", "batch_norm_act",
         "self_attention2d", "gan_loss", "cycle_loss")


def autocast_dtype(dtype: torch.dtype) -> torch.dtype:
    """The autocast dtype a case's ``dtype`` argument names (float32, the default: bfloat16)."""
    if dtype in (torch.bfloat16, torch.float16):
        return dtype
    if dtype != torch.float32:
        raise ValueError(f"autocast cases run float32 inputs under autocast to bfloat16 or float16: dtype must "
                         f"be float32 (autocast to bfloat16), bfloat16 or float16, got {dtype}")
    return torch.bfloat16


def _autocast_setup(base_setup):
    from ganengine.bench.runner import autocast_workload

    def setup(params, device, dtype):
        work = base_setup(params, device, torch.float32)   # the AMP model's float32 tensors
        return autocast_workload(work, device, autocast_dtype(dtype))
    return setup


def autocast_case(base: BenchCase) -> BenchCase:
    """``base`` under autocast (its shapes, modes, reference and fused function)."""
    return BenchCase(
        name=f"{base.name}_autocast", family=FAMILY, kind="op", setup=_autocast_setup(base.setup),
        shapes=base.shapes, modes=base.modes, compile_ok=base.compile_ok, traffic_shape=base.traffic_shape,
        description=f"{base.description}, under torch.autocast (bfloat16; --dtype float16 for float16)",
        # the traffic table runs the triton backend strictly, not the route an autocast call takes
        # (ATen's conv for the conv family): host_cost leaves this family's kernel counts out
        triton_kernels=False,
    )


def register_all(cases: dict[str, BenchCase]) -> list[str]:
    """Register the autocast twin of every base case present in ``cases`` (the op cases this build
    registered); returns their names."""
    found = []
    for name in BASES:
        if name in cases:
            found.append(register(autocast_case(cases[name])).name)
    return found
