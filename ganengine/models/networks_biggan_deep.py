"""BigGAN-deep generator and discriminator (ajbrock/BigGAN-PyTorch ``BigGANdeep.py``).

Same conventions as networks_biggan.py (reference arguments and defaults, keys, init, ``fused``).
BigGAN-deep specifics kept as the reference has them:

* G: ``z = cat([y, z])`` feeds the linear layer and every ccbn (so the reference runs only with
  ``hier=True`` and ``G_shared=True``; other settings raise here, where the reference fails
  with a shape error); ``G_depth`` bottleneck blocks per stage, each its own entry of
  ``blocks`` (keys ``blocks.{stage * G_depth + d}.0``, attention at ``.1`` of the stage's last);
  a block drops channels with ``x[:, :out]`` and upsamples at the stage's last block.
* D: a stem conv (``input_conv``), ``D_depth`` blocks per stage in one entry (keys
  ``blocks.{stage}.{d}``, attention at ``blocks.{stage}.{D_depth}``); the shortcut of a block
  that widens is ``cat([x, conv_sc(x)])`` after the pooling.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ganengine.models import biggan_ops as ops
from ganengine.models import layers_biggan as L
from ganengine.models.networks_biggan import (attention_resolutions, check_activation, check_choice,
                                              discriminator_finish, discriminator_forward, discriminator_setup,
                                              sn_partials)

_G_MULTS = {
    256: ([16, 16, 8, 8, 4, 2], [16, 8, 8, 4, 2, 1]),
    128: ([16, 16, 8, 4, 2], [16, 8, 4, 2, 1]),
    64: ([16, 16, 8, 4], [16, 8, 4, 2]),
    32: ([4, 4, 4], [4, 4, 4]),
}
_D_ARCH = {
    256: ([1, 2, 4, 8, 8, 16], [2, 4, 8, 8, 16, 16], [True] * 6 + [False], [128, 64, 32, 16, 8, 4, 4]),
    128: ([1, 2, 4, 8, 16], [2, 4, 8, 16, 16], [True] * 5 + [False], [64, 32, 16, 8, 4, 4]),
    64: ([1, 2, 4, 8], [2, 4, 8, 16], [True] * 4 + [False], [32, 16, 8, 4, 4]),
    32: ([4, 4, 4], [4, 4, 4], [True, True, False, False], [16, 16, 16, 16]),
}
_D_ATTN_RANGE = {256: range(2, 8), 128: range(2, 8), 64: range(2, 7), 32: range(2, 6)}


def G_arch(ch=64, attention="64"):
    want = attention_resolutions(attention, "G_attn")
    arch = {}
    for res, (ins, outs) in _G_MULTS.items():
        n = len(outs)
        arch[res] = {"in_channels": [ch * m for m in ins], "out_channels": [ch * m for m in outs],
                     "upsample": [True] * n, "resolution": [8 * 2 ** i for i in range(n)],
                     "attention": {2 ** i: 2 ** i in want for i in range(3, 3 + n)}}
    return arch


def D_arch(ch=64, attention="64"):
    want = attention_resolutions(attention, "D_attn")
    return {res: {"in_channels": [ch * m for m in ins], "out_channels": [ch * m for m in outs], "downsample": down,
                  "resolution": resolutions, "attention": {2 ** i: 2 ** i in want for i in _D_ATTN_RANGE[res]}}
            for res, (ins, outs, down, resolutions) in _D_ARCH.items()}


class GBlock(nn.Module):
    """Bottleneck block: ccbn-ReLU-conv1x1 (C/4), ccbn-ReLU, [drop channels, upsample],
    conv3x3, ccbn-ReLU-conv3x3, ccbn-ReLU-conv1x1 (out) + x."""

    def __init__(self, in_channels, out_channels, which_conv=nn.Conv2d, which_bn=L.bn, activation=None,
                 upsample=None, channel_ratio=4):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.hidden_channels = in_channels // channel_ratio
        self.which_conv, self.which_bn = which_conv, which_bn
        self.activation = activation
        self.conv1 = which_conv(in_channels, self.hidden_channels, kernel_size=1, padding=0)
        self.conv2 = which_conv(self.hidden_channels, self.hidden_channels)
        self.conv3 = which_conv(self.hidden_channels, self.hidden_channels)
        self.conv4 = which_conv(self.hidden_channels, out_channels, kernel_size=1, padding=0)
        self.bn1 = which_bn(in_channels)
        self.bn2 = which_bn(self.hidden_channels)
        self.bn3 = which_bn(self.hidden_channels)
        self.bn4 = which_bn(self.hidden_channels)
        self.upsample = upsample
        self.fused = False

    def forward(self, x, y):
        if self.fused and ops.relu_or_none(self.activation):
            return ops.deep_gblock_forward(self, x, y)
        h = self.conv1(self.activation(self.bn1(x, y)))
        h = self.activation(self.bn2(h, y))
        if self.in_channels != self.out_channels:
            x = x[:, :self.out_channels]
        if self.upsample:
            h = self.upsample(h)
            x = self.upsample(x)
        h = self.conv2(h)
        h = self.conv3(self.activation(self.bn3(h, y)))
        h = self.conv4(self.activation(self.bn4(h, y)))
        return h + x


class DBlock(nn.Module):
    """Bottleneck block: ReLU-conv1x1 (out/4), ReLU-conv3x3, ReLU-conv3x3, ReLU, [avg-pool],
    conv1x1 (out) + shortcut (pooled x, widened by ``cat([x, conv_sc(x)])``)."""

    def __init__(self, in_channels, out_channels, which_conv=L.SNConv2d, wide=True, preactivation=True,
                 activation=None, downsample=None, channel_ratio=4):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.hidden_channels = out_channels // channel_ratio
        self.which_conv, self.preactivation = which_conv, preactivation
        self.activation, self.downsample = activation, downsample
        self.conv1 = which_conv(in_channels, self.hidden_channels, kernel_size=1, padding=0)
        self.conv2 = which_conv(self.hidden_channels, self.hidden_channels)
        self.conv3 = which_conv(self.hidden_channels, self.hidden_channels)
        self.conv4 = which_conv(self.hidden_channels, out_channels, kernel_size=1, padding=0)
        self.learnable_sc = in_channels != out_channels
        if self.learnable_sc:
            self.conv_sc = which_conv(in_channels, out_channels - in_channels, kernel_size=1, padding=0)
        self.fused = False

    def shortcut(self, x):
        if self.downsample:
            x = self.downsample(x)
        if self.learnable_sc:
            x = torch.cat([x, self.conv_sc(x)], 1)
        return x

    def forward(self, x):
        if self.fused and ops.relu_or_none(self.activation):
            return ops.deep_dblock_forward(self, x)
        h = self.conv1(F.relu(x))
        h = self.conv2(self.activation(h))
        h = self.conv3(self.activation(h))
        h = self.activation(h)
        if self.downsample:
            h = self.downsample(h)
        h = self.conv4(h)
        return h + self.shortcut(x)


def _check_depth_flow(owner, arch, depth):
    """The channel flow of the reference's stage/depth wiring (block 0 of a stage keeps the
    stage's input width, the others map in_channels -> out_channels); raise where it cannot run."""
    ins, outs = arch["in_channels"], arch["out_channels"]
    ch = ins[0]
    for index in range(len(outs)):
        for d in range(depth):
            if ch != ins[index]:
                raise ValueError(f"{owner}: with G_depth={depth} the reference's wiring feeds {ch} channels into a "
                                 f"block built for {ins[index]} (stage {index}, block {d}); it cannot run")
            ch = ins[index] if d == 0 else outs[index]
        if ch != outs[index] and (arch["attention"][arch["resolution"][index]] or index == len(outs) - 1):
            raise ValueError(f"{owner}: with G_depth={depth} stage {index} ends with {ch} channels where the "
                             f"reference's {'attention' if index < len(outs) - 1 else 'output layer'} expects "
                             f"{outs[index]}; it cannot run")


class BigGANDeepGenerator(nn.Module):
    """The reference ``BigGANdeep.Generator``; ``forward(z, y)`` with ``y = G.shared(labels)``."""

    def __init__(self, G_ch=64, G_depth=2, dim_z=128, bottom_width=4, resolution=128, G_kernel_size=3, G_attn="64",
                 n_classes=1000, num_G_SVs=1, num_G_SV_itrs=1, G_shared=True, shared_dim=0, hier=False,
                 cross_replica=False, mybn=False, G_activation=None, G_lr=5e-5, G_B1=0.0, G_B2=0.999, adam_eps=1e-8,
                 BN_eps=1e-5, SN_eps=1e-12, G_mixed_precision=False, G_fp16=False, G_init="ortho", skip_init=False,
                 no_optim=False, G_param="SN", norm_style="bn", fused=True, **kwargs):
        super().__init__()
        owner = "BigGANDeepGenerator"
        check_choice(owner, "resolution", resolution, _G_MULTS)
        if not (hier and G_shared):
            raise ValueError(f"{owner}: the reference's BigGAN-deep generator runs only with hier=True and "
                             f"G_shared=True (its forward feeds cat([y, z]) to the linear layer and every ccbn), "
                             f"got hier={hier!r}, G_shared={G_shared!r}")
        if not isinstance(G_depth, int) or G_depth < 1:
            raise ValueError(f"{owner}: G_depth must be an int >= 1, got {G_depth!r}")
        self.ch, self.G_depth, self.dim_z, self.bottom_width = G_ch, G_depth, dim_z, bottom_width
        self.resolution, self.kernel_size, self.attention, self.n_classes = resolution, G_kernel_size, G_attn, n_classes
        self.G_shared = G_shared
        self.shared_dim = shared_dim if shared_dim > 0 else dim_z
        self.hier, self.cross_replica, self.mybn = hier, cross_replica, mybn
        self.activation = check_activation(owner, "G_activation", nn.ReLU(inplace=False) if G_activation is None
                                           else G_activation)
        self.init, self.G_param, self.norm_style = G_init, G_param, norm_style
        self.BN_eps, self.SN_eps, self.fp16 = BN_eps, SN_eps, G_fp16
        self.arch = G_arch(self.ch, self.attention)[resolution]
        _check_depth_flow(owner, self.arch, G_depth)

        self.which_conv, self.which_linear = sn_partials(G_param, num_G_SVs, num_G_SV_itrs, self.SN_eps, owner)
        self.which_embedding = nn.Embedding
        bn_linear = functools.partial(self.which_linear, bias=False)
        self.which_bn = functools.partial(L.ccbn, which_linear=bn_linear, cross_replica=cross_replica, mybn=mybn,
                                          input_size=self.shared_dim + self.dim_z, norm_style=norm_style, eps=BN_eps)
        self.shared = self.which_embedding(n_classes, self.shared_dim)
        self.linear = self.which_linear(self.dim_z + self.shared_dim,
                                        self.arch["in_channels"][0] * self.bottom_width ** 2)
        blocks = []
        for index in range(len(self.arch["out_channels"])):
            for g_index in range(G_depth):
                blocks.append([GBlock(in_channels=self.arch["in_channels"][index],
                                      out_channels=(self.arch["in_channels"][index] if g_index == 0
                                                    else self.arch["out_channels"][index]),
                                      which_conv=self.which_conv, which_bn=self.which_bn, activation=self.activation,
                                      upsample=(L.upsample2x if self.arch["upsample"][index]
                                                and g_index == G_depth - 1 else None))])
            if self.arch["attention"][self.arch["resolution"][index]]:
                blocks[-1].append(L.Attention(self.arch["out_channels"][index], self.which_conv))
        self.blocks = nn.ModuleList([nn.ModuleList(b) for b in blocks])
        self.output_layer = L.OutputLayer(L.bn(self.arch["out_channels"][-1], cross_replica=cross_replica, mybn=mybn),
                                          self.activation, self.which_conv(self.arch["out_channels"][-1], 3))
        if not skip_init:
            self.param_count = L.init_weights(self, G_init)
        self.fused = bool(fused)  # (set_fused switches it too) the forward groups the SN iterations when fused
        L.set_fused(self, fused)

    def forward(self, z, y):
        """``y`` is the shared embedding of the labels (``G.shared(labels)``, the reference's
        convention); integer class indices are embedded here (so wrappers such as DDP, which
        hide ``G.shared``, can pass labels)."""
        with L.grouped_spectral_norms(self):
            if not y.is_floating_point():
                y = self.shared(y)
            if self.hier:
                z = torch.cat([y, z], 1)
                y = z
            h = self.linear(z)
            h = h.view(h.size(0), -1, self.bottom_width, self.bottom_width)
            for blocklist in self.blocks:
                for block in blocklist:
                    h = block(h, y)
            return torch.tanh(self.output_layer(h))


class BigGANDeepDiscriminator(nn.Module):
    """The reference ``BigGANdeep.Discriminator``: ``forward(x, y)`` -> (N, output_dim)."""

    def __init__(self, D_ch=64, D_wide=True, D_depth=2, resolution=128, D_kernel_size=3, D_attn="64",
                 n_classes=1000, num_D_SVs=1, num_D_SV_itrs=1, D_activation=None, D_lr=2e-4, D_B1=0.0, D_B2=0.999,
                 adam_eps=1e-8, SN_eps=1e-12, output_dim=1, D_mixed_precision=False, D_fp16=False, D_init="ortho",
                 skip_init=False, D_param="SN", fused=True, **kwargs):
        super().__init__()
        owner = "BigGANDeepDiscriminator"
        discriminator_setup(self, owner, _D_ARCH, D_arch, D_ch=D_ch, D_attn=D_attn, resolution=resolution,
                            D_param=D_param, D_activation=D_activation, D_init=D_init, SN_eps=SN_eps, D_fp16=D_fp16,
                            num_D_SVs=num_D_SVs, num_D_SV_itrs=num_D_SV_itrs)
        if not isinstance(D_depth, int) or D_depth < 1:
            raise ValueError(f"{owner}: D_depth must be an int >= 1, got {D_depth!r}")
        self.D_wide, self.D_depth, self.kernel_size, self.n_classes = D_wide, D_depth, D_kernel_size, n_classes
        self.input_conv = self.which_conv(3, self.arch["in_channels"][0])
        blocks = []
        for index in range(len(self.arch["out_channels"])):
            stage = [DBlock(in_channels=self.arch["in_channels"][index] if d_index == 0
                            else self.arch["out_channels"][index],
                            out_channels=self.arch["out_channels"][index], which_conv=self.which_conv, wide=D_wide,
                            activation=self.activation, preactivation=True,
                            downsample=(nn.AvgPool2d(2) if self.arch["downsample"][index] and d_index == 0 else None))
                     for d_index in range(D_depth)]
            if self.arch["attention"][self.arch["resolution"][index]]:
                stage.append(L.Attention(self.arch["out_channels"][index], self.which_conv))
            blocks.append(nn.ModuleList(stage))
        discriminator_finish(self, blocks, output_dim, n_classes, D_init, skip_init, fused)

    def forward(self, x, y=None):
        return discriminator_forward(self, x, y, stem=self.input_conv)
