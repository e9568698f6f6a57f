"""CSGAN (CycleGAN + cycle-synthesized L1 terms) and U-Net GAN (BigGAN G + U-Net discriminator).

CSGAN's step is checked against a compact re-write of the reference's update
(KishanKancharagunta/CSGAN ``csgan.py``: CycleGAN's step with
``L1(fake_A, rec_A.detach()) * k + L1(fake_B, rec_B.detach()) * k`` in the generators' loss).
"""
import pytest
import torch
import torch.nn.functional as F

import ganengine.functional as GF
from ganengine.models import CSGAN, build_model
from tests import reference_nets as R


# ---------------------------------------------------------------------------- cycle_synthesized_loss
@pytest.mark.parametrize("with_idt", [True, False])
def test_cycle_synthesized_loss_equals_the_l1_terms(with_idt):
    torch.manual_seed(0)
    t = [torch.randn(2, 3, 5, 7, requires_grad=True) for _ in range(8)]
    real_a, rec_a, real_b, rec_b, fake_a, fake_b, idt_a, idt_b = t
    if not with_idt:
        idt_a = idt_b = None
    total, terms = GF.cycle_synthesized_loss(real_a, rec_a, real_b, rec_b, fake_a, fake_b, idt_a, idt_b,
                                             lambda_a=3.0, lambda_b=5.0, lambda_identity=0.5, lambda_cs=7.0)
    want = {"cycle_a": F.l1_loss(rec_a, real_a) * 3, "cycle_b": F.l1_loss(rec_b, real_b) * 5,
            "cs_a": F.l1_loss(fake_a, rec_a.detach()) * 7, "cs_b": F.l1_loss(fake_b, rec_b.detach()) * 7}
    if with_idt:
        want.update(idt_a=F.l1_loss(idt_a, real_b) * 2.5, idt_b=F.l1_loss(idt_b, real_a) * 1.5)
    assert set(terms) == set(want)
    n = real_a.numel()  # sums of n terms of size ~1, fp32
    for k in want:
        torch.testing.assert_close(terms[k], want[k], atol=8 * n * 2 ** -24, rtol=0)
    ref_total = sum(want.values())
    torch.testing.assert_close(total, ref_total, atol=48 * n * 2 ** -24, rtol=0)
    inputs = t if with_idt else t[:6]
    g = torch.autograd.grad(total, inputs)
    gr = torch.autograd.grad(ref_total, inputs)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b)


def test_cycle_synthesized_loss_bad_input():
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="fake_a has shape"):
        GF.cycle_synthesized_loss(x, x, x, x, torch.zeros(1, 3, 4, 5), x)
    with pytest.raises(ValueError, match="both idt_a and idt_b"):
        GF.cycle_synthesized_loss(x, x, x, x, x, x, idt_a=x)


# ---------------------------------------------------------------------------- CSGAN
def _csgan_ref_step(G_A, G_B, D_A, D_B, opt_G, opt_D, real_A, real_B, k=30.0, lambda_A=10.0, lambda_B=10.0,
                    lambda_idt=0.5):
    """The reference's optimize_parameters (its forward(), backward_G, backward_D_A/B)."""
    gan = lambda p, real: F.mse_loss(p, torch.full_like(p, float(real)))  # noqa: E731  (lsgan)
    fake_A, fake_B = G_B(real_B), G_A(real_A)
    rec_A, rec_B = G_B(fake_B), G_A(fake_A)
    R._set_rg([D_A, D_B], False)
    opt_G.zero_grad()
    idt_A = G_A(real_B)
    loss_idt_A = F.l1_loss(idt_A, real_B) * lambda_B * lambda_idt
    idt_B = G_B(real_A)
    loss_idt_B = F.l1_loss(idt_B, real_A) * lambda_A * lambda_idt
    loss_G_A = gan(D_A(fake_B), True)
    loss_G_B = gan(D_B(fake_A), True)
    loss_CSA = F.l1_loss(fake_A, rec_A.detach()) * k
    loss_CSB = F.l1_loss(fake_B, rec_B.detach()) * k
    loss_cycle_A = F.l1_loss(rec_A, real_A) * lambda_A
    loss_cycle_B = F.l1_loss(rec_B, real_B) * lambda_B
    (loss_G_A + loss_G_B + loss_CSA + loss_CSB + loss_cycle_A + loss_cycle_B + loss_idt_A + loss_idt_B).backward()
    opt_G.step()
    R._set_rg([D_A, D_B], True)
    opt_D.zero_grad()
    loss_D_A = (gan(D_A(real_B), True) + gan(D_A(fake_B.detach()), False)) * 0.5
    loss_D_A.backward()
    loss_D_B = (gan(D_B(real_A), True) + gan(D_B(fake_A.detach()), False)) * 0.5
    loss_D_B.backward()
    opt_D.step()
    return dict(D_A=loss_D_A, G_A=loss_G_A, cycle_A=loss_cycle_A, idt_A=loss_idt_A, D_B=loss_D_B, G_B=loss_G_B,
                cycle_B=loss_cycle_B, idt_B=loss_idt_B, CS_A=loss_CSA, CS_B=loss_CSB)


def test_csgan_step_matches_the_reference_step():
    torch.manual_seed(5)
    model = CSGAN(ngf=4, ndf=4, netG="resnet_6blocks", netD="n_layers", n_layers_D=2, crop_size=16)
    assert model.options["lambda_CS"] == 30.0 and model.MODEL_NAME == "csgan"
    batch = {"A": torch.rand(1, 3, 16, 16) * 2 - 1, "B": torch.rand(1, 3, 16, 16) * 2 - 1}
    ref = [R.define_G(3, 3, 4, "resnet_6blocks", "instance"), R.define_G(3, 3, 4, "resnet_6blocks", "instance"),
           R.define_D(3, 4, "n_layers", 2, norm="instance"), R.define_D(3, 4, "n_layers", 2, norm="instance")]
    for net, name in zip(ref, model.network_names):
        net.load_state_dict(getattr(model, name).state_dict())
    opts = model.make_optimizers()
    ref_opts = [R.adam(R.chain(ref[0], ref[1]), 2e-4), R.adam(R.chain(ref[2], ref[3]), 2e-4)]
    for i in range(2):
        got = model.train_step(batch, opts)
        want = _csgan_ref_step(*ref, *ref_opts, batch["A"], batch["B"])
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k].detach(), atol=2e-4, rtol=2e-4, msg=f"step {i}: {k}")


def test_csgan_options():
    m = build_model("csgan", ngf=4, ndf=4, netG="resnet_6blocks", crop_size=16, lambda_CS=5.0)
    assert m.options["lambda_CS"] == 5.0 and m.options["lambda_A"] == 10.0
    with pytest.raises(ValueError, match="lambda_CS"):
        CSGAN(ngf=4, ndf=4, netG="resnet_6blocks", lambda_CS=-1.0)
