"""fuse()'s upsample -> conv graph rules (ganengine/fusion/upsample.py): the sub-pixel form of a
3x3 conv after a 2x nearest upsample and the 1x1 conv moved before the upsample, against the fp64
composition (error bounds) and, in BigGAN's GBlock, against the unfused block (outputs,
gradients, power-iteration buffers, keys, Parameter identity); and where the rules must not fire."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ganengine
from ganengine.fusion import upsample as U
from tests import reference_nets_attention as R
from tests._tolerance import assert_within_bound


@pytest.fixture
def always_subpixel(monkeypatch):
    """The sub-pixel form runs from MIN_PIXELS small-map pixels (a cost threshold): force it on
    the tests' small maps so its numbers are what is checked."""
    monkeypatch.setattr(U, "MIN_PIXELS", 0)


@pytest.mark.parametrize("n, cin, cout, h, w", [(2, 5, 7, 3, 5), (1, 3, 4, 1, 1), (3, 8, 2, 4, 2)])
@pytest.mark.parametrize("sigma", [False, True])
def test_subpixel_conv3x3_matches_the_upsampled_conv(n, cin, cout, h, w, sigma):
    torch.manual_seed(0)
    x = torch.randn(n, cin, h, w, requires_grad=True)
    wt = torch.randn(cout, cin, 3, 3, requires_grad=True)
    b = torch.randn(cout, requires_grad=True)
    s = torch.tensor(1.7, requires_grad=True) if sigma else None
    out = U.subpixel_conv3x3(x, wt, b, s)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, wt, b))
    s64 = s.detach().double().requires_grad_() if sigma else torch.tensor(1.0, dtype=torch.float64)
    ref = F.conv2d(F.interpolate(x64, scale_factor=2), w64 / s64, b64, padding=1)
    assert out.shape == ref.shape == (n, cout, 2 * h, 2 * w)
    scale = F.conv2d(F.interpolate(x64.detach().abs(), scale_factor=2), w64.detach().abs(), b64.detach().abs(), padding=1)
    # a dot product of 9*cin terms (+ bias); c = 3: the summed taps round once more, the division
    # by sigma once, the bias add once
    assert_within_bound(out, ref, scale, n=9 * cin + 1, acc_dtype=torch.float32, c=3.0, name="forward")
    g = torch.randn_like(ref)
    (out * g.float()).sum().backward()
    (ref * g).sum().backward()
    gs = g.abs()
    gx_scale = torch.nn.grad.conv2d_input(F.interpolate(x64, scale_factor=2).shape, w64.detach().abs(), gs, padding=1)
    gx_scale = F.avg_pool2d(gx_scale, 2) * 4    # the upsample's adjoint sums 4 children
    assert_within_bound(x.grad, x64.grad, gx_scale, n=9 * cout + 4, acc_dtype=torch.float32, c=3.0, name="grad x")
    gw_scale = torch.nn.grad.conv2d_weight(F.interpolate(x64.detach().abs(), scale_factor=2), w64.shape, gs, padding=1)
    assert_within_bound(wt.grad, w64.grad, gw_scale, n=4 * n * h * w + 4, acc_dtype=torch.float32, c=3.0, name="grad w")
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-5 * gs.sum().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_subpixel_conv3x3_low_precision(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 4).to(dtype)
    w = torch.randn(3, 6, 3, 3).to(dtype)
    b = torch.randn(3).to(dtype)
    out = U.subpixel_conv3x3(x, w, b)
    assert out.dtype == dtype
    x64, w64, b64 = x.double(), w.double(), b.double()
    ref = F.conv2d(F.interpolate(x64, scale_factor=2), w64, b64, padding=1)
    scale = F.conv2d(F.interpolate(x64.abs(), scale_factor=2), w64.abs(), b64.abs(), padding=1)
    # the summed taps are stored in ``dtype`` (one rounding each, relative u(dtype)), then a
    # dot product accumulated in fp32 at least, stored in ``dtype``: gamma_2(dtype) covers the
    # tap rounding and the accumulation (9*6 terms at u(fp32) is far below u(dtype))
    assert_within_bound(out, ref, scale, n=2, acc_dtype=dtype, c=1.0, name=str(dtype))


def test_phase_weight_sums_the_taps_each_phase_reads():
    w = torch.arange(9.0).view(1, 1, 3, 3)
    p = U.phase_weight(w).view(2, 2, 2, 2)   # (a, b, s, t)
    # phase (0, 0): rows [w0 | w1+w2], columns likewise
    assert p[0, 0].tolist() == [[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    # phase (1, 1): rows [w0+w1 | w2], columns [w0+w1 | w2]
    assert p[1, 1].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]


def _gblock(ch=8):
    conv = functools.partial(R.SNConv2d, kernel_size=3, padding=1)
    bn = functools.partial(R.ccbn, which_linear=functools.partial(R.SNLinear, bias=False), input_size=6)
    return R.GBlock(ch, ch // 2, conv, bn, nn.ReLU(), functools.partial(F.interpolate, scale_factor=2))


def _check_block(fused, ref, steps=2):
    assert list(fused.state_dict()) == list(ref.state_dict())
    for mode in (True, False):
        fused.train(mode), ref.train(mode)
        for step in range(steps):
            gen = torch.Generator().manual_seed(10 * step + mode)
            x = torch.randn(2, 8, 5, 3, generator=gen)
            y = torch.randn(2, 6, generator=gen)
            xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
            out_f, out_r = fused(xf, y), ref(xr, y)
            torch.testing.assert_close(out_f, out_r, rtol=2e-5, atol=2e-5)
            if mode:
                g = torch.randn(out_r.shape, generator=gen)
                (out_f * g).sum().backward(), (out_r * g).sum().backward()
                torch.testing.assert_close(xf.grad, xr.grad, rtol=2e-4, atol=2e-4)
                for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
                    torch.testing.assert_close(p.grad, q.grad, rtol=2e-4, atol=2e-4, msg=name)
                fused.zero_grad(), ref.zero_grad()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v, rtol=2e-5, atol=2e-5, msg=k)


def test_gblock_upsample_convs(always_subpixel, monkeypatch):
    torch.manual_seed(0)
    ref = _gblock()
    block = copy.deepcopy(ref)
    calls = []
    real = U.subpixel_conv3x3
    monkeypatch.setattr(U, "subpixel_conv3x3", lambda *a: calls.append(1) or real(*a))
    fused, report = ganengine.fuse(block, return_report=True)
    assert report["graph:upsample+conv3x3"] == 1 and report["graph:upsample+conv1x1"] == 1
    assert ("conv1", "graph:upsample+conv3x3") in report.replaced
    assert "interpolate" not in fused._ganengine_graph_src    # both upsamples went into the calls
    for k, v in block.state_dict(keep_vars=True).items():
        assert fused.state_dict(keep_vars=True)[k] is v
    _check_block(fused, ref)
    assert calls, "the sub-pixel form never ran"
    # below the threshold the same fused block runs the upsampled conv as written
    monkeypatch.setattr(U, "MIN_PIXELS", 10 ** 9)
    monkeypatch.setattr(U, "subpixel_conv3x3", lambda *a: pytest.fail("the sub-pixel form ran below MIN_PIXELS"))
    _check_block(fused, ref, steps=1)


class _Up(nn.Module):
    """upsample -> conv written several ways; ``variant`` picks the one under test."""

    def __init__(self, variant, k=3, pad=1):
        super().__init__()
        self.variant = variant
        self.bn = nn.BatchNorm2d(4)     # a fusable head, so that forward is traced at all
        self.conv = nn.Conv2d(4, 6, k, 1, pad)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        h = F.relu(self.bn(x))
        if self.variant == "module":
            return self.conv(self.up(h))
        if self.variant == "bilinear":
            return self.conv(F.interpolate(h, scale_factor=2, mode="bilinear"))
        if self.variant == "scale3":
            return self.conv(F.interpolate(h, scale_factor=3))
        if self.variant == "frac":
            return self.conv(F.interpolate(h, scale_factor=1.5))
        if self.variant == "recompute":
            return self.conv(F.interpolate(h, scale_factor=1.5, recompute_scale_factor=True))
        if self.variant == "down":
            return self.conv(F.interpolate(h, scale_factor=0.5))
        if self.variant == "two_readers":
            u = F.interpolate(h, scale_factor=2)
            return self.conv(u) + u.mean()
        return self.conv(F.interpolate(h, scale_factor=2))


@pytest.mark.parametrize("variant, k, pad, rule", [
    ("module", 3, 1, "graph:upsample+conv3x3"), ("plain", 3, 1, "graph:upsample+conv3x3"),
    ("plain", 1, 0, "graph:upsample+conv1x1"), ("scale3", 1, 0, "graph:upsample+conv1x1"),
    ("frac", 1, 0, "graph:upsample+conv1x1"), ("recompute", 1, 0, "graph:upsample+conv1x1"),
    ("bilinear", 3, 1, None), ("bilinear", 1, 0, None), ("scale3", 3, 1, None), ("down", 1, 0, None),
    ("two_readers", 3, 1, None), ("plain", 3, 0, None), ("plain", 5, 2, None)])
def test_which_upsample_conv_pairs_are_rewritten(always_subpixel, variant, k, pad, rule):
    torch.manual_seed(0)
    ref = _Up(variant, k, pad)
    fused, report = ganengine.fuse(copy.deepcopy(ref), return_report=True)
    got = [r for r in report if r.startswith("graph:upsample")]
    assert got == ([rule] if rule else [])
    for x in (torch.randn(2, 4, 6, 5), torch.randn(2, 4, 7, 5).to(memory_format=torch.channels_last)):
        for mode in (True, False):
            fused.train(mode), ref.train(mode)
            torch.testing.assert_close(fused(x), ref(x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kwargs", [dict(scale_factor=2), dict(scale_factor=(2, 3)), dict(scale_factor=1.5),
                                    dict(scale_factor=1.5, recompute_scale_factor=True)])
def test_the_upsample_of_the_graph_calls_is_f_interpolate(kwargs):
    """_upsample calls the aten op with the scales the graph rule resolved (none where
    F.interpolate recomputes them per call): the same values and shape as F.interpolate, on plain
    and channels_last tensors, and F.interpolate itself for anything but a plain 4-D tensor."""
    sf = kwargs["scale_factor"]
    scales = None if kwargs.get("recompute_scale_factor") else tuple(float(v) for v in (sf if isinstance(sf, tuple) else (sf, sf)))
    for x in (torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last),
              torch.randn(3, 5, 7), nn.Parameter(torch.randn(1, 3, 4, 4))):
        if x.dim() == 3 and isinstance(sf, tuple):
            continue    # (a 3-D input takes one scale factor)
        ref = F.interpolate(x, **kwargs)
        out = U._upsample(x, scales, kwargs)
        assert out.shape == ref.shape and torch.equal(out, ref)


def test_hooked_conv_after_upsample_is_left_alone(always_subpixel):
    torch.manual_seed(0)
    ref = _Up("plain")
    seen = []
    ref.conv.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    fused, report = ganengine.fuse(copy.deepcopy(ref), return_report=True)
    assert not any(r.startswith("graph:upsample") for r in report)
    fused(torch.randn(1, 4, 3, 3))
    assert seen[-1] == (1, 4, 6, 6)     # the hook still sees the upsampled map
