"""ganengine.fuse: identity of Parameters and buffers (an optimiser built first keeps training),
copies, wrappers (DataParallel, DDP), shared modules, pickling, the report, the RNG, and every
decline (hooks, Sequential subclasses and Sequentials used as lists, inplace activations on
inputs, spectral norm in its three forms, unknown modules). The rules one by one:
tests/test_fuse_rules.py; five-step training trajectories of the reference networks:
tests/test_fuse_models.py."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ganengine
import ganengine.nn as gnn
from ganengine.fuse import FuseReport
from tests import reference_nets_attention as R


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2, True),
                         nn.Conv2d(8, 8, 4, 2, 1), nn.InstanceNorm2d(8, affine=True), nn.ReLU(True),
                         nn.Conv2d(8, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
                         nn.InstanceNorm2d(4), nn.Conv2d(4, 1, 3))


def _tensors(model):
    return {k: v for k, v in model.state_dict(keep_vars=True).items()}


def _assert_same_objects(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert list(ta) == list(tb)
    for k in ta:
        assert ta[k] is tb[k], f"{k} is a different tensor object"



@pytest.fixture(autouse=True)
def conv_routes_always():
    """The conv rules rewrite a conv only where the conv op has a faster route for it (GEMM
    form, Winograd), which these tiny test convs would not get under the measured thresholds:
    force the GEMM form so the rewrites (and their numbers) are exercised."""
    import ganengine.ops.conv as cv

    with cv.gemm_policy("always"):
        yield

# ------------------------------------------------------------------ identity and the optimiser
@pytest.mark.parametrize("inplace", [False, True])
def test_optimizer_built_before_fuse_trains_the_fused_model(inplace):
    torch.manual_seed(0)
    net = _net()
    twin = copy.deepcopy(net)
    # built first, as the references do; SGD with momentum (Adam would turn the rounding noise in
    # the gradient of a bias that the next instance norm cancels into lr-sized steps)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    params = list(net.parameters())
    fused = ganengine.fuse(net, inplace=inplace)
    assert (fused is net) == inplace
    _assert_same_objects(fused, net)
    assert [id(p) for p in fused.parameters()] == [id(p) for p in params]
    assert {id(b) for b in fused.buffers()} == {id(b) for b in net.buffers()}
    assert any(isinstance(m, gnn.Conv2dAct) for m in fused.modules())
    x = torch.randn(4, 3, 16, 16)
    losses, twin_losses = [], []
    for _ in range(5):
        for model, o, out in ((fused, opt, losses), (twin, opt_twin, twin_losses)):
            o.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            o.step()
            out.append(loss.item())
    assert losses[-1] < losses[0], "the fused model did not train"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(twin_losses), rtol=1e-4, atol=1e-6)
    assert set(opt.state) == set(fused.parameters())  # the optimiser's state is keyed by them
    for (k, p), q in zip(fused.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=k)


def test_not_inplace_leaves_the_callers_tree_and_shares_its_tensors():
    net = _net()
    types = [type(m) for m in net.modules()]
    fused = ganengine.fuse(net)
    assert [type(m) for m in net.modules()] == types, "fuse(inplace=False) changed the caller's modules"
    _assert_same_objects(fused, net)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fused(x), net(x), rtol=1e-4, atol=1e-5)


def test_shared_modules_stay_shared():
    conv = nn.Conv2d(4, 4, 4, 2, 1)
    block = nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1), nn.InstanceNorm2d(4), nn.ReLU())

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.block, self.again = conv, conv, block, block

        def forward(self, x):
            return self.again(self.b(self.block(self.a(x))))

    net = Tied()
    keys = list(net.state_dict())
    fused = ganengine.fuse(net)
    assert fused.a is fused.b and fused.block is fused.again
    assert list(fused.state_dict()) == keys
    x = torch.randn(2, 4, 16, 16)
    torch.testing.assert_close(fused(x), net(x), rtol=1e-4, atol=1e-5)


class _Aliased(nn.Module):
    """A child also kept in a plain list (not a ModuleList) and called through it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.head_norm = nn.BatchNorm2d(8)
        self.head_act = nn.ReLU()
        self.norms = [self.head_norm, self.head_act]

    def forward(self, x):
        return self.norms[1](self.norms[0](self.features(x)))


@pytest.mark.parametrize("inplace", [False, True])
def test_modules_aliased_by_plain_attributes(inplace):
    """fuse()'s copy points the list at its own modules (eval() reaches them), and a module the
    list holds is not replaced (calls through the list would not see it): declined, said why."""
    torch.manual_seed(0)
    net = _Aliased()
    ref = copy.deepcopy(net)
    fused, report = ganengine.fuse(net, inplace=inplace, return_report=True)
    assert fused.norms[0] is fused.head_norm and type(fused.head_norm) is nn.BatchNorm2d
    assert any("attribute `norms`" in d.reason for d in report.declined)
    x = torch.randn(2, 8, 6, 6)
    for _ in range(2):
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    fused.eval()
    ref.eval()
    assert not fused.norms[0].training
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    if not inplace:
        assert net.norms[0] is net.head_norm and net.training   # the caller's model is untouched


def test_a_compiled_module_is_declined_with_the_order_to_follow():
    """A torch.compile'd module's forward is bound to the module it compiled: a fused copy of its
    tree would never run. Declined, saying to fuse first."""
    net = nn.Sequential(nn.Conv2d(3, 4, 4, 2, 1), nn.LeakyReLU(0.2))
    compiled = torch.compile(net)
    fused, report = ganengine.fuse(compiled, return_report=True)
    assert dict(report) == {}
    assert any("fuse() the model first" in d.reason for d in report.declined)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused(x), net(x))


@pytest.mark.parametrize("inplace", [False, True])
def test_dataparallel_wrapped_model(inplace):
    net = _net()
    dp = nn.DataParallel(net)
    keys = list(dp.state_dict())
    assert keys[0].startswith("module.")
    opt = torch.optim.SGD(dp.parameters(), lr=0.1)
    fused = ganengine.fuse(dp, inplace=inplace)
    assert isinstance(fused, nn.DataParallel) and list(fused.state_dict()) == keys
    _assert_same_objects(fused, dp)
    assert any(isinstance(m, gnn.Conv2dAct) for m in fused.modules())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fused(x), net(x), rtol=1e-4, atol=1e-5)
    before = net[0].weight.detach().clone()
    opt.zero_grad()
    fused(x).square().mean().backward()
    opt.step()
    assert not torch.equal(before, net[0].weight)


@pytest.mark.parametrize("inplace", [False, True])
def test_ddp_wrapped_model(tmp_path, inplace):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        results = {}
        for name in ("plain", "fused"):
            torch.manual_seed(0)
            ddp = nn.parallel.DistributedDataParallel(_net())
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
            keys = list(ddp.state_dict())
            if name == "fused":
                ddp = ganengine.fuse(ddp, inplace=inplace)
                assert list(ddp.state_dict()) == keys and keys[0].startswith("module.")
                assert any(isinstance(m, gnn.Conv2dAct) for m in ddp.modules())
            torch.manual_seed(1)
            for _ in range(3):
                opt.zero_grad()
                ddp(torch.randn(2, 3, 16, 16)).square().mean().backward()
                opt.step()
            results[name] = ddp.state_dict()
        for k, v in results["plain"].items():
            torch.testing.assert_close(results["fused"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    finally:
        dist.destroy_process_group()


def test_deepcopy_and_pickle_keep_the_fused_model():
    torch.manual_seed(0)
    g = R.BigGANGenerator(G_ch=8, dim_z=20, resolution=32, G_attn="16", n_classes=5, hier=True, shared_dim=8)
    fused, report = ganengine.fuse(g, return_report=True)
    assert report.traced and report.get("conv_module", 0) > 0
    z = torch.randn(3, g.dim_z)
    y = g.shared(torch.tensor([0, 1, 2])).detach()
    fused.eval()
    want = fused(z, y)
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        clone.eval()
        assert type(clone.blocks[0][0]) is type(fused.blocks[0][0])
        assert list(clone.state_dict()) == list(fused.state_dict())
        torch.testing.assert_close(clone(z, y), want, rtol=0, atol=0)
        assert clone.linear.weight is not fused.linear.weight  # a copy is a copy


def test_fuse_does_not_move_the_random_stream():
    torch.manual_seed(0)
    g = R.BigGANGenerator(G_ch=8, dim_z=20, resolution=32, G_attn="16", n_classes=5, hier=True, shared_dim=8)
    torch.manual_seed(123)
    ganengine.fuse(g)    # probes the SN convs, the ccbn and the attention block
    after_fuse = torch.rand(3)
    torch.manual_seed(123)
    torch.testing.assert_close(after_fuse, torch.rand(3), rtol=0, atol=0)


def test_fuse_is_idempotent():
    net = _net()
    once, r1 = ganengine.fuse(net, return_report=True)
    twice, r2 = ganengine.fuse(once, return_report=True)
    assert dict(r2) == {} and [type(m) for m in twice.modules()] == [type(m) for m in once.modules()]
    # a pattern declined the first time is still there, unfused: the second report says so again
    net = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.LeakyReLU(0.2), nn.InstanceNorm2d(8), nn.ReLU())
    once, r1 = ganengine.fuse(net, return_report=True)
    twice, r2 = ganengine.fuse(once, return_report=True)
    assert dict(r1) == {"instance_norm+act": 1} and dict(r2) == {}
    assert r2.declined == r1.declined and [d.rule for d in r1.declined] == ["conv2d+leaky_relu"]


def test_bad_arguments_name_the_argument():
    with pytest.raises(TypeError, match="module"):
        ganengine.fuse(lambda x: x)
    with pytest.raises(TypeError, match="inplace"):
        ganengine.fuse(nn.ReLU(), inplace="yes")


# ------------------------------------------------------------------ the report
def test_report_is_a_dict_of_counts_with_details():
    net = nn.Sequential(nn.Conv2d(3, 4, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(4, 4, 4, 2, 1, groups=2),
                        nn.LeakyReLU(0.2), nn.InstanceNorm2d(4), nn.ReLU())
    fused, report = ganengine.fuse(net, return_report=True)
    assert isinstance(report, FuseReport) and isinstance(report, dict)
    assert report == {"conv2d+leaky_relu": 1, "instance_norm+act": 1}
    assert report.get("conv2d+leaky_relu") == 1 and report["instance_norm+act"] == 1
    assert ("0", "conv2d+leaky_relu") in report.replaced and ("4", "instance_norm+act") in report.replaced
    (declined,) = report.declined
    assert declined.where == "2" and declined.rule == "conv2d+leaky_relu" and "groups=2" in declined.reason
    text = str(report)
    assert "conv2d+leaky_relu x1" in text and "declined conv2d+leaky_relu at 2" in text


# ------------------------------------------------------------------ declines: never a changed number
def _check_same(fused, net, *inputs, tol=1e-5):
    out_f, out_n = fused(*[t.clone() for t in inputs]), net(*[t.clone() for t in inputs])
    torch.testing.assert_close(out_f, out_n, rtol=tol, atol=tol)


def test_hooked_modules_are_declined_and_their_hooks_still_run():
    seen = []
    norm, act, conv = nn.InstanceNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 4, 2, 1)
    norm.register_forward_hook(lambda m, i, o: seen.append("norm") or o * 2)  # changes the output
    act.register_forward_pre_hook(lambda m, i: seen.append("act"))
    conv.register_full_backward_hook(lambda m, gi, go: seen.append("conv-bw"))
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), norm, nn.ReLU(), nn.InstanceNorm2d(4), act, conv,
                        nn.LeakyReLU(0.2))
    fused, report = ganengine.fuse(net, return_report=True)
    reasons = {d.where: d.reason for d in report.declined}
    assert "forward hook" in reasons["1"] and "pre-hook" in reasons["3"] and "backward hook" in reasons["5"]
    assert report.get("instance_norm+act", 0) == 0 and report.get("conv2d+leaky_relu", 0) == 0
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    seen.clear()
    fused(x).sum().backward()
    assert seen == ["norm", "act", "conv-bw"]
    _check_same(fused, net, x)


def test_sequential_subclass_with_its_own_forward_is_not_rewritten():
    class Skip(nn.Sequential):   # returns the first layer's output added to the last's
        def forward(self, x):
            first = self[0](x)
            h = first
            for layer in list(self)[1:]:
                h = layer(h)
            return h + first

    net = Skip(nn.Conv2d(3, 4, 4, 1, 1), nn.LeakyReLU(0.2), nn.InstanceNorm2d(4), nn.ReLU())
    fused, report = ganengine.fuse(net, return_report=True)
    assert report.get("conv2d+leaky_relu", 0) == 0 and report.get("instance_norm+act", 0) == 0
    assert {d.rule for d in report.declined} >= {"conv2d+leaky_relu", "instance_norm+act"}
    assert all("own forward" in d.reason for d in report.declined)
    _check_same(fused, net, torch.randn(2, 3, 8, 8))


def test_sequential_indexed_by_its_parent_is_not_rewritten():
    class Taps(nn.Module):   # collects the conv outputs (before their activations)
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(4, 4, 3, 1, 1),
                                          nn.InstanceNorm2d(4), nn.ReLU())

        def forward(self, x):
            taps = []
            for i, layer in enumerate(self.features):
                x = layer(x)
                if i in (0, 3):
                    taps.append(x)
            return torch.cat(taps, 1)

    net = Taps()
    fused, report = ganengine.fuse(net, return_report=True)
    assert report.get("conv2d+leaky_relu", 0) == 0 and report.get("instance_norm+act", 0) == 0
    assert any("other than by calling it" in d.reason for d in report.declined)
    _check_same(fused, net, torch.randn(2, 3, 8, 8))


def test_sequential_built_from_its_own_list_attribute_is_fused():
    """junyanz's PixelDiscriminator: ``self.net = [...]`` then ``self.net = nn.Sequential(*self.net)``
    in __init__: the load re-binds the attribute (a list becoming the module), no other use: fused.
    Keeping another reference in __init__ still declines."""
    class Pixel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = [nn.Conv2d(3, 4, 1), nn.LeakyReLU(0.2, True), nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8),
                        nn.LeakyReLU(0.2, True), nn.Conv2d(8, 1, 1)]
            self.net = nn.Sequential(*self.net)

        def forward(self, x):
            return self.net(x)

    class PixelWithTaps(Pixel):
        def __init__(self):
            super().__init__()
            self.taps = [self.net]

    net = Pixel()
    fused, report = ganengine.fuse(net, return_report=True)
    assert report.get("conv2d+leaky_relu", 0) == 1 and report.get("batch_norm+act", 0) == 1, report
    _check_same(fused, net, torch.randn(2, 3, 8, 8))
    aliased = PixelWithTaps()
    fused, report = ganengine.fuse(aliased, return_report=True)
    assert report.get("conv2d+leaky_relu", 0) == 0 and report.get("batch_norm+act", 0) == 0, report
    _check_same(fused, aliased, torch.randn(2, 3, 8, 8))


def test_inplace_activation_on_a_sequential_input_keeps_its_effect():
    """pix2pix's U-Net: ``cat([x, model(x)])`` with model starting LeakyReLU(inplace): the skip
    connection sees the activated x. Fusing must keep that (the activation stays in place)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.LeakyReLU(0.2, True), nn.Conv2d(4, 4, 4, 2, 1),
                                       nn.ConvTranspose2d(4, 4, 4, 2, 1), nn.BatchNorm2d(4))

        def forward(self, x):
            return torch.cat([x, self.model(x)], 1)

    net = Block()
    fused = ganengine.fuse(net)
    x = torch.randn(2, 4, 8, 8)
    a, b = x.clone(), x.clone()
    torch.testing.assert_close(fused(a), net(b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, b)   # both modified the input in place, identically
    assert (a != x).any()


def test_torch_hook_spectral_norm_conv_is_fused_with_its_hook_kept():
    """torch.nn.utils.spectral_norm (forward pre-hook): today's crash; now the conv + LeakyReLU
    run fused, the pre-hook still computes the weight and updates u and v."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(3, 4, 4, 2, 1)), nn.LeakyReLU(0.2),
                        nn.utils.spectral_norm(nn.Conv2d(4, 4, 3, 1, 1)), nn.ReLU())
    twin = copy.deepcopy(net)
    fused, report = ganengine.fuse(net, return_report=True)
    assert report.get("conv2d+leaky_relu") == 2 and not report.declined
    assert list(fused.state_dict()) == list(twin.state_dict())
    x = torch.randn(2, 3, 8, 8)
    for mode in (True, False):
        fused.train(mode)
        twin.train(mode)
        torch.testing.assert_close(fused(x), twin(x), rtol=1e-5, atol=1e-5)
        for k, v in twin.state_dict().items():   # weight_u / weight_v updated alike
            torch.testing.assert_close(fused.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_hook_spectral_norm_with_another_hook_is_declined():
    conv = nn.utils.spectral_norm(nn.Conv2d(3, 4, 3, 1, 1))
    conv.register_forward_hook(lambda m, i, o: o + 1)
    net = nn.Sequential(conv, nn.LeakyReLU(0.2))
    fused, report = ganengine.fuse(net, return_report=True)
    assert report.get("conv2d+leaky_relu", 0) == 0 and report.declined
    net.eval(), fused.eval()
    _check_same(fused, net, torch.randn(2, 3, 8, 8))


def test_sagan_wrapper_and_self_attention_fuse_without_changing_numbers():
    torch.manual_seed(0)
    d = R.SAGANDiscriminator(conv_dim=8)
    twin = copy.deepcopy(d)
    fused, report = ganengine.fuse(d, return_report=True)
    assert report.get("wrapped_conv+leaky_relu") == 4 and report.get("sagan_self_attention") == 2
    assert list(fused.state_dict()) == list(twin.state_dict())
    _assert_same_objects(fused, d)
    x = torch.randn(2, 3, 64, 64)
    for mode in (True, False):
        fused.train(mode), twin.train(mode)
        for a, b in zip(fused(x), twin(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for k, v in twin.state_dict().items():   # u and v move in eval too (the reference's quirk)
            torch.testing.assert_close(fused.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_unknown_modules_are_left_alone():
    class Scaled(nn.Conv2d):     # a conv subclass whose forward is not a plain conv of its input
        def forward(self, x):
            return F.conv2d(x * 2, self.weight, self.bias, self.stride, self.padding)

    class Mystery(nn.Module):    # looks like BigGAN's ccbn (two linears, two buffers) but is not
        def __init__(self):
            super().__init__()
            self.gain, self.bias = nn.Linear(3, 4), nn.Linear(3, 4)
            self.eps, self.momentum = 1e-5, 0.1
            self.register_buffer("stored_mean", torch.zeros(4))
            self.register_buffer("stored_var", torch.ones(4))

        def forward(self, x, y):
            out = F.instance_norm(x, eps=self.eps)
            return out * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Sequential(Scaled(4, 4, 3, 1, 1), nn.LeakyReLU(0.2), nn.LazyConv2d(4, 3), nn.ReLU())
            self.norm = Mystery()
            self.act = nn.ReLU()

        def forward(self, x, y):
            return self.act(self.norm(self.pre(x), y))

    net = Net()
    fused, report = ganengine.fuse(net, return_report=True)
    reasons = {d.where: d.reason for d in report.declined}
    assert "not a plain conv" in reasons["pre.0"] or "does not convolve" in reasons["pre.0"]
    assert "conditional batch norm" in reasons["norm"]
    assert type(fused.pre[0]) is Scaled and type(fused.norm) is Mystery
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 3)
    _check_same(fused, net, x, y)


def test_global_hooks_decline_everything():
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        fused, report = ganengine.fuse(_net(), return_report=True)
    finally:
        handle.remove()
    assert dict(report) == {} and "global" in report.declined[0].reason


def test_probe_closeness_check():
    """fuse()'s probes compare the fused and original modules with verify._close: rounding
    passes, a wrong formula (an O(1e-2) difference and more) and a moved non-finite value do not."""
    from ganengine.fusion.verify import _close

    a = torch.randn(100, generator=torch.Generator().manual_seed(0))
    assert _close(a, a + 1e-6) and not _close(a, a + 1e-2)
    nan = a.clone()
    nan[3] = float("nan")
    assert _close(nan, nan.clone()) and not _close(nan, a) and not _close(a, nan)
    moved = nan.clone()
    moved[0] += 1
    assert not _close(nan, moved)
    assert _close(a.half(), (a + 1e-3).half()) and not _close(a.half(), (a + 0.5).half())
    assert not _close(a, a.double()) and not _close(a, a[:50])
    inf = torch.full((3,), float("inf"))
    assert _close(inf, inf) and not _close(inf, -inf) and _close(a[:0], a[:0])


# what ganengine's module classes and fuse()'s mixins may define that nn.Module or the layers they
# are mixed into also define (a mixin's ``_apply(x, slope)`` once replaced nn.Module._apply, the
# method .to / .double / .cpu call, and every cast of a fused spectral-normed model raised)
_OVERRIDES = {"__init__", "forward", "extra_repr", "_load_from_state_dict", "reset_running_stats", "__getstate__",
              "__setstate__", "__reduce_ex__", "reset_parameters"}


def test_module_classes_override_only_what_they_mean_to():
    import importlib
    import inspect
    import pkgutil

    import ganengine.fusion
    from ganengine.fusion.copying import FusedModule

    bases = (nn.Module, nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d, nn.InstanceNorm2d, nn.Embedding,
             nn.Sequential)
    taken = set().union(*(dir(b) for b in bases)) - {"__module__", "__doc__", "__qualname__", "__annotations__",
                                                     "__dict__", "__weakref__", "__firstlineno__",
                                                     "__static_attributes__"}
    seen = 0
    for pkg in (ganengine.fusion, gnn):
        for info in pkgutil.iter_modules(pkg.__path__):
            mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
            for name, cls in vars(mod).items():
                if not (inspect.isclass(cls) and cls.__module__ == mod.__name__
                        and issubclass(cls, (nn.Module, FusedModule))):
                    continue
                seen += 1
                clash = sorted(set(vars(cls)) & taken - _OVERRIDES)
                assert not clash, f"{mod.__name__}.{name} shadows {clash} of torch.nn"
    assert seen > 15


def test_fused_spectral_normed_convs_move_and_cast():
    from torch.nn.utils import spectral_norm as hook_sn
    from torch.nn.utils.parametrizations import spectral_norm

    for sn in (spectral_norm, hook_sn):
        torch.manual_seed(0)
        model = nn.Sequential(sn(nn.Conv2d(3, 8, 3)), nn.LeakyReLU(0.2), sn(nn.Conv2d(8, 4, 3)))
        fused = ganengine.fuse(model)
        assert fused.to("cpu") is fused
        x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
        y = fused.double().eval()(x)
        assert y.dtype == torch.float64 and all(p.dtype == torch.float64 for p in fused.parameters())
        assert fused.float()(x.float()).dtype == torch.float32


class _NormCalls(nn.Module):
    """Instance norms written as calls in forward (fuse()'s graph route)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.InstanceNorm2d(4, affine=True)

    def forward(self, x):
        return F.dropout(F.leaky_relu(self.norm(x), 0.2), 0.5, self.training)


def _layout_models():
    import ganengine.ops.conv as cv

    torch.manual_seed(0)
    with cv.gemm_policy("always"):  # (the conv + norm + act rule fuses only where a conv route pays)
        conv_in = ganengine.fuse(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.InstanceNorm2d(4), nn.ReLU()))
    assert type(conv_in[0]).__name__ == "Conv2dInstanceNormAct"
    return {
        "pair": nn.Sequential(nn.InstanceNorm2d(4, affine=True), nn.ReLU(), nn.Dropout(0.5)),
        "lone": nn.Sequential(nn.InstanceNorm2d(4), nn.Dropout(0.5)),
        "calls": _NormCalls(),
        "conv+norm+act": nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.InstanceNorm2d(4), nn.ReLU(),
                                       nn.Dropout(0.5)),
    }


@pytest.mark.parametrize("name", ["pair", "lone", "calls", "conv+norm+act"])
def test_fused_instance_norms_give_the_unfused_layout(name):
    """A channels_last input: nn.InstanceNorm2d returns a contiguous tensor, and what follows
    depends on it (dropout draws its mask in memory order; .view needs it). The fused norms give
    the same layout, hence the same dropout masks under a seed; keep_channels_last=True keeps NHWC."""
    import ganengine.ops.conv as cv

    model = _layout_models()[name]
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    with cv.gemm_policy("always"):
        fused, report = ganengine.fuse(model, return_report=True)
        kept = ganengine.fuse(model, keep_channels_last=True)
        assert not report.declined, report.declined
        outs = []
        for net in (model, fused, kept):
            torch.manual_seed(3)
            outs.append(net(x))
    want, got, nhwc = outs
    assert got.stride() == want.stride() and want.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # (fp32 roundings of one norm; masks equal)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    with pytest.raises(TypeError, match="keep_channels_last"):
        ganengine.fuse(model, keep_channels_last=1)


@pytest.mark.parametrize("name", ["pair", "lone", "calls", "conv+norm+act"])
def test_fused_instance_norms_raise_on_one_pixel_as_torch(name):
    """H * W == 1 with input statistics: nn.InstanceNorm2d raises; so does the fused model."""
    import ganengine.ops.conv as cv

    model = _layout_models()[name]
    x = torch.randn(2, 4, 1, 1)
    with pytest.raises(ValueError, match="more than 1 spatial element") as want:
        model(x)
    with cv.gemm_policy("always"):
        fused = ganengine.fuse(model)
        with pytest.raises(ValueError, match="more than 1 spatial element") as got:
            fused(x)
    assert str(got.value) == str(want.value)


def test_instance_norm_module_one_pixel_in_eval_with_running_stats():
    """Running statistics in eval: no input statistics, so one pixel is served (as torch does)."""
    norm = nn.InstanceNorm2d(3, track_running_stats=True, affine=True).eval()
    fused = gnn.InstanceNormAct2d.from_modules(norm, None)
    x = torch.randn(2, 3, 1, 1)
    torch.testing.assert_close(fused(x), norm(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        fused.train()(x)


def test_fused_batch_norms_keep_their_class_names_for_init_code():
    """The references' initialisers find norms by class name (junyanz init_weights, PyTorch-GAN
    weights_init_normal: classname.find('BatchNorm2d')): a model fused before its init is
    initialised as the unfused one."""
    def weights_init_normal(m):  # PyTorch-GAN's
        classname = m.__class__.__name__
        if classname.find("Conv") != -1:
            nn.init.normal_(m.weight.data, 0.0, 0.02)
        elif classname.find("BatchNorm2d") != -1 or classname.find("BatchNorm1d") != -1:
            nn.init.normal_(m.weight.data, 1.0, 0.02)
            nn.init.constant_(m.bias.data, 0.0)

    def make():
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Unflatten(1, (2, 2, 2)),
                             nn.Conv2d(2, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2), nn.Conv2d(4, 4, 3, 1, 1),
                             nn.BatchNorm2d(4))
    torch.manual_seed(0)
    plain = make()
    torch.manual_seed(0)
    fused = ganengine.fuse(make())
    assert sum(isinstance(m, gnn.BatchNormAct2d) for m in fused.modules()) == 2
    for net in (plain, fused):
        torch.manual_seed(1)
        net.apply(weights_init_normal)
    for (k, a), b in zip(plain.state_dict().items(), fused.state_dict().values()):
        assert torch.equal(a, b), k


def test_spectral_norm_group_then_fuse_iterates_once():
    """docs/spectral_norm.md's order, group then fuse (a copy): the copy gets a group of its own
    layers (it had kept the original's hook: two power iterations per forward, one of them on
    the original's layers)."""
    from torch.nn.utils.parametrizations import spectral_norm

    def make():
        return nn.Sequential(spectral_norm(nn.Conv2d(3, 8, 3, 1, 1)), nn.LeakyReLU(0.1),
                             spectral_norm(nn.Conv2d(8, 1, 3, 1, 1)))
    torch.manual_seed(0)
    ref = make().double()
    torch.manual_seed(0)
    model = make().double()
    gnn.spectral_norm_group(model)
    fused = ganengine.fuse(model)
    assert fused.__dict__["_ganengine_sn_group"].model is fused
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for _ in range(3):
        want, got = ref(x), fused(x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused[0].parametrizations.weight[0]._u, ref[0].parametrizations.weight[0]._u,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("child, kind", [("softmax", "forward"), ("softmax", "backward"), ("query_conv", "backward"),
                                         ("query_conv", "forward")])
def test_attention_blocks_with_hooked_children_are_declined(child, kind):
    """A hook on a child of an attention block (the softmax, to look at the attention map; a conv)
    keeps firing: the block is declined, before the rewrite's probe calls the children (which
    handed the user's hooks probe data). gnn.SelfAttention2d runs its convs as modules when they
    have any hook, backward ones included."""
    from tests.reference_nets_attention import Self_Attn

    torch.manual_seed(0)
    block = Self_Attn(16, "relu")
    with torch.no_grad():
        block.gamma.fill_(0.5)
    calls = []
    m = getattr(block, child)
    if kind == "forward":
        m.register_forward_hook(lambda *a: calls.append(1))
    else:
        m.register_full_backward_hook(lambda *a: calls.append(1))
    fused, report = ganengine.fuse(block, return_report=True)
    assert calls == [] and "sagan_self_attention" not in report  # (its convs may still fuse one by one)
    declined = [d for d in report.declined if d.rule == "sagan_self_attention"]
    assert len(declined) == 1 and child in declined[0].reason
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    fused(x)[0].sum().backward()
    assert calls == [1]

    sa = gnn.SelfAttention2d(16)
    seen = []
    sa.query_conv.register_full_backward_hook(lambda *a: seen.append(1))
    sa(torch.randn(1, 16, 3, 3, requires_grad=True)).sum().backward()
    assert seen == [1]


def test_fused_layers_give_eager_output_layouts_in_a_channels_last_model(monkeypatch):
    """model.to(channels_last) with an NCHW input (what follows an instance norm): PyTorch's conv
    writes NHWC because the weight is; the fused convs followed the input (dropout after them drew
    other masks under the same seed). The fused reference SAGAN block gives the reference's
    contiguous output on an NHWC input (a .view after it failed), unless keep_channels_last."""
    from tests.reference_nets_attention import Self_Attn

    monkeypatch.setenv("GANENGINE_CONV_GEMM", "always")  # (the tiny convs take the fused route)
    cl = torch.channels_last
    x = torch.randn(2, 8, 8, 8)
    sn = nn.utils.spectral_norm
    for build in (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.Dropout(0.5)),
                  lambda: nn.Sequential(nn.Conv2d(8, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Dropout(0.5)),
                  lambda: nn.Sequential(nn.ConvTranspose2d(8, 8, 4, 2, 1), nn.Dropout(0.5)),
                  lambda: nn.Sequential(sn(nn.ConvTranspose2d(8, 8, 4, 2, 1)), nn.Dropout(0.5)),
                  lambda: nn.Sequential(sn(nn.Conv2d(8, 8, 3, 1, 1)), nn.Dropout(0.5))):
        torch.manual_seed(0)
        ref = build().to(memory_format=cl).eval().train()
        fused, report = ganengine.fuse(copy.deepcopy(ref), return_report=True)
        assert dict(report), report
        torch.manual_seed(1)
        want = ref(x)
        torch.manual_seed(1)
        got = fused(x)
        w = ref[0].weight.detach()  # (spectral norm: the weight / sigma of this forward)
        assert want.is_contiguous(memory_format=cl) and got.is_contiguous(memory_format=cl) and not got.is_contiguous()
        assert torch.equal(want == 0, got == 0)  # the same dropout mask
        # fp32 sums of at most n terms in two orders, times dropout's 2 (sum|w| bounds any output's
        # weights, conv or transposed): |diff| <= 2 * 2 n u max|x| sum|w|
        n = w[0].numel()
        bound = 4 * n * 2 ** -24 * x.abs().max() * w.abs().sum()
        assert (got - want).abs().max() <= bound
    conv = gnn.Conv3x3(8, 8).to(memory_format=cl)  # (called directly)
    y = conv(x)
    assert y.is_contiguous(memory_format=cl) and not y.is_contiguous()
    torch.manual_seed(0)
    block = Self_Attn(16, "relu")
    with torch.no_grad():
        block.gamma.fill_(0.5)
    xc = torch.randn(2, 16, 4, 4).to(memory_format=cl)
    want = block(xc)[0]
    got = ganengine.fuse(block)(xc)[0]
    assert want.is_contiguous() and got.is_contiguous()
    got.view(2, -1)
    assert not ganengine.fuse(block, keep_channels_last=True)(xc)[0].is_contiguous()


def test_hooks_added_after_fuse_on_norms_of_a_traced_forward_fire():
    """The rewritten forward called the norms' fused op directly: hooks registered after fuse()
    on those norms never fired (every other fused module runs them). Now a hooked norm is called
    as a module, then the activation: the same values."""
    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, 1, 1)
            self.bn = nn.BatchNorm2d(c)
            self.inorm = nn.InstanceNorm2d(c)

        def forward(self, x):
            h = F.relu(self.bn(self.conv(x)))
            return F.leaky_relu(self.inorm(h), 0.2) + x

    torch.manual_seed(0)
    model = Block(4)
    fused, report = ganengine.fuse(copy.deepcopy(model), return_report=True)
    assert report.traced == [""] and report.get("graph:batch_norm+act") == 1
    x = torch.randn(2, 4, 8, 8)
    want = model(x)
    seen = []
    fused.bn.register_forward_hook(lambda *a: seen.append("bn"))
    fused.inorm.register_forward_pre_hook(lambda *a: seen.append("inorm"))
    fused.bn.register_full_backward_hook(lambda *a: seen.append("bn backward"))
    xg = x.clone().requires_grad_()
    got = fused(xg)
    got.sum().backward()
    assert seen == ["bn", "inorm", "bn backward"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
