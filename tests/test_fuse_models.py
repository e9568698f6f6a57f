"""ganengine.fuse on the reference networks as users have them (compact re-writes: junyanz
CycleGAN / pix2pix, yunjey StarGAN, a BigGAN generator and discriminator, SAGAN's): the optimiser
is built before ``fuse()``, as the references do; five training steps on the fused network give
the losses and the weights (and buffers) the unfused twin gets. Also what is left unfused."""
import copy

import pytest
import torch
from torch import nn

import ganengine
from tests import reference_nets_attention as R
from tests import reference_nets as ref


def _trajectory(make, batch, steps=5, lr=0.01):
    torch.manual_seed(0)
    model = make()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)      # built before fuse()
    opt_twin = torch.optim.SGD(twin.parameters(), lr=lr, momentum=0.9)
    fused, report = ganengine.fuse(model, return_report=True)
    assert list(fused.state_dict()) == list(twin.state_dict())
    losses = {"fused": [], "twin": []}
    for step in range(steps):
        inputs = batch(step)
        for name, net, o in (("fused", fused, opt), ("twin", twin, opt_twin)):
            torch.manual_seed(100 + step)   # the same dropout masks
            o.zero_grad()
            out = net(*inputs)
            out = out if isinstance(out, tuple) else (out,)
            loss = sum(t.float().square().mean() for t in out)
            loss.backward()
            o.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["twin"]), rtol=1e-3, atol=1e-5)
    for (k, a), b in zip(fused.state_dict().items(), twin.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-5, msg=k)
        else:
            assert torch.equal(a, b), k
    _casts_as_a_module(fused, twin, batch(steps))
    return fused, report


def _casts_as_a_module(fused, twin, inputs):
    """The fused model moves and casts as any module (nn.Module._apply, under .to / .double /
    .float / .cpu): in fp64, with the same weights, its outputs are the unfused model's within
    1e-7 relative, far above
    fp64's rounding (2**-53 per op, these nets' depth and conditioning) and far below any error
    in the fused arithmetic."""
    # (in place: SAGAN's own SpectralNorm leaves a non-leaf weight attribute that deepcopy refuses)
    f64, t64 = fused.to("cpu").double(), twin.double()
    assert all(p.dtype == torch.float64 for p in f64.parameters())
    f64.load_state_dict(t64.state_dict())  # (the two trained apart: fp32 rounding moved them apart)
    inputs = [t.double() if t.is_floating_point() else t for t in inputs]
    outs = []
    for net in (f64, t64):
        torch.manual_seed(7)
        out = net(*inputs)
        outs.append(out if isinstance(out, tuple) else (out,))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    assert all(p.dtype == torch.float32 for p in f64.float().parameters())
    twin.float()


def _images(n, c, s):
    return lambda step: (torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(step)),)


@pytest.fixture(autouse=True)
def conv_routes_always():
    """Tiny networks get no faster conv route under the measured thresholds, so fuse would leave
    their convs to PyTorch: force the GEMM form to train through the fused convs too."""
    import ganengine.ops.conv as cv

    with cv.gemm_policy("always"):
        yield


@pytest.fixture
def always_winograd(monkeypatch):
    import ganengine.ops.conv3x3 as cm

    monkeypatch.setattr(cm, "MIN_CHANNELS", 0)
    monkeypatch.setattr(cm, "MIN_TILES", 0)


def test_cyclegan_resnet_generator_and_patchgan(always_winograd):
    g, report = _trajectory(lambda: ref.define_G(3, 3, 4, "resnet_6blocks", norm="instance"), _images(1, 3, 32))
    assert not any(type(m) in (nn.InstanceNorm2d, nn.Conv2d) for m in g.modules()), "all norms and convs fused"
    assert report["reflection_pad+conv3x3"] == 12 and report["instance_norm"] == 6
    _trajectory(lambda: ref.define_D(3, 4, "basic", norm="instance"), _images(1, 3, 32))


def test_pix2pix_unet_and_patchgan_batch_norm():
    g, report = _trajectory(lambda: ref.define_G(3, 3, 4, "unet_128", norm="batch", use_dropout=True),
                            _images(2, 3, 128))
    assert report["batch_norm"] > 0 and not any(type(m) is nn.BatchNorm2d for m in g.modules())
    _, report = _trajectory(lambda: ref.define_D(6, 4, "basic", norm="batch"), _images(2, 6, 32))
    assert report["batch_norm+act"] == 3


def test_stargan():
    def batch(step):
        gen = torch.Generator().manual_seed(step)
        return torch.randn(2, 3, 16, 16, generator=gen), torch.rand(2, 3, generator=gen).round()

    _trajectory(lambda: ref.StarGenerator(conv_dim=4, c_dim=3, repeat_num=2), batch)
    _trajectory(lambda: ref.StarDiscriminator(image_size=16, conv_dim=4, c_dim=3, repeat_num=3), _images(2, 3, 16))


def test_biggan_generator_and_discriminator(monkeypatch):
    from ganengine.fusion import upsample
    monkeypatch.setattr(upsample, "MIN_PIXELS", 0)   # the sub-pixel form on these small maps too

    def g_batch(step):
        gen = torch.Generator().manual_seed(step)
        return torch.randn(3, 20, generator=gen), torch.randint(0, 5, (3,), generator=gen)

    class WithShared(nn.Module):   # the reference's training step calls G(z, G.shared(y))
        def __init__(self):
            super().__init__()
            self.G = R.BigGANGenerator(G_ch=8, dim_z=20, resolution=32, G_attn="16", n_classes=5, hier=True,
                                       shared_dim=8)

        def forward(self, z, labels):
            return self.G(z, self.G.shared(labels))

    _, report = _trajectory(WithShared, g_batch)
    assert report["graph:conditional_batch_norm+act"] == 6 and report["biggan_self_attention"] == 1
    assert report["batch_norm_like+act"] == 1 and report["conv_module"] == 14
    # each GBlock's upsample -> conv1 (3x3) and upsample -> conv_sc (1x1): ganengine/fusion/upsample.py
    assert report["graph:upsample+conv3x3"] == 3 and report["graph:upsample+conv1x1"] == 3

    def d_batch(step):
        gen = torch.Generator().manual_seed(step)
        return torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 5, (2,), generator=gen)

    # the reference D's first loss is ~3e3 at this width: lr 1e-4 diverges (fused or not), 1e-6 trains
    _, report = _trajectory(lambda: R.BigGANDiscriminator(D_ch=8, resolution=32, D_attn="16", n_classes=5), d_batch,
                            lr=1e-6)
    assert report["graph:conv2d+act"] == 4


def test_sagan_generator_and_discriminator():
    _, report = _trajectory(lambda: R.SAGANGenerator(2, z_dim=8, conv_dim=8), lambda s: (torch.randn(2, 8),))
    assert report["wrapped_conv"] == 4 and report["batch_norm+act"] == 4
    _, report = _trajectory(lambda: R.SAGANDiscriminator(conv_dim=8), _images(2, 3, 64))
    assert report["wrapped_conv+leaky_relu"] == 4 and report["sagan_self_attention"] == 2


@pytest.mark.parametrize("fused", [False, True])
def test_ganengine_sagan_networks_without_attention_maps(fused):
    """ganengine's own SAGAN networks call ``SelfAttn(x, return_attention)``, which returns
    ``(out, None)`` for False (as the SAGAN model builds them): fuse() replaced it with a
    SelfAttention2d probed on ``m(x)`` alone, whose ``forward(x, False)`` returns ``out``, and the
    network unpacked the batch (a crash at batch 2, silently split images before that). Blocks
    whose forward takes more than the input are declined now."""
    from ganengine.models import SAGANDiscriminator, SAGANGenerator

    torch.manual_seed(0)
    for net, x in ((SAGANGenerator(image_size=64, z_dim=8, conv_dim=8, fused=fused), torch.randn(2, 8)),
                   (SAGANDiscriminator(image_size=64, conv_dim=8, fused=fused), torch.randn(4, 3, 64, 64))):
        net.return_attention = False
        want = copy.deepcopy(net)(x)  # (a forward steps the power iteration and the BN statistics)
        got, report = ganengine.fuse(net, return_report=True)
        out = got(x)
        assert isinstance(out, tuple) and len(out) == 3
        for a, b in zip(out, want):  # (the unfused network returns its maps anyway: the reference's formula)
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert "sagan_self_attention" not in report


@pytest.mark.parametrize("inplace", [False, True])
def test_models_built_with_their_optimiser_inside(inplace):
    """The junyanz models and StarGAN's Solver build the optimiser in __init__: assigning the
    fused network back (``self.netG = fuse(self.netG)``) must keep it training."""
    class Solver:
        def __init__(self):
            self.G = ref.StarGenerator(conv_dim=4, c_dim=3, repeat_num=1)
            self.g_optimizer = torch.optim.Adam(self.G.parameters(), 1e-3, betas=(0.5, 0.999))

    s = Solver()
    s.G = ganengine.fuse(s.G, inplace=inplace)
    before = [p.detach().clone() for p in s.G.parameters()]
    x, c = torch.randn(2, 3, 16, 16), torch.ones(2, 3)
    s.g_optimizer.zero_grad()
    s.G(x, c).mean().backward()
    s.g_optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, s.G.parameters()) if p.grad is not None)


@pytest.mark.parametrize("name", ["biggan_D", "cyclegan_G", "sagan_D"])
def test_fused_models_compile_fullgraph(name, always_winograd):
    """torch.compile(fullgraph=True) traces the fused models whole (aot_eager: the trace and the
    autograd graph, without inductor's codegen): no graph break in the fused modules' routing (a
    C++ route decision dynamo cannot trace once broke BigGAN D's graph), and the compiled model
    computes what the eager fused model does (fp32 roundings of other conv routes: 1e-4)."""
    torch.manual_seed(0)
    make, x = {
        "biggan_D": (lambda: R.BigGANDiscriminator(D_ch=8, resolution=32, D_attn="16", n_classes=5),
                     (torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,)))),
        "cyclegan_G": (lambda: ref.define_G(3, 3, 4, "resnet_6blocks", norm="instance"), (torch.randn(1, 3, 32, 32),)),
        "sagan_D": (lambda: R.SAGANDiscriminator(conv_dim=8), (torch.randn(2, 3, 64, 64),)),
    }[name]
    fused = ganengine.fuse(make())
    state = {k: v.clone() for k, v in fused.state_dict().items()}  # (SAGAN's SN steps u, v every call)
    want = fused(*x)
    fused.load_state_dict(state)
    torch._dynamo.reset()
    got = torch.compile(fused, fullgraph=True, backend="aot_eager")(*x)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
