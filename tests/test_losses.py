"""Fused GAN loss reductions: every backend against the torch composition, the CycleGAN
reference's GANLoss semantics, the WGAN-GP penalty, custom-op checks, compile, determinism."""
from __future__ import annotations

import contextlib

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ganengine
import ganengine.functional as GF
import ganengine.nn as gnn
from ganengine import backends
from ganengine.ops import _dispatch, _eager
from ganengine.ops import losses as L
from tests._backends import out_round, autograd_node_names
from tests._model_bounds import Census, assert_normwise
from tests._tolerance import assert_below, gamma, unit_roundoff

MODES = ["vanilla", "lsgan", "hinge", "wgangp"]
# Bounds (tests/_tolerance.py): a loss is a sum of n per-element terms, each evaluated with a few
# roundings (a subtraction, a square or log1p/exp, the label's product: <= 8 ulps of its scale s_i)
# and reduced in any order: |error| <= gamma_{n+8}(acc) * |weight| * mean(s_i), with s_i what the
# term's formula adds in absolute value (vanilla: max(x, 0), x t, log1p(exp(-|x|)) <= 2|x| + 1;
# lsgan: (|x| + |t|)^2; hinge: 1 + |x|; linear: |x|; L1: |a| + |b|). A gradient is elementwise:
# weight / n times f'(x) evaluated with a few roundings: gamma_8 * |weight| / n * s'_i (vanilla:
# sigmoid(x) + |t| <= 1 + |t|; lsgan: 2(|x| + |t|); hinge, linear, L1: 1). fp16/bf16 results
# are rounded once more, and the terms of a total may be stored in that format first: 4 u(dtype).
GRAD_OPS = 8


def cpu_backends():
    return ["torch", "cpu", "triton"]


@contextlib.contextmanager
def run_on(backend, device="cpu"):
    if not backends.serves(backend, torch.device(device)):
        pytest.skip(f"backend {backend} does not serve {device} here: {backends.status()[backend]}")
    with ganengine.use_backend(backend), backends.strict():
        yield


# ------------------------------------------------------------------------ oracles
class ReferenceGANLoss(nn.Module):
    """The CycleGAN reference's GANLoss (models/networks.py), reproduced as the oracle."""

    def __init__(self, gan_mode, target_real_label=1.0, target_fake_label=0.0):
        super().__init__()
        self.register_buffer("real_label", torch.tensor(target_real_label))
        self.register_buffer("fake_label", torch.tensor(target_fake_label))
        self.gan_mode = gan_mode
        if gan_mode == "lsgan":
            self.loss = nn.MSELoss()
        elif gan_mode == "vanilla":
            self.loss = nn.BCEWithLogitsLoss()
        elif gan_mode in ["wgangp"]:
            self.loss = None
        else:
            raise NotImplementedError("gan mode %s not implemented" % gan_mode)

    def get_target_tensor(self, prediction, target_is_real):
        target_tensor = self.real_label if target_is_real else self.fake_label
        return target_tensor.expand_as(prediction)

    def __call__(self, prediction, target_is_real):
        if self.gan_mode in ["lsgan", "vanilla"]:
            target_tensor = self.get_target_tensor(prediction, target_is_real)
            loss = self.loss(prediction, target_tensor)
        elif self.gan_mode == "wgangp":
            loss = -prediction.mean() if target_is_real else prediction.mean()
        return loss


def torch_gan_loss(x, real, mode, for_discriminator=True, real_label=1.0, fake_label=0.0):
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(x, torch.full_like(x, real_label if real else fake_label))
    if mode == "lsgan":
        return F.mse_loss(x, torch.full_like(x, real_label if real else fake_label))
    if mode == "hinge" and for_discriminator:
        return torch.relu(1 - x).mean() if real else torch.relu(1 + x).mean()
    return -x.mean() if real else x.mean()


def torch_cycle_loss(real_a, rec_a, real_b, rec_b, idt_a=None, idt_b=None, la=10.0, lb=10.0, li=0.5):
    terms = {"cycle_a": F.l1_loss(rec_a, real_a) * la, "cycle_b": F.l1_loss(rec_b, real_b) * lb}
    if idt_a is not None:
        terms["idt_a"] = F.l1_loss(idt_a, real_b) * lb * li
        terms["idt_b"] = F.l1_loss(idt_b, real_a) * la * li
    return sum(terms.values()), terms


def logits(shape, dtype=torch.float32, scale=3.0):
    x = torch.randn(shape, dtype=torch.float64) * scale
    return x.to(dtype)


def elem_scales(x, real, mode, for_discriminator=True, labels=(1.0, 0.0)):
    """(s, s') per element of a GAN loss term (see above), fp64."""
    xa = x.detach().double().abs()
    t = abs(labels[0] if real else labels[1])
    if mode == "vanilla":
        return 2 * xa + 1, torch.full_like(xa, 1 + t)
    if mode == "lsgan":
        return (xa + t) ** 2, 2 * (xa + t)
    if mode == "hinge" and for_discriminator:
        return 1 + xa, torch.ones_like(xa)
    return xa, torch.ones_like(xa)


def loss_scale(terms):
    """sum of |weight| * mean(s) over (weight, s) terms."""
    return sum(abs(w) * s.mean().item() for w, s in terms)


def assert_close(actual, expected, dtype, n, scale, backend=None, sides=1):
    """|actual - expected| <= sides * (gamma_{n + 8}(acc) scale (+ 4 u(dtype) scale for fp16/bf16)),
    plus the result's rounding; ``n`` the terms reduced (GRAD_OPS for an elementwise gradient)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    low = 4 * unit_roundoff(dtype) if dtype in (torch.float16, torch.bfloat16) else 0.0
    allowed = sides * (gamma(n + GRAD_OPS, acc) + low) * scale
    assert_below(actual, expected, allowed, out_round=out_round(backend or "torch", actual.dtype))


def assert_gan_loss(loss, grad, ref, gref, x, real, mode, dtype, weight=1.0, for_disc=True, backend=None,
                    labels=(1.0, 0.0), sides=1):
    """A gan_loss value and its gradient within the bounds above (weight: what the loss was scaled by)."""
    s, sg = elem_scales(x, real, mode, for_disc, labels)
    assert_close(loss, ref, dtype, x.numel(), loss_scale([(weight, s)]), backend, sides)
    if grad is not None:
        assert_close(grad, gref, dtype, 0, abs(weight) / x.numel() * sg, backend, sides)


# ------------------------------------------------------------------------ gan_loss
# 1 element, odd, just over the Triton chunk (4096) and the C++ chunk (32768)
SHAPES = [(1,), (2, 1, 7, 9), (4097,), (1, 1, 182, 182)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gan_loss_matches_torch(backend, mode, shape):
    x = logits(shape)
    for real in (True, False):
        for for_disc in ((True, False) if mode == "hinge" else (True,)):
            xg = x.clone().requires_grad_()
            with run_on(backend):
                loss = GF.gan_loss(xg, real, mode, for_disc)
                (g,) = torch.autograd.grad(loss * 3.0, xg)
            assert _dispatch.last_used["gan_loss"] == backend
            x64 = x.double().requires_grad_()
            ref = torch_gan_loss(x64, real, mode, for_disc)
            (gref,) = torch.autograd.grad(ref * 3.0, x64)
            assert loss.dtype == torch.float32 and loss.shape == ()
            assert_gan_loss(loss * 3.0, g, ref * 3.0, gref, x, real, mode, torch.float32, 3.0, for_disc, backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", MODES)
def test_gan_loss_on_several_maps_is_the_sum_of_their_means(backend, mode):
    """CycleGAN's generator step: both discriminator maps in one call (different sizes)."""
    xs = [logits((1, 1, 30, 30)), logits((2, 1, 7, 5)), logits((1,))]
    for real in (True, False):
        xg = [x.clone().requires_grad_() for x in xs]
        with run_on(backend):
            loss = GF.gan_loss(xg, real, mode, for_discriminator=False)
            grads = torch.autograd.grad(loss * 2.0, xg)
        assert _dispatch.last_used["gan_loss"] == backend
        x64 = [x.double().requires_grad_() for x in xs]
        ref = sum(torch_gan_loss(x, real, mode, False) for x in x64)
        refs = torch.autograd.grad(ref * 2.0, x64)
        assert loss.shape == () and loss.dtype == torch.float32
        n = sum(x.numel() for x in xs)
        assert_close(loss, ref, torch.float32, n, loss_scale([(1.0, elem_scales(x, real, mode, False)[0]) for x in xs]))
        for g, r, x in zip(grads, refs, xs):
            assert_close(g, r, torch.float32, 0, 2.0 / x.numel() * elem_scales(x, real, mode, False)[1], backend)
    with run_on(backend):  # a tuple works too, and a one-map list equals the plain call
        a = GF.gan_loss(tuple(xs[:1]), True, mode)
        b = GF.gan_loss(xs[0], True, mode)
    assert torch.equal(a, b)  # the same call


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_gan_loss_dtypes(backend, dtype, mode):
    x = logits((3, 1, 13, 11), dtype)
    xg = x.clone().requires_grad_()
    with run_on(backend):
        loss = GF.gan_loss(xg, True, mode)
        loss.backward()
    assert loss.dtype == dtype and xg.grad.dtype == dtype  # torch's losses keep the input dtype
    x64 = x.double().requires_grad_()
    ref = torch_gan_loss(x64, True, mode)
    ref.backward()
    assert_gan_loss(loss, xg.grad, ref, x64.grad, x, True, mode, dtype, backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_gan_loss_bce_is_stable(backend):
    x = torch.tensor([-200.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 200.0])
    for real in (True, False):
        xg = x.clone().requires_grad_()
        with run_on(backend):
            loss = GF.gan_loss(xg, real, "vanilla")
            loss.backward()
        ref = torch_gan_loss(x.double(), real, "vanilla")
        assert torch.isfinite(loss) and torch.isfinite(xg.grad).all()
        assert_gan_loss(loss, None, ref, None, x, real, "vanilla", torch.float32)


@pytest.mark.parametrize("backend", cpu_backends())
def test_gan_loss_non_contiguous_and_hinge_kinks(backend):
    base = logits((6, 1, 10, 16))
    base[0, 0, 0, :4] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # relu kinks: torch's gradient there is 0
    x = base[:, :, :, ::2].transpose(2, 3)
    assert not x.is_contiguous()
    for mode in MODES:
        xg = x.detach().requires_grad_()  # a non-contiguous leaf
        with run_on(backend):
            loss = GF.gan_loss(xg, True, mode) + GF.gan_loss(xg, False, mode)
            (g,) = torch.autograd.grad(loss, xg)
        x64 = x.double().requires_grad_()
        ref = torch_gan_loss(x64, True, mode) + torch_gan_loss(x64, False, mode)
        (gref,) = torch.autograd.grad(ref, x64)
        s = [elem_scales(x, real, mode) for real in (True, False)]
        assert_close(loss, ref, torch.float32, 2 * x.numel(), loss_scale([(1.0, s[0][0]), (1.0, s[1][0])]))
        assert_close(g, gref, torch.float32, 0, (s[0][1] + s[1][1]) / x.numel(), backend)


@pytest.mark.parametrize("modes", [(0,), (1,), (2, 3), (0, 0), (1, 1), (4,)], ids=str)
def test_triton_single_launch_loss_has_the_two_stage_bits(modes, monkeypatch):
    """Maps that fit one CHUNK run both reduction stages in one program (one launch instead of
    two): the total and the gradients are bitwise those of the two-stage kernels (forced here by
    a smaller CHUNK, which only adds programs that sum zeros)."""
    from ganengine.bench.traffic import TritonTraffic
    from ganengine.kernels import losses as K

    if not backends.triton_interpret():
        pytest.skip("the Triton kernels run on CPU tensors under TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 1, 30, 30, generator=g) * 3 for _ in modes]
    xs[0].view(-1)[:3] = torch.tensor([0.0, 1.0, -1.0])  # the hinge kinks
    targets, scales = [1.0, 0.0][:len(modes)], [0.5 / 1800] * len(modes)
    with TritonTraffic() as one:
        total, grads = K.adv_fwd(xs, list(modes), targets, scales, True)
    monkeypatch.setattr(K, "CHUNK", 512)
    with TritonTraffic() as two:
        total2, grads2 = K.adv_fwd(xs, list(modes), targets, scales, True)
    assert [l.kernel for l in one.launches] == ["_adv_single_kernel"]
    assert [l.kernel for l in two.launches] == ["_adv_partial_kernel", "_final_kernel"]
    assert torch.equal(total, total2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", MODES)
def test_discriminator_loss(backend, mode):
    real, fake = logits((2, 1, 9, 7)), logits((3, 1, 5, 5))  # different shapes are allowed
    rg, fg = real.clone().requires_grad_(), fake.clone().requires_grad_()
    with run_on(backend):
        loss = GF.discriminator_loss(rg, fg, mode)
        loss.backward()
    r64, f64 = real.double().requires_grad_(), fake.double().requires_grad_()
    ref = 0.5 * (torch_gan_loss(r64, True, mode) + torch_gan_loss(f64, False, mode))
    ref.backward()
    (sr, gr), (sf, gf) = elem_scales(real, True, mode), elem_scales(fake, False, mode)
    assert_close(loss, ref, torch.float32, real.numel() + fake.numel(), loss_scale([(0.5, sr), (0.5, sf)]))
    assert_close(rg.grad, r64.grad, torch.float32, 0, 0.5 / real.numel() * gr, backend)
    assert_close(fg.grad, f64.grad, torch.float32, 0, 0.5 / fake.numel() * gf, backend)


# ------------------------------------------------------------------------ GANLoss vs the reference
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", ["vanilla", "lsgan", "wgangp"])
@pytest.mark.parametrize("labels", [(1.0, 0.0), (0.9, 0.1)])
def test_ganloss_module_matches_reference(backend, mode, labels):
    ref_mod = ReferenceGANLoss(mode, *labels)
    mod = gnn.GANLoss(mode, *labels)
    assert list(mod.state_dict()) == list(ref_mod.state_dict()) == ["real_label", "fake_label"]
    for shape in [(1, 1, 30, 30), (4, 1, 1, 1), (2, 5)]:
        x = logits(shape)
        for real in (True, False):
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            with run_on(backend):
                got = mod(xa, real)
                got.backward()
            want = ref_mod(xb, real)
            want.backward()
            # both fp32: each within the bound of the exact value, apart by twice it
            assert_gan_loss(got, xa.grad, want, xb.grad, x, real, mode, torch.float32, labels=labels,
                            backend=backend, sides=2)


@pytest.mark.parametrize("mode", ["vanilla", "lsgan"])
def test_ganloss_module_follows_its_label_buffers(mode):
    """The reference reads real_label / fake_label on every call: an edit in place (a smoothing
    schedule), a new buffer, a load, all take effect (the module caches them as floats)."""
    mod, ref_mod = gnn.GANLoss(mode), ReferenceGANLoss(mode)
    x = logits((2, 1, 5, 5))
    mod.real_label.fill_(0.9)
    ref_mod.real_label.fill_(0.9)
    torch.testing.assert_close(mod(x, True), ref_mod(x, True))
    mod.fake_label = torch.tensor(0.2)
    ref_mod.fake_label = torch.tensor(0.2)
    torch.testing.assert_close(mod(x, False), ref_mod(x, False))
    torch.testing.assert_close(mod.discriminator(x, x), 0.5 * (ref_mod(x, True) + ref_mod(x, False)))
    other = gnn.GANLoss(mode)
    other.load_state_dict(mod.state_dict())
    torch.testing.assert_close(other(x, True), ref_mod(x, True))
    assert "target_real_label=0.9" in repr(other)
    # writes through .data (no version bump; a new storage) after a first call, as the reference sees them
    mod(x, True)
    for write in (lambda t: t.data.fill_(0.7), lambda t: setattr(t, "data", torch.tensor(0.6))):
        write(mod.real_label)
        write(ref_mod.real_label)
        torch.testing.assert_close(mod(x, True), ref_mod(x, True))
        assert f"target_real_label={float(ref_mod.real_label):.7g}" in repr(mod)
    twin = copy.deepcopy(mod)   # (its own buffers: a write to them is its own, and seen)
    twin.real_label.data.fill_(0.3)
    assert twin._current()[0] == pytest.approx(0.3) and mod._current()[0] == pytest.approx(0.6)


def test_ganloss_module_loads_on_the_meta_device():
    mod = gnn.GANLoss("lsgan").to("meta")
    mod.load_state_dict(gnn.GANLoss("lsgan", 0.9).state_dict())   # (a no-op copy to meta, as torch's)
    real = gnn.GANLoss("lsgan").to("meta")
    real.load_state_dict(gnn.GANLoss("lsgan", 0.9).state_dict(), assign=True)
    assert real.real_label.device.type == "cpu" and real._current()[0] == pytest.approx(0.9)


def test_ganloss_module_compiles_fullgraph_with_loaded_labels():
    """No graph break (the label check is not traced), and a load before compiling is seen."""
    mod, ref_mod = gnn.GANLoss("lsgan"), ReferenceGANLoss("lsgan", 0.8, 0.1)
    mod.load_state_dict(ref_mod.state_dict())
    x = logits((2, 1, 5, 5))
    fn = torch.compile(lambda t: mod(t, True) + mod(t, False), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(x), ref_mod(x, True) + ref_mod(x, False))


def test_ganloss_module_hinge_and_state_dict():
    mod = gnn.GANLoss("hinge")
    x = logits((2, 1, 4, 4))
    n, f32 = x.numel(), torch.float32
    # both fp32 sides within the bounds above: twice them
    one = lambda real, mode="hinge", d=True, lab=(1.0, 0.0): loss_scale([(1.0, elem_scales(x, real, mode, d, lab)[0])])  # noqa
    assert_close(mod(x, True), torch.relu(1 - x).mean(), f32, n, one(True), sides=2)
    assert_close(mod(x, False), torch.relu(1 + x).mean(), f32, n, one(False), sides=2)
    assert_close(mod(x, True, for_discriminator=False), -x.mean(), f32, n, one(True, d=False), sides=2)
    both = loss_scale([(0.5, elem_scales(x, True, "hinge")[0]), (0.5, elem_scales(2 * x, False, "hinge")[0])])
    assert_close(mod.discriminator(x, 2 * x), 0.5 * (torch.relu(1 - x).mean() + torch.relu(1 + 2 * x).mean()),
                 f32, 2 * n, both, sides=2)
    # labels loaded from a reference checkpoint are used
    lsgan = gnn.GANLoss("lsgan")
    lsgan.load_state_dict(ReferenceGANLoss("lsgan", 0.8, 0.2).state_dict())
    assert_close(lsgan(x, True), F.mse_loss(x, torch.full_like(x, 0.8)), f32, n, one(True, "lsgan", lab=(0.8, 0.2)),
                 sides=2)
    with pytest.raises(ValueError, match="gan_mode"):
        gnn.GANLoss("wgan")


# ------------------------------------------------------------------------ cycle_loss
# 1 element, odd, just over the Triton chunk (4096), just over the C++ chunk (32768: cpu only,
# the interpreter is slow there and the Triton tail is covered by 4107)
CYCLE_SHAPES = [(1, 1, 1, 1), (1, 3, 7, 5), (1, 3, 37, 37), (1, 3, 105, 105)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", CYCLE_SHAPES)
@pytest.mark.parametrize("identity", [True, False])
def test_cycle_loss_matches_torch(backend, shape, identity):
    if shape == CYCLE_SHAPES[-1] and backend != "cpu":
        pytest.skip("C++ chunk boundary: cpu backend only")
    imgs = [torch.randn(shape, dtype=torch.float64).float() for _ in range(6)]
    imgs[1].view(-1)[0] = imgs[0].view(-1)[0]  # L1 gradient at 0 is 0 (sign(0)), as torch
    need = [True, True, False, True, True, True]  # real_b needs no grad, real_a does (both targets)
    ours = [t.clone().requires_grad_(r) for t, r in zip(imgs, need)]
    refs = [t.double().requires_grad_(r) for t, r in zip(imgs, need)]
    extra = (2.5, 4.0, 0.25)
    with run_on(backend):
        total, terms = GF.cycle_loss(*ours[:4], *(ours[4:] if identity else (None, None)), *extra)
        (total * 2).backward()
    assert _dispatch.last_used["cycle_loss"] == backend
    rtotal, rterms = torch_cycle_loss(*refs[:4], *(refs[4:] if identity else (None, None)), *extra)
    (rtotal * 2).backward()
    assert list(terms) == list(rterms)
    la, lb, li = extra
    pairs = {"cycle_a": (la, 0, 1), "cycle_b": (lb, 2, 3), "idt_a": (lb * li, 3, 4), "idt_b": (la * li, 0, 5)}
    s = {k: (w, imgs[i].abs().double() + imgs[j].abs().double()) for k, (w, i, j) in pairs.items() if k in terms}
    n = imgs[0].numel()
    assert_close(total, rtotal, torch.float32, len(s) * n, loss_scale(s.values()))
    for k in terms:
        assert_close(terms[k], rterms[k], torch.float32, n, loss_scale([s[k]]))
    for o, r, req in zip(ours, refs, need):
        if not identity and o is ours[4]:
            break
        if req:  # at most every term's weight (x2, the backward's scale) per element
            assert_close(o.grad, r.grad, torch.float32, 0, 2 * sum(w for w, _ in s.values()) / n, backend)
    assert ours[1].grad.view(-1)[0] == 0


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cycle_loss_dtypes_and_non_contiguous(backend, dtype):
    base = [torch.randn(2, 3, 11, 14, dtype=torch.float64).to(dtype) for _ in range(6)]
    imgs = [b[..., ::2].transpose(-1, -2) for b in base]  # non-contiguous views
    ours = [t.detach().requires_grad_(i % 2 == 1 or i >= 4) for i, t in enumerate(imgs)]
    refs = [t.detach().double().requires_grad_(i % 2 == 1 or i >= 4) for i, t in enumerate(imgs)]
    with run_on(backend):
        total, terms = GF.cycle_loss(*ours)
        total.backward()
    rtotal, _ = torch_cycle_loss(*refs)
    rtotal.backward()
    assert total.dtype == dtype and terms["idt_b"].dtype == dtype
    a = [t.abs().double() for t in imgs]
    s = [(10.0, a[0] + a[1]), (10.0, a[2] + a[3]), (5.0, a[3] + a[4]), (5.0, a[0] + a[5])]
    n = imgs[0].numel()
    assert_close(total, rtotal, dtype, 4 * n, loss_scale(s), backend)
    for o, r in zip(ours, refs):
        if o.requires_grad:
            assert o.grad.dtype == dtype
            assert_close(o.grad, r.grad, dtype, 0, 30.0 / n, backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_backward_twice_and_through_terms(backend):
    # the gradients written in forward are handed out by the first backward: a second one
    # (retain_graph) must recompute them; a gradient through a logged term takes the
    # recompute path with per-term coefficients
    x = logits((2, 1, 5, 5)).requires_grad_()
    imgs = [torch.randn(1, 3, 6, 7, requires_grad=(i % 2 == 1 or i >= 4)) for i in range(6)]
    with run_on(backend):
        loss = GF.gan_loss(x, True, "vanilla")
        total, terms = GF.cycle_loss(*imgs)
        (loss + total).backward(retain_graph=True)
        (loss * 0.5 + total * 3.0).backward(retain_graph=True)
        (terms["idt_b"] * 2.0 + terms["cycle_a"]).backward()
    xr = x.detach().double().requires_grad_()
    refs = [i.detach().double().requires_grad_(i.requires_grad) for i in imgs]
    rl = torch_gan_loss(xr, True, "vanilla")
    rt, rterms = torch_cycle_loss(*refs)
    (rl * 1.5 + rt * 4.0 + rterms["idt_b"] * 2.0 + rterms["cycle_a"]).backward()
    # three backward passes accumulated: the gradients' bounds add (weights 1.5, and at most
    # 4 x (10 + 10 + 5 + 5) + 2 x 5 + 10 per element for the images)
    assert_close(x.grad, xr.grad, torch.float32, 0, 1.5 / x.numel() * elem_scales(x, True, "vanilla")[1] * 3)
    for o, r in zip(imgs, refs):
        if o.requires_grad:
            assert_close(o.grad, r.grad, torch.float32, 0, 3 * 140.0 / o.numel())


def test_cycle_loss_mixed_dtypes_promote():
    real = torch.randn(1, 3, 8, 8)
    rec = torch.randn(1, 3, 8, 8, dtype=torch.float16, requires_grad=True)
    total, _ = GF.cycle_loss(real, rec, real, rec)
    total.backward()
    ref = F.l1_loss(rec.float(), real) * 20
    assert total.dtype == torch.float32 and rec.grad.dtype == torch.float16
    s = (real.abs() + rec.detach().float().abs()).double()  # two terms of weight 10, fp32 both sides
    assert_close(total, ref, torch.float32, 2 * real.numel(), loss_scale([(10.0, s), (10.0, s)]), sides=2)


def test_errors_name_the_argument():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="logits is empty"):
        GF.gan_loss(torch.empty(0, 1), True)
    with pytest.raises(ValueError, match=r"logits\[1\] is empty"):
        GF.gan_loss([x, torch.empty(0)], True)
    with pytest.raises(ValueError, match="logits is an empty list"):
        GF.gan_loss([], True)
    with pytest.raises(ValueError, match="fake_logits is empty"):
        GF.discriminator_loss(x, torch.empty(3, 0))
    with pytest.raises(ValueError, match="mode must be one of"):
        GF.gan_loss(x, True, "wgan")
    with pytest.raises(ValueError, match="rec_b has shape"):
        GF.cycle_loss(x, x, x, torch.randn(3, 2))
    with pytest.raises(ValueError, match="idt_a is empty"):
        GF.cycle_loss(x, x, x, x, torch.empty(0), torch.empty(0))
    with pytest.raises(ValueError, match="both idt_a and idt_b"):
        GF.cycle_loss(x, x, x, x, x, None)
    with pytest.raises(TypeError, match="floating-point"):
        GF.gan_loss(torch.ones(3, dtype=torch.long), True)


def test_cycle_loss_module():
    imgs = [torch.randn(1, 3, 6, 6) for _ in range(6)]
    total, terms = gnn.CycleLoss(5.0, 7.0, 0.1)(*imgs)
    rtotal, rterms = torch_cycle_loss(*imgs, la=5.0, lb=7.0, li=0.1)
    a = [t.abs().double() for t in imgs]
    s = [(5.0, a[0] + a[1]), (7.0, a[2] + a[3]), (0.7, a[3] + a[4]), (0.5, a[0] + a[5])]
    n = imgs[0].numel()
    assert_close(total, rtotal, torch.float32, 4 * n, loss_scale(s), sides=2)
    assert_close(terms["idt_a"], rterms["idt_a"], torch.float32, n, loss_scale(s[2:3]), sides=2)


# ------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("backend", cpu_backends())
def test_autocast_reads_half_inputs_and_returns_fp32(backend):
    x = logits((2, 1, 9, 9), torch.bfloat16).requires_grad_()
    imgs = [torch.randn(1, 3, 9, 9).to(torch.bfloat16).requires_grad_() for _ in range(4)]
    with run_on(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = GF.gan_loss(x, True, "vanilla")
        total, _ = GF.cycle_loss(*imgs)
    assert loss.dtype == torch.float32 and total.dtype == torch.float32
    (loss + total).backward()
    assert x.grad.dtype == torch.bfloat16
    ref = torch_gan_loss(x.detach().float(), True, "vanilla")  # fp32 math on the bf16 values
    # both fp32 math: twice the fp32 bound
    assert_gan_loss(loss, None, ref, None, x, True, "vanilla", torch.float32, backend=backend, sides=2)
    rtotal, _ = torch_cycle_loss(*[i.detach().float() for i in imgs])
    a = [t.detach().abs().double() for t in imgs]
    assert_close(total, rtotal, torch.float32, 2 * a[0].numel(), loss_scale([(10.0, a[0] + a[1]), (10.0, a[2] + a[3])]),
                 sides=2)


# ------------------------------------------------------------------------ gradient penalty
def _small_d(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3)).double()


def _direct_gp(d, real, fake, alpha, weight):
    # StarGAN's gradient_penalty with its interpolation
    x_hat = (alpha * real.data + (1 - alpha) * fake.data).requires_grad_(True)
    out = d(x_hat)
    dydx = torch.autograd.grad(out, x_hat, torch.ones(out.size(), dtype=out.dtype), retain_graph=True,
                               create_graph=True, only_inputs=True)[0]
    dydx = dydx.view(dydx.size(0), -1)
    return weight * torch.mean((torch.sqrt(torch.sum(dydx ** 2, dim=1)) - 1) ** 2)


def test_gradient_penalty_matches_direct_and_double_backward():
    d1, d2 = _small_d(), _small_d()
    real = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    fake = torch.randn(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(3, 1, 1, 1, dtype=torch.float64)
    gp = GF.gradient_penalty(d1, real, fake, weight=7.0, alpha=alpha)
    gp.backward()  # double backward into D's parameters
    ref = _direct_gp(d2, real, fake.detach(), alpha, 7.0)
    ref.backward()
    # fp64 both, normwise (tests/_model_bounds.py): D (2 convs) forward, its input gradient,
    # the penalty's norm and square, differentiated again: 2 x (2 + 2 + 2) stages; n the
    # longest reduction (the weight gradients over 3 x 8 x 8 pixels)
    cen = Census.of(n_fwd=3 * 9, n=3 * 8 * 8, depth=6)
    assert_normwise(gp, ref, cen, backward=True, acc_dtype=torch.float64)
    for p1, p2 in zip(d1.parameters(), d2.parameters()):
        if p1.dim() > 1:  # biases only move LeakyReLU kinks: their second-order gradient is 0
            assert p1.grad is not None and p1.grad.abs().sum() > 0
        if p1.grad is not None or p2.grad is not None:
            scale = max(q.grad.abs().max().item() for q in d2.parameters() if q.grad is not None)
            assert_normwise(p1.grad, p2.grad, cen, scale=scale, backward=True, acc_dtype=torch.float64)
    assert fake.grad is None  # real and fake are detached: the penalty trains D only


def test_gradient_penalty_random_alpha_per_sample_and_tuple_output():
    d = _small_d()

    class TwoHeads(nn.Module):  # StarGAN's D returns (out_src, out_cls)
        def forward(self, x):
            return d(x), x.mean()

    real, fake = torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.randn(4, 3, 6, 6, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    gp = GF.gradient_penalty(TwoHeads(), real, fake, generator=gen)
    alpha = torch.rand(4, 1, 1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cen = Census.of(n_fwd=3 * 9, n=4 * 6 * 6, depth=6)  # as above (fp64, normwise)
    assert_normwise(gp, _direct_gp(d, real, fake, alpha, 10.0), cen, acc_dtype=torch.float64)
    with pytest.raises(ValueError, match="real has shape"):
        GF.gradient_penalty(d, real, fake[:2])


# ------------------------------------------------------------------------ custom ops, compile
@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    x = [logits((2, 1, 5, 7)).requires_grad_(), logits((3, 4)).requires_grad_()]
    p = [torch.randn(2, 3, 4, 5, requires_grad=True) for _ in range(3)]
    t = [torch.randn(2, 3, 4, 5) for _ in range(3)]
    with run_on(backend):
        for modes in ([L.MSE, L.BCE], [L.HINGE_REAL, L.LINEAR]):
            torch.library.opcheck(L.adv_loss_op, (x, modes, [1.0, -1.0], [0.1, 0.5], True))
        torch.library.opcheck(L.adv_loss_op, (x[:1], [L.BCE], [0.9], [0.1], False))
        torch.library.opcheck(L.l1_loss_multi_op, (p, t, [1.0, 2.0, 0.5]))
        coef = torch.tensor([0.5, -1.0, 2.0])
        torch.library.opcheck(L.l1_loss_multi_backward_op, ([q.detach() for q in p], t, coef))


def _loss_block(pa, pb, ra, reca, rb, recb, ia, ib):
    total, terms = GF.cycle_loss(ra, reca, rb, recb, ia, ib)
    d = GF.discriminator_loss(pa, pb, "vanilla")
    return GF.gan_loss(pa, True, "lsgan") + GF.gan_loss(pb, True, "hinge", False) + total + d + terms["idt_a"]


def _block_inputs():
    return [torch.randn(1, 1, 6, 6, requires_grad=True), torch.randn(1, 1, 6, 6, requires_grad=True)] + [
        torch.randn(1, 3, 8, 8, requires_grad=(i % 2 == 1 or i >= 4)) for i in range(6)]


def _check_compiled(backend, compile_backend):
    torch._dynamo.reset()
    ins = _block_inputs()
    ins2 = [t.detach().clone().requires_grad_(t.requires_grad) for t in ins]
    compiled = torch.compile(_loss_block, fullgraph=True, backend=compile_backend)
    with run_on(backend):
        out = compiled(*ins)
        out.backward()
        ref = _loss_block(*ins2)
        ref.backward()
    # both fp32 (the compiled graph may reorder, inductor fuses): twice the loss bounds above,
    # with the block's weights summed (lsgan 1, hinge 1, cycle 10 + 10 + 5 + 5, D 0.5 + 0.5,
    # idt_a 5: 38) and every term's scale at most (max|x| + 1)^2, its derivative's 2 (max|x| + 1)
    w, big = 38.0, max(t.detach().abs().max().item() for t in ins) + 1
    n = sum(t.numel() for t in ins)
    assert_close(out, ref, torch.float32, n, w * big ** 2, sides=2)
    for a, b in zip(ins, ins2):
        if a.requires_grad:
            assert_close(a.grad, b.grad, torch.float32, 0, w / a.numel() * 2 * big, sides=2)


@pytest.mark.parametrize("backend", cpu_backends())
def test_compile_fullgraph(backend):
    _check_compiled(backend, "aot_eager")  # traces fake impls + autograd; no graph breaks


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    _check_compiled("cpu", "inductor")


# ------------------------------------------------------------------------ eager route vs custom op
# A plain eager call runs the eager twins (_AdvFn, _L1Fn: no custom-op layer), anything that traces
# the custom ops (ganengine/ops/_eager.py); both run the same forward bodies and backwards.


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


_TWIN_CASES = {
    # (public call, leaves, the twin's autograd node, a double backward that is not identically 0)
    "gan_loss": (lambda x: GF.gan_loss(x, True, "vanilla"),
                 lambda dt: [logits((2, 1, 7, 9), dt).requires_grad_()], "_AdvFnBackward", True),
    "gan_loss_list": (lambda a, b, c: GF.gan_loss([a, b, c], False, "lsgan", real_label=0.9, fake_label=0.1),
                      lambda dt: [_cl(logits((2, 3, 5, 5), dt)).requires_grad_(), logits((1,), dt).requires_grad_(),
                                  logits((3, 4), dt)], "_AdvFnBackward", True),
    "discriminator_loss": (lambda r, f: GF.discriminator_loss(r, f, "hinge"),
                           lambda dt: [logits((3, 1, 4, 5), dt).requires_grad_(),
                                       logits((5, 3), dt).t().requires_grad_()], "_AdvFnBackward", False),
    "gan_loss_wgangp": (lambda x: GF.gan_loss(x, False, "wgangp", False),
                        lambda dt: [logits((1, 1, 1, 1), dt).requires_grad_()], "_AdvFnBackward", False),
    "cycle_loss": (lambda *t: (lambda tot, terms: tot + 0.25 * terms["idt_b"])(*GF.cycle_loss(*t)),
                   lambda dt: [torch.randn(2, 3, 5, 7, dtype=dt, requires_grad=i % 2 == 1) for i in range(4)] + [
                       _cl(torch.randn(2, 3, 7, 5, dtype=dt)).requires_grad_(), torch.randn(2, 3, 5, 7, dtype=dt)],
                   "_L1FnBackward", False),
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", list(_TWIN_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("g", [1.0, -0.75])
def test_eager_twin_matches_custom_op(monkeypatch, backend, case, dtype, g):
    fn, make, node, second = _TWIN_CASES[case]
    monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: None)  # the Python route (the CUDA path's)
    torch.manual_seed(0)
    leaves = make(dtype)
    if case == "cycle_loss":  # idt_a = G_A(real_b) has real_b's shape: the 5x7 image was transposed
        leaves[4] = leaves[4].transpose(2, 3)
    gy = torch.tensor(g, dtype=dtype)

    def run(route):
        ins = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        need = [t for t in ins if t.requires_grad]
        with run_on(backend), monkeypatch.context() as m:
            if route == "custom_op":
                m.setattr(_eager, "plain_eager", lambda *t: False)
            y = fn(*ins)
            assert (node in autograd_node_names(y)) == (route == "twin")  # the twin served the call, or did not
            # the gradient written in forward (handed out or scaled), then the recomputing backward
            grads = torch.autograd.grad(y, need, gy, retain_graph=True)
            again = torch.autograd.grad(y, need, gy, create_graph=True)
            out = [y, *grads, *again]
            if second:  # double backward (WGAN-GP / R1 through the loss): the reference formula on both
                out += torch.autograd.grad(sum((t * t).sum() for t in again), need)
        return out

    twin, op = run("twin"), run("custom_op")
    assert len(twin) == len(op)
    for a, b in zip(twin, op):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("tracing_mode", ["real", "fake"])
def test_tracing_takes_the_custom_ops(monkeypatch, backend, tracing_mode):
    # make_fx / FakeTensorMode used to run the eager Functions: grad_output.item() in their backward
    # (a data-dependent guard) and, on triton, kernel launches on tensors without storage
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: None)

    def step(x, a, b):
        total, _ = GF.cycle_loss(a, b, a, b)
        loss = GF.gan_loss(x, True, "vanilla") + total
        return (loss, *torch.autograd.grad(loss, (x, b)))

    ins = (logits((2, 1, 3, 3)).requires_grad_(), torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4, requires_grad=True))
    with run_on(backend):
        gm = make_fx(step, tracing_mode=tracing_mode)(*ins)
        graph = str(gm.graph)
        assert "ganengine.adv_loss" in graph and "ganengine.l1_loss_multi" in graph
        if tracing_mode == "real":
            for a, b in zip(gm(*ins), step(*ins)):
                assert torch.equal(a, b)
            traced = torch.jit.trace(lambda x: GF.gan_loss(x, True, "lsgan"), (ins[0],), check_trace=False)
            assert "ganengine::adv_loss" in str(traced.graph)
        assert "_AdvFnBackward" in autograd_node_names(GF.gan_loss(ins[0], True, "vanilla"))  # eager again afterwards


# ------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("backend", cpu_backends())
def test_deterministic_bits(backend):
    n = 70000 if backend != "triton" else 9000  # several chunks per term
    x = [torch.randn(n), torch.randn(n // 3 + 1)]
    p = [torch.randn(n) for _ in range(4)]
    t = [torch.randn(n) for _ in range(4)]
    with run_on(backend):
        a = [GF.discriminator_loss(*x, "vanilla"), GF.cycle_loss(t[0], p[0], t[1], p[1], p[2], p[3])[0]]
        b = [GF.discriminator_loss(*x, "vanilla"), GF.cycle_loss(t[0], p[0], t[1], p[1], p[2], p[3])[0]]
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_shared_target_pass_equals_separate_passes(dtype):
    # the C++ kernel reads a target shared by two terms once for both; bits must not change
    p = [torch.randn(70_001).to(dtype) for _ in range(4)]
    q = [torch.randn(70_001).to(dtype) for _ in range(2)]
    shared = [q[0], q[1], q[1], q[0]]
    separate = [t.clone() for t in shared]
    with run_on("cpu"):
        a = L.l1_fwd(p, shared, [0.1, 0.2, 0.3, 0.4], True)
        b = L.l1_fwd(p, separate, [0.1, 0.2, 0.3, 0.4], True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for u, v in zip(a[2], b[2]):
        assert torch.equal(u, v)


def test_cpu_backend_independent_of_thread_count():
    x = [torch.randn(200_003), torch.randn(100_000)]
    p = [torch.randn(150_001) for _ in range(4)]
    t = [torch.randn(150_001) for _ in range(4)]
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with run_on("cpu"):
                total, grads = L.adv_fwd(x, [L.BCE, L.MSE], [1.0, 0.0], [1e-5, 1e-5], True)
                l1_total, l1_terms, l1_grads = L.l1_fwd(p, t, [0.1, 0.2, 0.3, 0.4], True)
                results.append([total, *grads, l1_total, l1_terms, *l1_grads])
    finally:
        torch.set_num_threads(old)
    for r in results[1:]:
        for u, v in zip(results[0], r):
            assert torch.equal(u, v)


# ------------------------------------------------------------------------ large sizes
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_large_sizes(backend):
    n = 3_000_001 if backend == "cpu" else 1_000_003
    x = torch.randn(n)
    imgs = [torch.randn(n) for _ in range(4)]
    with run_on(backend):
        for mode in MODES:
            assert_gan_loss(GF.gan_loss(x, False, mode), None, torch_gan_loss(x.double(), False, mode), None, x,
                            False, mode, torch.float32)
        total, _ = GF.cycle_loss(*imgs)
    a = [t.abs().double() for t in imgs]
    assert_close(total, torch_cycle_loss(*[i.double() for i in imgs])[0], torch.float32, 2 * n,
                 loss_scale([(10.0, a[0] + a[1]), (10.0, a[2] + a[3])]))


# ------------------------------------------------------------------------ GPU
def _gpu_depth(n: int, terms: int) -> int:
    """The longest chain of additions behind a GPU loss of ``terms`` terms of ``n`` elements: both
    GPU backends reduce chunks of 4096 elements (kernels/losses.py CHUNK, csrc/cuda/losses.cu
    kChunk: serial per lane, then a tree), then the chunk sums, then the terms; bounded by
    4096 + ceil(n / 4096) + terms (and never more than the plain serial terms * n)."""
    return min(terms * n, 4096 + -(-n // 4096) + terms)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [1, 1023, 4097, 3_000_001])
def test_gpu_backends(backend, dtype, n):
    x = logits((n,), dtype).cuda()
    imgs = [torch.randn(n, dtype=torch.float64).to(dtype).cuda() for _ in range(6)]
    for mode in MODES:
        xg = x.clone().requires_grad_()
        with run_on(backend, "cuda"):
            loss = GF.discriminator_loss(xg, xg.flip(0), mode)
            loss.backward()
        # (clone: for fp64, .double() returns x itself, which would then require grad and make
        # the next mode's xg a non-leaf without .grad)
        x64 = x.double().clone().requires_grad_()
        ref = 0.5 * (torch_gan_loss(x64, True, mode) + torch_gan_loss(x64.flip(0), False, mode))
        ref.backward()
        (sr, gr), (sf, gf) = elem_scales(x, True, mode), elem_scales(x.flip(0), False, mode)
        assert_close(loss, ref, dtype, _gpu_depth(n, 2), loss_scale([(0.5, sr), (0.5, sf)]), backend)
        assert_close(xg.grad, x64.grad, dtype, 0, 0.5 / n * (gr + gf.flip(0)), backend)
    ours = [i.clone().requires_grad_() for i in imgs]
    with run_on(backend, "cuda"):
        total, _ = GF.cycle_loss(*ours)
        total.backward()
        again, _ = GF.cycle_loss(*imgs)
    refs = [i.double().clone().requires_grad_() for i in imgs]
    rtotal, _ = torch_cycle_loss(*refs)
    rtotal.backward()
    assert torch.equal(total.detach(), again)  # deterministic
    a = [t.abs().double() for t in imgs]
    s = [(10.0, a[0] + a[1]), (10.0, a[2] + a[3]), (5.0, a[3] + a[4]), (5.0, a[0] + a[5])]
    assert_close(total, rtotal, dtype, _gpu_depth(n, 4), loss_scale(s), backend)
    for o, r in zip(ours, refs):
        assert_close(o.grad, r.grad, dtype, 0, 30.0 / n, backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", MODES)
def test_second_backward_has_the_first_ones_bits(backend, mode):
    """retain_graph=True: the first backward hands out the gradient the forward kernel wrote; a
    second one recomputes it with the same kernel, so the bits agree (gradcheck's reentrancy check
    at nondet_tol=0 needs it; the reference formula differed by an ulp)."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 7, 7, requires_grad=True)
    y = torch.randn(2, 1, 5, 5, requires_grad=True)
    with run_on(backend):
        for loss in (GF.gan_loss(x, False, mode), GF.discriminator_loss(x, y, mode)):
            first = torch.autograd.grad(loss, (x, y), retain_graph=True, allow_unused=True)
            second = torch.autograd.grad(loss, (x, y), allow_unused=True)
            for a, b in zip(first, second):
                assert (a is None and b is None) or torch.equal(a, b)


def test_losses_under_a_dispatch_mode():
    """A TorchDispatchMode (FlopCounterMode, selective checkpointing) sees every op's outputs: the
    C++ kernel's gradient list held an undefined tensor for a gradient not written, which cannot
    cross into Python there (every hinge generator loss and no-grad call raised)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 1, 30, 30, requires_grad=True)
    want = [GF.gan_loss(x, True, "hinge", for_discriminator=False), GF.gan_loss(x.detach(), True, "lsgan"),
            gnn.GANLoss("vanilla")(x.detach(), False), GF.discriminator_loss(x.detach(), x.detach() + 1, "hinge")]
    with FlopCounterMode(display=False):
        got = [GF.gan_loss(x, True, "hinge", for_discriminator=False), GF.gan_loss(x.detach(), True, "lsgan"),
               gnn.GANLoss("vanilla")(x.detach(), False),
               GF.discriminator_loss(x.detach(), x.detach() + 1, "hinge")]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_cycle_loss_backward_with_no_output_gradient():
    """gradcheck's undefined-gradient check: a backward whose outputs all have no gradient."""
    a, c = (torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    b, d = torch.randn(1, 3, 5, 5, dtype=torch.float64), torch.randn(1, 3, 5, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, c: GF.cycle_loss(b, a, d, c)[0], (a, c))
