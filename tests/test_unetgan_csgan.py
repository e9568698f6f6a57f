"""CSGAN (CycleGAN + cycle-synthesized L1 terms) and U-Net GAN (BigGAN G + U-Net discriminator).

CSGAN's step is checked against a compact re-write of the reference's update
(KishanKancharagunta/CSGAN ``csgan.py``: CycleGAN's step with
``L1(fake_A, rec_A.detach()) * k + L1(fake_B, rec_B.detach()) * k`` in the generators' loss).
"""
import os

import pytest
import torch
import torch.nn.functional as F

import ganengine.functional as GF
from ganengine.models import CSGAN, build_model
from tests import reference_nets as R
from tests._train_utils import one_thread  # noqa: F401 (fixture)


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


# ---------------------------------------------------------------------------- U-Net GAN
def test_unet_discriminator_reference_sizes():
    """Parameter and state-dict entry counts of boschresearch/unetgan's Unet_Discriminator (run
    here at these settings; skip_init)."""
    from ganengine.models.networks_unetgan import UNetDiscriminator

    for kw, params, keys in ((dict(D_ch=64, resolution=128, D_attn="64", n_classes=1000), 32_574_788, 149),
                             (dict(D_ch=64, resolution=128, D_attn="0", n_classes=1, unconditional=True), 31_481_667, 130),
                             (dict(D_ch=64, resolution=256, D_attn="0", n_classes=1, unconditional=True), 44_067_651, 154),
                             # the reference attaches attention at index < 5 only: none at 256's 4x4 block
                             (dict(D_ch=64, resolution=256, D_attn="4", n_classes=1, unconditional=True), 44_067_651, 154)):
        with torch.device("meta"):
            net = UNetDiscriminator(skip_init=True, **kw)
        assert (sum(p.numel() for p in net.parameters()), len(net.state_dict())) == (params, keys), kw


@pytest.mark.parametrize("fused", [False, True])
def test_unet_discriminator_outputs(fused):
    from ganengine.models.networks_unetgan import UNetDiscriminator

    torch.manual_seed(0)
    D = UNetDiscriminator(D_ch=8, resolution=32, D_attn="16", n_classes=3, fused=fused)
    pix, glob = D(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    assert pix.shape == (2, 1, 32, 32) and glob.shape == (2, 1)
    if fused:
        plain = UNetDiscriminator(D_ch=8, resolution=32, D_attn="16", n_classes=3, fused=False, skip_init=True)
        plain.load_state_dict(D.state_dict())
        D.eval()
        plain.eval()
        x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 0])
        for a, b in zip(D(x, y), plain(x, y)):
            torch.testing.assert_close(a, b, atol=2e-4 * float(b.detach().abs().max()), rtol=0)
    with pytest.raises(ValueError, match="y \\(class labels"):
        D(torch.randn(1, 3, 32, 32))


def test_cutmix_maps():
    from ganengine.models.unetgan import cutmix_maps

    torch.manual_seed(0)
    m = cutmix_maps(64, 16)
    assert m.shape == (64, 1, 16, 16) and set(m.unique().tolist()) <= {0.0, 1.0}
    # every map is a box of one value in a field of the other: the ones or the zeros fill a rectangle
    def rectangle(b):
        r, c = b.any(1).nonzero(), b.any(0).nonzero()
        return len(r) == 0 or b.sum() == len(r) * len(c)

    for x in m[:, 0]:
        assert rectangle(x) or rectangle(1 - x)
    assert 0.2 < m.mean() < 0.8


def test_unetgan_discriminator_losses_are_the_reference_terms(monkeypatch):
    """D's loss terms recomputed from copies of the networks taken before the step, with the
    same z and a fixed CutMix map (hinge: the per-pixel and global terms, the augmentation and
    the consistency terms)."""
    import copy

    from ganengine.models import unetgan as U

    torch.manual_seed(0)
    model = U.UNetGAN(resolution=32, n_classes=3, G_ch=4, D_ch=4, G_attn="0", D_attn="0", G_shared=True,
                      dim_z=8)
    maps = torch.zeros(2, 1, 32, 32)
    maps[0, :, :16] = 1
    maps[1, :, :, 8:] = 1
    monkeypatch.setattr(U, "cutmix_maps", lambda n, size, device=None: maps)
    G, D = copy.deepcopy(model.G), copy.deepcopy(model.D)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([2, 0])
    torch.manual_seed(7)
    got = model.train_step({"image": x, "label": y}, model.make_optimizers())
    torch.manual_seed(7)
    z = torch.randn(2, 8)
    with torch.no_grad():
        fake = G(z, y)
        mixed = maps * x + (1 - maps) * fake
        pix, glob = D(torch.cat([fake, x, mixed]), torch.cat([y, y, y]))
    pf, pr, pm = pix.split(2)
    gf, gr, gm = glob.split(2)
    want = {"D_loss_real_2d": F.relu(1 - pr).mean(), "D_loss_fake_2d": F.relu(1 + pf).mean(),
            "D_loss_real_middle": F.relu(1 - gr).mean(), "D_loss_fake_middle": F.relu(1 + gf).mean(),
            "consistency": F.mse_loss(pm, maps * pr + (1 - maps) * pf),
            "D_loss_mixed_2d": (maps * F.relu(1 - pm) + (1 - maps) * F.relu(1 + pm)).mean(),
            "mixed_middle_loss": F.relu(1 + gm).mean()}
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-4 * (1 + float(v.abs())), rtol=0, msg=k)


def test_unetgan_cutmix_maps_drawn_once_per_iteration(monkeypatch):
    """The reference's train.py draws one map per chunk image before train(): every chunk and every
    D step of the iteration mixes with the same maps."""
    from ganengine.models import unetgan as U

    torch.manual_seed(0)
    model = U.UNetGAN(resolution=32, n_classes=3, G_ch=4, D_ch=4, G_attn="0", D_attn="0", dim_z=8,
                      num_D_steps=2, num_D_accumulations=2)
    drawn = []
    real_maps = U.cutmix_maps
    monkeypatch.setattr(U, "cutmix_maps", lambda n, size, device=None: drawn.append((n, size))
                        or real_maps(n, size, device))
    x, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([2, 0, 1, 1])
    model.train_step({"image": x, "label": y}, model.make_optimizers())
    assert drawn == [(2, 32)]


# ---------------------------------------------------------------------------- command line
TINY_SYNTH = {
    "csgan": "--netG resnet_6blocks --ngf 4 --ndf 4 --n_layers_D 2 --load_size 36 --crop_size 32 --batch_size 2",
    "sagan": "--g_conv_dim 8 --d_conv_dim 8 --z_dim 8 --batch_size 2",
    "biggan": "--image_size 32 --G_ch 4 --D_ch 4 --G_attn 0 --D_attn 16 --dim_z 16 --batch_size 2 --num_D_steps 2",
    "biggan_deep": "--image_size 32 --G_ch 8 --D_ch 8 --G_attn 0 --D_attn 0 --dim_z 8 --batch_size 2",
    "unetgan": "--image_size 32 --G_ch 4 --D_ch 4 --G_attn 0 --D_attn 0 --dim_z 16 --batch_size 2 "
               "--latent_optimisation",
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model", list(TINY_SYNTH))
def test_train_from_command_line(model, tmp_path, capsys):
    from ganengine.cli import main

    argv = (["train", model] + TINY_SYNTH[model].split() + ["--checkpoints_dir", str(tmp_path), "--name", "run",
            "--max_steps", "1", "--sample_every", "1", "--no_progress", "--tensorboard", "off"])
    assert main(argv) == 0
    run = tmp_path / "run"
    assert os.listdir(run / "samples") == ["step_00000001.png"]
    ck = torch.load(run / "step_00000001.pt", weights_only=True)
    if model in ("biggan", "biggan_deep", "unetgan"):
        assert ck["options"]["n_classes"] == 10 and ck["options"]["resolution"] == 32  # from the digits
    assert "built-in sample data" in capsys.readouterr().err


@pytest.mark.parametrize("model, extra, message", [
    ("sagan", "--image_size 32", "image_size must be 64"),
    ("biggan", "--n_classes 3", "--n_classes 3 is smaller than the 10 classes"),
    ("biggan", "--resolution 64", "--resolution 64 and --image_size 32 disagree"),
    ("biggan", "--batch_size 3 --num_D_accumulations 2 --num_D_steps 1", None),
    ("unetgan", "--gan_loss wasserstein", "gan_loss must be one of"),
])
@pytest.mark.usefixtures("one_thread")
def test_bad_values_give_clear_errors(model, extra, message, tmp_path, capsys):
    from ganengine.cli import main

    argv = (["train", model] + TINY_SYNTH[model].split() + extra.split() + ["--checkpoints_dir", str(tmp_path),
            "--max_steps", "1", "--no_progress", "--tensorboard", "off", "--sample_every", "0"])
    rc = main(argv)
    if message is None:  # the loader batch is batch_size x steps x accumulations: always divisible
        assert rc == 0
    else:
        assert rc == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("mixup", [True, False])
def test_unconditional_unetgan_generates_class_zero_everywhere(mixup):
    """--unconditional: the reference zeroes the labels, so G learns class 0 only; the D step's
    fakes (also without mixup), sampling, translate and evaluation must use class 0 too (they drew
    random classes, whose embeddings never trained), and evaluation treats the model as
    unconditional (no intra-FID, no class-balanced labels)."""
    from ganengine.metrics.evaluate_synthesis import class_count
    from ganengine.models import build_model

    torch.manual_seed(0)
    m = build_model("unetgan", resolution=32, n_classes=10, G_ch=4, D_ch=4, G_attn="0", D_attn="0", dim_z=16,
                    unconditional=True, unet_mixup=mixup)
    seen = []
    m.G.register_forward_pre_hook(lambda mod, args: seen.append(args[1].tolist()))
    m.train_step({"image": torch.rand(2, 3, 32, 32) * 2 - 1, "label": torch.tensor([3, 4])}, m.make_optimizers())
    m.generate(3)
    m.translate({"label": torch.tensor([5, 6])})
    assert seen and all(set(labels) == {0} for labels in seen), seen
    assert class_count(m) is None
    m.options["unconditional"] = False
    assert class_count(m) == 10


def test_unetgan_g_batch_is_the_chunk_and_g_loss_is_reported_as_the_reference():
    """boschresearch/unetgan's G step takes chunk-size slices of its latents whatever --G_batch_size;
    its train() reports G_loss divided by num_G_accumulations."""
    from ganengine.models import build_model

    torch.manual_seed(0)
    m = build_model("unetgan", resolution=32, n_classes=3, G_ch=4, D_ch=4, G_attn="0", D_attn="0", dim_z=16,
                    G_batch_size=5, num_G_accumulations=2, unet_mixup=False)
    sizes = []
    m.G.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    losses = m.train_step({"image": torch.rand(2, 3, 32, 32) * 2 - 1, "label": torch.tensor([0, 2])},
                          m.make_optimizers())
    assert sizes == [2, 2, 2]  # the D step's fakes, then two G passes
    want = 0.5 * (losses["G_loss_fake_2d"] + losses["G_loss_fake_middle"]) / 2
    torch.testing.assert_close(losses["G_loss"], want, rtol=1e-6, atol=0)
