"""``FusedRMSprop``: ``torch.optim.RMSprop`` (no momentum, not centered, no weight decay: WGAN's
optimiser) as one multi-tensor kernel per step.

PyTorch has no fused RMSprop, and its per-parameter CPU loop makes four passes and a temporary per
weight (``square_avg.mul_(alpha).addcmul_(g, g, 1 - alpha)``, ``avg = square_avg.sqrt().add_(eps)``,
``param.addcdiv_(g, avg, -lr)``). Its fused Adam kernel computes the same update in one pass when
``beta1 = 0`` (``m = g``), ``beta2 = alpha`` (``v = alpha v + (1 - alpha) g^2``, RMSprop's
``square_avg``) and both bias corrections are exactly 1: the kernel's step counters are pinned at
2**40 (``1 - alpha**step`` and ``1 - 0**step`` round to 1; 2**40 + 1 rounds back to 2**40 in fp32),
so ``param -= lr * g / (sqrt(square_avg) + eps)``, RMSprop's update, to fp32 rounding (tested
against torch.optim.RMSprop). The real step count is kept in ``state["step"]`` as RMSprop keeps it.
"""
from __future__ import annotations

import torch

_PINNED_STEP = float(2 ** 40)


class FusedRMSprop(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.01, alpha: float = 0.99, eps: float = 1e-8):
        for name, v, lo in (("lr", lr, 0.0), ("eps", eps, 0.0)):
            if not v >= lo:
                raise ValueError(f"FusedRMSprop: {name} must be >= {lo}, got {v!r}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"FusedRMSprop: alpha must be in [0, 1), got {alpha!r}")
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, **_FIXED))
        self._scratch: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per parameter: m buffer, pinned step

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads its own state dicts and torch.optim.RMSprop's, refusing settings it does not run
        (momentum, centered, weight decay, maximize: it would ignore them)."""
        for i, group in enumerate(state_dict.get("param_groups", [])):
            for key, value in _FIXED.items():
                if key in _CHECKED and group.get(key, value) != value:
                    raise ValueError(f"FusedRMSprop.load_state_dict: param group {i} has {key}={group[key]!r}; "
                                     f"FusedRMSprop runs RMSprop with {key}={value!r} only (use torch.optim.RMSprop)")
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # (its own older state dicts and torch's: the keys RMSprop reads)
            for key, value in _FIXED.items():
                group.setdefault(key, value)

    @staticmethod
    def supported(params) -> bool:
        """Whether torch's fused Adam kernel can serve these parameters (else use RMSprop)."""
        return hasattr(torch, "_fused_adam_") and all(
            p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
            for p in params)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        compiling = torch.compiler.is_compiling()
        for group in self.param_groups:
            params, grads, ms, sqs, pinned, counts = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FusedRMSprop does not support sparse gradients")
                if p.grad.dtype != p.dtype:
                    raise RuntimeError(f"FusedRMSprop: gradients must have the parameters' dtype ({p.dtype}), got "
                                       f"{p.grad.dtype}")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if compiling:  # the fused kernel's pinned counters do not trace: RMSprop's own ops
                    _rmsprop_step(p, p.grad, state, group)
                    continue
                # the kernel walks every tensor in the parameter's memory order: square_avg, the
                # scratch buffer and the gradient must have its layout (and dtype and device). The
                # scratch entry remembers the (strides, dtype, device, square_avg) it was checked with.
                strides = p.stride()
                scratch = self._scratch.get(id(p))
                sq = state["square_avg"]
                if scratch is None or scratch[2] != (strides, p.dtype, p.device) or scratch[3] is not sq:
                    if sq.stride() != strides or sq.dtype != p.dtype or sq.device != p.device:
                        # (the model was cast, moved or made channels_last since, or loaded so)
                        sq = state["square_avg"] = torch.empty_like(p).copy_(sq)
                    scratch = self._scratch[id(p)] = (
                        torch.zeros_like(p, memory_format=torch.preserve_format),
                        torch.full((), _PINNED_STEP, dtype=torch.float32, device=p.device),
                        (strides, p.dtype, p.device), sq)
                grad = p.grad
                if grad.stride() != strides:
                    grad = torch.empty_like(p).copy_(grad)
                params.append(p)
                grads.append(grad)
                sqs.append(state["square_avg"])
                ms.append(scratch[0])
                pinned.append(scratch[1])
                counts.append(state["step"])
            if not params:
                continue
            torch._foreach_add_(counts, 1.0)
            # the kernel adds 1 to the pinned counters: 2**40 + 1 rounds back to 2**40 in fp32
            torch._fused_adam_(params, grads, ms, sqs, [], pinned, lr=group["lr"], beta1=0.0, beta2=group["alpha"],
                               weight_decay=0.0, eps=group["eps"], amsgrad=False, maximize=False)
        return loss


# the torch.optim.RMSprop settings FusedRMSprop runs (in its groups, so that either optimiser loads
# the other's state dict); _CHECKED: those a loaded state dict must not change
_FIXED = dict(momentum=0, centered=False, weight_decay=0, maximize=False, foreach=None, capturable=False,
              differentiable=False)
_CHECKED = ("momentum", "centered", "weight_decay", "maximize")


def _rmsprop_step(p, g, state, group) -> None:
    """RMSprop's update in plain ops (what torch.compile traces)."""
    state["step"] += 1
    sq = state["square_avg"]
    sq.mul_(group["alpha"]).addcmul_(g, g, value=1 - group["alpha"])
    p.addcdiv_(g, sq.sqrt().add_(group["eps"]), value=-group["lr"])
