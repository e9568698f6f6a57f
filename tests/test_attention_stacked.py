"""The stacked projection (ops/attention.py ``stacked_conv1x1``): GF.self_attention2d's Python route
(the CUDA path's, and the CPU's where the C++ entry declines) and the attention modules off the C++
entry run ONE 1x1 conv with the q/k/v (BigGAN: theta/phi/g) weights stacked and hand the core its
channel slices (views, no copies on the torch and Triton backends). Against the fp64 reference with
error-bound tolerances (the GEMM may round differently from three convs), forward, every gradient,
odd shapes, channels_last, non-contiguous x, biases absent; double backward; the fallbacks to the
three convs / modules (mixed biases, hooks, spectral norm)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ganengine.functional as GF
import ganengine.nn as gnn
from ganengine.ops import _dispatch
from tests._attention_bounds import self_attention_bounds
from tests._backends import backend_params, on_backend
from tests._model_bounds import Census, assert_normwise, census
from tests._tolerance import assert_below
from tests.test_attention import BigGANAttention, _sagan_reference


class _Ops(TorchDispatchMode):
    """The aten ops a call issues (views included), in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def count(self, name: str) -> int:
        return sum(op.startswith(name) for op in self.ops)


def _python_route(monkeypatch):
    # the route the CUDA path takes: no C++ lean entry (CPU only) in front of it
    monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: None)


def _inputs(b, c, h, w, bias, layout):
    """fp64 x and block parameters (the reference's values) with ``bias`` "all", "none" or "mixed"."""
    d = max(1, c // 8)
    g = torch.Generator().manual_seed(b * 1000 + c * 10 + h + w)

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * s

    if layout == "strided":  # a transposed view: no layout of its own
        x = rnd(b, c, w, h).transpose(2, 3)
    else:
        x = rnd(b, c, h, w)
    biases = {"all": (True, True, True), "none": (False, False, False), "mixed": (True, False, True)}[bias]
    p = []
    for out, has_bias in zip((d, d, c), biases):
        p += [rnd(out, c, 1, 1, s=c ** -0.5), rnd(out, s=0.1) if has_bias else None]
    return x, p + [torch.tensor([0.7], dtype=torch.float64)]


# (B, C, H, W, biases, layout): odd sizes, one pixel, channels_last, a non-contiguous x
# (mixed biases: the three convs; backend-independent, so on one backend)
CASES = [(2, 16, 3, 5, "all", "nchw"), (1, 8, 1, 1, "none", "nchw"), (2, 24, 5, 3, "all", "nhwc"),
         (3, 16, 4, 3, "none", "strided")]
CASE_PARAMS = [pytest.param(bp.values[0], c, marks=bp.marks,
                            id=f"{bp.values[0]}-" + "x".join(map(str, c[:4])) + f"-{c[4]}-{c[5]}")
               for bp in backend_params(["torch", "triton", "cpu"]) for c in CASES]
CASE_PARAMS.append(pytest.param("torch", (2, 16, 3, 3, "mixed", "nchw"), id="torch-mixed"))


@pytest.mark.parametrize("backend,case", CASE_PARAMS)
def test_block_route_matches_fp64_reference(monkeypatch, backend, case):
    _python_route(monkeypatch)
    b, c, h, w, bias, layout = case
    x64, p64 = _inputs(b, c, h, w, bias, layout)
    live = [i for i, t in enumerate([x64] + p64) if t is not None]   # the inputs that get gradients
    ins64 = [None if t is None else t.clone().requires_grad_() for t in [x64] + p64]
    ref, _ = _sagan_reference(*ins64)
    sum_grad = layout == "strided"  # out.sum(): a stride-0 upstream gradient
    go = torch.ones_like(ref) if sum_grad else torch.randn(ref.shape, generator=torch.Generator().manual_seed(5),
                                                           dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, [ins64[i] for i in live], go)

    x = x64.float()
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    ins = [None if t is None else t.float().requires_grad_() for t in [x] + p64]
    ops = _Ops()
    with on_backend(backend), ops:
        out = GF.self_attention2d(*ins)
        grads = torch.autograd.grad(out.sum() if sum_grad else (out * go.float()).sum(), [ins[i] for i in live])
    assert out.dtype == torch.float32 and out.shape == ref.shape
    if layout == "nhwc":
        assert out.is_contiguous(memory_format=torch.channels_last)
    # one conv of d + d + C outputs and one convolution backward where the biases allow it
    stacked = bias != "mixed"
    assert ops.count("aten.convolution.default") == (1 if stacked else 3)
    assert ops.count("aten.convolution_backward.") == (1 if stacked else 3)
    if stacked and backend != "cpu" and layout != "strided":
        # the slices go to the kernels as views (a non-contiguous x is flattened by a copy, as before)
        assert not ops.count("aten.clone") and not ops.count("aten.contiguous"), ops.ops
    # elementwise bounds of the block (tests/_attention_bounds.py; a missing bias bounds as a zero one)
    pb = [torch.zeros(p64[i - 1].shape[0], dtype=torch.float64) if i in (1, 3, 5) and t is None else t
          for i, t in enumerate(p64)]
    bounds = self_attention_bounds(x64, *pb, go, input_dtype=torch.float32)
    assert_below(out, ref, bounds[0], name="out")
    names = ["x", "query_weight", "query_bias", "key_weight", "key_bias", "value_weight", "value_bias", "gamma"]
    for i, g, r in zip(live, grads, ref_grads):
        assert_below(g, r, bounds[1 + i], name=names[i])


def test_mismatched_weight_dtypes_are_refused_by_name(monkeypatch):
    """Weights of different dtypes do not stack (torch.cat would promote them), and the separate
    convs would refuse them: one error naming the argument instead."""
    _python_route(monkeypatch)
    x, p = _inputs(1, 16, 2, 3, "all", "nchw")
    p = [None if t is None else t.float() for t in p]
    p[2] = p[2].double()
    with pytest.raises(TypeError, match="key_weight is torch.float64 but x is torch.float32"):
        GF.self_attention2d(x.float(), *p)


@pytest.mark.parametrize("backend", backend_params(["torch", "triton", "cpu"]))
def test_gradient_penalty_through_the_stacked_route(monkeypatch, backend):
    """R1-style penalty (create_graph=True) through the stacked projection, fp32, vs the fp64
    reference: second derivatives of the conv + split reach every weight (with biases:
    test_attention's penalty test, whose route now stacks too)."""
    _python_route(monkeypatch)
    x64, p64 = _inputs(2, 16, 3, 4, "none", "nchw")

    def penalty(fn, dtype):
        xs = x64.to(dtype).requires_grad_()
        ps = [None if t is None else t.to(dtype).requires_grad_() for t in p64]
        y = fn(xs, *ps)
        y = y[0] if isinstance(y, tuple) else y
        (gx,) = torch.autograd.grad((y ** 2).sum(), xs, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), [xs] + [t for t in ps if t is not None])

    want = penalty(_sagan_reference, torch.float64)
    with on_backend(backend):
        got = penalty(GF.self_attention2d, torch.float32)
    # normwise (tests/_model_bounds.py), one scale for all (as test_attention's penalty test): the
    # block's 3 convs, 2 products and the softmax, differentiated twice: 4 x 6 stages; n the
    # longest reduction (16 channels, 12 keys, 2 x 12 pixels)
    scale = max(r.abs().max().item() for r in want)
    cen = Census.of(n_fwd=17, n=2 * 12, depth=4 * 6)
    for g, r in zip(got, want):
        assert_normwise(g, r, cen, scale=scale)


# ----------------------------------------------------------------------------- modules
def _biggan_pair(which_conv=nn.Conv2d, c=32):
    torch.manual_seed(4)
    ref = BigGANAttention(c, which_conv=which_conv)
    with torch.no_grad():
        ref.gamma.fill_(0.8)
    mod = gnn.BigGANSelfAttention2d.from_modules(ref.theta, ref.phi, ref.g, ref.o, ref.gamma)
    return mod, ref


def _check_biggan(mod, ref, x):
    """mod's out and gradients (fp32) vs ref's (same modules, the reference formula): normwise."""
    xs = x.clone().requires_grad_()
    ops = _Ops()
    with ops:
        out = mod(xs)
        got = torch.autograd.grad(out.square().sum(), [xs] + list(mod.parameters()))
    xr = x.clone().requires_grad_()
    with census(ref) as cen:
        want_out = ref(xr)
    want = torch.autograd.grad(want_out.square().sum(), [xr] + list(ref.parameters()))
    assert_normwise(out, want_out, cen)
    scale = max(t.abs().max().item() for t in want)
    for a, b in zip(got, want):   # (the upstream 2 out carries out's error: one more stage)
        assert_normwise(a, b, cen, scale=scale, backward=True, extra_depth=1)
    return ops


@pytest.mark.parametrize("hw", [(4, 6), (2, 2)])  # (odd sizes: test_attention's fp64 test)
def test_biggan_stacks_theta_phi_g_and_pools_once(hw):
    mod, ref = _biggan_pair()
    ops = _check_biggan(mod, ref, torch.randn(2, 32, *hw))
    # theta | phi | g: one conv; o: another; phi | g: one max_pool2d (with indices, for the backward)
    assert ops.count("aten.convolution.default") == 2
    assert ops.count("aten.max_pool2d_with_indices.default") == 1
    assert ops.count("aten.convolution_backward.") == 2


def test_biggan_sn_and_hooked_convs_run_as_modules():
    from torch.nn.utils.parametrizations import spectral_norm

    mod, ref = _biggan_pair(which_conv=lambda *a, **k: spectral_norm(nn.Conv2d(*a, **k)))
    ref.eval()   # (SN's power iteration would move u between the two calls)
    ops = _check_biggan(mod, ref, torch.randn(2, 32, 4, 4))
    assert ops.count("aten.convolution.default") == 4 and ops.count("aten.max_pool2d_with_indices.default") == 2
    mod, ref = _biggan_pair()
    seen = []
    mod.phi.register_forward_hook(lambda m, i, o: seen.append(1))
    ops = _check_biggan(mod, ref, torch.randn(2, 32, 4, 4))
    assert seen == [1, 1] and ops.count("aten.convolution.default") == 4   # (ref runs the hook too)


def test_sagan_module_off_the_cpu_entry_stacks(monkeypatch):
    """SelfAttention2d where the C++ block entry does not serve (here: the map requested above
    MAP_PATH_MAX_POSITIONS, the branch every non-CPU call takes): one stacked conv, the flash op."""
    import ganengine.nn.attention as nn_attention

    torch.manual_seed(0)
    mod = gnn.SelfAttention2d(16)
    with torch.no_grad():
        mod.gamma.fill_(0.7)
    x = torch.randn(2, 16, 17, 16)   # N = 272 > MAP_PATH_MAX_POSITIONS
    assert x.shape[2] * x.shape[3] > nn_attention.MAP_PATH_MAX_POSITIONS
    ops = _Ops()
    with ops:
        out, attn = mod(x, return_attention=True)
    assert ops.count("aten.convolution.default") == 1
    q = mod.query_conv, mod.key_conv, mod.value_conv
    want, want_attn = _sagan_reference(x.double(), *[t.double() for c_ in q for t in (c_.weight, c_.bias)],
                                       mod.gamma.double())
    with census(mod) as cen:
        mod(x)
    assert_normwise(out, want, cen)
    assert_normwise(attn, want_attn, cen)
