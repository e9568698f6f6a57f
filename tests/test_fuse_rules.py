"""ganengine.fuse, rule by rule: what each rewrites, that keys, outputs, gradients and the state
left behind (running statistics, power-iteration vectors) are unchanged in training and eval
mode, and the declines of each. Graph rules (patterns written as calls in forward) at the end."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import ganengine
import ganengine.nn as gnn
from ganengine.fusion.copying import FusedModule
from tests import reference_nets_attention as R
from tests.reference_nets import NLayerDiscriminator, get_norm_layer


def _compare(fused, ref, make_inputs, steps=2, modes=(True, False), tol=2e-5):
    """Outputs, input and parameter gradients, and then the state, after ``steps`` calls per mode."""
    assert list(fused.state_dict()) == list(ref.state_dict())
    for mode in modes:
        fused.train(mode)
        ref.train(mode)
        for _ in range(steps):
            ins_f = make_inputs()
            ins_r = [t.detach().clone().requires_grad_(t.requires_grad) for t in ins_f]
            out_f, out_r = fused(*ins_f), ref(*ins_r)
            out_f = out_f if isinstance(out_f, tuple) else (out_f,)
            out_r = out_r if isinstance(out_r, tuple) else (out_r,)
            for a, b in zip(out_f, out_r):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
            if mode:
                w = [torch.randn_like(o) for o in out_r]
                sum((o * v).sum() for o, v in zip(out_f, w)).backward()
                sum((o * v).sum() for o, v in zip(out_r, w)).backward()
                for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
                    if q.grad is not None:
                        torch.testing.assert_close(p.grad, q.grad, rtol=tol * 10, atol=tol * 10, msg=name)
                for a, b in zip(ins_f, ins_r):
                    if b.grad is not None:
                        torch.testing.assert_close(a.grad, b.grad, rtol=tol * 10, atol=tol * 10)
                fused.zero_grad(), ref.zero_grad()
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(fused.state_dict()[k], v, rtol=tol, atol=tol, msg=k)


def _x(*shape):
    return lambda: (torch.randn(*shape, requires_grad=True),)


def _fused_pair(make):
    torch.manual_seed(0)
    ref = make()
    fused, report = ganengine.fuse(copy.deepcopy(ref), return_report=True)
    return fused, ref, report



@pytest.fixture(autouse=True)
def conv_routes_always():
    """The conv rules rewrite a conv only where the conv op has a faster route for it (GEMM
    form, Winograd), which these tiny test convs would not get under the measured thresholds:
    force the GEMM form so the rewrites (and their numbers) are exercised."""
    import ganengine.ops.conv as cv

    with cv.gemm_policy("always"):
        yield

# ------------------------------------------------------------------ sequence rules
def test_patchgan_conv_instance_norm_act_runs_as_one_op():
    fused, ref, report = _fused_pair(lambda: NLayerDiscriminator(3, 4, 3, get_norm_layer("instance")))
    assert report == {"conv2d+leaky_relu": 1, "conv2d+instance_norm+act": 3, "conv2d": 1}
    assert sum(isinstance(m, gnn.Conv2dInstanceNormAct) for m in fused.modules()) == 3
    _compare(fused, ref, _x(2, 3, 32, 32))


def test_conv_instance_norm_act_declines_what_would_move_keys_or_state():
    net = nn.Sequential(nn.Conv2d(3, 4, 4, 2, 1), nn.InstanceNorm2d(4, affine=True), nn.ReLU(),
                        nn.Conv2d(4, 4, 4, 2, 1), nn.InstanceNorm2d(4, track_running_stats=True), nn.LeakyReLU(0.2))
    fused, report = ganengine.fuse(net, return_report=True)
    reasons = [d.reason for d in report.declined if d.rule == "conv2d+instance_norm+act"]
    assert any("affine" in r for r in reasons) and any("running statistics" in r for r in reasons)
    assert report["instance_norm+act"] == 2    # the pairs still fuse
    _compare(fused, net, _x(2, 3, 16, 16))


def test_lone_norms_run_on_the_fused_norm():
    def make():
        return nn.Sequential(nn.Conv2d(3, 4, 4, 2, 1), nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
                             nn.Conv2d(4, 4, 4, 2, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 6),
                             nn.BatchNorm1d(6))
    fused, ref, report = _fused_pair(make)
    assert report["instance_norm"] == 1 and report["batch_norm"] == 1 and report["batch_norm1d"] == 1
    assert fused[1].activation == "none" and fused[3].activation == "none" and fused[6].activation == "none"
    _compare(fused, ref, _x(3, 3, 8, 8), steps=3)


@pytest.fixture
def always_winograd(monkeypatch):
    """3x3 convs below the Winograd channel threshold stay PyTorch's; tiny tests lower it."""
    import ganengine.ops.conv3x3 as cm

    monkeypatch.setattr(cm, "MIN_CHANNELS", 0)
    monkeypatch.setattr(cm, "MIN_TILES", 0)


def test_reflection_pad_pairs(always_winograd):
    net = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 4, 7), nn.ReflectionPad2d(1), nn.Conv2d(4, 4, 3))
    fused, report = ganengine.fuse(net, return_report=True)
    assert report["reflection_pad+conv3x3"] == 1
    (declined,) = [d for d in report.declined if d.rule == "reflection_pad+conv"]
    assert declined.where == "0" and "7x7" in declined.reason
    assert type(fused[0]) is nn.ReflectionPad2d
    _compare(fused, net, _x(2, 3, 12, 12))


def test_small_3x3_convs_stay_off_winograd():
    net = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, 1, 1))
    fused, report = ganengine.fuse(net, return_report=True)
    assert "conv3x3" not in report and "reflection_pad+conv3x3" not in report
    assert type(fused[2]) is gnn.Conv2d


def test_biggan_batch_norm_and_conditional_batch_norm_are_recognised():
    def make():
        return nn.ModuleDict({"seq": nn.Sequential(R.bn(4), nn.ReLU(), nn.Conv2d(4, 4, 4)),
                              "ccbn": R.ccbn(4, 6, functools.partial(R.SNLinear, bias=False))})

    torch.manual_seed(0)
    ref = make()
    fused, report = ganengine.fuse(copy.deepcopy(ref), return_report=True)
    assert report["batch_norm_like+act"] == 1 and report["conditional_batch_norm"] == 1
    assert isinstance(fused["ccbn"], R.ccbn) and isinstance(fused["ccbn"], FusedModule)
    _compare(fused["seq"], ref["seq"], _x(3, 4, 5, 5))
    y = torch.randn(3, 6)
    _compare(fused["ccbn"], ref["ccbn"], lambda: (torch.randn(3, 4, 5, 5, requires_grad=True), y.clone()), steps=2)


@pytest.mark.parametrize("num_svs", [1, 2])
def test_biggan_sn_conv_subclass(num_svs):
    def make():
        return nn.Sequential(R.SNConv2d(3, 8, 4, 2, 1, num_svs=num_svs), nn.LeakyReLU(0.2),
                             R.SNConv2d(8, 8, 3, 1, 1, num_svs=num_svs), R.SNConv2d(8, 4, 1, 1, 0))
    fused, ref, report = _fused_pair(make)
    assert report == {"conv2d+leaky_relu": 1, "conv_module": 2}
    assert all(isinstance(fused[i], R.SNConv2d) for i in (0, 2, 3)), "isinstance must still hold"
    _compare(fused, ref, _x(2, 3, 12, 12), steps=3)    # u0 / sv0 move alike in training


def test_parametrized_spectral_norm_conv():
    def make():
        return nn.Sequential(parametrizations.spectral_norm(nn.Conv2d(3, 4, 4, 2, 1)), nn.LeakyReLU(0.2),
                             parametrizations.spectral_norm(nn.ConvTranspose2d(4, 4, 4, 2, 1)))
    fused, ref, report = _fused_pair(make)
    # the parametrizations become ganengine's spectral norm (same keys, buffers, numbers), then the convs fuse
    assert report == {"spectral_norm": 2, "conv2d+leaky_relu": 1, "conv_module": 1}
    assert "0.parametrizations.weight.original" in fused.state_dict()
    _compare(fused, ref, _x(2, 3, 8, 8), steps=2)


def test_remove_parametrizations_on_fused_convs():
    """torch's remove_parametrizations deletes the properties from the module's own class and sets
    the class back to that class's first base: on a fused parametrized conv that leaves the fused
    conv of the plain class, with the parametrized weight (leave_parametrized) or the original."""
    from torch.nn.utils import parametrize

    def make():
        return nn.Sequential(parametrizations.spectral_norm(nn.Conv2d(3, 4, 4, 2, 1)), nn.LeakyReLU(0.2),
                             parametrizations.weight_norm(nn.Conv2d(4, 4, 3, 1, 1)),
                             parametrizations.spectral_norm(nn.ConvTranspose2d(4, 4, 4, 2, 1)))
    fused, ref, report = _fused_pair(make)
    fused.eval()
    ref.eval()
    x = torch.randn(2, 3, 8, 8)
    for i, leave in ((0, True), (2, True), (3, False)):
        parametrize.remove_parametrizations(fused[i], "weight", leave_parametrized=leave)
        parametrize.remove_parametrizations(ref[i], "weight", leave_parametrized=leave)
        assert not parametrize.is_parametrized(fused[i])
        assert type(fused[i]).__ganengine_base__ is type(ref[i]) and isinstance(fused[i], type(ref[i]))
        assert list(fused.state_dict()) == list(ref.state_dict())
        torch.testing.assert_close(fused(x), ref(x), rtol=2e-5, atol=2e-5)
    assert "0.weight" in fused.state_dict() and isinstance(fused[0].weight, nn.Parameter)
    _, again = ganengine.fuse(fused, return_report=True)   # (already fused: nothing to do)
    assert dict(again) == {}
    # two fuse() results of one model are independent (torch makes one Parametrized class per module)
    one = make()
    f1, f2 = ganengine.fuse(one), ganengine.fuse(one)
    assert type(f1[0]) is not type(f2[0])
    parametrize.remove_parametrizations(f1[0], "weight")
    f2.eval()
    one.eval()
    torch.testing.assert_close(f2(x), one(x), rtol=2e-5, atol=2e-5)


def test_sagan_generator_wrapped_transposed_convs():
    fused, ref, report = _fused_pair(lambda: R.SAGANGenerator(2, z_dim=8, conv_dim=8))
    assert report["wrapped_conv"] == 4 and report["batch_norm+act"] == 4 and report["sagan_self_attention"] == 2
    _compare(fused, ref, _x(2, 8), tol=5e-5)


# ------------------------------------------------------------------ graph rules
class Calls(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 4, 2, 1)
        self.n1 = nn.InstanceNorm2d(8, affine=True)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 4, 1, 1)
        self.act = nn.LeakyReLU(0.2)
        self.n2 = nn.InstanceNorm2d(8)

    def forward(self, x):
        h = F.leaky_relu(self.c1(x), 0.2, inplace=True)
        h = torch.relu(self.n1(h))
        h = self.bn(h).relu()
        y = self.act(self.c2(h))
        z = self.n2(y)
        return y + F.relu(self.c2(h), inplace=True).mean() + F.relu(z) + z   # n2's output has two users


def test_graph_rules_fuse_calls_in_forward():
    fused, ref, report = _fused_pair(Calls)
    assert report["graph:conv2d+act"] == 3 and report["graph:instance_norm+act"] == 1
    assert report["graph:batch_norm+act"] == 1 and report.traced == [""]
    assert isinstance(fused, Calls) and type(fused) is not Calls
    _compare(fused, ref, _x(2, 3, 16, 16), steps=2)


def test_biggan_gblock_conditional_batch_norm_relu():
    def make():
        conv = functools.partial(R.SNConv2d, kernel_size=3, padding=1)
        bn = functools.partial(R.ccbn, which_linear=functools.partial(R.SNLinear, bias=False), input_size=6)
        return R.GBlock(8, 4, conv, bn, nn.ReLU(), functools.partial(F.interpolate, scale_factor=2))
    fused, ref, report = _fused_pair(make)
    assert report["graph:conditional_batch_norm+act"] == 2 and report.traced == [""]
    y = torch.randn(2, 6)
    _compare(fused, ref, lambda: (torch.randn(2, 8, 4, 4, requires_grad=True), y.clone()), steps=2)


class _NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.act = nn.InstanceNorm2d(4), nn.ReLU()

    def forward(self, x):
        with torch.no_grad():
            scale = x.abs().mean()
        return self.act(self.norm(x)) * scale


class _DataDependent(_NoGrad):
    def forward(self, x):
        h = self.norm(x)
        if x.sum() > 0:
            h = h * 2
        return self.act(h)


class _IsNone(_NoGrad):
    def forward(self, x, y=None):
        h = self.act(self.norm(x))
        return h if y is None else h + y


class _Training(_NoGrad):
    def forward(self, x):
        h = self.act(self.norm(x))
        return h * 2 if self.training else h


class _Counts(_NoGrad):
    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + 1
        return self.act(self.norm(x))


@pytest.mark.parametrize("cls, reason", [(_NoGrad, "with"), (_DataDependent, "could not trace"),
                                         (_IsNone, "`is`"), (_Training, "training and eval"),
                                         (_Counts, "assigns self.calls")])
def test_graph_rules_decline_forwards_fx_would_not_record_faithfully(cls, reason):
    fused, ref, report = _fused_pair(cls)
    (where, why), = report.not_traced
    assert where == "" and reason in why
    assert report == {"instance_norm": 1}        # the child still runs the fused norm
    _compare(fused, ref, _x(2, 4, 5, 5), steps=1)


def test_convs_without_a_faster_route_stay_pytorch():
    """Where the conv op has no faster route for a conv at any input size (here: both routes
    switched off), conv + act and conv + norm + act are declined (the pair norm + act still fuses)."""
    import ganengine.ops.conv as cv

    net = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 8, 4, 2, 1), nn.InstanceNorm2d(8),
                        nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 4))
    with cv.gemm_policy("never"), cv.winograd_policy("never"):
        fused, report = ganengine.fuse(net, return_report=True)
    assert dict(report) == {"instance_norm+act": 1}
    assert all("no faster route" in d.reason for d in report.declined) and len(report.declined) == 2
    assert type(fused[0]) is nn.Conv2d and type(fused[5]) is nn.Conv2d
    _compare(fused, net, _x(2, 3, 16, 16))


def test_small_convs_fuse_under_the_measured_thresholds():
    """Under the 'auto' thresholds a small conv's small calls take the GEMM form (oneDNN's fixed
    cost per call is the whole cost of a tiny conv: csrc/cpu/conv_route.cpp, kTinyMacs), so the
    convs fuse; calls the thresholds leave to oneDNN run PyTorch's conv behind the module."""
    import ganengine.ops.conv as cv

    net = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 8, 4, 2, 1), nn.InstanceNorm2d(8),
                        nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 4))
    with cv.gemm_policy("auto"), cv.winograd_policy("auto"):
        fused, report = ganengine.fuse(net, return_report=True)
        assert dict(report) == {"conv2d+leaky_relu": 1, "conv2d+instance_norm+act": 1, "conv2d": 1}
        assert not report.declined
        assert cv.uses_gemm(torch.randn(2, 3, 16, 16), net[0].weight, 2, 1)      # 128 columns x 384: tiny
        assert not cv.uses_gemm(torch.randn(8, 3, 64, 64), net[0].weight, 2, 1)  # 8192 columns: oneDNN
        _compare(fused, net, _x(2, 3, 16, 16))
        _compare(fused, net, _x(2, 3, 64, 64), steps=1)


# ----------------------------------------------------------------------------- CUDA models
def _fake_cuda_weight(conv):
    """conv with its weight replaced by a fake CUDA tensor (FakeTensorMode needs no GPU), for the
    rules that ask the weight's device."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    w = conv.weight
    conv._parameters["weight"] = FakeTensor(FakeTensorMode(), torch.empty(w.shape, device="meta"), torch.device("cuda"))
    return conv


def test_conv_act_pays_on_cuda_where_its_cuda_entry_serves(monkeypatch):
    """On a CUDA weight conv2d+leaky_relu fuses exactly where conv2d_act's call would be its CUDA C++
    entry (the cuda backend chosen, the build's CUDA kernels present); on CPU weights the conv op's
    route rule decides, as before."""
    from ganengine.fusion import rules
    from ganengine.ops import _dispatch
    from tests._backends import CudaEntryResolver

    resolve = CudaEntryResolver(monkeypatch)
    conv = _fake_cuda_weight(nn.Conv2d(3, 4, 4, 2, 1))

    def pays(backend):
        monkeypatch.setattr(_dispatch, "_CUDA_ENTRY", {})
        monkeypatch.setattr(_dispatch, "_SERVED", {})
        with ganengine.use_backend(backend):
            return rules.conv_act_may_pay(conv)

    assert pays("auto") and pays("cuda") and not pays("triton") and not pays("torch")
    resolve.serving["cuda"] = False
    assert not pays("auto")
    resolve.serving["cuda"] = True
    resolve.cuda_kernels = False
    assert not pays("auto")
    cpu_conv = nn.Conv2d(3, 4, 4, 2, 1)
    assert rules.conv_act_may_pay(cpu_conv) == rules.conv_route_may_pay(cpu_conv)


@pytest.mark.gpu
def test_fuse_on_a_cuda_model(monkeypatch):
    """A CUDA model: conv + LeakyReLU becomes Conv2dAct (its CUDA C++ entry), conv + IN + act keeps
    the conv and fuses the pair, a plain conv stays nn.Conv2d, ReflectionPad + 3x3 conv becomes a
    reflect-padded Conv3x3; the fused model's output and gradients match the original's within
    fp32's reordering error (TF32 off: this checks the rewrite, not TF32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 4, 2, 1), nn.LeakyReLU(0.2, True),
                        nn.Conv2d(16, 128, 4, 2, 1), nn.InstanceNorm2d(128), nn.LeakyReLU(0.2, True),
                        nn.ReflectionPad2d(1), nn.Conv2d(128, 128, 3), nn.InstanceNorm2d(128), nn.ReLU(True),
                        nn.Conv2d(128, 1, 4, 1, 1)).cuda()
    ref = copy.deepcopy(net)
    with ganengine.use_backend("auto"):
        fused = ganengine.fuse(net)
        kinds = [type(m).__name__ for m in fused]
        assert kinds == ["Conv2dAct", "Identity", "Conv2d", "InstanceNormAct2d", "Identity", "Identity", "Conv3x3",
                         "InstanceNormAct2d", "Identity", "Conv2d"], kinds
        assert type(fused[2]) is nn.Conv2d and type(fused[9]) is nn.Conv2d
        assert fused[6].padding_mode == "reflect"
        x = torch.randn(2, 3, 32, 32, device="cuda")
        y, y_ref = fused(x), ref(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        y.square().sum().backward()
        y_ref.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
