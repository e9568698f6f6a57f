"""fuse() acceptance round 16 (fuse16): what a traced forward may not freeze.

* a plain tensor attribute (or a registered buffer) tested in Python control flow was frozen into
  the traced graph (`if self.use_skip:`); one set to None later crashed the fused model (AdaIN /
  MUNIT `self.style`): tensors the module holds are traced as get_attr proxies now (control flow on
  them is declined) and their type is guarded per call (a change runs the module's own forward);
* a forward drawing from a host RNG (`random`, `np.random`, a numpy Generator) had the draw made at
  trace time frozen in, and fuse() moved Python's random stream: such forwards are declined, and
  fuse() restores Python's and numpy's global random state;
* a parametrized norm at a pattern's position was passed by without a word: declined, reported;
* a meta-device model is fused (docs said its tensors "cannot be probed": only the probed rules
  decline).
"""
from __future__ import annotations

import copy
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import ganengine
from ganengine.fusion import graph as G
from tests.test_fuse_guards import _count_graph_calls

D = torch.float64


def _x(seed=0):
    return torch.randn(2, 4, 8, 8, dtype=D, generator=torch.Generator().manual_seed(seed))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 8, 3, 1, 1)
        self.n = nn.BatchNorm2d(8)


# ----------------------------------------------------------------------------- defects 1 and 2
class SkipFlag(_Block):                      # repro_2: a plain tensor attribute tested in forward
    def __init__(self):
        super().__init__()
        self.use_skip = torch.tensor(True)

    def forward(self, x):
        h = F.relu(self.n(self.c(x)))
        if self.use_skip:
            h = h + x.mean(1, keepdim=True)
        return h


class SkipBuffer(SkipFlag):                  # the same flag as a registered buffer (fx hands it over real)
    def __init__(self):
        _Block.__init__(self)
        self.register_buffer("use_skip", torch.tensor(True))


class ScaleItem(_Block):                     # a buffer turned into a Python number
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(2.0, dtype=D))

    def forward(self, x):
        return F.relu(self.n(self.c(x))) * self.scale.item()


def _set_both(name, value):
    def change(m, f):
        setattr(m, name, value)
        setattr(f, name, value)
    return change


@pytest.mark.parametrize("cls, change", [
    (SkipFlag, _set_both("use_skip", torch.tensor(False))),     # repro_2
    (SkipFlag, lambda m, f: m.use_skip.fill_(False)),           # in place (the two share the tensor)
    (SkipBuffer, lambda m, f: m.use_skip.fill_(False)),
    (ScaleItem, lambda m, f: m.scale.fill_(-3.0)),
])
def test_a_tensor_attribute_read_as_a_python_value_is_not_frozen(cls, change):
    torch.manual_seed(0)
    m = cls().double().eval()
    f, rep = ganengine.fuse(m, return_report=True)
    x = _x()
    torch.testing.assert_close(f(x), m(x), rtol=1e-12, atol=1e-12)
    change(m, f)
    torch.testing.assert_close(f(x), m(x), rtol=1e-12, atol=1e-12)
    if cls is not ScaleItem:   # `if <tensor>:` cannot be traced: declined with the reason
        assert rep.traced == [] and rep.not_traced and "control flow" in rep.not_traced[0][1]
    else:                      # .item() on a traced buffer is a graph node: read per call
        assert rep.traced == [""]


class Style(_Block):                         # repro_1: AdaIN / MUNIT style set per batch, cleared after
    def __init__(self):
        super().__init__()
        self.style = None

    def forward(self, x):
        h = F.relu(self.n(self.c(x)))
        if self.style is not None:
            h = h * self.style
        return h


def test_a_tensor_attribute_set_to_none_after_fuse_runs_the_modules_own_forward():
    torch.manual_seed(0)
    m = Style().double()
    m.style = torch.full((1, 8, 1, 1), 2.0, dtype=D)
    f, rep = ganengine.fuse(m, return_report=True)
    assert rep.traced == [""] and rep["graph:batch_norm+act"] == 1
    assert f.__dict__["_ganengine_guard_names"] == ("type:style",)
    x = _x()
    calls = _count_graph_calls(f)
    torch.testing.assert_close(f(x), m(x))
    new = torch.randn(1, 8, 1, 1, dtype=D)   # another tensor per batch: the graph reads it per call
    m.style = f.style = new
    torch.testing.assert_close(f(x), m(x))
    assert len(calls) == 2
    m.style = f.style = None                 # cleared: the module's own forward, as eager
    torch.testing.assert_close(f(x), m(x))
    assert len(calls) == 2
    m.style = f.style = new
    torch.testing.assert_close(f(x), m(x))
    assert len(calls) == 3


class StyleType(Style):
    def forward(self, x):
        h = F.relu(self.n(self.c(x)))
        return h * self.style if isinstance(self.style, torch.Tensor) else h


def _scaled(h, s):
    return h * s if torch.is_tensor(s) else h


class StyleTypeInHelper(Style):
    def forward(self, x):
        return _scaled(F.relu(self.n(self.c(x))), self.style)


class StyleExactType(Style):
    def forward(self, x):
        h = F.relu(self.n(self.c(x)))
        return h * self.style if type(self.style) is torch.Tensor else h


@pytest.mark.parametrize("cls", [StyleType, StyleTypeInHelper, StyleExactType])
def test_a_forward_testing_a_tensor_attributes_type_is_not_traced(cls):
    """fx traces a tensor attribute as a proxy: isinstance / is_tensor / type() on it would be
    answered once, by the proxy (before: answered by the trace-time tensor, frozen, and a crash
    once the attribute was set to None)."""
    torch.manual_seed(0)
    m = cls().double()
    m.style = torch.full((1, 8, 1, 1), 2.0, dtype=D)
    f, rep = ganengine.fuse(m, return_report=True)
    x = _x()
    torch.testing.assert_close(f(x), m(x))
    m.style = f.style = None
    torch.testing.assert_close(f(x), m(x))
    assert rep.traced == [] and "proxy" in rep.not_traced[0][1]


class Gain(_Block):
    def __init__(self, gain):
        super().__init__()
        if gain is None:
            self.register_parameter("gain", None)
        else:
            self.gain = nn.Parameter(torch.full((1,), gain, dtype=D))

    def forward(self, x):
        h = F.relu(self.n(self.c(x)))
        if self.gain is not None:
            h = h * self.gain
        return h


@pytest.mark.parametrize("before, after", [(None, 3.0), (3.0, None)])
def test_a_parameter_slot_changing_between_none_and_a_tensor_is_watched(before, after):
    torch.manual_seed(0)
    m = Gain(before).double()
    f, rep = ganengine.fuse(m, return_report=True)
    x = _x()
    torch.testing.assert_close(f(x), m(x))
    m.gain = f.gain = None if after is None else nn.Parameter(torch.full((1,), after, dtype=D))
    torch.testing.assert_close(f(x), m(x))   # (before: the graph of the trace-time branch; a crash on None)
    # traced, and the slot's type watched, read from the slot dict (nn.Module.__getattr__ is slow)
    assert rep.traced == [""] and f.__dict__["_ganengine_guard_names"] == ("param:gain",)


def test_tensor_guards_survive_pickle_deepcopy_and_compile():
    torch.manual_seed(0)
    m = Style().double().eval()
    m.style = torch.full((1, 8, 1, 1), 2.0, dtype=D)
    f = ganengine.fuse(m)
    g = ganengine.fuse(Gain(2.0).double().eval())
    assert f.__dict__["_ganengine_guard_names"] == ("type:style",)
    assert g.__dict__["_ganengine_guard_names"] == ("param:gain",)
    x = _x()
    for fused, ref in ((f, m(x)), (g, g(x))):
        for other in (pickle.loads(pickle.dumps(fused)), copy.deepcopy(fused)):
            assert other.__dict__["_ganengine_guard_names"] == fused.__dict__["_ganengine_guard_names"]
            torch.testing.assert_close(other(x), ref)
        torch.testing.assert_close(torch.compile(fused, fullgraph=True, backend="eager")(x), ref)


# ----------------------------------------------------------------------------- defect 3
class AugD(nn.Module):                       # repro_3: DiffAugment-style flip drawn from `random`
    def __init__(self, p=0.5):
        super().__init__()
        self.p = p
        self.c = nn.Conv2d(4, 8, 3, 1, 1)
        self.n = nn.InstanceNorm2d(8)
        self.out = nn.Conv2d(8, 1, 3, 1, 1)

    def forward(self, x):
        if random.random() < self.p:
            x = x.flip(3)
        return self.out(F.leaky_relu(self.n(self.c(x)), 0.2))


_GEN = np.random.default_rng(0)


class AugNumpyGlobal(AugD):
    def forward(self, x):
        if np.random.rand() < self.p:
            x = x.flip(3)
        return self.out(F.leaky_relu(self.n(self.c(x)), 0.2))


class AugNumpyGenerator(AugD):
    def forward(self, x):
        if _GEN.random() < self.p:
            x = x.flip(3)
        return self.out(F.leaky_relu(self.n(self.c(x)), 0.2))


def _maybe_flip(x, p):
    return x.flip(3) if random.random() < p else x


class AugInHelper(AugD):                     # the draw in a function the source check does not read
    def forward(self, x):
        return self.out(F.leaky_relu(self.n(self.c(_maybe_flip(x, self.p))), 0.2))


class AugTorchScalar(AugD):                  # torch's RNG on a real tensor at trace time
    def forward(self, x):
        if torch.rand(1) < self.p:
            x = x.flip(3)
        return self.out(F.leaky_relu(self.n(self.c(x)), 0.2))


def _seed_all(s):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    _GEN.bit_generator.state = np.random.default_rng(s).bit_generator.state


@pytest.mark.parametrize("cls, word", [(AugD, "random.random"), (AugNumpyGlobal, "np.random.rand"),
                                       (AugNumpyGenerator, "_GEN.random"), (AugInHelper, "Python's random"),
                                       (AugTorchScalar, "torch's rand")])
def test_a_forward_drawing_from_a_host_rng_is_not_traced(cls, word):
    torch.manual_seed(0)
    m = cls().double()
    x = _x()
    x[..., :4] += 3
    for seed in range(8):       # (before: traced with the branch of the trace-time draws, for some seed)
        _seed_all(seed)
        f, rep = ganengine.fuse(m, return_report=True)
        assert rep.traced == [], seed
        assert word in rep.not_traced[0][1] and "trace time" in rep.not_traced[0][1]
    for s in range(6):
        _seed_all(s)
        a = f(x)
        _seed_all(s)
        torch.testing.assert_close(a, m(x))


@pytest.mark.parametrize("cls", [AugD, AugNumpyGlobal, AugInHelper])
def test_fuse_does_not_move_pythons_or_numpys_random_stream(cls):
    random.seed(1)
    np.random.seed(1)
    py, npst = random.getstate(), np.random.get_state()
    ganengine.fuse(cls().double())
    assert random.getstate() == py
    now = np.random.get_state()
    assert now[0] == npst[0] and np.array_equal(now[1], npst[1]) and now[2:] == npst[2:]


def test_a_torch_random_op_on_a_traced_value_still_traces():
    """dropout / randn_like on the traced tensors are graph nodes, drawn per call: not declined."""
    class Noisy(_Block):
        def forward(self, x):
            h = F.relu(self.n(self.c(x)))
            return F.dropout(h, 0.5) + 0.1 * torch.randn_like(h)

    torch.manual_seed(0)
    m = Noisy().double()
    f, rep = ganengine.fuse(m, return_report=True)
    assert rep.traced == [""], rep.not_traced
    x = _x()
    torch.manual_seed(5)
    a = f(x)
    torch.manual_seed(5)
    torch.testing.assert_close(a, m(x))


# ----------------------------------------------------------------------------- defect 4
class _Positive(nn.Module):
    def forward(self, w):
        return w.abs() + 0.5


@pytest.mark.parametrize("norm, act, rules", [
    (lambda: nn.InstanceNorm2d(8, affine=True), nn.LeakyReLU(0.2),
     {"conv2d+instance_norm+act", "instance_norm+act", "instance_norm"}),
    (lambda: nn.BatchNorm2d(8), nn.ReLU(), {"batch_norm+act", "batch_norm"}),
    (lambda: nn.BatchNorm2d(8), nn.Tanh(), {"batch_norm"}),
])
def test_a_parametrized_norm_is_declined_and_reported(norm, act, rules):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1), norm(), act)
    parametrize.register_parametrization(m[1], "weight", _Positive())
    f, rep = ganengine.fuse(m, return_report=True)
    declined = {d.rule for d in rep.declined if "parametrized" in d.reason}
    assert declined == rules, rep.declined
    assert type(f[1]) is type(m[1])          # left as it was
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(f(x), m(x))


def test_a_parametrized_conv_before_an_instance_norm_is_reported():
    from torch.nn.utils import parametrizations as P

    torch.manual_seed(0)
    m = nn.Sequential(P.spectral_norm(nn.Conv2d(4, 8, 5, 1, 2)), nn.InstanceNorm2d(8), nn.LeakyReLU(0.2))
    f, rep = ganengine.fuse(m, return_report=True)
    assert [(d.where, d.rule) for d in rep.declined] == [("0", "conv2d+instance_norm+act")]
    assert "parametrized" in rep.declined[0].reason
    assert rep["instance_norm+act"] == 1 and rep["conv_module"] == 1   # the pair and the SN conv still fuse


# ----------------------------------------------------------------------------- defect 5 (docs)
def test_a_meta_device_model_is_fused_and_loads_a_checkpoint():
    """(A documentation defect: docs said meta tensors "cannot be probed" as if meta models were
    declined; the exact torch classes need no probe and are fused. This test passes before and after.)"""
    def mk():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 4, 2, 1),
                             nn.InstanceNorm2d(8), nn.LeakyReLU(0.2))

    with torch.device("meta"):
        mm = mk()
    f, rep = ganengine.fuse(mm, return_report=True)
    assert rep["batch_norm+act"] == 1 and rep.declined == []
    f = f.to_empty(device="cpu")
    torch.manual_seed(0)
    r = mk()
    f.load_state_dict(r.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(f(x), r(x), rtol=1e-5, atol=1e-5)


def test_a_forward_reading_a_module_list_childs_parameters_is_still_traced():
    """self.convs[0].weight: a Parameter slot under a numbered child, whose guard reads the module
    dicts by key (the identifier check is for plain attributes only)."""
    class ListRead(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1)])
            self.act = nn.LeakyReLU(0.2)
            self.conv2 = nn.Conv2d(4, 4, 5, padding=2)  # (a kernel with a faster route: conv + act fuse)
            self.act2 = nn.LeakyReLU(0.2)

        def forward(self, x):
            h = F.conv2d(x, self.convs[0].weight, self.convs[0].bias, padding=1)
            return self.act2(self.conv2(self.act(h)))

    torch.manual_seed(0)
    m = ListRead()
    fused, report = ganengine.fuse(m, return_report=True)
    assert report.traced == [""], report.not_traced
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(fused(x), m(x))
    m.convs[0].bias = None  # (the slot's guard: the module's own forward from here)
    fused.convs[0].bias = None
    torch.testing.assert_close(fused(x), m(x))
