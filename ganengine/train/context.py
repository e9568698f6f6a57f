"""The StepContext the engine hands to ``GANModel.train_step``: autocast and loss scaling.

* ``amp="off"``: plain fp32.
* ``amp="bf16"``: ``torch.autocast(dtype=bfloat16)``; no scaling (bf16 has fp32's range).
* ``amp="fp16"``: ``torch.autocast(dtype=float16)`` and one ``GradScaler`` per optimiser, as
  the AMP docs prescribe for several optimisers: a generator overflow then does not skip the
  discriminator's step and each scale adapts to its own loss.
Models compute losses in fp32 (they cast logits before the loss); the context only scales.
"""
from __future__ import annotations

import contextlib

import torch

AMP_MODES = ("off", "bf16", "fp16")

try:  # the models package defines the base class; duck typing works without it
    from ganengine.models.base import StepContext as _Base
except Exception:  # pragma: no cover - models not importable yet
    _Base = object


class AmpContext(_Base):
    def __init__(self, amp: str = "off", device: torch.device | str = "cpu", optimizer_names=()):
        if amp not in AMP_MODES:
            raise ValueError(f"--amp must be one of {AMP_MODES}, got {amp!r}")
        self.amp = amp
        self.device = torch.device(device)
        self.dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scalers = {name: torch.amp.GradScaler(self.device.type) for name in optimizer_names} if amp == "fp16" else {}
        self.step_index = 0  # global step, for models that act every n-th step (StarGAN's n_critic)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor, opt_name: str) -> torch.Tensor:
        scaler = self.scalers.get(opt_name)
        return scaler.scale(loss) if scaler is not None else loss

    def backward(self, loss: torch.Tensor, opt_name: str, **kwargs) -> None:
        self.scale(loss, opt_name).backward(**kwargs)

    def unscale(self, optimizer, opt_name: str) -> None:
        scaler = self.scalers.get(opt_name)
        if scaler is not None:
            scaler.unscale_(optimizer)

    def step(self, optimizer, opt_name: str) -> None:
        scaler = self.scalers.get(opt_name)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

    def zero_grad(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {name: s.state_dict() for name, s in self.scalers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, s in self.scalers.items():
            if name in state and state[name]:
                s.load_state_dict(state[name])
