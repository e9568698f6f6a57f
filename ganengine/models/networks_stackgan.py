"""StackGAN networks (reference: hanzhanggit/StackGAN-Pytorch ``code/model.py``) on the fused ops.

The reference reads its sizes from a global config; here they are constructor arguments named
after it: ``gf_dim`` (GAN.GF_DIM, 128), ``df_dim`` (GAN.DF_DIM, 64), ``condition_dim``
(GAN.CONDITION_DIM, 128), ``text_dim`` (TEXT.DIMENSION, 1024 for the char-CNN-RNN embeddings;
any size works), ``z_dim`` (Z_DIM, 100), ``r_num`` (GAN.R_NUM, 4). Module trees and keys are the
reference's (``Stage2Generator`` holds a complete ``Stage1Generator`` as ``STAGE1_G``, frozen as
in the reference), and ``init_type="stackgan"`` applies the reference's ``weights_init``.

Conditioning augmentation (``ca_net``, the reference CA_NET): ``fc`` to ``2 * condition_dim``,
ReLU, split into ``mu`` and ``logvar``, sample ``mu + eps * exp(logvar / 2)``.
"""
from __future__ import annotations

import torch
from torch import nn

from ganengine.models._common import check_positive, finish


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def up_block(in_planes: int, out_planes: int) -> nn.Sequential:
    """x2 nearest upsampling, conv3x3, BatchNorm, ReLU (the reference upBlock)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv3x3(in_planes, out_planes),
                         nn.BatchNorm2d(out_planes), nn.ReLU(True))


def weights_init(m: nn.Module) -> None:
    """The reference StackGAN init (by class name): conv N(0, 0.02) (bias untouched), BatchNorm
    weight N(1, 0.02) bias 0, Linear N(0, 0.02) bias 0."""
    classname = m.__class__.__name__
    if "Conv" in classname:
        m.weight.data.normal_(0.0, 0.02)
    elif "BatchNorm" in classname:
        m.weight.data.normal_(1.0, 0.02)
        m.bias.data.fill_(0)
    elif "Linear" in classname:
        m.weight.data.normal_(0.0, 0.02)
        if m.bias is not None:
            m.bias.data.fill_(0.0)


def _init(net: nn.Module, init_type) -> None:
    if init_type == "stackgan":
        net.apply(weights_init)
    elif init_type is not None:
        raise ValueError(f"init_type must be 'stackgan' (the reference weights_init) or None (PyTorch default), "
                         f"got {init_type!r}")


class ResBlock(nn.Module):
    def __init__(self, channel_num: int):
        super().__init__()
        self.block = nn.Sequential(conv3x3(channel_num, channel_num), nn.BatchNorm2d(channel_num), nn.ReLU(True),
                                   conv3x3(channel_num, channel_num), nn.BatchNorm2d(channel_num))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.block(x) + x)


class CANet(nn.Module):
    """Conditioning augmentation: ``forward(text_embedding) -> (c_code, mu, logvar)``."""

    def __init__(self, text_dim: int = 1024, condition_dim: int = 128):
        super().__init__()
        self.t_dim, self.c_dim = text_dim, condition_dim
        self.fc = nn.Linear(text_dim, condition_dim * 2, bias=True)
        self.relu = nn.ReLU()

    def encode(self, text_embedding):
        if text_embedding.dim() != 2 or text_embedding.size(1) != self.t_dim:
            raise ValueError(f"StackGAN: expected text embeddings of shape (N, {self.t_dim}) (text_dim), got "
                             f"{tuple(text_embedding.shape)}")
        x = self.relu(self.fc(text_embedding))
        return x[:, :self.c_dim], x[:, self.c_dim:]

    @staticmethod
    def reparametrize(mu, logvar):
        std = logvar.mul(0.5).exp()
        # the reference's eps: a float32 (torch.FloatTensor / cuda.FloatTensor) .normal_() whatever
        # std's dtype; the same draws as its in every dtype (an fp64 draw is another sequence)
        eps = torch.randn(std.shape, dtype=torch.float32, device=std.device)
        return eps.to(std.dtype).mul(std).add(mu)

    def forward(self, text_embedding):
        mu, logvar = self.encode(text_embedding)
        return self.reparametrize(mu, logvar), mu, logvar


class DGetLogits(nn.Module):
    """Reference D_GET_LOGITS: (conditional) 4x4 logits head ending in a sigmoid."""

    def __init__(self, ndf: int, nef: int, bcondition: bool = True):
        super().__init__()
        self.df_dim, self.ef_dim, self.bcondition = ndf, nef, bcondition
        if bcondition:
            self.outlogits = nn.Sequential(conv3x3(ndf * 8 + nef, ndf * 8), nn.BatchNorm2d(ndf * 8),
                                           nn.LeakyReLU(0.2, inplace=True),
                                           nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=4), nn.Sigmoid())
        else:
            self.outlogits = nn.Sequential(nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=4), nn.Sigmoid())

    def forward(self, h_code, c_code=None):
        if self.bcondition and c_code is not None:
            c_code = c_code.view(-1, self.ef_dim, 1, 1).repeat(1, 1, 4, 4)
            h_code = torch.cat((h_code, c_code), 1)
        return self.outlogits(h_code).view(-1)


class Stage1Generator(nn.Module):
    """Reference STAGE1_G: text embedding + noise -> 64x64 image.
    ``forward(text_embedding, noise) -> (None, fake_img, mu, logvar)`` as the reference."""

    def __init__(self, gf_dim: int = 128, condition_dim: int = 128, text_dim: int = 1024, z_dim: int = 100,
                 init_type: str | None = "stackgan", fused: bool = True):
        super().__init__()
        check_positive("Stage1Generator", gf_dim=gf_dim, condition_dim=condition_dim, text_dim=text_dim, z_dim=z_dim)
        if gf_dim * 8 % 16:
            raise ValueError(f"Stage1Generator: gf_dim must be a multiple of 2, got {gf_dim}")
        self.gf_dim, self.ef_dim, self.z_dim = gf_dim * 8, condition_dim, z_dim
        ngf = self.gf_dim
        self.ca_net = CANet(text_dim, condition_dim)
        self.fc = nn.Sequential(nn.Linear(z_dim + condition_dim, ngf * 4 * 4, bias=False), nn.BatchNorm1d(ngf * 4 * 4),
                                nn.ReLU(True))
        self.upsample1 = up_block(ngf, ngf // 2)
        self.upsample2 = up_block(ngf // 2, ngf // 4)
        self.upsample3 = up_block(ngf // 4, ngf // 8)
        self.upsample4 = up_block(ngf // 8, ngf // 16)
        self.img = nn.Sequential(conv3x3(ngf // 16, 3), nn.Tanh())
        _init(self, init_type)
        finish(self, fused)

    def forward(self, text_embedding, noise):
        c_code, mu, logvar = self.ca_net(text_embedding)
        h = self.fc(torch.cat((noise, c_code), 1)).view(-1, self.gf_dim, 4, 4)
        h = self.upsample4(self.upsample3(self.upsample2(self.upsample1(h))))
        return None, self.img(h), mu, logvar


def _encode_img(ndf: int, stage: int) -> nn.Sequential:
    # stage 1: 64 -> 4 (ndf*8); stage 2: 256 -> 4 (ndf*32) then two conv3x3 back to ndf*8
    layers = [nn.Conv2d(3, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
    mults = [1, 2, 4, 8] if stage == 1 else [1, 2, 4, 8, 16, 32]
    for a, b in zip(mults[:-1], mults[1:]):
        layers += [nn.Conv2d(ndf * a, ndf * b, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * b),
                   nn.LeakyReLU(0.2, inplace=True)]
    if stage == 2:
        layers += [conv3x3(ndf * 32, ndf * 16), nn.BatchNorm2d(ndf * 16), nn.LeakyReLU(0.2, inplace=True),
                   conv3x3(ndf * 16, ndf * 8), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True)]
    return nn.Sequential(*layers)


class _StageDiscriminator(nn.Module):
    STAGE = 1

    def __init__(self, df_dim: int = 64, condition_dim: int = 128, init_type: str | None = "stackgan",
                 fused: bool = True):
        super().__init__()
        check_positive(type(self).__name__, df_dim=df_dim, condition_dim=condition_dim)
        self.df_dim, self.ef_dim = df_dim, condition_dim
        self.encode_img = _encode_img(df_dim, self.STAGE)
        self.get_cond_logits = DGetLogits(df_dim, condition_dim, bcondition=True)
        self.get_uncond_logits = None if self.STAGE == 1 else DGetLogits(df_dim, condition_dim, bcondition=False)
        _init(self, init_type)
        finish(self, fused)

    def forward(self, image):
        """Image features (N, df_dim*8, 4, 4); the heads are ``get_cond_logits`` /
        ``get_uncond_logits``, as in the reference."""
        return self.encode_img(image)


class Stage1Discriminator(_StageDiscriminator):
    """Reference STAGE1_D (64x64 images)."""
    STAGE = 1


class Stage2Discriminator(_StageDiscriminator):
    """Reference STAGE2_D (256x256 images; conditional and unconditional heads)."""
    STAGE = 2


class Stage2Generator(nn.Module):
    """Reference STAGE2_G: refines the (frozen) Stage-I image to 256x256.
    ``forward(text_embedding, noise) -> (stage1_img, fake_img, mu, logvar)``."""

    def __init__(self, stage1: Stage1Generator | None = None, gf_dim: int = 128, condition_dim: int = 128,
                 text_dim: int = 1024, z_dim: int = 100, r_num: int = 4, init_type: str | None = "stackgan",
                 fused: bool = True):
        super().__init__()
        check_positive("Stage2Generator", gf_dim=gf_dim, condition_dim=condition_dim, text_dim=text_dim, z_dim=z_dim)
        if not isinstance(r_num, int) or r_num < 0:
            raise ValueError(f"Stage2Generator: r_num must be an int >= 0, got {r_num!r}")
        if stage1 is None:
            # built unfused and uninitialised: the whole tree is initialised below, as the
            # reference applies weights_init to STAGE2_G(STAGE1_G())
            stage1 = Stage1Generator(gf_dim, condition_dim, text_dim, z_dim, init_type=None, fused=False)
        self.gf_dim, self.ef_dim, self.z_dim = gf_dim, condition_dim, z_dim
        self.STAGE1_G = stage1
        for p in self.STAGE1_G.parameters():  # Stage-I is fixed while training Stage-II
            p.requires_grad = False
        ngf = gf_dim
        self.ca_net = CANet(text_dim, condition_dim)
        self.encoder = nn.Sequential(
            conv3x3(3, ngf), nn.ReLU(True),
            nn.Conv2d(ngf, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.Conv2d(ngf * 2, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True))
        self.hr_joint = nn.Sequential(conv3x3(condition_dim + ngf * 4, ngf * 4), nn.BatchNorm2d(ngf * 4), nn.ReLU(True))
        self.residual = nn.Sequential(*[ResBlock(ngf * 4) for _ in range(r_num)])
        self.upsample1 = up_block(ngf * 4, ngf * 2)
        self.upsample2 = up_block(ngf * 2, ngf)
        self.upsample3 = up_block(ngf, ngf // 2)
        self.upsample4 = up_block(ngf // 2, ngf // 4)
        self.img = nn.Sequential(conv3x3(ngf // 4, 3), nn.Tanh())
        _init(self, init_type)
        finish(self, fused)

    def forward(self, text_embedding, noise):
        _, stage1_img, _, _ = self.STAGE1_G(text_embedding, noise)
        stage1_img = stage1_img.detach()
        encoded = self.encoder(stage1_img)
        c_code, mu, logvar = self.ca_net(text_embedding)
        c_code = c_code.view(-1, self.ef_dim, 1, 1).repeat(1, 1, encoded.size(2), encoded.size(3))
        h = self.residual(self.hr_joint(torch.cat([encoded, c_code], 1)))
        h = self.upsample4(self.upsample3(self.upsample2(self.upsample1(h))))
        return stage1_img, self.img(h), mu, logvar
