"""Spectral norm: GF.spectral_norm_weight, gnn.spectral_norm, the grouped refresh and the fuse rule.

The torch backend must equal PyTorch's ``torch.nn.utils.parametrizations.spectral_norm`` bit for
bit (same ops); the cpu and triton backends are checked against an fp64 composition from the same
inputs with a normwise error bound (see ``_bound``), and grouped against per-layer bit for bit.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as torch_sn

import ganengine
import ganengine.functional as GF
import ganengine.nn as gnn
from ganengine.ops import _dispatch
from ganengine.ops import spectral_norm as ops
from tests._backends import backend_params, on_backend
from tests._tolerance import assert_within_bound, bound, unit_roundoff

BACKENDS = backend_params()
NATIVE = backend_params(["cpu", "triton"])


def _layer(kind, dtype=torch.float32):
    """(module, dim): small layers, one past every Triton block size (conv_wide)."""
    torch.manual_seed(1)
    m = {"linear": lambda: nn.Linear(7, 5), "conv": lambda: nn.Conv2d(3, 6, 3),
         "conv_wide": lambda: nn.Conv2d(20, 40, 3), "convT": lambda: nn.ConvTranspose2d(4, 3, 3),
         "embedding": lambda: nn.Embedding(9, 6)}[kind]()
    return m.to(dtype), (1 if kind == "convT" else 0)


def _ref64(weight, u, v, first, steps, eps=1e-12, dim=0, order="pytorch"):
    """fp64 composition from the same inputs: (w_sn leaf graph, u, v, sigma, w64 leaf)."""
    w64 = weight.detach().double().requires_grad_()
    wmat = ops.weight_matrix(w64, dim)
    u64 = u.detach().double().clone()
    v64 = v.detach().double().clone() if v is not None else None
    u64, v64 = ops.torch_iterate(wmat, u64, v64, first, steps, eps)
    sigma = ops.torch_sigma(wmat, u64, v64, order)
    return w64 / sigma, u64, v64, sigma, w64


def _bound(actual, ref, weight, sigma, steps, name, extra_n=0):
    """Normwise bound: the result depends on steps + 2 chained reductions of length <= H + Wd
    (the matvecs, the norms, sigma), each relative error passed on through a normalisation and
    amplified at most by ||W||_F / sigma; c = 4 per link covers the two roundings of a
    normalisation (norm, division) and the final division. bf16 outputs: the Triton 3.8
    interpreter converts fp32 -> bf16 by truncation (a GPU rounds to nearest), so a full
    unit in the last place is allowed there instead of half."""
    w = weight.detach().double()
    h = w.shape[0]
    amp = float(w.norm() / sigma.detach().double().abs())
    n = h + w.numel() // h + extra_n
    ref = ref.detach().double()
    scale = amp * ref.abs().max()
    if actual.dtype == torch.bfloat16:
        err = (actual.double() - ref).abs()
        allowed = bound(scale, n, torch.float32, 4.0 * (steps + 2), torch.bfloat16, ref) + \
            unit_roundoff(torch.bfloat16) * ref.abs()
        assert (err <= allowed).all(), f"{name}: error {err.max().item():.3g} over the bound"
        return
    assert_within_bound(actual, ref, scale, n=n, acc_dtype=torch.float32, c=4.0 * (steps + 2),
                        out_dtype=actual.dtype, name=name)


def _torch_param(kind, dtype=torch.float32):
    m, dim = _layer(kind, dtype)
    torch.manual_seed(2)
    return torch_sn(m), dim


# ----------------------------------------------------------------------------- functional
@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_state_vectors_strided_and_constant(backend):
    """u and v may be strided views (columns of one matrix), and are constants of the call: no
    gradient reaches them on any backend, even when they require one."""
    torch.manual_seed(0)
    w = torch.randn(8, 6, requires_grad=True)
    U, V = torch.randn(8, 3), torch.randn(6, 3)
    U, V = U / U.norm(dim=0), V / V.norm(dim=0)
    u, v = U[:, 0], V[:, 0]
    assert not u.is_contiguous()
    with ganengine.use_backend("torch"):
        want = GF.spectral_norm_weight(w, u.contiguous(), v=v.contiguous())
    with on_backend(backend):
        got = GF.spectral_norm_weight(w, u, v=v)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    ug = u.clone().requires_grad_()
    with on_backend(backend):
        out = GF.spectral_norm_weight(w, ug)[0]
    out.sum().backward()
    assert ug.grad is None and w.grad is not None


@pytest.mark.parametrize("kind", ["linear", "conv", "conv_wide", "convT"])
@pytest.mark.parametrize("with_v", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_matches_parametrization(backend, kind, with_v):
    sn, dim = _torch_param(kind)
    p = sn.parametrizations.weight
    w = p.original.detach().clone()
    u0, v0 = p[0]._u.clone(), p[0]._v.clone()
    ref = sn.weight  # train mode: one power iteration, buffers updated
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    leaf = w.clone().requires_grad_()
    if backend == "cpu" and dim != 0:
        pytest.skip("the cpu backend serves dim 0 (ConvTranspose falls back to torch, tested there)")
    with on_backend(backend):
        out, u_new, sigma, v_new = GF.spectral_norm_weight(leaf, u0, v=v0 if with_v else None, dim=dim,
                                                           return_v=True)
        (out * g).sum().backward()
    assert not u_new.requires_grad and not v_new.requires_grad
    if backend == "torch":  # PyTorch's own ops: identical bits
        for a, b in ((out, ref), (u_new, p[0]._u), (v_new, p[0]._v), (leaf.grad, p.original.grad)):
            assert torch.equal(a, b)
        return
    first, steps = ops.plan("pytorch", 1, with_v)
    r, ru, rv, rs, r_w = _ref64(w, u0, v0 if with_v else None, first, steps, dim=dim)
    _bound(out, r.detach(), w, rs, steps, "w_sn")
    _bound(u_new, ru, w, rs, steps, "u")
    _bound(v_new, rv, w, rs, steps, "v")
    _bound(sigma, rs.detach(), w, rs, steps, "sigma")
    (r * g.double()).sum().backward()
    _bound(leaf.grad, r_w.grad, w, rs, steps, "grad", extra_n=w.numel())


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_classic_and_iterations(backend):
    """n=0 (eval, from the stored u, v), n=3, and the classic order against the hook-based
    torch.nn.utils.spectral_norm (bit for bit on the torch backend)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(5, 12, 3)
    w = conv.weight.detach().clone()
    u = F.normalize(torch.randn(12), dim=0)
    v = F.normalize(torch.randn(45), dim=0)
    with on_backend(backend):
        out0, u0, s0, v0 = GF.spectral_norm_weight(w, u, 0, v=v, return_v=True)
        out3, u3, s3 = GF.spectral_norm_weight(w, u, 3, v=v)
    assert torch.equal(u0, u) and torch.equal(v0, v)  # eval: nothing moves
    for out, sig, first, steps in ((out0, s0, 0, 0), (out3, s3, 0, 6)):
        r, _, _, rs, _ = _ref64(w, u, v, first, steps)
        _bound(out, r.detach(), w, rs, steps, f"steps={steps}")
        _bound(sig, rs.detach(), w, rs, steps, f"sigma steps={steps}")
    old = nn.utils.spectral_norm(copy.deepcopy(conv))  # hook-based: weight_orig, weight_u, weight_v
    u_old = old.weight_u.clone()
    old(torch.randn(1, 5, 4, 4))  # pre-hook: one iteration (v then u), weight recomputed
    with on_backend(backend):
        out_c, u_c, s_c = GF.spectral_norm_weight(old.weight_orig.detach(), u_old, order="classic")
    if backend == "torch":
        assert torch.equal(out_c, old.weight) and torch.equal(u_c, old.weight_u)
    else:
        r, ru, _, rs, _ = _ref64(old.weight_orig, u_old, None, 1, 2, order="classic")
        _bound(out_c, r.detach(), w, rs, 2, "classic")
        _bound(u_c, ru, w, rs, 2, "classic u")




@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("first,steps", [(0, 2), (1, 3), (0, 3), (0, 4)])
def test_many_rows_every_plan_and_threads(backend, first, steps):
    """A weight of 261 rows (the cpu kernel's fused U+V pass sums rows in blocks of 128: three
    partial blocks, a 1-row tail after its 4-row sweeps) and 5*3*3 = 45 columns (vector tails),
    through plans that pair U with V (0, 2), follow a V with a pair (1, 3), end on a lone U
    (0, 3) and pair twice (0, 4): against fp64 within the bound; on the cpu backend the bits
    must not depend on the thread count (the kernel's sums have a fixed order)."""
    torch.manual_seed(7)
    w = torch.randn(261, 5, 3, 3) * 0.2
    u = F.normalize(torch.randn(261), dim=0)
    v = F.normalize(torch.randn(45), dim=0)
    threads = torch.get_num_threads()
    runs = []
    for n in ((1, 2) if backend == "cpu" else (threads,)):
        torch.set_num_threads(n)
        try:
            with on_backend(backend):
                (out,), (u_new,), (v_new,), sigma, _ = ops.native_forward(backend, [w], [0], [u], [v], first, steps,
                                                                          1e-12, False)
            runs.append((out, u_new, v_new, sigma))
        finally:
            torch.set_num_threads(threads)
    out, u_new, v_new, sigma = runs[0]
    r, ru, rv, rs, _ = _ref64(w, u, v, first, steps)
    _bound(out, r.detach(), w, rs, steps, "w_sn")
    _bound(u_new, ru, w, rs, steps, "u")
    _bound(v_new, rv, w, rs, steps, "v")
    _bound(sigma[0], rs.detach(), w, rs, steps, "sigma")
    for a, b in zip(runs[0], runs[-1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_classic_order_serves_the_models_own_layers(backend):
    """SAGAN's SpectralNorm wrapper (weight_u/_v/_bar) and BigGAN's SNConv2d (u0, num_svs=1) keep
    their reference keys, but their step is the classic order: GF.spectral_norm_weight(...,
    order="classic") from their state gives their weight, u and sigma (SAGAN's ``v / (||v|| +
    eps)`` equals F.normalize's ``v / max(||v||, eps)`` for any norm above eps / unit roundoff)."""
    from ganengine.models.layers_biggan import SNConv2d
    from ganengine.models.networks_sagan import SpectralNorm as SaganSN

    torch.manual_seed(4)
    sagan = SaganSN(nn.Conv2d(8, 16, 4))
    biggan = SNConv2d(8, 16, 3, num_svs=1, num_itrs=1, eps=1e-8)
    w_s, u_s = sagan.module.weight_bar.detach().clone(), sagan.module.weight_u.clone()
    w_b, u_b = biggan.weight.detach().clone(), biggan.u0.view(-1).clone()
    want_s = sagan.normalized_weight().detach()
    want_b = biggan.W_().detach()
    with on_backend(backend):
        got_s, gu_s, gs_s = GF.spectral_norm_weight(w_s, u_s, 1, 1e-12, order="classic")
        got_b, gu_b, gs_b = GF.spectral_norm_weight(w_b, u_b, 1, 1e-8, order="classic")
    if backend == "torch":  # the same GEMVs and norms as SAGAN's layer
        assert torch.equal(got_s, want_s) and torch.equal(gu_s, sagan.module.weight_u)
    for got, gu, gs, want, w, u, new_u, sv, eps, name in (
            (got_s, gu_s, gs_s, want_s, w_s, u_s, sagan.module.weight_u, None, 1e-12, "sagan"),
            (got_b, gu_b, gs_b, want_b, w_b, u_b, biggan.u0.view(-1), biggan.sv0, 1e-8, "biggan")):
        r, ru, _, rs, _ = _ref64(w, u, None, 1, 2, eps=eps, order="classic")
        for actual in (got, want):  # ganengine and the layer, both within the bound of fp64
            _bound(actual, r.detach(), w, rs, 2, name)
        _bound(gu, ru, w, rs, 2, f"{name} u")
        _bound(new_u, ru, w, rs, 2, f"{name} layer u")
        if sv is not None:
            _bound(gs, sv.double().view(()), w, rs, 2, f"{name} sigma vs sv0")

@pytest.mark.parametrize("backend", backend_params(["triton"]))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    m, dim = _layer("conv_wide", dtype)
    w = m.weight.detach()
    u = F.normalize(torch.randn(w.shape[0]), dim=0).to(dtype)
    v = F.normalize(torch.randn(w.numel() // w.shape[0]), dim=0).to(dtype)
    with on_backend(backend):
        out, u_new, sigma = GF.spectral_norm_weight(w, u, 2, v=v)
    assert out.dtype == dtype and u_new.dtype == dtype and sigma.dtype == dtype
    r, ru, _, rs, _ = _ref64(w, u, v, 0, 4)
    # fp32 accumulation (the bound's gamma) plus the output rounding (u_out |ref| inside the bound)
    _bound(out, r.detach(), w.float(), rs, 4, "w_sn")
    _bound(u_new, ru, w.float(), rs, 4, "u")


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_and_stride0_grads(backend):
    """channels_last / non-contiguous weights and a stride-0 (``.sum()``) gradient."""
    torch.manual_seed(4)
    w = torch.randn(8, 6, 3, 3).contiguous(memory_format=torch.channels_last)
    u = F.normalize(torch.randn(8), dim=0)
    v = F.normalize(torch.randn(54), dim=0)
    results = []
    for weight in (w, w.contiguous(), torch.randn(6, 8, 3, 3).transpose(0, 1)):
        leaf = weight.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        with on_backend(backend) if not (backend == "cpu" and not weight.is_contiguous()) else ganengine.use_backend(
                "auto"):
            out, _, sigma = GF.spectral_norm_weight(leaf, u, v=v)
            (out.sum() + 2 * sigma).backward()
        r, _, _, rs, r_w = _ref64(weight, u, v, 0, 2)
        _bound(out, r.detach(), weight, rs, 2, "w_sn")
        (r.sum() + 2 * rs).backward()
        _bound(leaf.grad, r_w.grad, weight, rs, 2, "grad", extra_n=weight.numel())
        results.append(out)
    assert torch.equal(results[0].contiguous(), results[1].contiguous()) or backend == "cpu"



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["w_sn", "sigma"])
def test_one_output_gradient(backend, which):
    """A gradient through one output only (the other's is None in the backward): the one-layer
    route fills the missing one with zeros, as the grouped route does."""
    torch.manual_seed(5)
    w = torch.randn(7, 5, 3, 3)
    u, v = F.normalize(torch.randn(7), dim=0), F.normalize(torch.randn(45), dim=0)
    leaf = w.clone().requires_grad_()
    with on_backend(backend):
        out, _, sigma = GF.spectral_norm_weight(leaf, u, v=v)
        ((out * out.detach()).sum() if which == "w_sn" else 3 * sigma).backward()
    r, _, _, rs, r_w = _ref64(w, u, v, 0, 2)
    ((r * r.detach()).sum() if which == "w_sn" else 3 * rs).backward()
    _bound(leaf.grad, r_w.grad, w, rs, 2, "grad", extra_n=w.numel())

def test_one_dim_weight_and_errors():
    w = torch.randn(7)
    out, u, sigma = GF.spectral_norm_weight(w, None)
    assert torch.equal(out, F.normalize(w, dim=0, eps=1e-12)) and torch.allclose(sigma, w.norm())
    w = torch.randn(4, 5)
    with pytest.raises(ValueError, match="u must have shape \\(4,\\)"):
        GF.spectral_norm_weight(w, torch.randn(5))
    with pytest.raises(ValueError, match="v must have shape \\(5,\\)"):
        GF.spectral_norm_weight(w, torch.randn(4), v=torch.randn(4))
    with pytest.raises(ValueError, match="n_power_iterations"):
        GF.spectral_norm_weight(w, torch.randn(4), -1)
    with pytest.raises(ValueError, match="dtype and device"):
        GF.spectral_norm_weight(w, torch.randn(4, dtype=torch.float64))
    with pytest.raises(IndexError, match="dim"):
        GF.spectral_norm_weight(w, torch.randn(4), dim=2)
    with pytest.raises(ValueError, match="order"):
        GF.spectral_norm_weight(w, torch.randn(4), order="bigGAN")
    with pytest.raises(TypeError, match="floating point"):
        GF.spectral_norm_weight(torch.ones(4, 5, dtype=torch.int64), torch.randn(4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_u_and_v_on_another_device_or_not_tensors_are_refused(backend):
    """The cpu kernels read u and v through their pointers: a meta u / v (no memory) gave a random
    sigma; a list gave the dispatcher's error. Both are the public errors on every backend."""
    w = torch.randn(4, 5, requires_grad=True)
    with on_backend(backend):
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                with pytest.raises(ValueError, match="u must have the weight's dtype and device"):
                    GF.spectral_norm_weight(w, torch.randn(4, device="meta"))
                with pytest.raises(ValueError, match="v must have the weight's dtype and device"):
                    GF.spectral_norm_weight(w, torch.randn(4), v=torch.randn(5, device="meta"))
                with pytest.raises(TypeError, match="u must be a Tensor or None"):
                    GF.spectral_norm_weight(w, [1.0] * 4)


# ----------------------------------------------------------------------------- second order, opcheck, compile
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck(backend):
    """fp64, no iteration (u, v fixed): the normalised weight is then an exact function of W."""
    torch.manual_seed(5)
    w = torch.randn(3, 2, 1, 2, dtype=torch.float64, requires_grad=True)
    u = F.normalize(torch.randn(3, dtype=torch.float64), dim=0)
    v = F.normalize(torch.randn(4, dtype=torch.float64), dim=0)

    def fn(weight):
        out, _, sigma = GF.spectral_norm_weight(weight, u, 0, v=v)
        return out, sigma

    with on_backend(backend):
        assert torch.autograd.gradcheck(fn, (w,))
        assert torch.autograd.gradgradcheck(fn, (w,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_r1_penalty_through_sn_discriminator(backend):
    """R1: grad of D(x) w.r.t. x with create_graph, penalty backward into the SN weights."""
    def make():
        torch.manual_seed(6)
        d = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 4, 3, 2, 1), nn.LeakyReLU(0.2),
                          nn.Flatten(), nn.Linear(16, 1))
        for i in (0, 2, 5):
            gnn.spectral_norm(d[i])
        return d

    x = torch.randn(2, 3, 8, 8)
    grads = {}
    for be in ("torch", backend):
        d = make()
        xi = x.clone().requires_grad_()
        with on_backend(be):
            out = d(xi)
            (g,) = torch.autograd.grad(out.sum(), xi, create_graph=True)
            (g.pow(2).sum() + out.mean()).backward()
        grads[be] = [p.grad for p in d.parameters()]
    for a, b in zip(grads["torch"], grads[backend]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    torch.manual_seed(7)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    u = F.normalize(torch.randn(6), dim=0)
    v = F.normalize(torch.randn(36), dim=0)
    with on_backend(backend):
        torch.library.opcheck(ops.spectral_norm_op, (w, u, v, 0, 2, 1e-12, 0))
        torch.library.opcheck(ops.spectral_norm_op, (w, u, None, 1, 3, 1e-12, 0))
        torch.library.opcheck(ops.spectral_norm_backward_op,
                              (torch.randn(6, 4, 3, 3), torch.tensor(0.5), w.detach(), u, v, torch.tensor(1.7), 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_module(backend):
    """A gnn.spectral_norm layer under torch.compile(fullgraph): same outputs, same buffer updates."""
    def make():
        torch.manual_seed(8)
        return gnn.spectral_norm(nn.Conv2d(3, 5, 3))

    eager, compiled = make(), make()
    fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 6)
    with on_backend(backend):
        for _ in range(2):
            a, b = eager(x), fn(x)
            a.sum().backward()
            b.sum().backward()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k, t in eager.state_dict().items():
        torch.testing.assert_close(t, compiled.state_dict()[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eager.parametrizations.weight.original.grad,
                               compiled.parametrizations.weight.original.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- module
@pytest.mark.parametrize("kind", ["linear", "conv", "convT", "embedding"])
def test_module_init_keys_and_checkpoints(kind):
    """Same seed -> the same u, v as PyTorch; same keys; checkpoints load both ways."""
    m1, dim = _layer(kind)
    m2 = copy.deepcopy(m1)
    torch.manual_seed(9)
    ref = torch_sn(m1)
    torch.manual_seed(9)
    ours = gnn.spectral_norm(m2)
    assert ours.parametrizations.weight[0].dim == dim
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ref) == list(sd_ours)
    assert {"parametrizations.weight.original", "parametrizations.weight.0._u", "parametrizations.weight.0._v"} \
        <= set(sd_ours)
    for k in sd_ref:
        assert torch.equal(sd_ref[k], sd_ours[k]), k
    # a checkpoint moved between the two after some training
    cin = {"linear": 7, "conv": 3, "convT": 4}.get(kind)
    ref(torch.randint(0, 5, (3,)) if kind == "embedding" else torch.randn(2, cin, 5, 5) if kind.startswith("conv")
        else torch.randn(2, 7))
    fresh = gnn.spectral_norm(_layer(kind)[0])
    fresh.load_state_dict(ref.state_dict())
    back = torch_sn(_layer(kind)[0])
    back.load_state_dict(fresh.state_dict())
    ref.eval(), fresh.eval(), back.eval()
    with ganengine.use_backend("torch"):
        assert torch.equal(fresh.weight, ref.weight) and torch.equal(back.weight, ref.weight)
        parametrize.remove_parametrizations(fresh, "weight")
        assert torch.equal(fresh.weight, ref.weight) and isinstance(fresh.weight, nn.Parameter)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_train_eval_and_cached(backend):
    torch.manual_seed(10)
    base = nn.Conv2d(4, 6, 3)
    torch.manual_seed(11)
    ref = torch_sn(copy.deepcopy(base))
    torch.manual_seed(11)
    ours = gnn.spectral_norm(copy.deepcopy(base))
    x = torch.randn(2, 4, 5, 5)
    with on_backend(backend):
        for _ in range(3):  # train: one iteration per forward
            a, b = ref(x), ours(x)
        ours.eval()
        ref.eval()
        before = {k: t.clone() for k, t in ours.state_dict().items()}
        c, d = ref(x), ours(x)
        assert all(torch.equal(before[k], t) for k, t in ours.state_dict().items())  # eval: no update
        ours.train()
        u0 = ours.parametrizations.weight[0]._u.clone()
        with parametrize.cached():  # one iteration for two accesses
            w1, w2 = ours.weight, ours.weight
        assert w1 is w2
        ours.weight  # noqa: B018 - an access outside the cache iterates again
        n_changes = int(not torch.equal(u0, ours.parametrizations.weight[0]._u))
    assert n_changes == 1
    if backend == "torch":
        assert torch.equal(a, b) and torch.equal(c, d)
    else:
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params(["triton"]))
def test_module_half_and_convtranspose(backend):
    torch.manual_seed(11)
    for m in (nn.Linear(9, 17).half(), nn.ConvTranspose2d(6, 4, 4, 2, 1)):
        torch.manual_seed(12)
        ours = gnn.spectral_norm(copy.deepcopy(m))
        torch.manual_seed(12)
        ref = torch_sn(copy.deepcopy(m))
        with on_backend(backend):
            for _ in range(2):
                wo = ours.weight
        for _ in range(2):
            wr = ref.weight
        tol = dict(rtol=2e-3, atol=2e-3) if m.weight.dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(wo, wr, **tol)


# ----------------------------------------------------------------------------- grouped refresh
def _disc(wrap, seed=12):
    torch.manual_seed(seed)
    d = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 20, 4, 2, 1), nn.LeakyReLU(0.2),
                      nn.Conv2d(20, 40, 3, 1, 1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(40 * 16, 1))
    for i in (0, 2, 4, 7):
        wrap(d[i])
    return d


@pytest.mark.parametrize("backend", NATIVE)
def test_group_equals_per_layer(backend):
    """Bit-identical to per-layer iteration: outputs, buffers, gradients; train (D called on real
    and fake before one backward) and eval."""
    single = _disc(gnn.spectral_norm)
    grouped = copy.deepcopy(single)
    group = gnn.spectral_norm_group(grouped)
    assert len(group) == 4
    real, fake = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    with on_backend(backend):
        for _ in range(2):
            outs = []
            for d in (single, grouped):
                loss = F.softplus(-d(real)).mean() + F.softplus(d(fake)).mean()
                loss.backward()
                outs.append(loss)
            assert group.last_refresh == {backend: 4}
            assert torch.equal(outs[0], outs[1])
        for (k, a), b in zip(single.state_dict().items(), grouped.state_dict().values()):
            assert torch.equal(a, b), k
        for a, b in zip(single.parameters(), grouped.parameters()):
            assert torch.equal(a.grad, b.grad)
        single.eval()
        grouped.eval()
        assert torch.equal(single(real), grouped(real))
    group.detach()


@pytest.mark.parametrize("backend", NATIVE)
def test_group_copies_are_independent_and_never_stale(backend):
    """copy.deepcopy of a grouped model refreshes its own layers (the hook does not reach the
    original's), and a precomputed weight whose tensor changed since the refresh (an optimiser
    step, load_state_dict) is not served: the layer computes afresh."""
    d = _disc(gnn.spectral_norm)
    ref = _disc(gnn.spectral_norm)
    ref.load_state_dict(d.state_dict())
    group = gnn.spectral_norm_group(d)
    x = torch.randn(2, 3, 16, 16)
    with on_backend(backend):
        twin, ref_twin = copy.deepcopy(d), copy.deepcopy(ref)
        u = d[0].parametrizations.weight[0]._u.clone()
        assert torch.equal(twin(x), ref_twin(x))
        assert torch.equal(d[0].parametrizations.weight[0]._u, u)  # the original did not move
        assert torch.equal(d(x), ref(x))
        assert torch.equal(twin(x), ref_twin(x))
        # an unused layer keeps its precomputed weight until accessed: edit the weight in between
        aux = gnn.spectral_norm(nn.Linear(5, 4))
        model = nn.ModuleDict({"main": nn.Linear(5, 3), "aux": aux})
        model.forward = lambda t: model["main"](t)
        plain = copy.deepcopy(aux)
        gnn.spectral_norm_group(model)
        model(torch.randn(2, 5))  # refreshes aux too (the group's documented difference)
        plain.parametrizations.weight[0]._u.copy_(aux.parametrizations.weight[0]._u)
        plain.parametrizations.weight[0]._v.copy_(aux.parametrizations.weight[0]._v)
        with torch.no_grad():
            aux.parametrizations.weight.original.mul_(3.0)
            plain.parametrizations.weight.original.copy_(aux.parametrizations.weight.original)
        t = torch.randn(2, 5)
        assert torch.equal(aux(t), plain(t))
    group.detach()
    assert d.__dict__["_ganengine_sn_group"] is None
    g2 = gnn.spectral_norm_group(d)  # a second group replaces the first (one iteration per forward)
    with on_backend(backend):
        d(x)
        ref(x)
    assert group.attached is False and g2.attached and len(d._forward_pre_hooks) == 1
    assert torch.equal(d[0].parametrizations.weight[0]._u, ref[0].parametrizations.weight[0]._u)


def test_group_refresh_without_grad_is_not_served_to_a_call_with_grad():
    """A refresh under no_grad (a logging pass) leaves weights without a graph: a layer the
    forward skipped, used next with autograd on, computes afresh and its weight gets a gradient."""
    aux = gnn.spectral_norm(nn.Linear(5, 4))
    model = nn.ModuleDict({"main": nn.Linear(5, 3), "aux": aux})
    model.forward = lambda t: model["main"](t)
    gnn.spectral_norm_group(model)
    with torch.no_grad():
        model(torch.randn(2, 5))  # refreshes aux too
    plain = copy.deepcopy(aux)   # (the state the refresh left: u, v already iterated once)
    t = torch.randn(2, 5)
    aux(t).sum().backward()
    g = aux.parametrizations.weight.original.grad
    assert g is not None and g.abs().sum() > 0
    # the same weight as the refresh's (no second power iteration): eval of the copy computes it
    plain.eval()
    torch.testing.assert_close(aux.parametrizations.weight[0]._u, plain.parametrizations.weight[0]._u)
    torch.testing.assert_close(aux(t), plain(t))


def test_group_converts_torch_parametrizations_and_respects_cache():
    d = _disc(torch_sn)
    ref = copy.deepcopy(d)
    group = gnn.spectral_norm_group(d)
    assert len(group) == 4 and all(type(d[i].parametrizations.weight[0]) is gnn.SpectralNorm for i in (0, 2, 4, 7))
    assert list(d.state_dict()) == list(ref.state_dict())
    x = torch.randn(1, 3, 16, 16)
    with ganengine.use_backend("cpu"):
        with parametrize.cached():
            d(x)
            u = d[0].parametrizations.weight[0]._u.clone()
            d(x)  # cached weights: the second call refreshes nothing
            assert torch.equal(u, d[0].parametrizations.weight[0]._u)
    with ganengine.use_backend("torch"):  # torch backend: nothing grouped, PyTorch's numbers
        d.load_state_dict(ref.state_dict())
        assert torch.equal(d(x), ref(x))
        assert group.last_refresh == {}


def test_group_launch_counts():
    """Kernels per step on the CUDA path (Triton launches under the interpreter): the grouped
    refresh is 3 launches forward (train, 1 iteration) + 2 backward whatever the layer count;
    PyTorch's parametrization issues about a dozen kernels per layer."""
    from ganengine import backends
    from ganengine.bench.traffic import EagerTraffic, TritonTraffic

    if not backends.serves("triton", torch.device("cpu")):
        pytest.skip("needs the Triton interpreter")
    counts = {}
    for n_layers in (2, 4):
        layers = [gnn.spectral_norm(nn.Conv2d(4, 6, 3)) for _ in range(n_layers)]
        refs = [torch_sn(nn.Conv2d(4, 6, 3)) for _ in range(n_layers)]
        container = nn.ModuleList(layers)
        group = gnn.spectral_norm_group(container, attach=False)
        with on_backend("triton"), TritonTraffic() as tt, \
                EagerTraffic(skip_namespaces=("ganengine", "ganengine_C")) as around:
            group.refresh()
            torch.autograd.backward([m.weight for m in layers], [torch.ones(6, 4, 3, 3)] * n_layers)
        with EagerTraffic() as eager:
            torch.autograd.backward([m.weight for m in refs], [torch.ones(6, 4, 3, 3)] * n_layers)
        counts[n_layers] = (len(tt.launches), around.num_kernels, eager.num_kernels)
    assert counts[2][0] == counts[4][0] == 5
    assert counts[2][1] == counts[4][1]  # the aten ops around the launches do not grow per layer either
    assert counts[4][2] >= 4 * 10 and counts[4][0] + counts[4][1] < counts[4][2] / 4


def test_group_under_ddp():
    import os
    import tempfile

    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            single = _disc(gnn.spectral_norm)
            ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(single))
            group = gnn.spectral_norm_group(ddp)
            x = torch.randn(2, 3, 16, 16)
            with ganengine.use_backend("cpu"):
                assert torch.equal(ddp(x), single(x))
            assert group.last_refresh == {"cpu": 4}
        finally:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- fuse
def test_fuse_swaps_torch_parametrization():
    d = _disc(torch_sn)
    params = {n: p for n, p in d.named_parameters()}
    fused, report = ganengine.fuse(d, inplace=True, return_report=True)
    assert report.get("spectral_norm") == 4
    assert all(type(fused[i].parametrizations.weight[0]) is gnn.SpectralNorm for i in (0, 2, 4, 7))
    assert all(p is params[n] for n, p in fused.named_parameters())
    ref = _disc(torch_sn)
    x = torch.randn(2, 3, 16, 16)
    with ganengine.use_backend("torch"):
        for _ in range(2):
            assert torch.equal(fused(x), ref(x))
    for k, t in ref.state_dict().items():
        assert torch.equal(t, fused.state_dict()[k])
    with ganengine.use_backend("auto"):
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-6)


# hook-based torch.nn.utils.spectral_norm convs under fuse(): tests/test_fuse.py (fused with the
# hook kept, or declined beside another hook)


def test_dispatch_auto_routes():
    w = torch.randn(6, 4, 3, 3)
    u = F.normalize(torch.randn(6), dim=0)
    with ganengine.use_backend("auto"):
        GF.spectral_norm_weight(w, u)
    assert _dispatch.last_used["spectral_norm"] == ("cpu" if ganengine.backends.serves("cpu", w.device) else "torch")


# ----------------------------------------------------------------------------- Python route host cost
# Eager calls on a native backend run SpectralNormFn (an autograd.Function; the custom op
# ganengine::spectral_norm is only what torch.compile sees). A call that records no graph (no_grad,
# eval, a D's weights with requires_grad off in the G step) skips the Function: the same
# native_forward, the same numbers, state writes included.
@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("shape,cl", [((8, 4, 3, 3), False), ((5, 7), False), ((6, 3, 1, 1), False),
                                      ((4, 3, 3, 5), True)], ids=["conv", "linear", "1x1", "nhwc"])
def test_no_graph_calls_skip_the_function(monkeypatch, backend, shape, cl):
    if cl and backend == "cpu":
        pytest.skip("the cpu kernels take contiguous weights (tested on the torch fallback elsewhere)")
    monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: None)  # the Python route (the CUDA path's)
    torch.manual_seed(5)
    w = torch.randn(shape) * 0.3
    w2 = torch.randn(shape[0] + 1, *shape[1:]) * 0.3  # a second layer for the group
    if cl:
        w = w.contiguous(memory_format=torch.channels_last)
    states = [(F.normalize(torch.randn(t.shape[0]), dim=0), F.normalize(torch.randn(t[0].numel()), dim=0))
              for t in (w, w2)]
    applied = []
    real_apply = ops.SpectralNormFn.apply

    def spy(*args):
        applied.append(True)
        return real_apply(*args)

    monkeypatch.setattr(ops.SpectralNormFn, "apply", staticmethod(spy))

    def run(weights_need_grad):
        us, vs = [u.clone() for u, _ in states], [v.clone() for _, v in states]
        ws = [t.detach().requires_grad_(weights_need_grad) for t in (w, w2)]
        with on_backend(backend):
            layer = ops.run_layer(ws[0], us[0], vs[0], ops.U_STEP, 2, 1e-12, 0, "pytorch", in_place=True)
            functional = GF.spectral_norm_weight(ws[1], us[1], 1, 1e-12, v=vs[1], return_v=True)
            w_sns, sigmas = ops.run_group(ws, [0, 0], us, vs, ops.U_STEP, 2, 1e-12, True, backend)
        return [t.detach() for t in (*layer, *functional, *w_sns, *sigmas, *us, *vs)]

    with_fn = run(True)
    assert len(applied) == 3
    applied.clear()
    without = run(False)
    assert not applied
    for a, b in zip(without, with_fn, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    # the same under no_grad with weights that require grad (module eval / a refresh)
    with torch.no_grad():
        again = run(True)
    assert not applied
    for a, b in zip(again, with_fn, strict=True):
        assert torch.equal(a, b)


def test_choose_backend_layout_shortcut():
    """choose_backend skips matrix_layout for contiguous dim-0 weights: they always flatten to one
    run (size-1 dims with any stride included); other layouts still ask matrix_layout."""
    base = torch.randn(3 * 4 * 5)
    for w in [torch.randn(8, 4, 3, 3), torch.randn(5, 7), torch.randn(1, 1, 1, 1), torch.randn(3, 1, 4, 1),
              base[:12].as_strided((3, 1, 4), (4, 99, 1)), base.as_strided((1, 3, 4, 5), (7, 20, 5, 1))]:
        assert w.is_contiguous() and ops.matrix_layout(w.shape, w.stride(), 0) is not None
    w = torch.randn(4, 3, 5, 6)
    assert ops.matrix_layout(w.shape, w.stride(), 2) is None  # (why the shortcut is dim 0 only)
    if ganengine.backends.serves("triton", w.device):
        with on_backend("triton"), pytest.raises(_dispatch.BackendFallbackError, match="strides"):
            ops.choose_backend(w, 2)
        with on_backend("triton"):
            assert ops.choose_backend(w, 0) == "triton"


def test_custom_op_without_v_needs_a_v_step_first():
    """ganengine::spectral_norm's schema takes v=None: then the plan must start with a V step (as
    plan() gives without v); a U-first plan is a ValueError saying so (it failed inside the kernel)."""
    w = torch.randn(4, 3, 3, 3)
    u = F.normalize(torch.randn(4), dim=0)
    with pytest.raises(ValueError, match="but v is None"):
        torch.ops.ganengine.spectral_norm(w, u, None, ops.U_STEP, 2, 1e-12, 0)
    first, steps = ops.plan("pytorch", 1, False)
    w_sn, _, _, sigma = torch.ops.ganengine.spectral_norm(w, u, None, first, steps, 1e-12, 0)
    torch.testing.assert_close(w_sn * sigma, w, rtol=1e-5, atol=1e-6)


def test_group_without_spectral_normed_layers_says_so():
    # (a reference's own SpectralNorm class, SAGAN's or BigGAN's, is not a parametrization)
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.warns(RuntimeWarning, match="nothing to group"):
        group = gnn.spectral_norm_group(net)
    assert len(group) == 0 and not group.attached and not net._forward_pre_hooks


def test_group_and_losses_under_inference_mode():
    # inference tensors keep no version counter (the staleness checks read it)
    with torch.inference_mode():
        net = nn.Sequential(gnn.spectral_norm(nn.Linear(4, 3)), nn.ReLU(), gnn.spectral_norm(nn.Linear(3, 1)))
        gnn.spectral_norm_group(net)
        assert net(torch.randn(2, 4)).shape == (2, 1)
        loss = gnn.GANLoss("lsgan")
        assert torch.isfinite(loss(torch.randn(2, 1), True))
