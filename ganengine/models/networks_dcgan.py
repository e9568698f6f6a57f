"""DCGAN networks (reference: pytorch/examples ``dcgan/main.py``) on the fused ops.

The reference classes read the globals ``nz``, ``ngf``, ``ndf``, ``nc``; here they are constructor
arguments of the same names. Module trees are the reference's (``main`` Sequential, the same
indices, so the same state_dict keys), convolutions have no bias, the generator takes z as
(N, nz, 1, 1) and makes (N, nc, 64, 64) images, the discriminator returns
``sigmoid(...).view(-1, 1).squeeze(1)`` (N,) probabilities. ``init_type="dcgan"`` applies the
reference's ``weights_init`` (conv weights N(0, 0.02), batch-norm weights N(1, 0.02), biases 0).

Fused (default): BatchNorm2d -> ReLU / LeakyReLU pairs run as one ``BatchNormAct2d``, the first
discriminator conv and its LeakyReLU as one ``Conv2dAct``, the generator's first transposed conv
(on a 1x1 input) on ganengine's GEMM form, the other convolutions on oneDNN / cuDNN
(``synthesis_layers``); keys unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from ganengine.models._common import check_positive
from ganengine.models.synthesis_layers import finish_synthesis


def weights_init(m: nn.Module) -> None:
    """The reference's custom init, by class name."""
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def _init(net: nn.Module, init_type) -> None:
    if init_type == "dcgan":
        net.apply(weights_init)
    elif init_type is not None:
        raise ValueError(f"init_type must be 'dcgan' (the reference weights_init) or None (PyTorch default), "
                         f"got {init_type!r}")


class DCGANGenerator(nn.Module):
    """Reference ``Generator``: (N, nz, 1, 1) noise -> (N, nc, 64, 64) images in [-1, 1]."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3, init_type: str | None = "dcgan",
                 fused: bool = True):
        super().__init__()
        check_positive("DCGANGenerator", nz=nz, ngf=ngf, nc=nc)
        self.nz = nz
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())
        _init(self, init_type)
        # ganengine's conv op for the first layer only: its GEMM form on the 1x1 input beats oneDNN
        finish_synthesis(self, fused, ganengine_conv=lambda conv, seq, index: index == 0)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4 or input.shape[1] != self.nz:
            raise ValueError(f"DCGANGenerator: expected noise of shape (N, {self.nz}, 1, 1) (nz={self.nz}), got "
                             f"{tuple(input.shape)}")
        return self.main(input)


class DCGANDiscriminator(nn.Module):
    """Reference ``Discriminator``: (N, nc, 64, 64) images -> (N,) probabilities."""

    def __init__(self, ndf: int = 64, nc: int = 3, init_type: str | None = "dcgan", fused: bool = True):
        super().__init__()
        check_positive("DCGANDiscriminator", ndf=ndf, nc=nc)
        self.nc = nc
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid())
        _init(self, init_type)
        # the first conv + LeakyReLU as ganengine's fused op (it beats oneDNN + LeakyReLU there)
        finish_synthesis(self, fused, ganengine_conv=lambda conv, seq, index: index == 0)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4 or input.shape[1] != self.nc:
            raise ValueError(f"DCGANDiscriminator: expected images of shape (N, {self.nc}, 64, 64) (nc={self.nc}), "
                             f"got {tuple(input.shape)}")
        return self.main(input).view(-1, 1).squeeze(1)


# ----------------------------------------------------------------------------- reference checkpoints
# arch -> (defaults of the reference's architecture globals, builder, infer): registered by
# ganengine/models/checkpoints.py. Both archs take all four globals, as the reference script has them.
_ARGS = dict(nz=100, ngf=64, ndf=64, nc=3)


def _builder(cls, names):
    def build(args, fused=True, init_type="default"):
        return cls(**{k: args[k] for k in names}, init_type="dcgan" if init_type == "default" else init_type,
                   fused=fused)
    return build


def _infer_g(sd):
    w, last = sd["main.0.weight"], sd["main.12.weight"]
    return "dcgan_G", dict(nz=w.shape[0], ngf=w.shape[1] // 8, nc=last.shape[1])


def _infer_d(sd):
    w = sd["main.0.weight"]
    return "dcgan_D", dict(ndf=w.shape[0], nc=w.shape[1])


SPECS = {
    "dcgan_G": (dict(_ARGS), _builder(DCGANGenerator, ("nz", "ngf", "nc")), _infer_g),
    "dcgan_D": (dict(_ARGS), _builder(DCGANDiscriminator, ("ndf", "nc")), _infer_d),
}
