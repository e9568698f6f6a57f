"""GPU readiness, checked without a GPU.

* launch grids at full-resolution sizes (pix2pixHD's 2048x1100 and beyond), counted under the
  Triton interpreter without executing: CUDA caps grid axes 1 and 2 at 65535;
* every Triton launch runs inside a device guard entered with its tensors' device;
* the kernel fixes of issues 17 and 22 (attention backward at saturated softmax, non-finite
  losses, empty planes, eps = 0, centred normalisation), on the Triton backend;
* the norm_act launch plan on a GPU (planes on chip, programs per SM, tiny planes packed) and
  its memory traffic (one read of x in forward; one read of x and grad in backward);
* one source of truth for the AOT report (planned from the launchers' own launches);
* the dry run of ``make gpu-check`` (ganengine.tools.gpu_check), so that script cannot rot.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

import ganengine  # noqa: E402
import ganengine.functional as GF  # noqa: E402
from ganengine import backends  # noqa: E402
from tests._backends import on_backend  # noqa: E402
from tests._tolerance import assert_within_bound, normwise_scale  # noqa: E402

# CPU checks need the interpreter (conftest sets it without a GPU); the gpu-marked ones run on a GPU
interpret = pytest.mark.skipif(not backends.triton_interpret(),
                               reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU)")

MAX_AXIS12 = 65535


@contextlib.contextmanager
def recorded_launches(execute: bool = False, on_launch=None):
    """Record (kernel name, grid) of every Triton launch; run it only if ``execute``."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        g = grid(kwargs) if callable(grid) else grid
        g = tuple(g) + (1,) * (3 - len(g))
        launches.append((self.fn.__name__, g))
        if on_launch is not None:
            on_launch(self.fn.__name__)
        if execute:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def _meta(*shape, dtype=torch.bfloat16, cl=False):
    t = torch.empty(shape, device="meta", dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl else t


# ----------------------------------------------------------------------------- grid limits
def _large_launches():
    """Every launcher at full-resolution sizes, on meta tensors (nothing is allocated or run)."""
    from ganengine.kernels import attention, conv_act, losses, norm_act

    for cl in (False, True):
        x = _meta(1, 8, 1100, 2048, cl=cl)            # pix2pixHD's full resolution
        w = _meta(64, 8, 4, 4)
        fmt = torch.channels_last if cl else torch.contiguous_format
        y = conv_act.conv2d(x, w, None, (1, 1), (1, 1), slope=0.2, fmt=fmt)
        c, mean, rstd = conv_act.conv2d(x, w, None, (1, 1), (1, 1), fmt=fmt, stats_eps=1e-5)
        gz, _ = conv_act.act_grad(torch.empty_like(y), y, 0.2)
        conv_act.conv2d_grad_input(gz, w, x.shape, (1, 1), (1, 1), fmt)
        conv_act.conv2d_grad_weight(gz, x, w.shape, (1, 1), (1, 1))
        conv_act.bias_act_(y, None, 0.2)
        conv_act.norm_act(c, mean, rstd, None, None, 0.2)
        big = _meta(1, 8, 2560, 2048, cl=cl)          # 5.2M output pixels: over the old igemm limit
        yb = conv_act.conv2d(big, w, None, (1, 1), (1, 1), slope=0.2, fmt=fmt)
        conv_act.conv2d_grad_input(torch.empty_like(yb), w, big.shape, (1, 1), (1, 1), fmt)
    for shape, cl in (((65536, 1024, 2, 2), False), ((4096, 512, 8, 8), True), ((1, 64, 2048, 1100), False),
                      ((1, 3, 8192, 8192), True)):
        x = _meta(*shape, cl=cl)
        wb = _meta(shape[1], dtype=torch.float32)
        y, mean, rstd = norm_act.forward(x, wb, wb, 1e-5, True, 0.2)
        norm_act.backward(torch.empty_like(y), x, wb, wb, mean, rstd, True, 0.2)
    b, n = 100_000, 64                                # more batch entries than axis 1/2 could take
    q, k, v = _meta(b, 8, n), _meta(b, 8, n), _meta(b, 64, n)
    out, o, lse = attention.forward(q, k, v, v, _meta(1, dtype=torch.float32))
    attention.backward(torch.empty_like(out), q, k, v, o, _meta(1, dtype=torch.float32))
    huge = _meta(3 * 2 ** 31)                         # a loss over 6.4G elements
    losses.adv_fwd([huge, huge], [0, 1], [1.0, 0.0], [1.0, 1.0], True)
    losses.l1_fwd([huge] * 4, [huge] * 4, [1.0] * 4, True)
    losses.l1_bwd([huge] * 4, [huge] * 4, _meta(4, dtype=torch.float32))


@interpret
@pytest.mark.parametrize("plan", ["gpu", "interpreter"])
def test_grids_within_cuda_limits_at_full_resolution(plan):
    from ganengine.kernels import _launch

    ctx = _launch.planning_for_gpu(132) if plan == "gpu" else contextlib.nullcontext()
    with ctx, recorded_launches() as launches:
        _large_launches()
    names = {k for k, _ in launches}
    for kernel in ("_conv_fwd", "_conv_dgrad", "_conv_wgrad", "_act_grad", "_bias_act", "_norm_act",
                   "_attn_fwd", "_bwd_dq", "_bwd_dkdv",
                   "_adv_partial_kernel", "_l1_partial_kernel", "_l1_bwd_kernel", "_final_kernel"):
        assert kernel in names, f"{kernel} was not launched"
    assert {"_fwd_fused_kernel", "_bwd_fused_kernel", "_fwd_partial_kernel", "_fwd_apply_kernel"} <= names
    for kernel, grid in launches:
        assert grid[0] <= 2 ** 31 - 1 and grid[1] <= MAX_AXIS12 and grid[2] <= MAX_AXIS12, (kernel, grid)
    # the shapes are large enough to matter: the big dimension needed more than axis 1/2 allows
    big = {k: g[0] for k, g in launches if g[0] > MAX_AXIS12}
    for kernel in ("_conv_fwd", "_conv_dgrad", "_act_grad", "_norm_act", "_fwd_fused_kernel", "_attn_fwd",
                   "_bwd_dq", "_bwd_dkdv", "_adv_partial_kernel"):
        assert kernel in big, f"{kernel}: no launch with more than {MAX_AXIS12} programs on axis 0"


@interpret
def test_pix2pixhd_conv_grid_counts():
    """The issue's case, 1x8x1100x2048 (the reference counts were (1, 70499, 1) on axis 1)."""
    from ganengine.kernels import conv_act

    x, w = _meta(1, 8, 1100, 2048), _meta(64, 8, 4, 4)
    with recorded_launches() as launches:
        y = conv_act.conv2d(x, w, None, (1, 1), (1, 1), slope=0.2)
        conv_act.act_grad(torch.empty_like(y), y, 0.2)
        conv_act.conv2d_grad_input(torch.empty_like(y), w, x.shape, (1, 1), (1, 1))
    # output 1099 x 2047 pixels (4x4, stride 1, padding 1); the data gradient covers the input
    pixels = {"_conv_fwd": 1099 * 2047, "_act_grad": 1099 * 2047, "_conv_dgrad": 1100 * 2048}
    channel_tiles = {"_conv_fwd": 2, "_act_grad": 2, "_conv_dgrad": 1}  # 64 out / 8 in channels by 32
    for kernel, grid in launches:
        block = conv_act._GEMM_CPU["BLOCK_M"] if kernel != "_act_grad" else conv_act.ELEM["BLOCK_P"]
        assert grid == (triton.cdiv(pixels[kernel], block), channel_tiles[kernel], 1), (kernel, grid)
        assert grid[0] > MAX_AXIS12  # once on axis 1, now on axis 0


def test_grid_check_names_the_launch():
    from ganengine.kernels import _launch

    assert _launch.grid("k", 2 ** 20, 65535, 3) == (2 ** 20, 65535, 3)
    with pytest.raises(RuntimeError, match=r"k: grid axis 1 would be 65536"):
        _launch.grid("k", 1, 65536)


# ----------------------------------------------------------------------------- device guard
@interpret
def test_every_planned_launch_is_inside_a_device_guard(monkeypatch):
    """Every module's AOT cases (all launchers at model shapes): each launch happens inside the
    guard, entered with the tensors' device (meta here; cuda:1 on a GPU, see gpu_check)."""
    from ganengine.kernels import _launch
    from ganengine.tools.aot_report import kernel_modules

    active = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            active.append(self.device)

        def __exit__(self, *exc):
            active.pop()

    seen = []
    monkeypatch.setattr(_launch, "_GUARDED", ("cuda", "meta"))
    monkeypatch.setattr(_launch, "_device_context", FakeDevice)
    with recorded_launches(on_launch=lambda k: seen.append((k, list(active)))):
        modules = 0
        for _, mod in kernel_modules():
            modules += 1
            for _, thunk in mod.aot_cases():
                thunk()
    assert modules >= 4 and len(seen) > 50
    for kernel, stack in seen:
        assert stack and stack[-1] == torch.device("meta"), f"{kernel} launched outside a device guard"


@interpret
def test_ops_enter_the_guard_with_their_tensors_device(monkeypatch):
    """Through the public functions on the triton backend (launches executed)."""
    from ganengine.kernels import _launch

    entered, seen = [], []

    @contextlib.contextmanager
    def fake(device):
        entered.append(device)
        yield

    monkeypatch.setattr(_launch, "_GUARDED", ("cpu",))
    monkeypatch.setattr(_launch, "_device_context", fake)
    x = torch.randn(2, 4, 5, 6, requires_grad=True)
    with on_backend("triton"), recorded_launches(execute=True, on_launch=lambda k: seen.append((k, len(entered)))):
        GF.instance_norm_act(x).sum().backward()
        GF.discriminator_loss(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)).item()
        GF.conv2d_act(x, torch.randn(3, 4, 4, 4) * 0.1, None, stride=2, padding=1).sum().backward()
    assert len(seen) >= 6 and all(n > 0 for _, n in seen)
    assert entered and all(d == x.device for d in entered)


# ----------------------------------------------------------------------------- attention at saturation
def _attention_core_grads(q, k, v, x, gamma, grad):
    from ganengine.kernels import attention as tk

    out, o, lse = tk.forward(q, k, v, x, gamma)
    return out, tk.backward(grad, q, k, v, o, gamma)[:3]


def _eager_core(q, k, v, x, gamma, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    p = torch.softmax(torch.bmm(leaves[0].transpose(1, 2), leaves[1]), -1)
    out = gamma * torch.bmm(leaves[2], p.transpose(1, 2)) + x
    return out, torch.autograd.grad((out * grad).sum(), leaves)


@interpret
@pytest.mark.parametrize("scale", [1e3, 1e4])
def test_attention_backward_exact_where_softmax_saturates(scale):
    """|s| up to 1e8: every row one-hot. The gradients through q and k are exactly 0 (as eager and
    fp64 give); before the fix P recomputed from the fp32 lse was off by e^8 (errors ~1e+19)."""
    torch.manual_seed(0)
    b, d, c, n = 2, 4, 16, 37
    q, k = torch.randn(b, d, n) * scale, torch.randn(b, d, n) * scale
    v, x, grad = torch.randn(b, c, n), torch.randn(b, c, n), torch.randn(b, c, n)
    gamma = torch.tensor([0.7])
    out, (dq, dk, dv) = _attention_core_grads(q, k, v, x, gamma, grad)
    ref_out, (rq, rk, rv) = _eager_core(*(t.double() for t in (q, k, v, x, gamma, grad)))
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))
    assert rq.abs().max() < 1e-6 and rk.abs().max() < 1e-6  # the fp64 truth agrees
    # dv = gamma * grad P^T with P one-hot: one term per output element, plus the fp32 output rounding
    assert_within_bound(dv, rv, normwise_scale(rv), n=2, acc_dtype=torch.float32, name="dv")
    assert_within_bound(out, ref_out, normwise_scale(ref_out), n=4, acc_dtype=torch.float32, name="out")


@interpret
def test_attention_backward_near_saturation_as_accurate_as_eager():
    """|x| = 10 (|s| ~ 1e2..1e3, rows nearly one-hot): errors against fp64 no worse than eager
    fp32's own (x4 for the different summation orders). The old o-based backward was 20x worse
    on dv, and its P carried u * |s| of exponent error."""
    torch.manual_seed(1)
    b, d, c, n = 2, 4, 16, 48
    q, k = torch.randn(b, d, n) * 10, torch.randn(b, d, n) * 10
    v, x, grad = torch.randn(b, c, n), torch.randn(b, c, n), torch.randn(b, c, n)
    gamma = torch.tensor([0.7])
    _, ours = _attention_core_grads(q, k, v, x, gamma, grad)
    _, eager = _eager_core(q, k, v, x, gamma, grad)
    _, ref = _eager_core(*(t.double() for t in (q, k, v, x, gamma, grad)))
    for name, a, e, r in zip(("dq", "dk", "dv"), ours, eager, ref):
        err, eager_err = (a.double() - r).abs().max().item(), (e.double() - r).abs().max().item()
        floor = 2.0 ** -24 * r.abs().max().item() * n  # one length-n reduction's rounding
        assert err <= 4 * eager_err + floor, f"{name}: {err:.3g} vs eager fp32 {eager_err:.3g}"


@interpret
def test_attention_backward_is_two_launches():
    """dq (with rowsum(grad * o) and the row statistics), then dk and dv fused (P computed once
    for both): two Triton launches (the host ops around them: test_attention_backward_host_ops)."""
    from ganengine.kernels import attention as tk

    q, k = torch.randn(1, 2, 20), torch.randn(1, 2, 20)
    v = torch.randn(1, 16, 20)
    out, o, lse = tk.forward(q, k, v, v, torch.tensor([0.5]))
    with recorded_launches(execute=True) as launches:
        tk.backward(torch.randn_like(out), q, k, v, o, torch.tensor([0.5]))
    assert [k for k, _ in launches] == ["_bwd_dq", "_bwd_dkdv"]


@interpret
def test_attention_backward_host_ops():
    """The launcher's own torch ops: allocations and the rowdot view only (rowsum(grad * o) is
    formed in the dq kernel, not by elementwise ops before the launches)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ganengine.kernels import attention as tk

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    q, k = torch.randn(1, 2, 20), torch.randn(1, 2, 20)
    v = torch.randn(1, 16, 20)
    out, o, lse = tk.forward(q, k, v, v, torch.tensor([0.5]))
    grad, gamma = torch.randn_like(out), torch.tensor([0.5])
    with recorded_launches(execute=False), Ops() as mode:
        tk.backward(grad, q, k, v, o, gamma)
    assert set(mode.names) <= {"aten::empty_like", "aten::empty", "aten::empty.memory_format", "aten::new_empty",
                              "aten::select"}, mode.names


def test_attention_plan_wgmma_shape_on_hopper():
    from ganengine.kernels import attention as tk

    cfg = tk._config("bwd", 64, 512, torch.bfloat16, hopper=True)
    assert (cfg["BLOCK_N"], cfg["BLOCK_M"], cfg["num_warps"]) == (64, 64, 4)


# ----------------------------------------------------------------------------- losses: non-finite
def _check_loss_non_finite(backend, device, mode, value, real):
    x = torch.tensor([value, 0.5, -0.3, 2.0], device=device)
    xe = x.clone().requires_grad_()
    target = torch.full_like(x, 1.0 if real else 0.0)
    if mode == "vanilla":
        ref = F.binary_cross_entropy_with_logits(xe, target)
    elif mode == "lsgan":
        ref = F.mse_loss(xe, target)
    else:
        ref = (torch.relu(1 - xe) if real else torch.relu(1 + xe)).mean()
    ref.backward()
    xt = x.clone().requires_grad_()
    with on_backend(backend):
        loss = GF.gan_loss(xt, real, mode)
        loss.backward()
    torch.testing.assert_close(loss, ref.detach(), equal_nan=True, rtol=1e-6, atol=0)
    torch.testing.assert_close(xt.grad, xe.grad, equal_nan=True, rtol=1e-6, atol=0)


NON_FINITE = pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])


@interpret
@pytest.mark.parametrize("mode", ["vanilla", "hinge", "lsgan"])
@NON_FINITE
@pytest.mark.parametrize("real", [True, False])
def test_losses_non_finite_logits_as_eager(mode, value, real):
    """vanilla: +inf towards fake is inf (was NaN); hinge: a NaN logit gets eager's gradient."""
    _check_loss_non_finite("triton", "cpu", mode, value, real)


# ----------------------------------------------------------------------------- norm_act edge cases
def _check_empty_planes(backend, device):
    for shape in ((2, 3, 0, 4), (1, 2, 5, 0)):
        x = torch.randn(shape, device=device, requires_grad=True)
        w = torch.randn(shape[1], device=device, requires_grad=True)
        with on_backend(backend):
            y = GF.instance_norm_act(x, w, None)
            y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


def _check_eps0_constant_plane(backend, device, channels_last):
    x = torch.full((2, 3, 4, 5), 7.25, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b = torch.randn(3, device=device), torch.randn(3, device=device)
    # ATen's CPU kernel sets invstd = 0 there, so the output is the bias; its CUDA kernel divides by
    # zero and gives NaN (seen on an H100, torch 2.11). ganengine gives the bias on every device:
    # the reference is the CPU one.
    ref = F.instance_norm(x.detach().cpu(), weight=w.cpu(), bias=b.cpu(), eps=0.0).to(device)
    with on_backend(backend):
        y = GF.instance_norm_act(x, w, b, eps=0.0, activation="none")
        y.sum().backward()
    assert torch.equal(y.detach(), ref)
    assert torch.equal(x.grad, torch.zeros_like(x))


@interpret
def test_instance_norm_act_empty_planes():
    """H = 0 or W = 0 raised ZeroDivisionError in the Triton launcher."""
    _check_empty_planes("triton", "cpu")


@interpret
@pytest.mark.parametrize("channels_last", [False, True])
def test_instance_norm_act_eps0_constant_plane_gives_bias(channels_last):
    _check_eps0_constant_plane("triton", "cpu", channels_last)


@interpret
def test_conv_act_norm_is_centred():
    """mean 1e4, std 1e-2: the uncentred v * a + (beta - mean * a) forms products of ~1e6 and
    loses ~6e-2 to their rounding; the centred (v - mean) * a + beta is exact up to u * |y|."""
    from ganengine.kernels import conv_act as tk

    torch.manual_seed(0)
    c = (1e4 + 1e-2 * torch.randn(2, 4, 6, 7, dtype=torch.float64)).float()
    mean = c.double().mean((2, 3)).float()
    rstd = torch.rsqrt(c.double().var((2, 3), unbiased=False) + 1e-5).float()
    gamma, beta = torch.randn(4), torch.randn(4)
    y = tk.norm_act(c, mean, rstd, gamma, beta, 0.2)
    # the same computation in fp64 from the kernel's own (fp32) inputs
    z = ((c.double() - mean.double()[..., None, None]) * (rstd.double() * gamma.double())[:, :, None, None]
         + beta.double()[None, :, None, None])
    ref = F.leaky_relu(z, 0.2)
    # (c - mean) is exact (Sterbenz); two roundings of the product and the sum: 3 u |y| (+ |beta|)
    scale = z.abs() + beta.double().abs()[None, :, None, None]
    assert_within_bound(y, ref, scale, n=3, acc_dtype=torch.float32, name="y")


# ----------------------------------------------------------------------------- norm_act plan + traffic
def test_norm_act_plan_on_a_gpu():
    from ganengine.kernels import norm_act as tk

    sms = 132
    cfg = tk.pick_config(1, 256, 64 * 64, False, 2, sms)       # CycleGAN resblock: plane on chip
    assert cfg["SINGLE"] and cfg["split"] == 1 and cfg["BLOCK_HW"] == 4096
    cfg = tk.pick_config(16, 64, 128 * 128, False, 2, sms)     # StarGAN: 16K planes on chip
    assert cfg["SINGLE"] and cfg["BLOCK_HW"] == 16384 and cfg["num_warps"] == 16
    cfg = tk.pick_config(1, 64, 256 * 256, False, 2, sms)      # batch 1: planes split to fill the GPU
    assert cfg["split"] * cfg["n_cblocks"] >= 4 * sms and not cfg["SINGLE"]
    cfg = tk.pick_config(8, 512, 8 * 8, False, 2, sms)         # tiny planes packed per program
    assert cfg["BLOCK_C"] > 1 and cfg["BLOCK_C"] * cfg["BLOCK_HW"] >= 128
    assert 8 * cfg["n_cblocks"] >= 4 * sms                     # ... but not so many that the GPU starves
    cfg = tk.pick_config(4, 256, 32 * 32, True, 2, sms)        # NHWC: a 32-byte sector of channels per pixel
    assert cfg["BLOCK_C"] * 2 >= 32


@interpret
@pytest.mark.parametrize("channels_last", [False, True])
def test_norm_act_on_chip_plane_is_read_once(channels_last):
    from ganengine.bench.traffic import TritonTraffic
    from ganengine.kernels import norm_act as tk

    x = torch.randn(2, 8, 24, 24)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, g = torch.randn(8), torch.randn(8), torch.randn_like(x)
    with TritonTraffic() as fwd:
        y, mean, rstd = tk.forward(x, w, b, 1e-5, True, 0.2, split=1)
    with TritonTraffic() as bwd:
        tk.backward(g, x, w, b, mean, rstd, True, 0.2, split=1)
    nbytes = x.numel() * 4
    assert len(fwd.launches) == 1 and len(bwd.launches) == 1
    (lf,), (lb,) = fwd.launches, bwd.launches
    xf = next(a for n, a in lf.args.items() if n.startswith("X"))
    assert xf.load_bytes == xf.unique_load_bytes == nbytes
    for name in ("X", "G"):
        arg = next(a for n, a in lb.args.items() if n == name)
        assert arg.load_bytes == arg.unique_load_bytes == nbytes, name
    torch.testing.assert_close(y.double(), F.leaky_relu(F.instance_norm(x.double(), weight=w.double(),
                                                                        bias=b.double()), 0.2),
                               atol=1e-5, rtol=1e-5)


@interpret
@pytest.mark.parametrize("split", [1, 3])
def test_norm_act_looping_welford_large_mean(split):
    """Planes over the register tile (looping, per-lane Welford) and split chunks, on data with a
    large mean and small spread (where E[x^2] - E[x]^2 would cancel)."""
    from ganengine.kernels import norm_act as tk

    torch.manual_seed(0)
    x64 = 1e3 + torch.randn(1, 3, 100, 90, dtype=torch.float64)
    x = x64.float().contiguous(memory_format=torch.channels_last)   # NHWC tile: 2048 px, 5 tiles
    w, b = torch.randn(3), torch.randn(3)
    cfg = tk._plan(x, split)
    assert not cfg["SINGLE"] and cfg["split"] == split
    y, mean, rstd = tk.forward(x, w, b, 1e-5, False, 1.0, split=split)
    xd = x.double()
    ref = F.instance_norm(xd, weight=w.double(), bias=b.double(), eps=1e-5)
    # statistics of 9000 values in fp32 accumulators (Welford + Chan merges: c = 4), then the
    # centred output (x - mean) * rstd * w + b: its error is |x|'s rounding (u * 1e3) times rstd
    n = 9000
    assert_within_bound(mean.double(), xd.mean((2, 3)), normwise_scale(xd), n=n, acc_dtype=torch.float32, c=4,
                        name="mean")
    scale = (xd.abs().amax((2, 3)) * (1 / xd.std((2, 3), unbiased=False)) * w.double().abs()).max().item()
    assert_within_bound(y, ref, scale, n=n, acc_dtype=torch.float32, c=8, name="y")


# ----------------------------------------------------------------------------- AOT: one source of truth
def test_aot_report_plans_what_the_launchers_launch():
    """Planned in a subprocess (the report needs real JITFunctions, not the interpreter)."""
    code = r"""
import torch
from ganengine.tools import aot_report as ar
from ganengine.kernels import attention as A, norm_act as N
builds, errors = ar.plan_builds(90, None, 132)
assert not errors, errors
names = {b.fn.__name__ for b in builds}
assert {"_attn_fwd", "_bwd_dq", "_bwd_dkdv", "_fwd_fused_kernel", "_conv_fwd", "_adv_partial_kernel"} <= names
for b in builds:
    if b.fn.__name__ == "_bwd_dkdv" and "bfloat16 C=512" in b.cases[0]:
        names = b.fn.arg_names
        const = {names[k[0]]: v for k, v in b.constexprs.items()}
        cfg = A._config("bwd", 64, 512, torch.bfloat16, hopper=True)
        assert all(const[k] == cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_DV", "BLOCK_DP")), const
        assert b.options["num_warps"] == cfg["num_warps"] and b.options["num_stages"] == cfg["num_stages"]
    if b.fn.__name__ == "_fwd_fused_kernel" and "NHWC 16x256x32x32" in b.cases[0]:
        names = b.fn.arg_names
        div = {names[k[0]] for k, v in b.attrs.items() if v}
        assert {"sHW", "sN"} <= div, div   # the JIT's divisibility-by-16 specialisation (C = 256)
        assert "sC" in {names[k[0]] for k in b.constexprs}  # stride 1 becomes a constant
print("planned", len(builds))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "planned" in proc.stdout


def test_split_plane_apply_kernels_need_no_block_barriers():
    """The NCHW split-plane apply passes (CycleGAN's 256x256 and 128x128 maps) are elementwise
    after a small merge of chunk statistics. Broadcasting that merge's per-row result over the
    tile once made Triton convert the whole [1, BLOCK_HW] tile's layout through shared memory:
    11K lines of PTX with 63 block barriers, and 0.42 ms for a forward the CUDA C++ kernel does in
    0.018 ms on an H100. Compiled for sm_90 in a subprocess (real JITFunctions): no barrier."""
    code = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ganengine.tools import aot_report as ar
from ganengine.kernels import _launch, norm_act as K
x = torch.empty(1, 64, 256, 256, device="meta", dtype=torch.bfloat16)
w = torch.empty(64, device="meta")
def thunk():
    y, m, r = K.forward(x, w, w, 1e-5, True, 0.2)
    K.backward(torch.empty_like(x), x, w, w, m, r, True, 0.2)
with _launch.planning_for_gpu(132, 90):
    launches = ar.record_launches(thunk)
seen = set()
for fn, grid, args, kwargs in launches:
    if fn.__name__ not in ("_fwd_apply_kernel", "_bwd_apply_kernel"):
        continue
    sig, const, attrs, opts = ar.bind(fn, args, kwargs, 90)
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=opts)
    n = c.asm["ptx"].count("bar.sync")
    assert n == 0, (fn.__name__, n)
    seen.add(fn.__name__)
assert seen == {"_fwd_apply_kernel", "_bwd_apply_kernel"}, seen
print("compiled", sorted(seen))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compiled" in proc.stdout


# ----------------------------------------------------------------------------- gpu-check dry run
@interpret
def test_gpu_check_dry_run(tmp_path):
    """The whole script on CPU tensors under the interpreter: every check runs, none fails."""
    from ganengine.tools import gpu_check

    lines = []
    results = gpu_check.run(True, tmp_path, budget=300, printer=lines.append)
    shown = [r for r in results if r.status != "TIME"]
    checks = {r.check for r in shown}
    assert checks == {name for name, _, _ in gpu_check.CHECKS}, checks
    failed = [r.line() for r in shown if r.status == "FAIL"]
    assert not failed, failed
    assert sum(r.status == "OK" for r in shown) >= 15
    assert (tmp_path / "report.json").exists() and "| check | status |" in (tmp_path / "report.md").read_text()
    assert len(lines) == len(shown)
    with ganengine.use_backend("auto"):
        pass  # the run left no backend override behind
    assert backends.current() == "auto"


# ----------------------------------------------------------------------------- on a GPU
gpu = pytest.mark.gpu
GPU_BACKENDS = pytest.mark.parametrize("backend", ["triton", "cuda"])


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_core_on_gpu(dtype):
    """The kernel alone (no convolutions): checks the kernel, so TF32 is off around it (fp32
    runs its dots as tf32x3 whatever the flags say; nothing else here may use TF32). Errors
    relative to the largest reference value, in units of the format's u (fp32: its own u; the
    P tile is stored in the input format before its dot). A wrong index gives O(1)."""
    from tests._tolerance import unit_roundoff

    torch.manual_seed(0)
    b, d, c, n = 2, 32, 256, 1000
    t = [torch.randn(b, d, n, dtype=torch.float64) * 0.5, torch.randn(b, d, n, dtype=torch.float64) * 0.5,
         torch.randn(b, c, n, dtype=torch.float64), torch.randn(b, c, n, dtype=torch.float64),
         torch.tensor([0.7], dtype=torch.float64), torch.randn(b, c, n, dtype=torch.float64)]
    t = [x.to(dtype).to(torch.float64).cuda() for x in t]  # rounded inputs, exact in fp64
    ref_out, ref = _eager_core(*t)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        low = [x.to(dtype) for x in t[:4]] + [t[4].float(), t[5].to(dtype)]
        out, grads = _attention_core_grads(*low)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    u = unit_roundoff(dtype)
    for name, a, r in [("out", out, ref_out)] + list(zip(("dq", "dk", "dv"), grads, ref)):
        rel = (a.double() - r).abs().max().item() / r.abs().max().item()
        assert rel <= 64 * u, f"{name}: {rel:.3g} = {rel / u:.1f} u"


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e3, 1e4])
def test_attention_core_saturated_on_gpu(dtype, scale):
    """One-hot rows: dq = dk = 0 exactly needs the scores of _bwd_dq (where the row statistics
    are taken) and of _bwd_dkdv to agree bit for bit, and exp(0) = 1 exactly."""
    torch.manual_seed(0)
    b, d, c, n = 2, 16, 64, 300
    q, k = (torch.randn(b, d, n, device="cuda") * scale).to(dtype), (torch.randn(b, d, n, device="cuda") * scale).to(dtype)
    v, x, grad = (torch.randn(b, c, n, device="cuda").to(dtype) for _ in range(3))
    _, (dq, dk, dv) = _attention_core_grads(q, k, v, x, torch.tensor([0.7], device="cuda"), grad)
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))
    assert torch.isfinite(dv).all()


@gpu
@GPU_BACKENDS
@pytest.mark.parametrize("mode", ["vanilla", "hinge"])
@NON_FINITE
@pytest.mark.parametrize("real", [True, False])
def test_losses_non_finite_on_gpu(backend, mode, value, real):
    _check_loss_non_finite(backend, "cuda", mode, value, real)


@gpu
@GPU_BACKENDS
def test_norm_act_edge_cases_on_gpu(backend):
    _check_empty_planes(backend, "cuda")
    for cl in (False, True):
        _check_eps0_constant_plane(backend, "cuda", cl)


@gpu
def test_second_device_while_first_is_current():
    """nn.DataParallel's situation: tensors on cuda:1, cuda:0 current. Same bits as on cuda:0."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from ganengine.ops import attention as attn_ops

    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 11)
    q, k, v = torch.randn(2, 2, 40), torch.randn(2, 2, 40), torch.randn(2, 16, 40)
    logits, imgs = torch.randn(1, 1, 30, 30), [torch.randn(1, 3, 32, 32) for _ in range(4)]
    w = torch.randn(8, 16, 4, 4) * 0.1

    def run(dev, backend):
        outs = []
        with on_backend(backend):
            xs = x.to(dev).requires_grad_()
            y = GF.instance_norm_act(xs)
            y.sum().backward()
            outs += [y.detach(), xs.grad]
            outs.append(GF.gan_loss(logits.to(dev), True, "vanilla"))
            outs.append(GF.cycle_loss(*[i.to(dev) for i in imgs])[0])
            if backend == "triton":
                outs.append(attn_ops.attention(q.to(dev), k.to(dev), v.to(dev), v.to(dev),
                                               torch.tensor([0.5], device=dev)))
                outs.append(GF.conv2d_act(x.to(dev), w.to(dev), None, stride=2, padding=1))
        return [o.cpu() for o in outs], [o.device for o in outs]

    for backend in ("triton", "cuda"):
        with torch.cuda.device(0):
            want, _ = run("cuda:0", backend)
            got, devices = run("cuda:1", backend)
        assert all(d == torch.device("cuda:1") for d in devices)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@gpu
def test_pix2pixhd_conv_on_gpu():
    """The launches once beyond grid axis 1's limit, run for real (bf16 to keep memory small)."""
    from ganengine.ops import conv_act as conv_ops

    torch.manual_seed(0)
    x = torch.randn(1, 8, 1100, 2048, device="cuda").to(torch.bfloat16)
    w = (torch.randn(64, 8, 4, 4, device="cuda") * 0.1).to(torch.bfloat16)
    # the reference in fp64: an fp32 F.conv2d on CUDA runs as TF32 by default (10-bit mantissa
    # products), which is itself outside the bound below
    ref = F.leaky_relu(F.conv2d(x.double(), w.double(), padding=1), 0.2)
    scale = F.conv2d(x.double().abs(), w.double().abs(), padding=1)
    for impl in ("igemm", "vendor"):
        xg = x.clone().requires_grad_()
        with on_backend("triton"), conv_ops.triton_conv_impl(impl):
            y = GF.conv2d_act(xg, w, None, stride=1, padding=1)
            y.float().sum().backward()
        # bf16 output of fp32 accumulations over 128 products (bf16 x bf16 products are exact in
        # fp32 and in TF32): u(bf16) * |y| + 128 u(fp32) * scale. The vendor path stores cuDNN's
        # bf16 conv output and then applies the activation: two roundings, 2 u(bf16) * |y|
        # (the first one, u |c|, scaled by the slope, is u |y| on the negative side).
        rounds = 1 if impl == "igemm" else 2
        err = (y.double() - ref).abs()
        assert (err <= rounds * 2.0 ** -8 * ref.abs() + 128 * 2.0 ** -24 * scale + 1e-30).all(), impl
        assert torch.isfinite(xg.grad).all()
