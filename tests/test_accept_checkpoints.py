"""Acceptance pass (issues 19/20): what a checker running the reference code meets with
checkpoints that do not fit the arch it names. Found by loading the real references'
checkpoints (pytorch/examples DCGAN, PyTorch-GAN, heykeetae SAGAN): a generator's checkpoint
given as its discriminator was answered with nonsense arguments ("fit 'sagan_D', conv_dim=100"),
and a SAGAN reference checkpoint written at conv_dim != 64 or image_size != 64 (its constructor
accepts both, its forward cannot run them) with "a checkpoint of another architecture".
Checkpoints here come from the compact re-writes in tests/ (never the reference code)."""
import re

import pytest
import torch

import tests.reference_nets_attention as RA
import tests.reference_nets_synthesis as R
from ganengine.models import CheckpointMismatchError, load_reference_checkpoint, save_reference_checkpoint


@pytest.mark.parametrize("make,arch,fits", [
    (lambda: R.DCGAN_G(8, 4, 3), "dcgan_D", "dcgan_G"),
    (lambda: R.DCGAN_D(4, 1), "dcgan_G", "dcgan_D"),
    (lambda: R.WGAN_G(8, 12, 1), "cgan_G", "wgan_gp_G"),
    (lambda: RA.SAGANGenerator(2, conv_dim=8, z_dim=6), "sagan_D", "sagan_G"),
], ids=["dcgan_G-as-D", "dcgan_D-as-G", "wgan_gp_G-as-cgan_G", "sagan_G-as-D"])
def test_checkpoint_of_another_arch_names_that_arch(make, arch, fits):
    sd = make().state_dict()
    with pytest.raises(CheckpointMismatchError, match=f"it is a checkpoint of arch='{fits}', not '{arch}'"):
        load_reference_checkpoint(sd, arch)
    # and the named call loads it
    load_reference_checkpoint(sd, fits, **_args_from_message(sd, arch))


def _args_from_message(sd, arch):
    try:
        load_reference_checkpoint(sd, arch)
    except CheckpointMismatchError as exc:
        call = str(exc).rsplit("load_reference_checkpoint(path, ", 1)[1].rstrip(")")
    parts = [p.strip() for p in call.split(",")[1:] if p.strip()]
    return {k: eval(v) for k, v in (p.split("=") for p in parts)}  # (ints and strings written by repr)


def test_save_as_the_wrong_arch_names_the_networks_arch(tmp_path):
    net = load_reference_checkpoint(R.DCGAN_G(8, 4, 3).state_dict(), "dcgan_G", nz=8, ngf=4)
    with pytest.raises(ValueError, match="is an arch='dcgan_G' network .*not arch='dcgan_D'"):
        save_reference_checkpoint(net, tmp_path / "d.pth", "dcgan_D")


def _reference_sagan(cls, conv_dim, widths, **kwargs):
    """The reference's SAGAN at conv_dim != 64: attention widths hard-coded for conv_dim=64
    (its constructor builds that; its forward then fails)."""
    net = cls(2, conv_dim=conv_dim, **kwargs)
    net.attn1, net.attn2 = RA.Self_Attn(widths[0], "relu"), RA.Self_Attn(widths[1], "relu")
    return net


@pytest.mark.parametrize("arch,cls,widths", [("sagan_G", RA.SAGANGenerator, (128, 64)),
                                             ("sagan_D", RA.SAGANDiscriminator, (256, 512))])
def test_sagan_reference_checkpoint_at_another_conv_dim_is_explained(arch, cls, widths):
    sd = _reference_sagan(cls, 16, widths).state_dict()
    for kwargs in (dict(conv_dim=16), {}):
        with pytest.raises(CheckpointMismatchError, match=r"written by the reference at conv_dim=16.*hard-coded "
                                                          rf"widths \({widths[0]}, {widths[1]}\).*cannot run forward"):
            load_reference_checkpoint(sd, arch, **kwargs)


def test_sagan_reference_checkpoint_without_l4_is_explained():
    net = RA.SAGANGenerator(2, conv_dim=8)
    del net.l4  # the reference builds l4 only at image_size=64
    with pytest.raises(CheckpointMismatchError, match="it has no layer l4: the reference builds l4 only for "
                                                      "image_size=64"):
        load_reference_checkpoint(net.state_dict(), "sagan_G", conv_dim=8)


@pytest.mark.parametrize("kwargs,suggests", [
    # (the call as it must be typed: what differs from the given call, and the given call's own
    # non-default arguments the suggestion needs)
    (dict(ngf=4), "'resnet_9blocks', ngf=4, norm='batch')"),              # the default norm='instance'
    (dict(ngf=8, norm="batch"), "'resnet_9blocks', ngf=4, norm='batch')"),
    (dict(ngf=4, norm="batch", use_dropout=True), "'resnet_9blocks', ngf=4, norm='batch', use_dropout=False)"),
])
def test_batch_norm_resnet_checkpoint_with_wrong_arguments_gets_the_fitting_call(kwargs, suggests):
    """A --norm batch pix2pix/CycleGAN generator given with the wrong arguments: the suggestion is
    inferred from the checkpoint as read (the instance-norm patch for a wrong norm='instance' guess
    had deleted its running statistics first), and a batch norm's affine weight at conv_block.6 is
    not read as dropout. (Found loading the junyanz reference's own checkpoints.)"""
    import tests.reference_nets as ref

    sd = ref.define_G(3, 3, 4, "resnet_9blocks", norm="batch").state_dict()
    with pytest.raises(CheckpointMismatchError, match=re.escape(f"its shapes fit load_reference_checkpoint(path, {suggests}")):
        load_reference_checkpoint(sd, "resnet_9blocks", **kwargs)
    load_reference_checkpoint(sd, "resnet_9blocks", ngf=4, norm="batch")


def test_stackgan_conditioning_draws_the_references_float32_noise():
    """StackGAN's CA_NET draws eps with torch.FloatTensor(...).normal_() whatever the dtype: in
    fp64 the same seed must give the same c_code (an fp64 draw is another sequence)."""
    from ganengine.models.networks_stackgan import CANet

    mu, logvar = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    torch.manual_seed(0)
    got = CANet.reparametrize(mu, logvar)
    torch.manual_seed(0)
    eps = torch.FloatTensor(3, 6).normal_()
    assert got.dtype == torch.float64
    assert torch.equal(got, eps.double().mul(logvar.mul(0.5).exp()).add(mu))
