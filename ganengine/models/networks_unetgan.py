"""U-Net GAN's discriminator (Schonfeld, Schiele, Khoreva, CVPR 2020; reference:
boschresearch/unetgan ``BigGAN.py`` ``Unet_Discriminator``, ``layers.py`` ``GBlock2``).

The encoder is BigGAN's discriminator (``DBlock`` residual blocks with average pooling, spectral
norm everywhere) down to 4x4, where a global head gives one score per image (``linear_middle``
plus the projection ``sum(embed_middle(y) * h)``); the decoder (``GBlock2``: ReLU, nearest 2x
upsampling, two 3x3 SN convs, 1x1 SN shortcut) goes back to full resolution, concatenating the
encoder's features of the same size before each block after the first, and a 1x1 conv plus the
per-pixel projection ``sum(embed(y) * h, channels)`` gives one score per pixel.
``forward(x, y)`` returns ``(per_pixel (N, 1, R, R), global (N, output_dim))`` like the
reference.

Widths: at 128 and 256 the reference's ``D_unet_arch`` tables (module tree and keys as there:
``blocks.{i}.0`` encoder/decoder blocks, ``blocks.{i}.1`` attention, ``blocks.{last}`` the 1x1
conv, ``linear``, ``linear_middle``, ``embed``, ``embed_middle``). 32 and 64 (for the built-in
data and CPU-sized runs) follow the same rule (encoder widths from BigGAN's D tables, decoder
widths mirrored; the reference has no such tables). ``fused=True`` runs the BigGAN layers' fused
paths (layers_biggan.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ganengine.models import biggan_ops as ops
from ganengine.models import layers_biggan as L
from ganengine.models.networks_biggan import attention_resolutions, check_activation, check_choice, sn_partials

_ENCODER = {32: [4, 4, 4], 64: [1, 2, 4, 8], 128: [1, 2, 4, 8, 16], 256: [1, 2, 4, 8, 8, 16]}


def D_unet_arch(ch=64, attention="64"):
    """Encoder blocks halve the resolution down to 4x4; decoder block j > 0 takes its input
    concatenated with the encoder output of the same size (the reference's tables at 128/256)."""
    want = attention_resolutions(attention, "D_attn")
    arch = {}
    for res, enc in _ENCODER.items():
        n = len(enc)
        dec_out = [enc[n - 2 - j] for j in range(n - 1)] + [enc[0]]
        dec_in = [enc[-1]] + [dec_out[j - 1] + enc[n - 1 - j] for j in range(1, n)]
        resolutions = [res >> (i + 1) for i in range(n)] + [4 << (j + 1) for j in range(n)]
        arch[res] = {"in_channels": [3] + [ch * m for m in enc[:-1]] + [ch * m for m in dec_in],
                     "out_channels": [ch * m for m in enc + dec_out],
                     "downsample": [True] * n + [False] * n, "upsample": [False] * n + [True] * n,
                     "resolution": resolutions, "n_down": n,
                     "attention": {r: r in want for r in set(resolutions)}}
    return arch


class GBlock2(nn.Module):
    """The decoder block: ReLU, upsample, conv3x3, ReLU, conv3x3 + conv1x1(upsample(x))."""

    def __init__(self, in_channels, out_channels, which_conv=nn.Conv2d, activation=None, upsample=None,
                 skip_connection=True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.which_conv, self.activation, self.upsample = which_conv, activation, upsample
        self.conv1 = which_conv(in_channels, out_channels)
        self.conv2 = which_conv(out_channels, out_channels)
        self.learnable_sc = in_channels != out_channels or bool(upsample)
        if self.learnable_sc:
            self.conv_sc = which_conv(in_channels, out_channels, kernel_size=1, padding=0)
        self.skip_connection = skip_connection
        self.fused = False

    def forward(self, x):
        if self.fused and ops.relu_or_none(self.activation):
            h = ops.upsample_then_conv(self.upsample, self.conv1, F.relu(x))
            h = ops.apply_conv(self.conv2, F.relu(h))
            if self.learnable_sc:
                x = ops.apply_conv(self.conv_sc, x)  # 1x1 conv before the nearest upsampling: exact
            if self.upsample:
                x = self.upsample(x)
            return h + x if self.skip_connection else h
        h = self.activation(x)
        if self.upsample:
            h = self.upsample(h)
            x = self.upsample(x)
        h = self.conv2(self.activation(self.conv1(h)))
        if self.learnable_sc:
            x = self.conv_sc(x)
        return h + x if self.skip_connection else h


class UNetDiscriminator(nn.Module):
    """The reference ``Unet_Discriminator``; ``forward(x, y=None)`` -> (per-pixel, global)."""

    def __init__(self, D_ch=64, D_wide=True, resolution=128, D_kernel_size=3, D_attn="64", n_classes=1000,
                 num_D_SVs=1, num_D_SV_itrs=1, D_activation=None, SN_eps=1e-12, output_dim=1, D_init="ortho",
                 skip_init=False, D_param="SN", unconditional=False, fused=True, **kwargs):
        super().__init__()
        owner = "UNetDiscriminator"
        check_choice(owner, "resolution", resolution, _ENCODER)
        if D_param != "SN":
            raise ValueError(f"{owner}: D_param must be 'SN', got {D_param!r}")
        self.ch, self.D_wide, self.resolution, self.n_classes = D_ch, D_wide, resolution, n_classes
        self.attention, self.unconditional, self.init = D_attn, unconditional, D_init
        self.activation = check_activation(owner, "D_activation", nn.ReLU(inplace=False) if D_activation is None
                                           else D_activation)
        self.arch = D_unet_arch(D_ch, D_attn)[resolution]
        n = self.arch["n_down"]
        self.save_features = list(range(n))
        self.which_conv, self.which_linear = sn_partials("SN", num_D_SVs, num_D_SV_itrs, SN_eps, owner)
        self.which_embedding = functools.partial(L.SNEmbedding, num_svs=num_D_SVs, num_itrs=num_D_SV_itrs, eps=SN_eps)
        blocks = []
        for index in range(len(self.arch["out_channels"])):
            cin, cout = self.arch["in_channels"][index], self.arch["out_channels"][index]
            if self.arch["downsample"][index]:
                stage = [L.DBlock(cin, cout, which_conv=self.which_conv, wide=D_wide, activation=self.activation,
                                  preactivation=index > 0, downsample=nn.AvgPool2d(2))]
            else:
                stage = [GBlock2(cin, cout, which_conv=self.which_conv, activation=self.activation,
                                 upsample=L.upsample2x, skip_connection=True)]
            # the reference's condition is index < 5, a constant (its 128 model's encoder depth): at
            # 256 the last encoder block (4x4) gets no attention even where D_attn names 4
            if self.arch["attention"][self.arch["resolution"][index]] and index < 5:
                stage.append(L.Attention(cout, self.which_conv))
            blocks.append(nn.ModuleList(stage))
        self.blocks = nn.ModuleList(blocks)
        self.blocks.append(nn.Conv2d(self.arch["out_channels"][-1], 1, kernel_size=1))
        self.linear = self.which_linear(self.arch["out_channels"][-1], output_dim)
        # (the reference builds ``linear`` and never calls it: its checkpoints hold it, so it stays,
        # and DDP is told that some parameters get no gradient)
        self.ddp_find_unused_parameters = True
        self.linear_middle = self.which_linear(self.arch["out_channels"][n - 1], output_dim)
        if not unconditional:
            self.embed_middle = self.which_embedding(n_classes, self.arch["out_channels"][n - 1])
            self.embed = self.which_embedding(n_classes, self.arch["out_channels"][-1])
        if not skip_init:
            self.param_count = L.init_weights(self, D_init)
        L.set_fused(self, fused)

    def forward(self, x, y=None):
        if not self.unconditional and y is None:
            raise ValueError("UNetDiscriminator: y (class labels, shape (N,)) is required unless unconditional=True")
        n = self.arch["n_down"]
        h, residual = x, [x]
        bottleneck = None
        for index, blocklist in enumerate(self.blocks[:-1]):
            if index > n:  # decoder blocks after the first: concatenate the encoder output of this size
                h = torch.cat((h, residual[2 * n - index]), dim=1)
            for block in blocklist:
                h = block(h)
            if index < n - 1:
                residual.append(h)
            if index == n - 1:
                h_ = torch.sum(self.activation(h), [2, 3])
                bottleneck = self.linear_middle(h_)
                if not self.unconditional:
                    bottleneck = bottleneck + torch.sum(self.embed_middle(y) * h_, 1, keepdim=True)
        out = self.blocks[-1](h)
        if not self.unconditional:
            emb = self.embed(y)
            out = out + torch.sum(emb.view(emb.size(0), emb.size(1), 1, 1) * h, 1, keepdim=True)
        return out.view(out.size(0), 1, self.resolution, self.resolution), bottleneck
