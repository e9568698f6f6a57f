"""BigGAN generator and discriminator (ajbrock/BigGAN-PyTorch ``BigGAN.py``) on ganengine's ops.

Constructor arguments are the reference's, with its defaults (``G_ch=64, dim_z=128,
bottom_width=4, resolution=128, G_attn='64', n_classes=1000, num_G_SVs=1, num_G_SV_itrs=1,
G_shared=True, shared_dim=0, hier=False, ... G_init='ortho', G_param='SN', norm_style='bn'``);
arguments the reference takes only for its optimiser (``G_lr, G_B1, ...``) are accepted and
ignored, as are unknown keyword arguments (the reference's ``**kwargs``: it is called with the
whole training config). Module tree, state_dict keys (``u0``/``sv0`` spectral-norm buffers,
``stored_mean``/``stored_var``), parameter counts and the initialisation drawn from a seed are
the reference's.

``G(z, y)`` takes ``y`` already embedded (``G(z, G.shared(labels))``, as the reference's G_D
does); with ``hier=True`` z is split into ``len(blocks) + 1`` equal chunks, the first feeds the
linear layer and block i gets ``cat([y, chunk_i+1])``. ``D(x, y)`` returns
``linear(h) + sum(embed(y) * h)`` with ``h`` the ReLU'd features summed over H and W.

``unconditional=True`` is boschresearch/unetgan's unconditional generator (its recipes' setting;
needs ``hier`` and no ``G_shared``, the only combination the reference runs): the full z (dim_z
not rounded) feeds the linear layer and every block's self-modulated ccbn (gain and bias
Linear-ReLU-Linear MLPs of z); ``y`` is ignored. ``G_shared=None`` (default) is the reference's
True, False with ``unconditional=True``.

``fused=True`` (default) runs the same function on ganengine's ops (see layers_biggan.py and
docs/synthesis_attention.md); ``fused=False`` is the reference composition.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ganengine.models import layers_biggan as L

_G_MULTS = {  # resolution -> (in multipliers, out multipliers); every block upsamples by 2
    512: ([16, 16, 8, 8, 4, 2, 1], [16, 8, 8, 4, 2, 1, 1]),
    256: ([16, 16, 8, 8, 4, 2], [16, 8, 8, 4, 2, 1]),
    128: ([16, 16, 8, 4, 2], [16, 8, 4, 2, 1]),
    64: ([16, 16, 8, 4], [16, 8, 4, 2]),
    32: ([4, 4, 4], [4, 4, 4]),
}
_D_ARCH = {  # resolution -> (in multipliers after the RGB input, out multipliers, downsample, resolutions)
    256: ([1, 2, 4, 8, 8, 16], [1, 2, 4, 8, 8, 16, 16], [True] * 6 + [False], [128, 64, 32, 16, 8, 4, 4]),
    128: ([1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 16], [True] * 5 + [False], [64, 32, 16, 8, 4, 4]),
    64: ([1, 2, 4, 8], [1, 2, 4, 8, 16], [True] * 4 + [False], [32, 16, 8, 4, 4]),
    32: ([4, 4, 4], [4, 4, 4, 4], [True, True, False, False], [16, 16, 16, 16]),
}


def attention_resolutions(attention: str, option: str) -> set[int]:
    """'32_64' -> {32, 64} (the reference's format; '0' for none); ``option``: the user's name of
    the value (G_attn / D_attn), for the error."""
    try:
        return {int(item) for item in str(attention).split("_")}
    except ValueError:
        raise ValueError(f"{option} must be resolutions joined by '_' such as '64' or '32_64' "
                         f"('0' for none), got {attention!r}") from None


def G_arch(ch=64, attention="64"):
    """The reference's ``G_arch(ch, attention)`` table."""
    want = attention_resolutions(attention, "G_attn")
    arch = {}
    for res, (ins, outs) in _G_MULTS.items():
        n = len(outs)
        resolutions = [8 * 2 ** i for i in range(n)]
        arch[res] = {"in_channels": [ch * m for m in ins], "out_channels": [ch * m for m in outs],
                     "upsample": [True] * n, "resolution": resolutions,
                     "attention": {2 ** i: 2 ** i in want for i in range(3, 3 + n)}}
    return arch


def D_arch(ch=64, attention="64"):
    """The reference's ``D_arch(ch, attention)`` table."""
    want = attention_resolutions(attention, "D_attn")
    arch = {}
    for res, (ins, outs, down, resolutions) in _D_ARCH.items():
        arch[res] = {"in_channels": [3] + [ch * m for m in ins], "out_channels": [ch * m for m in outs],
                     "downsample": down, "resolution": resolutions,
                     "attention": {2 ** i: 2 ** i in want for i in range(2, 8 if res != 64 else 7)}}
    if 32 in arch:
        arch[32]["attention"] = {2 ** i: 2 ** i in want for i in range(2, 6)}
    return arch


def check_choice(owner, name, value, choices):
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {sorted(choices)} (the reference's architectures), "
                         f"got {value!r}")


def check_activation(owner, name, act):
    if not callable(act):
        raise TypeError(f"{owner}: {name} must be a module or function such as nn.ReLU(), got {act!r}")
    return act


def sn_partials(param: str, num_svs: int, num_itrs: int, eps: float, owner: str):
    """(which_conv, which_linear) for G_param 'SN' (spectral norm) or 'None' (plain layers).

    The reference builds plain layers for any value but 'SN' (its help also names 'SVD', which it
    never implemented): a misspelt 'SN' would silently train G without spectral norm, so only
    'SN' and 'None' are taken."""
    if param == "SN":
        conv = functools.partial(L.SNConv2d, kernel_size=3, padding=1, num_svs=num_svs, num_itrs=num_itrs, eps=eps)
        linear = functools.partial(L.SNLinear, num_svs=num_svs, num_itrs=num_itrs, eps=eps)
        return conv, linear
    if param is None or param in ("None", "none"):
        return functools.partial(nn.Conv2d, kernel_size=3, padding=1), nn.Linear
    raise ValueError(f"{owner}: G_param must be 'SN' (spectral norm) or 'None' (plain layers, what the reference "
                     f"builds for any other value, 'SVD' included), got {param!r}")


def hier_z_chunk(owner: str, dim_z: int, num_slots: int, resolution: int) -> int:
    """hier=True's z entries per slot (one slot per generator block, one for the linear layer);
    an error naming dim_z where z has fewer entries than slots (a chunk of 0)."""
    chunk = dim_z // num_slots
    if chunk < 1:
        raise ValueError(f"{owner}: dim_z={dim_z} is smaller than the {num_slots} chunks hier=True splits z into at "
                         f"resolution {resolution} (one per block, one for the linear layer): give dim_z >= {num_slots}")
    return chunk


class BigGANGenerator(nn.Module):
    """The reference ``BigGAN.Generator``. ``forward(z, y)`` with ``y = G.shared(labels)``."""

    def __init__(self, G_ch=64, dim_z=128, bottom_width=4, resolution=128, G_kernel_size=3, G_attn="64",
                 n_classes=1000, num_G_SVs=1, num_G_SV_itrs=1, G_shared=None, shared_dim=0, hier=False,
                 cross_replica=False, mybn=False, G_activation=None, G_lr=5e-5, G_B1=0.0, G_B2=0.999,
                 adam_eps=1e-8, BN_eps=1e-5, SN_eps=1e-12, G_mixed_precision=False, G_fp16=False, G_init="ortho",
                 skip_init=False, no_optim=False, G_param="SN", norm_style="bn", unconditional=False, fused=True,
                 **kwargs):
        super().__init__()
        owner = "BigGANGenerator"
        check_choice(owner, "resolution", resolution, _G_MULTS)
        self.unconditional = bool(unconditional)
        if G_shared is None:  # the reference constructor's True; its unconditional G runs only without it
            G_shared = not self.unconditional
        if self.unconditional:
            check_unconditional(owner, hier, G_shared)
        self.ch, self.dim_z, self.bottom_width, self.resolution = G_ch, dim_z, bottom_width, resolution
        self.kernel_size, self.attention, self.n_classes = G_kernel_size, G_attn, n_classes
        self.G_shared = G_shared
        self.shared_dim = shared_dim if shared_dim > 0 else dim_z
        self.hier, self.cross_replica, self.mybn = hier, cross_replica, mybn
        self.activation = check_activation(owner, "G_activation", nn.ReLU(inplace=False) if G_activation is None
                                           else G_activation)
        self.init, self.G_param, self.norm_style = G_init, G_param, norm_style
        self.BN_eps, self.SN_eps, self.fp16 = BN_eps, SN_eps, G_fp16
        self.arch = G_arch(self.ch, self.attention)[resolution]
        if self.unconditional:  # every block's ccbn takes all of z (dim_z is not rounded to the slots)
            self.num_slots = len(self.arch["in_channels"]) + 1
            self.z_chunk_size = dim_z // self.num_slots  # (the reference's attribute; unused here)
        elif hier:
            if not G_shared:
                raise ValueError(f"{owner}: hier=True needs G_shared=True (the reference concatenates the shared "
                                 "embedding with each z chunk)")
            self.num_slots = len(self.arch["in_channels"]) + 1
            self.z_chunk_size = hier_z_chunk(owner, dim_z, self.num_slots, resolution)
            self.dim_z = self.z_chunk_size * self.num_slots
        else:
            self.num_slots, self.z_chunk_size = 1, 0

        self.which_conv, self.which_linear = sn_partials(G_param, num_G_SVs, num_G_SV_itrs, self.SN_eps, owner)
        self.which_embedding = nn.Embedding
        if self.unconditional:  # self-modulation: plain 2-layer MLPs of z (no spectral norm), as the reference
            bn_linear, bn_input = nn.Linear, self.dim_z
        else:
            bn_linear = functools.partial(self.which_linear, bias=False) if G_shared else self.which_embedding
            bn_input = self.shared_dim + self.z_chunk_size if G_shared else n_classes
        self.which_bn = functools.partial(L.ccbn, which_linear=bn_linear, cross_replica=cross_replica, mybn=mybn,
                                          input_size=bn_input, norm_style=norm_style, eps=BN_eps,
                                          self_modulation=self.unconditional)
        self.shared = self.which_embedding(n_classes, self.shared_dim) if G_shared else nn.Identity()
        self.linear = self.which_linear(self.dim_z if self.unconditional else self.dim_z // self.num_slots,
                                        self.arch["in_channels"][0] * self.bottom_width ** 2)
        build_generator_blocks(self, cross_replica, mybn)
        if not skip_init:
            self.param_count = L.init_weights(self, G_init)
        self.fused = bool(fused)  # (set_fused switches it too) the forward groups the SN iterations when fused
        L.set_fused(self, fused)

    def forward(self, z, y=None):
        """``y`` is the shared embedding of the labels (``G.shared(labels)``, the reference's
        convention; class indices without ``G_shared``); with ``G_shared``, integer class
        indices are embedded here (so wrappers such as DDP, which hide ``G.shared``, can pass
        labels). ``unconditional=True``: ``y`` is ignored (may be None)."""
        with L.grouped_spectral_norms(self):
            if self.G_shared and y is not None and not y.is_floating_point():
                y = self.shared(y)
            return generator_trunk(self, z, y)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.unconditional and f"{prefix}blocks.0.0.bn1.gain.weight" in state_dict:
            raise ValueError(
                "BigGANGenerator(unconditional=True): the state dict is a class-conditional generator's (its ccbn "
                "gains are one layer, 'blocks.0.0.bn1.gain.weight'), not the reference's unconditional generator "
                "(self-modulated: 'blocks.0.0.bn1.gain.0.weight'). ganengine's earlier U-Net GAN --unconditional "
                "wrote such a generator (the conditional G fed class 0): that checkpoint was written by the old "
                "unconditional generator and cannot be loaded into this one; load it with unconditional=False and "
                "its conditional arguments (it samples class 0), or retrain")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def check_unconditional(owner: str, hier, G_shared) -> None:
    """The reference's unconditional generator runs only with ``hier`` and without ``G_shared``."""
    if not hier:
        raise ValueError(f"{owner}: unconditional=True needs hier=True: the reference's unconditional generator "
                         "gives every block's self-modulated batch norm all of z only with hier (without it, it "
                         "passes None and fails); its recipes use --hier --unconditional")
    if G_shared:
        raise ValueError(f"{owner}: unconditional=True takes G_shared=False: with a shared embedding the "
                         "reference's self-modulated batch norms expect dim_z + shared_dim inputs but are given z "
                         "(a shape error there); its recipes run without --G_shared")


def build_generator_blocks(g: nn.Module, cross_replica: bool, mybn: bool) -> None:
    """BigGAN's generator blocks (a GBlock, then attention where the arch row asks, per stage) and
    its output layer, created in the reference's order (shared by IC-GAN's generator)."""
    blocks = []
    for index in range(len(g.arch["out_channels"])):
        stage = [L.GBlock(in_channels=g.arch["in_channels"][index], out_channels=g.arch["out_channels"][index],
                          which_conv=g.which_conv, which_bn=g.which_bn, activation=g.activation,
                          upsample=L.upsample2x if g.arch["upsample"][index] else None)]
        if g.arch["attention"][g.arch["resolution"][index]]:
            stage.append(L.Attention(g.arch["out_channels"][index], g.which_conv))
        blocks.append(nn.ModuleList(stage))
    g.blocks = nn.ModuleList(blocks)
    g.output_layer = L.OutputLayer(L.bn(g.arch["out_channels"][-1], cross_replica=cross_replica, mybn=mybn),
                                   g.activation, g.which_conv(g.arch["out_channels"][-1], 3))


def generator_trunk(g: nn.Module, z, y):
    """BigGAN's generator after its conditioning ``y`` is embedded (shared by IC-GAN's): z split
    per block if ``hier``, the linear layer, every block with its slice of [y, z], the output layer."""
    if getattr(g, "unconditional", False):  # every block's self-modulated ccbn takes all of z
        ys = [z] * len(g.blocks)
    elif g.hier:
        zs = torch.split(z, g.z_chunk_size, 1)
        z = zs[0]
        ys = [torch.cat([y, item], 1) for item in zs[1:]]
    else:
        ys = [y] * len(g.blocks)
    h = g.linear(z)
    h = h.view(h.size(0), -1, g.bottom_width, g.bottom_width)
    for index, blocklist in enumerate(g.blocks):
        for block in blocklist:
            h = block(h, ys[index])
    return torch.tanh(g.output_layer(h))


class BigGANDiscriminator(nn.Module):
    """The reference ``BigGAN.Discriminator``: ``forward(x, y)`` -> (N, output_dim)."""

    def __init__(self, D_ch=64, D_wide=True, resolution=128, D_kernel_size=3, D_attn="64", n_classes=1000,
                 num_D_SVs=1, num_D_SV_itrs=1, D_activation=None, D_lr=2e-4, D_B1=0.0, D_B2=0.999, adam_eps=1e-8,
                 SN_eps=1e-12, output_dim=1, D_mixed_precision=False, D_fp16=False, D_init="ortho", skip_init=False,
                 D_param="SN", fused=True, **kwargs):
        super().__init__()
        owner = "BigGANDiscriminator"
        discriminator_setup(self, owner, _D_ARCH, D_arch, D_ch=D_ch, D_attn=D_attn, resolution=resolution,
                            D_param=D_param, D_activation=D_activation, D_init=D_init, SN_eps=SN_eps, D_fp16=D_fp16,
                            num_D_SVs=num_D_SVs, num_D_SV_itrs=num_D_SV_itrs)
        self.D_wide, self.kernel_size, self.n_classes = D_wide, D_kernel_size, n_classes
        blocks = discriminator_blocks(self, D_wide)
        discriminator_finish(self, blocks, output_dim, n_classes, D_init, skip_init, fused)

    def forward(self, x, y=None):
        return discriminator_forward(self, x, y)


# ----------------------------------------------------------------------------- shared by both D's
def discriminator_setup(d: nn.Module, owner: str, arch_table: dict, arch_fn, *, D_ch, D_attn, resolution, D_param,
                        D_activation, D_init, SN_eps, D_fp16, num_D_SVs, num_D_SV_itrs) -> None:
    """What the BigGAN and BigGAN-deep discriminators set before their blocks (the reference's
    attributes, the arch table row, the spectral-norm layer factories); checks the arguments."""
    check_choice(owner, "resolution", resolution, arch_table)
    if D_param != "SN":
        raise ValueError(f"{owner}: D_param must be 'SN' (the reference has no discriminator without spectral "
                         f"norm), got {D_param!r}")
    d.ch, d.resolution, d.attention = D_ch, resolution, D_attn
    d.activation = check_activation(owner, "D_activation", nn.ReLU(inplace=False) if D_activation is None
                                    else D_activation)
    d.init, d.D_param, d.SN_eps, d.fp16 = D_init, D_param, SN_eps, D_fp16
    d.arch = arch_fn(D_ch, D_attn)[resolution]
    d.which_conv, d.which_linear = sn_partials("SN", num_D_SVs, num_D_SV_itrs, SN_eps, owner)
    d.which_embedding = functools.partial(L.SNEmbedding, num_svs=num_D_SVs, num_itrs=num_D_SV_itrs, eps=SN_eps)


def discriminator_blocks(d: nn.Module, D_wide: bool) -> list:
    """BigGAN's discriminator stages (a DBlock, then attention where the arch row asks), in the
    reference's order (shared by IC-GAN's discriminator)."""
    blocks = []
    for index in range(len(d.arch["out_channels"])):
        stage = [L.DBlock(in_channels=d.arch["in_channels"][index], out_channels=d.arch["out_channels"][index],
                          which_conv=d.which_conv, wide=D_wide, activation=d.activation, preactivation=index > 0,
                          downsample=nn.AvgPool2d(2) if d.arch["downsample"][index] else None)]
        if d.arch["attention"][d.arch["resolution"][index]]:
            stage.append(L.Attention(d.arch["out_channels"][index], d.which_conv))
        blocks.append(nn.ModuleList(stage))
    return blocks


def discriminator_finish(d: nn.Module, blocks: list, output_dim: int, n_classes: int, D_init, skip_init: bool,
                         fused: bool) -> None:
    """The blocks, the projection head (``linear``, ``embed``), the reference's init (drawn in
    module order: the same weights from a seed) and the fused rewrite."""
    d.blocks = nn.ModuleList(blocks)
    d.linear = d.which_linear(d.arch["out_channels"][-1], output_dim)
    d.embed = d.which_embedding(n_classes, d.arch["out_channels"][-1])
    if not skip_init:
        d.param_count = L.init_weights(d, D_init)
    d.fused = bool(fused)  # (set_fused switches it too) the forward groups the SN iterations when fused
    L.set_fused(d, fused)


def discriminator_forward(d: nn.Module, x, y, stem=None):
    """``stem`` (BigGAN-deep's input conv) if given, every block of ``d.blocks`` in order, then the
    projection output."""
    if y is None:
        raise ValueError(f"{type(d).__name__}: y (class labels, shape (N,)) is required for the projection term")
    with L.grouped_spectral_norms(d):
        return projection_output(d, run_blocks(d, x, stem), y)


def run_blocks(d: nn.Module, x, stem=None):
    """``stem`` if given, then every block of ``d.blocks`` in order (a discriminator's trunk)."""
    h = stem(x) if stem is not None else x
    for blocklist in d.blocks:
        for block in blocklist:
            h = block(h)
    return h


def projection_output(d: nn.Module, h, y):
    """``linear(sum_hw relu(h)) + sum(embed(y) * that, 1)``, the reference's output."""
    h = torch.sum(d.activation(h), [2, 3])
    out = d.linear(h)
    return out + torch.sum(d.embed(y) * h, 1, keepdim=True)
