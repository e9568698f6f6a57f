"""``PatchDiscriminator``: the pix2pix / CycleGAN 70x70 PatchGAN on the fused conv ops.

Same module tree as the reference ``NLayerDiscriminator`` (``self.model = nn.Sequential`` of
Conv2d / norm / LeakyReLU at the same indices), so state_dict keys, parameter counts and
reference checkpoints carry over unchanged. The forward walks those children and runs each
Conv2d -> [norm] -> LeakyReLU group as one fused op:
  Conv2d -> LeakyReLU                            ganengine conv2d_act
  Conv2d -> InstanceNorm2d (no running stats)    ganengine conv2d_instance_norm_act
  Conv2d -> BatchNorm2d -> LeakyReLU             ganengine conv2d, then batch_norm_act (one op:
                                                 statistics, running-statistics update, act)
  Conv2d (the 1-channel head)                    ganengine conv2d
Anything it does not recognise (a module swapped in by the user) simply runs as a module.
Layout: ``channels_last=None`` (the default) runs NHWC on CUDA tensors (cuDNN's fast layout) and
NCHW on CPU tensors, where the cpu backend runs the middle 4x4 convolutions as NCHW Winograd
convolutions (docs/conv4x4.md; the discriminator's forward+backward went from 0.99-1.07x eager
with oneDNN in NHWC to 1.32-1.54x: BENCHMARKS.md). ``True`` / ``False`` force
one; ``True`` also keeps the conv weights in channels_last memory (same shapes, keys and values;
only the strides differ). The 1-channel output is returned in the usual contiguous layout.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ganengine.fusion.checks import any_global_hooks
from ganengine.ops.batch_norm_act import batch_norm_act
from ganengine.ops.conv import conv2d
from ganengine.ops.conv_act import conv2d_act, conv2d_instance_norm_act

NORMS = ("instance", "batch", "none")


def _norm_layer(norm: str):
    if norm == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if norm == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return lambda channels: nn.Identity()


def plain(m: nn.Module) -> bool:
    """``m`` runs exactly its class's forward: no hooks, no parametrization, no patched forward.
    A network forward that bypasses a module's own call (to run it fused with a neighbour) must
    only do so for such modules: a hook would no longer see the call."""
    # (the parametrizations ModuleDict looked up in _modules: getattr goes through
    # nn.Module.__getattr__, which raises and catches for a plain module: 1 us a call)
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__ or m._modules.get("parametrizations"))


def is_fusable_batch_norm(m) -> bool:
    """An ``nn.BatchNorm2d`` (exact type: SyncBatchNorm and user subclasses run as themselves), or
    the activation-free ``BatchNormAct2d`` fuse() makes of one, that :func:`batch_norm2d_act` can
    run in its place."""
    if type(m) is nn.BatchNorm2d:
        return plain(m)
    # fuse()'s lone-norm rule turns a BatchNorm2d into BatchNormAct2d(activation="none"), same
    # Parameters, buffers and rules: still one batch_norm_act call with the activation after it
    from ganengine.nn.batch_norm_act import BatchNormAct2d, FusedBatchNorm2d

    return type(m) in (BatchNormAct2d, FusedBatchNorm2d) and m.activation == "none" and plain(m)


def batch_norm2d_act(norm: nn.BatchNorm2d, x: torch.Tensor, activation: str, negative_slope: float = 0.2):
    """``act(norm(x))`` as one ``batch_norm_act`` call, with nn.BatchNorm2d's rules: batch
    statistics in training mode (and in eval without running statistics), the running statistics
    and ``num_batches_tracked`` updated as nn.BatchNorm2d updates them (``momentum=None``: the
    cumulative average), the running statistics in eval mode."""
    if x.dim() != 4:
        raise ValueError(f"expected 4D input (got {x.dim()}D input)")  # nn.BatchNorm2d's message
    if norm.training:
        track = norm.track_running_stats
        nbt = norm.num_batches_tracked if track else None
        momentum = norm.momentum if (norm.momentum is not None or nbt is not None) else 0.0
        return batch_norm_act(x, norm.running_mean if track else None, norm.running_var if track else None,
                              norm.weight, norm.bias, True, momentum, norm.eps, activation, negative_slope,
                              num_batches_tracked=nbt)
    batch_stats = norm.running_mean is None and norm.running_var is None
    return batch_norm_act(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, batch_stats,
                          norm.momentum if norm.momentum is not None else 0.0, norm.eps, activation, negative_slope)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator, ``NLayerDiscriminator(input_nc, ndf, n_layers, norm_layer)``.

    ``norm``: "instance" (CycleGAN: affine=False, no running stats, conv bias on),
    "batch" (pix2pix: BatchNorm2d, bias-free convs before it) or "none" (Identity layers and, as
    in the current reference code, bias-free middle convs). Weights use PyTorch's default init
    like the reference constructor; ``init_weights()`` applies the reference normal(0, 0.02).
    ``fused=False``: the reference's forward, ``self.model(x)`` on the plain layers (the
    benchmarks' eager baseline; the same keys and numbers). ``ganengine.fuse`` turns such an
    instance's fused forward on (``fused`` True on the fused model: the ops ``fused=True`` builds
    run, listed in its report, see ``fused_groups``; same modules, keys and tensors).
    """

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 3, norm: str = "instance",
                 channels_last: bool | None = None, fused: bool = True):
        super().__init__()
        self.fused = bool(fused)
        if norm not in NORMS:
            raise ValueError(f"PatchDiscriminator: norm must be one of {NORMS}, got {norm!r}")
        if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 0:
            # (0 as the reference: conv + LeakyReLU, one stride-1 conv + norm + LeakyReLU, the 1-channel conv)
            raise ValueError(f"PatchDiscriminator: n_layers must be an int >= 0, got {n_layers!r}")
        if input_nc < 1 or ndf < 1:
            raise ValueError(f"PatchDiscriminator: input_nc and ndf must be >= 1, got {input_nc}, {ndf}")
        self.input_nc, self.ndf, self.n_layers, self.norm = input_nc, ndf, n_layers, norm
        if channels_last not in (None, True, False):
            raise ValueError(f"PatchDiscriminator: channels_last must be None, True or False, got {channels_last!r}")
        self.channels_last = channels_last
        norm_layer = _norm_layer(norm)
        use_bias = norm == "instance"  # the reference's rule: bias only when the norm is InstanceNorm2d
        seq = [nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=2, padding=1, bias=use_bias),
                    norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=1, padding=1, bias=use_bias),
                norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
        seq += [nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1)]
        self.model = nn.Sequential(*seq)
        if self.channels_last:
            # NHWC weights too: oneDNN then reads them as they are and writes dW in the
            # parameter's own layout (NCHW weights cost 4 weight-sized copies per step)
            self.model.to(memory_format=torch.channels_last)

    def init_weights(self, gain: float = 0.02) -> "PatchDiscriminator":
        """The reference ``init_weights(net, 'normal', gain)``: conv weights N(0, gain), biases 0,
        BatchNorm weights N(1, gain), BatchNorm biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, gain)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, gain)
                nn.init.zeros_(m.bias)
        return self

    @staticmethod
    def _fusable_conv(m) -> bool:
        # (plain: a hooked conv, e.g. torch.nn.utils.spectral_norm's pre-hook that sets its weight,
        # runs as a module)
        return (type(m) in (nn.Conv2d,) and m.groups == 1 and tuple(m.dilation) == (1, 1)
                and m.padding_mode == "zeros" and not isinstance(m.padding, str) and plain(m))

    # what each group the fused forward runs as one op is called in fuse()'s report (the names
    # of the rules that fuse the same pattern in a plain nn.Sequential: ganengine/fusion/rules.py)
    GROUP_RULES = {"conv_act": ("conv2d+leaky_relu",), "conv_act_identity": ("conv2d+leaky_relu",),
                   "conv_instance_norm_act": ("conv2d+instance_norm+act",),
                   "conv_batch_norm_act": ("conv2d", "batch_norm+act"), "conv": ("conv2d",)}

    @classmethod
    def _group(cls, mods: list, i: int) -> tuple[str | None, int]:
        """(kind, length) of the group starting at ``mods[i]`` that the fused forward runs as
        ganengine ops (a kind of GROUP_RULES), or (None, 1): ``mods[i]`` runs as a module."""
        m = mods[i]
        if not cls._fusable_conv(m):
            return None, 1
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        nxt2 = mods[i + 2] if i + 2 < len(mods) else None
        if type(nxt) is nn.LeakyReLU and nxt.negative_slope >= 0 and plain(nxt):
            return "conv_act", 2
        if (type(nxt) is nn.Identity and type(nxt2) is nn.LeakyReLU and nxt2.negative_slope >= 0
                and plain(nxt) and plain(nxt2)):
            return "conv_act_identity", 3
        if (type(nxt) is nn.InstanceNorm2d and type(nxt2) is nn.LeakyReLU and nxt2.negative_slope >= 0
                and nxt.running_mean is None and nxt.num_features == m.out_channels
                and plain(nxt) and plain(nxt2)):
            return "conv_instance_norm_act", 3
        if (is_fusable_batch_norm(nxt) and type(nxt2) is nn.LeakyReLU and plain(nxt2)
                and nxt.num_features == m.out_channels):
            # pix2pix: batch norm + LeakyReLU in one op (in-place or not: the norm's output
            # is a temporary nothing else sees)
            return "conv_batch_norm_act", 3
        return "conv", 1  # (the norm, if any, runs next as a module)

    def fused_groups(self) -> list[tuple[int, str]]:
        """``(index in self.model, rule name)`` for each op the fused forward (``fused=True``) runs
        on ganengine's fused ops instead of the layers as modules (none while hooks are set on
        every module: then all run as modules). ``ganengine.fuse`` reports these when it turns a
        ``fused=False`` instance's fused forward on."""
        if any_global_hooks():  # (as forward: every layer then runs as a module)
            return []
        mods, out, i = list(self.model), [], 0
        while i < len(mods):
            kind, span = self._group(mods, i)
            if kind is not None:
                out += [(i + k, rule) for k, rule in enumerate(self.GROUP_RULES[kind])]
            i += span
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not getattr(self, "fused", True) or (x.dim() == 3 and x.shape[0] == self.input_nc):
            # (an unbatched (C, H, W) input, which nn.Conv2d takes: the layers as modules)
            return self.model(x)
        if x.dim() != 4 or x.shape[1] != self.input_nc:
            raise ValueError(f"PatchDiscriminator: expected input (N, {self.input_nc}, H, W), got {tuple(x.shape)}")
        nhwc = x.is_cuda if self.channels_last is None else self.channels_last
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        mods = list(self.model)
        i = 0
        if any_global_hooks():  # (hooks every module's call must reach: the layers as modules)
            i = len(mods)
            for m in mods:
                x = m(x)
        while i < len(mods):
            m = mods[i]
            kind, span = self._group(mods, i)
            if kind is None:
                x = m(x)
            elif kind == "conv_act" or kind == "conv_act_identity":
                x = conv2d_act(x, m.weight, m.bias, m.stride, m.padding, mods[i + span - 1].negative_slope)
            elif kind == "conv_instance_norm_act":
                norm = mods[i + 1]
                x = conv2d_instance_norm_act(x, m.weight, m.bias, m.stride, m.padding, norm.weight, norm.bias,
                                             norm.eps, "leaky_relu", mods[i + 2].negative_slope)
            else:
                x = conv2d(x, m.weight, m.bias, m.stride, m.padding)
                if kind == "conv_batch_norm_act":
                    x = batch_norm2d_act(mods[i + 1], x, "leaky_relu", mods[i + 2].negative_slope)
            i += span
        return x.contiguous() if nhwc else x
