"""The lean C++ entries of gan_loss and discriminator_loss on CPU tensors
(ganengine_C::gan_loss / ::discriminator_loss, csrc/cpu/losses_autograd.cpp, autograd in C++), and
the lean-entry helpers of ops/_dispatch.py they share with every family (lean_op, refused).

The entries must give the Python route's numbers bit for bit (forward, gradients with grad_output 1
and not 1, a second backward, create_graph double backward, fp32 / fp64 / bf16, AMP), decline
what they do not serve so that the public errors are raised, and let a real error propagate once."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ganengine.functional as GF
from ganengine import _ext, backends
from ganengine.ops import _dispatch
from ganengine.ops import losses as L
from tests._backends import CudaEntryResolver, on_backend, autograd_node_names

_HAS_LEAN = _ext.loaded() and _ext.has_kernel("gan_loss", "CompositeExplicitAutograd")
needs_lean = pytest.mark.skipif(not _HAS_LEAN, reason="ganengine._C without the lean loss entries")

# (mode, for_discriminator): every elementwise loss code of the kernel
TERMS = [("vanilla", True), ("lsgan", True), ("hinge", True), ("hinge", False), ("wgangp", True)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


class _KernelCalls(TorchDispatchMode):
    """Counts calls of the kernel both routes reach and raises ``error`` from it when given: the
    lean entry's ganengine_C::losses_adv_fwd, or the Python route's custom op ganengine::adv_loss
    (under a dispatch mode the Python route takes the custom op, whose body the mode does not see:
    ganengine/ops/_eager.py)."""

    def __init__(self, error: Exception | None = None):
        super().__init__()
        self.error, self.calls = error, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in ("ganengine_C::losses_adv_fwd", "ganengine::adv_loss"):
            self.calls += 1
            if self.error is not None:
                raise self.error
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def python_route():
    """Switches the lean entries off: the public functions take the autograd.Function route."""
    saved = dict(_dispatch._LEAN)
    _dispatch._LEAN.update({"gan_loss": None, "discriminator_loss": None})
    try:
        yield
    finally:
        _dispatch._LEAN.clear()
        _dispatch._LEAN.update(saved)



def _lean_node(t: torch.Tensor) -> bool:
    return any("AdvLossFn" in n for n in autograd_node_names(t, name=lambda fn: fn.name()))


def _same(got, want, what=""):
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None:
            assert a is None and b is None, f"{what}[{i}]"
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), f"{what}[{i}]"
        assert torch.equal(a, b), f"{what}[{i}]: max diff {(a.double() - b.double()).abs().max().item()}"


def _maps(form, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # 7x9: odd sizes (vector tails); the second map differs in size (its own 1/numel)
    xs = [torch.randn(2, 1, 7, 9, generator=g).mul_(2).to(dtype)]
    if form == "list":
        xs.append(torch.randn(1, 1, 5, 3, generator=g).mul_(2).to(dtype))
    # exact kinks and label hits: hinge at +-1, lsgan at the label
    xs[0].view(-1)[:3] = torch.tensor([1.0, -1.0, 0.9], dtype=torch.float64).to(dtype)
    return xs


def _run(lean, fn, base, gys, create_graph=False, twice=False):
    """(output, grads per backward[, second-order grads]) by one route."""
    xs = [x.detach().clone().requires_grad_(True) for x in base]
    with on_backend("cpu"), (contextlib.nullcontext() if lean else python_route()):
        out = fn(xs)
    assert _lean_node(out) == lean
    res = [out.detach()]
    for gy in gys[:2 if twice else 1]:
        g1 = torch.autograd.grad(out, xs, gy.to(out.dtype), create_graph=create_graph, retain_graph=True)
        res += [g.detach() for g in g1]
        if create_graph:
            loss = sum((g.double() * g.double()).sum() for g in g1)
            if loss.requires_grad:  # (a linear term's gradient does not depend on x)
                g2 = torch.autograd.grad(loss, xs, allow_unused=True)
                res += [torch.zeros(()) if g is None else g for g in g2]
    return res


def _gan(mode, real, for_disc, form, labels=(1.0, 0.0)):
    def fn(xs):
        logits = xs[0] if form == "single" else (xs if form == "list" else tuple(xs))
        return GF.gan_loss(logits, real, mode, for_disc, real_label=labels[0], fake_label=labels[1])
    return fn


# ----------------------------------------------------------------------------- same bits as the Python route
@needs_lean
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["single", "list"])
def test_gan_loss_lean_matches_python_route_bitwise(form, dtype):
    for mode, for_disc in TERMS:
        for real in (True, False):
            labels = (0.9, 0.1) if mode == "vanilla" else (1.0, 0.0)
            base = _maps(form, dtype, seed=int(real))
            fn = _gan(mode, real, for_disc, form, labels)
            # grad_output 1 (the forward's gradient handed out), then 0.37 (scaled in place), and
            # a second backward through the retained graph (recomputed)
            gys = [torch.tensor(1.0), torch.tensor(0.37)]
            what = f"{mode} disc={for_disc} real={real}"
            _same(_run(True, fn, base, gys, twice=True), _run(False, fn, base, gys, twice=True), what)
            _same(_run(True, fn, base, gys[1:]), _run(False, fn, base, gys[1:]), what)
            with torch.no_grad(), on_backend("cpu"):
                lean = fn(base)
                with python_route():
                    want = fn(base)
            _same([lean], [want], what + " no_grad")


@needs_lean
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gan_loss_lean_double_backward_matches_python_route(dtype):
    """create_graph=True (WGAN-GP, R1): the gradient is the differentiable reference formula."""
    gys = [torch.tensor(0.37)]
    for mode, for_disc in TERMS:
        for form in ("single", "list"):
            fn = _gan(mode, True, for_disc, form)
            base = _maps(form, dtype)
            _same(_run(True, fn, base, gys, create_graph=True), _run(False, fn, base, gys, create_graph=True), mode)


@needs_lean
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_discriminator_loss_lean_matches_python_route_bitwise(dtype):
    for mode, _ in TERMS[:3] + TERMS[4:]:
        real, fake = _maps("list", dtype, seed=3)

        def fn(xs):
            return GF.discriminator_loss(xs[0], xs[1], mode, real_label=0.9 if mode == "vanilla" else 1.0)

        gys = [torch.tensor(1.0), torch.tensor(-2.5)]
        _same(_run(True, fn, [real, fake], gys, twice=True), _run(False, fn, [real, fake], gys, twice=True), mode)
        if dtype != torch.bfloat16:
            _same(_run(True, fn, [real, fake], gys, create_graph=True),
                  _run(False, fn, [real, fake], gys, create_graph=True), mode)


@needs_lean
def test_lean_under_autocast_and_inference_mode():
    """AMP: bf16 logits give an fp32 loss under autocast, bf16 outside (ops/losses.py _finish)."""
    x = _maps("single", torch.bfloat16)[0]
    for ctx in (lambda: torch.autocast("cpu", dtype=torch.bfloat16), contextlib.nullcontext):
        for mode, for_disc in TERMS:
            with ctx():
                got = _run(True, _gan(mode, True, for_disc, "single"), [x], [torch.tensor(1.0)])
                want = _run(False, _gan(mode, True, for_disc, "single"), [x], [torch.tensor(1.0)])
            _same(got, want, mode)
    with torch.autocast("cpu", dtype=torch.bfloat16), on_backend("cpu"):
        assert GF.gan_loss(x, True).dtype == torch.float32
        assert GF.discriminator_loss(x, x).dtype == torch.float32
    with torch.inference_mode(), on_backend("cpu"):
        got = GF.gan_loss(x.float(), False, "vanilla")
        with python_route():
            want = GF.gan_loss(x.float(), False, "vanilla")
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- refusals and errors
@needs_lean
def test_refusal_comes_before_any_work():
    op = _dispatch.lean_op("gan_loss", L._ADV_KERNELS)
    assert op is not None
    x = torch.randn(1, 1, 3, 3)
    refused = [((), "lsgan"), ((x, x.double()), "lsgan"), ((torch.randn(0, 1, 3, 3),), "lsgan"),
               ((x.long(),), "lsgan"), ((x, torch.randn(3, device="meta")), "lsgan"), ((x,), "LSGAN"),
               ((x,), "bogus"), ((x.to(torch.float8_e4m3fn),), "lsgan")]
    for xs, mode in refused:
        with _KernelCalls() as calls, pytest.raises(NotImplementedError) as info:
            op(xs, mode, True, True, 1.0, 0.0)
        assert _dispatch.refused(info.value, L._GAN_REFUSAL, required=xs), str(info.value)
        assert calls.calls == 0
    dop = _dispatch.lean_op("discriminator_loss", L._ADV_KERNELS)
    with _KernelCalls() as calls, pytest.raises(NotImplementedError) as info:
        dop(x, x.double(), "lsgan", 1.0, 0.0)
    assert _dispatch.refused(info.value, L._DISC_REFUSAL, required=(x, x)) and calls.calls == 0


GAN_BAD = [
    (ValueError, "mode must be one of", lambda x: GF.gan_loss(x, True, "bogus")),
    (ValueError, "mode must be one of", lambda x: GF.gan_loss(x, True, ["lsgan"])),
    (TypeError, "target_is_real must be a Python bool", lambda x: GF.gan_loss(x, torch.tensor(True))),
    (ValueError, "empty list", lambda x: GF.gan_loss([], True)),
    (TypeError, r"logits\[1\] must be a Tensor", lambda x: GF.gan_loss([x, None], True)),
    (TypeError, r"logits\[1\] must be a Tensor", lambda x: GF.gan_loss((x, 1.0), True)),
    (TypeError, "logits must be a Tensor", lambda x: GF.gan_loss(1.0, True)),
    (TypeError, "floating-point", lambda x: GF.gan_loss(x.long(), True)),
    (ValueError, "is empty", lambda x: GF.gan_loss(x[:0], True)),
    (ValueError, "share a device", lambda x: GF.gan_loss([x, x.to("meta")], True)),
    (ValueError, "real_label must be a number", lambda x: GF.gan_loss(x, True, "vanilla", real_label="one")),
    (ValueError, "mode must be one of", lambda x: GF.discriminator_loss(x, x, "bogus")),
    (TypeError, "fake_logits must be a Tensor", lambda x: GF.discriminator_loss(x, [x])),
    (ValueError, "real_logits is empty", lambda x: GF.discriminator_loss(x[:0], x)),
    (ValueError, "share a device", lambda x: GF.discriminator_loss(x, x.to("meta"))),
    (TypeError, "fake_label must be a number", lambda x: GF.discriminator_loss(x, x, "vanilla", fake_label=[0.0])),
]


@needs_lean
@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_refused_calls_give_the_public_errors(backend):
    x = torch.randn(1, 1, 3, 3)
    with on_backend(backend) if backend != "auto" else contextlib.nullcontext():
        for error, match, call in GAN_BAD:
            with _KernelCalls() as calls, pytest.raises(error, match=match):
                call(x)
            assert calls.calls == 0, match


@needs_lean
def test_refused_calls_served_by_the_python_route_run_once():
    """A non-lowercase mode, mixed dtypes (promoted), a non-bool target: the Python route serves them."""
    x = torch.randn(1, 1, 3, 3, requires_grad=True)
    with on_backend("cpu"):
        for call, want in [(lambda: GF.gan_loss(x, True, "LSGAN"), lambda: GF.gan_loss(x, True, "lsgan")),
                           (lambda: GF.gan_loss([x, x.double()], 1), lambda: GF.gan_loss([x.double(), x.double()], True)),
                           (lambda: GF.discriminator_loss(x, x.double(), "Hinge"),
                            lambda: GF.discriminator_loss(x.double(), x.double(), "hinge"))]:
            with _KernelCalls() as calls:
                got = call()
            assert calls.calls == 1 and not _lean_node(got)
            assert torch.equal(got, want())


@needs_lean
@pytest.mark.parametrize("error", [RuntimeError("kernel failed"), NotImplementedError("kernel failed")])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_error_in_served_call_propagates_once(error, requires_grad):
    x = torch.randn(1, 1, 3, 3, requires_grad=requires_grad)
    with on_backend("cpu"):
        for call in (lambda: GF.gan_loss(x, True), lambda: GF.gan_loss([x, x], False, "hinge"),
                     lambda: GF.discriminator_loss(x, x, "vanilla")):
            with _KernelCalls(error) as calls, pytest.raises(type(error), match="kernel failed"):
                call()
            assert calls.calls == 1  # the Python route did not run the kernel a second time


# ----------------------------------------------------------------------------- the _dispatch helpers
@needs_lean
def test_lean_op_follows_the_requested_backend(monkeypatch):
    op = _dispatch.lean_op("gan_loss", L._ADV_KERNELS)
    assert op is not None and _dispatch.lean_op("gan_loss", L._ADV_KERNELS) is op  # resolved once
    for name in ("torch", "triton", "cuda"):
        with backends.use_backend(name):
            assert _dispatch.lean_op("gan_loss", L._ADV_KERNELS) is None
    with backends.use_backend("cpu"):
        assert _dispatch.lean_op("gan_loss", L._ADV_KERNELS) is op
    monkeypatch.setattr(backends._requested, "value", None)  # no use_backend(): the environment decides
    monkeypatch.setenv("GANENGINE_BACKEND", "torch")
    assert _dispatch.lean_op("gan_loss", L._ADV_KERNELS) is None
    x = torch.randn(1, 1, 3, 3, requires_grad=True)
    assert not _lean_node(GF.gan_loss(x, True)) and _dispatch.last_used["gan_loss"] == "torch"
    monkeypatch.setenv("GANENGINE_BACKEND", "cpu")
    assert _lean_node(GF.gan_loss(x, True))
    monkeypatch.delenv("GANENGINE_BACKEND")
    assert _lean_node(GF.gan_loss(x, True)) and _dispatch.last_used["gan_loss"] == "cpu"


def test_lean_op_of_a_missing_entry_is_none(monkeypatch):
    monkeypatch.setattr(_dispatch, "_LEAN", {})
    with backends.use_backend("cpu"):
        assert _dispatch.lean_op("no_such_entry", ()) is None
        assert _dispatch.lean_op("gan_loss", ("no_such_kernel",)) is None  # a kernel it calls missing
        assert _dispatch._LEAN == {"no_such_entry": None, "gan_loss": None}


@needs_lean
def test_strict_and_debug_requests_take_the_lean_entry_without_fallback(monkeypatch):
    monkeypatch.setenv("GANENGINE_DEBUG", "1")
    x = torch.randn(2, 1, 3, 3, requires_grad=True)
    import warnings

    with backends.use_backend("cpu"), backends.strict(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn under debug, raise under strict
        assert _lean_node(GF.gan_loss(x, True, "vanilla"))
        assert not _lean_node(GF.gan_loss(x, True, "Vanilla"))  # declined: the cpu backend serves it
        assert _dispatch.last_used["gan_loss"] == "cpu"


def test_refused_rules():
    prefix = "op: not served by the C++ entry"
    t = torch.ones(1)
    assert _dispatch.refused(NotImplementedError(prefix + " (x)"), prefix, t)
    assert not _dispatch.refused(NotImplementedError("a dtype dispatch failed"), prefix, t)
    assert not _dispatch.refused(RuntimeError("kernel failed"), prefix, t, None, required=(t,))
    assert _dispatch.refused(RuntimeError("Expected a value of type"), prefix, [1.0], required=(t,))
    assert _dispatch.refused(RuntimeError("Expected a value of type"), prefix, None, required=(t, None))
    # a served call's own NotImplementedError is not a refusal, whatever the arguments
    assert not _dispatch.refused(NotImplementedError("boom"), prefix, [1.0])


@needs_lean
def test_maps_off_the_cpu_do_not_ask_the_lean_entry(monkeypatch):
    # the entry refuses them (a C++ exception, ~30 us): a GPU step paid that on every call
    asked = []
    real = _dispatch.lean_op
    monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: asked.append(a[0]) or real(*a, **k))
    m = torch.randn(2, 1, 3, 3, device="meta")
    with backends.use_backend("auto"):
        assert GF.gan_loss(m, True, "vanilla").device.type == "meta"
        assert GF.gan_loss([m, m], False, "hinge").device.type == "meta"
        assert GF.discriminator_loss(m, m, "lsgan").device.type == "meta"
        assert asked == []
        x = torch.randn(2, 1, 3, 3, requires_grad=True)
        assert _lean_node(GF.gan_loss([x, x], True)) and _lean_node(GF.discriminator_loss(x, x))
        assert asked == ["gan_loss", "discriminator_loss"]
        # a CPU first map beside a map elsewhere is still asked (and refused): the full route's error
        with pytest.raises(ValueError, match="logits\\[1\\] is on meta"):
            GF.gan_loss([x, m], True)


# ----------------------------------------------------------------------------- the entries on CUDA tensors
@needs_lean
def test_cuda_entry_resolution(monkeypatch):
    """On CUDA maps the entries are taken where the cuda backend is the one chosen: 'auto' (the
    losses' auto order puts cuda first) or 'cuda', not 'triton'/'torch', and never without the CUDA
    kernel."""
    resolver = CudaEntryResolver(monkeypatch)

    def resolve(name, backend):
        return resolver(backend, name, "gan_loss", L._ADV_KERNELS)

    for name in ("gan_loss", "discriminator_loss"):
        entry = _ext.op(name).default._op
        assert resolve(name, "auto") is entry and resolve(name, "cuda") is entry
        assert resolve(name, "triton") is None and resolve(name, "torch") is None
    resolver.cuda_kernels = False
    assert resolve("gan_loss", "auto") is None and resolve("gan_loss", "cuda") is None


@needs_lean
def test_entries_refuse_devices_without_a_kernel():
    m = torch.randn(2, 1, 3, 3, device="meta")
    x = torch.randn(2, 1, 3, 3)
    for call in (lambda: torch.ops.ganengine_C.gan_loss([m], "vanilla", True, True, 1.0, 0.0),
                 lambda: torch.ops.ganengine_C.gan_loss([x, m], "vanilla", True, True, 1.0, 0.0),
                 lambda: torch.ops.ganengine_C.discriminator_loss(x, m, "lsgan", 1.0, 0.0)):
        with pytest.raises(NotImplementedError, match="not served by the C\\+\\+ entry \\(logits\\)"):
            call()


@pytest.mark.gpu
@needs_lean
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_entries_match_the_python_cuda_route(monkeypatch, dtype):
    """On CUDA maps 'auto' runs the C++ entries over the CUDA kernel: the Python route's bits on the
    same kernel (forward, gradients with grad_output 1 and not 1, a second backward, create_graph),
    grad_output never read on the host."""
    if not _ext.has_kernel("losses_adv_fwd", "CUDA"):
        pytest.skip("ganengine._C without the CUDA loss kernels")

    def run(entry, fn, base, gys, create_graph=False):
        xs = [x.detach().clone().cuda().requires_grad_(True) for x in base]
        with backends.use_backend("auto"), monkeypatch.context() as mp:
            if not entry:
                mp.setattr(_dispatch, "cuda_entry", lambda *a, **k: None)
            out = fn(xs)
        assert _lean_node(out) == entry
        res = [out.detach()]
        for gy in gys:
            g1 = torch.autograd.grad(out, xs, gy.to(out.dtype).cuda(), create_graph=create_graph, retain_graph=True)
            res += [g.detach() for g in g1]
        return res

    gys = [torch.tensor(1.0), torch.tensor(0.37)]
    for mode, for_disc in TERMS:
        for form in ("single", "list"):
            fn = _gan(mode, True, for_disc, form)
            base = _maps(form, dtype)
            _same(run(True, fn, base, gys), run(False, fn, base, gys), mode)
            if dtype == torch.float32:
                _same(run(True, fn, base, gys[1:], True), run(False, fn, base, gys[1:], True), mode)
        real, fake = _maps("list", dtype, seed=3)
        fn = lambda xs, mode=mode: GF.discriminator_loss(xs[0], xs[1], mode)  # noqa: E731
        _same(run(True, fn, [real, fake], gys), run(False, fn, [real, fake], gys), mode)
