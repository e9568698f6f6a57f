"""Compact re-writes of the synthesis references' building blocks, as users' code: the inputs of
tests/test_fuse*.py and benchmarks/bench_fuse.py (``ganengine.fuse`` must accelerate them
without changing a number).

Rewritten from reading (not copied):
* ajbrock/BigGAN-PyTorch ``layers.py`` / ``BigGAN.py``: its own spectral norm (``u0``/``sv0``
  buffers, power iteration every forward, buffers written only in training), ``SNConv2d`` /
  ``SNLinear`` (nn.Conv2d / nn.Linear subclasses whose forward reads ``self.W_()``), ``ccbn``
  (gain ``1 + linear(y)``, bias ``linear(y)``, running stats ``stored_mean``/``stored_var``,
  momentum 0.1), ``bn``, ``GBlock`` / ``DBlock`` (layers called from ``forward``), ``Attention``
  and generator / discriminator trunks;
* heykeetae/Self-Attention-GAN ``spectral.py`` / ``sagan_models.py``: the ``SpectralNorm``
  wrapper (deletes the wrapped conv's ``weight``, keeps ``weight_u``/``weight_v``/``weight_bar``
  Parameters, sets ``module.weight`` before calling ``module.forward``), ``Self_Attn`` returning
  ``(out, attention)``, generator / discriminator.
Widths are arguments so tests run them tiny and the benchmark at the reference widths.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------ BigGAN
def _normalize_rows(v, eps):
    return F.normalize(v, eps=eps)


class SN:
    """BigGAN-style spectral norm mixin: ``W_()`` runs the power iteration on every call."""

    def _init_sn(self, num_svs, num_itrs, num_outputs, transpose=False, eps=1e-12):
        self.num_itrs, self.num_svs, self.transpose, self.eps = num_itrs, num_svs, transpose, eps
        for i in range(num_svs):
            self.register_buffer(f"u{i}", torch.randn(1, num_outputs))
            self.register_buffer(f"sv{i}", torch.ones(1))

    @property
    def u(self):
        return [getattr(self, f"u{i}") for i in range(self.num_svs)]

    @property
    def sv(self):
        return [getattr(self, f"sv{i}") for i in range(self.num_svs)]

    def W_(self):
        w = self.weight.view(self.weight.size(0), -1)
        if self.transpose:
            w = w.t()
        for _ in range(self.num_itrs):
            us, vs, svs = [], [], []
            for i, u in enumerate(self.u):
                with torch.no_grad():
                    v = torch.matmul(u, w)
                    for other in vs:
                        v = v - torch.mm(other, v.t()) * other / torch.mm(other, other.t())
                    v = _normalize_rows(v, self.eps)
                    vs.append(v)
                    u = torch.matmul(v, w.t())
                    for other in us:
                        u = u - torch.mm(other, u.t()) * other / torch.mm(other, other.t())
                    u = _normalize_rows(u, self.eps)
                    us.append(u)
                    if self.training:
                        self.u[i][:] = u
                svs.append(torch.squeeze(torch.matmul(torch.matmul(v, w.t()), u.t())))
        if self.training:
            with torch.no_grad():
                for i, s in enumerate(svs):
                    self.sv[i][:] = s
        return self.weight / svs[0]


class SNConv2d(nn.Conv2d, SN):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=True, num_svs=1,
                 num_itrs=1, eps=1e-12):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self._init_sn(num_svs, num_itrs, out_channels, eps=eps)

    def forward(self, x):
        return F.conv2d(x, self.W_(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class SNLinear(nn.Linear, SN):
    def __init__(self, in_features, out_features, bias=True, num_svs=1, num_itrs=1, eps=1e-12):
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_sn(num_svs, num_itrs, out_features, eps=eps)

    def forward(self, x):
        return F.linear(x, self.W_(), self.bias)


class CCBN(nn.Module):
    """Class-conditional batch norm: ``bn(x) * (1 + gain(y)) + bias(y)``."""

    def __init__(self, output_size, input_size, which_linear, eps=1e-5, momentum=0.1):
        super().__init__()
        self.output_size, self.input_size = output_size, input_size
        self.gain = which_linear(input_size, output_size)
        self.bias = which_linear(input_size, output_size)
        self.eps, self.momentum = eps, momentum
        self.register_buffer("stored_mean", torch.zeros(output_size))
        self.register_buffer("stored_var", torch.ones(output_size))

    def forward(self, x, y):
        gain = (1 + self.gain(y)).view(y.size(0), -1, 1, 1)
        bias = self.bias(y).view(y.size(0), -1, 1, 1)
        out = F.batch_norm(x, self.stored_mean, self.stored_var, None, None, self.training, 0.1, self.eps)
        return out * gain + bias


class BN(nn.Module):
    """Batch norm with BigGAN's names (gain, bias, stored_mean, stored_var); forward(x, y=None)."""

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
    def __init__(self, in_channels, out_channels, which_conv, which_bn, activation, upsample=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.activation, self.upsample = activation, upsample
        self.conv1 = which_conv(in_channels, out_channels)
        self.conv2 = which_conv(out_channels, out_channels)
        self.learnable_sc = in_channels != out_channels or upsample
        if self.learnable_sc:
            self.conv_sc = which_conv(in_channels, out_channels, kernel_size=1, padding=0)
        self.bn1 = which_bn(in_channels)
        self.bn2 = which_bn(out_channels)

    def forward(self, x, y):
        h = self.activation(self.bn1(x, y))
        if self.upsample:
            h = self.upsample(h)
            x = self.upsample(x)
        h = self.conv1(h)
        h = self.activation(self.bn2(h, y))
        h = self.conv2(h)
        if self.learnable_sc:
            x = self.conv_sc(x)
        return h + x


class DBlock(nn.Module):
    def __init__(self, in_channels, out_channels, which_conv, activation, preactivation=False, downsample=None):
        super().__init__()
        self.preactivation, self.activation, self.downsample = preactivation, activation, downsample
        self.conv1 = which_conv(in_channels, out_channels)
        self.conv2 = which_conv(out_channels, out_channels)
        self.learnable_sc = in_channels != out_channels or downsample is not None
        if self.learnable_sc:
            self.conv_sc = which_conv(in_channels, out_channels, kernel_size=1, padding=0)

    def shortcut(self, x):
        if self.preactivation:
            if self.learnable_sc:
                x = self.conv_sc(x)
            if self.downsample:
                x = self.downsample(x)
        else:
            if self.downsample:
                x = self.downsample(x)
            if self.learnable_sc:
                x = self.conv_sc(x)
        return x

    def forward(self, x):
        h = F.relu(x) if self.preactivation else x
        h = self.conv1(h)
        h = self.conv2(self.activation(h))
        if self.downsample:
            h = self.downsample(h)
        return h + self.shortcut(x)


class Attention(nn.Module):
    def __init__(self, ch, which_conv):
        super().__init__()
        self.ch = ch
        self.theta = which_conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.phi = which_conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.g = which_conv(ch, ch // 2, kernel_size=1, padding=0, bias=False)
        self.o = which_conv(ch // 2, ch, kernel_size=1, padding=0, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x, y=None):
        n, c, h, w = x.shape
        theta = self.theta(x).view(-1, c // 8, h * w)
        phi = F.max_pool2d(self.phi(x), [2, 2]).view(-1, c // 8, h * w // 4)
        g = F.max_pool2d(self.g(x), [2, 2]).view(-1, c // 2, h * w // 4)
        beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(-1, c // 2, h, w))
        return self.gamma * o + x


class BigGANGenerator(nn.Module):
    """BigGAN's G at resolution 32 * 2**(len(widths) - 3)... as a trunk of GBlocks: ``widths``
    channel multipliers of ``ch`` per block (each upsamples 2x), attention after the block whose
    output resolution is ``attn_res``; shared embedding, hierarchical z; ``forward(z, y)`` with
    ``y = G.shared(labels)``."""

    def __init__(self, ch=8, dim_z=20, shared_dim=8, n_classes=5, widths=(4, 4, 2, 1), bottom=4, attn_res=16,
                 activation=None):
        super().__init__()
        self.widths = widths
        self.num_slots = len(widths) + 1
        self.z_chunk = dim_z // self.num_slots
        self.dim_z = self.z_chunk * self.num_slots
        self.bottom = bottom
        self.activation = activation if activation is not None else nn.ReLU(inplace=False)
        which_conv = functools.partial(SNConv2d, kernel_size=3, padding=1)
        which_bn = functools.partial(CCBN, which_linear=functools.partial(SNLinear, bias=False),
                                     input_size=shared_dim + self.z_chunk)
        self.shared = nn.Embedding(n_classes, shared_dim)
        chans = [ch * w for w in widths]
        self.linear = SNLinear(self.z_chunk, chans[0] * bottom ** 2)
        blocks, res = [], bottom
        for i in range(len(chans) - 1):
            res *= 2
            block = [GBlock(chans[i], chans[i + 1], which_conv, which_bn, self.activation,
                            functools.partial(F.interpolate, scale_factor=2))]
            if res == attn_res:
                block.append(Attention(chans[i + 1], which_conv))
            blocks.append(nn.ModuleList(block))
        self.blocks = nn.ModuleList(blocks)
        self.output_layer = nn.Sequential(BN(chans[-1]), self.activation, which_conv(chans[-1], 3))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                nn.init.orthogonal_(m.weight)

    def forward(self, z, y):
        zs = torch.split(z, self.z_chunk, 1)
        z = zs[0]
        ys = [torch.cat([y, item], 1) for item in zs[1:]]
        h = self.linear(z)
        h = h.view(h.size(0), -1, self.bottom, self.bottom)
        for index, blocklist in enumerate(self.blocks):
            for block in blocklist:
                h = block(h, ys[index])
        return torch.tanh(self.output_layer(h))


class BigGANDiscriminator(nn.Module):
    def __init__(self, ch=8, n_classes=5, widths=(1, 2, 4, 4), attn_res=16, resolution=32, activation=None):
        super().__init__()
        self.activation = activation if activation is not None else nn.ReLU(inplace=False)
        which_conv = functools.partial(SNConv2d, kernel_size=3, padding=1)
        chans = [3] + [ch * w for w in widths]
        blocks, res = [], resolution
        for i in range(len(widths)):
            down = nn.AvgPool2d(2) if i < len(widths) - 1 else None
            block = [DBlock(chans[i], chans[i + 1], which_conv, self.activation, preactivation=i > 0,
                            downsample=down)]
            if down is not None:
                res //= 2
            if res == attn_res and i < len(widths) - 1:
                block.append(Attention(chans[i + 1], which_conv))
            blocks.append(nn.ModuleList(block))
        self.blocks = nn.ModuleList(blocks)
        self.linear = SNLinear(chans[-1], 1)
        self.embed = nn.Embedding(n_classes, chans[-1])
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                nn.init.orthogonal_(m.weight)

    def forward(self, x, y):
        h = x
        for blocklist in self.blocks:
            for block in blocklist:
                h = block(h)
        h = torch.sum(self.activation(h), [2, 3])
        out = self.linear(h)
        return out + torch.sum(self.embed(y) * h, 1, keepdim=True)


# ------------------------------------------------------------------ SAGAN
def _l2normalize(v, eps=1e-12):
    return v / (v.norm() + eps)


class SpectralNorm(nn.Module):
    """SAGAN's wrapper: keeps u, v, w_bar as Parameters of the wrapped module and sets its
    ``weight`` attribute before every call (eval included)."""

    def __init__(self, module, name="weight", power_iterations=1):
        super().__init__()
        self.module, self.name, self.power_iterations = module, name, power_iterations
        w = getattr(module, name)
        height = w.shape[0]
        width = w.view(height, -1).shape[1]
        u = nn.Parameter(_l2normalize(w.data.new(height).normal_(0, 1)), requires_grad=False)
        v = nn.Parameter(_l2normalize(w.data.new(width).normal_(0, 1)), requires_grad=False)
        w_bar = nn.Parameter(w.data)
        del module._parameters[name]
        module.register_parameter(name + "_u", u)
        module.register_parameter(name + "_v", v)
        module.register_parameter(name + "_bar", w_bar)

    def _update_u_v(self):
        u = getattr(self.module, self.name + "_u")
        v = getattr(self.module, self.name + "_v")
        w = getattr(self.module, self.name + "_bar")
        height = w.data.shape[0]
        for _ in range(self.power_iterations):
            v.data = _l2normalize(torch.mv(torch.t(w.view(height, -1).data), u.data))
            u.data = _l2normalize(torch.mv(w.view(height, -1).data, v.data))
        sigma = u.dot(w.view(height, -1).mv(v))
        setattr(self.module, self.name, w / sigma.expand_as(w))

    def forward(self, *args):
        self._update_u_v()
        return self.module.forward(*args)


class SelfAttn(nn.Module):
    def __init__(self, in_dim, activation="relu"):
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
    """SAGAN's 64x64 generator with ``conv_dim`` as the width (64 in the reference)."""

    def __init__(self, z_dim=16, conv_dim=8):
        super().__init__()
        d = conv_dim * 8
        self.l1 = nn.Sequential(SpectralNorm(nn.ConvTranspose2d(z_dim, d, 4)), nn.BatchNorm2d(d), nn.ReLU())
        self.l2 = nn.Sequential(SpectralNorm(nn.ConvTranspose2d(d, d // 2, 4, 2, 1)), nn.BatchNorm2d(d // 2), nn.ReLU())
        self.l3 = nn.Sequential(SpectralNorm(nn.ConvTranspose2d(d // 2, d // 4, 4, 2, 1)), nn.BatchNorm2d(d // 4),
                                nn.ReLU())
        self.l4 = nn.Sequential(SpectralNorm(nn.ConvTranspose2d(d // 4, d // 8, 4, 2, 1)), nn.BatchNorm2d(d // 8),
                                nn.ReLU())
        self.last = nn.Sequential(nn.ConvTranspose2d(d // 8, 3, 4, 2, 1), nn.Tanh())
        self.attn1 = SelfAttn(d // 4)
        self.attn2 = SelfAttn(d // 8)

    def forward(self, z):
        z = z.view(z.size(0), z.size(1), 1, 1)
        out = self.l3(self.l2(self.l1(z)))
        out, p1 = self.attn1(out)
        out = self.l4(out)
        out, p2 = self.attn2(out)
        return self.last(out), p1, p2


class SAGANDiscriminator(nn.Module):
    def __init__(self, conv_dim=8):
        super().__init__()
        d = conv_dim
        self.l1 = nn.Sequential(SpectralNorm(nn.Conv2d(3, d, 4, 2, 1)), nn.LeakyReLU(0.1))
        self.l2 = nn.Sequential(SpectralNorm(nn.Conv2d(d, d * 2, 4, 2, 1)), nn.LeakyReLU(0.1))
        self.l3 = nn.Sequential(SpectralNorm(nn.Conv2d(d * 2, d * 4, 4, 2, 1)), nn.LeakyReLU(0.1))
        self.l4 = nn.Sequential(SpectralNorm(nn.Conv2d(d * 4, d * 8, 4, 2, 1)), nn.LeakyReLU(0.1))
        self.last = nn.Sequential(nn.Conv2d(d * 8, 1, 4))
        self.attn1 = SelfAttn(d * 4)
        self.attn2 = SelfAttn(d * 8)

    def forward(self, x):
        out = self.l3(self.l2(self.l1(x)))
        out, p1 = self.attn1(out)
        out = self.l4(out)
        out, p2 = self.attn2(out)
        return self.last(out).squeeze(), p1, p2
