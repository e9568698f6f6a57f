"""``Conv2dAct`` and ``Conv2dInstanceNormAct``: PatchGAN conv blocks on the fused ops.

Both subclass ``nn.Conv2d`` (so ``weight``/``bias`` keys, ``isinstance`` checks and the
reference ``init_weights`` keep working). ``ganengine.fuse`` turns Conv2d -> LeakyReLU/ReLU pairs
into ``Conv2dAct`` (at the conv's index, ``nn.Identity`` at the activation's) and PatchGAN's
Conv2d -> InstanceNorm2d -> LeakyReLU into ``Conv2dInstanceNormAct`` (ganengine/fusion/rules.py).
"""
from __future__ import annotations

import torch
from torch import nn

from ganengine.nn._adopt import act_repr
from ganengine.ops._conv_common import input_in_weight_layout, module_autocast
from ganengine.ops.conv import _out_size as conv_out_size
from ganengine.ops.conv_act import act_on_fresh, conv2d_act, conv2d_instance_norm_act


def _check_supported(name: str, groups, dilation, padding_mode, padding) -> None:
    if groups != 1:
        raise ValueError(f"{name}: only groups=1 is supported, got {groups}")
    if tuple(dilation) != (1, 1):
        raise ValueError(f"{name}: only dilation=1 is supported, got {dilation}")
    if padding_mode != "zeros":
        raise ValueError(f"{name}: only padding_mode='zeros' is supported, got {padding_mode!r}")
    if isinstance(padding, str):
        raise ValueError(f"{name}: give padding as ints, got {padding!r}")


class Conv2dAct(nn.Conv2d):
    """``LeakyReLU(negative_slope)(Conv2d(x))`` as one fused op (0 = ReLU).

    Arguments are ``nn.Conv2d``'s (groups=1, dilation=1, zero padding only) plus
    ``negative_slope``. State dict keys: ``weight`` and, with ``bias=True``, ``bias``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True, negative_slope: float = 0.2, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
                         device=device, dtype=dtype)
        _check_supported("Conv2dAct", self.groups, self.dilation, self.padding_mode, self.padding)
        self.negative_slope = float(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if module_autocast(x):  # (eager's calls under autocast: _conv_common)
            return act_on_fresh(super().forward(x), self.negative_slope)
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        w = self.weight
        if (xw := input_in_weight_layout(x, w)) is None:  # (eager's output layout: only eager's call gives it)
            return act_on_fresh(super().forward(x), self.negative_slope)
        return conv2d_act(xw, w, self.bias, self.stride, self.padding, self.negative_slope)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, negative_slope={self.negative_slope}"

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, act: nn.Module) -> "Conv2dAct":
        """A fused module sharing ``conv``'s parameters (same tensors, same names)."""
        slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else 0.0
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None, negative_slope=slope, device="meta")
        fused.weight = conv.weight
        fused.bias = conv.bias
        fused.train(conv.training)
        return fused


class Conv2dInstanceNormAct(nn.Conv2d):
    """``act(InstanceNorm2d(Conv2d(x)))``, instance statistics from the conv's output.

    ``nn.Conv2d``'s arguments (groups=1, dilation=1, zero padding) plus the norm's ``eps`` and
    ``affine`` (no running statistics: the CycleGAN/pix2pix discriminator setting) and
    ``activation`` ("leaky_relu", "relu", "none") with ``negative_slope``. Keys: ``weight``,
    ``bias`` (if ``bias=True``; it cancels in the normalisation, as in the reference model),
    ``norm_weight`` and ``norm_bias`` (if ``affine=True``).

    As the norm it replaces, a single-pixel output plane raises ``F.instance_norm``'s ValueError.
    ``keep_layout`` (attribute, as ``InstanceNormAct2d``'s): True (the default) keeps a
    channels_last input's layout in the output; False gives the unfused conv -> InstanceNorm2d's
    layout, always contiguous (what ``ganengine.fuse`` sets unless ``keep_channels_last=True``).
    """

    keep_layout: bool = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True, eps: float = 1e-5, affine: bool = False, activation: str = "leaky_relu",
                 negative_slope: float = 0.2, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
                         device=device, dtype=dtype)
        _check_supported("Conv2dInstanceNormAct", self.groups, self.dilation, self.padding_mode, self.padding)
        if activation not in ("leaky_relu", "relu", "none"):
            raise ValueError(f"Conv2dInstanceNormAct: activation must be 'leaky_relu', 'relu' or 'none', "
                             f"got {activation!r}")
        self.eps, self.affine = float(eps), bool(affine)
        self.activation, self.negative_slope = activation, float(negative_slope)
        if affine:
            self.norm_weight = nn.Parameter(torch.ones(out_channels, device=device, dtype=dtype))
            self.norm_bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("norm_weight", None)
            self.register_parameter("norm_bias", None)

    def reset_parameters(self) -> None:
        """The conv's initialisation (nn.Conv2d's) and the norm's affine parameters to ones and zeros,
        as nn.InstanceNorm2d's (the meta-device pattern: to_empty, then reset_parameters)."""
        super().reset_parameters()
        if getattr(self, "norm_weight", None) is not None:  # (nn.Conv2d's __init__ calls this first)
            with torch.no_grad():
                self.norm_weight.fill_(1.0)
                self.norm_bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d and nn.InstanceNorm2d take it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() == 4:  # (else the op raises its shape error)
            size = conv_out_size(x.shape, self.weight.shape, self.stride, self.padding, (0, 0), False)
            if size[2] == 1 and size[3] == 1:
                raise ValueError(f"Expected more than 1 spatial element when training, got input size "
                                 f"{torch.Size(size)}")
        y = conv2d_instance_norm_act(x, self.weight, self.bias, self.stride, self.padding, self.norm_weight,
                                     self.norm_bias, self.eps, self.activation, self.negative_slope)
        return y if self.keep_layout or y.is_contiguous() else y.contiguous()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, eps={self.eps}, affine={self.affine}, "
                f"activation={act_repr(self.activation, self.negative_slope)}")
