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
    with FakeTensorMode() as mode:
        assert not _eager.plain_eager(mode.from_tensor(x))
        assert not _eager.plain_eager(x)  # a real tensor inside a fake mode: still tracing
    from torch.fx.experimental.proxy_tensor import make_fx

    seen = []
    make_fx(lambda t: seen.append(_eager.plain_eager(t)) or t)(x)  # the proxy mode, real tensors
    assert seen == [False]
    # modes that only watch (the kernel counter, FlopCounterMode) and function modes see what runs
    with _Passthrough():
        assert _eager.plain_eager(x)
    with torch.device("cpu"):
        assert _eager.plain_eager(x)
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



# ----------------------------------------------------------------------------- the models' CUDA route
def _count_ganengine_op_calls(monkeypatch):
    """Count calls of ganengine:: custom ops (through CustomOpDef, the packet or an overload)."""
    import torch._ops as ops

    calls = []
    for cls in (ops.OpOverload, ops.OpOverloadPacket):
        real = cls.__call__

        def counting(self, *args, _real=real, **kwargs):
            if getattr(self, "namespace", None) == "ganengine":
                calls.append(str(self))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", counting)
    return calls


@pytest.mark.parametrize("name", ["cyclegan", "pix2pix"])
def test_fused_models_take_the_eager_route_on_the_cuda_route(monkeypatch, name):
    """A fused training step on the route CUDA tensors take (the Triton backend's Python, the
    vendor convolution, no CPU lean entry) calls no ganengine custom op: every fused layer runs its
    autograd.Function twin (the custom ops cost ~60 ms of host time per CycleGAN step at the quick
    size: benchmarks/bench_cuda_path_host.py --models). The Triton launches are stubbed (only the
    routing is checked here; the kernels' numbers are tested per op)."""
    from ganengine import backends
    from ganengine.models import build_model
    from ganengine.ops.conv_act import triton_conv_impl
    from ganengine.train.context import AmpContext

    if not backends.serves("triton", torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1")
    from triton.runtime.interpreter import InterpretedFunction

    _python_route(monkeypatch)
    monkeypatch.setattr(InterpretedFunction, "__getitem__", lambda self, grid: (lambda *a, **k: None))
    torch.manual_seed(0)
    size = 32 if name == "cyclegan" else 128  # (unet_128: the smallest U-Net)
    opts = dict(crop_size=size, ngf=4, ndf=4, n_layers_D=2) | (
        dict(netG="resnet_6blocks") if name == "cyclegan" else dict(netG="unet_128"))
    model = build_model(name, **opts, fused=True, fused_optimizer=True)
    model.train()
    optimizers = model.make_optimizers()
    batch = {"A": torch.rand(1, 3, size, size) * 2 - 1, "B": torch.rand(1, 3, size, size) * 2 - 1,
             "A_paths": [""], "B_paths": [""]}
    step_ctx = AmpContext("off", torch.device("cpu"), list(optimizers))
    with backends.use_backend("triton"), triton_conv_impl("vendor"):
        model.train_step(batch, optimizers, step_ctx)  # warm-up (first calls may resolve caches)
        calls = _count_ganengine_op_calls(monkeypatch)
        model.train_step(batch, optimizers, step_ctx)
    assert calls == [], collections.Counter(calls)
