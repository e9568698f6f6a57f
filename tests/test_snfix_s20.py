"""Spectral norm under torch.func transforms (functionalize, grad, vmap) and the fused SAGAN
wrapper's sigma.

Under a transform ganengine's spectral-norm layers run PyTorch's own composition written
functionally (ganengine/ops/spectral_norm.py ``functorch_layer``): the same ops on the same
values as ``torch.nn.utils.parametrizations.spectral_norm``, so the expected numbers are that
module's eager ones bit for bit (error bound zero: nothing is reordered). Before, an eager-only
autograd.Function ran there and every transform refused it ("must override the setup_context
staticmethod"; functionalize has no rule for any autograd.Function)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, functionalize, grad, vmap
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import ganengine
from ganengine.nn.spectral_norm import spectral_norm as gnn_spectral_norm
from ganengine.ops import spectral_norm as ops
from tests import reference_nets_attention as R
from tests._backends import CPU_BACKENDS, backend_params, on_backend

F64 = torch.float64


def _pair(cin=5, cout=6, k=3):
    """(torch's parametrization, ganengine's) on the same conv, u and v (the same draws)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, 1, 1).double()
    ref = torch_spectral_norm(copy.deepcopy(conv))
    torch.manual_seed(0)
    conv2 = nn.Conv2d(cin, cout, k, 1, 1).double()
    ours = gnn_spectral_norm(conv2)
    assert torch.equal(ref.parametrizations.weight.original, ours.parametrizations.weight.original)
    assert torch.equal(ref.parametrizations.weight[0]._u, ours.parametrizations.weight[0]._u)
    return ref, ours


def _weights(n):
    return torch.linspace(-1, 1, n, dtype=F64)


def _step(m, x, transform):
    """Output, gradients of x and of the parameters, then the u / v state after the call."""
    x = x.clone().requires_grad_()
    fn = functionalize(m) if transform else m
    out = fn(x)
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * _weights(out.numel()).view_as(out)).sum(), [x] + params)
    state = [b.detach().clone() for k, b in m.state_dict().items() if k.endswith(("_u", "_v"))]
    return [out.detach(), *grads, *state]


@pytest.mark.parametrize("backend", backend_params(CPU_BACKENDS))
def test_functionalize_train_matches_torch_parametrization(backend):
    ref, ours = _pair()
    xs = [torch.randn(2, 5, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with on_backend(backend):
        for i, x in enumerate(xs):  # train, train (state carried), eval
            ref.train(i < 2)
            ours.train(i < 2)
            want, got = _step(ref, x, False), _step(ours, x, True)
            assert len(want) == len(got) == 6
            for a, b in zip(want, got):
                torch.testing.assert_close(b, a, rtol=0, atol=0)  # the same ops: bound 0


@pytest.mark.parametrize("backend", backend_params(CPU_BACKENDS))
def test_fused_models_under_functionalize(backend):
    """fuse() of torch's parametrization, of ganengine's, and of the hook-based spectral norm."""
    torch.manual_seed(1)
    hook = nn.utils.spectral_norm(nn.Conv2d(4, 6, 3, 1, 1).double())
    ref, ours = _pair(4, 6)
    x = torch.randn(1, 4, 6, 6, dtype=F64)
    with on_backend(backend):
        for net in (hook, ref, ours):
            twin, fused = copy.deepcopy(net), ganengine.fuse(copy.deepcopy(net))
            for train in (True, False):
                twin.train(train)
                fused.train(train)
                want, got = _step(twin, x, False), _step(fused, x, True)
                for a, b in zip(want, got):
                    # a fused conv may sum in another order: fp64, <= C_in*9 products per output
                    # plus the division by sigma, each term bounded by the sum of |terms|
                    scale = max(a.abs().max().item(), 1.0) * 4 * 9
                    torch.testing.assert_close(b, a, rtol=0, atol=8 * 4 * 9 * 2.0 ** -53 * scale)


def test_functional_weight_under_grad_and_gradcheck():
    """GF.spectral_norm_weight under torch.func.grad: eager autograd's gradient, u untouched."""
    torch.manual_seed(2)
    w = torch.randn(6, 4, 3, 3, dtype=F64)
    u = torch.nn.functional.normalize(torch.randn(6, dtype=F64), dim=0)
    g = torch.randn(6, 4, 3, 3, dtype=F64)
    u0 = u.clone()

    def loss(w):
        return (ganengine.functional.spectral_norm_weight(w, u, 2)[0] * g).sum()

    wg = w.clone().requires_grad_()
    want = torch.autograd.grad(loss(wg), wg)[0]
    got = grad(loss)(w)
    # both the native kernels and PyTorch's ops: sigma from 36-term fp64 dot products
    torch.testing.assert_close(got, want, rtol=0, atol=64 * 36 * 2.0 ** -53 * want.abs().max().item())
    assert torch.equal(u, u0)
    # gradcheck: without iterations (u, v given), where sigma = u^T W v is the whole dependence
    # on W (with iterations the analytic gradient holds u and v constant, as PyTorch's does)
    v = torch.nn.functional.normalize(torch.randn(36, dtype=F64), dim=0)
    assert torch.autograd.gradcheck(
        functionalize(lambda w: ganengine.functional.spectral_norm_weight(w, u, 0, v=v)[0]), (wg,))
    assert torch.autograd.gradcheck(
        lambda w: grad(lambda w: (ganengine.functional.spectral_norm_weight(w, u, 0, v=v)[0] * g).sum())(w), (wg,))


def test_torch_func_grad_of_module_updates_state_as_eager():
    ref, ours = _pair()
    x = torch.randn(2, 5, 5, 5, dtype=F64)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    ref_params = dict(ref.named_parameters())
    want = torch.autograd.grad(ref(x).square().sum(), list(ref_params.values()))
    got = grad(lambda p: functional_call(ours, p, (x,)).square().sum())(params)
    for (k, a), b in zip(ref_params.items(), want):
        torch.testing.assert_close(got[k], b, rtol=0, atol=0)
    for k, b in ref.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[k], b, rtol=0, atol=0)


def test_vmap_over_stacked_layers_and_the_error_for_shared_state():
    """vmap over K layers' weights with their K states: each as its own eager layer. With one
    state shared by K weights, training has no meaning (K estimates for one buffer): a clear error;
    eval writes nothing and works."""
    layers = []
    for i in range(3):
        torch.manual_seed(10 + i)
        layers.append(gnn_spectral_norm(nn.Linear(5, 4).double()))
    refs = [copy.deepcopy(m) for m in layers]
    base = copy.deepcopy(layers[0])
    names_p = [k for k, _ in base.named_parameters()]
    names_b = [k for k, _ in base.named_buffers()]
    P = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in layers]) for k in names_p}
    B = {k: torch.stack([dict(m.named_buffers())[k] for m in layers]) for k in names_b}
    x = torch.randn(2, 5, dtype=F64)

    def f(p, b, x):
        return functional_call(base, (p, b), (x,))

    got = vmap(f, in_dims=(0, 0, None))(P, B, x)
    with ganengine.use_backend("torch"):  # PyTorch's composition, op for op
        want = torch.stack([m(x) for m in refs])
    # vmap batches the GEMVs (another summation order): fp64, the normalised vectors and sigma
    # from <= 5-term products, then the layer's 5-term products; a few of them in a row
    atol = 64 * 5 * 2.0 ** -53
    torch.testing.assert_close(got, want, rtol=0, atol=atol * want.abs().max().item())
    for k in names_b:
        torch.testing.assert_close(B[k], torch.stack([dict(m.named_buffers())[k] for m in refs]), rtol=0, atol=atol)

    shared = {k: v[0].clone() for k, v in B.items()}
    with pytest.raises(RuntimeError, match="batch the buffers with the weights"):
        vmap(f, in_dims=(0, None, None))(P, shared, x)
    base.eval()
    vmap(f, in_dims=(0, None, None))(P, shared, x)  # eval: no iteration, nothing written


@pytest.mark.parametrize("backend", backend_params(["cpu", "triton"]))
def test_native_function_apply_under_functionalize(backend):
    """SpectralNormFn.apply (biggan_ops calls it directly) under functionalize: PyTorch's ops."""
    torch.manual_seed(3)
    w = torch.randn(6, 12, dtype=F64, requires_grad=True)
    u = torch.nn.functional.normalize(torch.randn(6, dtype=F64), dim=0)
    cfg = (backend, [0], [u], [None], ops.V_STEP, 2, 1e-12, False)
    with on_backend(backend):
        eager = ops.SpectralNormFn.apply(cfg, w)
        under = functionalize(lambda w: ops.SpectralNormFn.apply(cfg, w))(w)
    assert len(under) == 4
    for a, b in zip(eager, under):
        # the native kernels take sigma from the last half step (||s||^2 / ||s||): fp64, 12- and
        # 6-term reductions
        atol = 64 * 12 * 2.0 ** -53 * max(a.abs().max().item(), 1)
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=atol)


@pytest.mark.parametrize("act", [True, False])
def test_fused_sagan_wrapper_same_bits_and_under_functionalize(act):
    """The fused heykeetae wrapper's sigma (fusion/spectral.py, read without module getattr and
    Tensor.norm's Python layers): the reference's ops, the same bits, train and eval, eager and
    under functionalize."""
    torch.manual_seed(4)
    mods = [R.SpectralNorm(nn.Conv2d(8, 8, 3, 1, 1))] + ([nn.LeakyReLU(0.1)] if act else [])
    net = nn.Sequential(*mods).double()
    fused = ganengine.fuse(copy.deepcopy(net))
    x = torch.randn(1, 8, 4, 4, dtype=F64)
    for transform in (False, True):
        for train in (True, False):
            net.train(train)
            fused.train(train)
            want, got = _step(net, x, False), _step(fused, x, transform)
            for a, b in zip(want, got):
                # the conv on the weight side (576 weight vs 128 output elements): the same conv
                # of the same quotient; fp64 bound for a possibly reordered 72-term reduction
                torch.testing.assert_close(b, a, rtol=0, atol=4 * 72 * 2.0 ** -53 * max(a.abs().max().item(), 1))


@pytest.mark.parametrize("backend", backend_params(CPU_BACKENDS))
def test_spectral_norm_group_under_functionalize(backend):
    """A model's grouped refresh (gnn.spectral_norm_group) under functionalize: each layer as
    torch's parametrization, bit for bit, state carried over two steps."""
    torch.manual_seed(5)
    net = nn.Sequential(torch_spectral_norm(nn.Conv2d(3, 6, 3, 1, 1)), nn.LeakyReLU(0.2),
                        torch_spectral_norm(nn.Conv2d(6, 4, 3, 1, 1))).double()
    ref = copy.deepcopy(net)
    ganengine.nn.spectral_norm_group(net)
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    with on_backend(backend):
        for _ in range(2):
            want, got = _step(ref, x, False), _step(net, x, True)
            for a, b in zip(want, got):
                torch.testing.assert_close(b, a, rtol=0, atol=0)  # the same ops: bound 0
