"""What fx freezes when ``fuse()`` traces a forward, and what the source checks must see.

* plain attributes the traced forward reads (``self.alpha``, ``if self.use_act:``, a slope, a
  config object's fields, a child's plain attribute) are watched: after a change the fused module
  runs its own forward (ganengine/fusion/graph.py, ``guard_ok``), and the graph again when the
  values are back;
* a forward that writes attributes (whatever its first parameter is called, or through a helper
  function), checkpoints, or calls an autograd Function is not traced (fx would drop the effect);
* a Sequential whose entries other code reads one by one (a wrapper iterating ``self.G.model``,
  ``self.children()``, ``getattr`` with a computed name, a method whose first parameter is not
  ``self``) keeps its entries (docs/fuse.md, "Sequentials used as lists").
"""
from __future__ import annotations

import copy
import pickle
import types

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

import ganengine
from ganengine.fusion import graph as G

C = 8


def _x(seed=0, c=C):
    return torch.randn(2, c, 6, 6, generator=torch.Generator().manual_seed(seed))


def _count_graph_calls(fused):
    """Wrap the rewritten graph function so the test sees whether a call took it."""
    calls = []
    fn = fused.__dict__["_ganengine_graph_fn"]

    def counting(self, *a, **k):
        calls.append(1)
        return fn(self, *a, **k)

    object.__setattr__(fused, "_ganengine_graph_fn", counting)
    return calls


# ----------------------------------------------------------------------------- plain attributes
class FadeIn(nn.Module):                      # ProGAN-style: the loop changes alpha, a flag
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, 1, 1)
        self.norm = nn.BatchNorm2d(C)
        self.alpha = 1.0
        self.use_act = True

    def forward(self, x):
        h = self.norm(self.conv(x))
        if self.use_act:
            h = F.relu(h)
        return self.alpha * h + (1 - self.alpha) * x


class SlopeAttr(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, 1, 1)
        self.norm = nn.InstanceNorm2d(4)
        self.slope = 0.2

    def forward(self, x):
        return F.leaky_relu(self.norm(self.conv(x)), self.slope)


def test_plain_attributes_read_in_forward_stay_live():
    torch.manual_seed(0)
    m = FadeIn().eval()
    ref = copy.deepcopy(m)
    fused, report = ganengine.fuse(m, return_report=True)
    assert report["graph:batch_norm+act"] == 1 and report.traced == [""]
    calls = _count_graph_calls(fused)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x))
        assert len(calls) == 1
        for alpha, act in ((0.25, True), (0.25, False), (1.0, False), (1, True)):  # 1: an int now
            ref.alpha = fused.alpha = alpha
            ref.use_act = fused.use_act = act
            torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
        assert len(calls) == 1, "a changed attribute runs the module's own forward"
        ref.alpha = fused.alpha = 1.0       # back to what the trace saw: the graph again
        torch.testing.assert_close(fused(x), ref(x))
        assert len(calls) == 2


def test_a_slope_attribute_stays_live():
    torch.manual_seed(0)
    m = SlopeAttr()
    ref = copy.deepcopy(m)
    fused, report = ganengine.fuse(m, return_report=True)
    assert report["graph:instance_norm+act"] == 1
    x = _x(c=4)
    ref.slope = fused.slope = 0.0
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


class ConfigAndChild(nn.Module):
    """SPADE keeps an options object (``self.opt.use_vae``); a child may carry a plain attribute."""

    def __init__(self):
        super().__init__()
        self.opt = types.SimpleNamespace(scale=1.0, sizes=[1, 2])
        self.conv = nn.Conv2d(C, C, 3, 1, 1)
        self.norm = nn.BatchNorm2d(C)
        self.extra = nn.Module()
        self.extra.gain = 1.0

    def forward(self, x):
        return F.relu(self.norm(self.conv(x))) * self.opt.scale * self.extra.gain * self.opt.sizes[0]


def test_config_object_and_child_attributes_stay_live():
    torch.manual_seed(0)
    m = ConfigAndChild().eval()
    ref = copy.deepcopy(m)
    fused, report = ganengine.fuse(m, return_report=True)
    assert report.traced == [""]
    assert fused.__dict__["_ganengine_guard_names"] == ("extra.gain", "opt.__dict__")  # (a SimpleNamespace: its field dict, compared whole)
    x = _x()
    with torch.no_grad():
        for setter in (lambda n: setattr(n.opt, "scale", 3.0), lambda n: setattr(n.extra, "gain", -2.0),
                       lambda n: n.opt.sizes.__setitem__(0, 5)):
            setter(ref)
            if fused.opt is not ref.opt:
                setter(fused)
            torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


def test_watched_values_survive_pickle_and_deepcopy():
    torch.manual_seed(0)
    fused = ganengine.fuse(FadeIn().eval())
    x = _x()
    for other in (pickle.loads(pickle.dumps(fused)), copy.deepcopy(fused)):
        other.alpha = 0.5
        fused.alpha = 0.5
        with torch.no_grad():
            torch.testing.assert_close(other(x), fused(x))
            twin = FadeIn().eval()
            twin.load_state_dict(fused.state_dict())
            twin.alpha = 0.5
            torch.testing.assert_close(other(x), twin(x), rtol=1e-5, atol=1e-5)
        fused.alpha = 1.0


class Opaque:
    __slots__ = ("k",)

    def __init__(self):
        self.k = 1.0


class ReadsOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, 1, 1)
        self.norm = nn.BatchNorm2d(C)
        self.box = Opaque()

    def forward(self, x):
        return F.relu(self.norm(self.conv(x))) * self.box.k


def test_a_value_fuse_cannot_watch_is_not_traced():
    fused, report = ganengine.fuse(ReadsOpaque(), return_report=True)
    assert report.traced == [] and "graph:batch_norm+act" not in report
    (where, why), = report.not_traced
    assert "box" in why and "cannot watch" in why


def test_guard_costs_one_tuple_compare():
    fused = ganengine.fuse(FadeIn().eval())
    d = fused.__dict__
    assert d["_ganengine_guard_names"] == ("alpha", "use_act")
    assert G.guard_ok(fused, d)
    fused.use_act = False
    assert not G.guard_ok(fused, d)


# ----------------------------------------------------------------------------- writes, checkpoints
class Counter(nn.Module):
    def __init__(this):
        super().__init__()
        this.c = nn.Conv2d(4, 4, 3, 1, 1)
        this.n = nn.BatchNorm2d(4)
        this.calls = 0

    def forward(this, x):
        this.calls += 1
        return F.relu(this.n(this.c(x)))


def _bump(m):
    m.calls += 1


class CounterViaHelper(Counter):
    def forward(self, x):
        _bump(self)
        return F.relu(self.n(self.c(x)))


@pytest.mark.parametrize("cls", [Counter, CounterViaHelper])
def test_a_forward_that_writes_attributes_is_not_traced(cls):
    fused, report = ganengine.fuse(cls(), return_report=True)
    assert report.traced == [] and len(report.not_traced) == 1
    assert "calls" in report.not_traced[0][1]
    assert fused.calls == 0, "the trace's write was undone"
    for _ in range(3):
        fused(torch.randn(2, 4, 5, 5))
    assert fused.calls == 3


_ckpt = cp.checkpoint


def _through_helper(f, x):
    return _ckpt(f, x, use_reentrant=False)


class Checkpointed(nn.Module):
    def __init__(s):
        super().__init__()
        s.blk = nn.Sequential(nn.Conv2d(C, C, 3, 1, 1), nn.BatchNorm2d(C), nn.ReLU(True))
        s.c = nn.Conv2d(C, C, 3, 1, 1)
        s.n = nn.BatchNorm2d(C)

    def forward(s, x):
        h = cp.checkpoint(s.blk, x, use_reentrant=False)
        return F.relu(s.n(s.c(h)))


class CheckpointedViaHelper(Checkpointed):
    def forward(s, x):
        return F.relu(s.n(s.c(_through_helper(s.blk, x))))


class Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class WithAutogradFunction(Checkpointed):
    def forward(s, x):
        return F.relu(s.n(s.c(Reverse.apply(s.blk(x)))))


@pytest.mark.parametrize("cls", [Checkpointed, CheckpointedViaHelper, WithAutogradFunction])
def test_checkpoints_and_autograd_functions_are_not_traced(cls):
    torch.manual_seed(0)
    m = cls()
    ref = copy.deepcopy(m)
    fused, report = ganengine.fuse(m, return_report=True)
    assert report.traced == [] and len(report.not_traced) == 1, report.not_traced
    calls = {"ref": 0, "fused": 0}
    ref.blk[0].register_forward_hook(lambda *a: calls.__setitem__("ref", calls["ref"] + 1))
    fused.blk[0].register_forward_hook(lambda *a: calls.__setitem__("fused", calls["fused"] + 1))
    x = torch.randn(2, C, 10, 10)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).square().sum().backward()
    fused(xf).square().sum().backward()
    assert calls["fused"] == calls["ref"]
    assert fused.blk[1].num_batches_tracked.item() == ref.blk[1].num_batches_tracked.item()
    torch.testing.assert_close(fused.blk[1].running_mean, ref.blk[1].running_mean)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- Sequentials as lists
def _seq():
    # (5x5 convs: kernels with a faster route on the CPU, so conv + norm + act fuse; a small 3x3 conv has
    # none and stays PyTorch's: csrc/cpu/conv_route.cpp, kMinTaps)
    return nn.Sequential(nn.Conv2d(C, C, 5, 1, 2), nn.InstanceNorm2d(C), nn.LeakyReLU(0.2),
                         nn.Conv2d(C, C, 5, 1, 2), nn.BatchNorm2d(C), nn.ReLU())


class Gen(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = _seq()

    def forward(self, x):
        return self.model(x)


class FeatureTap(nn.Module):                  # a wrapper reading G's layers one by one
    def __init__(self):
        super().__init__()
        self.G = Gen()

    def forward(self, x):
        feats = []
        for layer in self.G.model:
            x = layer(x)
            feats.append(x)
        return feats


class ChildrenLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = _seq()

    def forward(self, x):
        feats = []
        for block in self.children():
            for layer in block:
                x = layer(x)
                feats.append(x)
        return feats


class GetattrName(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = _seq()
        self.which = "model"

    def forward(self, x):
        net = getattr(self, self.which)
        return [net[0](x), net[1](net[0](x))]


class NotSelf(nn.Module):
    def __init__(this):
        super().__init__()
        this.model = _seq()

    def forward(this, x):
        return [this.model[1](this.model[0](x)), this.model(x)]


class CallsEachChild(nn.Module):              # SPADE's discriminator: each child called whole
    def __init__(self):
        super().__init__()
        self.model = _seq()

    def forward(self, x):
        out = []
        for sub in self.children():
            x = sub(x)
            out.append(x)
        return out


@pytest.mark.parametrize("cls", [FeatureTap, ChildrenLoop, GetattrName, NotSelf])
def test_sequentials_read_one_by_one_keep_their_entries(cls):
    torch.manual_seed(0)
    m = cls().train()
    ref = copy.deepcopy(m)
    fused, report = ganengine.fuse(m, return_report=True)
    seq_rules = {"conv2d+instance_norm+act", "instance_norm+act", "batch_norm+act", "conv2d+leaky_relu"}
    assert not seq_rules & set(report), dict(report)
    assert any(d.rule in seq_rules for d in report.declined)
    x = torch.randn(2, C, 10, 10)
    with torch.no_grad():
        for a, b in zip(ref(x), fused(x)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_a_loop_that_calls_each_child_whole_still_fuses():
    torch.manual_seed(0)
    m = CallsEachChild().train()
    ref = copy.deepcopy(m)
    fused, report = ganengine.fuse(m, return_report=True)
    assert report.get("batch_norm+act", 0) == 1, dict(report)
    x = torch.randn(2, C, 10, 10)
    with torch.no_grad():
        for a, b in zip(ref(x), fused(x)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- review regressions
class TypeDispatch(nn.Module):                # exact-type dispatch on a child
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, 1, 1)
        self.norm = nn.BatchNorm2d(C)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        h = self.norm(self.conv(x))
        if type(self.act) is nn.LeakyReLU and type(self) is TypeDispatch:
            return self.act(h)
        return F.relu(h)


def test_a_forward_testing_exact_types_sees_the_real_classes():
    """The trace records reads without changing any instance's class."""
    torch.manual_seed(0)
    m = TypeDispatch().eval()
    ref = copy.deepcopy(m)
    fused, report = ganengine.fuse(m, return_report=True)
    assert report.traced == [""] and report.get("graph:batch_norm+act", 0) == 1, dict(report)
    assert type(fused.act) is nn.LeakyReLU and type(fused.norm).__getattribute__ is object.__getattribute__
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


_REGISTRY: dict = {}


class _Registered(nn.Module):
    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _REGISTRY[cls.__name__] = cls


class RegisteredBlock(_Registered):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 4, 2, 1)  # (a kernel with a faster route: the pair fuses)
        self.act = nn.LeakyReLU(0.2)
        self.scale = 1.0

    def forward(self, x):
        return self.act(self.conv(x)) * self.scale


def test_tracing_makes_no_subclass():
    fused, report = ganengine.fuse(RegisteredBlock(), return_report=True)
    assert report.traced == [""]
    assert _REGISTRY["RegisteredBlock"] is RegisteredBlock
    assert "__getattribute__" not in RegisteredBlock.__dict__ and "__setattr__" not in RegisteredBlock.__dict__


class FreezeBN(nn.Module):                    # a detectron / mmdet style helper over self.modules()
    def __init__(self):
        super().__init__()
        self.body = _seq()

    def forward(self, x):
        return self.body(x)

    def freeze_bn(self):
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d) or type(m) is nn.InstanceNorm2d:
                m.eval()
                m.momentum = 0.0
                m.weight.requires_grad_(False) if m.weight is not None else None
                m.register_forward_hook(lambda *a: None).remove()


class CallsEveryDescendant(FreezeBN):
    def freeze_bn(self, x):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                x = m(x)                      # calls the Sequential's entries one by one
        return x


class CollectsDescendants(FreezeBN):
    def freeze_bn(self):
        out = []
        for m in self.modules():
            out.append(m)
        return out


def test_a_loop_treating_each_descendant_as_one_module_keeps_sequential_fusion():
    fused, report = ganengine.fuse(FreezeBN().train(), return_report=True)
    assert report.get("conv2d+instance_norm+act", 0) == 1 or report.get("instance_norm+act", 0) == 1, dict(report)
    for cls in (CallsEveryDescendant, CollectsDescendants):
        fused, report = ganengine.fuse(cls().train(), return_report=True)
        assert not {"conv2d+instance_norm+act", "instance_norm+act", "batch_norm+act"} & set(report), (cls, dict(report))


def test_an_unreadable_parent_is_read_from_its_bytecode():
    """Source unreadable (exec): its bytecode says how it uses its children (checks.bytecode_chain_use,
    session 19): a child it only calls fuses, one it slices keeps its entries (tests/test_fix_s19.py)."""
    scope = {"nn": nn, "Gen": Gen, "_seq": _seq}
    exec("class Wrapper(nn.Module):\n"
         "    def __init__(self):\n"
         "        super().__init__()\n"
         "        self.G = Gen()\n"
         "        self.direct = _seq()\n"
         "    def forward(self, x):\n"
         "        return self.direct(self.G(x)) + self.G.model[:2](x)\n", scope)
    fused, report = ganengine.fuse(scope["Wrapper"]().train(), return_report=True)
    declined = {d.where: d.reason for d in report.declined}
    assert not any(w.startswith("direct") for w in declined), declined
    assert any(w.startswith("G.model.") and "cannot read the source of Wrapper.forward" in r
               and "slices self.G.model" in r for w, r in declined.items()), declined
    assert report.get("conv2d+instance_norm+act", 0) + report.get("instance_norm+act", 0) >= 1, dict(report)


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def test_overlapping_traces_restore_the_autograd_patches():
    from torch.autograd.function import Function

    orig = Function.__dict__["apply"]
    a, b = G._Unrecorded(G.TraceLog()), G._Unrecorded(G.TraceLog())
    a.__enter__(); b.__enter__(); a.__exit__(None, None, None); b.__exit__(None, None, None)
    assert Function.__dict__["apply"] is orig
    _Double.apply(torch.ones(1))
    assert a.log.unrecorded is None and b.log.unrecorded is None


def test_another_threads_autograd_function_is_not_blamed_on_the_trace():
    import threading

    log = G.TraceLog()
    with G._Unrecorded(log):
        t = threading.Thread(target=lambda: _Double.apply(torch.ones(1)))
        t.start()
        t.join()
    assert log.unrecorded is None
    with G._Unrecorded(log):
        _Double.apply(torch.ones(1))
    assert "_Double" in log.unrecorded


def _swap_in(mod, x):                         # a free helper: the source check does not see it
    mod.last = nn.Identity()                  # -> mod._modules
    mod.counter = torch.zeros(1)              # a registered buffer -> mod._buffers
    return x


class SwapsWhileTraced(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 5, 1, 2)
        self.act = nn.LeakyReLU(0.2)
        self.register_buffer("counter", torch.full((1,), 7.0))

    def forward(self, x):
        return self.act(self.conv(_swap_in(self, x)))


def test_writes_routed_to_modules_and_buffers_are_undone():
    m = SwapsWhileTraced()
    fused, report = ganengine.fuse(m, inplace=True, return_report=True)
    assert report.not_traced and "assigns" in report.not_traced[0][1]
    assert sorted(dict(m.named_children())) == ["act", "conv"]
    assert m.counter.item() == 7.0 and "last" not in m.state_dict()


class KeywordAttr(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 5, 1, 2)
        self.act = nn.LeakyReLU(0.2)
        setattr(self, "lambda", 0.5)

    def forward(self, x):
        return self.act(self.conv(x)) * getattr(self, "lambda")


def test_an_attribute_named_like_a_keyword_is_declined_not_a_crash():
    fused, report = ganengine.fuse(KeywordAttr(), return_report=True)
    (where, why), = report.not_traced
    assert "lambda" in why


class ReadsOptions(nn.Module):
    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        self.conv = nn.Conv2d(C, C, 5, 1, 2)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        h = self.conv(x)
        return self.act(h) if self.opt.use_act else h


def test_an_options_object_is_watched_field_by_field():
    import argparse

    opt = argparse.Namespace(use_act=True, epoch=0, **{f"f{i}": i for i in range(50)})
    m = ReadsOptions(opt)
    ref = copy.deepcopy(m)
    fused = ganengine.fuse(m)
    d = fused.__dict__
    assert d["_ganengine_guard_names"] == ("opt", "opt.use_act")
    assert "__getattribute__" not in argparse.Namespace.__dict__
    calls = _count_graph_calls(fused)
    x = _x()
    opt.epoch = 5                              # a field forward does not read: the graph still runs
    fused(x)
    assert calls == [1] and G.guard_ok(fused, d)
    opt.use_act = ref.opt.use_act = False      # a field it reads: the module's own forward
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    assert calls == [1]


def test_an_options_object_read_through_vars_is_compared_whole():
    import argparse

    class ReadsVars(ReadsOptions):
        def forward(self, x):
            h = self.conv(x)
            return self.act(h) if vars(self.opt)["use_act"] else h

    opt = argparse.Namespace(use_act=True)
    fused = ganengine.fuse(ReadsVars(opt))
    assert fused.__dict__["_ganengine_guard_names"] == ("opt.__dict__",)
    opt.use_act = False
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), fused.conv(x))


def test_traces_in_several_threads_record_their_own_reads():
    import threading

    results, errors = [], []

    def one():
        try:
            for _ in range(3):
                f = ganengine.fuse(FadeIn().eval())
                results.append(f.__dict__["_ganengine_guard_names"])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [("alpha", "use_act")] * 9
    assert G._HOOKED == {} and G._ACTIVE == {} and "__getattribute__" not in FadeIn.__dict__


def test_a_simplenamespace_options_object_compiles_with_fullgraph():
    """The guard compared a SimpleNamespace through its C-level ==, which torch.compile cannot trace
    (fullgraph=True raised): its field dict is compared now, as plain Python."""
    torch.manual_seed(0)
    m = ConfigAndChild().eval()
    ref = copy.deepcopy(m)
    fused = ganengine.fuse(m)
    x = _x()
    out = torch.compile(fused, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)
