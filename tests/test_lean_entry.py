"""The lean C++ entries on CPU tensors (ganengine_C::instance_norm_act, ::batch_norm_act):
a call they refuse goes to the Python route and gets the public errors; an error inside a call
they serve propagates, raised once (no second run by the Python route); the shared C++ backward
(csrc/cpu/lean_autograd.h) gives each present input its gradient, also with an absent weight or
bias and with only some inputs requiring grad, bit for bit as the custom-op route."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ganengine.nn
import ganengine.functional as GF
from ganengine.ops import _dispatch
from ganengine.ops import batch_norm_act as bn_ops
from ganengine.ops import norm_act as in_ops
from tests._backends import on_backend

_HAS_IN = in_ops._ext.loaded() and in_ops._ext.has_kernel("instance_norm_act", "CompositeExplicitAutograd")
_HAS_BN = bn_ops._ext.loaded() and bn_ops._ext.has_kernel("batch_norm_act_fwd", "CPU")
needs_in = pytest.mark.skipif(not _HAS_IN, reason="ganengine._C without the instance_norm_act entry")
needs_bn = pytest.mark.skipif(not _HAS_BN, reason="ganengine._C without the batch_norm_act kernels")


class _KernelCalls(TorchDispatchMode):
    """Counts calls of one ganengine_C kernel (the lean ops reach it through the dispatcher, the
    Python route through the custom op) and raises ``error`` from it when given."""

    def __init__(self, name: str, error: Exception | None = None):
        super().__init__()
        self.name, self.error, self.calls = name, error, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name == f"ganengine_C::{self.name}":
            self.calls += 1
            if self.error is not None:
                raise self.error
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- instance_norm_act
@needs_in
@pytest.mark.parametrize("error", [RuntimeError("kernel failed"), NotImplementedError("kernel failed")])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_instance_norm_error_in_served_call_propagates_once(error, requires_grad):
    x = torch.randn(2, 3, 4, 4, requires_grad=requires_grad)
    with on_backend("cpu"), _KernelCalls("norm_act_fwd", error) as mode:
        with pytest.raises(type(error), match="kernel failed"):
            GF.instance_norm_act(x, torch.ones(3), None)
    assert mode.calls == 1  # the Python route did not run the kernel a second time


@needs_in
def test_instance_norm_refusal_comes_before_any_work():
    op = _dispatch.lean_op("instance_norm_act", in_ops._IN_KERNELS)
    assert op is not None
    refused = [(torch.randn(3, 4, 4), None, None), (torch.randn(0, 3, 4, 4), None, None),
               (torch.ones(1, 3, 4, 4, dtype=torch.int64), None, None),
               (torch.randn(1, 3, 4, 4), torch.ones(4), None), (torch.randn(1, 3, 4, 4), None, torch.ones(3, 1)),
               (torch.randn(1, 3, 4, 4), torch.ones(3, dtype=torch.int64), None),
               (torch.randn(1, 3, 4, 4), None, torch.ones(3, device="meta"))]
    for x, w, b in refused:
        with _KernelCalls("norm_act_fwd") as mode, pytest.raises(NotImplementedError) as info:
            op(x, w, b, 1e-5, True, 0.2)
        assert _dispatch.refused(info.value, in_ops._REFUSAL, w, b), str(info.value)
        assert mode.calls == 0


@needs_in
@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_instance_norm_refused_calls_give_the_public_errors(backend):
    x = torch.randn(1, 3, 4, 4)
    cases = [
        (ValueError, "weight must have shape", dict(x=x, weight=torch.ones(4))),
        (ValueError, "bias must have shape", dict(x=x, bias=torch.ones(3, 1))),
        (TypeError, "weight must be floating point", dict(x=x, weight=torch.ones(3, dtype=torch.int64))),
        (TypeError, "bias must be a Tensor or None", dict(x=x, bias=[0.0, 0.0, 0.0])),
        (ValueError, "bias is on meta but x is on cpu", dict(x=x, bias=torch.ones(3, device="meta"))),
        (ValueError, "activation must be one of", dict(x=x, activation="gelu")),
        (ValueError, "activation must be one of", dict(x=x, activation=["relu"])),
        (TypeError, "fp16, bf16, fp32 or fp64", dict(x=torch.ones(1, 3, 4, 4, dtype=torch.int64))),
        (ValueError, r"\(N, C, H, W\) or \(C, H, W\)", dict(x=torch.randn(1, 1, 3, 4, 4))),
        (ValueError, "could not convert", dict(x=x, eps="1e-5x")),
    ]
    with on_backend(backend) if backend != "auto" else contextlib.nullcontext():
        for error, match, kwargs in cases:
            with _KernelCalls("norm_act_fwd") as mode, pytest.raises(error, match=match):
                GF.instance_norm_act(**kwargs)
            assert mode.calls == 0, match


@needs_in
def test_instance_norm_refused_calls_served_by_the_python_route_run_once():
    """3-D (unsqueezed, then the lean op) and empty input (the torch composition)."""
    with on_backend("cpu"):
        with _KernelCalls("norm_act_fwd") as mode:
            y = GF.instance_norm_act(torch.randn(3, 4, 5))
        assert mode.calls == 1 and y.shape == (3, 4, 5)
        assert _dispatch.last_used["instance_norm_act"] == "cpu"
        with _KernelCalls("norm_act_fwd") as mode:
            y = GF.instance_norm_act(torch.randn(0, 3, 4, 4, requires_grad=True), torch.ones(3, requires_grad=True))
        assert mode.calls == 0 and y.shape == (0, 3, 4, 4) and y.requires_grad


# which of (x, weight, bias) exist and require grad: absent optionals shift the autograd edges
_GRAD_SETS = [
    ("x", "w", "b"), ("b",), ("w",), ("x", "b"),  # weight and bias present
    ("x", "-w"), ("b", "-w"), ("x", "b", "-w"),  # weight absent
    ("w", "-b"), ("x", "w", "-b"),  # bias absent
]


def _leaves(grad_set, x, w, b):
    """(x, w, b) with requires_grad per grad_set; '-w' / '-b' make weight / bias None."""
    x = x.detach().clone().requires_grad_("x" in grad_set)
    w = None if "-w" in grad_set else w.detach().clone().requires_grad_("w" in grad_set)
    b = None if "-b" in grad_set else b.detach().clone().requires_grad_("b" in grad_set)
    return x, w, b


def _grads(y, x, w, b, gy, create_graph):
    """(first-order grads of the leaves requiring grad, second-order grads if create_graph)."""
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    g1 = torch.autograd.grad(y, leaves, gy, create_graph=create_graph)
    loss = sum((g * g).sum() for g in g1)
    if not loss.requires_grad:  # (first-order only, or a gradient with no path back: bias alone)
        return g1
    g2 = torch.autograd.grad(loss, leaves, allow_unused=True)
    return (*g1, *(torch.zeros(()) if g is None else g for g in g2))


@needs_in
@pytest.mark.parametrize("grad_set", _GRAD_SETS, ids=lambda s: "+".join(s))
@pytest.mark.parametrize("create_graph", [False, True])
def test_instance_norm_gradients_per_input_match_the_custom_op(grad_set, create_graph):
    torch.manual_seed(1)
    x0, w0, b0 = torch.randn(2, 3, 3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64), \
        torch.randn(3, dtype=torch.float64)
    gy = torch.randn(2, 3, 3, 5, dtype=torch.float64)

    def run(lean):
        x, w, b = _leaves(grad_set, x0, w0, b0)
        with on_backend("cpu"):
            if lean:
                y = GF.instance_norm_act(x, w, b, activation="leaky_relu", negative_slope=0.2)
                assert _dispatch.last_used["instance_norm_act"] == "cpu"
            else:
                y = in_ops.instance_norm_act_fwd(x, w, b, 1e-5, "leaky_relu", 0.2)[0]
        return _grads(y, x, w, b, gy, create_graph)

    got, want = run(True), run(False)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- batch_norm_act
@needs_bn
@pytest.mark.parametrize("per_sample", [False, True])
def test_batch_norm_error_in_served_call_propagates_once(per_sample):
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    p = torch.ones(2, 3) if per_sample else torch.ones(3)
    fn = GF.conditional_batch_norm_act if per_sample else GF.batch_norm_act
    args = (x, p, None) if per_sample else (x, None, None, p)
    with on_backend("cpu"), _KernelCalls("batch_norm_act_fwd", RuntimeError("kernel failed")) as mode:
        with pytest.raises(RuntimeError, match="kernel failed"):
            fn(*args)
    assert mode.calls == 1


@needs_bn
@pytest.mark.parametrize("grad_set", _GRAD_SETS, ids=lambda s: "+".join(s))
@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
def test_batch_norm_gradients_per_input_match_the_custom_op(grad_set, create_graph, per_sample):
    torch.manual_seed(2)
    pshape = (2, 3) if per_sample else (3,)
    x0, w0, b0 = torch.randn(2, 3, 3, 5, dtype=torch.float64), torch.randn(pshape, dtype=torch.float64), \
        torch.randn(pshape, dtype=torch.float64)
    gy = torch.randn(2, 3, 3, 5, dtype=torch.float64)
    flags = bn_ops.TRAINING | bn_ops.APPLY_ACT | (bn_ops.PER_SAMPLE if per_sample else 0)

    def run(lean):
        x, w, b = _leaves(grad_set, x0, w0, b0)
        with on_backend("cpu"):
            if lean:
                if per_sample:
                    y = GF.conditional_batch_norm_act(x, w, b, activation="leaky_relu", negative_slope=0.2)
                else:
                    y = GF.batch_norm_act(x, None, None, w, b, activation="leaky_relu", negative_slope=0.2)
            else:
                y = bn_ops.batch_norm_act_fwd(x, w, b, None, None, 1e-5, 0.2, flags)[0]
        return _grads(y, x, w, b, gy, create_graph)

    got, want = run(True), run(False)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


_FAKE_CASES = {
    "instance_norm_act": lambda r: GF.instance_norm_act(r(2, 3, 4, 4), r(3), r(3)),
    "instance_norm_act_running_stats": lambda r: GF.instance_norm_act(r(2, 3, 4, 4), None, None, torch.zeros(3),
                                                                      torch.ones(3)),
    "self_attention2d": lambda r: ganengine.nn.SelfAttention2d(16)(r(2, 16, 4, 4)),
    "conv3x3_winograd": lambda r: GF.conv3x3(r(1, 128, 32, 32), r(128, 128, 3, 3)),
    "conv_gemm": lambda r: GF.conv2d(r(1, 512, 8, 8), r(512, 512, 4, 4), None, 2, 1),
    "gan_loss": lambda r: GF.gan_loss(r(1, 1, 30, 30), True, "lsgan"),
    "gan_loss_linear": lambda r: GF.gan_loss(r(1, 1, 30, 30), False, "wgangp"),
    "discriminator_loss": lambda r: GF.discriminator_loss(r(1, 1, 30, 30), r(1, 1, 30, 30)),
    "batch_norm_act": lambda r: GF.batch_norm_act(r(4, 3, 4, 4), torch.zeros(3), torch.ones(3), r(3), r(3),
                                                  training=True),
    "conv2d_act": lambda r: GF.conv2d_act(r(1, 3, 8, 8), r(4, 3, 4, 4), None, 2, 1),
    "conv2d_instance_norm_act": lambda r: GF.conv2d_instance_norm_act(r(1, 4, 8, 8), r(4, 4, 4, 4), None, 2, 1),
}


def _entry(name):
    return in_ops._ext.op(name)


# The public functions of the norm_act, conv_act and losses families hand their lean entries plain
# tensors only (a FakeTensor takes the Python route: the entries' checks read sizes, which symbolic
# shapes do not have), so their entries are also called here directly, as the dispatcher op that
# meta-device tooling or a tensor subclass would reach
_ENTRY_FAKE_CASES = {
    "instance_norm_act": lambda r: _entry("instance_norm_act")(r(2, 3, 4, 4), r(3), r(3), 1e-5, True, 0.2),
    "instance_norm_act_rs": lambda r: _entry("instance_norm_act_rs")(r(2, 3, 4, 4), None, None, torch.zeros(3),
                                                                     torch.ones(3), 0.1, 1e-5, True, 0.2),
    "gan_loss": lambda r: _entry("gan_loss")([r(1, 1, 30, 30)], "lsgan", True, True, 1.0, 0.0),
    "gan_loss_linear": lambda r: _entry("gan_loss")([r(1, 1, 30, 30)], "wgangp", False, True, 1.0, 0.0),
    "discriminator_loss": lambda r: _entry("discriminator_loss")(r(1, 1, 30, 30), r(1, 1, 30, 30), "lsgan", 1.0, 0.0),
    "conv2d_act": lambda r: _entry("conv2d_act")(r(1, 3, 8, 8), r(4, 3, 4, 4), None, [2, 2], [1, 1], 0.2),
    "conv2d_in_act": lambda r: _entry("conv2d_in_act")(r(1, 4, 8, 8), r(4, 4, 4, 4), None, None, None, [2, 2], [1, 1],
                                                       1e-5, 0.2),
}


@pytest.mark.parametrize("case", sorted(_ENTRY_FAKE_CASES))
def test_lean_entry_ops_run_under_fake_tensor_mode(case):
    """The C++ entries themselves, forward and backward, under FakeTensorMode (see _ENTRY_FAKE_CASES)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    name = {"gan_loss_linear": "gan_loss", "conv2d_in_act": "conv2d_in_act"}.get(case, case)
    if not (in_ops._ext.loaded() and in_ops._ext.has_kernel(name, "CompositeExplicitAutograd")):
        pytest.skip(f"ganengine._C without the {name} entry")
    with FakeTensorMode():
        out = _ENTRY_FAKE_CASES[case](lambda *shape: torch.randn(*shape, requires_grad=True))
        assert isinstance(out, FakeTensor)
        out.float().sum().backward()


@pytest.mark.parametrize("case", sorted(_FAKE_CASES))
def test_lean_entries_run_under_fake_tensor_mode(case):
    """Every lean C++ entry, forward and backward, under FakeTensorMode (meta-device tooling,
    export tracing): its C++ autograd still runs there, so every raw kernel it calls needs a fake
    and no host read of a tensor's value (item()) may happen on a fake."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        out = _FAKE_CASES[case](lambda *shape: torch.randn(*shape, requires_grad=True))
        out = out[0] if isinstance(out, tuple) else out
        assert isinstance(out, FakeTensor)
        out.float().sum().backward()
