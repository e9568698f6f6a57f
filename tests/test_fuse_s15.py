"""ganengine.fuse: defects an acceptance run (s15) found, one regression test each.

* a torch.compile'd model: fuse() (not in place) rewired the caller's model through
  OptimizedModule.__setattr__ while copying it;
* a torch.fx GraphModule: the copy had no forward (fx generates it per instance);
* state-dict hooks on replaced modules were dropped silently (and load pre-hooks, bound to their
  module, stayed bound to the original);
* fuse(fuse(m))'s report: docs/fuse.md now says which declines are listed again.
"""
import pytest
import torch
import torch.fx
from torch import nn

import ganengine

_COMPILED = "torch.compile'd module"


def _block():
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())


class _Net(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)


def _x():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- torch.compile
def test_compiled_model_is_declined_and_left_untouched():
    net = _Net(_block())
    children = dict(net.body._modules)
    compiled = torch.compile(net)
    fused, report = ganengine.fuse(compiled, return_report=True)
    assert list(net._modules) == ["body"] and dict(net.body._modules) == children
    assert fused is compiled
    assert not dict(report) and any(_COMPILED in d.reason for d in report.declined)
    net(_x())   # the user's model still runs (compiling the compiled one is not needed to see it)


def test_compiled_sequential_is_not_rewired():
    seq = _block()
    children = dict(seq._modules)
    ganengine.fuse(torch.compile(seq))
    assert dict(seq._modules) == children


def test_compiled_submodule_is_declined_and_shared():
    inner = _block()
    children = dict(inner._modules)
    net = _Net(torch.compile(inner))
    fused, report = ganengine.fuse(net, return_report=True)
    assert fused.body is net.body            # not copied: its forward runs `inner`
    assert dict(inner._modules) == children  # and not rewritten inside
    assert [d.where for d in report.declined if _COMPILED in d.reason] == ["body"]


# ----------------------------------------------------------------------------- torch.fx
def _traced():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.LeakyReLU(0.2), nn.Conv2d(16, 1, 3, 1, 1))
    return net, torch.fx.symbolic_trace(net)


def test_fx_graph_module_copy_runs_and_computes_the_same():
    net, gm = _traced()
    x = _x()
    fused, report = ganengine.fuse(gm, return_report=True)
    assert dict(report)                       # it did fuse something...
    torch.testing.assert_close(fused(x), net(x))   # ...and the copy runs its own graph
    torch.testing.assert_close(gm(x), net(x))
    assert fused.graph is not gm.graph and fused.graph.owning_module is fused
    assert gm.graph.owning_module is gm and type(gm.get_submodule("1")) is nn.BatchNorm2d   # the caller's is untouched


def test_fx_graph_module_child_copy_runs():
    _, gm = _traced()
    net = _Net(gm)
    x = _x()
    fused = ganengine.fuse(net)
    torch.testing.assert_close(fused(x), net(x))


# ----------------------------------------------------------------------------- state-dict hooks
_HOOKS = {
    "state_dict hook": lambda m, log: m.register_state_dict_post_hook(
        lambda mod, sd, prefix, meta: sd.__setitem__(prefix + "fmt_version", torch.tensor(2))),
    "state_dict hook (private)": lambda m, log: m._register_state_dict_hook(
        lambda mod, sd, prefix, meta: sd.__setitem__(prefix + "fmt_version", torch.tensor(2))),
    "load_state_dict pre-hook": lambda m, log: m.register_load_state_dict_pre_hook(
        lambda mod, sd, prefix, *a: log.append(mod)),
    "load_state_dict post-hook": lambda m, log: m.register_load_state_dict_post_hook(
        lambda mod, keys: log.append(mod)),
}


def _hooked_seq(kind, where, log):
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.InstanceNorm2d(8), nn.LeakyReLU(0.2),
                        nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
    _HOOKS[kind](seq[where], log)
    return seq


@pytest.mark.parametrize("where", [1, 2, 4, 5])   # a norm fused with its act, the act absorbed
@pytest.mark.parametrize("kind", sorted(_HOOKS))
def test_state_dict_hooks_on_replaced_modules_are_declined(kind, where):
    log = []
    seq = _hooked_seq(kind, where, log)
    fused, report = ganengine.fuse(seq, return_report=True)
    assert type(fused[where]) is type(seq[where])          # the hooked module is kept
    assert any(kind.split(" (")[0] in d.reason and "state_dict keys" in d.reason for d in report.declined)
    assert list(fused.state_dict()) == list(seq.state_dict())
    if "load" in kind:
        log.clear()
        fused.load_state_dict(seq.state_dict())
        assert log == [fused[where]]                         # ran, on the fused model's module
    else:
        assert f"{where}.fmt_version" in fused.state_dict()


def test_state_dict_hook_on_a_kept_conv_fuses_and_keeps_the_hook():
    # the conv + act rule keeps a hooked conv's object class (Fused<Conv2d>): its hooks go along
    seq = nn.Sequential(nn.Conv2d(3, 8, 5, 1, 2), nn.LeakyReLU(0.2))   # (5x5: a kernel with a faster route)
    _HOOKS["state_dict hook"](seq[0], [])
    fused, report = ganengine.fuse(seq, return_report=True)
    assert dict(report) == {"conv2d+leaky_relu": 1}
    assert list(fused.state_dict()) == list(seq.state_dict())
    torch.testing.assert_close(fused(_x()), seq(_x()))


def test_spectral_norm_state_dict_hooks_do_not_decline():
    seq = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(3, 8, 5, 1, 2)), nn.LeakyReLU(0.2))
    fused, report = ganengine.fuse(seq, return_report=True)
    assert dict(report) == {"conv2d+leaky_relu": 1} and not report.declined
    fused.load_state_dict(seq.state_dict())


def test_load_pre_hook_is_bound_to_the_copy():
    # torch keeps a weak reference to the module of register_load_state_dict_pre_hook: the copy's
    # hook must get the copy, and keep working once the caller's model is gone
    log = []
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.Tanh())   # the Tanh: copied, not replaced
    _HOOKS["load_state_dict pre-hook"](seq[1], log)
    state = seq.state_dict()
    fused = ganengine.fuse(seq)
    del seq
    fused.load_state_dict(state)
    assert log == [fused[1]]


# ----------------------------------------------------------------------------- fuse(fuse(m))
class _Taps(nn.Module):
    """Iterates its Sequential (CUT's per-layer features): its sequences are declined."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.InstanceNorm2d(8), nn.ReLU(True))

    def forward(self, x):
        feats = []
        for layer in self.model:
            x = layer(x)
            feats.append(x)
        return x, feats


def test_refuse_lists_only_patterns_still_matched():
    # docs/fuse.md, "Idempotent": nothing more is fused; declines whose modules the first pass
    # rewrote (the lone norm -> InstanceNormAct2d) are not listed again; a hooked norm's are
    once, r1 = ganengine.fuse(_Taps(), return_report=True)
    assert r1.declined
    _, r2 = ganengine.fuse(once, return_report=True)
    assert not dict(r2) and not r2.declined
    norm = nn.InstanceNorm2d(8)
    norm.register_forward_hook(lambda *a: None)
    once, r1 = ganengine.fuse(nn.Sequential(nn.Conv2d(3, 8, 5, 1, 2), norm, nn.ReLU()), return_report=True)
    _, r2 = ganengine.fuse(once, return_report=True)
    assert not dict(r2)
    assert {(d.rule, d.where) for d in r2.declined} == {("instance_norm+act", "1"), ("instance_norm", "1")}


def test_parametrizations_inside_a_compiled_submodule_are_left_alone():
    # the parametrization pass runs over the whole tree first: not into the shared compiled module
    inner = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 8, 3, 1, 1)), nn.ReLU())
    sn = inner[0].parametrizations.weight[0]
    ganengine.fuse(_Net(torch.compile(inner)))
    assert inner[0].parametrizations.weight[0] is sn


# ----------------------------------------------------------------------------- a tab-indented continuation line
_TAB_SOURCE = (
    "import torch.nn as nn\n"
    "class NetTab(nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.conv = nn.Conv2d(3, 8, 3, padding=1)\n"
    "        self.out = nn.Sequential(nn.BatchNorm2d(8,\n"
    "\t                                       eps=1e-5), nn.ReLU())\n"
    "    def forward(self, x):\n"
    "        return self.out(self.conv(x))\n")


def test_method_with_a_tab_indented_continuation_line_is_read(tmp_path, monkeypatch):
    """boschresearch/unetgan's BigGAN.py has a continuation line indented with a tab: textwrap.dedent
    found no common indent, the source did not parse, and fuse() declined its BatchNorm + ReLU
    saying it could not read the source."""
    (tmp_path / "tabsrc_s15.py").write_text(_TAB_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("tabsrc_s15")
    torch.manual_seed(0)
    net = mod.NetTab()
    fused, report = ganengine.fuse(net, return_report=True)
    assert report["batch_norm+act"] == 1 and not list(report.declined)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused(x), mod.NetTab.forward(net, x), rtol=1e-5, atol=1e-6)
