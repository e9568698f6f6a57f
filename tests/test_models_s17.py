"""Regression tests of the s17 acceptance findings on the models: a synthesis model moved to
float64 (``.to(torch.float64)``, the default dtype left float32) draws its latents in float64 and
trains (BigGAN, BigGAN-deep, U-Net GAN and SAGAN drew float32 z and crashed in the first Linear)."""
import pytest
import torch

from ganengine.models import build_model

_CASES = {
    "biggan": dict(resolution=32, n_classes=3, G_ch=4, D_ch=4, dim_z=8, shared_dim=4, G_attn="0", D_attn="0"),
    "sagan": dict(imsize=64, z_dim=8, g_conv_dim=8, d_conv_dim=8),
    "dcgan": dict(nz=8, ngf=4, ndf=4, nc=3),
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_float64_model_draws_float64_latents_and_trains(name):
    torch.manual_seed(0)
    model = build_model(name, fused=False, fused_optimizer=False, **_CASES[name]).to(torch.float64)
    assert torch.get_default_dtype() == torch.float32
    draw = lambda m, n: m.sample_z(n) if hasattr(m, "sample_z") else m._z(n)  # noqa: E731 (SAGAN: _z)
    assert draw(model, 2).dtype == torch.float64
    size = 32 if name == "biggan" else 64
    batch = {"image": torch.rand(4, 3, size, size, dtype=torch.float64) * 2 - 1, "label": torch.tensor([0, 1, 2, 0])}
    out = model.train_step(batch, model.make_optimizers())
    losses = {k: v for k, v in out.items() if "loss" in k and torch.is_tensor(v)}
    assert losses and all(v.dtype == torch.float64 and torch.isfinite(v) for v in losses.values()), losses
    # (a float32 model keeps drawing float32 z: the same stream as before)
    m32 = build_model(name, fused=False, fused_optimizer=False, **_CASES[name])
    torch.manual_seed(1)
    z = draw(m32, 3)
    torch.manual_seed(1)
    scale = m32.options["z_var"] if name == "biggan" else 1.0
    assert z.dtype == torch.float32 and torch.equal(z, torch.randn(z.shape) * scale)
