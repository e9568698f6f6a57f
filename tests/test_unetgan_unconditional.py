"""U-Net GAN's unconditional generator (boschresearch/unetgan ``BigGAN.Generator`` with
``unconditional=True``, the setting of its CelebA / FFHQ recipes and pretrained model): with
``hier`` the full z feeds the linear layer (dim_z not rounded to the slots) and every block's
ccbn, which is self-modulated (gain and bias are Linear-ReLU-Linear MLPs of z, plain nn.Linear).

Checked against a compact re-write of that generator below (written from the reference's
description, on the BigGAN layers of tests/reference_nets_attention.py), and through training,
sampling, export and resume; also the option checks of CSGAN's lambda_CS and U-Net GAN's
lambda_consistency.
"""
import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ganengine.models import CheckpointMismatchError, build_model, load_reference_checkpoint, save_reference_checkpoint
from ganengine.models.networks_biggan import BigGANGenerator
from tests import reference_nets_attention as RA
from tests._train_utils import one_thread  # noqa: F401 (fixture)


# ---------------------------------------------------------------------------- the re-write
class SelfModulatedBN(nn.Module):
    """ccbn(self_modulation=True): BN(x) * (1 + gain(z)) + bias(z), gain/bias MLPs of z."""

    def __init__(self, output_size, input_size, eps=1e-5):
        super().__init__()

        def mlp():
            return nn.Sequential(nn.Linear(input_size, input_size), nn.ReLU(),
                                 nn.Linear(input_size, output_size, bias=False))

        self.gain, self.bias = mlp(), mlp()
        self.eps = eps
        self.register_buffer("stored_mean", torch.zeros(output_size))
        self.register_buffer("stored_var", torch.ones(output_size))

    def forward(self, x, z):
        scale = (1 + self.gain(z))[:, :, None, None]
        shift = self.bias(z)[:, :, None, None]
        return F.batch_norm(x, self.stored_mean, self.stored_var, None, None, self.training, 0.1, self.eps) * scale \
            + shift


class UnconditionalGenerator(nn.Module):
    """The reference's unconditional G (hier, no shared embedding): z -> linear -> blocks(h, z)."""

    def __init__(self, G_ch=64, dim_z=128, resolution=128, G_attn="64", num_G_SVs=1, num_G_SV_itrs=1,
                 BN_eps=1e-5, SN_eps=1e-12, G_init="ortho"):
        super().__init__()
        ins, outs = ([G_ch * m for m in x] for x in RA.G_MULTS[resolution])
        res = [8 * 2 ** i for i in range(len(outs))]
        self.dim_z, self.bottom_width = dim_z, 4
        conv = functools.partial(RA.SNConv2d, kernel_size=3, padding=1, num_svs=num_G_SVs, num_itrs=num_G_SV_itrs,
                                 eps=SN_eps)
        linear = functools.partial(RA.SNLinear, num_svs=num_G_SVs, num_itrs=num_G_SV_itrs, eps=SN_eps)
        norm = functools.partial(SelfModulatedBN, input_size=dim_z, eps=BN_eps)
        act = nn.ReLU()
        self.shared = nn.Identity()
        self.linear = linear(dim_z, ins[0] * 16)
        stages = []
        for i in range(len(outs)):
            stage = [RA.GBlock(ins[i], outs[i], conv, norm, act, functools.partial(F.interpolate, scale_factor=2))]
            if res[i] in RA._attn_set(G_attn):
                stage.append(RA.Attention(outs[i], conv))
            stages.append(nn.ModuleList(stage))
        self.blocks = nn.ModuleList(stages)
        self.output_layer = nn.Sequential(RA.bn(outs[-1]), act, conv(outs[-1], 3))
        RA._init(self, G_init)

    def forward(self, z, y=None):
        h = self.linear(z).view(z.size(0), -1, 4, 4)
        for stage in self.blocks:
            for block in stage:
                h = block(h, z)
        return torch.tanh(self.output_layer(h))


SMALL = dict(G_ch=4, dim_z=20, resolution=32, G_attn="16")  # (dim_z not a multiple of the 4 slots)


def _pair(fused, **kw):
    args = {**SMALL, **kw}
    torch.manual_seed(0)
    ref = UnconditionalGenerator(**args)
    torch.manual_seed(0)
    ours = BigGANGenerator(**args, hier=True, unconditional=True, fused=fused)
    return ref, ours


# ---------------------------------------------------------------------------- network
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_unconditional_generator_matches_the_reference(fused, training):
    ref, ours = _pair(fused)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert "blocks.0.0.bn1.gain.0.weight" in ours.state_dict() and "shared.weight" not in ours.state_dict()
    assert ours.dim_z == 20 and ours.linear.weight.shape[1] == 20
    for k, v in ref.state_dict().items():  # the same initialisation from the same seed
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    ref.train(training)
    ours.train(training)
    # stored statistics not at their initial values, so eval mode normalises with something
    with torch.no_grad():
        for m_ref, m_ours in zip(ref.modules(), ours.modules()):
            if hasattr(m_ref, "stored_var"):
                m_ref.stored_mean.uniform_(-0.5, 0.5)
                m_ref.stored_var.uniform_(0.5, 2.0)
                m_ours.stored_mean.copy_(m_ref.stored_mean)
                m_ours.stored_var.copy_(m_ref.stored_var)
    for _ in range(2):  # the second forward sees the SN / BN buffers the first wrote
        z = torch.randn(3, 20)
        want = ref(z)
        got = ours(z, torch.zeros(3, dtype=torch.long))
        if fused:
            torch.testing.assert_close(got, want, rtol=0, atol=2e-4)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, rtol=0, atol=0 if not fused else 1e-5, msg=k)


@pytest.mark.usefixtures("one_thread")
def test_unconditional_generator_ignores_labels_and_takes_none():
    _, G = _pair(True)
    G.eval()
    z = torch.randn(2, 20)
    torch.testing.assert_close(G(z, None), G(z, torch.tensor([3, 7])), rtol=0, atol=0)


@pytest.mark.usefixtures("one_thread")
def test_fused_gradients_equal_the_reference_composition():
    """Eval mode (as docs/synthesis_attention.md's fused tests): the self-modulated gains run
    through ganengine's conditional batch norm + ReLU op."""
    _, plain = _pair(False)
    _, fused = _pair(True)
    plain.eval()
    fused.eval()
    z = torch.randn(3, 20)
    out_p, out_f = plain(z), fused(z)
    torch.testing.assert_close(out_f, out_p, rtol=0, atol=2e-4)
    gp = torch.autograd.grad(out_p.square().sum(), list(plain.parameters()))
    gf = torch.autograd.grad(out_f.square().sum(), list(fused.parameters()))
    for (name, _), a, b in zip(plain.named_parameters(), gf, gp):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * (1 + float(b.abs().max())), msg=name)


def test_reference_parameter_counts():
    """Counted on the reference (boschresearch/unetgan BigGAN.Generator, unconditional=True,
    hier=True, G_shared=False): 128x128 at G_ch 64, dim_z 128, G_attn '64'; 256x256 at G_attn '0'."""
    for kw, count, keys in ((dict(resolution=128, G_attn="64"), 33_753_220, 165),
                            (dict(resolution=256, G_attn="0"), 39_043_203, 180)):
        with torch.device("meta"):
            G = BigGANGenerator(G_ch=64, dim_z=128, hier=True, unconditional=True, skip_init=True, **kw)
        assert sum(p.numel() for p in G.parameters()) == count
        assert len(G.state_dict()) == keys


def test_combinations_the_reference_cannot_run_are_errors():
    with pytest.raises(ValueError, match="unconditional=True needs hier=True"):
        BigGANGenerator(**SMALL, hier=False, unconditional=True)
    with pytest.raises(ValueError, match="unconditional=True takes G_shared=False"):
        BigGANGenerator(**SMALL, hier=True, G_shared=True, unconditional=True)
    base = dict(resolution=32, n_classes=3, G_ch=4, D_ch=4, G_attn="0", D_attn="0", dim_z=16)
    with pytest.raises(ValueError, match="--unconditional needs --hier"):
        build_model("unetgan", **base, unconditional=True, hier=False)
    with pytest.raises(ValueError, match="--unconditional takes no --G_shared"):
        build_model("unetgan", **base, unconditional=True, G_shared=True, hier=True, shared_dim=8)


# ---------------------------------------------------------------------------- reference checkpoints
@pytest.mark.usefixtures("one_thread")
def test_reference_checkpoint_round_trip(tmp_path):
    ref, _ = _pair(False)
    ref.eval()
    sd = ref.state_dict()
    G = load_reference_checkpoint(sd, "biggan_G", unconditional=True, hier=True, **SMALL)
    z = torch.randn(2, 20)
    torch.testing.assert_close(G(z, None), ref(z), rtol=0, atol=2e-4)
    path = tmp_path / "G.pth"
    save_reference_checkpoint(G, path, "biggan_G")
    back = UnconditionalGenerator(**SMALL)
    back.load_state_dict(torch.load(path, weights_only=True))  # strict: the reference's keys
    for k, v in sd.items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    # given without unconditional=True, the error names the call that fits
    with pytest.raises(CheckpointMismatchError, match=r"its shapes fit load_reference_checkpoint\(path, 'biggan_G', "
                                                      r".*hier=True.*unconditional=True\)"):
        load_reference_checkpoint(sd, "biggan_G", hier=True, G_shared=True, **SMALL)
    # and a conditional checkpoint given with unconditional=True
    torch.manual_seed(0)
    cond = BigGANGenerator(**SMALL, hier=True, shared_dim=8, n_classes=3).state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"its shapes fit .*unconditional=False"):
        load_reference_checkpoint(cond, "biggan_G", unconditional=True, hier=True, **SMALL)


def test_conditional_state_dict_into_the_unconditional_generator_is_explained():
    torch.manual_seed(0)
    cond = BigGANGenerator(**SMALL, hier=True, shared_dim=8, n_classes=1).state_dict()
    _, G = _pair(True)
    with pytest.raises(ValueError, match="written by the old unconditional generator"):
        G.load_state_dict(cond)


# ---------------------------------------------------------------------------- the model
UNET = dict(resolution=32, n_classes=1, G_ch=4, D_ch=4, G_attn="0", D_attn="0", dim_z=16, batch_size=2)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("extra", [dict(), dict(latent_optimisation=True, ema=True, use_ema=True, unet_mixup=False)])
def test_unconditional_unetgan_trains_and_samples(extra):
    torch.manual_seed(0)
    o = {k: v for k, v in UNET.items() if k != "batch_size"}
    m = build_model("unetgan", **o, unconditional=True, **extra)
    assert m.options["hier"] is True and m.options["G_shared"] is False
    assert m.G.unconditional and m.latent_dim() == 16
    before = [p.detach().clone() for p in m.G.parameters()]
    out = m.train_step({"image": torch.rand(2, 3, 32, 32) * 2 - 1, "label": torch.tensor([0, 0])},
                       m.make_optimizers())
    assert all(math.isfinite(float(v)) for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, m.G.parameters()))
    imgs = m.generate(3)
    assert imgs.shape == (3, 3, 32, 32) and torch.isfinite(imgs).all()
    assert m.translate({"label": torch.tensor([0, 0])}).shape == (2, 3, 32, 32)
    from ganengine.metrics.evaluate_synthesis import class_count

    assert class_count(m) is None


# ---------------------------------------------------------------------------- command line
def _train(tmp_path, *extra):
    from ganengine.cli import main

    argv = ["train", "unetgan", "--image_size", "32", "--G_ch", "4", "--D_ch", "4", "--G_attn", "0", "--D_attn", "0",
            "--dim_z", "20", "--batch_size", "2", "--unconditional", "--checkpoints_dir", str(tmp_path),
            "--name", "run", "--no_progress", "--tensorboard", "off", *extra]
    return main(argv)


@pytest.mark.usefixtures("one_thread")
def test_command_line_train_sample_export_resume(tmp_path, capsys):
    from ganengine.cli import main

    # (the built-in digits' defaults turn --G_shared on for the conditional G, not with --unconditional)
    assert _train(tmp_path, "--max_steps", "1", "--sample_every", "1", "--ema", "--use_ema",
                  "--latent_optimisation") == 0
    run = tmp_path / "run"
    ck = torch.load(run / "step_00000001.pt", weights_only=True)
    assert ck["options"]["unconditional"] and ck["options"]["hier"] and not ck["options"]["G_shared"]
    assert "blocks.0.0.bn1.gain.0.weight" in ck["networks"]["G_ema"]
    assert os.listdir(run / "samples") == ["step_00000001.png"]
    out = tmp_path / "G_ema.pth"
    # the reference's unconditional generator is built at 128 and 256 only: the CLI refuses 32
    # (session 15); the keys still fit this file's transcription, written through the Python API
    assert main(["export", "--checkpoint", str(run), "--format", "state_dict", "--reference", "--output",
                 str(out)]) == 2
    assert "--resolution 32" in capsys.readouterr().err and not out.exists()
    from ganengine.models import save_reference_checkpoint
    from ganengine.train.checkpoint import load_model

    save_reference_checkpoint(load_model(str(run))[0].G_ema, out, "biggan_G")
    ref = UnconditionalGenerator(G_ch=4, dim_z=20, resolution=32, G_attn="0")
    ref.load_state_dict(torch.load(out, weights_only=True))  # strict
    assert main(["export", "--checkpoint", str(run), "--format", "torchscript", "--output",
                 str(tmp_path / "G.pt")]) == 0
    assert main(["sample", "--checkpoint", str(run), "--output", str(tmp_path / "grid.png"), "--n", "2"]) == 0
    capsys.readouterr()
    assert _train(tmp_path, "--max_steps", "2", "--sample_every", "0", "--ema", "--use_ema",
                  "--latent_optimisation", "--resume") == 0
    assert os.path.isfile(run / "step_00000002.pt")


@pytest.mark.usefixtures("one_thread")
def test_old_format_unconditional_checkpoint_is_explained(tmp_path, capsys):
    """ganengine's earlier --unconditional trained a conditional G (shared embedding) on class 0:
    its checkpoints say unconditional=True with G_shared / without hier. Resuming, exporting or
    loading one says so, not a KeyError."""
    from ganengine.cli import main
    from ganengine.train.checkpoint import load_model

    assert _train(tmp_path, "--unconditional", "false", "--max_steps", "1", "--sample_every", "0",
                  "--save_every", "1") == 0  # the built-in digits: --G_shared --hier
    path = tmp_path / "run" / "step_00000001.pt"
    state = torch.load(path, weights_only=True)
    assert state["options"]["G_shared"] and "blocks.0.0.bn1.gain.weight" in state["networks"]["G"]
    state["options"]["unconditional"] = True  # what the old --unconditional run recorded
    torch.save(state, path)
    with pytest.raises(ValueError, match="written by the old unconditional generator"):
        load_model(str(path))
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(path), "--format", "state_dict", "--reference"]) == 2
    assert "written by the old unconditional generator" in capsys.readouterr().err
    # resumed as an unconditional run: the options differ (G_shared) because the G is the old one
    assert _train(tmp_path, "--G_shared", "false", "--max_steps", "2", "--sample_every", "0",
                  "--resume", str(path)) == 2
    err = capsys.readouterr().err
    assert "written by the old unconditional generator" in err and "KeyError" not in err
    # an old run without --hier (the CLI's default then), resumed with --unconditional (hier on now)
    state["options"].update(hier=False, G_shared=False)
    torch.save(state, path)
    assert _train(tmp_path, "--G_shared", "false", "--max_steps", "2", "--sample_every", "0",
                  "--resume", str(path)) == 2
    assert "written by the old unconditional generator" in capsys.readouterr().err


# ---------------------------------------------------------------------------- option checks
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, "1", True, None])
def test_lambda_options_are_finite_numbers(value):
    with pytest.raises(ValueError, match=r"CSGAN: lambda_CS must be a finite number >= 0"):
        build_model("csgan", ngf=4, ndf=4, netG="resnet_6blocks", crop_size=32, n_layers_D=2, lambda_CS=value)
    with pytest.raises(ValueError, match=r"UNetGAN: lambda_consistency must be a finite number >= 0"):
        build_model("unetgan", resolution=32, n_classes=3, G_ch=4, D_ch=4, G_attn="0", D_attn="0", dim_z=16,
                    lambda_consistency=value)


def test_lambda_options_accept_finite_non_negative_numbers():
    for v in (0, 0.0, 2):
        build_model("csgan", ngf=4, ndf=4, netG="resnet_6blocks", crop_size=32, n_layers_D=2, lambda_CS=v)
        build_model("unetgan", resolution=32, n_classes=3, G_ch=4, D_ch=4, G_attn="0", D_attn="0", dim_z=16,
                    lambda_consistency=v)
