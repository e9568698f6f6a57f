"""gan_loss's bool flags (acceptance errtest F1) and the linear modes' lean node (costsweep F4).

* target_is_real / for_discriminator: a Python bool, a NumPy bool or the int 0 / 1; a str, None, another
  int, a float or a tensor is a TypeError naming the argument (by truthiness "False" meant True), also through GANLoss.
* wgangp and hinge for the generator (+-mean(x)): the lean C++ entry records one node that holds no
  tensor (as ATen's MeanBackward0), so the logits are not kept alive until backward, with the same
  numbers as the Python route.
* the host-cost registry measures wgangp, hinge-G and hinge-D (it covered vanilla / lsgan only)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import ganengine.functional as GF
import ganengine.nn as gnn
from ganengine import _ext
from ganengine.bench import host_cost, registry
from ganengine.ops import _dispatch
from tests._backends import autograd_node_names, on_backend

needs_lean = pytest.mark.skipif(not (_ext.loaded() and _ext.has_kernel("gan_loss", "CompositeExplicitAutograd")),
                                reason="ganengine._C without the lean loss entries")

BAD_FLAGS = [("False", "str 'False'"), (None, "NoneType"), (2, "int 2"), (-1, "int -1"), (torch.tensor(True), "Tensor"),
             (1.0, "float")]


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize("bad,got", BAD_FLAGS, ids=[g for _, g in BAD_FLAGS])
@pytest.mark.parametrize("mode", ["wgangp", "hinge", "lsgan", "vanilla"])
def test_gan_loss_flags_reject_non_bools_naming_the_argument(mode, bad, got):
    x = torch.randn(2, 1, 4, 4)
    for backend in ("cpu", "torch"):  # the lean entry's gate and the full route alike
        with on_backend(backend):
            with pytest.raises(TypeError, match=f"gan_loss: target_is_real must be a Python bool .*got {got}"):
                GF.gan_loss(x, bad, mode)
            with pytest.raises(TypeError, match=f"gan_loss: for_discriminator must be a Python bool .*got {got}"):
                GF.gan_loss(x, True, mode, bad)
            with pytest.raises(TypeError, match="for_discriminator must be a Python bool"):
                GF.gan_loss([x, x], False, mode, for_discriminator=bad)


@pytest.mark.parametrize("bad,got", BAD_FLAGS[:3], ids=[g for _, g in BAD_FLAGS[:3]])
@pytest.mark.parametrize("mode", ["wgangp", "hinge", "lsgan"])
def test_gan_loss_module_flags_reject_non_bools(mode, bad, got):
    loss, x = gnn.GANLoss(mode), torch.randn(2, 1, 4, 4, requires_grad=True)
    with pytest.raises(TypeError, match=f"target_is_real must be a Python bool .*got {got}"):
        loss(x, bad)
    with pytest.raises(TypeError, match=f"for_discriminator must be a Python bool .*got {got}"):
        loss(x, True, for_discriminator=bad)


@pytest.mark.parametrize("mode", ["wgangp", "hinge", "lsgan", "vanilla"])
def test_gan_loss_numpy_bools_and_0_1_are_the_bools(mode):
    x = torch.randn(2, 1, 5, 3)
    for real in (True, False):
        for disc in (True, False):
            want = GF.gan_loss(x, real, mode, disc)
            assert torch.equal(GF.gan_loss(x, np.bool_(real), mode, np.bool_(disc)), want)
            assert torch.equal(gnn.GANLoss(mode)(x, np.bool_(real), np.bool_(disc)), want)
            assert torch.equal(GF.gan_loss(x, int(real), mode, int(disc)), want)


# ----------------------------------------------------------------------------- the linear modes' node
LINEAR = [("wgangp", True, True), ("wgangp", False, True), ("hinge", True, False), ("hinge", False, False)]


@needs_lean
@pytest.mark.parametrize("mode,real,disc", LINEAR)
def test_linear_loss_keeps_no_tensor_alive(mode, real, disc):
    """-+mean(x) needs only x's shape for its gradient: the logits' memory is released with the
    caller's reference (eager's MeanBackward0 keeps none either); the gradient is unchanged."""
    p = torch.randn(3, 1, 6, 5, requires_grad=True)
    for form in ("single", "list"):
        y = p * 2.0  # (mul by a Python number saves no tensor)
        with on_backend("cpu"):
            out = GF.gan_loss(y if form == "single" else [y, y[:1]], real, mode, disc)
        assert _dispatch.last_used["gan_loss"] == "cpu"
        assert any("AdvLossFn" in n for n in autograd_node_names(out, name=lambda fn: fn.name()))
        ref = StorageWeakRef(y.untyped_storage())
        del y
        assert ref.expired(), "the loss node keeps the logits alive"
        (g,) = torch.autograd.grad(out, p)
        sign = -1.0 if real else 1.0
        want = torch.full_like(p, sign * 2.0 / p.numel())
        if form == "list":  # the second map, p[:1] * 2, adds its own mean's gradient
            want[:1] += sign * 2.0 / p[:1].numel()
        # 2 * (+-1/n) rounded once or twice in fp32 (a product by 2 is exact): 2 ulp of the result
        torch.testing.assert_close(g, want, rtol=2 * 2 ** -23, atol=0)


@needs_lean
@pytest.mark.parametrize("mode,real,disc", LINEAR)
def test_linear_loss_gradient_only_for_maps_that_need_one(mode, real, disc):
    a = torch.randn(2, 1, 4, 4, requires_grad=True)
    b = torch.randn(1, 1, 3, 3)
    with on_backend("cpu"):
        out = GF.gan_loss([a, b], real, mode, disc)
        (ga,) = torch.autograd.grad(out * 0.37, a)
    with on_backend("torch"):
        a2 = a.detach().requires_grad_(True)
        (want,) = torch.autograd.grad(GF.gan_loss([a2, b], real, mode, disc) * 0.37, a2)
    # both (0.37 * s) * t in fp32 with s = 1/32: one rounding each, the same product
    assert torch.equal(ga, want)


# ----------------------------------------------------------------------------- host-cost registry
MODE_CASES = {"gan_loss_wgangp_real": lambda x: -x.mean(), "gan_loss_wgangp_fake": lambda x: x.mean(),
              "gan_loss_hinge_g": lambda x: -x.mean(), "gan_loss_hinge_d_real": lambda x: torch.relu(1 - x).mean(),
              "gan_loss_hinge_d_fake": lambda x: torch.relu(1 + x).mean(),
              "gan_loss_module_wgangp": lambda x: -x.mean()}


@pytest.mark.parametrize("name", sorted(MODE_CASES))
def test_host_cost_registry_measures_the_other_modes(name):
    case = registry.all_cases()[name]
    assert "tiny" in case.shapes and case.family == "losses"
    work = case.setup(host_cost.tiny_shape(case), torch.device("cpu"), torch.float32)
    (x,) = work.args
    want = MODE_CASES[name](x.double())
    # each side a fp32 mean of n terms of size <= 1 + |x|: gamma_n-type bound per side, two sides
    bound = 2 * (x.numel() + 2) * 2 ** -24 * (1 + x.double().abs()).mean().item()
    for fn in (work.reference, work.fused):
        assert abs(fn(x).double().item() - want.item()) <= bound
    recs = host_cost.measure([case], calls=2, rounds=1, with_kernels=False)
    assert {r["mode"] for r in recs} == {"forward", "forward_backward"}
    for r in recs:
        assert r["status"] == "ok" and r["eager_us"] > 0 and r["ganengine_us"] > 0, r["reason"]
