"""Compact, faithful re-writes of the attention / spectral-norm synthesis references: the oracle
for tests/test_sagan_biggan.py.

Rewritten from (read, not copied):
* heykeetae/Self-Attention-GAN ``sagan_models.py`` (Self_Attn, Generator, Discriminator) and
  ``spectral.py`` (SpectralNorm: Parameters ``weight_u/_v/_bar``, x / (||x|| + eps), u and v
  written on every forward);
* ajbrock/BigGAN-PyTorch ``layers.py`` (SN with u*/sv* buffers and Gram-Schmidt, SNConv2d,
  SNLinear, SNEmbedding, Attention, ccbn, bn, myBN, GBlock, DBlock), ``BigGAN.py`` and
  ``BigGANdeep.py`` (G_arch / D_arch, Generator, Discriminator).

Module trees, attribute names, construction order (so the RNG draws) and the arithmetic order
are the references'. Only the options the tests use are kept (norm_style 'bn', no SyncBN).
"""
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

# ============================================================================ SAGAN


def _l2n(v, eps=1e-12):
    return v / (v.norm() + eps)


class SpectralNorm(nn.Module):
    def __init__(self, module, name="weight", power_iterations=1):
        super().__init__()
        self.module, self.name, self.power_iterations = module, name, power_iterations
        w = getattr(module, name)
        h = w.shape[0]
        u = nn.Parameter(_l2n(w.data.new(h).normal_(0, 1)), requires_grad=False)
        v = nn.Parameter(_l2n(w.data.new(w.view(h, -1).shape[1]).normal_(0, 1)), requires_grad=False)
        w_bar = nn.Parameter(w.data)
        del module._parameters[name]
        module.register_parameter(name + "_u", u)
        module.register_parameter(name + "_v", v)
        module.register_parameter(name + "_bar", w_bar)

    def forward(self, *args):
        u, v, w = (getattr(self.module, self.name + s) for s in ("_u", "_v", "_bar"))
        h = w.data.shape[0]
        for _ in range(self.power_iterations):
            v.data = _l2n(torch.mv(torch.t(w.view(h, -1).data), u.data))
            u.data = _l2n(torch.mv(w.view(h, -1).data, v.data))
        sigma = u.dot(w.view(h, -1).mv(v))
        setattr(self.module, self.name, w / sigma.expand_as(w))
        return self.module.forward(*args)


class Self_Attn(nn.Module):
    def __init__(self, in_dim, activation):
        super().__init__()
        self.chanel_in, self.activation = in_dim, activation
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, 1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, 1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, w, h = x.size()
        q = self.query_conv(x).view(b, -1, w * h).permute(0, 2, 1)
        k = self.key_conv(x).view(b, -1, w * h)
        attention = self.softmax(torch.bmm(q, k))
        v = self.value_conv(x).view(b, -1, w * h)
        out = torch.bmm(v, attention.permute(0, 2, 1)).view(b, c, w, h)
        return self.gamma * out + x, attention


class SAGANGenerator(nn.Module):
    """Attention widths are conv_dim*2 / conv_dim (the reference hard-codes 128 / 64, i.e. conv_dim=64)."""

    def __init__(self, batch_size, image_size=64, z_dim=100, conv_dim=64):
        super().__init__()
        mult = 2 ** (int(math.log2(image_size)) - 3)
        c = conv_dim * mult
        l1 = [SpectralNorm(nn.ConvTranspose2d(z_dim, c, 4)), nn.BatchNorm2d(c), nn.ReLU()]
        l2 = [SpectralNorm(nn.ConvTranspose2d(c, c // 2, 4, 2, 1)), nn.BatchNorm2d(c // 2), nn.ReLU()]
        c //= 2
        l3 = [SpectralNorm(nn.ConvTranspose2d(c, c // 2, 4, 2, 1)), nn.BatchNorm2d(c // 2), nn.ReLU()]
        c //= 2
        l4 = [SpectralNorm(nn.ConvTranspose2d(c, c // 2, 4, 2, 1)), nn.BatchNorm2d(c // 2), nn.ReLU()]
        self.l4 = nn.Sequential(*l4)
        c //= 2
        self.l1, self.l2, self.l3 = nn.Sequential(*l1), nn.Sequential(*l2), nn.Sequential(*l3)
        self.last = nn.Sequential(nn.ConvTranspose2d(c, 3, 4, 2, 1), nn.Tanh())
        self.attn1 = Self_Attn(conv_dim * 2, "relu")
        self.attn2 = Self_Attn(conv_dim, "relu")

    def forward(self, z):
        out = self.l3(self.l2(self.l1(z.view(z.size(0), z.size(1), 1, 1))))
        out, p1 = self.attn1(out)
        out, p2 = self.attn2(self.l4(out))
        return self.last(out), p1, p2


class SAGANDiscriminator(nn.Module):
    def __init__(self, batch_size=64, image_size=64, conv_dim=64):
        super().__init__()
        c = conv_dim
        l1 = [SpectralNorm(nn.Conv2d(3, c, 4, 2, 1)), nn.LeakyReLU(0.1)]
        l2 = [SpectralNorm(nn.Conv2d(c, c * 2, 4, 2, 1)), nn.LeakyReLU(0.1)]
        c *= 2
        l3 = [SpectralNorm(nn.Conv2d(c, c * 2, 4, 2, 1)), nn.LeakyReLU(0.1)]
        c *= 2
        self.l4 = nn.Sequential(SpectralNorm(nn.Conv2d(c, c * 2, 4, 2, 1)), nn.LeakyReLU(0.1))
        c *= 2
        self.l1, self.l2, self.l3 = nn.Sequential(*l1), nn.Sequential(*l2), nn.Sequential(*l3)
        self.last = nn.Sequential(nn.Conv2d(c, 1, 4))
        self.attn1 = Self_Attn(conv_dim * 4, "relu")
        self.attn2 = Self_Attn(conv_dim * 8, "relu")

    def forward(self, x):
        out, p1 = self.attn1(self.l3(self.l2(self.l1(x))))
        out, p2 = self.attn2(self.l4(out))
        return self.last(out).squeeze(), p1, p2


# ============================================================================ BigGAN layers
def _proj(x, y):
    return torch.mm(y, x.t()) * y / torch.mm(y, y.t())


def _gs(x, ys):
    for y in ys:
        x = x - _proj(x, y)
    return x


def power_iteration(W, u_, update=True, eps=1e-12):
    us, vs, svs = [], [], []
    for i, u in enumerate(u_):
        with torch.no_grad():
            v = F.normalize(_gs(torch.matmul(u, W), vs), eps=eps)
            vs += [v]
            u = F.normalize(_gs(torch.matmul(v, W.t()), us), eps=eps)
            us += [u]
            if update:
                u_[i][:] = u
        svs += [torch.squeeze(torch.matmul(torch.matmul(v, W.t()), u.t()))]
    return svs, us, vs


class SN:
    def __init__(self, num_svs, num_itrs, num_outputs, transpose=False, eps=1e-12):
        self.num_itrs, self.num_svs, self.transpose, self.eps = num_itrs, num_svs, transpose, eps
        for i in range(num_svs):
            self.register_buffer(f"u{i}", torch.randn(1, num_outputs))
            self.register_buffer(f"sv{i}", torch.ones(1))

    def W_(self):
        W = self.weight.view(self.weight.size(0), -1)
        if self.transpose:
            W = W.t()
        us = [getattr(self, f"u{i}") for i in range(self.num_svs)]
        for _ in range(self.num_itrs):
            svs, _, _ = power_iteration(W, us, update=self.training, eps=self.eps)
        if self.training:
            with torch.no_grad():
                for i, sv in enumerate(svs):
                    getattr(self, f"sv{i}")[:] = sv
        return self.weight / svs[0]


class SNConv2d(nn.Conv2d, SN):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True, num_svs=1,
                 num_itrs=1, eps=1e-12):
        nn.Conv2d.__init__(self, cin, cout, kernel_size, stride, padding, dilation, groups, bias)
        SN.__init__(self, num_svs, num_itrs, cout, eps=eps)

    def forward(self, x):
        return F.conv2d(x, self.W_(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class SNLinear(nn.Linear, SN):
    def __init__(self, fin, fout, bias=True, num_svs=1, num_itrs=1, eps=1e-12):
        nn.Linear.__init__(self, fin, fout, bias)
        SN.__init__(self, num_svs, num_itrs, fout, eps=eps)

    def forward(self, x):
        return F.linear(x, self.W_(), self.bias)


class SNEmbedding(nn.Embedding, SN):
    def __init__(self, num_embeddings, embedding_dim, num_svs=1, num_itrs=1, eps=1e-12):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim)
        SN.__init__(self, num_svs, num_itrs, num_embeddings, eps=eps)

    def forward(self, x):
        return F.embedding(x, self.W_())


class Attention(nn.Module):
    def __init__(self, ch, which_conv=SNConv2d):
        super().__init__()
        self.ch = ch
        self.theta = which_conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.phi = which_conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.g = which_conv(ch, ch // 2, kernel_size=1, padding=0, bias=False)
        self.o = which_conv(ch // 2, ch, kernel_size=1, padding=0, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0), requires_grad=True)

    def forward(self, x, y=None):
        n = x.shape[2] * x.shape[3]
        theta = self.theta(x).view(-1, self.ch // 8, n)
        phi = F.max_pool2d(self.phi(x), [2, 2]).view(-1, self.ch // 8, n // 4)
        g = F.max_pool2d(self.g(x), [2, 2]).view(-1, self.ch // 2, n // 4)
        beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(-1, self.ch // 2, x.shape[2], x.shape[3]))
        return self.gamma * o + x


class ccbn(nn.Module):
    def __init__(self, output_size, input_size, which_linear, eps=1e-5, momentum=0.1):
        super().__init__()
        self.gain = which_linear(input_size, output_size)
        self.bias = which_linear(input_size, output_size)
        self.eps = eps
        self.register_buffer("stored_mean", torch.zeros(output_size))
        self.register_buffer("stored_var", torch.ones(output_size))

    def forward(self, x, y):
        gain = (1 + self.gain(y)).view(y.size(0), -1, 1, 1)
        bias = self.bias(y).view(y.size(0), -1, 1, 1)
        out = F.batch_norm(x, self.stored_mean, self.stored_var, None, None, self.training, 0.1, self.eps)
        return out * gain + bias


class bn(nn.Module):
    def __init__(self, output_size, eps=1e-5, momentum=0.1):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(output_size))
        self.bias = nn.Parameter(torch.zeros(output_size))
        self.eps, self.momentum = eps, momentum
        self.register_buffer("stored_mean", torch.zeros(output_size))
        self.register_buffer("stored_var", torch.ones(output_size))

    def forward(self, x, y=None):
        return F.batch_norm(x, self.stored_mean, self.stored_var, self.gain, self.bias, self.training,
                            self.momentum, self.eps)


class GBlock(nn.Module):
    def __init__(self, cin, cout, which_conv, which_bn, activation, upsample):
        super().__init__()
        self.activation, self.upsample = activation, upsample
        self.conv1, self.conv2 = which_conv(cin, cout), which_conv(cout, cout)
        self.learnable_sc = cin != cout or upsample
        if self.learnable_sc:
            self.conv_sc = which_conv(cin, cout, kernel_size=1, padding=0)
        self.bn1, self.bn2 = which_bn(cin), which_bn(cout)

    def forward(self, x, y):
        h = self.activation(self.bn1(x, y))
        if self.upsample:
            h, x = self.upsample(h), self.upsample(x)
        h = self.conv2(self.activation(self.bn2(self.conv1(h), y)))
        return h + (self.conv_sc(x) if self.learnable_sc else x)


class DBlock(nn.Module):
    def __init__(self, cin, cout, which_conv, wide, preactivation, activation, downsample):
        super().__init__()
        hidden = cout if wide else cin
        self.preactivation, self.activation, self.downsample = preactivation, activation, downsample
        self.conv1, self.conv2 = which_conv(cin, hidden), which_conv(hidden, cout)
        self.learnable_sc = cin != cout or bool(downsample)
        if self.learnable_sc:
            self.conv_sc = which_conv(cin, cout, kernel_size=1, padding=0)

    def shortcut(self, x):
        if self.preactivation:
            x = self.conv_sc(x) if self.learnable_sc else x
            return self.downsample(x) if self.downsample else x
        x = self.downsample(x) if self.downsample else x
        return self.conv_sc(x) if self.learnable_sc else x

    def forward(self, x):
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(self.activation(self.conv1(h)))
        if self.downsample:
            h = self.downsample(h)
        return h + self.shortcut(x)


def _init(net, style="ortho"):
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
            if style == "ortho":
                init.orthogonal_(m.weight)
            elif style == "N02":
                init.normal_(m.weight, 0, 0.02)


def _attn_set(s):
    return [int(i) for i in s.split("_")]


G_MULTS = {128: ([16, 16, 8, 4, 2], [16, 8, 4, 2, 1]), 64: ([16, 16, 8, 4], [16, 8, 4, 2]), 32: ([4, 4, 4], [4, 4, 4])}


class BigGANGenerator(nn.Module):
    def __init__(self, G_ch=64, dim_z=128, bottom_width=4, resolution=128, G_attn="64", n_classes=1000, num_G_SVs=1,
                 num_G_SV_itrs=1, G_shared=True, shared_dim=0, hier=False, BN_eps=1e-5, SN_eps=1e-12,
                 G_init="ortho", **kwargs):
        super().__init__()
        ins, outs = ([G_ch * m for m in x] for x in G_MULTS[resolution])
        res = [8 * 2 ** i for i in range(len(outs))]
        self.dim_z, self.bottom_width, self.hier, self.G_shared = dim_z, bottom_width, hier, G_shared
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
        bn_linear = functools.partial(linear, bias=False) if G_shared else nn.Embedding
        which_bn = functools.partial(ccbn, which_linear=bn_linear, eps=BN_eps,
                                     input_size=self.shared_dim + self.z_chunk_size if G_shared else n_classes)
        act = nn.ReLU(inplace=False)
        self.shared = nn.Embedding(n_classes, self.shared_dim) if G_shared else nn.Identity()
        self.linear = linear(self.dim_z // self.num_slots, ins[0] * bottom_width ** 2)
        blocks = []
        for i in range(len(outs)):
            blocks.append([GBlock(ins[i], outs[i], conv, which_bn, act, functools.partial(F.interpolate,
                                                                                          scale_factor=2))])
            if res[i] in _attn_set(G_attn):
                blocks[-1].append(Attention(outs[i], conv))
        self.blocks = nn.ModuleList([nn.ModuleList(b) for b in blocks])
        self.output_layer = nn.Sequential(bn(outs[-1]), act, conv(outs[-1], 3))
        _init(self, G_init)

    def forward(self, z, y):
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


D_ARCH = {128: ([1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 16], [True] * 5 + [False], [64, 32, 16, 8, 4, 4]),
          64: ([1, 2, 4, 8], [1, 2, 4, 8, 16], [True] * 4 + [False], [32, 16, 8, 4, 4]),
          32: ([4, 4, 4], [4, 4, 4, 4], [True, True, False, False], [16, 16, 16, 16])}


def _sn_layers(num_svs, num_itrs, eps):
    return (functools.partial(SNConv2d, kernel_size=3, padding=1, num_svs=num_svs, num_itrs=num_itrs, eps=eps),
            functools.partial(SNLinear, num_svs=num_svs, num_itrs=num_itrs, eps=eps),
            functools.partial(SNEmbedding, num_svs=num_svs, num_itrs=num_itrs, eps=eps))


def d_blocks(D_ch, D_wide, resolution, D_attn, conv, activation):
    """(the widths, ``blocks``) of BigGAN.py's Discriminator, which IC-GAN's repeats."""
    ins, outs, down, res = D_ARCH[resolution]
    ins, outs = [3] + [D_ch * m for m in ins], [D_ch * m for m in outs]
    blocks = []
    for i in range(len(outs)):
        blocks.append([DBlock(ins[i], outs[i], conv, D_wide, i > 0, activation, nn.AvgPool2d(2) if down[i] else None)])
        if res[i] in _attn_set(D_attn):
            blocks[-1].append(Attention(outs[i], conv))
    return outs, nn.ModuleList([nn.ModuleList(b) for b in blocks])


class BigGANDiscriminator(nn.Module):
    def __init__(self, D_ch=64, D_wide=True, resolution=128, D_attn="64", n_classes=1000, num_D_SVs=1,
                 num_D_SV_itrs=1, SN_eps=1e-12, output_dim=1, D_init="ortho", **kwargs):
        super().__init__()
        conv, linear, embedding = _sn_layers(num_D_SVs, num_D_SV_itrs, SN_eps)
        self.activation = nn.ReLU(inplace=False)
        outs, self.blocks = d_blocks(D_ch, D_wide, resolution, D_attn, conv, self.activation)
        self.linear = linear(outs[-1], output_dim)
        self.embed = embedding(n_classes, outs[-1])
        _init(self, D_init)

    def forward(self, x, y=None):
        h = x
        for blocklist in self.blocks:
            for block in blocklist:
                h = block(h)
        h = torch.sum(self.activation(h), [2, 3])
        return self.linear(h) + torch.sum(self.embed(y) * h, 1, keepdim=True)


# ============================================================================ BigGAN-deep
class DeepGBlock(nn.Module):
    def __init__(self, cin, cout, which_conv, which_bn, activation, upsample):
        super().__init__()
        self.cin, self.cout, hidden = cin, cout, cin // 4
        self.activation, self.upsample = activation, upsample
        self.conv1 = which_conv(cin, hidden, kernel_size=1, padding=0)
        self.conv2, self.conv3 = which_conv(hidden, hidden), which_conv(hidden, hidden)
        self.conv4 = which_conv(hidden, cout, kernel_size=1, padding=0)
        self.bn1, self.bn2, self.bn3, self.bn4 = which_bn(cin), which_bn(hidden), which_bn(hidden), which_bn(hidden)

    def forward(self, x, y):
        a = self.activation
        h = a(self.bn2(self.conv1(a(self.bn1(x, y))), y))
        if self.cin != self.cout:
            x = x[:, :self.cout]
        if self.upsample:
            h, x = self.upsample(h), self.upsample(x)
        h = self.conv3(a(self.bn3(self.conv2(h), y)))
        return self.conv4(a(self.bn4(h, y))) + x


class DeepDBlock(nn.Module):
    def __init__(self, cin, cout, which_conv, activation, downsample):
        super().__init__()
        hidden = cout // 4
        self.activation, self.downsample = activation, downsample
        self.conv1 = which_conv(cin, hidden, kernel_size=1, padding=0)
        self.conv2, self.conv3 = which_conv(hidden, hidden), which_conv(hidden, hidden)
        self.conv4 = which_conv(hidden, cout, kernel_size=1, padding=0)
        self.learnable_sc = cin != cout
        if self.learnable_sc:
            self.conv_sc = which_conv(cin, cout - cin, kernel_size=1, padding=0)

    def forward(self, x):
        a = self.activation
        h = a(self.conv3(a(self.conv2(a(self.conv1(F.relu(x)))))))
        if self.downsample:
            h, x = self.downsample(h), self.downsample(x)
        if self.learnable_sc:
            x = torch.cat([x, self.conv_sc(x)], 1)
        return self.conv4(h) + x


DEEP_D = {64: ([1, 2, 4, 8], [2, 4, 8, 16], [True] * 4, [32, 16, 8, 4]), 32: ([4, 4, 4], [4, 4, 4], [True, True, False],
                                                                           [16, 16, 16])}


class BigGANDeepGenerator(nn.Module):
    def __init__(self, G_ch=64, G_depth=2, dim_z=128, bottom_width=4, resolution=128, G_attn="64", n_classes=1000,
                 num_G_SVs=1, num_G_SV_itrs=1, shared_dim=0, hier=True, SN_eps=1e-12, G_init="ortho", **kwargs):
        super().__init__()
        ins, outs = ([G_ch * m for m in x] for x in G_MULTS[resolution])
        res = [8 * 2 ** i for i in range(len(outs))]
        self.bottom_width, self.hier = bottom_width, hier
        shared_dim = shared_dim if shared_dim > 0 else dim_z
        conv = functools.partial(SNConv2d, kernel_size=3, padding=1, num_svs=num_G_SVs, num_itrs=num_G_SV_itrs,
                                 eps=SN_eps)
        linear = functools.partial(SNLinear, num_svs=num_G_SVs, num_itrs=num_G_SV_itrs, eps=SN_eps)
        which_bn = functools.partial(ccbn, which_linear=functools.partial(linear, bias=False),
                                     input_size=shared_dim + dim_z)
        act = nn.ReLU(inplace=False)
        self.shared = nn.Embedding(n_classes, shared_dim)
        self.linear = linear(dim_z + shared_dim, ins[0] * bottom_width ** 2)
        blocks = []
        for i in range(len(outs)):
            for d in range(G_depth):
                up = functools.partial(F.interpolate, scale_factor=2) if d == G_depth - 1 else None
                blocks.append([DeepGBlock(ins[i], ins[i] if d == 0 else outs[i], conv, which_bn, act, up)])
            if res[i] in _attn_set(G_attn):
                blocks[-1].append(Attention(outs[i], conv))
        self.blocks = nn.ModuleList([nn.ModuleList(b) for b in blocks])
        self.output_layer = nn.Sequential(bn(outs[-1]), act, conv(outs[-1], 3))
        _init(self, G_init)

    def forward(self, z, y):
        z = torch.cat([y, z], 1)
        h = self.linear(z).view(z.size(0), -1, self.bottom_width, self.bottom_width)
        for blocklist in self.blocks:
            for block in blocklist:
                h = block(h, z)
        return torch.tanh(self.output_layer(h))


class BigGANDeepDiscriminator(nn.Module):
    def __init__(self, D_ch=64, D_depth=2, resolution=128, D_attn="64", n_classes=1000, num_D_SVs=1,
                 num_D_SV_itrs=1, SN_eps=1e-12, output_dim=1, D_init="ortho", **kwargs):
        super().__init__()
        ins, outs, down, res = DEEP_D[resolution]
        ins, outs = [D_ch * m for m in ins], [D_ch * m for m in outs]
        conv, linear, embedding = _sn_layers(num_D_SVs, num_D_SV_itrs, SN_eps)
        self.activation = nn.ReLU(inplace=False)
        self.input_conv = conv(3, ins[0])
        blocks = []
        for i in range(len(outs)):
            stage = [DeepDBlock(ins[i] if d == 0 else outs[i], outs[i], conv, self.activation,
                                nn.AvgPool2d(2) if down[i] and d == 0 else None) for d in range(D_depth)]
            if res[i] in _attn_set(D_attn):
                stage.append(Attention(outs[i], conv))
            blocks.append(stage)
        self.blocks = nn.ModuleList([nn.ModuleList(b) for b in blocks])
        self.linear = linear(outs[-1], output_dim)
        self.embed = embedding(n_classes, outs[-1])
        _init(self, D_init)

    def forward(self, x, y=None):
        h = self.input_conv(x)
        for blocklist in self.blocks:
            for block in blocklist:
                h = block(h)
        h = torch.sum(self.activation(h), [2, 3])
        return self.linear(h) + torch.sum(self.embed(y) * h, 1, keepdim=True)
