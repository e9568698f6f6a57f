"""pix2pix / CycleGAN networks with the reference module trees, running on the fused ops.

Reference: junyanz/pytorch-CycleGAN-and-pix2pix ``models/networks.py``. Each class builds the
exact reference layer list (same ``nn.Sequential`` indices and attribute names, hence the same
state_dict keys and parameter counts), applies the reference initialisation (``init_type``,
``init_gain``; "normal" 0.02 by default) on that tree, and then rewrites itself with
``ganengine.fuse`` (``fused=True``) so InstanceNorm->ReLU and Conv->LeakyReLU pairs run as one op.
Because the reference tree is built first with the reference layer order, the same seed gives
the same initial weights as the reference code. The U-Net's batch norms, whose activations sit in
the neighbouring blocks, run fused in its own forward (``UnetSkipConnectionBlock._forward_fused``).

Optional SAGAN attention (``attention_scale``): a ``SelfAttention2d`` block on the feature map
downsampled by that factor (generators: on the decoder side). Its keys (``attn.*``) extend the
reference's; all reference keys stay as they are.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import init

from ganengine.models._common import (check_attention_scale, check_positive, finish, make_attention,
                                      run_with_attention)
from ganengine.nn.patch_discriminator import batch_norm2d_act, is_fusable_batch_norm, plain

NORMS = ("batch", "instance", "none")
INIT_TYPES = ("normal", "xavier", "kaiming", "orthogonal")


def get_norm_layer(norm: str = "instance"):
    """``norm`` -> a constructor ``f(num_features) -> nn.Module``, as the reference's get_norm_layer.

    "batch": BatchNorm2d(affine, running stats); "instance": InstanceNorm2d without affine and
    without running stats (the current reference); "none": Identity (and, as in the reference,
    convolutions without bias).
    """
    if norm == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if norm == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if norm == "none":
        return lambda num_features: nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _use_bias(norm: str) -> bool:
    # the reference: conv bias only with instance norm (batch norm has its own shift; with
    # norm "none" its check also yields False)
    return norm == "instance"


def init_weights(net: nn.Module, init_type: str = "normal", init_gain: float = 0.02) -> nn.Module:
    """The reference initialisation: conv/linear weights from ``init_type`` (bias 0), BatchNorm2d
    weight N(1, init_gain) and bias 0. Matches modules by class name as the reference does, so it
    visits (and draws random numbers for) exactly the same modules in the same order."""
    if init_type not in INIT_TYPES:
        raise ValueError(f"init_type must be one of {INIT_TYPES}, got {init_type!r}")

    def init_func(m):
        classname = m.__class__.__name__
        weight = getattr(m, "weight", None)
        if weight is not None and ("Conv" in classname or "Linear" in classname):
            if init_type == "normal":
                init.normal_(weight.data, 0.0, init_gain)
            elif init_type == "xavier":
                init.xavier_normal_(weight.data, gain=init_gain)
            elif init_type == "kaiming":
                init.kaiming_normal_(weight.data, a=0, mode="fan_in")
            else:
                init.orthogonal_(weight.data, gain=init_gain)
            if getattr(m, "bias", None) is not None:
                init.constant_(m.bias.data, 0.0)
        elif "BatchNorm2d" in classname:
            init.normal_(m.weight.data, 1.0, init_gain)
            init.constant_(m.bias.data, 0.0)

    net.apply(init_func)
    return net


def _maybe_init(net, init_type, init_gain):
    if init_type is not None:  # None: keep PyTorch's default init (e.g. before loading weights)
        init_weights(net, init_type, init_gain)


class ResnetBlock(nn.Module):
    """Reference ResnetBlock: ``x + conv_block(x)``; conv_block = pad, conv, norm, ReLU,
    [Dropout(0.5)], pad, conv, norm."""

    def __init__(self, dim: int, padding_type: str, norm: str, use_dropout: bool, use_bias: bool):
        super().__init__()
        if padding_type not in ("reflect", "replicate", "zero"):
            raise ValueError(f"padding_type must be 'reflect', 'replicate' or 'zero', got {padding_type!r}")
        norm_layer = get_norm_layer(norm)
        layers = []
        for second in (False, True):
            p = 0
            if padding_type == "reflect":
                layers.append(nn.ReflectionPad2d(1))
            elif padding_type == "replicate":
                layers.append(nn.ReplicationPad2d(1))
            else:
                p = 1
            layers += [nn.Conv2d(dim, dim, kernel_size=3, padding=p, bias=use_bias), norm_layer(dim)]
            if not second:
                layers.append(nn.ReLU(True))
                if use_dropout:
                    layers.append(nn.Dropout(0.5))
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's generator: c7s1-ngf, two stride-2 downsamplings, ``n_blocks`` residual blocks,
    two transposed-conv upsamplings, c7s1-output_nc + tanh (reflection padding)."""

    def __init__(self, input_nc: int = 3, output_nc: int = 3, ngf: int = 64, norm: str = "instance",
                 use_dropout: bool = False, n_blocks: int = 9, padding_type: str = "reflect",
                 init_type: str | None = "normal", init_gain: float = 0.02, fused: bool = True,
                 attention_scale: int | None = None):
        super().__init__()
        check_positive("ResnetGenerator", input_nc=input_nc, output_nc=output_nc, ngf=ngf)
        if not isinstance(n_blocks, int) or n_blocks < 0:
            raise ValueError(f"ResnetGenerator: n_blocks must be an int >= 0, got {n_blocks!r}")
        self.input_nc, self.output_nc, self.ngf = input_nc, output_nc, ngf
        norm_layer, use_bias = get_norm_layer(norm), _use_bias(norm)
        model = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, kernel_size=7, padding=0, bias=use_bias),
                 norm_layer(ngf), nn.ReLU(True)]
        for i in range(2):
            mult = 2 ** i
            model += [nn.Conv2d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1, bias=use_bias),
                      norm_layer(ngf * mult * 2), nn.ReLU(True)]
        model += [ResnetBlock(ngf * 4, padding_type, norm, use_dropout, use_bias) for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            model += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, kernel_size=3, stride=2, padding=1,
                                         output_padding=1, bias=use_bias),
                      norm_layer(ngf * mult // 2), nn.ReLU(True)]
        model += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, kernel_size=7, padding=0), nn.Tanh()]
        self.model = nn.Sequential(*model)
        _maybe_init(self, init_type, init_gain)

        # attention on the decoder side: after the residual blocks (x4), after each upsampling
        first_up = 10 + n_blocks
        where = {4: (first_up, ngf * 4), 2: (first_up + 3, ngf * 2), 1: (first_up + 6, ngf)}
        check_attention_scale("ResnetGenerator", attention_scale, where)
        self.attention_scale = attention_scale
        self.attn = None
        if attention_scale is not None:
            self._attn_index, channels = where[attention_scale]
            self.attn = make_attention(channels)
            _maybe_init(self.attn, init_type, init_gain)
        finish(self, fused)

    def forward(self, x):
        if self.attn is None:
            return self.model(x)
        return run_with_attention(self.model, x, self._attn_index, self.attn)


class UnetSkipConnectionBlock(nn.Module):
    """Reference U-Net block: ``cat([x, model(x)])`` (the outermost block returns ``model(x)``).

    model = [LeakyReLU, downconv, downnorm, submodule, ReLU, upconv, upnorm, (Dropout)]; the
    innermost block has no downnorm and no submodule, the outermost no activation or norm before
    the downconv and ends with tanh. The nesting gives the keys ``model.model.1.model.3....``."""

    def __init__(self, outer_nc: int, inner_nc: int, input_nc: int | None = None,
                 submodule: nn.Module | None = None, outermost: bool = False, innermost: bool = False,
                 norm: str = "batch", use_dropout: bool = False):
        super().__init__()
        self.outermost = outermost
        norm_layer, use_bias = get_norm_layer(norm), _use_bias(norm)
        if input_nc is None:
            input_nc = outer_nc
        downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
        downrelu = nn.LeakyReLU(0.2, True)
        downnorm = norm_layer(inner_nc)
        uprelu = nn.ReLU(True)
        upnorm = norm_layer(outer_nc)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1)
            model = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            model = [downrelu, downconv, uprelu, upconv, upnorm]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            model = [downrelu, downconv, downnorm, submodule, uprelu, upconv, upnorm]
            if use_dropout:  # the reference's pix2pix dropout: after upnorm, in train mode only
                model.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*model)
        self.attn = None  # optional SAGAN block on model(x), set by UnetGenerator

    def forward(self, x):
        y = self.model(x)
        if self.attn is not None:
            y = self.attn(y)
        if self.outermost:
            return y
        return torch.cat([x, y], 1)

    # ------------------------------------------------------------------ the fused walk
    def _leads_with_inplace_leaky(self) -> bool:
        """Whether this block starts with an in-place LeakyReLU that a parent may run fused with
        the op before it (then ``_forward_fused(x, activated=True)``): only an in-place one, since
        the reference's skip connection carries the activated values because the activation
        overwrote ``x``; with an out-of-place one the skip would carry ``x`` itself."""
        if type(self) is not UnetSkipConnectionBlock or self.outermost or not (plain(self) and plain(self.model)):
            return False
        first = self.model[0] if len(self.model) else None
        return type(first) is nn.LeakyReLU and first.inplace and plain(first)

    def _forward_fused(self, x: torch.Tensor, activated: bool = False, relu_out: bool = False) -> torch.Tensor:
        """The reference forward (``relu(forward(x))`` when ``relu_out``) with every batch norm run
        as one ``batch_norm_act`` call together with the activation after it. In the reference:

        * a block's leading LeakyReLU(0.2, inplace) overwrites its input, which is the parent's
          downnorm output (or the outermost downconv's), so the skip half of ``cat([x, y])`` and
          the downconv both read ``leaky(z)``: the parent runs ``batch_norm_act(leaky_relu)`` and
          passes the result with ``activated=True``;
        * the parent's ReLU(inplace) after the submodule acts on this block's ``cat([x, y])``:
          ``relu(cat([x, y])) = cat([relu(x), relu(y)])``, so with ``relu_out`` the upnorm runs as
          ``batch_norm_act(relu)`` and only the skip half gets a separate ReLU. Dropout(0.5)
          after the upnorm scales by exactly 0 or 2, which commutes with relu bit for bit (same
          mask draws, same order).
        Anything else (other norms, hooks, a module swapped in) runs as its module, in order.
        """
        mods = list(self.model)
        n = len(mods)
        i = 1 if activated else 0  # activated: the leading LeakyReLU already ran (in the parent)
        h = x
        h_relu = False  # whether h is already relu'd (the upnorm ran fused with relu_out's ReLU)
        while i < n:
            m = mods[i]
            nxt = mods[i + 1] if i + 1 < n else None
            if type(m) is UnetSkipConnectionBlock and plain(m) and plain(m.model):
                take_relu = type(nxt) is nn.ReLU and plain(nxt)
                h = m._forward_fused(h, False, take_relu)
                i += 2 if take_relu else 1
                continue
            if is_fusable_batch_norm(m):
                if isinstance(nxt, UnetSkipConnectionBlock) and nxt._leads_with_inplace_leaky():
                    # downnorm + the child's in-place LeakyReLU
                    h = batch_norm2d_act(m, h, "leaky_relu", nxt.model[0].negative_slope)
                    h = nxt._forward_fused(h, True, self._relu_follows(mods, i + 1))
                    i += 3 if self._relu_follows(mods, i + 1) else 2
                    continue
                tail = mods[i + 1:]
                if (relu_out and not self.outermost and self.attn is None
                        and all(type(d) is nn.Dropout and plain(d) for d in tail)):
                    # upnorm (+ dropout) + the parent's ReLU
                    h = batch_norm2d_act(m, h, "relu")
                    for d in tail:
                        h = d(h)
                    h_relu = True
                    break
                h = batch_norm2d_act(m, h, "none")
                i += 1
                continue
            # convs run as their modules (the Winograd / GEMM routes): the outermost downconv ->
            # child's LeakyReLU and the innermost downconv -> ReLU as one conv2d_act (oneDNN + the
            # act in its epilogue) measured 0.56-0.85x and 0.95-1.00x of conv + in-place act
            h = m(h)
            i += 1
        if self.attn is not None:
            h = self.attn(h)
        if self.outermost:
            return torch.relu_(h) if relu_out else h
        if not relu_out:
            return torch.cat([x, h], 1)
        if h_relu:
            return torch.cat([torch.relu(x), h], 1)
        return torch.relu_(torch.cat([x, h], 1))

    @staticmethod
    def _relu_follows(mods, i: int) -> bool:
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        return type(nxt) is nn.ReLU and plain(nxt)


class UnetGenerator(nn.Module):
    """pix2pix's U-Net: ``num_downs`` stride-2 downsamplings (8 for unet_256, 7 for unet_128) with
    skip connections; ``use_dropout`` puts Dropout(0.5) in the ``num_downs - 5`` innermost
    ngf*8 decoder blocks (not the innermost one), as the reference does.

    With ``fused`` every batch norm runs as one ``batch_norm_act`` call with the activation after
    it (see ``UnetSkipConnectionBlock._forward_fused``); ``fused_batch_norm = False`` on the
    instance runs the reference's module-by-module forward instead (same numbers)."""

    def __init__(self, input_nc: int = 3, output_nc: int = 3, num_downs: int = 8, ngf: int = 64,
                 norm: str = "batch", use_dropout: bool = False, init_type: str | None = "normal",
                 init_gain: float = 0.02, fused: bool = True, attention_scale: int | None = None):
        super().__init__()
        check_positive("UnetGenerator", input_nc=input_nc, output_nc=output_nc, ngf=ngf)
        if not isinstance(num_downs, int) or num_downs < 5:
            raise ValueError(f"UnetGenerator: num_downs must be an int >= 5, got {num_downs!r}")
        block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, submodule=None, norm=norm, innermost=True)
        blocks = [block]
        for _ in range(num_downs - 5):
            block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, submodule=block, norm=norm, use_dropout=use_dropout)
            blocks.append(block)
        for outer, inner in ((ngf * 4, ngf * 8), (ngf * 2, ngf * 4), (ngf, ngf * 2)):
            block = UnetSkipConnectionBlock(outer, inner, submodule=block, norm=norm)
            blocks.append(block)
        self.model = UnetSkipConnectionBlock(output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True,
                                             norm=norm)
        _maybe_init(self, init_type, init_gain)

        # block at depth d (outermost d=0) sees its input at downsampling factor 2**d; attention
        # acts on its decoder output (before the skip concatenation), which has outer_nc channels
        depth_blocks = list(reversed(blocks))  # depth 1 .. num_downs - 1
        where = {2 ** (d + 1): b for d, b in enumerate(depth_blocks)}
        check_attention_scale("UnetGenerator", attention_scale, where)
        self.attention_scale = attention_scale
        if attention_scale is not None:
            target = where[attention_scale]
            channels = next(m for m in reversed(target.model) if isinstance(m, nn.ConvTranspose2d)).out_channels
            target.attn = make_attention(channels)
            _maybe_init(target.attn, init_type, init_gain)
        finish(self, fused)
        # fused: every batch norm runs as one batch_norm_act call with the activation after it,
        # which in this tree sits in another block (UnetSkipConnectionBlock._forward_fused)
        self.fused_batch_norm = fused

    def forward(self, x):
        if self.fused_batch_norm and type(self.model) is UnetSkipConnectionBlock and plain(self.model):
            return self.model._forward_fused(x)
        return self.model(x)


class PixelDiscriminator(nn.Module):
    """Reference 1x1 PixelGAN discriminator (``netD pixel``)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, norm: str = "batch", init_type: str | None = "normal",
                 init_gain: float = 0.02, fused: bool = True):
        super().__init__()
        check_positive("PixelDiscriminator", input_nc=input_nc, ndf=ndf)
        norm_layer, use_bias = get_norm_layer(norm), _use_bias(norm)
        self.net = nn.Sequential(
            nn.Conv2d(input_nc, ndf, kernel_size=1, stride=1, padding=0), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, kernel_size=1, stride=1, padding=0, bias=use_bias), norm_layer(ndf * 2),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, 1, kernel_size=1, stride=1, padding=0, bias=use_bias))
        _maybe_init(self, init_type, init_gain)
        finish(self, fused)

    def forward(self, x):
        return self.net(x)


def patch_discriminator(input_nc: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "instance",
                        init_type: str | None = "normal", init_gain: float = 0.02, fused: bool = True) -> nn.Module:
    """``ganengine.nn.PatchDiscriminator`` (the reference NLayerDiscriminator) with the reference
    initialisation applied, as the reference's define_D does."""
    from ganengine.nn import PatchDiscriminator

    net = PatchDiscriminator(input_nc, ndf=ndf, n_layers=n_layers, norm=norm, fused=fused)
    if init_type is not None:
        # draw in the reference's (contiguous) element order, so a seed gives the reference's
        # weights, then go back to the layout the module keeps its weights in (channels_last)
        layout = torch.channels_last if getattr(net, "channels_last", False) else torch.contiguous_format
        net.to(memory_format=torch.contiguous_format)
        init_weights(net, init_type, init_gain)
        net.to(memory_format=layout)
    # PatchDiscriminator's own forward runs its conv blocks on the fused ops (conv+IN+act in one
    # op, which the generic pair rules would split); fused=False runs the plain layers
    return net


GENERATORS = ("resnet_9blocks", "resnet_6blocks", "unet_256", "unet_128")
DISCRIMINATORS = ("basic", "n_layers", "pixel")


def define_G(input_nc: int, output_nc: int, ngf: int, netG: str, norm: str = "batch", use_dropout: bool = False,
             init_type: str | None = "normal", init_gain: float = 0.02, fused: bool = True,
             attention_scale: int | None = None) -> nn.Module:
    """The reference's define_G (without device placement): a generator by ``--netG`` name."""
    common = dict(ngf=ngf, norm=norm, use_dropout=use_dropout, init_type=init_type, init_gain=init_gain,
                  fused=fused, attention_scale=attention_scale)
    if netG in ("resnet_9blocks", "resnet_6blocks"):
        return ResnetGenerator(input_nc, output_nc, n_blocks=9 if netG == "resnet_9blocks" else 6, **common)
    if netG in ("unet_256", "unet_128"):
        return UnetGenerator(input_nc, output_nc, 8 if netG == "unet_256" else 7, **common)
    raise ValueError(f"netG must be one of {GENERATORS}, got {netG!r}")


def define_D(input_nc: int, ndf: int, netD: str, n_layers_D: int = 3, norm: str = "batch",
             init_type: str | None = "normal", init_gain: float = 0.02, fused: bool = True) -> nn.Module:
    """The reference's define_D: "basic" (70x70 PatchGAN, 3 layers), "n_layers", "pixel"."""
    if netD in ("basic", "n_layers"):
        return patch_discriminator(input_nc, ndf, 3 if netD == "basic" else n_layers_D, norm=norm,
                                   init_type=init_type, init_gain=init_gain, fused=fused)
    if netD == "pixel":
        return PixelDiscriminator(input_nc, ndf, norm=norm, init_type=init_type, init_gain=init_gain, fused=fused)
    raise ValueError(f"netD must be one of {DISCRIMINATORS}, got {netD!r}")
