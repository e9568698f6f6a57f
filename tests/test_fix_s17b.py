"""Issue s17b: host cost of spectral norm at tiny sizes.

1. ``gnn.spectral_norm`` in eval mode runs PyTorch's own three ops (``vdot(u, mv(M, v))``,
   ``weight / sigma``; ``SpectralNorm._eval_weight``) instead of the native op and its autograd
   node: PyTorch's parametrization's bits on every backend, u/v untouched in eval (and still
   updated in training), gradients equal, the group leaves eval layers to that path.
2. fuse()'s BigGAN SNConv2d path (``_ganengine_sigma = "biggan"``): ``biggan_sigma`` with one
   singular vector runs the reference's ops with less Python (``_biggan_sigma_one``: same bits
   for sigma, u0 and sv0), and ``conv_apply`` picks the division's side counting the output
   side's extra bias op, cached per shape, and goes straight to PyTorch's conv for calls the
   route already sent there.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_sn

import ganengine
import ganengine.nn as gnn
from ganengine.fusion import mixins, spectral
from tests import reference_nets_attention as RA
from tests._backends import backend_params, on_backend
from tests._tolerance import assert_within_bound, normwise_scale

BACKENDS = backend_params()
sn_mod = importlib.import_module("ganengine.nn.spectral_norm")  # (the package's name is the function)


def _layers(dtype):
    torch.manual_seed(3)
    return [(nn.Linear(8, 16), (2, 8)), (nn.Linear(32, 64), (4, 32)), (nn.Conv2d(16, 16, 3, padding=1), (1, 16, 8, 8)),
            (nn.ConvTranspose2d(4, 6, 3), (2, 4, 5, 5)), (nn.Conv2d(3, 5, 3), (2, 3, 6, 6))], dtype


def _pair(layer, dtype):
    ref = torch_sn(copy.deepcopy(layer).to(dtype))
    ours = gnn.spectral_norm(copy.deepcopy(layer).to(dtype))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _state(m):
    return {k: t.detach().clone() for k, t in m.state_dict().items()}


# ----------------------------------------------------------------------------- 1. eval path
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_is_pytorchs_formula_bit_for_bit(monkeypatch, backend, dtype):
    """Eval: output, weight and gradients equal PyTorch's parametrization bit for bit (the same
    ops on the same state), u and v untouched, and the native op is not called."""
    layers, _ = _layers(dtype)
    for layer, shape in layers:
        ref, ours = _pair(layer, dtype)
        # (the cpu kernels take dim-0 weights: ConvTranspose trains on the torch backend there; its
        # eval runs no backend op at all)
        train_backend = "torch" if backend == "cpu" and isinstance(layer, nn.ConvTranspose2d) else backend
        with on_backend(train_backend):
            for _ in range(2):  # train first: u, v iterate (through run_layer), as PyTorch's
                ref(torch.randn(shape, dtype=dtype))
                ours(torch.randn(shape, dtype=dtype))
        if backend == "torch":  # (PyTorch's composition in training too)
            assert all(torch.equal(a, b) for a, b in zip(_state(ref).values(), _state(ours).values()))
        ours.load_state_dict(ref.state_dict())  # (native backends: not PyTorch's bits in training)
        ref.eval()
        ours.eval()
        before = _state(ours)
        calls = []
        real = sn_mod.run_layer
        monkeypatch.setattr(sn_mod, "run_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
        x = torch.randn(shape, dtype=dtype)
        with on_backend(backend):
            with torch.no_grad():
                assert torch.equal(ours(x), ref(x))
                assert torch.equal(ours.weight, ref.weight)
            y_ref, y = ref(x), ours(x)
            assert torch.equal(y, y_ref)
            g = torch.randn_like(y)
            y_ref.backward(g)
            y.backward(g)
        assert not calls, "eval went through run_layer"
        for a, b in zip(ref.parameters(), ours.parameters()):
            assert torch.equal(a.grad, b.grad)
        after = _state(ours)
        assert all(torch.equal(before[k], after[k]) for k in before), "eval moved the state"
        # training again: through run_layer, u and v move
        ours.train()
        with on_backend(train_backend):
            ours(x)
        assert calls
        u = "parametrizations.weight.0._u"
        assert not torch.equal(_state(ours)[u], before[u])
        monkeypatch.undo()


def test_eval_fp64_against_the_formula():
    """fp64: the eval weight is W / (u . M v) of the stored vectors (dim=1 for ConvTranspose),
    within a reduction's bound of an fp64 composition written out here."""
    torch.manual_seed(4)
    for layer, dim in ((nn.Conv2d(5, 7, 3).double(), 0), (nn.ConvTranspose2d(5, 7, 3).double(), 1)):
        m = gnn.spectral_norm(layer).eval()
        p = m.parametrizations.weight
        w, u, v = p.original.detach(), p[0]._u, p[0]._v
        wmat = w.movedim(dim, 0).reshape(w.shape[dim], -1)
        sigma = sum(float(u[i]) * sum(float(wmat[i, j]) * float(v[j]) for j in range(wmat.shape[1]))
                    for i in range(wmat.shape[0]))
        n = wmat.numel()
        scale = normwise_scale(w.abs() * (u.abs() @ wmat.abs() @ v.abs()) / sigma ** 2)
        assert_within_bound(m.weight.detach(), w / sigma, scale, n=n, acc_dtype=torch.float64, c=2, name="eval w")


def test_eval_graph_survives_a_later_training_step():
    """With a graph recorded the eval path clones u and v (as PyTorch does): a training-mode call
    before the backward updates the buffers in place without breaking the eval graph."""
    torch.manual_seed(5)
    layer = nn.Linear(6, 9)
    ref, ours = _pair(layer, torch.float32)
    x = torch.randn(3, 6)
    outs = []
    for m in (ref, ours):
        m.eval()
        y = m(x)
        m.train()
        m(x)  # in-place u, v update
        y.sum().backward()
        outs.append(m.parametrizations.weight.original.grad.clone())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_eval_without_grad_skips_the_clones():
    """No graph: u and v are used as they are (nothing is saved), the result is the same bits as
    with the clones."""
    torch.manual_seed(6)
    ref, ours = _pair(nn.Conv2d(4, 6, 3), torch.float32)
    ref.eval()
    ours.eval()
    clones = []
    real = torch.Tensor.clone

    def spy(t, *a, **k):
        clones.append(t.shape)
        return real(t, *a, **k)

    with torch.no_grad():
        torch.Tensor.clone = spy
        try:
            w = ours.weight
        finally:
            torch.Tensor.clone = real
        assert not clones
        assert torch.equal(w, ref.weight)


@pytest.mark.parametrize("backend", backend_params(["cpu", "triton"]))
def test_group_leaves_eval_layers_to_their_own_path(backend):
    """A group does not refresh layers in eval: each runs PyTorch's formula (PyTorch's bits, the
    same as the per-layer path); training still goes through the grouped refresh."""
    torch.manual_seed(7)

    def disc(wrap):
        torch.manual_seed(8)
        d = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 4, 3, 1, 1), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 1))
        for i in (0, 2, 4):
            wrap(d[i])
        return d

    ref = disc(torch_sn)
    grouped = disc(gnn.spectral_norm)
    grouped.load_state_dict(ref.state_dict())
    single = copy.deepcopy(grouped)
    group = gnn.spectral_norm_group(grouped)
    x = torch.randn(2, 3, 16, 16)
    with on_backend(backend):
        grouped(x)
        single(x)
        assert group.last_refresh == {backend: 3}
        ref.load_state_dict(grouped.state_dict())
        single.load_state_dict(grouped.state_dict())
        for m in (ref, grouped, single):
            m.eval()
        before = _state(grouped)
        a, b, c = ref(x), grouped(x), single(x)
        assert group.last_refresh == {}
        assert torch.equal(a, b) and torch.equal(b, c)
        assert all(torch.equal(before[k], t) for k, t in _state(grouped).items())
    group.detach()


# ----------------------------------------------------------------------------- 2. BigGAN SN conv
def _reference_sigma(m):
    """sigma as the reference's own ``W_`` computes it, buffers written as ``W_`` writes them
    (tests/reference_nets_attention.power_iteration)."""
    W = m.weight.view(m.weight.size(0), -1)
    us = [getattr(m, f"u{i}") for i in range(m.num_svs)]
    for _ in range(m.num_itrs):
        svs, _, _ = RA.power_iteration(W, us, update=m.training, eps=m.eps)
    if m.training:  # (as W_ does)
        with torch.no_grad():
            for i, sv in enumerate(svs):
                getattr(m, f"sv{i}")[:] = sv
    return svs[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_itrs", [1, 2])
def test_biggan_sigma_is_the_references_bit_for_bit(dtype, num_itrs):
    """One singular vector (the fast path): sigma, its gradient, u0 and sv0 equal the
    reference's W_ bit for bit, train (buffers move) and eval (buffers stay)."""
    torch.manual_seed(9)
    for cin, cout, k in ((8, 8, 3), (16, 16, 1), (5, 12, 4)):
        ref = RA.SNConv2d(cin, cout, k, num_itrs=num_itrs).to(dtype)
        ours = copy.deepcopy(ref)
        for train in (True, True, False):
            ref.train(train)
            ours.train(train)
            before = {k_: t.clone() for k_, t in ours.named_buffers()}
            for grad in (False, True):
                with torch.set_grad_enabled(grad):
                    s_ref, s = _reference_sigma(ref), spectral.biggan_sigma(ours)
                assert s.dtype == dtype and s.shape == () and torch.equal(s, s_ref)
                if grad:
                    (g_ref,) = torch.autograd.grad(s_ref, ref.weight)
                    (g,) = torch.autograd.grad(s, ours.weight)
                    assert torch.equal(g, g_ref)
                for (name, a), b in zip(ref.named_buffers(), ours.buffers()):
                    assert torch.equal(a, b), name
            moved = any(not torch.equal(before[k_], t) for k_, t in ours.named_buffers())
            assert moved == train


def test_biggan_sigma_several_vectors_keeps_the_general_path():
    torch.manual_seed(10)
    ref = RA.SNConv2d(6, 8, 3, num_svs=2, num_itrs=2).double()
    ours = copy.deepcopy(ref)
    for train in (True, False):
        ref.train(train)
        ours.train(train)
        assert torch.equal(spectral.biggan_sigma(ours), _reference_sigma(ref))
        for a, b in zip(ref.buffers(), ours.buffers()):
            assert torch.equal(a, b)


def _conv_bound_check(y, y_ref64, x, w, sigma, bias, stride, padding, name):
    """fp64 conv reference from the same inputs; normwise bound: a reduction of C_in k k + 2
    terms (the conv, the division by sigma on either side, the bias), c = 2 (one more rounding
    of the quotient than of a plain dot product)."""
    scale = F.conv2d(x.abs().double(), w.abs().double() / abs(float(sigma)),
                     None if bias is None else bias.abs().double(), stride, padding)
    n = w[0].numel() + 2
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    assert_within_bound(y, y_ref64, scale, n=n, acc_dtype=acc, c=2, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,cin,cout,hw,bias", [(3, 8, 8, 8, True), (1, 16, 16, 8, True), (3, 16, 16, 16, True),
                                                (1, 16, 2, 8, False), (3, 4, 32, 3, False)])
def test_fused_snconv2d_against_the_reference(dtype, k, cin, cout, hw, bias):
    """The fused SNConv2d (conv_module rule, sigma path) vs BigGAN's own class: outputs within the
    conv's bound of an fp64 conv from the same sigma, input and weight gradients likewise, u0 / sv0
    equal bit for bit (train: moved; eval: untouched)."""
    torch.manual_seed(11)
    ref = nn.Sequential(RA.SNConv2d(cin, cout, k, padding=k // 2, bias=bias)).to(dtype)
    fused, report = ganengine.fuse(copy.deepcopy(ref), return_report=True)
    assert report.get("conv_module") == 1 and fused[0]._ganengine_sigma == "biggan"
    r, f = ref[0], fused[0]
    for step, train in enumerate((True, True, False, False)):
        ref.train(train)
        fused.train(train)
        before = {n: t.clone() for n, t in f.named_buffers()}
        x = torch.randn(2, cin, hw, hw, dtype=dtype)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y = ref(xr), fused(xf)
        for (name, a), b in zip(r.named_buffers(), f.buffers()):
            assert torch.equal(a, b), name
        moved = any(not torch.equal(before[n], t) for n, t in f.named_buffers())
        assert moved == train
        sigma = r.sv0 if train else _reference_sigma(r).detach()
        w64 = r.weight.detach().double()
        b64 = None if r.bias is None else r.bias.detach().double()
        y64 = F.conv2d(x.double(), w64 / sigma.double(), b64, r.stride, r.padding)
        _conv_bound_check(y.detach(), y64, x, r.weight.detach(), sigma, r.bias, r.stride, r.padding, f"y step {step}")
        _conv_bound_check(y_ref.detach(), y64, x, r.weight.detach(), sigma, r.bias, r.stride, r.padding, "y ref")
        g = torch.randn_like(y_ref)
        y_ref.backward(g)
        y.backward(g)
        # input gradient: a transposed conv with W / sigma (C_out k k terms)
        gx64 = torch.nn.grad.conv2d_input(x.shape, w64 / sigma.double(), g.double(), r.stride, r.padding)
        gscale = torch.nn.grad.conv2d_input(x.shape, w64.abs() / abs(float(sigma)), g.abs().double(), r.stride,
                                            r.padding)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for gx in (xf.grad, xr.grad):
            assert_within_bound(gx, gx64, gscale, n=cout * k * k + 2, acc_dtype=acc, c=2, name="grad x")
        # weight gradient, normwise: dW = G / sigma - <G, W> / sigma^2 u v^T with G = conv2d_weight(x, g)
        # (N H W terms) on either side; the division on the output adds the reduction of g * y over
        # the output, on the weight that of G * W over the weight (|u v^T| <= 1)
        g_abs = torch.nn.grad.conv2d_weight(x.abs().double(), w64.shape, g.abs().double(), r.stride, r.padding)
        s_abs = abs(float(sigma))
        gw_scale = normwise_scale(g_abs) / s_abs + float((g_abs * w64.abs()).sum()) / s_abs ** 2
        n_w = 2 * hw * hw + w64.numel() + y.numel()
        assert_within_bound(f.weight.grad, r.weight.grad.double(), gw_scale, n=n_w, acc_dtype=acc, c=4,
                            name="grad W")
        r.weight.grad = f.weight.grad = None
        if bias:
            assert_within_bound(f.bias.grad, r.bias.grad.double(), g.abs().double().sum((0, 2, 3)),
                                n=2 * hw * hw, acc_dtype=acc, c=2, name="grad b")
            r.bias.grad = f.bias.grad = None


def test_sigma_side_counts_the_bias_op():
    """Tiny convs with a bias divide the weight (one op fewer than output + bias add); without a
    bias, or where the output is far smaller than the weight, the smaller side as before."""
    def side(cin, cout, k, hw, n, bias, pad=0):
        m = nn.Conv2d(cin, cout, k, padding=pad, bias=bias)
        return mixins._sigma_side(m, torch.empty(n, cin, hw, hw), m.weight)

    assert side(8, 8, 3, 8, 1, True, 1) == "weight"        # w 576 vs out 512 (+ bias pass)
    assert side(8, 8, 3, 8, 1, False, 1) == "output"       # no bias: two ops either way
    assert side(256, 256, 3, 4, 2, True, 1) == "output"    # 590k weight, 8k output
    assert side(16, 16, 1, 8, 1, True) == "weight"
    m = nn.Conv2d(8, 8, 3, padding=1)
    mixins._sigma_side(m, torch.empty(1, 8, 8, 8), m.weight)
    assert m.__dict__["_ganengine_sigma_sides"] == {(torch.Size((1, 8, 8, 8)), m.weight.shape): "weight"}


def test_sigma_path_goes_straight_to_pytorchs_conv_for_plain_calls(monkeypatch):
    """A call _conv already sent to PyTorch's conv (recorded in _ganengine_plain_calls) skips
    _conv on the sigma path too; same bits as through _conv."""
    torch.manual_seed(12)
    ref = nn.Sequential(RA.SNConv2d(16, 16, 1))
    fused = ganengine.fuse(copy.deepcopy(ref)).eval()
    m = fused[0]
    x = torch.randn(1, 16, 8, 8)
    first = fused(x)
    key = (x.shape, x.dtype, x.device, m.weight.shape)
    if key not in m.__dict__.get("_ganengine_plain_calls", ()):
        m.__dict__.setdefault("_ganengine_plain_calls", set()).add(key)  # (the route chose a fused op here)
        first = m._conv_forward(x, m.weight / spectral.biggan_sigma(m), m.bias)

    def boom(*a, **k):
        raise AssertionError("_conv called for a plain call")

    monkeypatch.setattr(mixins, "_conv", boom)
    assert torch.equal(fused(x), first)
    with torch.no_grad():
        assert torch.equal(fused(x), first)


def test_fused_attention_with_sn_convs_matches():
    """BigGAN's Attention (four 1x1 SNConv2d, no bias) fused: outputs and buffers follow the
    reference (train and eval)."""
    torch.manual_seed(13)
    ref = RA.Attention(16)
    with torch.no_grad():
        ref.gamma.fill_(0.5)
    fused = ganengine.fuse(copy.deepcopy(ref))
    for train in (True, False):
        ref.train(train)
        fused.train(train)
        x = torch.randn(2, 16, 8, 8)
        torch.testing.assert_close(fused(x), ref(x), rtol=2e-5, atol=2e-5)
        for (name, a), b in zip(ref.named_buffers(), fused.buffers()):
            assert torch.equal(a, b), name
