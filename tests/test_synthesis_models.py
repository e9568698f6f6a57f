"""DCGAN, WGAN, WGAN-GP, cGAN, AC-GAN, ADC-GAN, InfoGAN: networks and training steps against
compact re-writes of the references (tests/reference_nets_synthesis.py), reference checkpoints,
the shared SynthesisGAN pieces, FusedRMSprop, resume and the command line."""
import copy
import os

import re

import pytest
import torch
import torch.nn.functional as F

import tests.reference_nets_synthesis as R
from ganengine.models import (CheckpointMismatchError, build_model, build_network, load_reference_checkpoint,
                              save_reference_checkpoint)
from ganengine.models.base import StepContext
from ganengine.models.fused_rmsprop import FusedRMSprop
from tests._train_utils import one_thread  # noqa: F401


def nparams(m):
    return sum(p.numel() for p in m.parameters())


# counts computed by running the reference code at its defaults (pytorch/examples dcgan, PyTorch-GAN scripts)
@pytest.mark.parametrize("arch,count", [
    ("dcgan_G", 3576704), ("dcgan_D", 2765568), ("wgan_gp_G", 1510032), ("wgan_gp_D", 533505),
    ("cgan_G", 1757412), ("cgan_D", 1055845), ("acgan_G", 1050985), ("acgan_D", 103243),
    ("infogan_G", 836993), ("infogan_D", 104269)])
def test_parameter_count_at_reference_defaults(arch, count):
    with torch.device("meta"):
        assert nparams(build_network(arch, init_type=None)) == count


# ------------------------------------------------------------------ networks vs the reference designs
N = 3
LAB = torch.tensor([2, 0, 9])


def _img(c, s):
    return torch.randn(N, c, s, s)


# arch, kwargs, reference builder (same seed + init as the reference script), inputs
NETS = [
    ("dcgan_G", dict(nz=8, ngf=4, nc=3), lambda: R.DCGAN_G(8, 4, 3).apply(R.dcgan_weights_init),
     lambda: (torch.randn(N, 8, 1, 1),)),
    ("dcgan_D", dict(ndf=4, nc=3), lambda: R.DCGAN_D(4, 3).apply(R.dcgan_weights_init), lambda: (_img(3, 64),)),
    ("wgan_gp_G", dict(latent_dim=8, img_size=12, channels=1), lambda: R.WGAN_G(8, 12, 1),
     lambda: (torch.randn(N, 8),)),
    ("wgan_gp_D", dict(img_size=12, channels=2), lambda: R.WGAN_D(12, 2), lambda: (_img(2, 12),)),
    ("cgan_G", dict(latent_dim=8, n_classes=10, img_size=12, channels=1), lambda: R.CGAN_G(8, 10, 12, 1),
     lambda: (torch.randn(N, 8), LAB)),
    ("cgan_D", dict(n_classes=10, img_size=12, channels=1), lambda: R.CGAN_D(10, 12, 1), lambda: (_img(1, 12), LAB)),
    ("acgan_G", dict(latent_dim=8, n_classes=10, img_size=16, channels=3),
     lambda: R.ACGAN_G(8, 10, 16, 3).apply(R.pytorch_gan_weights_init_normal), lambda: (torch.randn(N, 8), LAB)),
    ("acgan_D", dict(n_classes=10, img_size=16, channels=3),
     lambda: R.ACGAN_D(10, 16, 3).apply(R.pytorch_gan_weights_init_normal), lambda: (_img(3, 16),)),
    ("infogan_G", dict(latent_dim=8, n_classes=10, code_dim=2, img_size=16, channels=1),
     lambda: R.InfoGAN_G(8, 10, 2, 16, 1).apply(R.pytorch_gan_weights_init_normal),
     lambda: (torch.randn(N, 8), F.one_hot(LAB, 10).float(), torch.rand(N, 2) * 2 - 1)),
    ("infogan_D", dict(n_classes=10, code_dim=2, img_size=16, channels=1),
     lambda: R.InfoGAN_D(10, 2, 16, 1).apply(R.pytorch_gan_weights_init_normal), lambda: (_img(1, 16),)),
]
IDS = [n[0] for n in NETS]


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _close(a, b, atol=1e-5, rtol=1e-4):
    for x, y in zip(_tuple(a), _tuple(b)):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


def _randomize(net):
    """Non-trivial batch-norm statistics and weights, so eval mode is tested for real."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return net


@pytest.mark.parametrize("arch,kwargs,make_ref,make_inputs", NETS, ids=IDS)
def test_same_tree_and_initial_weights_as_the_reference(arch, kwargs, make_ref, make_inputs):
    torch.manual_seed(3)
    ref = make_ref()
    torch.manual_seed(3)
    ours = build_network(arch, fused=True, **kwargs)
    sd_ref, sd = ref.state_dict(), ours.state_dict()
    assert list(sd) == list(sd_ref)
    for k in sd_ref:
        assert sd[k].shape == sd_ref[k].shape, k
        assert torch.equal(sd[k], sd_ref[k]), k  # the same draws in the same order: the reference's init


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("arch,kwargs,make_ref,make_inputs", NETS, ids=IDS)
def test_outputs_and_buffer_updates_equal_the_reference(arch, kwargs, make_ref, make_inputs, fused, one_thread):
    ref = _randomize(make_ref())
    net = load_reference_checkpoint(ref.state_dict(), arch, fused=fused, **kwargs)
    inputs = make_inputs()
    for mode in ("eval", "train"):
        getattr(ref, mode)()
        getattr(net, mode)()
        torch.manual_seed(5)  # dropout masks: the same draws in the same order
        want = ref(*inputs)
        torch.manual_seed(5)
        got = net(*inputs)
        _close(got, want)
    for (k, a), b in zip(net.state_dict().items(), ref.state_dict().values()):  # running statistics moved alike
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("arch,kwargs,make_ref,make_inputs", [n for n in NETS if n[0].endswith("_D")],
                         ids=[n[0] for n in NETS if n[0].endswith("_D")])
def test_discriminators_take_channels_last_images(arch, kwargs, make_ref, make_inputs, one_thread):
    """`--channels_last` hands the networks NHWC weights and batches: the discriminators that
    flatten images or features (WGAN, cGAN, InfoGAN) used .view(), which NHWC cannot give (a
    crash at the first step with more than one channel). Same outputs as NCHW."""
    kwargs = dict(kwargs, channels=3) if "channels" in kwargs else kwargs
    net = build_network(arch, **kwargs).eval()
    inputs = list(make_inputs())
    inputs[0] = torch.randn(inputs[0].shape[0], 3, *inputs[0].shape[2:])
    want = net(*inputs)
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    got = net_cl(inputs[0].contiguous(memory_format=torch.channels_last), *inputs[1:])
    _close(got, want)


def test_fused_networks_run_on_the_fused_modules():
    import ganengine.nn as gnn
    from ganengine.models.synthesis_layers import UpsampleConv3x3

    kinds = lambda net: {type(m).__name__ for m in net.modules()}  # noqa: E731
    assert {"BatchNormAct2d", "ConvTranspose2d"} <= kinds(build_network("dcgan_G", ngf=4))
    assert isinstance(build_network("dcgan_G", ngf=4).main[0], gnn.ConvTranspose2d)  # the GEMM form on 1x1
    assert isinstance(build_network("dcgan_D", ndf=4).main[0], gnn.Conv2dAct)
    g = build_network("acgan_G", latent_dim=8, img_size=16)
    assert isinstance(g.conv_blocks[2], UpsampleConv3x3) and isinstance(g.conv_blocks[1], torch.nn.Identity)
    assert g.conv_blocks[0].activation == "none" and g.conv_blocks[3].activation == "leaky_relu"
    assert "BatchNormAct1d" in kinds(build_network("cgan_G", latent_dim=8, img_size=8))
    assert not ({"BatchNormAct2d", "UpsampleConv3x3"} & kinds(build_network("acgan_G", fused=False)))


def test_upsample_conv_fold_gradient_reaches_the_3x3_weight(one_thread):
    from ganengine.models.synthesis_layers import UpsampleConv3x3

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 4, 3, 1, 1).double()
    folded = UpsampleConv3x3.from_module(copy.deepcopy(conv))
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    want = conv(F.interpolate(x, scale_factor=2))
    got = folded(x)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    dw, dx = torch.autograd.grad(want, (conv.weight, x), g)
    dw2, dx2 = torch.autograd.grad(got, (folded.weight, x), g)
    torch.testing.assert_close(dw2, dw)
    torch.testing.assert_close(dx2, dx)


# ------------------------------------------------------------------ reference checkpoints
@pytest.mark.parametrize("arch,kwargs,make_ref,make_inputs", NETS, ids=IDS)
def test_checkpoint_round_trip_through_the_reference(tmp_path, arch, kwargs, make_ref, make_inputs):
    torch.manual_seed(1)
    net = _randomize(build_network(arch, **kwargs)).eval()
    path = tmp_path / "net.pth"
    save_reference_checkpoint(net, path, arch)
    ref = make_ref()
    ref.load_state_dict(torch.load(path, weights_only=True))  # strict, as the reference loads it
    ref.eval()
    inputs = make_inputs()
    _close(net(*inputs), ref(*inputs))
    again = load_reference_checkpoint(str(path), arch, **kwargs)
    _close(again(*inputs), ref(*inputs))


@pytest.mark.parametrize("sizes", [dict(latent_dim=4, n_classes=4, code_dim=2), dict(latent_dim=1, n_classes=1, code_dim=1),
                                   dict(latent_dim=5, n_classes=4, code_dim=3)])
def test_small_infogan_generators_save_and_their_files_suggest_a_call(tmp_path, sizes):
    """Only latent_dim + n_classes + code_dim is stored: a total under the defaults' 12 + 1 still
    saves, and the mismatch error suggests a split that loads (each size >= 1)."""
    net = build_network("infogan_G", img_size=16, **sizes)
    save_reference_checkpoint(net, tmp_path / "g.pth", "infogan_G")
    with pytest.raises(CheckpointMismatchError) as info:
        load_reference_checkpoint(str(tmp_path / "g.pth"), "infogan_G", img_size=16)
    call = re.search(r"load_reference_checkpoint\(path, (.*)\)$", str(info.value))
    assert call, str(info.value)
    suggested = eval(f"dict(arch={call.group(1)})")
    back = load_reference_checkpoint(str(tmp_path / "g.pth"), suggested.pop("arch"), **suggested)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("arch,given,ckpt_kwargs,expect", [
    ("dcgan_G", dict(ngf=8), dict(ngf=4), "ngf=4"),
    ("dcgan_D", dict(), dict(ndf=4, nc=1), "nc=1"),
    ("wgan_gp_G", dict(latent_dim=8), dict(latent_dim=16), "latent_dim=16"),
    ("cgan_D", dict(), dict(n_classes=5), "n_classes=5"),
    ("acgan_G", dict(latent_dim=8, img_size=16), dict(latent_dim=8, img_size=32), "img_size=32"),
    ("acgan_D", dict(), dict(n_classes=4, img_size=16), "n_classes=4"),
    ("infogan_D", dict(img_size=16), dict(code_dim=3, img_size=16), "code_dim=3"),
    # the user's own non-default arguments stay in the suggested call (it must work as printed)
    ("acgan_D", dict(n_classes=5, img_size=32, channels=3), dict(n_classes=5, img_size=16, channels=3),
     "img_size=16"),
])
def test_mismatched_checkpoints_name_the_key_and_a_fitting_call(arch, given, ckpt_kwargs, expect):
    with torch.device("meta"):
        sd = build_network(arch, init_type=None, **ckpt_kwargs).state_dict()
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in sd.items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_reference_checkpoint(sd, arch, **given)
    msg = str(info.value)
    assert "key '" in msg and "has shape" in msg and expect in msg and arch in msg
    call = re.search(r"load_reference_checkpoint\(path, (.*)\)$", msg)
    assert call, msg
    suggested = eval(f"dict(arch={call.group(1)})")  # (the printed call's arguments)
    load_reference_checkpoint(sd, suggested.pop("arch"), **suggested)  # runs as printed


def test_unknown_arguments_and_bad_sizes():
    with pytest.raises(TypeError, match="architecture arguments"):
        build_network("dcgan_G", latent_dim=3)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_network("acgan_D", img_size=28)
    with pytest.raises(ValueError, match="positive int"):
        build_network("cgan_G", n_classes=0)
    g = build_network("wgan_gp_G", latent_dim=8, img_size=8)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        g(torch.randn(2, 9))
    with pytest.raises(ValueError, match="labels"):
        build_network("cgan_G", latent_dim=8, img_size=8)(torch.randn(2, 8), torch.zeros(2, 3).long())


# ------------------------------------------------------------------ training steps vs the reference loops
B = 4


class _Feed:
    """Hands the model the reference loop's random draws, in the model's order."""

    def __init__(self, model, draws):
        self.draws = list(draws)
        take = lambda *a, **k: self.draws.pop(0)  # noqa: E731
        for name in ("sample_z", "sample_labels", "sample_code", "sample_categories"):
            if hasattr(model, name):
                setattr(model, name, take)


def _maxdiff(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _case(name):
    g = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if name == "dcgan":
        opts = dict(nz=8, ngf=4, ndf=4)
        nets = (R.DCGAN_G(8, 4, 3), R.DCGAN_D(4, 3))
        opt = lambda G, D: (R.adam(G.parameters()), R.adam(D.parameters()))  # noqa: E731

        def draw(i):
            real, z = rnd(B, 3, 64, 64).tanh(), rnd(B, 8)
            return {"image": real}, [z], lambda G, D, o: R.dcgan_step(G, D, o[0], o[1], real, z.view(B, 8, 1, 1))
    elif name in ("wgan", "wgan_gp"):
        opts = dict(latent_dim=8, img_size=12, n_critic=2)
        nets = (R.WGAN_G(8, 12, 1), R.WGAN_D(12, 1))
        if name == "wgan":
            opt = lambda G, D: (torch.optim.RMSprop(G.parameters(), lr=5e-5), torch.optim.RMSprop(D.parameters(), lr=5e-5))  # noqa: E731
        else:
            opt = lambda G, D: (R.adam(G.parameters()), R.adam(D.parameters()))  # noqa: E731

        def draw(i):
            real, z, alpha = rnd(B, 1, 12, 12).tanh(), rnd(B, 8), torch.rand(B, 1, 1, 1, generator=g)
            if name == "wgan":
                return {"image": real}, [z], lambda G, D, o: R.wgan_step(G, D, o[0], o[1], real, z, i, n_critic=2)
            _case.alpha = alpha
            return {"image": real}, [z], lambda G, D, o: R.wgan_gp_step(G, D, o[0], o[1], real, z, alpha, i, n_critic=2)
    elif name in ("cgan", "acgan"):
        opts = dict(latent_dim=8, img_size=16)
        nets = (R.CGAN_G(8, 10, 16, 1), R.CGAN_D(10, 16, 1)) if name == "cgan" else (R.ACGAN_G(8, 10, 16, 1), R.ACGAN_D(10, 16, 1))
        opt = lambda G, D: (R.adam(G.parameters()), R.adam(D.parameters()))  # noqa: E731
        step = R.cgan_step if name == "cgan" else R.acgan_step

        def draw(i):
            real, labels = rnd(B, 1, 16, 16).tanh(), torch.randint(0, 10, (B,), generator=g)
            z, gl = rnd(B, 8), torch.randint(0, 10, (B,), generator=g)
            return {"image": real, "label": labels}, [z, gl], lambda G, D, o: step(G, D, o[0], o[1], real, labels, z, gl)
    else:  # infogan
        opts = dict(latent_dim=8, img_size=16)
        nets = (R.InfoGAN_G(8, 10, 2, 16, 1), R.InfoGAN_D(10, 2, 16, 1))
        opt = lambda G, D: R.infogan_optimizers(G, D)  # noqa: E731

        def draw(i):
            real = rnd(B, 1, 16, 16).tanh()
            d1 = (rnd(B, 8), torch.randint(0, 10, (B,), generator=g), torch.rand(B, 2, generator=g) * 2 - 1)
            d2 = (rnd(B, 8), torch.randint(0, 10, (B,), generator=g), torch.rand(B, 2, generator=g) * 2 - 1)
            return ({"image": real}, [d1[0], d1[1], d1[2], d2[1], d2[0], d2[2]],
                    lambda G, D, o: R.infogan_step(G, D, *o, real, (d1, d2)))
    return opts, nets, opt, draw


def _run_against_reference(name, fused, steps):
    opts, (refG, refD), make_opt, draw = _case(name)
    torch.manual_seed(0)
    model = build_model(name, **opts, fused=fused, fused_optimizer=fused)
    refG.load_state_dict(model.G.state_dict())
    refD.load_state_dict(model.D.state_dict())
    ref_opts, optimizers = make_opt(refG, refD), model.make_optimizers()
    if name == "wgan_gp":  # the penalty's interpolation weights: the reference's
        import ganengine.models.wgan as W
        orig = W.GF.gradient_penalty
    diffs = []
    for i in range(steps):
        batch, draws, ref_step = draw(i)
        _Feed(model, draws)
        if name == "wgan_gp":
            W.GF.gradient_penalty = lambda D, a, b, weight=1.0: orig(D, a, b, weight, alpha=_case.alpha)
        try:
            torch.manual_seed(100 + i)
            got = model.train_step(batch, optimizers, StepContext())
        finally:
            if name == "wgan_gp":
                W.GF.gradient_penalty = orig
        torch.manual_seed(100 + i)
        want = ref_step(refG, refD, ref_opts)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v.detach(), atol=1e-4, rtol=1e-4, msg=f"{name} step {i}: {k}")
        diffs.append((_maxdiff(model.G, refG), _maxdiff(model.D, refD)))
    return diffs


SYNTH = ["dcgan", "wgan", "wgan_gp", "cgan", "acgan", "infogan"]


@pytest.mark.parametrize("name", SYNTH)
def test_train_step_is_the_reference_loop(name, one_thread):
    """fused=False (the reference's layers and per-parameter optimisers): bit for bit; fused: the
    same to rounding (fused Adam/RMSprop, fused norms, the folded upsampling conv)."""
    steps = 3 if name not in ("wgan", "wgan_gp") else 4  # n_critic 2: two G steps
    assert all(d == (0.0, 0.0) for d in _run_against_reference(name, False, steps)), name
    for dg, dd in _run_against_reference(name, True, steps):
        # Adam normalises each update, so a rounding difference in a tiny gradient can move a
        # weight by up to lr (2e-4) per step; running variances are O(1)
        assert dg < 5 * 2e-4 * steps and dd < 5 * 2e-4 * steps, (name, dg, dd)


def _tiny(name, **kw):
    base = {"dcgan": dict(nz=8, ngf=4, ndf=4, nc=1), "wgan": dict(latent_dim=8, img_size=8),
            "wgan_gp": dict(latent_dim=8, img_size=8), "cgan": dict(latent_dim=8, img_size=8, n_classes=3),
            "acgan": dict(latent_dim=8, img_size=16, n_classes=3), "adcgan": dict(latent_dim=8, img_size=16, n_classes=3),
            "infogan": dict(latent_dim=8, img_size=16, n_classes=3)}[name]
    return build_model(name, **base, **kw)


def _batch(model, n=4):
    o = model.options
    size = 64 if model.MODEL_NAME == "dcgan" else o["img_size"]
    c = o.get("channels", o.get("nc"))
    return {"image": torch.rand(n, c, size, size) * 2 - 1, "label": torch.randint(0, o.get("n_classes", 3), (n,))}


@pytest.mark.parametrize("name", SYNTH + ["adcgan"])
def test_every_network_trains_and_losses_are_finite(name, one_thread):
    torch.manual_seed(0)
    model = _tiny(name, **({"n_critic": 1} if "wgan" in name else {}))
    before = {n: copy.deepcopy(getattr(model, n).state_dict()) for n in model.network_names}
    opts = model.make_optimizers()
    batch = _batch(model)
    for _ in range(2):
        losses = model.train_step(batch, opts)
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    for n in model.network_names:
        after = getattr(model, n).state_dict()
        assert any(not torch.equal(before[n][k], after[k]) for k in after if after[k].is_floating_point()), n
    assert model.num_steps == 2


def test_adcgan_losses_are_the_papers():
    torch.manual_seed(0)
    model = _tiny("adcgan", lambda_adc=0.5)
    assert model.D.aux_layer[0].out_features == 6  # 2K classes: real and fake per label
    logits, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    g = model._g_class_loss(logits, y)
    want = 0.5 * (F.cross_entropy(logits, y) - F.cross_entropy(logits, y + 3))
    torch.testing.assert_close(g, want)
    real, fake = model._d_class_losses(logits, y, logits, y)
    torch.testing.assert_close(real, 0.5 * F.cross_entropy(logits, y))
    torch.testing.assert_close(fake, 0.5 * F.cross_entropy(logits, y + 3))
    with pytest.raises(ValueError, match="lambda_adc"):
        _tiny("adcgan", lambda_adc=-1.0)


@pytest.mark.parametrize("name", ["wgan", "wgan_gp"])
@pytest.mark.parametrize("n", [5, 6, 8])
def test_wasserstein_critic_output_bias_stays_put(name, n):
    """The Wasserstein loss does not depend on the critic's output bias: its gradient is exactly 0
    in the reference's two passes, and must stay so (one pass over cat([real, fake]) left a rounding
    residue at batch sizes other than powers of two, which Adam turned into a drift of ~lr a step)."""
    torch.manual_seed(0)
    model = _tiny(name, n_critic=1)
    last = [m for m in model.D.modules() if isinstance(m, torch.nn.Linear)][-1]
    before = last.bias.detach().clone()
    opts = model.make_optimizers()
    for _ in range(3):
        model.train_step(_batch(model, n), opts)
    if name == "wgan":  # (its clipping still applies)
        before = before.clamp(-model.options["clip_value"], model.options["clip_value"])
    assert torch.equal(last.bias.detach(), before)


@pytest.mark.parametrize("name, option", [("adcgan", "lambda_adc"), ("wgan_gp", "lambda_gp"), ("wgan", "clip_value"),
                                          ("infogan", "lambda_con")])
@pytest.mark.parametrize("value", [True, float("nan"), -0.5, "1"])
def test_loss_weights_must_be_finite_nonnegative_numbers(name, option, value):
    """A bool passed as a weight (True for 1.0) was accepted."""
    with pytest.raises(ValueError, match=f"{option} must be a finite number >= 0"):
        _tiny(name, **{option: value})


def test_wgan_clips_the_critic_and_counts_critic_steps(one_thread):
    torch.manual_seed(0)
    model = _tiny("wgan", n_critic=3, clip_value=0.005)
    opts = model.make_optimizers()
    assert isinstance(opts["D"], FusedRMSprop)
    batch = _batch(model)
    seen = [sorted(model.train_step(batch, opts)) for _ in range(4)]
    assert ["D_loss", "G_loss"] == seen[0] == seen[3] and seen[1] == seen[2] == ["D_loss"]
    assert all(p.abs().max() <= 0.005 for p in model.D.parameters())
    state = model.extra_state()
    other = _tiny("wgan", n_critic=3, clip_value=0.005)
    other.load_extra_state(state)
    assert other.num_steps == 4


def test_fused_rmsprop_is_torch_rmsprop():
    torch.manual_seed(0)
    ps = [torch.randn(30, 20), torch.randn(7), torch.randn(3, 1, 2, 2)]
    ref = [p.clone().requires_grad_(True) for p in ps]
    ours = [p.clone().requires_grad_(True) for p in ps]
    o_ref, o_ours = torch.optim.RMSprop(ref, lr=1e-2, alpha=0.9), FusedRMSprop(ours, lr=1e-2, alpha=0.9)
    for it in range(6):
        for a, b in zip(ref, ours):
            g = torch.randn_like(a) * 10.0 ** (it % 3 - 1)
            a.grad, b.grad = g.clone(), g.clone()
        ours[1].grad = None if it == 2 else ours[1].grad  # a parameter without a gradient is skipped
        ref[1].grad = None if it == 2 else ref[1].grad
        o_ref.step()
        o_ours.step()
        for a, b in zip(ref, ours):
            # one rounding per operation, per element: a few ulps of the update
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    assert float(o_ours.state[ours[0]]["step"]) == 6 and float(o_ours.state[ours[1]]["step"]) == 5
    torch.testing.assert_close(o_ours.state[ours[0]]["square_avg"], o_ref.state[ref[0]]["square_avg"])
    with pytest.raises(ValueError, match="alpha"):
        FusedRMSprop(ours, alpha=1.0)


def test_fused_rmsprop_interop_layouts_casts_and_compile():
    """State dicts in both directions with torch.optim.RMSprop (settings it does not run refused),
    a gradient in another layout than its parameter, a model cast mid-run, torch.compile."""
    torch.manual_seed(1)
    w = torch.randn(4, 3, 2, 2)
    ref, ours = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    o_ref, o_ours = torch.optim.RMSprop([ref], lr=1e-2), FusedRMSprop([ours], lr=1e-2)
    for _ in range(2):
        g = torch.randn_like(w).contiguous(memory_format=torch.channels_last)  # (another layout)
        ref.grad, ours.grad = g.clone(), g.clone()
        o_ref.step()
        o_ours.step()
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    for t in (ref, ours):  # the model made channels_last mid-run: square_avg follows the layout
        t.data = t.data.contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        g = torch.randn_like(w)
        ref.grad, ours.grad = g.clone(), g.clone()
        o_ref.step()
        o_ours.step()
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(o_ours.state[ours]["square_avg"], o_ref.state[ref]["square_avg"])
    back = torch.optim.RMSprop([ref.detach().clone().requires_grad_(True)], lr=1e-2)
    back.load_state_dict(o_ours.state_dict())  # a FusedRMSprop state dict runs in torch's RMSprop
    back.param_groups[0]["params"][0].grad = torch.ones_like(w)
    back.step()
    again = FusedRMSprop([ours], lr=1e-2)
    again.load_state_dict(o_ref.state_dict())
    for bad in (dict(momentum=0.9), dict(centered=True), dict(weight_decay=0.1)):
        other = torch.optim.RMSprop([torch.zeros(2, requires_grad=True)], **bad)
        with pytest.raises(ValueError, match=f"{next(iter(bad))}="):
            FusedRMSprop([torch.zeros(2, requires_grad=True)]).load_state_dict(other.state_dict())
    net = torch.nn.Linear(3, 2)
    opt = FusedRMSprop(net.parameters(), lr=1e-2)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    net.double()  # cast mid-run: the state follows the parameters
    opt.zero_grad()
    net(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    assert opt.state[net.weight]["square_avg"].dtype == torch.float64
    p_ref, p_ours = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    o_ref, o_ours = torch.optim.RMSprop([p_ref], lr=1e-2), FusedRMSprop([p_ours], lr=1e-2)
    step = torch.compile(o_ours.step, backend="aot_eager")
    for _ in range(2):
        g = torch.randn_like(w)
        p_ref.grad, p_ours.grad = g.clone(), g.clone()
        o_ref.step()
        step()
    torch.testing.assert_close(p_ours, p_ref, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ the shared synthesis pieces
def test_generate_grids_and_interpolations_leave_the_training_state_alone():
    torch.manual_seed(0)
    model = _tiny("acgan")
    state = copy.deepcopy(model.G.state_dict())
    rng = torch.get_rng_state()
    rows = model.sample_rows(n=5, max_rows=10)
    assert len(rows) == 3 and all(r.shape == (5, 1, 16, 16) for r in rows)
    assert model.sample_row_labels(3, ["a", "b", "c"]) == ["a", "b", "c"]
    # --n_classes above the data's class count: the extra rows are labelled, not refused
    assert model.sample_row_labels(3, ["a", "b"]) == ["a", "b", "class 2"]
    again = model.sample_rows(n=5)
    assert all(torch.equal(a, b) for a, b in zip(rows, again))  # fixed noise: the same grid every time
    inter = model.interpolation_rows(n_rows=2, steps=4)
    assert len(inter) == 2 and inter[0].shape == (4, 1, 16, 16)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.G.state_dict().items():  # batch-norm statistics restored after sampling
        assert torch.equal(v, state[k]), k
    out = model.translate({"image": torch.zeros(2, 1, 16, 16), "label": torch.tensor([1, 2])})
    assert out.shape == (2, 1, 16, 16) and out.abs().max() <= 1
    with pytest.raises(ValueError, match="class labels must lie in"):
        model.generate(2, labels=torch.tensor([0, 3]))
    # soft / multi-hot rows and fractional indices have no class: refused, not argmax'd / truncated
    with pytest.raises(ValueError, match="one 1 per row"):
        model.generate(2, labels=torch.tensor([[0.2, 0.8, 0.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="whole numbers"):
        model.generate(2, labels=torch.tensor([0.5, 1.0]))
    assert model.generate(2, labels=torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])).shape[0] == 2


def test_infogan_rows_vary_each_code_along_the_row():
    torch.manual_seed(0)
    model = _tiny("infogan")
    rows = model.sample_rows(n=4, max_rows=10)
    labels = model.sample_row_labels(len(rows))
    assert len(rows) == 3 + 2 * 2 and len(labels) == len(rows)
    assert labels[3].startswith("c1") and labels[5].startswith("c2")
    assert not torch.equal(rows[3][0], rows[3][-1])  # the code changes along the row
    # --max_rows 2: two category rows, then the code rows, labelled so (were "category 0..6")
    rows = model.sample_rows(n=4, max_rows=2)
    assert model.sample_row_labels(len(rows)) == ["category 0", "category 1", "c1 -1..1, cat 0", "c1 -1..1, cat 1",
                                                  "c2 -1..1, cat 0", "c2 -1..1, cat 1"]


@pytest.mark.parametrize("call,match", [
    (lambda m: m.generate(), "give n or z"),
    (lambda m: m.generate(2, labels=3), r"class labels must lie in \[0, 3\)"),
    (lambda m: m.generate(2, labels=-1), r"class labels must lie in \[0, 3\)"),
    (lambda m: m.generate(3, labels=torch.tensor([0, 1])), r"one category or one per latent \(3\), got 2"),
    (lambda m: m.generate(2, code=torch.zeros(2, 5)), r"code must be \(2, code_dim=2\)"),
])
def test_infogan_generate_checks_its_arguments(call, match):
    model = _tiny("infogan")
    with pytest.raises(ValueError, match=match):
        call(model)
    assert model.generate(2, labels=torch.tensor([2, 0])).shape[0] == 2 and model.generate(2, labels=1).shape[0] == 2


def test_ema_follows_the_generator(one_thread):
    torch.manual_seed(0)
    model = _tiny("cgan", ema=True, ema_decay=0.5, ema_start=2)
    assert model.network_names == ["G", "D", "G_ema"] and not any(p.requires_grad for p in model.G_ema.parameters())
    opts = model.make_optimizers()
    assert set(opts) == {"G", "D"}
    batch = _batch(model)
    model.train_step(batch, opts)  # step 1 < ema_start 2: a copy
    assert all(torch.equal(a, b) for a, b in zip(model.G_ema.parameters(), model.G.parameters()))
    before = [p.clone() for p in model.G_ema.parameters()]
    model.train_step(batch, opts)
    for b, e, g in zip(before, model.G_ema.parameters(), model.G.parameters()):
        torch.testing.assert_close(e, 0.5 * b + 0.5 * g)
    assert model.sampling_generator() is model.G_ema


def test_options_are_checked():
    with pytest.raises(TypeError, match="unknown option"):
        build_model("dcgan", latent_dim=3)
    with pytest.raises(ValueError, match="n_critic"):
        build_model("wgan_gp", n_critic=0)
    model = _tiny("acgan")
    with pytest.raises(ValueError, match="at least 2 images"):
        model.train_step(_batch(model, n=1), model.make_optimizers())
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        model.train_step({"image": torch.zeros(4, 3, 16, 16), "label": torch.zeros(4).long()}, model.make_optimizers())
    with pytest.raises(ValueError, match="'label'"):
        model.train_step({"image": torch.zeros(4, 1, 16, 16)}, model.make_optimizers())


# ------------------------------------------------------------------ engine: resume, command line
def _cfg(name, run_dir, **kw):
    from ganengine.train import TrainConfig

    model_opts = {"wgan_gp": dict(latent_dim=8, img_size=16, n_critic=2),
                  "acgan": dict(latent_dim=8, img_size=16)}[name]
    base = dict(model=name, model_options=model_opts, data_options=dict(image_size=16, channels=1, no_flip=True),
                run_dir=str(run_dir), batch_size=4, max_steps=4, sample_every=0, save_every=0, print_freq=1,
                progress=False, tensorboard="off", seed=0, deterministic=True)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("name", ["wgan_gp", "acgan"])
def test_resume_is_exact(tmp_path, name, one_thread):
    from ganengine.train import train
    from ganengine.train.checkpoint import load

    full = train(_cfg(name, tmp_path / "full"))
    train(_cfg(name, tmp_path / "part", max_steps=2))
    resumed = train(_cfg(name, tmp_path / "part", resume="latest"))
    a, b = load(full["checkpoint"]), load(resumed["checkpoint"])
    assert a["step"] == b["step"] == 4 and a["extra"] == b["extra"] == {"num_steps": 4}
    for net in a["networks"]:
        for k, v in a["networks"][net].items():
            assert torch.equal(v, b["networks"][net][k]), (net, k)


def _cli(capsys, *args):
    """``ganengine ARGS`` in this process -> (exit code, stdout, stderr)."""
    from ganengine.cli import main

    try:
        rc = main(list(args))
    except SystemExit as exc:  # --help
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_trains_samples_and_reports_errors(tmp_path, capsys, one_thread):
    rc, _, err = _cli(capsys, "train", "acgan", "--latent_dim", "8", "--img_size", "16", "--batch_size", "4",
                      "--max_steps", "2", "--sample_every", "2", "--checkpoints_dir", str(tmp_path), "--no_progress",
                      "--tensorboard", "off")
    assert rc == 0, err
    assert "built-in sample data" in err
    state = torch.load(tmp_path / "acgan_sample" / "step_00000002.pt", weights_only=True)
    assert state["options"]["n_classes"] == 10 and state["data"]["classes"][3] == "Three"
    assert (tmp_path / "acgan_sample" / "samples" / "step_00000002.png").exists()
    grid = tmp_path / "grid.png"
    rc, _, err = _cli(capsys, "sample", "--checkpoint", str(tmp_path / "acgan_sample"), "--output", str(grid), "--n",
                      "3", "--interpolate", "4")
    assert rc == 0, err
    assert grid.exists() and (tmp_path / "grid_interpolation.png").exists()
    rc, _, err = _cli(capsys, "train", "dcgan", "--imageSize", "32", "--max_steps", "1", "--checkpoints_dir", str(tmp_path))
    assert rc == 2 and "64x64" in err
    rc, _, err = _cli(capsys, "train", "cgan", "--n_classes", "3", "--max_steps", "1", "--checkpoints_dir", str(tmp_path))
    assert rc == 2 and "smaller than the 10 classes" in err


def test_cli_help_lists_the_reference_options(capsys):
    for model, flags in (("dcgan", ["--nz", "--ngf", "--ndf", "--lr", "--beta1", "--imageSize", "--batchSize"]),
                         ("wgan", ["--latent_dim", "--img_size", "--channels", "--n_critic", "--clip_value",
                                   "(default: 5e-05; sample data: 0.0002)", "(default: 0.01)"]),
                         ("wgan_gp", ["--lambda_gp", "--b1", "--b2", "--n_critic"]),
                         ("infogan", ["--code_dim", "--n_classes", "--lambda_con"]),
                         ("adcgan", ["--lambda_adc", "--ema"])):
        rc, out, _ = _cli(capsys, "train", model, "--help")
        assert rc == 0
        for f in flags:
            assert f in out, (model, f)


def test_ddp_gloo_two_processes_stay_in_sync(tmp_path):
    """InfoGAN's heads sit out some passes (find_unused_parameters), WGAN-GP's penalty takes a
    gradient inside each process; the all-reduce keeps the ranks identical."""
    from tests.test_cli_train import _ddp_worker, _free_port, _same

    common = ["--checkpoints_dir", str(tmp_path), "--no_progress", "--tensorboard", "off", "--deterministic",
              "--sample_every", "0", "--batch_size", "4", "--max_steps", "3", "--latent_dim", "8", "--img_size", "16"]
    runs = [("infogan", ["train", "infogan", "--name", "infogan"] + common),
            ("wgan_gp", ["train", "wgan_gp", "--name", "wgan_gp", "--n_critic", "2"] + common)]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), runs, str(tmp_path)), nprocs=2, join=True)
    for tag, _ in runs:
        r = [torch.load(tmp_path / f"{tag}_rank{k}.pt", weights_only=True) for k in range(2)]
        assert _same(*r), tag


@pytest.mark.parametrize("name", ["wgan", "wgan_gp", "cgan"])
def test_batch_norm_generators_refuse_one_image_in_training_mode(name):
    """1-D batch norm in training mode (how the references sample): one image per call is a clear
    error naming the count; in eval mode (running statistics) one image works."""
    model = _tiny(name)
    assert model.min_sample_batch == 2
    with pytest.raises(ValueError, match=f"must be >= 2 for {name}, got 1"):
        model.generate(1)
    assert model.generate(2).shape[0] == 2
    model.G.eval()
    assert model.min_sample_batch == 1 and model.generate(1).shape[0] == 1
    assert _tiny("dcgan").min_sample_batch == 1


def test_network_classes_named_in_the_docs_import_from_ganengine_models():
    """docs/synthesis*.md name the networks as ganengine.models classes; every __all__ entry resolves."""
    import re

    import ganengine.models as M

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")
    named = set()
    for doc in ("synthesis.md", "synthesis_attention.md"):
        with open(os.path.join(root, doc)) as f:
            named |= set(re.findall(r"`([A-Z][A-Za-z]*(?:Generator|Discriminator))`", f.read()))
    assert named and not [n for n in named if not hasattr(M, n)], sorted(n for n in named if not hasattr(M, n))
    assert all(hasattr(M, n) for n in M.__all__)


@pytest.mark.parametrize("name", ["dcgan", "acgan"])
def test_nan_discriminator_outputs_give_nan_losses_not_an_error(name, one_thread):
    """BCELoss's CPU kernel raises on a NaN probability (diverged weights), before the training
    engine's NaN stop (step, last good checkpoint, exit 3) could see a loss: the step now returns
    NaN losses (the engine's stop is tested in tests/test_train.py)."""
    from ganengine.models.dcgan import bce

    p = torch.tensor([0.5, float("nan")], requires_grad=True)
    loss = bce(p, 1.0)
    assert loss.isnan() and loss.requires_grad
    assert bce(torch.tensor([0.25, 1.0]), 1.0) == F.binary_cross_entropy(torch.tensor([0.25, 1.0]), torch.ones(2))
    with pytest.raises(RuntimeError, match="between 0 and 1"):  # (not NaN: a D without its sigmoid, said so)
        bce(torch.tensor([0.5, 1.5]), 1.0)
    model = _tiny(name)
    with torch.no_grad():
        for p in model.D.parameters():
            p.fill_(float("nan"))
    losses = model.train_step(_batch(model), model.make_optimizers())
    assert any(torch.as_tensor(v).isnan().any() for v in losses.values())


@pytest.mark.parametrize("name", ["acgan", "infogan"])
def test_seeded_model_starts_from_the_reference_scripts_weights(name):
    """acgan.py / infogan.py build G and D, then initialise G and then D: one seed gave other
    weights than the script's (each network was initialised as it was built)."""
    kw = dict(latent_dim=8, img_size=16, n_classes=3)
    torch.manual_seed(0)
    if name == "acgan":
        G, D = R.ACGAN_G(8, 3, 16, 1), R.ACGAN_D(3, 16, 1)
    else:
        G, D = R.InfoGAN_G(8, 3, 2, 16, 1), R.InfoGAN_D(3, 2, 16, 1)
    G.apply(R.pytorch_gan_weights_init_normal)
    D.apply(R.pytorch_gan_weights_init_normal)
    for fused in (True, False):
        torch.manual_seed(0)
        model = build_model(name, fused=fused, **kw)
        for ref, net in ((G, model.G), (D, model.D)):
            want, got = ref.state_dict(), net.state_dict()
            assert want.keys() == got.keys()
            for k in want:
                assert torch.equal(want[k], got[k]), (name, fused, k)
