"""fuse() on SAGAN's SpectralNorm wrapper: sigma divides the smaller of the weight and the conv's
output (ganengine/fusion/spectral.py ``sagan_like``, mixins.SpectralNormWrapperMixin), with the
wrapper's own power iteration; a look-alike with another formula keeps the inner-conv rewrite."""
import copy

import pytest
import torch
from torch import nn

import ganengine
from ganengine.fusion.mixins import SpectralNormWrapperMixin
from tests import reference_nets_attention as R


def _layer(cin, cout, act=True):
    torch.manual_seed(0)
    mods = [R.SpectralNorm(nn.Conv2d(cin, cout, 4, 2, 1))] + ([nn.LeakyReLU(0.1)] if act else [])
    return nn.Sequential(*mods).double()


def _steps(net, xs):
    """Outputs, input and parameter gradients, and u / v after each call (train, then eval)."""
    got = []
    for i, x in enumerate(xs):
        net.train(i == 0)
        x = x.clone().requires_grad_()
        out = net(x)
        params = [p for p in net.parameters() if p.requires_grad]
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                    [x] + params)
        got.append([out.detach()] + [g.detach() for g in grads]
                   + [t.detach().clone() for k, t in net.state_dict().items() if k.endswith(("_u", "_v"))])
    return got


# "auto" divides the output at (8, 16, 8, 8) -> 32 (output 4096 < weight 8192 elements) and at
# (2, 4, 8, 8) -> 8 without the activation (256 < 512), the weight at (8, 4, 16, 16) -> 8
# (4096 > 512); "output" / "weight" force a side
@pytest.mark.parametrize("shape,cout,act", [((8, 16, 8, 8), 32, True), ((8, 4, 16, 16), 8, True),
                                            ((2, 4, 8, 8), 8, False)])
def test_wrapper_divides_the_smaller_side_with_the_same_numbers(shape, cout, act):
    net = _layer(shape[1], cout, act)
    twin = copy.deepcopy(net)
    fused, report = ganengine.fuse(net, return_report=True)
    assert report.get("wrapped_conv+leaky_relu" if act else "wrapped_conv") == 1
    assert isinstance(fused[0], SpectralNormWrapperMixin)
    assert fused[0].module.weight_bar is net[0].module.weight_bar       # the same Parameters
    assert list(fused.state_dict()) == list(twin.state_dict())
    _same_on_every_side(twin, fused, shape)


def _same_on_every_side(twin, fused, shape):
    xs = [torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    # fp64, the same formula with the division moved across a linear map: a few roundings of
    # the conv's reduction (C_in * 16 terms) apart
    tol = 64 * shape[1] * 16 * torch.finfo(torch.float64).eps
    for side in ("auto", "output", "weight"):
        object.__setattr__(fused[0], "_ganengine_sigma_side", side)
        a_net, b_net = copy.deepcopy(twin), copy.deepcopy(fused)   # both from the same state
        for w_step, g_step in zip(_steps(a_net, xs), _steps(b_net, xs)):
            for a, b in zip(w_step, g_step):
                torch.testing.assert_close(b, a, rtol=tol, atol=tol * a.abs().max().item())


@pytest.mark.parametrize("shape,cout", [((8, 32, 2, 2), 16), ((2, 4, 4, 4), 2)])
def test_transposed_wrapper_divides_the_smaller_side(shape, cout):
    """SAGAN G's SN transposed convs (no activation after the wrapper: BatchNorm): "auto" divides
    the output at (8, 32, 2, 2) -> 16 (8x16x4x4 = 2048 < weight 8192), the weight at (2, 4, 4, 4)
    -> 2 (128 < output 2x2x8x8 = 256)."""
    torch.manual_seed(0)
    net = nn.Sequential(R.SpectralNorm(nn.ConvTranspose2d(shape[1], cout, 4, 2, 1))).double()
    twin = copy.deepcopy(net)
    fused, report = ganengine.fuse(net, return_report=True)
    assert report.get("wrapped_conv") == 1 and isinstance(fused[0], SpectralNormWrapperMixin)
    _same_on_every_side(twin, fused, shape)


def test_lookalike_wrapper_keeps_the_inner_conv_rewrite():
    """Same structure, another function (sigma doubled): the probes reject the wrapper forward;
    the inner-conv rewrite (verified itself) is used instead, and the numbers stay the model's."""
    class Doubled(R.SpectralNorm):
        def forward(self, *args):
            u, v, w = (getattr(self.module, self.name + s) for s in ("_u", "_v", "_bar"))
            h = w.data.shape[0]
            for _ in range(self.power_iterations):
                v.data = R._l2n(torch.mv(torch.t(w.view(h, -1).data), u.data))
                u.data = R._l2n(torch.mv(w.view(h, -1).data, v.data))
            sigma = 2 * u.dot(w.view(h, -1).mv(v))
            setattr(self.module, self.name, w / sigma.expand_as(w))
            return self.module.forward(*args)

    torch.manual_seed(0)
    net = nn.Sequential(Doubled(nn.Conv2d(16, 32, 4, 2, 1)), nn.LeakyReLU(0.1))
    twin = copy.deepcopy(net)
    fused, report = ganengine.fuse(net, return_report=True)
    assert report.get("wrapped_conv+leaky_relu") == 1
    assert not isinstance(fused[0], SpectralNormWrapperMixin)
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(fused(x), twin(x))
