"""Benchmark cases for the fused ops, at the reference models' shapes.

Each family registers only if its module exists in this build, so the suite grows as op
families land. ``reference`` is the plain PyTorch a user writes without ganengine (the eager and
``torch.compile`` baseline); ``fused`` is the public ganengine function.

Reference shapes (where the op runs in the reference models):
  norm_act   CycleGAN ResnetGenerator at 256x256: 64 ch at 256^2 (first block), 256 ch at 64^2
             (9 residual blocks); StarGAN at 128x128, batch 16: 256 ch at 32^2 (bottleneck).
  attention  SAGAN 64x64 model: attention on 32x32 (N = 1024) feature maps, 64/128 channels.
  conv_act   PatchGAN (pix2pix, 6 input channels): 4x4 stride-2 convs at 256^2 and 128^2.
  conv3x3    CycleGAN residual block (reflect pad + 3x3 conv, 256 ch at 64^2); StarGAN's at 32^2.
  conv       pix2pix U-Net bottleneck: 4x4 stride-2 conv 512 ch 8^2 -> 4^2, transposed conv
             1024 -> 512 ch 4^2 -> 8^2; StarGAN's last discriminator block (b16, 1024 -> 2048, 4^2).
  losses     PatchGAN logits (1, 1, 30, 30); cycle loss over four 1x3x256x256 images.
  spectral_norm  SAGAN D's 4x4 convs (512 x 256 x 4 x 4), BigGAN-128 D's 3x3 convs (1536^2 x 3 x 3);
             grouped: every SN conv of SAGAN's / BigGAN's discriminator in one call.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch
import torch.nn.functional as F

from ganengine.bench.registry import BenchCase, Workload, register


# family -> why its cases are not registered in this build (shown by `ganengine bench --list`)
unavailable: dict[str, str] = {}


def _op_module(family: str):
    """ganengine.ops.<family> if it exists and imports, else None (reason in ``unavailable``)."""
    name = f"ganengine.ops.{family}"
    try:
        if importlib.util.find_spec(name) is None:
            unavailable[family] = f"{name} does not exist in this build"
            return None
        return importlib.import_module(name)
    except Exception as exc:  # a family mid-development must not break the benchmark of the others
        unavailable[family] = f"{name} failed to import: {type(exc).__name__}: {exc}"
        return None


def _randn(shape, device, dtype, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)


# ----------------------------------------------------------------------------- norm_act
def _norm_act(mod):
    def setup(p, device, dtype):
        x = _randn((p["n"], p["c"], p["h"], p["w"]), device, dtype)
        if p.get("affine"):
            w = 1.0 + 0.1 * _randn((p["c"],), device, dtype)
            b = 0.1 * _randn((p["c"],), device, dtype)
            args, grad = (x, w, b), (0, 1, 2)
        else:
            args, grad = (x, None, None), (0,)

        def reference(x, w, b):
            return F.leaky_relu(F.instance_norm(x, weight=w, bias=b, eps=1e-5), 0.2)

        def fused(x, w, b):
            return mod.instance_norm_act(x, w, b, eps=1e-5, activation="leaky_relu", negative_slope=0.2)

        return Workload(args=args, reference=reference, fused=fused, grad_args=grad)

    register(BenchCase(
        name="instance_norm_act", family="norm_act", kind="op", setup=setup,
        description="InstanceNorm2d + LeakyReLU(0.2)",
        shapes={
            "ref": [dict(n=1, c=64, h=256, w=256, affine=False),
                    dict(n=1, c=256, h=64, w=64, affine=False),
                    dict(n=16, c=256, h=32, w=32, affine=True)],
            "quick": [dict(n=2, c=16, h=32, w=32, affine=False),
                      dict(n=2, c=8, h=16, w=16, affine=True)],
            "tiny": [dict(n=1, c=4, h=4, w=4, affine=True)],
        },
        traffic_shape=dict(n=2, c=8, h=64, w=64, affine=True),
    ))


# ----------------------------------------------------------------------------- attention
def _attention(mod):
    def setup(p, device, dtype):
        b, c, h, w = p["n"], p["c"], p["h"], p["w"]
        d = max(1, c // 8)
        x = _randn((b, c, h, w), device, dtype)
        qw = _randn((d, c, 1, 1), device, dtype, c ** -0.5)
        kw = _randn((d, c, 1, 1), device, dtype, c ** -0.5)
        vw = _randn((c, c, 1, 1), device, dtype, c ** -0.5)
        qb, kb, vb = (_randn((n,), device, dtype, 0.1) for n in (d, d, c))
        gamma = torch.full((1,), 0.5, device=device, dtype=dtype)

        def reference(x, qw, qb, kw, kb, vw, vb, gamma):  # heykeetae Self_Attn.forward
            bb, cc, hh, ww = x.shape
            q = F.conv2d(x, qw, qb).view(bb, -1, hh * ww).permute(0, 2, 1)
            k = F.conv2d(x, kw, kb).view(bb, -1, hh * ww)
            attn = torch.softmax(torch.bmm(q, k), dim=-1)
            v = F.conv2d(x, vw, vb).view(bb, -1, hh * ww)
            out = torch.bmm(v, attn.permute(0, 2, 1)).view(bb, cc, hh, ww)
            return gamma * out + x

        def fused(x, qw, qb, kw, kb, vw, vb, gamma):
            return mod.self_attention2d(x, qw, qb, kw, kb, vw, vb, gamma)

        return Workload(args=(x, qw, qb, kw, kb, vw, vb, gamma), reference=reference, fused=fused,
                        grad_args=(0, 1, 2, 3, 4, 5, 6, 7))

    register(BenchCase(
        name="self_attention2d", family="attention", kind="op", setup=setup,
        description="SAGAN self-attention block, gamma * attn(x) + x",
        shapes={
            "ref": [dict(n=4, c=64, h=32, w=32), dict(n=4, c=128, h=32, w=32)],
            "quick": [dict(n=2, c=16, h=8, w=8)],
            "tiny": [dict(n=1, c=16, h=4, w=4)],
        },
        traffic_shape=dict(n=1, c=32, h=16, w=16),
    ))


# ----------------------------------------------------------------------------- conv_act
def _conv_act(mod):
    def setup(p, device, dtype):
        x = _randn((p["n"], p["cin"], p["h"], p["w"]), device, dtype)
        k = p["k"]
        wt = _randn((p["cout"], p["cin"], k, k), device, dtype, (p["cin"] * k * k) ** -0.5)
        b = _randn((p["cout"],), device, dtype, 0.1)
        s, pad = p["stride"], p["padding"]

        def reference(x, wt, b):
            return F.leaky_relu(F.conv2d(x, wt, b, stride=s, padding=pad), 0.2)

        def fused(x, wt, b):
            return mod.conv2d_act(x, wt, b, stride=s, padding=pad, negative_slope=0.2)

        return Workload(args=(x, wt, b), reference=reference, fused=fused, grad_args=(0, 1, 2))

    register(BenchCase(
        name="conv2d_act", family="conv_act", kind="op", setup=setup,
        description="Conv2d 4x4/2 + LeakyReLU(0.2) (PatchGAN)",
        shapes={
            "ref": [dict(n=1, cin=6, cout=64, h=256, w=256, k=4, stride=2, padding=1),
                    dict(n=1, cin=64, cout=128, h=128, w=128, k=4, stride=2, padding=1)],
            "quick": [dict(n=1, cin=3, cout=8, h=32, w=32, k=4, stride=2, padding=1)],
            "tiny": [dict(n=1, cin=3, cout=4, h=8, w=8, k=4, stride=2, padding=1)],
        },
        traffic_shape=dict(n=1, cin=3, cout=8, h=16, w=16, k=4, stride=2, padding=1),
    ))
    if not hasattr(mod, "conv2d_instance_norm_act"):
        return

    def setup_in(p, device, dtype):
        x = _randn((p["n"], p["cin"], p["h"], p["w"]), device, dtype)
        k = p["k"]
        wt = _randn((p["cout"], p["cin"], k, k), device, dtype, (p["cin"] * k * k) ** -0.5)
        s, pad = p["stride"], p["padding"]

        def reference(x, wt):  # PatchGAN block: conv (no bias before a norm) -> IN -> LeakyReLU
            return F.leaky_relu(F.instance_norm(F.conv2d(x, wt, None, stride=s, padding=pad), eps=1e-5), 0.2)

        def fused(x, wt):
            return mod.conv2d_instance_norm_act(x, wt, None, stride=s, padding=pad, eps=1e-5,
                                                activation="leaky_relu", negative_slope=0.2)

        return Workload(args=(x, wt), reference=reference, fused=fused, grad_args=(0, 1))

    register(BenchCase(
        name="conv2d_instance_norm_act", family="conv_act", kind="op", setup=setup_in,
        description="Conv2d 4x4/2 + InstanceNorm + LeakyReLU(0.2) (PatchGAN inner layers)",
        shapes={
            "ref": [dict(n=1, cin=64, cout=128, h=128, w=128, k=4, stride=2, padding=1),
                    dict(n=1, cin=128, cout=256, h=64, w=64, k=4, stride=2, padding=1)],
            "quick": [dict(n=1, cin=8, cout=16, h=16, w=16, k=4, stride=2, padding=1)],
            "tiny": [dict(n=1, cin=4, cout=4, h=8, w=8, k=4, stride=2, padding=1)],
        },
        traffic_shape=dict(n=1, cin=4, cout=8, h=16, w=16, k=4, stride=2, padding=1),
    ))


# ----------------------------------------------------------------------------- conv3x3
def _conv3x3(mod):
    def setup(p, device, dtype):
        x = _randn((p["n"], p["c"], p["h"], p["w"]), device, dtype)
        wt = _randn((p["c"], p["c"], 3, 3), device, dtype, (p["c"] * 9) ** -0.5)
        b = _randn((p["c"],), device, dtype, 0.1)
        mode = p["mode"]

        def reference(x, wt, b):  # the reference ResnetBlock: ReflectionPad2d(1) -> Conv2d(3x3)
            xp = F.pad(x, (1, 1, 1, 1), mode="reflect") if mode == "reflect" else x
            return F.conv2d(xp, wt, b, 1, 0 if mode == "reflect" else 1)

        def fused(x, wt, b):
            return mod.conv3x3(x, wt, b, 1, mode)

        return Workload(args=(x, wt, b), reference=reference, fused=fused, grad_args=(0, 1, 2))

    register(BenchCase(
        name="conv3x3", family="conv3x3", kind="op", setup=setup,
        description="ReflectionPad2d(1) + Conv2d 3x3 (Winograd F(2x2,3x3) on the cpu backend)",
        shapes={
            "ref": [dict(n=1, c=256, h=64, w=64, mode="reflect"), dict(n=16, c=256, h=32, w=32, mode="zeros")],
            "quick": [dict(n=1, c=128, h=16, w=16, mode="reflect")],
            "tiny": [dict(n=1, c=4, h=4, w=4, mode="reflect")],
        },
    ))


# ----------------------------------------------------------------------------- conv
def _conv(mod):
    def setup(p, device, dtype):
        tr, n, ci, co, h = p["transposed"], p["n"], p["ci"], p["co"], p["h"]
        k, s, pad = p.get("k", 4), p.get("stride", 2), p.get("padding", 1)
        x = _randn((n, ci, h, h), device, dtype)
        wt = _randn(((ci, co) if tr else (co, ci)) + (k, k), device, dtype, (ci * k * k) ** -0.5)

        def reference(x, wt):  # the reference U-Net's / StarGAN's layer
            return F.conv_transpose2d(x, wt, None, s, pad) if tr else F.conv2d(x, wt, None, s, pad)

        def fused(x, wt):
            return mod.conv_transpose2d(x, wt, None, s, pad) if tr else mod.conv2d(x, wt, None, s, pad)

        return Workload(args=(x, wt), reference=reference, fused=fused, grad_args=(0, 1))

    register(BenchCase(
        name="conv", family="conv", kind="op", setup=setup,
        description="4x4 stride-2 conv / transposed conv on small maps (one GEMM on the cpu backend)",
        shapes={
            "ref": [dict(transposed=False, n=1, ci=512, co=512, h=8), dict(transposed=True, n=1, ci=1024, co=512, h=4),
                    dict(transposed=False, n=16, ci=1024, co=2048, h=4)],
            "quick": [dict(transposed=False, n=1, ci=256, co=256, h=4), dict(transposed=True, n=1, ci=256, co=128, h=2)],
            "tiny": [dict(transposed=False, n=1, ci=4, co=4, h=4)],
        },
    ))
    # 3x3 stride-1 and 1x1 convs (SAGAN / BigGAN blocks, attention projections): the router leaves
    # them to oneDNN (its fixed cost is low for these kernels), so the public function's cost at a
    # tiny map is what this case watches
    register(BenchCase(
        name="conv_small_kernels", family="conv", kind="op", setup=setup,
        description="3x3 stride-1 / 1x1 convs (oneDNN: the public function's own cost)",
        shapes={
            "ref": [dict(transposed=False, n=4, ci=256, co=256, h=8, k=3, stride=1, padding=1),
                    dict(transposed=False, n=4, ci=256, co=512, h=4, k=3, stride=1, padding=1),
                    dict(transposed=False, n=4, ci=256, co=256, h=32, k=1, stride=1, padding=0)],
            "quick": [dict(transposed=False, n=1, ci=32, co=32, h=16, k=3, stride=1, padding=1)],
            "tiny": [dict(transposed=False, n=1, ci=8, co=8, h=8, k=3, stride=1, padding=1)],
        },
    ))


# ----------------------------------------------------------------------------- losses
def _losses(mod):
    if hasattr(mod, "gan_loss"):
        def setup_g(p, device, dtype):
            logits = _randn((p["n"], 1, p["h"], p["w"]), device, dtype)

            def reference(logits):  # CycleGAN GANLoss('vanilla'), target real
                return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

            def fused(logits):
                return mod.gan_loss(logits, True, mode="vanilla")

            return Workload(args=(logits,), reference=reference, fused=fused, grad_args=(0,))

        register(BenchCase(
            name="gan_loss", family="losses", kind="op", setup=setup_g,
            description="vanilla (BCE-with-logits) GAN loss against 'real'",
            shapes={"ref": [dict(n=1, h=30, w=30), dict(n=16, h=30, w=30)],
                    "quick": [dict(n=2, h=30, w=30)], "tiny": [dict(n=1, h=4, w=4)]},
            traffic_shape=dict(n=2, h=30, w=30),
        ))
    if hasattr(mod, "discriminator_loss"):
        def setup_d(p, device, dtype):
            shape = (p["n"], 1, p["h"], p["w"])
            real, fake = _randn(shape, device, dtype), _randn(shape, device, dtype)

            def reference(real, fake):  # CycleGAN GANLoss('lsgan') for D: 0.5 * (real + fake)
                return 0.5 * (F.mse_loss(real, torch.ones_like(real)) + F.mse_loss(fake, torch.zeros_like(fake)))

            def fused(real, fake):
                return mod.discriminator_loss(real, fake, "lsgan")

            return Workload(args=(real, fake), reference=reference, fused=fused, grad_args=(0, 1))

        register(BenchCase(
            name="discriminator_loss", family="losses", kind="op", setup=setup_d,
            description="LSGAN discriminator loss, real + fake in one pass",
            shapes={"ref": [dict(n=1, h=30, w=30), dict(n=16, h=30, w=30)],
                    "quick": [dict(n=2, h=30, w=30)], "tiny": [dict(n=1, h=4, w=4)]},
            traffic_shape=dict(n=2, h=30, w=30),
        ))
    if hasattr(mod, "cycle_loss"):
        def setup_c(p, device, dtype):
            shape = (p["n"], 3, p["h"], p["w"])
            ra, rec_a, rb, rec_b, ia, ib = (_randn(shape, device, dtype) for _ in range(6))

            def reference(ra, rec_a, rb, rec_b, ia, ib):  # CycleGAN: L1 terms, lambda 10, idt 0.5
                l1 = F.l1_loss
                return (l1(rec_a, ra) * 10.0 + l1(rec_b, rb) * 10.0
                        + l1(ia, rb) * 10.0 * 0.5 + l1(ib, ra) * 10.0 * 0.5)

            def fused(ra, rec_a, rb, rec_b, ia, ib):
                return mod.cycle_loss(ra, rec_a, rb, rec_b, ia, ib)[0]

            return Workload(args=(ra, rec_a, rb, rec_b, ia, ib), reference=reference, fused=fused,
                            grad_args=(1, 3, 4, 5))

        register(BenchCase(
            name="cycle_loss", family="losses", kind="op", setup=setup_c,
            description="CycleGAN cycle + identity L1 losses in one pass",
            shapes={"ref": [dict(n=1, h=256, w=256)], "quick": [dict(n=1, h=32, w=32)], "tiny": [dict(n=1, h=4, w=4)]},
            traffic_shape=dict(n=1, h=32, w=32),
        ))
    _gan_loss_module()
    _gan_loss_modes(mod)


# The adversarial modes other than vanilla / lsgan, each against the reference's own expression: the
# linear ones (wgangp, hinge for the generator: +-mean, nothing to fuse) must cost no more than eager's
# mean(+neg), hinge for the discriminator no more than relu(1 -+ x).mean(). Tiny shape (64, 1, 1, 1):
# a WGAN-GP / SNGAN critic's (N, 1) scores; ref adds the 30x30 PatchGAN maps.
_MODE_SHAPES = {"ref": [dict(n=64, h=1, w=1), dict(n=1, h=30, w=30), dict(n=16, h=30, w=30)],
                "quick": [dict(n=2, h=30, w=30)], "tiny": [dict(n=64, h=1, w=1)]}
_MODE_CASES = {  # name: (gan_loss args after the map, the reference, description)
    "gan_loss_wgangp_real": ((True, "wgangp"), lambda x: -x.mean(), "wgangp towards 'real' (-mean: WGAN-GP G step)"),
    "gan_loss_wgangp_fake": ((False, "wgangp"), lambda x: x.mean(), "wgangp towards 'fake' (+mean: critic's fake term)"),
    "gan_loss_hinge_g": ((True, "hinge", False), lambda x: -x.mean(), "hinge for the generator (-mean)"),
    "gan_loss_hinge_d_real": ((True, "hinge"), lambda x: torch.relu(1.0 - x).mean(),
                              "hinge for the discriminator, real term (relu(1 - x).mean())"),
    "gan_loss_hinge_d_fake": ((False, "hinge"), lambda x: torch.relu(1.0 + x).mean(),
                              "hinge for the discriminator, fake term (relu(1 + x).mean())"),
}


def _gan_loss_modes(mod):
    if not hasattr(mod, "gan_loss"):
        return
    for name, (args, reference, description) in _MODE_CASES.items():
        def setup(p, device, dtype, args=args, reference=reference):
            logits = _randn((p["n"], 1, p["h"], p["w"]), device, dtype)
            return Workload(args=(logits,), reference=reference, fused=lambda x: mod.gan_loss(x, *args),
                            grad_args=(0,))

        register(BenchCase(name=name, family="losses", kind="op", setup=setup, description=description,
                           shapes=_MODE_SHAPES, traffic_shape=dict(n=16, h=30, w=30)))
    _gan_loss_module_wgangp()


class _ReferenceGANLoss(torch.nn.Module):
    """The CycleGAN reference's GANLoss module (junyanz models/networks.py): lsgan / vanilla, the
    label buffer expanded to the prediction's shape, then MSELoss / BCEWithLogitsLoss; wgangp, -+mean."""

    def __init__(self, gan_mode):
        super().__init__()
        self.gan_mode = gan_mode
        self.register_buffer("real_label", torch.tensor(1.0))
        self.register_buffer("fake_label", torch.tensor(0.0))
        self.loss = torch.nn.MSELoss() if gan_mode == "lsgan" else torch.nn.BCEWithLogitsLoss()

    def forward(self, prediction, target_is_real):
        if self.gan_mode == "wgangp":  # (the reference's third mode)
            return -prediction.mean() if target_is_real else prediction.mean()
        target = (self.real_label if target_is_real else self.fake_label).expand_as(prediction)
        return self.loss(prediction, target)


def _gan_loss_module():
    """ganengine.nn.GANLoss, the module the reference's training code holds, against the reference's."""
    from ganengine.nn.losses import GANLoss

    def setup(p, device, dtype):
        logits = _randn((p["n"], 1, p["h"], p["w"]), device, dtype)
        ref, fused = _ReferenceGANLoss("lsgan").to(device), GANLoss("lsgan").to(device)
        return Workload(args=(logits,), reference=lambda x: ref(x, True), fused=lambda x: fused(x, True),
                        grad_args=(0,))

    register(BenchCase(
        name="gan_loss_module", family="losses", kind="op", setup=setup,
        description="GANLoss('lsgan') module called with target_is_real=True (pix2pix / CycleGAN G step)",
        shapes={"ref": [dict(n=1, h=30, w=30)], "quick": [dict(n=2, h=30, w=30)], "tiny": [dict(n=1, h=4, w=4)]},
        traffic_shape=dict(n=2, h=30, w=30),
    ))


def _gan_loss_module_wgangp():
    """GANLoss('wgangp') module, the WGAN-GP generator step, against the reference module's -mean."""
    from ganengine.nn.losses import GANLoss

    def setup(p, device, dtype):
        logits = _randn((p["n"], 1, p["h"], p["w"]), device, dtype)
        ref, fused = _ReferenceGANLoss("wgangp").to(device), GANLoss("wgangp").to(device)
        return Workload(args=(logits,), reference=lambda x: ref(x, True), fused=lambda x: fused(x, True),
                        grad_args=(0,))

    register(BenchCase(
        name="gan_loss_module_wgangp", family="losses", kind="op", setup=setup,
        description="GANLoss('wgangp') module called with target_is_real=True (WGAN-GP G step: -mean)",
        shapes=_MODE_SHAPES, traffic_shape=dict(n=16, h=30, w=30),
    ))


# ----------------------------------------------------------------------------- batch_norm_act
def _batch_norm_act(mod):
    # BN + ReLU at DCGAN / BigGAN / U-Net shapes: 64x512x4x4 (DCGAN G first block, batch 64),
    # 64x256x8x8, 16x128x32x32 (BigGAN-128 G block), 1x64x128x128 (pix2pix U-Net, batch 1); and
    # BatchNorm1d after a wide Linear (InfoGAN / cGAN generators at batch 64: 1024 and 128*7*7 features)
    shapes = {
        "ref": [dict(n=64, c=512, h=4, w=4), dict(n=64, c=256, h=8, w=8), dict(n=16, c=128, h=32, w=32),
                dict(n=1, c=64, h=128, w=128), dict(n=64, c=1024), dict(n=64, c=6272)],
        "quick": [dict(n=16, c=64, h=8, w=8)],
        "tiny": [dict(n=2, c=4, h=4, w=4)],
    }

    def setup(p, device, dtype):
        x = _randn((p["n"], p["c"], p["h"], p["w"]) if "h" in p else (p["n"], p["c"]), device, dtype)
        w = 1.0 + 0.1 * _randn((p["c"],), device, torch.float32)
        b = 0.1 * _randn((p["c"],), device, torch.float32)
        rm = torch.zeros(p["c"], device=device)
        rv = torch.ones(p["c"], device=device)

        def reference(x, w, b, rm, rv):  # nn.BatchNorm2d / 1d (train) -> nn.ReLU
            return F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))

        def fused(x, w, b, rm, rv):
            return mod.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, "relu")

        return Workload(args=(x, w, b, rm, rv), reference=reference, fused=fused, grad_args=(0, 1, 2))

    register(BenchCase(name="batch_norm_act", family="batch_norm_act", kind="op", setup=setup, shapes=shapes,
                       description="BatchNorm2d / 1d (training, running statistics) + ReLU",
                       traffic_shape=dict(n=4, c=16, h=8, w=8)))

    def setup_cond(p, device, dtype):
        n, c = p["n"], p["c"]
        x = _randn((n, c, p["h"], p["w"]), device, dtype)
        gain = 1.0 + 0.1 * _randn((n, c), device, dtype)
        bias = 0.1 * _randn((n, c), device, dtype)
        rm = torch.zeros(c, device=device)
        rv = torch.ones(c, device=device)

        def reference(x, gain, bias, rm, rv):  # BigGAN ccbn: F.batch_norm(...) * gain + bias, then ReLU
            out = F.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5)
            return F.relu(out * gain[:, :, None, None] + bias[:, :, None, None])

        def fused(x, gain, bias, rm, rv):
            return mod.conditional_batch_norm_act(x, gain, bias, rm, rv, True, 0.1, 1e-5, "relu")

        return Workload(args=(x, gain, bias, rm, rv), reference=reference, fused=fused, grad_args=(0, 1, 2))

    register(BenchCase(name="conditional_batch_norm_act", family="batch_norm_act", kind="op", setup=setup_cond,
                       shapes={k: [q for q in v if "h" in q] for k, v in shapes.items()},  # (4-D: BigGAN's ccbn)
                       description="BigGAN class-conditional batch norm (per-sample gain/bias) + ReLU",
                       traffic_shape=dict(n=4, c=16, h=8, w=8)))


# ----------------------------------------------------------------------------- spectral_norm
def _sn_weights(p):
    """Weight shapes of a discriminator's spectral-normed layers (``layers``: sagan, biggan)."""
    k = p.get("scale", 1)
    if p["layers"] == "sagan":  # heykeetae SAGAN D, image_size 64: four 4x4 stride-2 convs
        c = [3] + [64 * m // k for m in (1, 2, 4, 8)]
        return [(c[i + 1], c[i], 4, 4) for i in range(4)]
    c = [96 * m // k for m in (1, 2, 4, 8, 16)]  # BigGAN-128 D: the 3x3 convs of its DBlocks
    return [(co, ci, 3, 3) for ci, co in zip([3] + c, c)] + [(co, co, 3, 3) for co in c]


def _spectral_norm(mod):
    eps = 1e-12

    def state(shape, device, dtype):
        w = _randn(shape, device, dtype, 0.05)
        u = F.normalize(_randn((shape[0],), device, dtype), dim=0, eps=eps)
        v = F.normalize(_randn((w[0].numel(),), device, dtype), dim=0, eps=eps)
        return w, u, v

    def torch_sn(w, u, v):  # torch.nn.utils.parametrizations.spectral_norm, train mode, 1 iteration
        m = w.flatten(1)
        with torch.no_grad():
            u = F.normalize(torch.mv(m, v), dim=0, eps=eps)
            v = F.normalize(torch.mv(m.H, u), dim=0, eps=eps)
        return w / torch.vdot(u, torch.mv(m, v))

    def setup(p, device, dtype):
        w, u, v = state((p["co"], p["ci"], p["k"], p["k"]), device, dtype)

        def fused(w, u, v):
            return mod.spectral_norm_weight(w, u, 1, eps, v=v)[0]

        return Workload(args=(w, u, v), reference=torch_sn, fused=fused, grad_args=(0,))

    register(BenchCase(
        name="spectral_norm_weight", family="spectral_norm", kind="op", setup=setup,
        description="spectral norm of one conv weight (train: 1 power iteration, sigma, W / sigma)",
        shapes={"ref": [dict(co=512, ci=256, k=4), dict(co=1536, ci=1536, k=3)],
                "quick": [dict(co=64, ci=32, k=4)], "tiny": [dict(co=8, ci=4, k=3)]},
        traffic_shape=dict(co=16, ci=8, k=3),
    ))

    def setup_group(p, device, dtype):
        states = [state(s, device, dtype) for s in _sn_weights(p)]
        n = len(states)
        args = tuple(t for trio in zip(*states) for t in trio)  # weights, then us, then vs

        def reference(*a):
            return [torch_sn(a[i], a[n + i], a[2 * n + i]) for i in range(n)]

        def fused(*a):  # one grouped call on a native backend (what gnn.SpectralNormGroup runs)
            ws, us, vs = a[:n], a[n:2 * n], a[2 * n:]
            backend = mod.choose_backend(ws[0], 0)
            if backend == "torch":
                return [mod.spectral_norm_weight(w, u, 1, eps, v=v)[0] for w, u, v in zip(ws, us, vs)]
            return mod.run_group(ws, [0] * n, us, vs, mod.U_STEP, 2, eps, False, backend)[0]

        return Workload(args=args, reference=reference, fused=fused, grad_args=tuple(range(n)))

    register(BenchCase(
        name="spectral_norm_group", family="spectral_norm", kind="op", setup=setup_group,
        description="spectral norm of every SN conv of a discriminator in one grouped call",
        shapes={"ref": [dict(layers="sagan"), dict(layers="biggan")], "quick": [dict(layers="sagan", scale=4)],
                "tiny": [dict(layers="sagan", scale=16)]},
        traffic_shape=dict(layers="sagan", scale=8),
    ))


_FAMILIES = {
    "norm_act": (_norm_act, "instance_norm_act"),
    "attention": (_attention, "self_attention2d"),
    "conv_act": (_conv_act, "conv2d_act"),
    "conv3x3": (_conv3x3, "conv3x3"),
    "conv": (_conv, "conv_transpose2d"),
    "losses": (_losses, None),
    "batch_norm_act": (_batch_norm_act, "batch_norm_act"),
    "spectral_norm": (_spectral_norm, "spectral_norm_weight"),
}


# ----------------------------------------------------------------------------- optimiser
def _wgan_critic_shapes(p) -> list[tuple]:
    """The parameters of PyTorch-GAN's WGAN critic (an MLP img -> 512 -> 256 -> 1), widths / scale."""
    s = p.get("scale", 1)
    dims = [p["img"], 512 // s, 256 // s, 1]
    return [shape for a, b in zip(dims, dims[1:]) for shape in ((b, a), (b,))]


def register_optimiser() -> bool:
    """FusedRMSprop's step (one fused multi-tensor kernel) against torch.optim.RMSprop's (WGAN's
    optimiser, lr 5e-5, multi-tensor): timed as "forward" (a step has no backward). The gradients
    are fixed; each optimiser updates its own copy of the parameters."""
    try:
        from ganengine.models.fused_rmsprop import FusedRMSprop
    except Exception as exc:  # (as _op_module: one missing piece must not break the others)
        unavailable["optim"] = f"ganengine.models.fused_rmsprop failed to import: {type(exc).__name__}: {exc}"
        return False

    def setup(p, device, dtype):
        def params():
            g = torch.Generator().manual_seed(0)
            out = []
            for shape in _wgan_critic_shapes(p):
                t = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
                t.grad = torch.randn(shape, generator=g).to(device, dtype)
                out.append(t)
            return out

        ref_params, fused_params = params(), params()
        # foreach: what torch.optim.RMSprop runs on CUDA tensors by default (on CPU tensors its
        # default is a per-parameter loop, slower: the multi-tensor form is the stricter baseline)
        ref = torch.optim.RMSprop(ref_params, lr=5e-5, foreach=True)
        fused = FusedRMSprop(fused_params, lr=5e-5)
        ref.step(), fused.step()  # the state exists from the first step on: time the steady state
        # args: the tensors each step reads and writes (for the traffic counts; the steps ignore them)
        args = tuple(ref_params) + tuple(t.grad for t in ref_params)
        return Workload(args=args, reference=lambda *a: ref.step(), fused=lambda *a: fused.step())

    register(BenchCase(
        name="rmsprop_step", family="optim", kind="op", setup=setup, modes=("forward",), compile_ok=False,
        triton_kernels=False,
        description="one RMSprop step over the WGAN critic's parameters (FusedRMSprop vs torch.optim.RMSprop)",
        shapes={"ref": [dict(img=784)], "quick": [dict(img=64, scale=8)], "tiny": [dict(img=16, scale=64)]},
        traffic_shape=dict(img=64, scale=8),
    ))
    return True


def register_all() -> list[str]:
    """Register the cases of every op family present in this build; returns the families."""
    found = []
    for family, (fn, required) in _FAMILIES.items():
        mod = _op_module(family)
        if mod is not None and required and not hasattr(mod, required):
            unavailable[family] = f"ganengine.ops.{family} has no {required}()"
            continue
        if mod is None:
            continue
        fn(mod)
        found.append(family)
    if register_optimiser():
        found.append("optim")
    return found
