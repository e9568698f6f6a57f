"""Kernel-layer contracts (session 19).

* conv2d_in_act_bwd with an absent gamma / beta: their gradient slots come back as empty (0,)
  tensors on every backend (the Triton and CUDA C++ routes once returned uninitialised (C,)
  tensors there, the CPU C++ and torch routes a computed sum nobody reads), the fakes say the
  same, and the full opcheck passes; the empty slot costs no kernel.
* ganengine_C::spectral_norm_fwd (mutates its state-vector lists): the full opcheck passes (its
  Functionalize kernel runs the out-of-place twin spectral_norm_fwd_functional), and under
  AOTAutograd the state write lands in the buffers with eager's bits.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.testing._internal.optests.generate_tests import ALL_TEST_UTILS

import ganengine
from ganengine import _ext
from ganengine.backends import strict
from ganengine.ops import conv_act as conv_ops
from ganengine.ops import spectral_norm as sn_ops  # noqa: F401 (registers the raw kernels' fakes)
from tests._train_utils import one_thread  # noqa: F401 (fixture)

FULL_OPCHECK = tuple(ALL_TEST_UTILS)  # schema, autograd registration, fake, aot static / dynamic




# ============================================================================= conv2d_in_act_bwd
_IN_BACKENDS = [("torch", None), ("cpu", None), ("triton", "igemm"), ("triton", "vendor")]
_IN_IDS = ["torch", "cpu", "triton-igemm", "triton-vendor"]
_AFFINE = [(True, False), (False, True), (False, False), (True, True)]
_AFFINE_IDS = ["gamma-only", "beta-only", "neither", "both"]


def _skip_unavailable(backend):
    if not ganengine.backends.available()[backend]:
        pytest.skip(f"backend {backend} unavailable: {ganengine.backends.status()[backend]}")


def _in_bwd_args(with_gamma, with_beta, mask=(True, False)):
    """conv2d_in_act_bwd's arguments: x (2, 3, 7, 6) channels_last, weight (4, 3, 4, 4), stride 2,
    padding 1, the forward's c / mean / rstd, an output gradient, gamma? / beta?."""
    g = torch.Generator().manual_seed(19)
    x = torch.randn(2, 3, 7, 6, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 4, 4, generator=g) * 0.3
    gamma = torch.rand(4, generator=g) + 0.5 if with_gamma else None
    beta = torch.randn(4, generator=g) if with_beta else None
    with ganengine.use_backend("torch"):
        _, c, mean, rstd = conv_ops.conv2d_in_act_fwd(x, w, None, gamma, beta, [2, 2], [1, 1], 1e-5, 0.2)
    grad = torch.randn(c.shape, generator=g).contiguous(memory_format=torch.channels_last)
    return (grad, x, w, c, mean, rstd, gamma, beta, [2, 2], [1, 1], 0.2, list(mask))


@pytest.mark.parametrize("with_gamma,with_beta", _AFFINE, ids=_AFFINE_IDS)
@pytest.mark.parametrize("backend,impl", _IN_BACKENDS, ids=_IN_IDS)
def test_in_act_bwd_absent_affine_grads_are_empty(backend, impl, with_gamma, with_beta, one_thread):
    """dgamma / dbeta: (C,) where the parameter exists, an empty (0,) tensor where it is absent,
    on every backend, in the statistics' dtype (the present ones' values: tests/test_conv_act.py)."""
    _skip_unavailable(backend)
    args = _in_bwd_args(with_gamma, with_beta)
    with ganengine.use_backend(backend), strict(), conv_ops.triton_conv_impl(impl or "auto"):
        _, _, dgamma, dbeta = conv_ops.conv2d_in_act_bwd(*args)
    for name, got, present in (("dgamma", dgamma, with_gamma), ("dbeta", dbeta, with_beta)):
        assert got.dtype == args[4].dtype, name
        assert got.shape == ((4,) if present else (0,)), (name, tuple(got.shape))


@pytest.mark.parametrize("with_gamma,with_beta", _AFFINE[:3], ids=_AFFINE_IDS[:3])
@pytest.mark.parametrize("backend,impl", _IN_BACKENDS, ids=_IN_IDS)
def test_in_act_bwd_full_opcheck_without_gamma_or_beta(backend, impl, with_gamma, with_beta, one_thread):
    """All five opcheck tests, the aot_dispatch ones included (they compare the outputs of two
    calls: an uninitialised slot made them compare garbage)."""
    _skip_unavailable(backend)
    args = _in_bwd_args(with_gamma, with_beta)
    with ganengine.use_backend(backend), strict(), conv_ops.triton_conv_impl(impl or "auto"):
        result = torch.library.opcheck(conv_ops.conv2d_in_act_bwd, args, test_utils=FULL_OPCHECK)
    assert set(result.values()) == {"SUCCESS"}, result


_RAW_IN = pytest.mark.skipif(not (_ext.loaded() and _ext.has_kernel("conv_in_act_bwd", "CPU")),
                             reason="ganengine._C (ganengine_C::conv_in_act_bwd) is not built")


@_RAW_IN
@pytest.mark.parametrize("with_gamma,with_beta", _AFFINE, ids=_AFFINE_IDS)
def test_raw_conv_in_act_bwd_absent_affine_grads_and_fake(with_gamma, with_beta, one_thread):
    """The C++ kernel the lean entry's autograd calls: the same (0,) slots, and its fake agrees
    (opcheck's schema and fake-tensor tests; its aot tests need an autograd-free raw kernel, run)."""
    args = _in_bwd_args(with_gamma, with_beta)
    op = torch.ops.ganengine_C.conv_in_act_bwd
    _, _, dgamma, dbeta = op(*args)
    assert dgamma.shape == ((4,) if with_gamma else (0,))
    assert dbeta.shape == ((4,) if with_beta else (0,))
    result = torch.library.opcheck(op, args, test_utils=FULL_OPCHECK)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.skipif(not ganengine.backends.available()["triton"],
                    reason="needs the Triton backend (TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("impl", ["igemm", "vendor"])
def test_in_act_bwd_absent_affine_grad_costs_no_kernel(impl):
    """The CUDA path's kernels per backward call (Triton launches plus the aten ops around them,
    counted under the interpreter): an absent gamma / beta saves its batch sum and adds nothing
    (an empty slot, no zero fill)."""
    from ganengine.bench.timing import count_kernels

    def kernels(with_gamma, with_beta):
        args = _in_bwd_args(with_gamma, with_beta)

        def call():  # (the op's body, as the eager route's autograd.Function runs it: a dispatch
            # mode sees a custom op's call, not the aten ops inside it)
            return conv_ops._in_bwd_body(*args)

        with ganengine.use_backend("triton"), strict(), conv_ops.triton_conv_impl(impl):
            call()  # (warm-up: the first call's lazy work is no per-call cost)
            return count_kernels(call)["kernels"]

    both = kernels(True, True)
    assert kernels(True, False) == both - 1
    assert kernels(False, True) == both - 1
    assert kernels(False, False) == both - 2


# ============================================================================= spectral_norm_fwd
_RAW_SN = pytest.mark.skipif(not (_ext.loaded() and _ext.has_kernel("spectral_norm_fwd", "CPU")),
                             reason="ganengine._C (ganengine_C::spectral_norm_fwd) is not built")
# (first, steps, write_state): the parametrization's train step (U first, 2n) writing its state,
# the contract's u-only call (V first, 2n + 1), eval (no iteration: nothing written)
_SN_PLANS = [(0, 2, True), (0, 2, False), (1, 3, True), (1, 3, False), (0, 0, True)]
_SN_IDS = ["U2-write", "U2", "V3-write", "V3", "eval-write"]


def _sn_state(dtype=torch.float32):
    """Two layers (a conv's 8x4x3x3 and a linear's 5x7 weight) and their unit state vectors."""
    g = torch.Generator().manual_seed(19)
    weights = [torch.randn(8, 4, 3, 3, generator=g, dtype=dtype), torch.randn(5, 7, generator=g, dtype=dtype)]
    us = [F.normalize(torch.randn(w.shape[0], generator=g, dtype=dtype), dim=0) for w in weights]
    vs = [F.normalize(torch.randn(w[0].numel(), generator=g, dtype=dtype), dim=0) for w in weights]
    return weights, us, vs


@_RAW_SN
@pytest.mark.parametrize("first,steps,write_state", _SN_PLANS, ids=_SN_IDS)
def test_spectral_norm_fwd_full_opcheck(first, steps, write_state, one_thread):
    """All five opcheck tests (the aot_dispatch ones failed: functionalization refuses a custom op
    that mutates its arguments unless it has a Functionalize kernel, and torch's automatic one
    does not take an op that returns lists)."""
    weights, us, vs = _sn_state()
    args = (weights, us, vs, first, steps, 1e-12, write_state)
    result = torch.library.opcheck(torch.ops.ganengine_C.spectral_norm_fwd, args, test_utils=FULL_OPCHECK)
    assert set(result.values()) == {"SUCCESS"}, result


def _bitwise(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a.view(-1).view(torch.int32 if a.dtype == torch.float32 else torch.int64),
                       b.view(-1).view(torch.int32 if b.dtype == torch.float32 else torch.int64)), what


@_RAW_SN
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("first,steps,write_state", _SN_PLANS, ids=_SN_IDS)
def test_spectral_norm_fwd_state_write_under_aot_autograd(first, steps, write_state, dynamic, one_thread):
    """A traced call (AOTAutograd, functionalised) writes the state buffers as the eager call does
    and returns the same outputs, to the bit; a call without write_state leaves them alone."""
    from functorch.compile import aot_function, nop

    op = torch.ops.ganengine_C.spectral_norm_fwd
    weights, us0, vs0 = _sn_state()

    def call(w0, w1, u0, u1, v0, v1):
        w_sn, u_out, v_out, sigma = op([w0, w1], [u0, u1], [v0, v1], first, steps, 1e-12, write_state)
        return (*w_sn, *u_out, *v_out, sigma)

    eager_state = [t.clone() for t in us0 + vs0]
    eager_out = call(*weights, *eager_state)
    traced_state = [t.clone() for t in us0 + vs0]
    traced_out = aot_function(call, nop, nop, dynamic=dynamic)(*weights, *traced_state)
    for i, (a, b) in enumerate(zip(traced_out, eager_out)):
        _bitwise(a, b, f"output {i}")
    for i, (a, b, before) in enumerate(zip(traced_state, eager_state, us0 + vs0)):
        _bitwise(a, b, f"state {i}")
        if not (write_state and steps > 0):
            _bitwise(a, before, f"state {i} unwritten")
    if write_state and steps > 0:  # the new state is the vectors sigma was computed with
        for i, (a, b) in enumerate(zip(traced_state, traced_out[2:6])):
            _bitwise(a, b, f"state {i} = u_out / v_out")


@_RAW_SN
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("first,steps,write_state", _SN_PLANS, ids=_SN_IDS)
def test_spectral_norm_fwd_functional_twin_is_bitwise_and_pure(first, steps, write_state, dtype, one_thread):
    """spectral_norm_fwd_functional: the in-place op's outputs to the bit, never writing us / vs."""
    weights, us, vs = _sn_state(dtype)
    before = [t.clone() for t in us + vs]
    twin = torch.ops.ganengine_C.spectral_norm_fwd_functional(weights, us, vs, first, steps, 1e-12, write_state)
    for t, b in zip(us + vs, before):
        _bitwise(t, b, "state untouched")
    state = [t.clone() for t in us + vs]
    inplace = torch.ops.ganengine_C.spectral_norm_fwd(weights, state[:2], state[2:], first, steps, 1e-12, write_state)
    for lt, lf in zip(twin[:3], inplace[:3]):
        for a, b in zip(lt, lf):
            _bitwise(a, b, "outputs")
    _bitwise(twin[3], inplace[3], "sigma")
