"""IC-GAN's generator and discriminator (facebookresearch/ic_gan ``BigGAN_PyTorch/BigGAN.py``),
BigGAN's networks conditioned on instance features, on ganengine's BigGAN layers.

Constructor arguments are the reference's (BigGAN's plus ``class_cond``, ``instance_cond``,
``G_shared_feat``, ``shared_dim_feat``, ``instance_sz``, ``embedded_optimizer``) with its defaults,
except ``instance_cond=True`` (what the arch names ``icgan_G`` / ``icgan_D`` are for);
``class_cond=True`` is cc-IC-GAN, ``class_cond=False`` IC-GAN. Module tree, state_dict keys,
construction order (so the random draws of the SN vectors and the init) are the reference's:

* G: ``shared`` (the class embedding, built with ``G_shared`` even when IC-GAN does not use it),
  ``shared_feat`` (``which_linear(instance_sz, shared_dim_feat)`` with ``G_shared_feat``, else an
  identity; the reference hard-codes 2048 inputs, ``instance_sz`` defaults to 2048), ``linear``,
  ``blocks``, ``output_layer``. The conditional batch norms take ``z_chunk + shared_dim
  (class_cond) + shared_dim_feat (instance_cond)`` inputs. ``G(z, label, feats)``: the
  conditioning is ``cat([shared(label), shared_feat(feats)])`` (labels are class indices, embedded
  inside, unlike BigGAN's G), then BigGAN's hierarchical split.
* D: ``blocks``, ``linear``, then ``linear_feat`` (``which_linear(instance_sz, C)``) and
  ``embed`` (class_cond) with C the last width, halved when both conditionings are used.
  ``D(x, y, feat)`` = ``linear(h) + sum(cat([embed(y), linear_feat(feat)]) * h)`` (the terms
  present), ``h`` the ReLU'd features summed over H and W.

``fused=True`` (default) runs on ganengine's ops exactly as ``BigGANGenerator`` /
``BigGANDiscriminator`` do (fused conditional batch norm + ReLU, SN weights, attention).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ganengine.models import layers_biggan as L
from ganengine.models import networks_biggan as nb


def _check_conditioning(owner: str, class_cond: bool, instance_cond: bool, G_shared: bool | None = None) -> None:
    if not class_cond and not instance_cond:
        raise ValueError(f"{owner}: class_cond and instance_cond are both False; IC-GAN needs instance_cond=True "
                         "(IC-GAN) and optionally class_cond=True (cc-IC-GAN). For an unconditional or class-only "
                         "BigGAN use the biggan_G / biggan_D archs")
    if G_shared is not None and not G_shared:
        raise ValueError(f"{owner}: G_shared=False is not runnable: the reference then builds its conditional "
                         "batch norms as nn.Embedding, which fails on the float instance/class embeddings; use "
                         "G_shared=True (as every IC-GAN config does)")


class ICGANGenerator(nn.Module):
    """The reference ``Generator`` with ``instance_cond``: ``forward(z, label=None, feats=None)``."""

    def __init__(self, G_ch=64, dim_z=128, bottom_width=4, resolution=128, G_kernel_size=3, G_attn="64",
                 n_classes=1000, num_G_SVs=1, num_G_SV_itrs=1, G_shared=True, shared_dim=0, hier=False,
                 cross_replica=False, mybn=False, G_activation=None, G_lr=5e-5, G_B1=0.0, G_B2=0.999,
                 adam_eps=1e-8, BN_eps=1e-5, SN_eps=1e-12, G_mixed_precision=False, G_fp16=False, G_init="ortho",
                 skip_init=False, no_optim=False, G_param="SN", norm_style="bn", class_cond=True,
                 embedded_optimizer=True, instance_cond=True, G_shared_feat=True, shared_dim_feat=2048,
                 instance_sz=2048, fused=True, **kwargs):
        super().__init__()
        owner = "ICGANGenerator"
        nb.check_choice(owner, "resolution", resolution, nb._G_MULTS)
        _check_conditioning(owner, class_cond, instance_cond, G_shared)
        for name, value in (("shared_dim_feat", shared_dim_feat), ("instance_sz", instance_sz)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
        self.ch, self.dim_z, self.bottom_width, self.resolution = G_ch, dim_z, bottom_width, resolution
        self.kernel_size, self.attention, self.n_classes = G_kernel_size, G_attn, n_classes
        self.G_shared = G_shared
        self.shared_dim = shared_dim if shared_dim > 0 else dim_z
        self.hier, self.cross_replica, self.mybn = hier, cross_replica, mybn
        self.activation = nb.check_activation(owner, "G_activation", nn.ReLU(inplace=False) if G_activation is None
                                              else G_activation)
        self.init, self.G_param, self.norm_style = G_init, G_param, norm_style
        self.BN_eps, self.SN_eps, self.fp16 = BN_eps, SN_eps, G_fp16
        self.class_cond, self.instance_cond = bool(class_cond), bool(instance_cond)
        self.G_shared_feat, self.shared_dim_feat, self.instance_sz = G_shared_feat, shared_dim_feat, instance_sz
        self.arch = nb.G_arch(self.ch, self.attention)[resolution]
        if hier:
            self.num_slots = len(self.arch["in_channels"]) + 1
            self.z_chunk_size = nb.hier_z_chunk(owner, dim_z, self.num_slots, resolution)
            self.dim_z = self.z_chunk_size * self.num_slots
        else:
            self.num_slots, self.z_chunk_size = 1, 0

        self.which_conv, self.which_linear = nb.sn_partials(G_param, num_G_SVs, num_G_SV_itrs, self.SN_eps, owner)
        self.which_embedding = nn.Embedding
        input_sz_bn = self.z_chunk_size + (self.shared_dim if class_cond else 0) + \
            (self.shared_dim_feat if instance_cond else 0)
        self.which_bn = functools.partial(L.ccbn, which_linear=functools.partial(self.which_linear, bias=False),
                                          cross_replica=cross_replica, mybn=mybn, input_size=input_sz_bn,
                                          norm_style=norm_style, eps=BN_eps)
        self.shared = self.which_embedding(n_classes, self.shared_dim)
        self.shared_feat = self.which_linear(instance_sz, shared_dim_feat) if G_shared_feat else nn.Identity()
        self.linear = self.which_linear(self.dim_z // self.num_slots,
                                        self.arch["in_channels"][0] * self.bottom_width ** 2)
        nb.build_generator_blocks(self, cross_replica, mybn)
        # IC-GAN leaves the class embedding unused: DDP must not wait for its gradient
        self.ddp_find_unused_parameters = not self.class_cond
        if not skip_init:
            self.param_count = L.init_weights(self, G_init)
        self.fused = bool(fused)  # (set_fused switches it too) the forward groups the SN iterations when fused
        L.set_fused(self, fused)

    def feature_dim(self) -> int:
        """Width of the instance features G takes (``instance_sz``, or ``shared_dim_feat`` without
        ``G_shared_feat``: the features then enter the batch norms as they are)."""
        return self.instance_sz if self.G_shared_feat else self.shared_dim_feat

    def get_condition_embeddings(self, cl=None, feat=None):
        """``cat([shared(cl), shared_feat(feat)], -1)`` of the conditionings given (the reference's)."""
        parts = []
        if cl is not None:
            parts.append(self.shared(cl))
        if feat is not None:
            if feat.dim() != 2 or feat.shape[1] != self.feature_dim():
                raise ValueError(f"ICGANGenerator: feats must be (N, {self.feature_dim()}) instance features, got "
                                 f"{tuple(feat.shape)}")
            parts.append(self.shared_feat(feat))
        return torch.cat(parts, dim=-1)

    def forward(self, z, label=None, feats=None):
        if (label is None) == self.class_cond or (feats is None) == self.instance_cond:
            raise ValueError(f"ICGANGenerator(class_cond={self.class_cond}, instance_cond={self.instance_cond}) takes "
                             f"{'label' if self.class_cond else 'no label'} and "
                             f"{'feats' if self.instance_cond else 'no feats'}, got label="
                             f"{None if label is None else tuple(label.shape)}, feats="
                             f"{None if feats is None else tuple(feats.shape)}")
        with L.grouped_spectral_norms(self):
            return nb.generator_trunk(self, z, self.get_condition_embeddings(label, feats))


class ICGANDiscriminator(nn.Module):
    """The reference ``Discriminator`` with ``instance_cond``: ``forward(x, y=None, feat=None)``."""

    def __init__(self, D_ch=64, D_wide=True, resolution=128, D_kernel_size=3, D_attn="64", n_classes=1000,
                 num_D_SVs=1, num_D_SV_itrs=1, D_activation=None, D_lr=2e-4, D_B1=0.0, D_B2=0.999, adam_eps=1e-8,
                 SN_eps=1e-12, output_dim=1, D_mixed_precision=False, D_fp16=False, D_init="ortho", skip_init=False,
                 D_param="SN", class_cond=True, embedded_optimizer=True, instance_cond=True, instance_sz=2048,
                 fused=True, **kwargs):
        super().__init__()
        owner = "ICGANDiscriminator"
        _check_conditioning(owner, class_cond, instance_cond)
        if not isinstance(instance_sz, int) or instance_sz < 1:
            raise ValueError(f"{owner}: instance_sz must be a positive int, got {instance_sz!r}")
        nb.discriminator_setup(self, owner, nb._D_ARCH, nb.D_arch, D_ch=D_ch, D_attn=D_attn, resolution=resolution,
                               D_param=D_param, D_activation=D_activation, D_init=D_init, SN_eps=SN_eps,
                               D_fp16=D_fp16, num_D_SVs=num_D_SVs, num_D_SV_itrs=num_D_SV_itrs)
        self.D_wide, self.kernel_size, self.n_classes = D_wide, D_kernel_size, n_classes
        self.class_cond, self.instance_cond, self.instance_sz = bool(class_cond), bool(instance_cond), instance_sz
        blocks = nb.discriminator_blocks(self, D_wide)
        self.blocks = nn.ModuleList(blocks)
        width = self.arch["out_channels"][-1]
        self.linear = self.which_linear(width, output_dim)
        if class_cond and instance_cond:
            self.linear_feat = self.which_linear(instance_sz, width // 2)
            self.embed = self.which_embedding(n_classes, width // 2)
        elif class_cond:
            self.embed = self.which_embedding(n_classes, width)
        else:
            self.linear_feat = self.which_linear(instance_sz, width)
        if not skip_init:
            self.param_count = L.init_weights(self, D_init)
        self.fused = bool(fused)  # (set_fused switches it too) the forward groups the SN iterations when fused
        L.set_fused(self, fused)

    def forward(self, x, y=None, feat=None):
        if (y is not None and not self.class_cond) or (feat is not None and not self.instance_cond):
            raise ValueError(f"ICGANDiscriminator(class_cond={self.class_cond}, instance_cond={self.instance_cond}) "
                             f"has no {'class embedding' if y is not None and not self.class_cond else 'linear_feat'} "
                             "for the conditioning given")
        with L.grouped_spectral_norms(self):
            h = torch.sum(self.activation(nb.run_blocks(self, x)), [2, 3])
            out = self.linear(h)
            if y is not None and feat is not None:
                return out + torch.sum(torch.cat([self.embed(y), self.linear_feat(feat)], dim=-1) * h, 1, keepdim=True)
            if y is not None:
                return out + torch.sum(self.embed(y) * h, 1, keepdim=True)
            if feat is not None:
                return out + torch.sum(self.linear_feat(feat) * h, 1, keepdim=True)
            return out


# ----------------------------------------------------------------------------- reference-checkpoint archs
def _infer_g(sd):
    """Arguments that give a reference checkpoint's keys and shapes (ambiguous splits of the
    batch-norm input width are resolved in the order IC-GAN's configs use: hier, no class)."""
    from ganengine.models import archs_attention as aa

    args, out_w = aa._infer_biggan_g_common(sd, deep=False)
    n_blocks = len(aa._indices(sd, r"blocks\.(\d+)\.0\."))
    resolution = {3: 32, 4: 64, 5: 128, 6: 256, 7: 512}.get(n_blocks)
    if resolution is None or "shared.weight" not in sd:
        return None, {}
    arch = nb.G_arch(1, "0")[resolution]
    args.update(resolution=resolution, G_ch=out_w.shape[1] // arch["out_channels"][-1],
                G_attn=aa._attn_string(arch["resolution"][i] for i in aa._indices(sd, r"blocks\.(\d+)\.1\.")))
    lin_in = sd["linear.weight"].shape[1]
    bn_in = sd["blocks.0.0.bn1.gain.weight"].shape[1]
    feat = sd.get("shared_feat.weight")
    args["G_shared_feat"] = feat is not None
    if feat is not None:
        args["shared_dim_feat"], args["instance_sz"] = feat.shape
    for hier, cc in ((True, False), (True, True), (False, False), (False, True)):
        rest = bn_in - (lin_in if hier else 0) - (args["shared_dim"] if cc else 0)
        if feat is None and rest > 0:
            args["shared_dim_feat"] = rest
        if rest == args.get("shared_dim_feat"):
            args.update(hier=hier, class_cond=cc, instance_cond=True,
                        dim_z=lin_in * (n_blocks + 1) if hier else lin_in)
            return "icgan_G", args
    return None, {}


def _infer_d(sd):
    from ganengine.models import archs_attention as aa

    if "linear_feat.weight" not in sd:
        return None, {}
    n_blocks = len(aa._indices(sd, r"blocks\.(\d+)\.0\."))
    resolution = {4: 32, 5: 64, 6: 128, 7: 256}.get(n_blocks)
    if resolution is None:
        return None, {}
    arch = nb.D_arch(1, "0")[resolution]
    last = sd["linear.weight"]
    ch = last.shape[1] // arch["out_channels"][-1]
    wide = sd["blocks.0.0.conv1.weight"].shape[0] == arch["out_channels"][0] * ch
    args = dict(resolution=resolution, D_ch=ch, D_wide=wide, output_dim=last.shape[0],
                num_D_SVs=aa._num_svs(sd, "linear."), class_cond="embed.weight" in sd, instance_cond=True,
                instance_sz=sd["linear_feat.weight"].shape[1],
                D_attn=aa._attn_string(arch["resolution"][i] for i in aa._indices(sd, r"blocks\.(\d+)\.1\.")))
    if "embed.weight" in sd:
        args["n_classes"] = sd["embed.weight"].shape[0]
    return "icgan_D", args


def _specs():
    from ganengine.models import archs_attention as aa

    return {"icgan_G": (aa._signature_defaults(ICGANGenerator), aa._biggan_builder(ICGANGenerator), _infer_g),
            "icgan_D": (aa._signature_defaults(ICGANDiscriminator), aa._biggan_builder(ICGANDiscriminator), _infer_d)}


SPECS = _specs()
OPEN_ARCHS = frozenset(SPECS)  # the reference constructors take **kwargs (the whole training config)
