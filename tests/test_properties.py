"""Property-based tests (hypothesis, derandomized, bounded): every op on the torch and cpu
backends against eager on random small shapes and special values (inf, NaN, 1e30, constant
planes, empty dims), forward and backward: the same non-finite set (docs/nonfinite.md) and the
finite values within a normwise bound. The triton backend is swept too, under TRITON_INTERPRET=1
(tests/conftest.py); bf16 tl.dot is broken there, so everything here is fp32.
GANENGINE_PROPERTY_EXAMPLES=N sweeps N examples per test instead of 12 (exploration runs)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ganengine.functional as GF  # noqa: E402
from ganengine.ops import attention as A  # noqa: E402

from tests._backends import backend_params, on_backend  # noqa: E402
from tests._tolerance import gamma  # noqa: E402

BACKENDS = backend_params(["torch", "cpu", "triton"])


def _skip_rejected(fn):
    import functools

    @functools.wraps(fn)
    def run(*a, **k):
        try:
            fn(*a, **k)
        except _EagerRejects:
            pass
    return run


# GANENGINE_PROPERTY_EXAMPLES=500 sweeps deeper (an exploration run, not CI)
_EXAMPLES = int(os.environ.get("GANENGINE_PROPERTY_EXAMPLES", "12"))
PROFILE = settings(max_examples=_EXAMPLES, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SPECIAL = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0]


@st.composite
def tensors(draw, shape, specials=True, constant_planes=False, huge=True):
    """A random fp32 tensor of ``shape`` with a few special values and (optionally) constant planes."""
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * draw(st.sampled_from([1.0, 10.0, 1e-3]))
    if x.numel() and constant_planes and len(shape) == 4 and draw(st.booleans()):
        x[0, 0] = draw(st.sampled_from([0.0, 3.5, -1e4]))
    if x.numel() and specials:
        for _ in range(draw(st.integers(0, 2))):
            i = draw(st.integers(0, x.numel() - 1))
            x.view(-1)[i] = draw(st.sampled_from(SPECIAL if huge else [v for v in SPECIAL if abs(v) != 1e30]))
    return x


def _same(actual, expected, n, what, c=8.0, ref=None, amplify=1.0):
    """Same NaN / inf positions and signs as eager; finite values within c gamma_n of the scale,
    against ``ref`` (the fp64 composition) where given: fp32 eager is not exact either (a
    constant plane of -1e4 normalises to 2e-3 there, to 0 here)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, what
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    inf_a = actual.isinf()
    assert torch.equal(inf_a, expected.isinf()), f"{what}: inf positions differ"
    assert torch.equal(actual[inf_a], expected[inf_a]), f"{what}: inf signs differ"
    fin = expected.isfinite()
    if ref is not None:
        ref = ref.detach().double()
        fin = fin & ref.isfinite()
        expected = ref
    if fin.any():
        scale = (expected[fin].abs().max().item() + 1.0) * amplify
        err = (actual[fin] - expected[fin]).abs().max().item()
        assert err <= c * gamma(max(n, 1), torch.float32) * scale + 1e-30, f"{what}: error {err:.3g} (scale {scale:.3g})"


class _EagerRejects(Exception):
    pass


def _eager(fn, inputs, g):
    """_grads of the eager composition; where eager itself rejects the input (an empty map, one
    spatial element in training) there is nothing to compare with (tests/test_robust_ops.py
    covers those cases)."""
    try:
        return _grads(fn, inputs, g)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise _EagerRejects(str(exc)) from exc


FP32_MAX = torch.finfo(torch.float32).max


def _norm64(x, dims, eps):
    """(x - mean) * invstd over ``dims`` in fp64 with eager's CPU rule (docs/nonfinite.md): ATen
    accumulates in double but stores M2 = sum (x - mean)^2 in fp32, so a plane whose M2 exceeds
    fp32 max gets invstd 0 (its output: the bias); a zero variance with eps = 0 gets 0 too."""
    mean = x.mean(dims, keepdim=True)
    m2 = ((x - mean) ** 2).sum(dims, keepdim=True)
    m2 = torch.where(m2 > FP32_MAX, torch.full_like(m2, float("inf")), m2)
    v = m2 / (x.numel() // max(m2.numel(), 1)) + eps
    ok = v > 0
    inv = torch.where(ok, torch.where(ok, v, torch.ones_like(v)).rsqrt(), torch.zeros_like(v))
    return (x - mean) * torch.where(v.isnan(), v, inv)


def _grads(fn, inputs, g):
    ins = [t.clone().requires_grad_() for t in inputs]
    out = fn(*ins)
    grads = torch.autograd.grad(out, ins, g(out) if callable(g) else g, allow_unused=True)
    return out, [torch.zeros_like(t) if d is None else d for t, d in zip(ins, grads)]


@pytest.mark.parametrize("backend", BACKENDS)
@PROFILE
@given(data=st.data(), n=st.integers(0, 2), c=st.integers(0, 3), h=st.integers(1, 5), w=st.integers(1, 6),
       act=st.sampled_from(["leaky_relu", "relu", "none"]), eps=st.sampled_from([1e-5, 0.0]))
@_skip_rejected
def test_instance_norm_act(backend, data, n, c, h, w, act, eps):
    # (1e30 included: a plane holding one collapses to act(bias) as eager, see _norm64)
    x = data.draw(tensors((n, c, h, w), specials=data.draw(st.booleans()), constant_planes=True))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    wt, bs = torch.randn(c, generator=g), torch.randn(c, generator=g)

    def eager(a, b, d):
        y = F.instance_norm(a, weight=b, bias=d, eps=eps)
        return y if act == "none" else F.leaky_relu(y, 0.2) if act == "leaky_relu" else F.relu(y)

    def eager64(a, b, d):
        y = _norm64(a, (2, 3), eps) * b[:, None, None] + d[:, None, None]
        return y if act == "none" else F.leaky_relu(y, 0.2) if act == "leaky_relu" else F.relu(y)

    ye, ge = _eager(eager, [x, wt, bs], lambda o: torch.ones_like(o))
    r64, g64 = _eager(eager64, [x.double(), wt.double(), bs.double()], lambda o: torch.ones_like(o))
    with on_backend(backend):
        y, gs = _grads(lambda a, b, d: GF.instance_norm_act(a, b, d, eps=eps, activation=act), [x, wt, bs],
                       lambda o: torch.ones_like(o))
    # (c: the normalisation's division by a small sd amplifies rounding)
    _same(y, ye, h * w, "y", c=64, ref=r64)
    if not x.isfinite().all():  # a non-finite plane: forward only (its gradient's NaN set is formula-dependent)
        return
    # dx carries rstd * |weight| (1 / sd amplifies the rounding of x - mean)
    var = x.double().var(dim=(2, 3), unbiased=False) if x.numel() else torch.zeros(1)
    rstd = (var + eps).clamp_min(1e-300).rsqrt().max().item() if var.numel() else 1.0
    amp = 1.0 + rstd * (wt.abs().max().item() if c else 0.0)
    for a, e, r, name in zip(gs, ge, g64, ["dx", "dw", "db"]):
        _same(a, e, n * h * w + 1, name, c=256, ref=r, amplify=amp if name == "dx" else 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@PROFILE
@given(data=st.data(), n=st.integers(1, 2), cin=st.integers(1, 5), cout=st.integers(1, 5), h=st.integers(4, 9),
       stride=st.sampled_from([1, 2]), k=st.sampled_from([3, 4]))
@_skip_rejected
def test_conv2d_and_conv_act(backend, data, n, cin, cout, h, stride, k):
    # (non-finite values yes; 1e30 no: Winograd is normwise accurate per tile, so a 1e30 pixel
    # leaves an absolute error of u * 1e30 on its tile's other outputs, and an activation's mask
    # can flip there: a stated difference in docs/nonfinite.md)
    x = data.draw(tensors((n, cin, h, h + 1), huge=False))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    wt = torch.randn(cout, cin, k, k, generator=g) * 0.2
    b = torch.randn(cout, generator=g)
    from ganengine.ops import conv as cv

    for fused in (False, True):
        def eager(a, ww, bb):
            y = F.conv2d(a, ww, bb, stride, 1)
            return F.leaky_relu(y, 0.2) if fused else y

        ye, ge = _eager(eager, [x, wt, b], lambda o: torch.ones_like(o))
        policy = data.draw(st.sampled_from(["auto", "always", "never"]))
        with on_backend(backend), cv.winograd_policy(policy), cv.gemm_policy(data.draw(st.sampled_from(["auto", "never"]))):
            fn = (lambda a, ww, bb: GF.conv2d_act(a, ww, bb, stride, 1)) if fused else \
                (lambda a, ww, bb: GF.conv2d(a, ww, bb, stride, 1))
            y, gs = _grads(fn, [x, wt, b], lambda o: torch.ones_like(o))
        red = cin * k * k
        _same(y, ye, red, "y", c=32)  # (c: Winograd transforms, error within ~30x of direct)
        for a, e, name in zip(gs, ge, ["dx", "dw", "db"]):
            _same(a, e, red * n * h * h, name, c=32)


@pytest.mark.parametrize("backend", BACKENDS)
@PROFILE
@given(data=st.data(), c=st.integers(1, 5), h=st.integers(2, 8), reflect=st.booleans(), tile=st.sampled_from([2, 4]))
@_skip_rejected
def test_conv3x3(backend, data, c, h, reflect, tile, monkeypatch):
    from ganengine.ops import conv3x3 as c3

    monkeypatch.setattr(c3, "MIN_CHANNELS", 0)
    monkeypatch.setattr(c3, "MIN_TILES", 0)
    monkeypatch.setenv("GANENGINE_WINOGRAD_TILE", str(tile))
    x = data.draw(tensors((1, c, h, h + 2), huge=False))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    wt, b = torch.randn(3, c, 3, 3, generator=g) * 0.3, torch.randn(3, generator=g)
    ye, ge = _eager(lambda a, ww, bb: c3.reference_conv3x3(a, ww, bb, 1, reflect), [x, wt, b],
                    lambda o: torch.ones_like(o))
    with on_backend(backend):
        y, gs = _grads(lambda a, ww, bb: GF.conv3x3(a, ww, bb, 1, "reflect" if reflect else "zeros"), [x, wt, b],
                       lambda o: torch.ones_like(o))
    _same(y, ye, 9 * c, "y", c=64)  # (c: F(4, 3)'s transforms, ~30x the direct conv's error)
    for a, e, name in zip(gs, ge, ["dx", "dw", "db"]):
        _same(a, e, 9 * c * h * h, name, c=64)


@pytest.mark.parametrize("backend", BACKENDS)
@PROFILE
@given(data=st.data(), b=st.integers(1, 2), d=st.integers(1, 3), n=st.integers(1, 9), m=st.integers(1, 7),
       c=st.integers(1, 5), scale=st.sampled_from([0.1, 1.0, 10.0, 1e3]), gam=st.sampled_from([0.0, 0.7, float("nan")]))
@_skip_rejected
def test_attention(backend, data, b, d, n, m, c, scale, gam):
    seed = data.draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, d, n, generator=g) * scale, torch.randn(b, d, m, generator=g) * scale
    v, x = torch.randn(b, c, m, generator=g), torch.randn(b, c, n, generator=g)
    gt = torch.tensor([gam])
    go = torch.randn(b, c, n, generator=g)
    ye, ge = _eager(lambda a, bb, cc: A.reference_attention(a, bb, cc, x, gt), [q, k, v], go)
    with on_backend(backend):
        y, gs = _grads(lambda a, bb, cc: A.attention(a, bb, cc, x, gt), [q, k, v], go)
    _same(y, ye, m, "out", c=16)
    # (scale: the gradients carry |q| |k| |v| |grad|; saturated rows cancel exactly, see docs/nonfinite.md)
    for a, e, name in zip(gs, ge, ["dq", "dk", "dv"]):
        sc = max(scale, 1.0) * (1 + go.abs().max().item()) * (1 + v.abs().max().item())
        if e.isfinite().all():
            err = (a.double() - e.double()).abs().max().item()
            assert err <= 64 * gamma(n + m + c, torch.float32) * sc * (e.abs().max().item() + 1), name
        else:
            assert torch.equal(a.isnan(), e.isnan()), f"{name}: NaN positions differ"


def _loss_terms(x, mode):
    """mean |term| of a mean-reduced loss over x (the normwise scale of its rounding): |x| + 1
    bounds the vanilla (softplus), hinge and wgangp terms, (|x| + 1)^2 the lsgan ones; 1 where
    x holds inf / NaN (the non-finite set is compared instead)."""
    a = x.double().abs() + 1
    m = (a * a if mode == "lsgan" else a).mean().item()
    return m if m == m and m != float("inf") else 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@PROFILE
@given(data=st.data(), numel=st.integers(1, 40), mode=st.sampled_from(["vanilla", "lsgan", "hinge", "wgangp"]),
       real=st.booleans(), for_d=st.booleans())
@_skip_rejected
def test_gan_loss(backend, data, numel, mode, real, for_d):
    x = data.draw(tensors((numel,)))

    def eager(a):
        if mode == "vanilla":
            return F.binary_cross_entropy_with_logits(a, torch.full_like(a, float(real)))
        if mode == "lsgan":
            return F.mse_loss(a, torch.full_like(a, float(real)))
        if mode == "hinge" and for_d:
            return F.relu(1 - a).mean() if real else F.relu(1 + a).mean()
        return -a.mean() if real else a.mean()

    ye, (ge,) = _eager(eager, [x], torch.tensor(1.0))
    with on_backend(backend):
        y, (gs,) = _grads(lambda a: GF.gan_loss(a, real, mode, for_discriminator=for_d), [x], torch.tensor(1.0))
    _same(y.reshape(1), ye.reshape(1), numel, "loss", c=8, amplify=_loss_terms(x, mode))
    _same(gs, ge, 1, "grad", c=8)


@pytest.mark.parametrize("backend", BACKENDS)
@PROFILE
@given(data=st.data(), n=st.integers(1, 2), h=st.integers(1, 5), idt=st.booleans())
@_skip_rejected
def test_cycle_loss(backend, data, n, h, idt):
    ims = [data.draw(tensors((n, 3, h, h))) for _ in range(6 if idt else 4)]

    def eager(*t):
        tot = 10 * F.l1_loss(t[1], t[0]) + 10 * F.l1_loss(t[3], t[2])
        if idt:
            tot = tot + 5 * F.l1_loss(t[4], t[2]) + 5 * F.l1_loss(t[5], t[0])
        return tot

    ye, ge = _eager(eager, ims, torch.tensor(1.0))
    with on_backend(backend):
        y, gs = _grads(lambda *t: GF.cycle_loss(*t)[0], ims, torch.tensor(1.0))
    _same(y.reshape(1), ye.reshape(1), ims[0].numel(), "loss", c=8)
    for i, (a, e) in enumerate(zip(gs, ge)):
        _same(a, e, 2, f"grad {i}", c=8)


@pytest.mark.parametrize("backend", BACKENDS)
@PROFILE
@given(data=st.data(), n=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(1, 4),
       act=st.sampled_from(["relu", "leaky_relu", "none"]), training=st.booleans())
@_skip_rejected
def test_batch_norm_act(backend, data, n, c, h, act, training):
    if training and n * h * h == 1:
        return  # (eager: "Expected more than 1 value per channel when training")
    x = data.draw(tensors((n, c, h, h), specials=data.draw(st.booleans()), constant_planes=True))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    wt, bs = torch.randn(c, generator=g), torch.randn(c, generator=g)
    rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5

    def eager(a, ww, bb):
        y = F.batch_norm(a, rm.clone(), rv.clone(), ww, bb, training, 0.1, 1e-5)
        return y if act == "none" else F.leaky_relu(y, 0.2) if act == "leaky_relu" else F.relu(y)

    def eager64(a, ww, bb):
        if not training:
            return eager(a, ww, bb)
        y = _norm64(a, (0, 2, 3), 1e-5) * ww[:, None, None] + bb[:, None, None]
        return y if act == "none" else F.leaky_relu(y, 0.2) if act == "leaky_relu" else F.relu(y)

    ye, ge = _eager(eager, [x, wt, bs], lambda o: torch.ones_like(o))
    r64, g64 = _eager(eager64, [x.double(), wt.double(), bs.double()], lambda o: torch.ones_like(o))
    with on_backend(backend):
        y, gs = _grads(lambda a, ww, bb: GF.batch_norm_act(a, rm.clone(), rv.clone(), ww, bb, training=training,
                                                           activation=act), [x, wt, bs], lambda o: torch.ones_like(o))
    # (ref: fp32 eager is not exact on a constant channel of -1e4, the fused kernels are; the torch
    # backend is eager's own composition: compared with eager)
    if backend == "torch":
        r64, g64 = None, [None] * 3
    _same(y, ye, n * h * h, "y", c=64, ref=r64)
    if x.isfinite().all():
        amp = 1.0 + _bn_rstd(x, training, rv) * wt.abs().max().item()
        for a, e, r, name in zip(gs, ge, g64, ["dx", "dw", "db"]):
            _same(a, e, n * h * h + 1, name, c=256, ref=r, amplify=amp if name == "dx" else 1.0)


def _bn_rstd(x, training, rv, eps=1e-5):
    """Largest 1 / sd of the channels (what dx's rounding is amplified by)."""
    var = x.double().var(dim=(0, 2, 3), unbiased=False) if training else rv.double()
    return (var + eps).rsqrt().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@PROFILE
@given(data=st.data(), n=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(1, 4),
       act=st.sampled_from(["relu", "leaky_relu", "none"]), training=st.booleans())
@_skip_rejected
def test_conditional_batch_norm_act(backend, data, n, c, h, act, training):
    if training and n * h * h == 1:
        return  # (eager: "Expected more than 1 value per channel when training")
    x = data.draw(tensors((n, c, h, h), specials=data.draw(st.booleans()), constant_planes=True))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    gain, bs = 1 + torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
    rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5

    def eager(a, gg, bb):
        y = F.batch_norm(a, rm.clone(), rv.clone(), None, None, training, 0.1, 1e-5)
        y = y * gg[:, :, None, None] + bb[:, :, None, None]
        return y if act == "none" else F.leaky_relu(y, 0.2) if act == "leaky_relu" else F.relu(y)

    def eager64(a, gg, bb):
        if not training:
            return eager(a, gg, bb)
        y = _norm64(a, (0, 2, 3), 1e-5) * gg[:, :, None, None] + bb[:, :, None, None]
        return y if act == "none" else F.leaky_relu(y, 0.2) if act == "leaky_relu" else F.relu(y)

    ye, ge = _eager(eager, [x, gain, bs], lambda o: torch.ones_like(o))
    r64, g64 = _eager(eager64, [x.double(), gain.double(), bs.double()], lambda o: torch.ones_like(o))
    with on_backend(backend):
        y, gs = _grads(lambda a, gg, bb: GF.conditional_batch_norm_act(a, gg, bb, rm.clone(), rv.clone(),
                                                                       training=training, activation=act),
                       [x, gain, bs], lambda o: torch.ones_like(o))
    if backend == "torch":  # (eager's own composition: compared with eager, as test_batch_norm_act)
        r64, g64 = None, [None] * 3
    _same(y, ye, n * h * h, "y", c=64, ref=r64, amplify=1 + gain.abs().max().item())
    if x.isfinite().all():
        amp = 1.0 + _bn_rstd(x, training, rv) * gain.abs().max().item()
        for a, e, r, name in zip(gs, ge, g64, ["dx", "dgain", "dbias"]):
            _same(a, e, n * h * h + 1, name, c=256, ref=r, amplify=amp if name == "dx" else 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@PROFILE
@given(data=st.data(), numel=st.integers(1, 40), mode=st.sampled_from(["vanilla", "lsgan", "hinge", "wgangp"]))
@_skip_rejected
def test_discriminator_loss(backend, data, numel, mode):
    real, fake = data.draw(tensors((numel,))), data.draw(tensors((numel,)))

    def term(a, is_real):
        if mode == "vanilla":
            return F.binary_cross_entropy_with_logits(a, torch.full_like(a, float(is_real)))
        if mode == "lsgan":
            return F.mse_loss(a, torch.full_like(a, float(is_real)))
        if mode == "hinge":
            return F.relu(1 - a).mean() if is_real else F.relu(1 + a).mean()
        return -a.mean() if is_real else a.mean()

    ye, ge = _eager(lambda r, f: 0.5 * (term(r, True) + term(f, False)), [real, fake], torch.tensor(1.0))
    with on_backend(backend):
        y, gs = _grads(lambda r, f: GF.discriminator_loss(r, f, mode), [real, fake], torch.tensor(1.0))
    # (the two means cancel: real = fake = [1e30, ...] gives 0 from terms of 1e30)
    _same(y.reshape(1), ye.reshape(1), numel, "loss", c=8,
          amplify=_loss_terms(real, mode) + _loss_terms(fake, mode))
    for a, e, name in zip(gs, ge, ["d real", "d fake"]):
        _same(a, e, 1, name, c=8)


def _eager_spectral_norm(w, u, n_iter, eps):
    """torch.nn.utils.parametrizations.spectral_norm's numbers from u alone: v = normalize(M^T u),
    then n (u = normalize(M v), v = normalize(M^T u)) under no_grad; sigma = vdot(u, M v)."""
    m = w.flatten(1)
    with torch.no_grad():
        md = m.detach()
        v = F.normalize(torch.mv(md.t(), u), dim=0, eps=eps)
        for _ in range(n_iter):
            u = F.normalize(torch.mv(md, v), dim=0, eps=eps)
            v = F.normalize(torch.mv(md.t(), u), dim=0, eps=eps)
    sigma = torch.vdot(u, torch.mv(m, v))
    return w / sigma, u, sigma


@pytest.mark.parametrize("backend", BACKENDS)
@PROFILE
@given(data=st.data(), h=st.integers(1, 6), cin=st.integers(1, 4), k=st.sampled_from([1, 3]),
       n_iter=st.integers(0, 2), scale=st.sampled_from([1.0, 1e-3, 1e3]), eps=st.sampled_from([1e-12, 1e-4]))
@_skip_rejected
def test_spectral_norm_weight(backend, data, h, cin, k, n_iter, scale, eps):
    w = data.draw(tensors((h, cin, k, k), specials=data.draw(st.booleans()), huge=False)) * scale
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    u = F.normalize(torch.randn(h, generator=g), dim=0)
    go = torch.randn(w.shape, generator=g)
    (ye, ue, se), (ge,) = _eager_pair(lambda a: _eager_spectral_norm(a, u.clone(), n_iter, eps), w, go)
    (r64, _, s64), (g64,) = _eager_pair(lambda a: _eager_spectral_norm(a, u.double(), n_iter, eps), w.double(), go.double())
    with on_backend(backend):
        (y, un, s), (gs,) = _eager_pair(lambda a: GF.spectral_norm_weight(a, u.clone(), n_iter, eps), w, go, check=False)
    red = h + w.numel() // h
    # (amplify: ||W||_F / sigma, how much a normalisation's relative error grows through the
    # iteration; c: 4 per chained reduction, as tests/test_spectral_norm.py's bound)
    amp = 1.0
    if r64.isfinite().all():
        amp = (w.double().norm() / (w.double() / r64).flatten()[r64.flatten().abs().argmax()]).abs().item() \
            if r64.abs().max() > 0 else 1.0
    c = 4.0 * (2 * n_iter + 3)
    _same(y, ye, red, "w_sn", c=c, ref=r64, amplify=amp)
    _same(s.reshape(1), se.reshape(1), red, "sigma", c=c, amplify=amp)
    _same(un, ue, red, "u", c=c, amplify=amp)
    if w.isfinite().all():
        # (dw = (go - <go, w_sn> u v^T) / sigma: terms of |go| / sigma cancel, e.g. to 0 for one element)
        inv_sigma = max(1.0, 1.0 / abs(s64.item())) if s64.item() != 0 else 1.0
        _same(gs, ge, red, "dw", c=4 * c, ref=g64, amplify=amp * (1 + go.abs().max().item()) * inv_sigma)


def _eager_pair(fn, w, go, check=True):
    """(outputs, (dw,)) of fn(w) -> (w_sn, u, sigma), backpropagating ``go`` through w_sn."""
    wl = w.clone().requires_grad_()
    try:
        outs = fn(wl)
    except (RuntimeError, ValueError, IndexError) as exc:
        if not check:
            raise
        raise _EagerRejects(str(exc)) from exc
    (dw,) = torch.autograd.grad(outs[0], [wl], go)
    return outs, (dw,)
