"""Benchmark cases for the eval / forward-only module calls (family "eval": ``--ops eval``).

In eval mode, and for calls that record no autograd graph, several modules run eager's own ops
where a fused op would only add host time (BENCHMARKS.md, seventeenth session): these cases put
those calls under the project's commands, the module a user (or ``ganengine.fuse``) puts in the
model against the reference's own layer, both in the mode stated. Every case is forward only:
the runners time "forward" under ``torch.no_grad``, as sampling and evaluation call it
(``sagan_self_attn_train``, registered here beside its eval twin, is a training call, forward+backward:
family "attention", with the op's own ``self_attention2d``).

  instance_norm_act_eval   StarGAN G: nn.InstanceNorm2d(affine, track_running_stats) + ReLU in
                           eval (sampling): 64 ch at 128^2 (first block), 256 ch at 32^2.
  spectral_norm_eval       SAGAN D's 4x4 stride-2 convs (64x64 model, batch 64 and 1) under
                           gnn.spectral_norm vs torch's parametrization, eval (no iteration).
  self_attention_eval      SAGAN's Self_Attn under no_grad, N = 576 / 1024 positions (64 ch).
  self_attention_map_eval  the same call returning (out, attention), the reference's interface.
  sagan_self_attn_eval / sagan_self_attn_train  ganengine's SAGAN generator block itself
                           (ganengine.models.networks_sagan.SelfAttn, fused as the fused generator
                           sets it) against the same block unfused (the reference's Self_Attn code),
                           at the generator's two attention maps (128 ch at 16^2, 64 ch at 32^2):
                           eval under no_grad returning (out, attention), as sampling calls it;
                           training forward+backward, the map built and returned, the gradient
                           through the output only (the generator's loss reads the image).
  batch_norm2d_eval / batch_norm1d_eval  FusedBatchNorm2d / 1d without activation (fuse()'s lone
                           nn.BatchNorm2d / 1d) in eval at DCGAN / BigGAN / U-Net / InfoGAN shapes.
  biggan_snconv_eval / biggan_snconv_train  a fuse()d BigGAN-PyTorch SNConv2d (BigGAN-128 G:
                           1536 ch 3x3 at 8^2, 384 -> 192 at 64^2; its attention's 1x1 theta
                           conv at 64^2) against the reference layer, eval and training forward.

``ganengine bench`` times ``fused`` under its default runner ``ganengine:auto``, the route a
user's call takes (several of these routes are eager's ops under backend "auto" only: batch norm
without activation in eval, the attention's forward-only composition and its map); an explicit
``ganengine:cpu`` runs ganengine's kernels there instead, as ``--runners ganengine:cpu`` asks.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ganengine.bench.cases_ops import _randn, unavailable
from ganengine.bench.registry import BenchCase, Workload, register

FAMILY = "eval"
_FORWARD = ("forward",)


def _norm_state(norm: nn.Module) -> None:
    """Trained-looking affine parameters and running statistics (not the identity map of a fresh
    norm), drawn in fp32 so that every dtype gets the same values rounded."""
    c = norm.num_features
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.1 * torch.randn(c))
        norm.bias.copy_(0.1 * torch.randn(c))
        norm.running_mean.copy_(0.1 * torch.randn(c))
        norm.running_var.copy_(0.5 + torch.rand(c))


def _module_workload(x, reference: nn.Module, fused: nn.Module, device, dtype, training: bool = False) -> Workload:
    """Both modules on ``device`` / ``dtype`` in the mode asked (eval by default), called on ``x``
    (the modules themselves are the functions: no wrapper's call on either side)."""
    reference.to(device, dtype).train(training)
    fused.to(device, dtype).train(training)
    return Workload(args=(x,), reference=reference, fused=fused, grad_args=(0,))


# ----------------------------------------------------------------------------- instance norm
def _instance_norm_eval():
    from ganengine.nn.norm_act import InstanceNormAct2d

    def setup(p, device, dtype):
        norm = nn.InstanceNorm2d(p["c"], affine=True, track_running_stats=True)
        _norm_state(norm)
        act = nn.ReLU(inplace=True) if p["act"] == "relu" else nn.LeakyReLU(0.2, inplace=True)
        # StarGAN's block: nn.InstanceNorm2d(affine, track_running_stats) -> nn.ReLU(inplace=True)
        reference = nn.Sequential(norm, act)
        fused = InstanceNormAct2d.from_modules(norm, act)   # what fuse() puts there (same tensors)
        x = _randn((p["n"], p["c"], p["h"], p["w"]), device, dtype)
        return _module_workload(x, reference, fused, device, dtype)

    register(BenchCase(
        name="instance_norm_act_eval", family=FAMILY, kind="op", setup=setup, modes=_FORWARD,
        description="InstanceNormAct2d with running statistics in eval vs nn.InstanceNorm2d "
                    "(track_running_stats) + ReLU / LeakyReLU (StarGAN sampling)",
        shapes={"ref": [dict(n=1, c=64, h=128, w=128, act="relu"), dict(n=1, c=256, h=32, w=32, act="relu")],
                "quick": [dict(n=1, c=16, h=32, w=32, act="relu"), dict(n=1, c=8, h=16, w=16, act="leaky_relu")],
                "tiny": [dict(n=1, c=4, h=4, w=4, act="relu")]},
        traffic_shape=dict(n=1, c=8, h=8, w=8, act="leaky_relu"),
        # eval with running statistics is F.batch_norm + the activation in place on every backend
        # (ops/norm_act.py _running_stats_act): no Triton kernel by design
        triton_kernels=False,
    ))


# ----------------------------------------------------------------------------- spectral norm
def _spectral_norm_eval():
    from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

    from ganengine.nn.spectral_norm import spectral_norm

    def setup(p, device, dtype):
        k, ci, co = p["k"], p["ci"], p["co"]
        # (each registration draws its own u, v: the fused layer gets the reference's, same keys)
        reference = torch_spectral_norm(nn.Conv2d(ci, co, k, p["stride"], p["padding"]))
        fused = spectral_norm(nn.Conv2d(ci, co, k, p["stride"], p["padding"]))
        fused.load_state_dict(reference.state_dict())
        x = _randn((p["n"], ci, p["h"], p["h"]), device, dtype)
        return _module_workload(x, reference, fused, device, dtype)

    register(BenchCase(
        name="spectral_norm_eval", family=FAMILY, kind="op", setup=setup, modes=_FORWARD,
        description="Conv2d under gnn.spectral_norm vs torch.nn.utils.parametrizations.spectral_norm, "
                    "eval (SAGAN D's 4x4 stride-2 convs)",
        shapes={"ref": [dict(n=64, ci=256, co=512, h=8, k=4, stride=2, padding=1),
                        dict(n=64, ci=64, co=128, h=32, k=4, stride=2, padding=1),
                        dict(n=1, ci=256, co=512, h=8, k=4, stride=2, padding=1)],
                "quick": [dict(n=4, ci=32, co=64, h=16, k=4, stride=2, padding=1)],
                "tiny": [dict(n=1, ci=4, co=8, h=8, k=4, stride=2, padding=1)]},
        traffic_shape=dict(n=1, ci=4, co=8, h=8, k=4, stride=2, padding=1),
        # eval is PyTorch's own weight / vdot(u, mv(W, v)) on every backend (nn/spectral_norm.py
        # _eval_weight) and the conv stays nn.Conv2d's: no Triton kernel by design
        triton_kernels=False,
    ))


# ----------------------------------------------------------------------------- self-attention
def _self_attention_eval():
    from ganengine.models.networks_sagan import SelfAttn
    from ganengine.nn.attention import SelfAttention2d

    def setup_for(with_map: bool):
        def setup(p, device, dtype):
            ref = SelfAttn(p["c"])   # (unfused: the reference's Self_Attn code, heykeetae sagan_models.py)
            with torch.no_grad():
                ref.gamma.fill_(0.5)  # (a trained block's gamma; the initial 0 would drop the attention)
            # what fuse() puts in place of Self_Attn: its convs and gamma, the map returned or not
            fused = SelfAttention2d.from_modules(ref.query_conv, ref.key_conv, ref.value_conv, ref.gamma,
                                                 return_attention=with_map)
            reference = ref if with_map else _OutOnly(ref)
            x = _randn((p["n"], p["c"], p["h"], p["w"]), device, dtype)
            return _module_workload(x, reference, fused, device, dtype)
        return setup

    shapes = {"ref": [dict(n=1, c=64, h=24, w=24), dict(n=1, c=64, h=32, w=32), dict(n=16, c=64, h=32, w=32)],
              "quick": [dict(n=1, c=16, h=24, w=24)],
              "tiny": [dict(n=1, c=16, h=4, w=4)]}
    register(BenchCase(
        name="self_attention_eval", family=FAMILY, kind="op", setup=setup_for(False), modes=_FORWARD,
        description="SelfAttention2d forward only (no_grad) vs SAGAN's Self_Attn (its output)",
        shapes=shapes, traffic_shape=dict(n=1, c=16, h=8, w=8),
    ))
    register(BenchCase(
        name="self_attention_map_eval", family=FAMILY, kind="op", setup=setup_for(True), modes=_FORWARD,
        description="SelfAttention2d(return_attention=True) forward only vs SAGAN's Self_Attn (out, attention)",
        shapes=shapes, traffic_shape=dict(n=1, c=16, h=8, w=8),
        # on a CPU tensor, the interpreter's too, the map call is the one-softmax block's eager ops on
        # every backend (nn/attention.py: N <= 256, or no graph under "auto"): no Triton kernel by
        # design. (A CUDA tensor takes the flash op + the map instead: the kernel count here is the
        # CPU route's, not the CUDA path's.)
        triton_kernels=False,
    ))


def _sagan_self_attn():
    """The fused generator's own attention block against the unfused one (same module class, same
    parameters): what ``fused=True`` changes in the SAGAN generator's two attention layers."""
    from ganengine.models.networks_sagan import SelfAttn

    def setup_for(training: bool):
        def setup(p, device, dtype):
            ref = SelfAttn(p["c"])
            with torch.no_grad():
                ref.gamma.fill_(0.5)  # (a trained block's gamma; the initial 0 would drop the attention)
            fused = copy.deepcopy(ref)
            fused.fused = True        # (what the generator's fused=True sets on it: networks_sagan._set_fused)
            x = _randn((p["n"], p["c"], p["h"], p["w"]), device, dtype)
            if training:  # the map is built and returned, the loss reads the image only
                return _module_workload(x, _OutOnly(ref), _OutOnly(fused), device, dtype, training=True)
            return _module_workload(x, ref, fused, device, dtype)
        return setup

    # SAGAN 64x64 G (conv_dim 64): attn1 on 128 ch at 16^2 (N = 256), attn2 on 64 ch at 32^2 (N = 1024);
    # sampling at batch 16, training at the reference's batch 64 for attn1 and 16 for attn2 (CPU-sized).
    # quick: N = 256 (the map path) and N = 576 (above MAP_PATH_MAX_POSITIONS: the op + the map with a graph)
    quick = [dict(n=2, c=16, h=16, w=16), dict(n=2, c=16, h=24, w=24)]
    tiny = [dict(n=1, c=16, h=4, w=4)]
    register(BenchCase(
        name="sagan_self_attn_eval", family=FAMILY, kind="op", setup=setup_for(False), modes=_FORWARD,
        description="ganengine's SAGAN generator SelfAttn, fused vs unfused, eval under no_grad -> (out, attention)",
        shapes={"ref": [dict(n=16, c=128, h=16, w=16), dict(n=16, c=64, h=32, w=32)], "quick": quick, "tiny": tiny},
        traffic_shape=dict(n=1, c=16, h=8, w=8),
        # on a CPU tensor under no_grad the fused block builds its map with the one-softmax eager
        # composition on every backend (SelfAttn's docstring): no Triton kernel by design
        triton_kernels=False,
    ))
    register(BenchCase(
        name="sagan_self_attn_train", family="attention", kind="op", setup=setup_for(True), modes=("forward_backward",),
        description="ganengine's SAGAN generator SelfAttn, fused vs unfused, training forward+backward "
                    "(map returned, gradient through the output)",
        shapes={"ref": [dict(n=64, c=128, h=16, w=16), dict(n=16, c=64, h=32, w=32)], "quick": quick, "tiny": tiny},
        traffic_shape=dict(n=1, c=16, h=8, w=8),
        # N <= MAP_PATH_MAX_POSITIONS on the CPU: the one-softmax composition, with a graph too
        triton_kernels=False,
    ))


class _OutOnly(nn.Module):
    """A block returning (out, attention), called for its output only (a user's ``block(x)[0]``)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)[0]


# ----------------------------------------------------------------------------- batch norm
def _batch_norm_eval():
    from ganengine.nn.batch_norm_act import FusedBatchNorm1d, FusedBatchNorm2d

    def setup_for(plain, fused_cls):
        def setup(p, device, dtype):
            norm = plain(p["c"])
            _norm_state(norm)
            fused = fused_cls.from_modules(norm, None)   # fuse()'s lone batch norm (same tensors)
            shape = (p["n"], p["c"], p["h"], p["w"]) if "h" in p else (p["n"], p["c"])
            return _module_workload(_randn(shape, device, dtype), norm, fused, device, dtype)
        return setup

    register(BenchCase(
        name="batch_norm2d_eval", family=FAMILY, kind="op", setup=setup_for(nn.BatchNorm2d, FusedBatchNorm2d),
        modes=_FORWARD, description="FusedBatchNorm2d without activation in eval vs nn.BatchNorm2d in eval",
        # DCGAN G's first blocks (batch 64), a BigGAN-128 G block (16x128x32x32), pix2pix's U-Net
        shapes={"ref": [dict(n=64, c=512, h=4, w=4), dict(n=16, c=128, h=32, w=32), dict(n=1, c=64, h=128, w=128)],
                "quick": [dict(n=16, c=64, h=8, w=8)],
                "tiny": [dict(n=1, c=8, h=8, w=8)]},
        traffic_shape=dict(n=4, c=16, h=8, w=8),
    ))
    register(BenchCase(
        name="batch_norm1d_eval", family=FAMILY, kind="op", setup=setup_for(nn.BatchNorm1d, FusedBatchNorm1d),
        modes=_FORWARD, description="FusedBatchNorm1d without activation in eval vs nn.BatchNorm1d in eval",
        # after a wide Linear (InfoGAN / cGAN generators at batch 64: 1024 and 128*7*7 features)
        shapes={"ref": [dict(n=64, c=1024), dict(n=64, c=6272)],
                "quick": [dict(n=16, c=256)],
                "tiny": [dict(n=2, c=8)]},
        traffic_shape=dict(n=4, c=64),
    ))


# ----------------------------------------------------------------------------- BigGAN SNConv2d
class _ReferenceSN:
    """BigGAN-PyTorch ``layers.SN`` (ajbrock): buffers u0.. (randn, not normalised), sv0..; every
    call runs ``num_itrs`` power iterations, written back in training mode only. ``power_iteration``
    (the reference's function, op for op: ganengine.models.biggan_ops') is set on registration."""

    power_iteration = None

    def _init_sn(self, num_svs, num_itrs, num_outputs, transpose=False, eps=1e-12):
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
            svs, _, _ = self.power_iteration(W, us, update=self.training, eps=self.eps)
        if self.training:
            with torch.no_grad():
                for i, sv in enumerate(svs):
                    getattr(self, f"sv{i}")[:] = sv
        return self.weight / svs[0]


class _ReferenceSNConv2d(nn.Conv2d, _ReferenceSN):
    """BigGAN-PyTorch ``layers.SNConv2d``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, num_svs=1, num_itrs=1, eps=1e-12):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding)
        self._init_sn(num_svs, num_itrs, out_channels, eps=eps)

    def forward(self, x):
        return F.conv2d(x, self.W_(), self.bias, self.stride, self.padding, self.dilation, self.groups)


# fuse() rewrites user classes only (fusion/recognise.py _user_class: none from "ganengine."):
# this one is the reference's layer as a user's script defines it, so it carries the
# reference's module name
_ReferenceSNConv2d.__module__ = "layers"


def _biggan_snconv():
    import ganengine
    from ganengine.fusion.copying import FusedModule
    from ganengine.models.biggan_ops import power_iteration

    _ReferenceSN.power_iteration = staticmethod(power_iteration)

    def setup_for(training: bool):
        def setup(p, device, dtype):
            k = p["k"]
            ref = _ReferenceSNConv2d(p["ci"], p["co"], k, padding=k // 2).to(device, dtype)
            fused = ganengine.fuse(copy.deepcopy(ref))   # its own copy of u0 (written in training mode)
            if not isinstance(fused, FusedModule):   # (else the case would time the reference twice)
                raise RuntimeError(f"biggan_snconv: ganengine.fuse() left the reference SNConv2d unfused at {p}")
            x = _randn((p["n"], p["ci"], p["h"], p["h"]), device, dtype)
            return _module_workload(x, ref, fused, device, dtype, training)
        return setup

    shapes = {"ref": [dict(n=1, ci=1536, co=1536, k=3, h=8), dict(n=1, ci=384, co=192, k=3, h=64),
                      dict(n=1, ci=192, co=24, k=1, h=64)],
              "quick": [dict(n=1, ci=32, co=32, k=3, h=8)],
              "tiny": [dict(n=1, ci=8, co=8, k=3, h=8)]}
    for training in (False, True):
        register(BenchCase(
            name="biggan_snconv_train" if training else "biggan_snconv_eval", family=FAMILY, kind="op",
            setup=setup_for(training), modes=_FORWARD, shapes=shapes, traffic_shape=dict(n=1, ci=4, co=4, k=3, h=4),
            description=f"fuse()d BigGAN SNConv2d vs the reference layer, {'training' if training else 'eval'} "
                        "forward (one power iteration, u0 written in training mode)",
            # sigma is plain ops (fusion/spectral.py) and a small conv goes to PyTorch's conv where the
            # fused conv ops would not pay (fusion/mixins.py _conv's route rules, decided for CPU
            # tensors, the interpreter's too): no Triton kernel at the traffic / tiny shapes by design
            triton_kernels=False,
        ))


_PARTS = {
    "instance_norm_act_eval": _instance_norm_eval,
    "spectral_norm_eval": _spectral_norm_eval,
    "self_attention_eval": _self_attention_eval,
    "sagan_self_attn": _sagan_self_attn,
    "batch_norm_eval": _batch_norm_eval,
    "biggan_snconv": _biggan_snconv,
}


def register_all() -> list[str]:
    """Register the eval cases whose modules import in this build; returns the parts registered."""
    found = []
    for name, fn in _PARTS.items():
        try:
            fn()
        except ImportError as exc:   # (as cases_ops: one missing module must not hide the others)
            unavailable[f"{FAMILY}:{name}"] = f"{type(exc).__name__}: {exc}"
            continue
        found.append(name)
    return found
