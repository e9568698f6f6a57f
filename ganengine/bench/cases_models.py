"""Benchmark cases for full training steps of the models (``ganengine.models``).

A model case builds the model with ``ganengine.models.build_model(name, **options)``, its
optimisers with ``make_optimizers()``, a synthetic batch in the layout of docs/INTERFACES.md,
and times ``train_step(batch, optimizers, StepContext())``: every network, every loss and every
optimiser step. "ref" uses the reference defaults (image size and batch size of the reference
training recipes); "quick" shrinks the widths and images so a CPU step takes milliseconds.
"""
from __future__ import annotations

import importlib

import torch

from ganengine.bench.registry import BenchCase, Workload, register

# name -> (ref options, quick options, ref batch/image, quick batch/image)
MODEL_SPECS: dict[str, dict] = {
    "pix2pix": dict(ref=dict(), quick=dict(netG="unet_128", crop_size=128, ngf=8, ndf=8),
                    batch=dict(ref=(1, 256), quick=(1, 128))),
    "cyclegan": dict(ref=dict(), quick=dict(crop_size=64, ngf=8, ndf=8),
                     batch=dict(ref=(1, 256), quick=(1, 64))),
    "stargan": dict(ref=dict(), quick=dict(image_size=64, g_conv_dim=8, d_conv_dim=8, g_repeat_num=2),
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
}
SYNTHESIS = ("dcgan", "wgan", "wgan_gp", "cgan", "acgan", "adcgan", "infogan")


def _models_module():
    try:
        mod = importlib.import_module("ganengine.models")
    except Exception:
        return None
    return mod if hasattr(mod, "build_model") else None


def _opt(model, *names, default=None):
    opts = getattr(model, "options", {}) or {}
    for n in names:
        if n in opts and opts[n] is not None:
            return opts[n]
    return default


def make_batch(name: str, model, n: int, size: int, device, dtype=torch.float32) -> dict:
    """A synthetic batch with the keys and value ranges of docs/INTERFACES.md."""
    def img(c=3):
        return torch.rand((n, c, size, size), device=device, dtype=dtype) * 2 - 1

    if name in ("pix2pix", "cyclegan"):
        a_nc = int(_opt(model, "input_nc", default=3))
        b_nc = int(_opt(model, "output_nc", default=3))
        return {"A": img(a_nc), "B": img(b_nc), "A_paths": [""] * n, "B_paths": [""] * n}
    if name == "stargan":
        c_dim = int(_opt(model, "c_dim", default=5))
        label = (torch.rand((n, c_dim), device=device) > 0.5).to(dtype)
        return {"image": img(), "label": label}
    if name == "stackgan":
        t = int(_opt(model, "text_dim", "TEXT_DIMENSION", default=1024))
        return {"image": img(), "embedding": torch.randn((n, t), device=device, dtype=dtype),
                "wrong_image": img()}
    if name in SYNTHESIS:
        c = int(_opt(model, "channels", "nc", default=1))
        return {"image": img(c), "label": torch.randint(0, int(_opt(model, "n_classes", default=10)), (n,), device=device)}
    raise ValueError(f"no synthetic batch for model {name!r}")


def _image_size(name: str, model, default: int) -> int:
    if name in ("pix2pix", "cyclegan"):
        return int(_opt(model, "crop_size", "fineSize", default=default))
    if name == "stargan":
        return int(_opt(model, "image_size", "celeba_crop_size", default=default))
    if name in SYNTHESIS:
        return int(_opt(model, "img_size", default=default))
    return default


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
            steps[fused] = _stepper(model, batch, optimizers, StepContext())
        if fused_flag:
            return Workload(step=steps[True], reference_step=steps[False])
        return Workload(step=steps[None])

    return setup


def _stepper(model, batch, optimizers, ctx):
    def step():
        return model.train_step(batch, optimizers, ctx)
    return step


def register_all() -> list[str]:
    models = _models_module()
    if models is None:
        return []
    known = set(getattr(models, "MODELS", MODEL_SPECS))
    found = []
    for name in MODEL_SPECS:
        if name not in known:
            continue
        register(BenchCase(
            name=name, family="models", kind="model", setup=_make_setup(models, name),
            modes=("step",), compile_ok=False,
            description=f"{name} training step (all networks, losses, optimiser steps)",
            shapes={"ref": [dict(size="ref")], "quick": [dict(size="quick")]},
        ))
        found.append(name)
    return found
