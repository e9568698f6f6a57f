"""fuse(): a sequence rule never splits a module held in several places; a module rule registered
with register_module_rule (spectral_norm's among them) declines a module with hooks."""
from __future__ import annotations

import copy

import torch
from torch import nn

import ganengine


def _two_paths(act_b: nn.Module) -> nn.Module:
    conv, bn = nn.Conv2d(4, 4, 5, 1, 2), nn.BatchNorm2d(4)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(conv, bn, nn.ReLU())
            self.b = nn.Sequential(conv, bn, act_b)

        def forward(self, x):
            return self.a(x) + self.b(x)

    return Two()


def test_a_batch_norm_shared_by_two_sequentials_stays_one_object():
    """Fusing the bn with the activation of each Sequential built two modules (sharing tensors): a
    mode set through one path (`model.a[1].eval()`, freezing a shared norm) missed the other, so the
    running statistics moved where the unfused model's did not."""
    torch.manual_seed(0)
    model = _two_paths(nn.LeakyReLU(0.2))
    ref = copy.deepcopy(model)
    fused, report = ganengine.fuse(model, return_report=True)
    assert fused.a[1] is fused.b[1]
    assert any("shared" in d.reason for d in report.declined), report
    ref.a[1].eval()
    fused.a[1].eval()
    x = torch.randn(2, 4, 6, 6)
    rm = ref.a[1].running_mean.clone()
    torch.testing.assert_close(fused(x), ref(x))
    assert torch.equal(fused.a[1].running_mean, rm) and int(fused.a[1].num_batches_tracked) == 0


def test_a_module_repeated_in_one_sequential_is_not_split():
    """The same conv and norm twice in one Sequential (a weight-tied repeated block): one object in
    both places after fuse(); the activation module, shared too, may fold into either norm."""
    torch.manual_seed(0)
    conv, bn, act = nn.Conv2d(4, 4, 5, 1, 2), nn.BatchNorm2d(4), nn.LeakyReLU(0.2)
    model = nn.Sequential(conv, bn, act, conv, bn, act)
    ref = copy.deepcopy(model)
    fused = ganengine.fuse(model)
    assert fused[0] is fused[3] and fused[1] is fused[4]
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(fused(x), ref(x))


def test_an_unshared_group_still_fuses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 5, 1, 2), nn.BatchNorm2d(4), nn.ReLU())
    fused, report = ganengine.fuse(model, return_report=True)
    assert report.get("batch_norm+act") == 1, report


def test_hooks_on_a_torch_spectral_norm_parametrization_keep_firing():
    """The spectral_norm rule (registered with register_module_rule) swapped a hooked _SpectralNorm
    for ganengine's without a word: the hooks stopped firing. It is declined with the reason now."""
    torch.manual_seed(0)
    conv = torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 5, 1, 2))
    calls = []
    conv.parametrizations.weight[0].register_forward_hook(lambda m, i, o: calls.append("fwd"))
    conv.parametrizations.weight[0].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    model = nn.Sequential(conv, nn.LeakyReLU(0.2))
    x = torch.randn(1, 3, 8, 8)
    fused, report = ganengine.fuse(model, return_report=True)
    calls.clear()
    fused(x)
    assert calls == ["pre", "fwd"]
    assert any(d.rule == "spectral_norm" and "hook" in d.reason for d in report.declined), report


def test_a_user_module_rule_declines_hooked_modules():
    from ganengine.fuse import register_module_rule
    from ganengine.fusion import rules

    class Mine(nn.Module):
        def forward(self, x):
            return x * 2

    built = []
    before = list(rules.EXTRA_MODULE_RULES)
    try:
        register_module_rule("mine", lambda m: type(m) is Mine, lambda m: built.append(m) or nn.Identity())
        hooked = Mine()
        hooked.register_forward_hook(lambda m, i, o: None)
        model = nn.Sequential(Mine(), hooked)
        fused, report = ganengine.fuse(model, return_report=True)
        assert isinstance(fused[0], nn.Identity) and fused[1] is not None and type(fused[1]) is Mine
        assert len(built) == 1
        assert any(d.rule == "mine" and "forward hook" in d.reason for d in report.declined), report
    finally:
        rules.EXTRA_MODULE_RULES[:] = before


def test_a_user_pair_rule_declines_hooked_modules():
    from ganengine.fuse import register_pair_rule
    from ganengine.fusion import rules

    class A(nn.Module):
        def forward(self, x):
            return x + 1

    class Fused(nn.Module):
        def forward(self, x):
            return torch.tanh(x + 1)

    before = list(rules.EXTRA_SEQUENCE_RULES)
    try:
        register_pair_rule("a_tanh", lambda m: type(m) is A, lambda m: type(m) is nn.Tanh, lambda a, b: Fused())
        plain = ganengine.fuse(nn.Sequential(A(), nn.Tanh()))
        assert type(plain[0]) is Fused
        act = nn.Tanh()
        act.register_forward_hook(lambda m, i, o: None)
        fused, report = ganengine.fuse(nn.Sequential(A(), act), return_report=True)
        assert type(fused[0]) is A and type(fused[1]) is nn.Tanh and fused[1]._forward_hooks
        assert any(d.rule == "a_tanh" and "forward hook" in d.reason for d in report.declined), report
    finally:
        rules.EXTRA_SEQUENCE_RULES[:] = before


def test_a_shared_producer_keeps_the_next_blocks_activation():
    """The pre_activation rule folded the block's leading ReLU into the producer's op (its slot
    became Identity) before the engine declined the producer as shared: the fused model had lost
    the ReLU (0.96 off). A shared producer is declined before the block is edited."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8)
    seq = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), bn, nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 5, padding=2)))
    model = nn.Sequential(seq, nn.Sequential(bn, nn.Tanh())).eval()
    for p in bn.parameters():
        nn.init.normal_(p)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        fused, report = ganengine.fuse(copy.deepcopy(model), return_report=True)
        assert type(fused[0][2][0]) is nn.ReLU
        torch.testing.assert_close(fused(x), ref)
    assert any(d.rule == "pre_activation" and "shared" in d.reason for d in report.declined), report
