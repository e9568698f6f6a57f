"""conv_act on the CUDA path's route (the Triton backend's Python, checked on CPU tensors under the
Triton interpreter): no more kernels per call than the eager ops it replaces, and the bias
gradient taken from the convolution's own backward launch (no reduction op of its own)."""
import pytest
import torch
import torch.nn.functional as F

import ganengine
import ganengine.functional as GF
from ganengine.backends import strict
from ganengine.ops import conv_act as ops
from tests.test_conv_act import _bounds, _compare, _run

pytestmark = pytest.mark.skipif(not ganengine.backends.available()["triton"],
                                reason="needs the Triton backend (TRITON_INTERPRET=1 on CPU)")


def _counts(fn, ref, tensors, impl):
    """(fused kernels, eager kernels) of forward + backward: Triton launches plus the aten ops
    issued around them (each one kernel on a GPU) against the eager composition's aten ops."""
    from ganengine.bench.traffic import EagerTraffic, TritonTraffic

    def fwd_bwd(f):
        ins = [t.detach().clone().requires_grad_() for t in tensors]
        y = f(*ins)
        torch.autograd.grad(y, ins, torch.ones_like(y))

    with ganengine.use_backend("triton"), strict(), ops.triton_conv_impl(impl), TritonTraffic() as tt, \
            EagerTraffic(skip_namespaces=("ganengine", "ganengine_C")) as around:
        fwd_bwd(fn)
    with EagerTraffic() as eager:
        fwd_bwd(ref)
    assert tt.launches  # (the route ran the Triton kernels)
    return len(tt.launches) + around.num_kernels, eager.num_kernels


@pytest.mark.parametrize("impl", ["igemm", "vendor"])
@pytest.mark.parametrize("norm", [False, True], ids=["act", "in_act"])
def test_kernels_per_call_no_more_than_eager(impl, norm):
    torch.manual_seed(0)
    x, w, b = torch.randn(1, 3, 9, 9), torch.randn(4, 3, 4, 4) * 0.3, torch.randn(4)
    if norm:
        fn = lambda x, w: GF.conv2d_instance_norm_act(x, w, None, 2, 1)  # noqa: E731
        ref = lambda x, w: F.leaky_relu(F.instance_norm(F.conv2d(x, w, None, 2, 1)), 0.2)  # noqa: E731
        fused, eager = _counts(fn, ref, (x, w), impl)
    else:
        fn = lambda x, w, b: GF.conv2d_act(x, w, b, 2, 1)  # noqa: E731
        ref = lambda x, w, b: F.leaky_relu(F.conv2d(x, w, b, 2, 1), 0.2)  # noqa: E731
        fused, eager = _counts(fn, ref, (x, w, b), impl)
    # conv2d_act: 4 either way (igemm: conv+act, act grad, dgrad, wgrad + bias grad; vendor:
    # conv, bias+act, act grad, convolution_backward); the bias partials' sum made it 5
    assert fused <= eager, (fused, eager)


@pytest.mark.parametrize("impl", ["igemm", "vendor"])
@pytest.mark.parametrize("wanted", ["x,b", "w,b", "b"])
def test_bias_grad_with_any_mask(impl, wanted):
    """Every mix of wanted gradients with the bias's (the implicit GEMM takes the bias gradient from
    its weight-gradient launch, or from the activation-gradient kernel's partials when dw is not
    wanted; the vendor route from convolution_backward) within the fp64 reference's bounds."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 9, 11).requires_grad_("x" in wanted)
    wt = (torch.randn(5, 3, 4, 4) * 0.2).requires_grad_("w" in wanted)
    b = torch.randn(5).requires_grad_()
    g = torch.randn(2, 5, 4, 5)
    out, grads = _run("triton", impl, GF.conv2d_act, (x, wt, b), lambda y: (y * g).sum(), stride=2, padding=1)
    ref_out, ref_grads = _run("torch", None, ops.reference_conv2d_act, [t.double() for t in (x, wt, b)],
                              lambda y: (y * g.double()).sum(), stride=2, padding=1, negative_slope=0.2)
    assert [gr is None for gr in grads] == [gr is None for gr in ref_grads]
    _compare(out, grads, ref_out, ref_grads, _bounds("triton", (x, wt, b), g, 2, 1, False), "triton")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_vendor_route_gradients_are_eagers(channels_last):
    """fp32 on the vendor route: the activation gradient is eager's leaky_relu_backward to the bit,
    and dx, dw and the bias gradient come from the same convolution_backward call eager's
    autograd makes, so they are eager's bits (the forward only within bounds: the bias is added
    by our epilogue, not inside the convolution)."""
    torch.manual_seed(2)
    x = torch.randn(3, 5, 7, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(7, 5, 4, 4) * 0.2, torch.randn(7)
    g = torch.randn(3, 7, 3, 3)
    res = {}
    for route in ("eager", "vendor"):
        ins = [t.clone().requires_grad_() for t in (x, w, b)]
        with ganengine.use_backend("triton"), strict(), ops.triton_conv_impl("vendor"):
            if route == "vendor":
                y = GF.conv2d_act(*ins, 2, 1, 0.2)
            else:
                y = F.leaky_relu(F.conv2d(*ins, 2, 1), 0.2)
            res[route] = (y.detach(), torch.autograd.grad(y, ins, g))
    (y_e, g_e), (y_v, g_v) = res["eager"], res["vendor"]
    assert torch.equal(y_e > 0, y_v > 0)  # (the activation's gradient depends on the sign only)
    for a, r in zip(g_v, g_e):
        assert a.dtype == r.dtype and a.shape == r.shape and torch.equal(a, r)


def test_conv_impl_from_the_environment(monkeypatch):
    """GANENGINE_CONV_IMPL, read from os.environ's dict per call (cached per raw value): a change
    takes effect at once, a bad value raises every time, triton_conv_impl takes precedence."""
    from ganengine.settings import SettingError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for value, want in (("vendor", "vendor"), ("igemm", "igemm"), ("auto", "igemm"), ("", "igemm")):
        monkeypatch.setenv("GANENGINE_CONV_IMPL", value)
        assert ops._resolved_conv_impl(cpu) == want, value
    monkeypatch.delenv("GANENGINE_CONV_IMPL")
    assert ops._resolved_conv_impl(cpu) == "igemm" and ops._resolved_conv_impl(cuda) == "vendor"
    monkeypatch.setenv("GANENGINE_CONV_IMPL", "cudnn")
    for _ in range(2):
        with pytest.raises(SettingError, match="GANENGINE_CONV_IMPL"):
            ops._resolved_conv_impl(cpu)
    with ops.triton_conv_impl("vendor"):
        assert ops._resolved_conv_impl(cpu) == "vendor"
