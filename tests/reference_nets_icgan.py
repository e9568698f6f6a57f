"""Compact re-write of IC-GAN's networks (facebookresearch/ic_gan ``BigGAN_PyTorch/BigGAN.py``,
``Generator`` / ``Discriminator`` with ``instance_cond``; read, not copied): the oracle for
tests/test_icgan.py. Built on the BigGAN layer re-writes of tests/reference_nets_attention.py
(IC-GAN's ``layers.py`` is BigGAN-PyTorch's, differing only in its SyncBN path).

Construction order (so the random draws), module names and the arithmetic are the reference's:
G registers ``shared`` (always, G_shared), ``shared_feat`` (Linear(2048 -> shared_dim_feat) in
the reference; the input width is a parameter here), ``linear``, ``blocks``, ``output_layer``; the
ccbn input is ``z_chunk + shared_dim (class_cond) + shared_dim_feat (instance_cond)``. D registers
``blocks``, ``linear``, ``linear_feat``, ``embed``.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from tests.reference_nets_attention import (G_MULTS, Attention, GBlock, SNConv2d, SNLinear, _attn_set, _init,
                                            _sn_layers, bn, ccbn, d_blocks)


class Generator(nn.Module):
    def __init__(self, G_ch=64, dim_z=128, bottom_width=4, resolution=128, G_attn="64", n_classes=1000, num_G_SVs=1,
                 num_G_SV_itrs=1, shared_dim=0, hier=False, BN_eps=1e-5, SN_eps=1e-12, G_init="ortho",
                 class_cond=True, instance_cond=True, G_shared_feat=True, shared_dim_feat=2048, feat_in=2048):
        super().__init__()
        ins, outs = ([G_ch * m for m in x] for x in G_MULTS[resolution])
        res = [8 * 2 ** i for i in range(len(outs))]
        self.dim_z, self.bottom_width, self.hier = dim_z, bottom_width, hier
        self.shared_dim = shared_dim if shared_dim > 0 else dim_z
        if hier:
            self.num_slots = len(ins) + 1
            self.z_chunk_size = dim_z // self.num_slots
            self.dim_z = self.z_chunk_size * self.num_slots
        else:
            self.num_slots, self.z_chunk_size = 1, 0
        conv = functools.partial(SNConv2d, kernel_size=3, padding=1, num_svs=num_G_SVs, num_itrs=num_G_SV_itrs,
                                 eps=SN_eps)
        linear = functools.partial(SNLinear, num_svs=num_G_SVs, num_itrs=num_G_SV_itrs, eps=SN_eps)
        size = self.z_chunk_size
        if class_cond:
            size += self.shared_dim
        if instance_cond:
            size += shared_dim_feat
        which_bn = functools.partial(ccbn, which_linear=functools.partial(linear, bias=False), eps=BN_eps,
                                     input_size=size)
        act = nn.ReLU(inplace=False)
        self.shared = nn.Embedding(n_classes, self.shared_dim)
        self.shared_feat = linear(feat_in, shared_dim_feat) if G_shared_feat else nn.Identity()
        self.linear = linear(self.dim_z // self.num_slots, ins[0] * bottom_width ** 2)
        blocks = []
        for i in range(len(outs)):
            blocks.append([GBlock(ins[i], outs[i], conv, which_bn, act,
                                  functools.partial(F.interpolate, scale_factor=2))])
            if res[i] in _attn_set(G_attn):
                blocks[-1].append(Attention(outs[i], conv))
        self.blocks = nn.ModuleList([nn.ModuleList(b) for b in blocks])
        self.output_layer = nn.Sequential(bn(outs[-1]), act, conv(outs[-1], 3))
        _init(self, G_init)

    def forward(self, z, label=None, feats=None):
        c = []
        if label is not None:
            c.append(self.shared(label))
        if feats is not None:
            c.append(self.shared_feat(feats))
        y = torch.cat(c, dim=-1)
        if self.hier:
            zs = torch.split(z, self.z_chunk_size, 1)
            z, ys = zs[0], [torch.cat([y, item], 1) for item in zs[1:]]
        else:
            ys = [y] * len(self.blocks)
        h = self.linear(z).view(z.size(0), -1, self.bottom_width, self.bottom_width)
        for i, blocklist in enumerate(self.blocks):
            for block in blocklist:
                h = block(h, ys[i])
        return torch.tanh(self.output_layer(h))


class Discriminator(nn.Module):
    def __init__(self, D_ch=64, D_wide=True, resolution=128, D_attn="64", n_classes=1000, num_D_SVs=1,
                 num_D_SV_itrs=1, SN_eps=1e-12, output_dim=1, D_init="ortho", class_cond=True, instance_cond=True,
                 instance_sz=2048):
        super().__init__()
        conv, linear, embedding = _sn_layers(num_D_SVs, num_D_SV_itrs, SN_eps)
        self.activation = nn.ReLU(inplace=False)
        outs, self.blocks = d_blocks(D_ch, D_wide, resolution, D_attn, conv, self.activation)
        self.linear = linear(outs[-1], output_dim)
        if class_cond and instance_cond:
            self.linear_feat = linear(instance_sz, outs[-1] // 2)
            self.embed = embedding(n_classes, outs[-1] // 2)
        elif class_cond:
            self.embed = embedding(n_classes, outs[-1])
        elif instance_cond:
            self.linear_feat = linear(instance_sz, outs[-1])
        _init(self, D_init)

    def forward(self, x, y=None, feat=None):
        h = x
        for blocklist in self.blocks:
            for block in blocklist:
                h = block(h)
        h = torch.sum(self.activation(h), [2, 3])
        out = self.linear(h)
        if y is not None and feat is not None:
            out = out + torch.sum(torch.cat([self.embed(y), self.linear_feat(feat)], dim=-1) * h, 1, keepdim=True)
        elif y is not None:
            out = out + torch.sum(self.embed(y) * h, 1, keepdim=True)
        elif feat is not None:
            out = out + torch.sum(self.linear_feat(feat) * h, 1, keepdim=True)
        return out
