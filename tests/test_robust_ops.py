"""Regression tests of issue 22's lost autograd graphs and unclear errors in the ops: zero-size
inputs, momentum=None, convolutions with 0 output channels, a tensor lambda in cycle_loss,
gradient_penalty on 0-dim input or an empty discriminator output."""
import pytest
import torch
import torch.nn.functional as F

import ganengine.functional as GF
from ganengine.ops import conv as cv

from tests._backends import backend_params, on_backend

BACKENDS = backend_params(["torch", "cpu"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["conv2d", "conv2d_act", "conv3x3"])
def test_conv_with_no_input_channels_backward(backend, op):
    # issue: backward with C_in = 0 failed on the bias gradient (ATen's output has 0 channels)
    x = torch.randn(2, 0, 6, 6, requires_grad=True)
    w = torch.randn(4, 0, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    ye = F.conv2d(x, w, b, padding=1)
    if op == "conv2d_act":
        ye = F.leaky_relu(ye, 0.2)
    ge = torch.autograd.grad(ye.sum(), (x, w, b))
    with on_backend(backend):
        fn = getattr(GF, op)
        y = fn(x, w, b, padding=1) if op != "conv3x3" else fn(x, w, b, 1)
        g = torch.autograd.grad(y.sum(), (x, w, b))
    assert y.shape == ye.shape
    for a, e in zip(g, ge):
        assert a.shape == e.shape and torch.equal(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4)])
def test_instance_norm_act_empty_keeps_graph(backend, shape):
    # issue: N = 0 or C = 0 returned a tensor without grad_fn (H = 0: ZeroDivisionError on triton)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.ones(shape[1], requires_grad=True)
    b = torch.zeros(shape[1], requires_grad=True)
    with on_backend(backend):
        y = GF.instance_norm_act(x, w, b)
        assert y.shape == x.shape and y.grad_fn is not None
        gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    assert gx.shape == x.shape and torch.count_nonzero(gw) == 0 and torch.count_nonzero(gb) == 0


def test_instance_norm_momentum_none_is_a_clear_error():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="momentum must be a float.*got None"):
        GF.instance_norm_act(x, running_mean=torch.zeros(3), running_var=torch.ones(3), momentum=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["always", "auto"])
def test_conv_zero_output_channels_is_a_clear_error(backend, policy):
    # issue: the GEMM route ("always") said "cannot reshape tensor of 0 elements"
    with on_backend(backend), cv.gemm_policy(policy):
        with pytest.raises(ValueError, match=r"conv2d: weight .*\(0, 3, 4, 4\) has 0 output channels"):
            GF.conv2d(torch.randn(1, 3, 8, 8), torch.randn(0, 3, 4, 4))
        with pytest.raises(ValueError, match="smaller than the"):
            GF.conv2d(torch.randn(1, 3, 2, 2), torch.randn(4, 3, 4, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("synthesized", [False, True])
def test_cycle_loss_tensor_lambda_keeps_its_gradient(backend, synthesized):
    # issue: a tensor lambda (scheduled / learned) was turned into a float: no gradient
    torch.manual_seed(0)
    ims = [torch.randn(2, 3, 5, 5) for _ in range(8)]
    lam_a = torch.tensor(10.0, requires_grad=True)
    lam_b = torch.tensor(4.0, requires_grad=True)
    l1 = [F.l1_loss(ims[1], ims[0]), F.l1_loss(ims[3], ims[2]), F.l1_loss(ims[4], ims[2]), F.l1_loss(ims[5], ims[0])]
    # d total / d lambda_a = cycle_a + idt_b * lambda_identity, d / d lambda_b = cycle_b + idt_a * lambda_identity
    want = (l1[0] + 0.5 * l1[3], l1[1] + 0.5 * l1[2])
    with on_backend(backend):
        if synthesized:
            total, terms = GF.cycle_synthesized_loss(*ims[:4], ims[6], ims[7], ims[4], ims[5], lambda_a=lam_a,
                                                     lambda_b=lam_b)
        else:
            total, terms = GF.cycle_loss(*ims[:6], lambda_a=lam_a, lambda_b=lam_b)
        ga, gb = torch.autograd.grad(total, (lam_a, lam_b))
    torch.testing.assert_close(ga, want[0].detach())
    torch.testing.assert_close(gb, want[1].detach())
    torch.testing.assert_close(terms["cycle_a"].detach(), (10.0 * l1[0]).detach())


def test_gradient_penalty_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="real must be a non-empty batch"):
        GF.gradient_penalty(lambda x: x * 2, torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(ValueError, match="discriminator returned an empty tensor"):
        GF.gradient_penalty(lambda x: x[:0], torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="does not depend on its input"):
        GF.gradient_penalty(lambda x: torch.zeros(2), torch.randn(2, 3), torch.randn(2, 3))
    lin = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match="does not depend on its input .does it detach"):
        GF.gradient_penalty(lambda x: lin(x.detach()), torch.randn(2, 3), torch.randn(2, 3))
    real, fake, d = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5), lambda x: x.sum((1, 2, 3))
    for alpha in (torch.rand(4), torch.rand(3, 1, 1, 1), "0.5"):  # ((4,) would broadcast along W)
        with pytest.raises(ValueError, match=r"alpha must be a number or a tensor of real's rank .*\(4, 1, 1, 1\)"):
            GF.gradient_penalty(d, real, fake, alpha=alpha)
    for alpha in (0.5, torch.rand(4, 1, 1, 1), torch.rand(1, 3, 1, 1), torch.tensor(0.3)):
        GF.gradient_penalty(d, real, fake, alpha=alpha)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_argument_errors_name_the_argument(backend):
    """A kernel larger than the padded input, a bias of another dtype than x (F.conv2d refuses
    both), and the attention block's dtypes: one error naming the argument on every route."""
    with on_backend(backend):
        x, w = torch.randn(1, 4, 2, 2), torch.randn(6, 4, 4, 4)
        for fn, call in (("conv2d_act", lambda: GF.conv2d_act(x, w)),
                         ("conv2d_instance_norm_act", lambda: GF.conv2d_instance_norm_act(x, w)),
                         ("conv2d", lambda: GF.conv2d(x, w))):
            with pytest.raises(ValueError, match=rf"{fn}: input \(1, 4, 2, 2\) with padding \(0, 0\) is smaller"):
                call()
        x, w, b = torch.randn(1, 4, 6, 6), torch.randn(6, 4, 3, 3), torch.randn(6, dtype=torch.float64)
        for call in (lambda: GF.conv2d_act(x, w, b), lambda: GF.conv2d(x, w, b, padding=1),
                     lambda: GF.conv2d_instance_norm_act(x, w, b), lambda: GF.conv3x3(x, w, b),
                     lambda: GF.conv_transpose2d(x, w.transpose(0, 1).contiguous(), b)):
            with pytest.raises(TypeError, match="x is torch.float32 but bias is torch.float64"):
                call()
        x = torch.randn(1, 16, 2, 2)
        qw, kw, vw, g = torch.randn(2, 16), torch.randn(2, 16), torch.randn(16, 16), torch.tensor([0.5])
        with pytest.raises(TypeError, match="query_weight is torch.float64 but x is torch.float32"):
            GF.self_attention2d(x, qw.double(), None, kw, None, vw, None, g)
        with pytest.raises(TypeError, match="value_bias is torch.float64 but x is torch.float32"):
            GF.self_attention2d(x, qw, None, kw, None, vw, torch.randn(16, dtype=torch.float64), g)
        with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
            GF.self_attention2d(torch.randint(0, 2, (1, 16, 2, 2)), qw, None, kw, None, vw, None, g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,p_dtype,ok", [
    (torch.float32, torch.float64, False), (torch.float64, torch.float32, False),
    (torch.float32, torch.bfloat16, False), (torch.float16, torch.bfloat16, False),
    (torch.bfloat16, torch.float32, True), (torch.float16, torch.float32, True), (torch.float64, torch.float64, True)])
def test_norm_parameter_dtypes_as_torch(backend, x_dtype, p_dtype, ok):
    """The norms' parameters (and batch norm's running statistics) take x's dtype, or float32 for a
    half / bfloat16 x, as F.batch_norm / F.instance_norm do; anything else is a TypeError naming the
    argument on every backend (the cpu backend's C++ entries once computed such calls)."""
    x = torch.randn(2, 3, 4, 4, dtype=x_dtype)
    p = torch.ones(3, dtype=p_dtype)
    calls = {
        "batch_norm_act weight": (lambda: GF.batch_norm_act(x, None, None, p, None), "weight"),
        "batch_norm_act running_var": (lambda: GF.batch_norm_act(x, torch.zeros(3, dtype=p_dtype), p), "running_mean"),
        "instance_norm_act bias": (lambda: GF.instance_norm_act(x, None, p), "bias"),
    }
    torch_calls = {
        "batch_norm_act weight": lambda: F.batch_norm(x, None, None, p, None, training=True),
        "batch_norm_act running_var": lambda: F.batch_norm(x, torch.zeros(3, dtype=p_dtype), p, training=True),
        "instance_norm_act bias": lambda: F.instance_norm(x, bias=p),
    }
    for name, (call, arg) in calls.items():
        with on_backend(backend):
            if ok:
                assert call().dtype == x_dtype, name
            else:
                with pytest.raises(TypeError, match=f"{arg} must have x's dtype"):
                    call()
        if ok:
            torch_calls[name]()
        else:  # (torch raises too: the rule is its rule)
            with pytest.raises(RuntimeError):
                torch_calls[name]()


def _raw_kernel_cases():
    import ganengine.ops.conv  # noqa: F401 (their fakes register with their families)
    import ganengine.ops.losses  # noqa: F401
    import ganengine.ops.spectral_norm  # noqa: F401

    op = torch.ops.ganengine_C
    w = torch.randn(8, 4, 3, 3)
    u, v = F.normalize(torch.randn(8), dim=0), F.normalize(torch.randn(36), dim=0)
    outs = op.spectral_norm_fwd([w], [u], [v], 0, 2, 1e-12, False)
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    wc = torch.randn(4, 3, 4, 4)
    y = op.conv_fwd(x, wc, None, [2, 2], [1, 1], [0, 0], False)
    p, t = [torch.randn(1, 3, 5, 5), torch.randn(1, 3, 5, 5)], [torch.randn(1, 3, 5, 5), torch.randn(1, 3, 5, 5)]
    return {
        "spectral_norm_fwd": (op.spectral_norm_fwd, ([w], [u.clone()], [v.clone()], 0, 2, 1e-12, False)),
        "spectral_norm_bwd": (op.spectral_norm_bwd, ([torch.randn_like(w)], torch.zeros(1), [w], outs[1], outs[2],
                                                     outs[3])),
        "losses_l1_fwd grad": (op.losses_l1_fwd, (p, t, [1.0, 2.0], True)),
        "losses_l1_fwd": (op.losses_l1_fwd, (p, t, [1.0, 2.0], False)),
        "losses_adv_fwd": (op.losses_adv_fwd, ([torch.randn(2, 1, 6, 6)] * 2, [1, 4], [1.0, 1.0], [0.5, 0.5], False)),
        "conv_fwd channels_last": (op.conv_fwd, (x, wc, None, [2, 2], [1, 1], [0, 0], False)),
        "conv_bwd channels_last": (op.conv_bwd, (torch.randn_like(y), x, wc, [2, 2], [1, 1], [0, 0], False,
                                                 [True, True, True])),
    }


@pytest.mark.parametrize("name", ["spectral_norm_fwd", "spectral_norm_bwd", "losses_l1_fwd grad", "losses_l1_fwd",
                                  "losses_adv_fwd", "conv_fwd channels_last", "conv_bwd channels_last"])
def test_raw_kernels_fakes_match_the_kernels(name):
    """The C++ kernels the lean entries call through the dispatcher: each has a fake (a FakeTensorMode
    trace of an entry reaches them), with the kernel's shapes, dtypes and strides (opcheck's schema
    and fake-tensor tests). Three had no fake; conv's gave contiguous strides for a channels_last x;
    losses_adv_fwd's real output held an undefined tensor where the fake had an empty one."""
    from ganengine import _ext

    if not _ext.loaded():
        pytest.skip("ganengine._C not built")
    op, args = _raw_kernel_cases()[name]
    utils = ("test_schema", "test_faketensor")
    if name == "spectral_norm_fwd":  # (mutates its state lists: its aot tests pass too, through its
        # Functionalize kernel; tests/test_kernels_s19.py runs them on every plan)
        from torch.testing._internal.optests.generate_tests import ALL_TEST_UTILS

        utils = tuple(ALL_TEST_UTILS)
    result = torch.library.opcheck(op, args, test_utils=utils)
    assert set(result.values()) == {"SUCCESS"}, result
