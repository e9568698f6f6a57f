"""conv2d_act's C++ autograd frees the saved output and the incoming gradient before the
convolution's backward runs, as eager's graph frees LeakyReLU's (csrc/cpu/conv_act_autograd.cpp:
conv_act_bwd's halves, its overloads .act / .conv, with the output dropped between them): a live
extra output-sized buffer there made oneDNN's buffers fault in fresh pages on every call. The
gradients are bit for bit the one-op backward's (conv_act_bwd), and everything else autograd
promised (retain_graph, create_graph, in-place checks, saved-tensor hooks) holds as before.

Also conv_in_act_bwd (conv + instance norm + act) reads a stride-0 incoming gradient (from
``.sum()``) in place, as conv_act_bwd does."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ganengine
import ganengine.functional as GF
from ganengine import _ext

pytestmark = pytest.mark.skipif(not _ext.loaded(), reason="needs the compiled extension ganengine._C")

STRIDE, PADDING, SLOPE = [2, 2], [1, 1], 0.2


def _inputs(dtype=torch.float32, layout="contiguous", n=2, cin=3, cout=6, hw=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, hw, hw, generator=g).to(dtype)
    w = (torch.randn(cout, cin, 4, 4, generator=g) * 0.3).to(dtype)
    b = (torch.randn(cout, generator=g) * 0.1).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, b


def _alive(handle) -> bool:
    return not torch.UntypedStorage._expired(handle)


class _BackwardKernels(TorchDispatchMode):
    """Records each ganengine_C call (the C++ backward's kernels) with whether the watched storages
    were alive when it started; the first call's first argument (the incoming gradient) is watched
    too from then on."""

    def __init__(self, watched: dict):
        super().__init__()
        self.watched, self.calls = dict(watched), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "ganengine_C":
            if not self.calls:
                self.watched["grad"] = args[0].untyped_storage()._weak_ref()
            self.calls.append((func.name(), {k: _alive(h) for k, h in self.watched.items()}))
        return func(*args, **(kwargs or {}))

    def release(self):
        for h in self.watched.values():
            torch.UntypedStorage._free_weak_ref(h)


def _run_watched(x, w, b, retain_graph=False):
    """conv2d_act forward, then a loss that does not save y (its gradient is a fresh dense tensor);
    the backward's kernel calls with the liveness of y and of the incoming gradient at each."""
    with ganengine.use_backend("cpu"):
        y = GF.conv2d_act(x, w, b, 2, 1, SLOPE)
    scale = torch.linspace(0.5, 1.5, y.numel()).view_as(y)
    loss = (y * scale).sum()
    mode = _BackwardKernels({"y": y.untyped_storage()._weak_ref()})
    del y
    try:
        with mode:
            loss.backward(retain_graph=retain_graph)
        return mode.calls, loss
    finally:
        mode.release()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_output_and_grad_freed_before_the_convolution_backward(layout, bias):
    x, w, b = _inputs(layout=layout)
    x.requires_grad_()
    w.requires_grad_()
    calls, _ = _run_watched(x, w, b if bias else None)
    names = [n for n, _ in calls]
    assert names, "the backward called no ganengine_C kernel"
    name, alive = calls[-1]  # the convolution's backward: the last kernel call
    assert not alive["y"], f"the saved output is still alive when {name} starts ({names})"
    assert not alive["grad"], f"the incoming gradient is still alive when {name} starts ({names})"
    assert x.grad is not None and w.grad is not None


def test_retain_graph_keeps_the_output_and_gives_the_same_gradients():
    x, w, b = _inputs()
    x.requires_grad_()
    calls, loss = _run_watched(x, w, b, retain_graph=True)
    assert calls[-1][1]["y"]  # kept for the next backward
    first = x.grad.clone()
    x.grad = None
    loss.backward()  # the second backward reads the kept output
    assert torch.equal(x.grad, first)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True), (False, False, True)],
                         ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grad_kind", ["dense", "sum"])
def test_gradients_bitwise_the_one_op_backwards(dtype, layout, mask, grad_kind):
    """Through the C++ entry (two halves, output dropped between them) = conv_act_bwd in one op."""
    x0, w0, b0 = _inputs(dtype, layout, seed=1)
    x, w, b = (t.detach().clone(memory_format=torch.preserve_format).requires_grad_(m) for t, m in
               zip((x0, w0, b0), mask))
    with ganengine.use_backend("cpu"):
        y = GF.conv2d_act(x, w, b, 2, 1, SLOPE)
    assert "ConvActFn" in y.grad_fn.name()  # (the C++ entry's node)
    g = torch.ones((), dtype=dtype).expand_as(y) if grad_kind == "sum" else torch.randn_like(y)
    y_ref = torch.ops.ganengine_C.conv_act_fwd(x0, w0, b0, STRIDE, PADDING, SLOPE)
    assert torch.equal(y.detach(), y_ref)
    want = torch.ops.ganengine_C.conv_act_bwd(g, x0, w0, y_ref, STRIDE, PADDING, SLOPE, list(mask))
    y.backward(g)
    for t, wanted, e in zip((x, w, b), mask, want):
        if wanted:
            assert t.grad.dtype == e.dtype and t.grad.shape == e.shape and t.grad.stride() == e.stride()
            assert torch.equal(t.grad, e), (t.grad - e).abs().max()


def test_inplace_change_of_the_output_is_still_caught():
    x, w, b = _inputs()
    x.requires_grad_()
    with ganengine.use_backend("cpu"):
        y = GF.conv2d_act(x, w, b, 2, 1, SLOPE)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_saved_tensor_hooks_see_the_output():
    """Under saved-tensor hooks (checkpointing, offloading) the output is saved through them, as
    before, and the gradients are unchanged."""
    x, w, b = _inputs()
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t

    def grads(hooks):
        xr = x.detach().clone().requires_grad_()
        with ganengine.use_backend("cpu"):
            if hooks:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    y = GF.conv2d_act(xr, w, b, 2, 1, SLOPE)
            else:
                y = GF.conv2d_act(xr, w, b, 2, 1, SLOPE)
        y.sum().backward()
        return xr.grad

    plain = grads(False)
    assert torch.equal(grads(True), plain)
    assert (2, 6, 6, 6) in packed  # the output went through the hook


def test_create_graph_without_retain_and_double_backward():
    """create_graph=True, retain_graph=False: the output is dropped, the double backward (the torch
    composition's) still runs; fp64 gradgradcheck through the entry."""
    x, w, b = _inputs(torch.float64, n=1, cin=2, cout=3, hw=6, seed=2)
    x.requires_grad_()
    w.requires_grad_()
    with ganengine.use_backend("cpu"):
        y = GF.conv2d_act(x, w, b, 2, 1, SLOPE)
        (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True, retain_graph=False)
        gx.square().sum().backward()
        ref_x, ref_w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        yr = torch.nn.functional.leaky_relu(torch.nn.functional.conv2d(ref_x, ref_w, b, 2, 1), SLOPE)
        (gr,) = torch.autograd.grad(yr.sum(), ref_x, create_graph=True)
        gr.square().sum().backward()
        torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-12, atol=1e-12)
        fn = lambda a, c: GF.conv2d_act(a, c, b, 2, 1, SLOPE)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w))
        assert torch.autograd.gradgradcheck(fn, (x, w))


# ----------------------------------------------------------------------------- conv_in_act_bwd, stride-0 grad
def _in_bwd(grad, x, w, fwd, gamma, beta, mask=(True, True)):
    _, c, mean, rstd = fwd
    return torch.ops.ganengine_C.conv_in_act_bwd(grad, x, w, c, mean, rstd, gamma, beta, STRIDE, PADDING, SLOPE,
                                                 list(mask))


def _in_fwd(x, w, gamma, beta):
    return torch.ops.ganengine_C.conv_in_act_fwd(x, w, gamma, beta, STRIDE, PADDING, 1e-5, SLOPE)


def _copies(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name in ("aten::copy_", "aten::clone") for e in prof.events())


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_in_act_uniform_grad_matches_dense_bitwise(dtype, layout, affine):
    x, w, b = _inputs(dtype, layout, hw=18, seed=3)
    gamma, beta = (1 + b, b * 0.5) if affine else (None, None)
    fwd = _in_fwd(x, w, gamma, beta)
    uniform = torch.tensor(0.75, dtype=dtype).expand_as(fwd[0])
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    got, want = _in_bwd(uniform, x, w, fwd, gamma, beta), _in_bwd(uniform.contiguous(memory_format=fmt), x, w, fwd,
                                                                   gamma, beta)
    for a, e in zip(got, want):
        assert a.dtype == e.dtype and a.shape == e.shape and torch.equal(a, e)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_act_uniform_grad_read_in_place(dtype, layout):
    """No full-size copy of a stride-0 gradient: no more copies than with a dense one."""
    x, w, b = _inputs(dtype, layout, n=4, cout=8, hw=18, seed=4)
    fwd = _in_fwd(x, w, 1 + b[:8], None)
    dense = torch.ones_like(fwd[0])
    uniform = torch.ones((), dtype=dtype).expand_as(fwd[0])
    n_uniform = _copies(lambda: _in_bwd(uniform, x, w, fwd, 1 + b[:8], None, (False, True)))
    n_dense = _copies(lambda: _in_bwd(dense, x, w, fwd, 1 + b[:8], None, (False, True)))
    assert n_uniform <= n_dense, (n_uniform, n_dense)


def test_in_act_uniform_grad_with_storage_offset_and_other_dtype():
    x, w, b = _inputs(seed=5)
    fwd = _in_fwd(x, w, None, b)
    shape = fwd[0].shape
    offset = torch.tensor([9.0, -1.5, 3.0])[1:2].view(()).expand(shape)
    want = _in_bwd(torch.full(shape, -1.5), x, w, fwd, None, b)
    for a, e in zip(_in_bwd(offset, x, w, fwd, None, b), want):
        assert torch.equal(a, e)
    other = torch.tensor(0.5, dtype=torch.float64).expand(shape)
    for a, e in zip(_in_bwd(other, x, w, fwd, None, b), _in_bwd(torch.full(shape, 0.5), x, w, fwd, None, b)):
        assert torch.equal(a, e)


def test_in_act_sum_backward_through_the_module_matches_explicit_ones():
    x0, _, _ = _inputs(seed=6, hw=16)
    m = ganengine.nn.Conv2dInstanceNormAct(3, 6, 4, 2, 1, affine=True)

    def run(sum_backward):
        m.zero_grad()
        x = x0.detach().clone().requires_grad_()
        with ganengine.use_backend("cpu"):
            y = m(x)
        y.sum().backward() if sum_backward else y.backward(torch.ones_like(y))
        return [x.grad, m.weight.grad, m.norm_weight.grad, m.norm_bias.grad]

    for a, e in zip(run(True), run(False)):
        assert torch.equal(a, e)
