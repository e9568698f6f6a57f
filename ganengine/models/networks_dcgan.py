"""DCGAN networks (reference: pytorch/examples ``dcgan/main.py``) on the fused ops.

The reference classes read the globals ``nz``, ``ngf``, ``ndf``, ``nc``; here they are constructor
arguments of the same names. Module trees are the reference's (``main`` Sequential, the same
indices, so the same state_dict keys), convolutions have no bias, the generator takes z as
(N, nz, 1, 1) and makes (N, nc, 64, 64) images, the discriminator returns
``sigmoid(...).view(-1, 1).squeeze(1)`` (N,) probabilities. ``init_type="dcgan"`` applies the
reference's ``weights_init`` (conv weights N(0, 0.02), batch-norm weights N(1, 0.02), biases 0).

Fused (default): BatchNorm2d -> ReLU / LeakyReLU pairs run as one ``BatchNormAct2d``, the first
discriminator conv and its LeakyReLU as one ``Conv2dAct``, the other convolutions as
``ganengine.nn.Conv2d`` / ``ConvTranspose2d``, whose router picks the GEMM form or oneDNN per call
(``every_conv``); keys unchanged.
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


# Where the fused networks switch their activations to channels_last on the CPU (index into
# ``main``; None: never). oneDNN's 4x4 stride-2 (transposed) convolutions take NCHW activations
# through a reorder and, for the transposed ones, a full copy of the output (``contiguous()``
# inside PyTorch's transposed conv); in channels_last they run directly. Measured at the
# reference setting (batch 64, 64x64, 1 thread, interleaved, under load): fwd+bwd of G's
# transposed convs 256->128 (8x8 in) 240 -> 213 ms, 128->64 299 -> 245 ms, 64->3 135 -> 85 ms, but
# its 512->256 on the 4x4 map 349 -> 388 ms; the whole step 1.02-1.05x -> 1.10-1.13x the eager
# reference's. So G switches at its second transposed conv (index 3, the 4x4 -> 8x8 one, where
# the next three win) and D at its input. The networks' inputs and outputs stay NCHW (G's output
# is made contiguous: one 3-channel copy); parameters keep their layout (oneDNN reorders the
# weights, a few MB per call). GPUs keep NCHW (cuDNN's choice for fp32 is not this measurement).
CHANNELS_LAST_FROM = {"G": 3, "D": 0}


def run_sequential(seq: nn.Sequential, x: torch.Tensor, channels_last_from: int | None) -> torch.Tensor:
    """``seq(x)``, with the activations in channels_last from ``seq[channels_last_from]`` on when
    ``x`` is on the CPU (the same function; oneDNN's rounding may differ in the last bits)."""
    if channels_last_from is None or x.device.type != "cpu":
        return seq(x)
    for index, layer in enumerate(seq):
        if index == channels_last_from:
            x = x.contiguous(memory_format=torch.channels_last)
        x = layer(x)
    return x


def every_conv(conv, seq, index) -> bool:
    """finish_synthesis's selection: every convolution on ganengine's conv ops, whose router
    (csrc/cpu/conv_route.cpp) picks the strategy per call: on the CPU at the reference setting the
    GEMM form for G's first transposed conv (1x1 input), D's last conv (4x4 -> 1x1) and, on
    channels_last activations, the two layers between the 4x4 and 8x8 maps (D's 256 -> 512 conv,
    G's 512 -> 256 transposed conv: 1.5x oneDNN fwd+bwd, benchmarks/bench_conv.py --shapes dcgan
    --layout channels_last) and G's 64 -> 3 image layer; oneDNN (cuDNN on GPUs) for the rest,
    through the same at::convolution eager calls. At --quick's widths most layers take the GEMM form."""
    return True


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
        finish_synthesis(self, fused, ganengine_conv=every_conv)
        self.channels_last_from = CHANNELS_LAST_FROM["G"] if fused else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4 or input.shape[1] != self.nz:
            raise ValueError(f"DCGANGenerator: expected noise of shape (N, {self.nz}, 1, 1) (nz={self.nz}), got "
                             f"{tuple(input.shape)}")
        return run_sequential(self.main, input, self.channels_last_from).contiguous()


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
        # (the first conv + LeakyReLU as ganengine's fused op: it beats oneDNN + LeakyReLU there)
        finish_synthesis(self, fused, ganengine_conv=every_conv)
        self.channels_last_from = CHANNELS_LAST_FROM["D"] if fused else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4 or input.shape[1] != self.nc:
            raise ValueError(f"DCGANDiscriminator: expected images of shape (N, {self.nc}, 64, 64) (nc={self.nc}), "
                             f"got {tuple(input.shape)}")
        return run_sequential(self.main, input, self.channels_last_from).reshape(-1, 1).squeeze(1)


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
