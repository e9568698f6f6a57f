"""Benchmark cases for full training steps of the models (``ganengine.models``).

A model case builds the model with ``ganengine.models.build_model(name, **options)``, its
optimisers with ``make_optimizers()``, a synthetic batch in the layout of docs/INTERFACES.md,
and times ``train_step(batch, optimizers, StepContext())``: every network, every loss and every
optimiser step. "ref" uses the reference recipes' image sizes and widths (and their batch sizes
where a CPU steps them in seconds); "quick" shrinks the widths and images so a CPU step takes
milliseconds. Every model in ``ganengine.models.MODELS`` has a case (tests/test_bench_models_s18.py).
"""
from __future__ import annotations

import importlib

import torch

from ganengine.bench.registry import BenchCase, Workload, register

# BigGAN-128's recipe (BigGAN-PyTorch's launch_BigGAN_bs256x8.sh): the paper's widths and conditioning
_BIGGAN_128 = dict(G_ch=96, D_ch=96, G_shared=True, hier=True, dim_z=120, shared_dim=128, num_D_steps=1)
# a 32x32 BigGAN of the same structure (attention, hier, shared embedding), a few channels wide
_BIGGAN_TINY = dict(resolution=32, G_ch=8, D_ch=8, G_attn="16", D_attn="16", dim_z=16, shared_dim=8, hier=True,
                    G_shared=True, n_classes=10)

# name -> (ref options, quick options, ref batch/image, quick batch/image). The reference batches of
# the BigGAN family (50 to 256 images, times gradient accumulations) are GPU-sized: their "ref"
# keeps the recipe's image size and widths at a batch a 2-core CPU steps in under a minute (4 images
# at 128x128, 16 at 64x64: the same pixels per step; two per chunk where the batch splits per D
# step). "[E / F s]": a ref step's CPU time, eager / fused, 1 thread (2026-12-07, median of 3
# interleaved steps: benchmarks/bench_models.py --interleave --clock cpu, or the case itself)
MODEL_SPECS: dict[str, dict] = {
    "pix2pix": dict(ref=dict(), quick=dict(netG="unet_128", crop_size=128, ngf=8, ndf=8),
                    batch=dict(ref=(1, 256), quick=(1, 128))),
    "cyclegan": dict(ref=dict(), quick=dict(crop_size=64, ngf=8, ndf=8),
                     batch=dict(ref=(1, 256), quick=(1, 64))),
    # CycleGAN's networks and batch (1 image at 256x256, the reference's) plus the cycle-synthesized
    # terms [26.5 / 14.0 s]
    "csgan": dict(ref=dict(), quick=dict(crop_size=64, ngf=8, ndf=8),
                  batch=dict(ref=(1, 256), quick=(1, 64))),
    # n_critic 1 (the recipe's is 5): every timed step trains D and G, as WGAN's cases below; with 5,
    # four steps in five are D's alone and the median step is a D step
    "stargan": dict(ref=dict(n_critic=1), quick=dict(image_size=64, g_conv_dim=8, d_conv_dim=8, g_repeat_num=2,
                                                     n_critic=1),
                    batch=dict(ref=(16, 128), quick=(2, 64))),
    "stackgan": dict(ref=dict(), quick=dict(gf_dim=16, df_dim=8), batch=dict(ref=(64, 64), quick=(2, 64))),
    # DCGAN (64x64 only) and PyTorch-GAN's MNIST-sized models: the reference settings are CPU-sized
    "dcgan": dict(ref=dict(), quick=dict(nz=16, ngf=8, ndf=8), batch=dict(ref=(64, 64), quick=(4, 64))),
    "wgan": dict(ref=dict(n_critic=1), quick=dict(n_critic=1, latent_dim=16), batch=dict(ref=(64, 28), quick=(4, 28))),
    "wgan_gp": dict(ref=dict(n_critic=1), quick=dict(n_critic=1, latent_dim=16),
                    batch=dict(ref=(64, 28), quick=(4, 28))),
    "cgan": dict(ref=dict(), quick=dict(latent_dim=16), batch=dict(ref=(64, 32), quick=(4, 32))),
    "acgan": dict(ref=dict(), quick=dict(latent_dim=16), batch=dict(ref=(64, 32), quick=(4, 32))),
    "adcgan": dict(ref=dict(), quick=dict(latent_dim=16), batch=dict(ref=(64, 32), quick=(4, 32))),
    "infogan": dict(ref=dict(), quick=dict(latent_dim=16), batch=dict(ref=(64, 32), quick=(4, 32))),
    # SAGAN: the reference's 64x64 networks (its only size), widths and batch 64 (parameter.py) [4.8 / 4.0 s]
    "sagan": dict(ref=dict(), quick=dict(z_dim=16, g_conv_dim=8, d_conv_dim=8),
                  batch=dict(ref=(64, 64), quick=(2, 64))),
    # BigGAN-128 (batch 256 x 8 accumulations in the recipe) [23.0 / 15.7 s]
    "biggan": dict(ref=dict(_BIGGAN_128), quick=dict(_BIGGAN_TINY, num_D_steps=1),
                   batch=dict(ref=(4, 128), quick=(2, 32))),
    # BigGAN-deep-128 (launch_BigGAN_deep.sh: ch 128, dim_z 128, two D steps per G step, batch 256):
    # the batch splits into one chunk per D step [13.9 / 11.7 s]
    "biggan_deep": dict(ref=dict(G_ch=128, D_ch=128, dim_z=128, shared_dim=128),
                        quick=dict(_BIGGAN_TINY, dim_z=8, shared_dim=8),
                        batch=dict(ref=(4, 128), quick=(4, 32))),
    # U-Net GAN's CelebA-128 recipe (train_celeba.sh: unconditional, hier, dim_z 128, no attention,
    # CutMix + consistency; batch 50) [17.7 / 10.8 s]
    "unetgan": dict(ref=dict(unconditional=True, hier=True, dim_z=128, G_attn="0", D_attn="0"),
                    quick=dict(resolution=32, G_ch=8, D_ch=8, unconditional=True, hier=True, dim_z=16, G_attn="0",
                               D_attn="0"),
                    batch=dict(ref=(4, 128), quick=(2, 32))),
    # IC-GAN's ImageNet-64 recipe (icgan_res64.json, docs/synthesis.md: 2048-d ResNet-50 features
    # into a 512-d shared embedding, BigGAN's 64x64 networks at ch 64; batch 256; features from a
    # synthetic bank) [17.9 / 8.8 s]
    "icgan": dict(ref=dict(resolution=64, G_shared_feat=True, shared_dim_feat=512, hier=True, dim_z=120,
                           shared_dim=128, G_attn="32", D_attn="32", num_D_steps=1),
                  quick=dict(_BIGGAN_TINY, num_D_steps=1, G_shared_feat=True, shared_dim_feat=8, instance_sz=16,
                             k_nn=5),
                  batch=dict(ref=(16, 64), quick=(2, 32))),
}
SYNTHESIS = ("dcgan", "wgan", "wgan_gp", "cgan", "acgan", "adcgan", "infogan")

# the batch layout each model's train_step reads (docs/INTERFACES.md, "Batches")
BATCH_LAYOUT = {"pix2pix": "paired", "cyclegan": "paired", "csgan": "paired", "stargan": "attributes",
                "stackgan": "text", **{m: "classes" for m in SYNTHESIS + ("sagan", "biggan", "biggan_deep", "unetgan")},
                "icgan": "instances"}
# the model options holding the image size (the first one set wins); the rest take the spec's size
IMAGE_SIZE_OPTIONS = {"pix2pix": ("crop_size", "fineSize"), "cyclegan": ("crop_size", "fineSize"),
                      "csgan": ("crop_size", "fineSize"), "stargan": ("image_size", "celeba_crop_size"),
                      **{m: ("img_size",) for m in SYNTHESIS}, "sagan": ("imsize",),
                      **{m: ("resolution",) for m in ("biggan", "biggan_deep", "unetgan", "icgan")}}
# IC-GAN's synthetic dataset: instances in the bank its generator draws conditionings from
INSTANCE_BANK_SIZE = 128


def _models_module():
    try:
        mod = importlib.import_module("ganengine.models")
    except Exception:
        return None
    return mod if hasattr(mod, "build_model") else None


def model_case_names() -> list[str]:
    """The models that have a case in this build (``MODEL_SPECS`` that ``ganengine.models`` has),
    without registering anything: the CLI's help lists them."""
    models = _models_module()
    known = set(getattr(models, "MODELS", ())) if models is not None else set()
    return [name for name in MODEL_SPECS if name in known]


def _opt(model, *names, default=None):
    opts = getattr(model, "options", {}) or {}
    for n in names:
        if n in opts and opts[n] is not None:
            return opts[n]
    return default


def _images(n: int, c: int, size: int, device, dtype) -> torch.Tensor:
    return torch.rand((n, c, size, size), device=device, dtype=dtype) * 2 - 1


def _class_labels(model, n: int, device) -> torch.Tensor:
    return torch.randint(0, int(_opt(model, "n_classes", default=10)), (n,), device=device)


def _paired_batch(model, n, size, device, dtype):
    """pix2pix / CycleGAN / CSGAN: A and B images (paired or not: the step does not care)."""
    a_nc, b_nc = int(_opt(model, "input_nc", default=3)), int(_opt(model, "output_nc", default=3))
    return {"A": _images(n, a_nc, size, device, dtype), "B": _images(n, b_nc, size, device, dtype),
            "A_paths": [""] * n, "B_paths": [""] * n}


def _attribute_batch(model, n, size, device, dtype):
    """StarGAN: images and 0/1 attribute rows."""
    c_dim = int(_opt(model, "c_dim", default=5))
    return {"image": _images(n, 3, size, device, dtype),
            "label": (torch.rand((n, c_dim), device=device) > 0.5).to(dtype)}


def _text_batch(model, n, size, device, dtype):
    """StackGAN: images, their text embeddings and mismatched images."""
    t = int(_opt(model, "text_dim", "TEXT_DIMENSION", default=1024))
    return {"image": _images(n, 3, size, device, dtype), "embedding": torch.randn((n, t), device=device, dtype=dtype),
            "wrong_image": _images(n, 3, size, device, dtype)}


def _class_batch(model, n, size, device, dtype):
    """The synthesis models: images (C = ``channels`` / ``nc``; RGB for the BigGAN family) and class
    indices (unconditional models ignore them)."""
    c = int(_opt(model, "channels", "nc", default=3))
    return {"image": _images(n, c, size, device, dtype), "label": _class_labels(model, n, device)}


def synthetic_instance_bank(model, n_items: int = INSTANCE_BANK_SIZE):
    """An IC-GAN ``InstanceBank`` of ``n_items`` random unit-norm ``instance_sz``-wide features, their
    k-NN neighbourhoods and random labels (the same bank for every model built with these options)."""
    from ganengine.data.instance_features import InstanceBank, knn_neighbourhoods

    g = torch.Generator().manual_seed(0)
    dim = int(_opt(model, "instance_sz"))
    feats = torch.nn.functional.normalize(torch.randn(n_items, dim, generator=g), dim=1)
    k = min(int(_opt(model, "k_nn")), n_items - 1)
    labels = torch.randint(0, int(_opt(model, "n_classes")), (n_items,), generator=g)
    return InstanceBank(feats, knn_neighbourhoods(feats, k), labels, f"synthetic ({n_items} random features)")


def _instance_batch(model, n, size, device, dtype):
    """IC-GAN: a class batch plus each item's conditioning instance features (rows of the model's
    bank, as ``build_dataset('icgan')`` gives them). A model without a bank gets a synthetic one,
    so its generator draws conditionings from the same data (not from the built-in digits)."""
    if getattr(model, "_bank", None) is None:
        model.set_bank(synthetic_instance_bank(model))
    feats = model.bank.features[torch.randint(0, len(model.bank), (n,))]
    return {**_class_batch(model, n, size, device, dtype), "feature": feats.to(device, dtype)}


_BATCHES = {"paired": _paired_batch, "attributes": _attribute_batch, "text": _text_batch, "classes": _class_batch,
            "instances": _instance_batch}


def make_batch(name: str, model, n: int, size: int, device, dtype=torch.float32) -> dict:
    """A synthetic batch with the keys and value ranges of docs/INTERFACES.md (IC-GAN: see
    ``_instance_batch``)."""
    if name not in BATCH_LAYOUT:
        raise ValueError(f"no synthetic batch for model {name!r}; models with one: {sorted(BATCH_LAYOUT)}")
    return _BATCHES[BATCH_LAYOUT[name]](model, n, size, device, dtype)


def _image_size(name: str, model, default: int) -> int:
    return int(_opt(model, *IMAGE_SIZE_OPTIONS.get(name, ()), default=default))


def _make_setup(models, name: str):
    spec = MODEL_SPECS[name]

    def build(fused: bool | None):
        options = dict(spec[p_size[0]])
        if fused is not None:
            options["fused"] = fused
            options["fused_optimizer"] = fused  # the reference step: torch ops and the reference's Adam
        model = models.build_model(name, **options)
        return model

    p_size = [None]

    def setup(p, device, dtype):
        if dtype != torch.float32:
            raise ValueError("model steps are benchmarked in float32 (mixed precision goes through "
                             "the trainer's --amp, not --dtype)")
        size = p["size"]
        p_size[0] = size
        from ganengine.models.base import StepContext

        fused_flag = "fused" in getattr(models.MODELS.get(name), "DEFAULTS", {}) if hasattr(models, "MODELS") else False
        steps = {}
        batch = None
        for fused in ((True, False) if fused_flag else (None,)):
            torch.manual_seed(0)  # same initial weights for the fused and the plain model
            model = build(fused).to(device)
            model.train()
            optimizers = model.make_optimizers()
            if batch is None:
                n, img = spec["batch"][size]
                batch = make_batch(name, model, p.get("batch_size", n), _image_size(name, model, img), device)
                first = model
            else:
                _share_data(model, first)
            steps[fused] = _stepper(model, batch, optimizers, StepContext())
        if fused_flag:
            return Workload(step=steps[True], reference_step=steps[False])
        return Workload(step=steps[None])

    return setup


def _share_data(model, source) -> None:
    """Give ``model`` the data ``make_batch`` gave ``source`` beside the batch (IC-GAN: the instance
    bank its generator draws conditionings from), so the fused and the plain step see the same."""
    if hasattr(type(model), "set_bank"):
        model.set_bank(source.bank)


def _stepper(model, batch, optimizers, ctx):
    def step():
        return model.train_step(batch, optimizers, ctx)
    return step


def register_all() -> list[str]:
    models = _models_module()
    if models is None:
        return []
    found = []
    for name in model_case_names():
        register(BenchCase(
            name=name, family="models", kind="model", setup=_make_setup(models, name),
            modes=("step",), compile_ok=False,
            description=f"{name} training step (all networks, losses, optimiser steps)",
            shapes={"ref": [dict(size="ref")], "quick": [dict(size="quick")]},
        ))
        found.append(name)
    return found
