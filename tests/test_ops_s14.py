"""Regressions of the ops family's acceptance round 14 (conv_act, norm_act, losses):

* parameters on another device (meta) or of a dtype F.conv2d / F.instance_norm refuse: a public error
  naming the argument on every route and backend, never a raw kernel reading another device's pointer;
* the mean losses under dynamic shapes: one graph for every batch size (torch.compile(dynamic=True)),
  torch.export with a dynamic batch, the same numbers as eager;
* make_fx(tracing_mode="symbolic") of each public op: the lean C++ entries take no symbolic sizes;
* the Triton launchers on an empty batch; gradient_penalty with a discriminator returning ();
  no var_mean warning on an empty batch (torch backend).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import ganengine
import ganengine.functional as GF
from ganengine import backends
from ganengine.ops import _dispatch
from ganengine.ops import losses as L
from tests._backends import backend_params, on_backend

BACKENDS = backend_params()


def _meta(t):
    return t.to("meta")


# ============================================================================= 1. device / dtype of parameters
@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_conv2d_act_bias_on_another_device_is_refused(backend):
    x, w, b = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)
    with ganengine.use_backend(backend):
        with pytest.raises(ValueError, match="conv2d_act: bias is on meta but x is on cpu"):
            GF.conv2d_act(x, w, _meta(b))
        with pytest.raises(ValueError, match="conv2d_act: bias is on meta but x is on cpu"):
            GF.conv2d_act(x.requires_grad_(), w, _meta(b), 2, 1, 0.0)
        torch.testing.assert_close(GF.conv2d_act(x, w, b), F.leaky_relu(F.conv2d(x, w, b), 0.2))


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
@pytest.mark.parametrize("name", ["bias", "norm_weight", "norm_bias"])
def test_conv2d_in_act_param_on_another_device_is_refused(backend, name):
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    good = {"bias": torch.randn(4), "norm_weight": torch.rand(4) + 0.5, "norm_bias": torch.randn(4)}
    with ganengine.use_backend(backend):
        with pytest.raises(ValueError, match=f"conv2d_instance_norm_act: {name} is on meta but x is on cpu"):
            GF.conv2d_instance_norm_act(x, w, **{name: _meta(good[name])})
        y = GF.conv2d_instance_norm_act(x, w, **{name: good[name]})
    ref = F.leaky_relu(F.instance_norm(F.conv2d(x, w), weight=good.get("norm_weight") if name == "norm_weight" else None,
                                       bias=good.get("norm_bias") if name == "norm_bias" else None), 0.2)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
@pytest.mark.parametrize("name", ["norm_weight", "norm_bias"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.float16])
def test_conv2d_in_act_param_dtype_as_instance_norm(backend, name, dtype):
    """F.instance_norm refuses a parameter of another dtype than the (fp32) conv output: so does the
    fused op, on every route (the lean entry would take any floating dtype)."""
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError):
        F.instance_norm(F.conv2d(x, w), **{name[5:]: torch.ones(4, dtype=dtype)})
    with ganengine.use_backend(backend):
        with pytest.raises(TypeError, match=f"conv2d_instance_norm_act: {name} must have x's dtype"):
            GF.conv2d_instance_norm_act(x, w, **{name: torch.ones(4, dtype=dtype)})


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
def test_conv2d_in_act_fp32_params_of_a_bf16_conv_are_taken(backend):
    """F.instance_norm's mixed mode: float32 parameters with a half / bfloat16 input, and under
    autocast the conv output's dtype decides."""
    if backend != "auto" and not backends.serves(backend, torch.device("cpu")):
        pytest.skip(f"{backend} unavailable")
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    g, b = torch.rand(4) + 0.5, torch.randn(4)
    with ganengine.use_backend(backend):
        y = GF.conv2d_instance_norm_act(x.bfloat16(), w.bfloat16(), None, 1, 0, g, b)
        with torch.autocast("cpu", torch.bfloat16):
            ya = GF.conv2d_instance_norm_act(x, w, None, 1, 0, g, b)
            with pytest.raises(TypeError, match="norm_weight must have x's dtype"):
                GF.conv2d_instance_norm_act(x, w, None, 1, 0, g.double(), b)
    ref = F.leaky_relu(F.instance_norm(F.conv2d(x, w), weight=g, bias=b), 0.2)
    assert y.dtype == ya.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)
    torch.testing.assert_close(ya.float(), ref, atol=0.1, rtol=0.05)


# ============================================================================= 2. losses under dynamic shapes
_LOSSES = {
    "gan_loss": lambda x: GF.gan_loss(x, True, "lsgan"),
    "gan_loss_list": lambda x: GF.gan_loss([x, x * 0.5], False, "vanilla"),
    "gan_loss_wgangp": lambda x: GF.gan_loss(x, True, "wgangp"),
    "discriminator_loss": lambda x: GF.discriminator_loss(x, x * 2, "hinge"),
    "cycle_loss": lambda x: GF.cycle_loss(x, x * 2, x, x * 3)[0],
    "cycle_loss_idt": lambda x: GF.cycle_loss(x, x * 2, x, x * 3, x * 0.5, x * 1.5)[0],
}


def _graph_counter():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return graphs, backend


@pytest.mark.parametrize("name", sorted(_LOSSES))
def test_loss_compiles_once_for_every_batch_size(name):
    f = _LOSSES[name]
    torch._dynamo.reset()
    graphs, backend = _graph_counter()
    cf = torch.compile(f, dynamic=True, backend=backend, fullgraph=True)
    for n in (2, 3, 5):
        x = torch.randn(n, 1, 6, 6)
        torch.testing.assert_close(cf(x), f(x), atol=1e-6, rtol=1e-6)
    assert len(graphs) == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["gan_loss", "gan_loss_wgangp", "discriminator_loss", "cycle_loss_idt"])
def test_loss_compiles_once_with_gradients(name):
    """aot_eager (forward and backward graphs): one compile for three batch sizes, eager's gradients."""
    from torch._dynamo.utils import counters

    f = _LOSSES[name]
    torch._dynamo.reset()
    counters.clear()
    cf = torch.compile(f, dynamic=True, backend="aot_eager", fullgraph=True)
    for n in (2, 3, 5):
        x = torch.randn(n, 1, 6, 6, requires_grad=True)
        (gc,) = torch.autograd.grad(cf(x), x)
        (ge,) = torch.autograd.grad(f(x), x)
        torch.testing.assert_close(gc, ge, atol=1e-7, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


class _Wrap(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


@pytest.mark.parametrize("name", ["gan_loss", "discriminator_loss", "cycle_loss"])
def test_loss_exports_with_a_dynamic_batch(name):
    from torch.export import Dim

    f = _LOSSES[name]
    ep = torch.export.export(_Wrap(f), (torch.randn(2, 1, 6, 6),), dynamic_shapes={"x": {0: Dim("n", min=2, max=64)}})
    for n in (2, 7):
        x = torch.randn(n, 1, 6, 6)
        torch.testing.assert_close(ep.module()(x), f(x), atol=1e-6, rtol=1e-6)


def test_loss_custom_ops_per_numel_opcheck():
    x = torch.randn(2, 1, 3, 3, requires_grad=True)
    torch.library.opcheck(L.adv_loss_op, ([x, x.detach() * 2], [L.BCE, L.LINEAR], [1.0, -1.0], [1.0, 0.5], True, True))
    p = [torch.randn(2, 3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    t = [torch.randn(2, 3, 4), torch.randn(5)]
    torch.library.opcheck(L.l1_loss_multi_op, (p, t, [10.0, 5.0], True))
    # the same numbers as the float scales
    total, _ = L.adv_loss_op([x], [L.MSE], [1.0], [0.5], False, True)
    assert torch.equal(total, L.adv_loss_op([x], [L.MSE], [1.0], [0.5 / x.numel()], False)[0])
    a, b = L.l1_loss_multi_op(p, t, [10.0, 5.0], True), L.l1_loss_multi_op(p, t, [10.0 / 24, 5.0 / 5])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ============================================================================= 3. make_fx symbolic
def _in_rs(x, rm, rv):
    return GF.instance_norm_act(x, None, None, rm, rv).mean()


_SYMBOLIC = {
    "instance_norm_act": (lambda x: GF.instance_norm_act(x).mean(), lambda n: (torch.randn(n, 3, 5, 7),)),
    "instance_norm_act_affine": (lambda x, g, b: GF.instance_norm_act(x, g, b, activation="relu").mean(),
                                 lambda n: (torch.randn(n, 3, 5, 7), torch.rand(3) + 0.5, torch.randn(3))),
    "conv2d_act": (lambda x, w, b: GF.conv2d_act(x, w, b, 1, 1).mean(),
                   lambda n: (torch.randn(n, 3, 5, 7), torch.randn(4, 3, 3, 3), torch.randn(4))),
    "conv2d_instance_norm_act": (lambda x, w, g, b: GF.conv2d_instance_norm_act(x, w, None, 2, 1, g, b).mean(),
                                 lambda n: (torch.randn(n, 3, 6, 6), torch.randn(4, 3, 4, 4), torch.rand(4) + 0.5,
                                            torch.randn(4))),
    "gan_loss": (lambda x: GF.gan_loss(x, True, "vanilla"), lambda n: (torch.randn(n, 1, 5, 5),)),
    "gan_loss_list": (lambda a, b: GF.gan_loss([a, b], True, "lsgan"),
                      lambda n: (torch.randn(n, 1, 5, 5), torch.randn(n, 1, 3, 3))),
    "discriminator_loss": (lambda a, b: GF.discriminator_loss(a, b, "vanilla"),
                           lambda n: (torch.randn(n, 1, 5, 5), torch.randn(n, 1, 5, 5))),
    "cycle_loss": (lambda a, b, c, d: GF.cycle_loss(a, b, c, d)[0],
                   lambda n: tuple(torch.randn(n, 3, 4, 4) for _ in range(4))),
    # (the other families' lean gates and routers: the same rule)
    "self_attention2d": (lambda x, qw, kw, vw, g: GF.self_attention2d(x, qw, None, kw, None, vw, None, g).mean(),
                         lambda n: (torch.randn(n, 8, 3, 5), torch.randn(2, 8, 1, 1), torch.randn(2, 8, 1, 1),
                                    torch.randn(8, 8, 1, 1), torch.full((1,), 0.5))),
    "batch_norm_act": (lambda x, g, b: GF.batch_norm_act(x, None, None, g, b).mean(),
                       lambda n: (torch.randn(n, 3, 5, 7), torch.rand(3) + 0.5, torch.randn(3))),
    "conditional_batch_norm_act": (lambda x, g, b: GF.conditional_batch_norm_act(x, g, b).mean(),
                                   lambda n: (torch.randn(n, 3, 5, 7), torch.rand(n, 3) + 0.5, torch.randn(n, 3))),
    "conv2d": (lambda x, w: GF.conv2d(x, w, None, 2, 1).mean(),
               lambda n: (torch.randn(n, 3, 8, 8), torch.randn(4, 3, 4, 4))),
    "conv3x3": (lambda x, w: GF.conv3x3(x, w).mean(), lambda n: (torch.randn(n, 4, 8, 8), torch.randn(4, 4, 3, 3))),
}


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
@pytest.mark.parametrize("name", sorted(_SYMBOLIC))
def test_make_fx_symbolic(name, backend):
    """A plain function calling the public op traces with symbolic shapes (the lean C++ entries,
    whose checks read sizes, take no symbolic sizes) and the graph serves another batch size."""
    from torch.fx.experimental.proxy_tensor import make_fx

    f, inputs = _SYMBOLIC[name]
    with ganengine.use_backend(backend):
        gm = make_fx(f, tracing_mode="symbolic")(*inputs(2))
        other = inputs(3)
        torch.testing.assert_close(gm(*other), f(*other), atol=1e-5, rtol=1e-5)


def test_make_fx_symbolic_instance_norm_running_stats():
    from torch.fx.experimental.proxy_tensor import make_fx

    rm, rv = torch.zeros(3), torch.ones(3)
    make_fx(_in_rs, tracing_mode="symbolic")(torch.randn(2, 3, 5, 7), rm, rv)


@pytest.mark.parametrize("name", ["conv2d_act", "conv2d_instance_norm_act", "instance_norm_act_affine", "gan_loss",
                                  "discriminator_loss"])
def test_lean_entries_take_plain_tensors_only(name):
    """A tensor with symbolic sizes (make_fx's FakeTensors; _eager.lean_ok) never reaches a C++
    entry: its ganengine_C op is not called while tracing."""
    from torch.fx.experimental.proxy_tensor import make_fx

    f, inputs = _SYMBOLIC[name]
    with ganengine.use_backend("cpu"):
        gm = make_fx(f, tracing_mode="symbolic")(*inputs(2))
    assert "ganengine_C" not in str(gm.graph) and "ganengine." in str(gm.graph)


# ============================================================================= 4. triton: empty batch
@pytest.mark.parametrize("impl", ["vendor", "igemm"])
@pytest.mark.parametrize("shape", [(0, 3, 8, 8)])
def test_triton_conv_in_act_empty_batch(impl, shape):
    if not backends.serves("triton", torch.device("cpu")):
        pytest.skip("triton unavailable")
    from ganengine.ops.conv_act import triton_conv_impl

    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(4, 3, 4, 4, requires_grad=True)
    g, b = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    with on_backend("triton"), triton_conv_impl(impl):
        y = GF.conv2d_instance_norm_act(x, w, None, 2, 1, g, b)
        y.sum().backward()
        y2 = GF.conv2d_act(x, w, b, 2, 1)
        y2.sum().backward()
    assert y.shape == y2.shape == (0, 4, 4, 4) and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(g.grad, torch.zeros(4))
    assert torch.equal(b.grad, torch.zeros(4))


@pytest.mark.parametrize("shape", [(0, 3, 5, 5), (2, 0, 5, 5), (0, 0, 5, 5), (2, 3, 0, 5)])
def test_triton_norm_act_launchers_on_empty_inputs(shape):
    if not backends.serves("triton", torch.device("cpu")):
        pytest.skip("triton unavailable")
    K = _dispatch.triton_kernels("norm_act")
    x = torch.randn(*shape)
    y, mean, rstd = K.forward(x, None, None, 1e-5, True, 0.2)
    assert y.shape == x.shape and mean.shape == rstd.shape == shape[:2]
    dx, dw, db = K.backward(torch.randn(*shape), x, None, None, mean, rstd, True, 0.2)
    assert dx.shape == x.shape and dw.shape == db.shape == shape[:2]
    K.pick_config(shape[0], shape[1], shape[2] * shape[3], False, 4, 1)  # (no ZeroDivisionError)
    with on_backend("triton"):
        xg = x.clone().requires_grad_()
        out = GF.instance_norm_act(xg)
        out.sum().backward()
    assert out.shape == x.shape and xg.grad.shape == x.shape


# ============================================================================= 5. gradient_penalty
@pytest.mark.parametrize("out", [(), []])
def test_gradient_penalty_discriminator_returning_nothing(out):
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"gradient_penalty: the discriminator returned an empty (tuple|list)"):
        GF.gradient_penalty(lambda t: out, x, x)


# ============================================================================= 6. empty batch, no warning
@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_conv2d_in_act_empty_batch_warns_nothing(backend):
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 4, 4, requires_grad=True)
    with ganengine.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("error")
        y = GF.conv2d_instance_norm_act(x, w, None, 2, 1)
        y.sum().backward()
        # the torch composition (double backward, negative slopes) too
        y2 = GF.conv2d_instance_norm_act(x, w, None, 2, 1, negative_slope=-0.1)
    # eager: F.instance_norm of the empty conv output is empty, without a warning
    ref = F.leaky_relu(F.instance_norm(F.conv2d(x, w, None, 2, 1)), 0.2)
    assert y.shape == y2.shape == ref.shape == (0, 4, 4, 4)
    assert torch.equal(w.grad, torch.zeros_like(w))
