"""The spectral-norm Triton route's host-side caches: the backward's gradient table (cached on its
contents and device), the gradient layouts (matrix_layout on shape, strides and dim) and the
verdicts; a call with another gradient address, layout, dtype or device must never be served a
previous call's entry."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ganengine
from ganengine.ops import spectral_norm as ops
from tests._backends import on_backend
from tests._tolerance import bound


def test_grad_table_keyed_on_contents_and_device():
    K = pytest.importorskip("ganengine.kernels.spectral_norm")
    cpu, meta = torch.device("cpu"), torch.device("meta")
    rows = ((1024, 36, 36, 0, 1),)
    t1 = K._grad_table(rows, cpu)
    assert t1.tolist() == [[1024, 36, 36, 0, 1]] and t1.dtype == torch.int64
    assert K._grad_table(rows, cpu) is t1  # same contents: the cached table
    other = K._grad_table(((2048, 36, 36, 0, 1),), cpu)  # another gradient address
    assert other.tolist() == [[2048, 36, 36, 0, 1]]
    strided = K._grad_table(((1024, 4, 36, 1, 8),), cpu)  # same address, other strides
    assert strided.tolist() == [[1024, 4, 36, 1, 8]]
    assert K._grad_table(rows, meta).device == meta  # the device is part of the key
    for i in range(2 * K._GRAD_TABLES_MAX):  # bounded
        K._grad_table(((i, 1, 1, 0, 1),), cpu)
    assert len(K._GRAD_TABLES) <= K._GRAD_TABLES_MAX


def test_cached_matrix_layout_follows_strides_and_dim():
    w = torch.empty(6, 4, 3, 3)
    cl = w.contiguous(memory_format=torch.channels_last)
    for t in (w, cl, w.transpose(0, 1)):
        for d in (0, 1):
            assert ops._matrix_layout_cached(t.shape, t.stride(), d) == ops.matrix_layout(t.shape, t.stride(), d)
    assert ops._matrix_layout_cached(w.shape, w.stride(), 0) != ops._matrix_layout_cached(cl.shape, cl.stride(), 0)


def test_verdicts_follow_dtype_and_layout():
    a = ops._verdicts_cached(torch.device("cpu"), torch.float32, 4, 0, True, True)
    assert a["triton"] is None and set(a) == {"triton", "cpu"}
    half = ops._verdicts_cached(torch.device("cpu"), torch.float16, 4, 0, True, True)
    assert half["cpu"] is not None and half != a
    assert ops._verdicts_cached(torch.device("cpu"), torch.float32, 4, 0, True, False)["triton"] is not None


def test_backward_with_changing_gradient_layouts(need_triton_cpu):
    """Backward calls in a row with gradients at new addresses and in other layouts (dense,
    channels-last, stride-0) each read their own gradient: the same numbers as the torch formula
    from the same (u, v, sigma) within the error bound, and dense vs channels-last bit for bit."""
    torch.manual_seed(0)
    w = (0.05 * torch.randn(6, 4, 3, 3)).requires_grad_(True)
    u = F.normalize(torch.randn(6), dim=0)
    v = F.normalize(torch.randn(36), dim=0)
    g = torch.randn(6, 4, 3, 3)
    grads = [g, g.contiguous(memory_format=torch.channels_last), torch.ones(1).expand(6, 4, 3, 3), g.clone()]
    out = []
    with on_backend("triton"):
        for gy in grads:
            w_sn, _, sigma = ops.spectral_norm_weight(w, u, 1, 1e-12, v=v)
            (dw,) = torch.autograd.grad(w_sn, (w,), gy)
            out.append(dw)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[3])
    with on_backend("torch"):
        for gy, dw in zip(grads, out):
            w_sn, _, sigma = ops.spectral_norm_weight(w, u, 1, 1e-12, v=v)
            (ref,) = torch.autograd.grad(w_sn, (w,), gy)
            # two fp32 computations of dW = g / sigma + (g_sigma - <g, W> / sigma^2) u v^T: the
            # <g, W> sum (144 terms) and sigma's power iteration (reductions of 6 and 36 terms);
            # c = 2 (two results) x 4 (steps + 2 per computation, as test_spectral_norm's bounds)
            s = float(sigma.detach())
            scale = (float((gy.abs() * w.detach().abs()).sum()) / s ** 2 * float(u.abs().max() * v.abs().max())
                     + float(ref.abs().max()))
            assert float((dw - ref).abs().max()) <= bound(scale, n=144, acc_dtype=torch.float32, c=8.0)


@pytest.fixture
def need_triton_cpu():
    if not ganengine.backends.serves("triton", torch.device("cpu")):
        pytest.skip("triton cannot serve CPU tensors here (TRITON_INTERPRET not set)")
