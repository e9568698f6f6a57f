"""The Triton launcher's cached launch plans (kernels/batch_norm_act.py ``_fwd_plan`` /
``_bwd_plan``): a plan is cached per call signature (shape, strides, dtype, flags, which optional
tensors are given, GPU or interpreter planning), so a call of another shape, dtype, layout or
device must get its own plan, never a previous call's; and the eager route that skips _TritonFn
when no graph is recorded gives _TritonFn's numbers and running statistics."""
from __future__ import annotations

import pytest
import torch

import ganengine
from ganengine.ops import batch_norm_act as ops
from tests._backends import on_backend

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


def _tk():
    from ganengine.kernels import batch_norm_act as tk

    return tk


def _fwd(x, flags=3, gpu=False, split=None):
    return _tk()._fwd_plan(x.shape, x.stride(), x.dtype, flags, True, True, True, True, gpu, split)


def test_forward_plan_follows_shape_dtype_layout_and_device():
    tk = _tk()
    a = torch.empty(2, 4, 4, 4)
    pa = _fwd(a)
    grid, head, tail, kwargs, partial, stats_shape, acc_t = pa
    assert head == (2, 4, 16, 64, 16, 1, 0) and stats_shape == (3, 4) and acc_t is torch.float32
    assert [k["PHASE"] for k in kwargs] == [0] and kwargs[0]["ACC"] is tl.float32
    # another shape after a cached one: its own sizes
    pb = _fwd(torch.empty(3, 5, 2, 7))
    assert pb[1][:3] == (3, 5, 14) and pb[5] == (3, 5)
    # dtype: the accumulation dtype and the stats' dtype follow it
    p64 = _fwd(a.double())
    assert p64[3][0]["ACC"] is tl.float64 and p64[6] is torch.float64
    # same shape, channels-last strides: channels along the contiguous axis
    cl = a.contiguous(memory_format=torch.channels_last)
    pcl = _fwd(cl)
    assert pcl[1][3:6] == (64, 1, 4) and pcl[3][0]["BLOCK_C"] > 1 and pa[3][0]["BLOCK_C"] == 1
    # flags: eval is one apply launch; per-sample reads the gain with an (N, C) stride
    assert [k["PHASE"] for k in _fwd(a, flags=2)[3]] == [3]
    assert _fwd(a, flags=7)[1][6] == 4
    # GPU planning splits a batch-1 plane over many more programs than the interpreter
    big = torch.empty(1, 64, 128, 128, device="meta")
    g_cpu, g_gpu = _fwd(big, gpu=False), _fwd(big, gpu=True)
    assert g_gpu[0][0] > g_cpu[0][0] and [k["PHASE"] for k in g_gpu[3]] == [1, 2] and g_gpu[4] is not None
    # a layout the kernels do not address asks for a copy; empty x has no launch
    assert _fwd(torch.empty(2, 4, 5, 6).transpose(2, 3)) is tk.COPY
    assert _fwd(torch.empty(0, 4, 3, 3)) is None
    # the cached answers are the fresh ones
    cached = [_fwd(a), _fwd(cl), _fwd(big, gpu=True)]
    tk._fwd_plan.cache_clear()
    assert cached == [_fwd(a), _fwd(cl), _fwd(big, gpu=True)]


def test_backward_plan_follows_grad_strides():
    tk = _tk()
    a = torch.empty(2, 4, 4, 4)
    dense = tk._bwd_plan(a.shape, a.stride(), a.stride(), a.dtype, 3, True, True, False, None)
    zero = tk._bwd_plan(a.shape, a.stride(), (0, 0, 0, 0), a.dtype, 3, True, True, False, None)  # .sum() grads
    assert dense[1][3:9] == (64, 16, 1, 64, 16, 1) and zero[1][3:9] == (64, 16, 1, 0, 0, 0)
    assert dense[4] == (4,) and tk._bwd_plan(a.shape, a.stride(), a.stride(), a.dtype, 7, True, True, False,
                                             None)[4] == (2, 4)
    t = torch.empty(2, 4, 5, 6).transpose(2, 3)
    assert tk._bwd_plan(t.shape, t.stride(), a.stride(), a.dtype, 3, True, True, False, None) is tk.COPY


@pytest.fixture
def triton_cpu():
    if not ganengine.backends.serves("triton", torch.device("cpu")):
        pytest.skip("triton cannot serve CPU tensors here (TRITON_INTERPRET not set)")


def test_launcher_calls_in_sequence_match_fresh_plans(triton_cpu):
    """Calls of alternating shapes, dtypes and layouts in one process give the numbers of calls
    planned from an empty cache (bit for bit), the copy path included."""
    tk = _tk()
    torch.manual_seed(0)
    a = torch.randn(2, 4, 4, 4)
    xs = [a, a.contiguous(memory_format=torch.channels_last), a.double()]  # one shape, three plans
    def run(x):
        c = x.shape[1]
        w, b = torch.rand(c) + 0.5, torch.randn(c)
        rm, rv = torch.zeros(c), torch.ones(c)
        y, st = tk.forward(x, w, b, rm, rv, 0.1, 1e-5, 0.2, 3)
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
        return (y, st, rm, rv, *tk.backward(g, x, w, b, st, 0.2, 3))

    torch.manual_seed(1)
    warm = [run(x) for x in xs]
    fresh = []
    torch.manual_seed(1)
    for x in xs:
        tk._fwd_plan.cache_clear()
        tk._bwd_plan.cache_clear()
        fresh.append(run(x))
    for got, exp in zip(warm, fresh):
        for a, e in zip(got, exp):
            assert torch.equal(a, e)
    # the transposed x was copied: same numbers as its contiguous copy
    t = torch.randn(2, 4, 5, 6).transpose(2, 3)
    torch.manual_seed(2)
    got = run(t)
    torch.manual_seed(2)
    for a, e in zip(got, run(t.contiguous())):
        assert torch.equal(a, e)


@pytest.mark.parametrize("per_sample, training", [(False, True), (True, False)])
def test_no_graph_call_skips_function_same_numbers(triton_cpu, per_sample, training):
    """A call recording no graph runs the launcher without _TritonFn: same output, running
    statistics, batch count and version bumps as the call through _TritonFn."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5)
    w = torch.rand(3, 4) + 0.5 if per_sample else torch.rand(4) + 0.5
    b = torch.randn(w.shape)
    out = []
    for grad in (False, True):
        rm, rv, nbt = torch.zeros(4), torch.ones(4), torch.tensor(2)
        xx = x.clone().requires_grad_(grad)
        v0 = rm._version
        with on_backend("triton"):
            fn = ops.conditional_batch_norm_act if per_sample else ops.batch_norm_act
            args = (xx, w, b, rm, rv) if per_sample else (xx, rm, rv, w, b)
            y = fn(*args, training=training, momentum=None, num_batches_tracked=nbt)
        assert (y.grad_fn is not None) == grad
        assert (rm._version > v0) == training
        out.append((y.detach(), rm, rv, nbt))
    for a, e in zip(*out):
        assert torch.equal(a, e)
