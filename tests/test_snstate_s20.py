"""Spectral-norm state after a forward that raises, and the SN models under torch.func.

1. A fused BigGAN network computes every SN layer's power iteration up front
   (layers_biggan.grouped_spectral_norms). The reference (ajbrock BigGAN-PyTorch) iterates a
   layer when the forward reaches it, so a forward that raises leaves the later layers' ``u0`` /
   ``sv0`` as they were. Checked against the unfused twin (the reference composition): the
   layers never reached keep their bits, the reached ones equal the twin's to rounding, and the
   next good forward agrees. Before, every fused layer's buffers moved (43 entries, next output
   0.78 off).
2. Under torch.func.functionalize the SAGAN and BigGAN models ran autograd.Functions (no rule
   for them) and ganengine's fused ops: they now run the reference composition there, giving
   eager's outputs, gradients and state.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, functionalize, grad

import ganengine
from ganengine.models import build_network
from ganengine.models import layers_biggan as L

F64 = torch.float64
EPS64 = 2.0 ** -53


def _pair(arch, **kw):
    """(fused, unfused) networks with the same weights and buffers, fp64, train mode."""
    torch.manual_seed(0)
    fused = build_network(arch, fused=True, init_type=None, **kw).double().train()
    plain = copy.deepcopy(fused)
    L.set_fused(plain, False)
    plain.fused = False
    return fused, plain


def _sn_bound(net):
    """Rounding bound for u0 / sv0 / outputs between the fused (native or batched) iteration and
    the reference's: fp64 GEMVs of <= K terms, a few in a row, relative to the values' size."""
    k = max(m.weight.numel() // m.weight.shape[0] for m in net.modules() if isinstance(m, L.SN))
    return 64 * k * EPS64


def _check_state(fused, plain, before, reached):
    """Buffers of fused == plain's (to rounding); the SN layers not in ``reached`` (module name
    prefixes; None: all) bit-identical to ``before`` (never iterated), the others moved."""
    bound = _sn_bound(plain)
    sf, sp = fused.state_dict(), plain.state_dict()
    for k, b in sp.items():
        torch.testing.assert_close(sf[k], b, rtol=0, atol=bound * max(b.abs().max().item(), 1), msg=k)
    for name, m in fused.named_modules():
        if isinstance(m, L.SN):
            untouched = torch.equal(m.u0, before[f"{name}.u0"]) and torch.equal(m.sv0, before[f"{name}.sv0"])
            hit = reached is None or any(name == r or name.startswith(r + ".") for r in reached)
            assert untouched == (not hit), name


def _raising_hook(*_):
    raise RuntimeError("hook failure")


def _fail(net, call, hook_on=None):
    handle = None if hook_on is None else net.get_submodule(hook_on).register_forward_hook(_raising_hook)
    try:
        with pytest.raises((RuntimeError, IndexError)):
            call(net)
    finally:
        if handle is not None:
            handle.remove()


G_KW = dict(G_ch=4, dim_z=8, resolution=32, G_attn="0", n_classes=5, G_shared=True, shared_dim=8, hier=True)
D_KW = dict(D_ch=4, resolution=32, D_attn="0", n_classes=5)


def _g_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 8, dtype=F64, generator=g), torch.tensor([0, 3])


@pytest.mark.parametrize("backend", ["auto", "torch"])  # the C++ op's one group; same-shaped groups
@pytest.mark.parametrize("case", ["bad_y_width", "hook_on_middle_block", "no_failure"])
def test_biggan_g_failed_forward_leaves_later_layers_untouched(case, backend):
    with ganengine.use_backend(backend):
        _biggan_g_case(case)


def _biggan_g_case(case):
    fused, plain = _pair("biggan_G", **G_KW)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    z, y = _g_inputs()
    if case == "bad_y_width":  # linear(z chunk) ran, then the first block's ccbn gain fails
        for net in (fused, plain):
            _fail(net, lambda n: n(z, torch.randn(2, 7, dtype=F64)))
        reached = ["linear", "blocks.0.0.bn1.gain"]
    elif case == "hook_on_middle_block":  # blocks 0 and 1 ran; 2 and the output layer did not
        for net in (fused, plain):
            _fail(net, lambda n: n(z, n.shared(y)), hook_on="blocks.1.0")
        reached = ["linear", "blocks.0", "blocks.1"]
    else:
        for net in (fused, plain):
            net(z, net.shared(y))
        reached = None  # (every layer)
    _check_state(fused, plain, before, reached)
    out_f, out_p = fused(z, fused.shared(y)), plain(z, plain.shared(y))
    torch.testing.assert_close(out_f, out_p, rtol=0, atol=_sn_bound(plain) * 1e3)
    assert not any("_sn_pending" in m.__dict__ for m in fused.modules())


@pytest.mark.parametrize("case", ["bad_label", "hook_on_middle_block"])
def test_biggan_d_failed_forward_leaves_later_layers_untouched(case):
    fused, plain = _pair("biggan_D", **D_KW)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    x = torch.randn(2, 3, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(2))
    if case == "bad_label":  # every block and linear ran; embed's W_ ran, then the lookup fails
        for net in (fused, plain):
            _fail(net, lambda n: n(x, torch.tensor([0, 9])))
        reached = ["blocks", "linear", "embed"]
    else:
        for net in (fused, plain):
            _fail(net, lambda n: n(x, torch.tensor([0, 1])), hook_on="blocks.1.0")
        reached = ["blocks.0", "blocks.1"]
    _check_state(fused, plain, before, reached)


def test_biggan_deep_g_hook_failure_and_eval_writes_nothing():
    kw = dict(G_ch=8, dim_z=16, resolution=32, G_attn="0", n_classes=5, G_shared=True, shared_dim=8)
    fused, plain = _pair("biggan_deep_G", **kw)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    z, y = torch.randn(2, 16, dtype=F64, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 2])
    for net in (fused, plain):
        _fail(net, lambda n: n(z, n.shared(y)), hook_on="blocks.1.0")
    _check_state(fused, plain, before, ["linear", "blocks.0", "blocks.1"])
    # eval mode writes no SN buffer, raised or not (as the reference)
    fused.eval()
    after = {k: v.clone() for k, v in fused.state_dict().items()}
    _fail(fused, lambda n: n(z, n.shared(y)), hook_on="blocks.1.0")
    with torch.no_grad():
        fused(z, fused.shared(y))
    for k, v in fused.state_dict().items():
        assert torch.equal(v, after[k]), k


# ----------------------------------------------------------------------------- torch.func.functionalize
def _train_step(net, inputs, transform):
    """Output(s), gradients of the float inputs and parameters, then the buffers."""
    inputs = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = (functionalize(net) if transform else net)(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    leaves = [t for t in inputs if t.requires_grad] + [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    return [out.detach(), *grads, *(b.detach().clone() for b in net.state_dict().values())]


SAGAN_KW = dict(conv_dim=8)
CASES = [
    ("sagan_G", SAGAN_KW, lambda: [torch.randn(2, 100, dtype=F64, generator=torch.Generator().manual_seed(4))]),
    ("sagan_D", SAGAN_KW, lambda: [torch.randn(2, 3, 64, 64, dtype=F64, generator=torch.Generator().manual_seed(5))]),
    ("biggan_G", G_KW, lambda: [_g_inputs()[0], torch.tensor([0, 3])]),
    ("biggan_D", D_KW, lambda: [torch.randn(2, 3, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(6)),
                                torch.tensor([1, 4])]),
]


@pytest.mark.parametrize("arch,kw,make", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("fused", [True, False])
def test_functionalize_train_step_gives_eager_outputs_and_grads(arch, kw, make, fused):
    torch.manual_seed(0)
    net = build_network(arch, fused=fused, init_type=None, **kw).double().train()
    if arch.startswith("sagan"):
        net.return_attention = False
    ref = copy.deepcopy(net)
    L.set_fused(ref, False)  # the reference composition, eager
    if arch.startswith("sagan"):
        from ganengine.models.networks_sagan import _set_fused
        _set_fused(ref, False)
    ref.fused = False
    for step in range(2):  # the second from the state the first wrote
        want, got = _train_step(ref, make(), False), _train_step(net, make(), True)
        assert len(want) == len(got)
        for i, (a, b) in enumerate(zip(want, got)):
            # the same forward ops (bound 0 there); SAGAN's weight gradient through sigma by
            # autograd instead of _DivBySigma's one-pass formula: fp64, <= K-term sums per
            # element, K the largest weight row, times the depth of the net's chain (< 64)
            k = 8 * 16 * 16
            torch.testing.assert_close(b, a, rtol=0, atol=64 * k * EPS64 * max(a.abs().max().item(), 1),
                                       msg=f"{arch} step {step} item {i}")
    assert net.fused == fused and all(m.fused == fused for m in net.modules() if hasattr(m, "fused")
                                      and isinstance(m.fused, bool))


# (SAGAN's G: nn.BatchNorm2d's own ``num_batches_tracked.add_`` is refused under torch.func.grad in
# training mode, a PyTorch limitation: torch.func.replace_all_batch_norm_modules_ is its answer)
GRAD_CASES = [c for c in CASES if c[0] != "sagan_G"]


@pytest.mark.parametrize("arch,kw,make", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_torch_func_grad_of_functional_call_gives_eager_grads_and_state(arch, kw, make):
    """torch.func.grad over functional_call (the parameters an argument, the state captured): the
    power iteration writes the captured state with ``out=`` ops (grad refuses ``copy_``)."""
    torch.manual_seed(0)
    net = build_network(arch, fused=True, init_type=None, **kw).double().train()
    if arch.startswith("sagan"):
        net.return_attention = False
    ref = copy.deepcopy(net)
    L.set_fused(ref, False)
    if arch.startswith("sagan"):
        from ganengine.models.networks_sagan import _set_fused
        _set_fused(ref, False)
    ref.fused = False
    inputs = make()
    params = {k: p.detach() for k, p in net.named_parameters() if p.requires_grad}

    def loss(p, module):
        out = functional_call(module, p, tuple(inputs), strict=False)
        out = out[0] if isinstance(out, tuple) else out
        return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()

    got = grad(loss)(params, net)
    leaves = [p for p in ref.parameters() if p.requires_grad]
    want = torch.autograd.grad(loss(dict(ref.named_parameters()), ref), leaves)
    k = 8 * 16 * 16  # as above
    for (name, g), w in zip(got.items(), want):
        torch.testing.assert_close(g, w, rtol=0, atol=64 * k * EPS64 * max(w.abs().max().item(), 1), msg=name)
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # the same iteration ops: bound 0
