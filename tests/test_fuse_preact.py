"""ganengine.fuse's ``pre_activation`` rule: the activation a block applies first to its input
moved into the fused op before the block (pix2pix's U-Net: ``BN -> [LeakyReLU(inplace) -> Conv
...]``), and its declines: a skip connection reading the raw input, shared or hooked blocks,
a producer whose fused op has no faster route. Fused vs original: outputs, input and parameter
gradients, running statistics, in training and eval mode (tests/test_fuse_rules.py's _compare)."""
import torch
from torch import nn

import ganengine
import ganengine.nn as gnn
from tests.reference_nets import UnetGenerator
from tests.test_fuse_rules import _compare, _fused_pair, _x
import pytest


@pytest.fixture(autouse=True)
def conv_routes_always():
    """Tiny convs have no faster conv route under the measured thresholds: force the GEMM form
    so conv producers are exercised (the no-route decline is tested under "auto" below)."""
    import ganengine.ops.conv as cv

    with cv.gemm_policy("always"):
        yield


def _unet():
    return UnetGenerator(3, 3, 5, ngf=4, norm_layer=nn.BatchNorm2d)


class SkipBlock(nn.Module):
    """The U-Net's shape: ``cat([x, model(x)])`` with ``model`` starting with the activation."""

    def __init__(self, c=4, inplace=True):
        super().__init__()
        self.model = nn.Sequential(nn.LeakyReLU(0.2, inplace), nn.Conv2d(c, c, 3, 1, 1))

    def forward(self, x):
        return torch.cat([x, self.model(x)], 1)


class ActChild(nn.Module):
    """The activation as a direct child: ``conv(act(x)) + x`` (the residual reads act(x) too,
    as the activation is in place); ``twice`` calls it a second time."""

    def __init__(self, twice=False):
        super().__init__()
        self.act, self.conv, self.twice = nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, 1, 1), twice

    def forward(self, x):
        h = self.conv(self.act(x))
        return self.act(h) + x if self.twice else h + x


class ReadsFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, 1, 1))

    def forward(self, x):
        return self.model(x * 2)


def _net(block, c_out=8):
    return nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), block, nn.Conv2d(c_out, 2, 1))


def test_unet_down_path_activations_run_in_the_norms_and_convs_before():
    torch.manual_seed(0)
    net = _unet()
    fused, report = ganengine.fuse(net, return_report=True)
    # the 3 inner blocks' BN -> next block, and the outermost conv -> first block
    assert report["pre_activation"] == 4 and not report.declined, report
    inner = fused.model.model[1]                 # the first block under the outermost
    assert isinstance(inner.model[0], nn.Identity) and isinstance(fused.model.model[0], gnn.Conv2dAct)
    norms = [m for m in fused.modules() if isinstance(m, gnn.BatchNormAct2d) and m.activation == "leaky_relu"]
    assert len(norms) == 3 and all(m.negative_slope == 0.2 for m in norms)
    # contract: same Parameter / buffer objects, same keys; the caller's model is untouched
    mine, theirs = fused.state_dict(keep_vars=True), net.state_dict(keep_vars=True)
    assert list(mine) == list(theirs) and all(mine[k] is theirs[k] for k in theirs)
    assert type(net.model.model[1].model[0]) is nn.LeakyReLU
    assert type(net.model.model[1].model[2]) is nn.BatchNorm2d
    ref = _unet()
    ref.load_state_dict(net.state_dict())
    _compare(fused, ref, _x(2, 3, 32, 32), steps=1)


def test_fusing_a_fused_unet_changes_nothing():
    fused = ganengine.fuse(_unet())
    _, report = ganengine.fuse(fused, return_report=True)
    assert dict(report) == {} and not report.declined


def test_without_a_faster_conv_route_the_conv_producer_is_declined():
    import ganengine.ops.conv as cv

    with cv.gemm_policy("never"), cv.winograd_policy("never"):
        fused, ref, report = _fused_pair(_unet)
    (d,) = [d for d in report.declined if d.rule == "pre_activation"]
    assert d.where == "model.model.0" and "no faster route" in d.reason
    assert report["pre_activation"] == 3 and type(fused.model.model[1].model[0]) is nn.LeakyReLU
    _compare(fused, ref, _x(2, 3, 32, 32), steps=1)


def test_skip_connection_reading_the_raw_input_is_declined():
    fused, ref, report = _fused_pair(lambda: _net(SkipBlock(inplace=False)))
    (d,) = report.declined
    assert d.rule == "pre_activation" and d.where == "1" and "not in place" in d.reason
    assert "pre_activation" not in report and type(fused[2].model[0]) is nn.LeakyReLU
    _compare(fused, ref, _x(2, 3, 8, 8))


@pytest.mark.parametrize("block", [lambda: SkipBlock(inplace=True), ActChild,
                                   lambda: nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, 1, 1))])
def test_block_forms_that_fold(block):
    """In-place activation read again by the skip / residual; a plain Sequential starting with a
    (not in-place) activation, its input's only reader."""
    c_out = 4 if not isinstance(block(), SkipBlock) else 8
    fused, ref, report = _fused_pair(lambda: _net(block(), c_out))
    assert report["pre_activation"] == 1 and not report.declined
    assert isinstance(fused[1], gnn.BatchNormAct2d) and fused[1].activation in ("relu", "leaky_relu")
    _compare(fused, ref, _x(2, 3, 8, 8))


def test_activation_called_twice_is_declined():
    fused, ref, report = _fused_pair(lambda: _net(ActChild(twice=True), 4))
    assert [d.reason for d in report.declined if d.rule == "pre_activation"] == \
        ["ActChild.forward uses self.act more than once"]
    _compare(fused, ref, _x(2, 3, 8, 8))


def test_input_read_before_the_activation_is_not_a_candidate():
    fused, ref, report = _fused_pair(lambda: _net(ReadsFirst(), 4))
    assert "pre_activation" not in report and not report.declined
    _compare(fused, ref, _x(2, 3, 8, 8))


def test_shared_block_is_declined():
    def make():
        blk = SkipBlock()
        return nn.Sequential(nn.BatchNorm2d(4), blk, nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), blk)
    fused, ref, report = _fused_pair(make)
    reasons = [d.reason for d in report.declined if d.rule == "pre_activation"]
    assert reasons and all("used in 2 places" in r for r in reasons) and "pre_activation" not in report
    _compare(fused, ref, _x(2, 4, 8, 8))


def test_hooked_block_is_declined_and_its_hook_sees_the_raw_input():
    torch.manual_seed(0)
    net = _net(SkipBlock())
    seen = []
    net[2].register_forward_pre_hook(lambda m, args: seen.append(float(args[0].detach().min())))
    fused, report = ganengine.fuse(net, return_report=True)
    (d,) = report.declined
    assert d.rule == "pre_activation" and "forward pre-hook" in d.reason
    fused(torch.randn(2, 3, 8, 8))
    assert seen and seen[-1] < 0          # the norm's output, not yet activated


def test_the_block_keeps_its_childrens_training_modes():
    torch.manual_seed(0)
    net = _net(SkipBlock()).train()
    net[2].model[1].eval()                # a frozen child inside the edited block
    fused = ganengine.fuse(net)
    assert fused[2].training and not fused[2].model[1].training
