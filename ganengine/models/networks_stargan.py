"""StarGAN networks (reference: yunjey/stargan ``model.py``) on the fused ops.

Same module tree and state_dict keys as the reference ``Generator`` / ``Discriminator``; PyTorch's
default initialisation (the reference applies no init of its own). The generator's InstanceNorm2d
layers have ``affine=True, track_running_stats=True`` as in the reference: in training mode they
use the input statistics (and update running statistics); the reference's test code never calls
``eval()``, so its translations use input statistics too (see ``StarGAN.translate``).

Optional SAGAN attention (``attention_scale``): generator on the decoder side (after the
residual blocks: 4, after the first upsampling: 2, after the second: 1); discriminator after the
conv block that downsamples by that factor (2 .. 2**repeat_num). Keys ``attn.*`` extend the
reference's.
"""
from __future__ import annotations

import torch
from torch import nn

from ganengine.models._common import (check_attention_scale, check_positive, finish, make_attention,
                                      run_with_attention)


def _inorm(c: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(c, affine=True, track_running_stats=True)


class ResidualBlock(nn.Module):
    """``x + main(x)``: conv3x3, IN, ReLU, conv3x3, IN (no conv bias)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(dim_in, dim_out, kernel_size=3, stride=1, padding=1, bias=False), _inorm(dim_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim_out, dim_out, kernel_size=3, stride=1, padding=1, bias=False), _inorm(dim_out))

    def forward(self, x):
        return x + self.main(x)


class StarGANGenerator(nn.Module):
    """The reference ``Generator(conv_dim=64, c_dim=5, repeat_num=6)``; ``forward(x, c)`` tiles the
    target-domain label ``c`` (N, c_dim) over the image and concatenates it to the channels."""

    def __init__(self, conv_dim: int = 64, c_dim: int = 5, repeat_num: int = 6, fused: bool = True,
                 attention_scale: int | None = None):
        super().__init__()
        check_positive("StarGANGenerator", conv_dim=conv_dim, c_dim=c_dim)
        if not isinstance(repeat_num, int) or repeat_num < 0:
            raise ValueError(f"StarGANGenerator: repeat_num must be an int >= 0, got {repeat_num!r}")
        self.conv_dim, self.c_dim, self.repeat_num = conv_dim, c_dim, repeat_num
        layers = [nn.Conv2d(3 + c_dim, conv_dim, kernel_size=7, stride=1, padding=3, bias=False), _inorm(conv_dim),
                  nn.ReLU(inplace=True)]
        d = conv_dim
        for _ in range(2):
            layers += [nn.Conv2d(d, d * 2, kernel_size=4, stride=2, padding=1, bias=False), _inorm(d * 2),
                       nn.ReLU(inplace=True)]
            d *= 2
        layers += [ResidualBlock(d, d) for _ in range(repeat_num)]
        for _ in range(2):
            layers += [nn.ConvTranspose2d(d, d // 2, kernel_size=4, stride=2, padding=1, bias=False), _inorm(d // 2),
                       nn.ReLU(inplace=True)]
            d //= 2
        layers += [nn.Conv2d(d, 3, kernel_size=7, stride=1, padding=3, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

        first_up = 9 + repeat_num
        where = {4: (first_up, conv_dim * 4), 2: (first_up + 3, conv_dim * 2), 1: (first_up + 6, conv_dim)}
        check_attention_scale("StarGANGenerator", attention_scale, where)
        self.attention_scale = attention_scale
        self.attn = None
        if attention_scale is not None:
            self._attn_index, channels = where[attention_scale]
            self.attn = make_attention(channels)
        finish(self, fused)

    def forward(self, x, c):
        if c.dim() != 2 or c.size(0) != x.size(0) or c.size(1) != self.c_dim:
            raise ValueError(f"StarGANGenerator: expected labels of shape ({x.size(0)}, {self.c_dim}) for images of "
                             f"shape {tuple(x.shape)}, got {tuple(c.shape)}")
        c = c.to(x.dtype).view(c.size(0), c.size(1), 1, 1).repeat(1, 1, x.size(2), x.size(3))
        x = torch.cat([x, c], dim=1)
        if self.attn is None:
            return self.main(x)
        return run_with_attention(self.main, x, self._attn_index, self.attn)


class StarGANDiscriminator(nn.Module):
    """The reference ``Discriminator(image_size=128, conv_dim=64, c_dim=5, repeat_num=6)``:
    ``repeat_num`` stride-2 conv + LeakyReLU(0.01) layers, then ``conv1`` (the PatchGAN real/fake
    map) and ``conv2`` (domain logits, (N, c_dim))."""

    def __init__(self, image_size: int = 128, conv_dim: int = 64, c_dim: int = 5, repeat_num: int = 6,
                 fused: bool = True, attention_scale: int | None = None):
        super().__init__()
        check_positive("StarGANDiscriminator", image_size=image_size, conv_dim=conv_dim, c_dim=c_dim,
                       repeat_num=repeat_num)
        kernel_size = int(image_size / 2 ** repeat_num)
        if kernel_size < 1:
            raise ValueError(f"StarGANDiscriminator: image_size={image_size} is smaller than 2**repeat_num="
                             f"{2 ** repeat_num}; use a larger image_size or a smaller repeat_num")
        self.image_size, self.conv_dim, self.c_dim, self.repeat_num = image_size, conv_dim, c_dim, repeat_num
        layers = [nn.Conv2d(3, conv_dim, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.01)]
        d = conv_dim
        for _ in range(1, repeat_num):
            layers += [nn.Conv2d(d, d * 2, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.01)]
            d *= 2
        self.main = nn.Sequential(*layers)
        self.conv1 = nn.Conv2d(d, 1, kernel_size=3, stride=1, padding=1, bias=False)
        self.conv2 = nn.Conv2d(d, c_dim, kernel_size=kernel_size, bias=False)

        where = {2 ** (j + 1): (2 * (j + 1), conv_dim * 2 ** j) for j in range(repeat_num)}
        check_attention_scale("StarGANDiscriminator", attention_scale, where)
        self.attention_scale = attention_scale
        self.attn = None
        if attention_scale is not None:
            self._attn_index, channels = where[attention_scale]
            self.attn = make_attention(channels)
        finish(self, fused)

    def forward(self, x):
        if self.attn is None:
            h = self.main(x)
        else:
            h = run_with_attention(self.main, x, self._attn_index, self.attn)
        out_src = self.conv1(h)
        out_cls = self.conv2(h)
        return out_src, out_cls.view(out_cls.size(0), out_cls.size(1))
