"""The eager route of the Python custom ops (ganengine/ops/_eager.py): a plain eager call runs the
op's body in an autograd.Function (no custom-op layer: the CUDA path's host time), anything that
traces runs the custom op, and both give the same bits, forward, backward and double backward."""
import collections

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import ganengine.functional as GF
from ganengine.ops import _dispatch, _eager
from ganengine.ops import norm_act as NA
from tests._backends import backend_params, on_backend


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


def test_plain_eager_gate():
    x = torch.randn(2, 3)
    assert _eager.plain_eager(x, None, torch.nn.Parameter(torch.ones(3)))
    assert not _eager.plain_eager(x.as_subclass(_Sub))
    with _Passthrough():
        assert not _eager.plain_eager(x)
    with FakeTensorMode() as mode:
        assert not _eager.plain_eager(mode.from_tensor(x))
    with torch.device("cpu"):  # a torch function mode
        assert not _eager.plain_eager(x)
    assert _eager.plain_eager(x)


def _python_route(monkeypatch):
    # the route the CUDA path takes: no C++ lean entry (CPU only) in front of it
    monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: None)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape,cl", [((2, 3, 5, 7), False), ((1, 4, 1, 1), False), ((2, 5, 6, 3), True)])
def test_instance_norm_act_twin_matches_custom_op(monkeypatch, backend, shape, cl):
    _python_route(monkeypatch)
    torch.manual_seed(0)
    x0 = torch.randn(shape, dtype=torch.float64 if backend == "torch" else torch.float32)
    if cl:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    w0, b0 = torch.rand(shape[1], dtype=x0.dtype) + 0.5, torch.randn(shape[1], dtype=x0.dtype)
    gy = torch.randn(shape, dtype=x0.dtype)

    def run(route):
        x, w, b = (t.detach().clone().requires_grad_() for t in (x0, w0, b0))
        with on_backend(backend):
            if route == "twin":
                y = GF.instance_norm_act(x, w, b, activation="leaky_relu", negative_slope=0.1)
                assert type(y.grad_fn).__name__ == "ganengine::instance_norm_act_fwdBackward"  # the twin served it
            else:
                y = NA.instance_norm_act_fwd(x, w, b, 1e-5, "leaky_relu", 0.1)[0]
                assert type(y.grad_fn).__name__ != "ganengine::instance_norm_act_fwdBackward"
            grads = torch.autograd.grad(y, (x, w, b), gy, create_graph=True)
            # double backward (R1 / WGAN-GP): through the reference composition on both routes
            gg = torch.autograd.grad(sum((g * g).sum() for g in grads), (x, w))
        return [y, *grads, *gg]

    for a, b in zip(run("twin"), run("custom_op")):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # (forward_ad imports torch.jit.script)
def test_calls_without_a_graph_run_the_body(monkeypatch):
    """no_grad, or no input requiring grad: the body runs without the Function (its apply costs
    ~10 us even then), same bits; forward-mode AD still reaches the Function, which refuses it."""
    _python_route(monkeypatch)
    x, w, b = torch.randn(2, 3, 5, 4), torch.rand(3) + 0.5, torch.randn(3)
    ref = NA.instance_norm_act_fwd(x, w, b, 1e-5, "leaky_relu", 0.2)[0]
    with torch.no_grad():
        y = GF.instance_norm_act(x.clone().requires_grad_(), w, b)
    assert torch.equal(y, ref) and not y.requires_grad
    assert torch.equal(GF.instance_norm_act(x, w, b), ref)

    set_up = []
    f = _eager.twin("ganengine::toy", lambda t, k: t * k, lambda ctx, inputs, out: set_up.append(1),
                    lambda ctx, g: (g * 2.0, None))
    t = torch.randn(3)
    assert torch.equal(f(t, 2.0), t * 2.0) and set_up == []  # nothing requires grad
    with torch.no_grad():
        f(t.clone().requires_grad_(), 2.0)
    assert set_up == []
    out = f(t.clone().requires_grad_(), 2.0)
    assert set_up == [1] and type(out.grad_fn).__name__ == "ganengine::toyBackward"
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(RuntimeError, match="jvp"):
        f(fwAD.make_dual(t, torch.ones_like(t)), 2.0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_tracing_takes_the_custom_op(monkeypatch):
    _python_route(monkeypatch)
    seen = []
    real = NA.instance_norm_act_fwd

    class Spy:
        def __call__(self, *args):
            seen.append(True)
            return real(*args)

    monkeypatch.setattr(NA, "instance_norm_act_fwd", Spy())
    x = torch.randn(1, 2, 3, 3)
    with FakeTensorMode() as mode:
        y = GF.instance_norm_act(mode.from_tensor(x))
    assert seen and y.shape == x.shape
    seen.clear()
    traced = torch.jit.trace(lambda t: GF.instance_norm_act(t), (x,), check_trace=False)
    assert seen and "ganengine::instance_norm_act_fwd" in str(traced.graph)
    seen.clear()
    GF.instance_norm_act(x)
    assert not seen

