"""Regression tests of the s16 acceptance findings on the models: a float64 synthesis model's
losses stay float64 (they were cast to float32: ~1e-9 to 6e-7 off an fp64 reference step)."""
import pytest
import torch

from ganengine.models import build_model
from tests._train_utils import float64_step

_CASES = {
    "wgan": dict(latent_dim=8, img_size=8, channels=1, n_critic=1),
    "cgan": dict(latent_dim=8, img_size=8, channels=1, n_classes=3),
    "acgan": dict(latent_dim=8, img_size=16, channels=1, n_classes=3),
    "infogan": dict(latent_dim=8, img_size=16, channels=1, n_classes=3, code_dim=2),
    "dcgan": dict(nz=8, ngf=4, ndf=4, nc=1),
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_float64_model_losses_stay_float64(name):
    kw = _CASES[name]
    model = build_model(name, fused=False, fused_optimizer=False, **kw)
    size = kw.get("img_size", 64)
    batch = {"image": torch.rand(4, 1, size, size, dtype=torch.float64) * 2 - 1, "label": torch.tensor([0, 1, 2, 0])}
    out = float64_step(model, batch)
    losses = {k: v for k, v in out.items() if "loss" in k}
    assert losses and all(v.dtype == torch.float64 for v in losses.values()), {k: v.dtype for k, v in losses.items()}
