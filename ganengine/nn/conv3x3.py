"""``Conv3x3``: a 3x3 stride-1 ``nn.Conv2d`` on ``ganengine.functional.conv3x3`` (Winograd on the
cpu backend), with zero or reflect padding.

``ganengine.fuse`` has two rules for it (ganengine/fusion/rules.py):
  * module rule: a plain ``nn.Conv2d`` with a 3x3 kernel, stride 1, dilation 1, groups 1 and
    "zeros" / "reflect" padding becomes a ``Conv3x3`` sharing its parameters;
  * pair rule: ``ReflectionPad2d(p) -> Conv3x3(padding=0)`` (CycleGAN's residual blocks) becomes
    ``nn.Identity()`` at the pad's index and ``Conv3x3(padding=p, padding_mode="reflect")`` at
    the conv's (keys unchanged): the padded tensor is never written.
"""
from __future__ import annotations

import torch
from torch import nn

from ganengine.ops._conv_common import input_in_weight_layout, module_autocast
from ganengine.ops.conv3x3 import conv3x3


_MISSING = object()


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=padding, padding_mode=...)``
    on the fused op. ``padding_mode``: "zeros" or "reflect". Keys: ``weight``, ``bias``."""

    def __init__(self, in_channels: int, out_channels: int, padding: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None):
        if padding_mode not in ("zeros", "reflect"):
            raise ValueError(f"Conv3x3: padding_mode must be 'zeros' or 'reflect', got {padding_mode!r}")
        if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
            raise ValueError(f"Conv3x3: padding must be an int >= 0, got {padding!r}")
        super().__init__(in_channels, out_channels, 3, stride=1, padding=padding, bias=bias,
                         padding_mode=padding_mode, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if module_autocast(x):  # (eager's call under autocast: _conv_common)
            return super().forward(x)
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        # (the tensors from _parameters: Module.__getattr__ costs ~0.7 us a name, a tenth of a tiny
        # layer's call; a parametrization moves them out of it, then the attributes)
        params = self._parameters
        w, b = params.get("weight"), params.get("bias", _MISSING)
        if w is None or b is _MISSING:
            w, b = self.weight, self.bias
        if (xw := input_in_weight_layout(x, w)) is None:  # (eager's output layout: only eager's call gives it)
            return super().forward(x)
        return conv3x3(xw, w, b, self.padding[0], self.padding_mode)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, padding: int | None = None, padding_mode: str | None = None) -> "Conv3x3":
        """A ``Conv3x3`` sharing ``conv``'s parameters (same tensors, same names)."""
        fused = cls(conv.in_channels, conv.out_channels, conv.padding[0] if padding is None else padding,
                    bias=conv.bias is not None, padding_mode=padding_mode or conv.padding_mode, device="meta")
        fused.weight = conv.weight
        fused.bias = conv.bias
        fused.train(conv.training)
        return fused


def _is_plain_conv3x3(m: nn.Module) -> bool:
    # exact type: a subclass may override forward
    return (type(m) is nn.Conv2d and tuple(m.kernel_size) == (3, 3) and tuple(m.stride) == (1, 1)
            and tuple(m.dilation) == (1, 1) and m.groups == 1 and not isinstance(m.padding, str)
            and m.padding[0] == m.padding[1] and m.padding_mode in ("zeros", "reflect"))
