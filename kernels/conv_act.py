"""Triton kernels of the conv_act family (PatchGAN convolutions with fused epilogues).

Implicit-GEMM convolutions (groups=1, dilation=1, zero padding, any kernel size / stride):
  _conv_fwd      y[n, co, p] = sum_k x[n, ci, ih, iw] * w[co, ci, kh, kw], tiles of
                 (BLOCK_M pixels of one image) x (BLOCK_N output channels); epilogue: bias +
                 LeakyReLU, or (STATS) per-tile per-channel (mean, M2) partials of the stored
                 values for instance norm, combined in a fixed order (Chan's formula): no atomics.
  _conv_dgrad    dx as an implicit GEMM over (co, kh, kw), masking taps whose output position
                 is not an integer (stride > 1) or out of range.
  _conv_wgrad    dw as a GEMM of gz^T (co x pixels) and the im2col of x (pixels x ci*kh*kw);
                 one program owns a dw tile and walks every pixel: deterministic. With BIAS the
                 first column of programs also sums its gz rows: the bias gradient, no launch of its own.
Epilogue-only kernels (used after a vendor convolution, and by the backward passes), on
(N, C, P=H*W) views given by strides, so NCHW and NHWC both work:
  _bias_act, _act_grad (+ optional bias-gradient partials), _combine_stats (the implicit GEMM's tile
  statistics to mean / rstd, one launch), _norm_act (after them). conv2d_instance_norm_act after a vendor convolution, and its backward on both
  paths, use the instance-norm kernels of kernels/norm_act.py.
Launchers take tensors; no autograd here (ganengine/ops/conv_act.py owns that).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._act import leaky_relu, leaky_relu_grad

# interpreter (CPU tensors): small tiles keep the Python-level programs cheap; CUDA: the
# config listed in AOT_SPECS (checked for spills on sm_80 / sm_90)
_GEMM_CPU = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
_GEMM_CUDA = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)


def _gemm_config(t: torch.Tensor) -> dict:
    return _GEMM_CUDA if _launch.on_gpu(t) else _GEMM_CPU


ELEM = dict(BLOCK_P=32, BLOCK_C=32, num_warps=4)


@triton.jit
def _conv_fwd(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr,
              H, W, CI, OH, OW, CO, n_ptiles,
              sxn, sxc, sxh, sxw, swo, swi, swh, sww, syn, syc, syh, syw,
              stride_h, stride_w, pad_h, pad_w, slope,
              KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
              STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # grid (N * pixel tiles, channel tiles): the large dimension on axis 0 (axes 1, 2 <= 65535)
    n = tl.program_id(0) // n_ptiles
    pid_m = tl.program_id(0) % n_ptiles
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    P = OH * OW
    m_mask = offs_m < P
    n_mask = offs_n < CO
    oh = offs_m // OW
    ow = offs_m % OW
    K = CI * KH * KW
    x_base = x_ptr + n.to(tl.int64) * sxn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        # k = (kh * KW + kw) * CI + ci: ci fastest, contiguous for NHWC input
        ci = offs_k % CI
        tap = offs_k // CI
        kh = tap // KW
        kw = tap % KW
        ih = oh[:, None] * stride_h - pad_h + kh[None, :]
        iw = ow[:, None] * stride_w - pad_w + kw[None, :]
        a_mask = m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_base + ci[None, :] * sxc + ih * sxh + iw * sxw, mask=a_mask, other=0.0)
        b = tl.load(w_ptr + offs_n[None, :] * swo + ci[:, None] * swi + kh[:, None] * swh + kw[:, None] * sww,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(a, b)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ACT:
        acc = leaky_relu(acc, slope)
    out = acc.to(y_ptr.dtype.element_ty)
    mask2 = m_mask[:, None] & n_mask[None, :]
    tl.store(y_ptr + n.to(tl.int64) * syn + offs_n[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw,
             out, mask=mask2)
    if STATS:
        # statistics of the values as stored, so the normalising pass sees the same numbers
        v = tl.where(mask2, out.to(tl.float32), 0.0)
        cnt = tl.minimum(P - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        mean_t = tl.sum(v, axis=0) / cnt
        d = tl.where(mask2, v - mean_t[None, :], 0.0)
        m2_t = tl.sum(d * d, axis=0)
        base = part_ptr + ((n * n_ptiles + pid_m) * 2) * CO
        tl.store(base + offs_n, mean_t, mask=n_mask)
        tl.store(base + CO + offs_n, m2_t, mask=n_mask)


@triton.jit
def _conv_dgrad(g_ptr, w_ptr, dx_ptr,
                H, W, CI, OH, OW, CO, n_ptiles,
                sgn, sgc, sgh, sgw, swo, swi, swh, sww, sdn, sdc, sdh, sdw,
                stride_h, stride_w, pad_h, pad_w,
                KH: tl.constexpr, KW: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) // n_ptiles
    pid_m = tl.program_id(0) % n_ptiles
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # input pixel
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel
    m_mask = offs_m < H * W
    n_mask = offs_n < CI
    ih = offs_m // W
    iw = offs_m % W
    K = CO * KH * KW
    g_base = g_ptr + n.to(tl.int64) * sgn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        co = offs_k % CO
        tap = offs_k // CO
        kh = tap // KW
        kw = tap % KW
        th = ih[:, None] + pad_h - kh[None, :]
        tw = iw[:, None] + pad_w - kw[None, :]
        oh = th // stride_h
        ow = tw // stride_w
        ok = (th >= 0) & (tw >= 0) & (th % stride_h == 0) & (tw % stride_w == 0) & (oh < OH) & (ow < OW)
        a_mask = m_mask[:, None] & k_mask[None, :] & ok
        a = tl.load(g_base + co[None, :] * sgc + oh * sgh + ow * sgw, mask=a_mask, other=0.0)
        b = tl.load(w_ptr + co[:, None] * swo + offs_n[None, :] * swi + kh[:, None] * swh + kw[:, None] * sww,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(a, b)
    tl.store(dx_ptr + n.to(tl.int64) * sdn + offs_n[None, :] * sdc + ih[:, None] * sdh + iw[:, None] * sdw,
             acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _conv_wgrad(g_ptr, x_ptr, dw_ptr, db_ptr,
                NB, H, W, CI, OH, OW, CO,
                sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
                stride_h, stride_w, pad_h, pad_w,
                KH: tl.constexpr, KW: tl.constexpr, BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output channel
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (kh, kw, ci), ci fastest
    J = CI * KH * KW
    m_mask = offs_m < CO
    n_mask = offs_n < J
    ci = offs_n % CI
    tap = offs_n // CI
    kh = tap // KW
    kw = tap % KW
    P = OH * OW
    R = NB * P
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_K):
        offs_r = r0 + tl.arange(0, BLOCK_K)
        r_mask = offs_r < R
        nn_ = (offs_r // P).to(tl.int64)
        p = offs_r % P
        oh = p // OW
        ow = p % OW
        a = tl.load(g_ptr + nn_[None, :] * sgn + offs_m[:, None] * sgc + oh[None, :] * sgh + ow[None, :] * sgw,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        if BIAS:  # the bias gradient rides along: these programs read every pixel of gz already
            db += tl.sum(a.to(tl.float32), axis=1)
        ih = oh[:, None] * stride_h - pad_h + kh[None, :]
        iw = ow[:, None] * stride_w - pad_w + kw[None, :]
        b_mask = r_mask[:, None] & n_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_ptr + nn_[:, None] * sxn + ci[None, :] * sxc + ih * sxh + iw * sxw, mask=b_mask, other=0.0)
        acc += tl.dot(a, b)
    # dw is (CO, CI, KH, KW) contiguous
    dst = dw_ptr + offs_m[:, None] * J + ci[None, :] * (KH * KW) + kh[None, :] * KW + kw[None, :]
    tl.store(dst, acc.to(dw_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    if BIAS:  # one program per output-channel tile writes it (the first column of tiles): no atomics
        tl.store(db_ptr + offs_m, db.to(db_ptr.dtype.element_ty), mask=m_mask & (pid_n == 0))


# ------------------------------------------------------------------------- epilogue kernels
@triton.jit
def _tile(C, HW, n_ptiles, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (N * pixel tiles, channel tiles): n, pixel tile, offsets (pixels int64) and mask."""
    n = tl.program_id(0) // n_ptiles
    pt = tl.program_id(0) % n_ptiles
    offs_p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_p < HW)[:, None] & (offs_c < C)[None, :]
    return n, pt, offs_p.to(tl.int64), offs_c, mask


@triton.jit
def _bias_act(y_ptr, b_ptr, C, HW, n_ptiles, sn, sc, sp, slope,
              HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n, _, offs_p, offs_c, mask = _tile(C, HW, n_ptiles, BLOCK_P, BLOCK_C)
    ptr = y_ptr + n.to(tl.int64) * sn + offs_p[:, None] * sp + offs_c[None, :] * sc
    v = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(b_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
    v = leaky_relu(v, slope)
    tl.store(ptr, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_grad(g_ptr, sgn, sgc, sgp, y_ptr, sn, sc, sp, gz_ptr, part_ptr, C, HW, n_ptiles, slope,
              PARTIALS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n, pt, offs_p, offs_c, mask = _tile(C, HW, n_ptiles, BLOCK_P, BLOCK_C)
    n64 = n.to(tl.int64)
    g = tl.load(g_ptr + n64 * sgn + offs_p[:, None] * sgp + offs_c[None, :] * sgc, mask=mask, other=0.0).to(tl.float32)
    off = n64 * sn + offs_p[:, None] * sp + offs_c[None, :] * sc
    y = tl.load(y_ptr + off, mask=mask, other=0.0)
    gz = leaky_relu_grad(g, y, slope)
    tl.store(gz_ptr + off, gz.to(gz_ptr.dtype.element_ty), mask=mask)
    if PARTIALS:
        part = tl.sum(tl.where(mask, gz, 0.0), axis=0)
        tl.store(part_ptr + (tl.program_id(0).to(tl.int64)) * C + offs_c, part, mask=offs_c < C)


@triton.jit
def _affine(mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, n, offs_c, C,
            HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    cm = offs_c < C
    mean = tl.load(mean_ptr + n * C + offs_c, mask=cm, other=0.0)
    rstd = tl.load(rstd_ptr + n * C + offs_c, mask=cm, other=0.0)
    gamma = tl.full(mean.shape, 1.0, tl.float32)
    beta = tl.zeros(mean.shape, tl.float32)
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + offs_c, mask=cm, other=1.0).to(tl.float32)
    if HAS_BETA:
        beta = tl.load(beta_ptr + offs_c, mask=cm, other=0.0).to(tl.float32)
    return mean, rstd, gamma, beta


@triton.jit
def _norm_act(c_ptr, y_ptr, sn, sc, sp, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, C, HW, n_ptiles, slope,
              HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n, _, offs_p, offs_c, mask = _tile(C, HW, n_ptiles, BLOCK_P, BLOCK_C)
    mean, rstd, gamma, beta = _affine(mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, n, offs_c, C, HAS_GAMMA, HAS_BETA)
    off = n.to(tl.int64) * sn + offs_p[:, None] * sp + offs_c[None, :] * sc
    v = tl.load(c_ptr + off, mask=mask, other=0.0).to(tl.float32)
    # centred form: v * a + (beta - mean * a) cancels when |mean| >> std
    z = (v - mean[None, :]) * (rstd * gamma)[None, :] + beta[None, :]
    z = leaky_relu(z, slope)
    tl.store(y_ptr + off, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_stats(part_ptr, mean_ptr, rstd_ptr, C, HW, n_mtiles, eps,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """(N, T, 2, C) per-tile (mean, M2) of the implicit GEMM -> mean, rstd (N, C): Chan's
    parallel formula over the T tiles in order (tile t holds min(BLOCK_M, HW - t BLOCK_M) pixels).
    Grid (N, channel tiles). One launch in place of the dozen ATen ops this took before."""
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs_c < C
    base = part_ptr + n.to(tl.int64) * n_mtiles * 2 * C + offs_c
    s = tl.zeros([BLOCK_C], tl.float32)
    for t in range(0, n_mtiles):
        cnt = tl.minimum(HW - t * BLOCK_M, BLOCK_M).to(tl.float32)
        s += tl.load(base + t * 2 * C, mask=cm, other=0.0) * cnt
    mean = s / HW
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for t in range(0, n_mtiles):
        cnt = tl.minimum(HW - t * BLOCK_M, BLOCK_M).to(tl.float32)
        d = tl.load(base + t * 2 * C, mask=cm, other=0.0) - mean
        m2 += tl.load(base + (t * 2 + 1) * C, mask=cm, other=0.0) + d * d * cnt
    rstd = 1.0 / tl.sqrt_rn(m2 / HW + eps)
    tl.store(mean_ptr + n * C + offs_c, mean, mask=cm)
    tl.store(rstd_ptr + n * C + offs_c, rstd, mask=cm)


# ------------------------------------------------------------------------------ launchers
def _ncp(t: torch.Tensor):
    """(sn, sc, sp) strides of a 4-d tensor whose H, W are dense together (NCHW or NHWC)."""
    if t.shape[2] * t.shape[3] > 1 and t.stride(2) != t.stride(3) * t.shape[3]:
        raise ValueError("conv_act kernels need H and W dense together (NCHW or NHWC layouts)")
    return t.stride(0), t.stride(1), t.stride(3)


# Launch plans by (shape, strides): the per-call grid / stride arithmetic of the epilogue launchers
# costs microseconds of host time per call (on a GPU at GAN batch sizes, host time is the step
# time), and a network calls them with a handful of shapes. Bounded: cleared when it fills.
_PLANS: dict = {}
_MAX_PLANS = 512


def _cached(key, make):
    plan = _PLANS.get(key)
    if plan is None:
        plan = make()  # (raises for a layout or grid the kernels cannot take: nothing cached)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _gspec(g: torch.Tensor):
    """Strides of a gradient; a stride-0 (expanded) gradient is read in place."""
    spec = _cached(("g", g.shape, g.stride()), lambda: (
        None if g.shape[2] * g.shape[3] > 1 and g.stride(2) != g.stride(3) * g.shape[3] else _ncp(g)))
    if spec is None:
        g = g.contiguous()
        return g, _ncp(g)
    return g, spec


def _combine(part: torch.Tensor, hw: int, block: int, eps: float):
    """(N, T, 2, C) per-tile (mean, M2) -> mean, rstd (Chan's parallel formula, fixed order)."""
    n, n_t, _, c = part.shape
    mean = torch.empty((n, c), dtype=torch.float32, device=part.device)
    rstd = torch.empty_like(mean)
    grid = _launch.grid("instance statistics", n, _launch.cdiv(c, ELEM["BLOCK_C"]))
    with _launch.device_guard(part):
        _combine_stats[grid](part, mean, rstd, c, hw, n_t, float(eps), BLOCK_M=block, BLOCK_C=ELEM["BLOCK_C"],
                             num_warps=1)
    return mean, rstd


def conv2d(x, w, bias, stride, padding, slope=None, fmt=torch.contiguous_format, stats_eps=None):
    """Implicit-GEMM conv. With ``slope`` the bias + LeakyReLU epilogue runs; with
    ``stats_eps`` returns (c, mean, rstd) with the instance statistics from the epilogue."""
    n, ci, h, wd = x.shape
    co, _, kh, kw = w.shape
    oh = (h + 2 * padding[0] - kh) // stride[0] + 1
    ow = (wd + 2 * padding[1] - kw) // stride[1] + 1
    y = torch.empty((n, co, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    GEMM = _gemm_config(x)
    bm, bn, bk = GEMM["BLOCK_M"], GEMM["BLOCK_N"], GEMM["BLOCK_K"]
    n_pt = _launch.cdiv(oh * ow, bm)
    stats = stats_eps is not None
    part = torch.empty((n, n_pt, 2, co) if stats else (1,), dtype=torch.float32, device=x.device)
    grid = _launch.grid("conv2d (implicit GEMM)", n * n_pt, _launch.cdiv(co, bn))
    with _launch.device_guard(x):
        _conv_fwd[grid](x, w, bias if bias is not None else x, y, part, h, wd, ci, oh, ow, co, n_pt,
                        *x.stride(), *w.stride(), *y.stride(), stride[0], stride[1], padding[0], padding[1],
                        float(slope if slope is not None else 1.0), KH=kh, KW=kw, HAS_BIAS=bias is not None,
                        ACT=slope is not None, STATS=stats, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                        num_warps=GEMM["num_warps"], num_stages=GEMM["num_stages"])
    if not stats:
        return y
    mean, rstd = _combine(part, oh * ow, bm, stats_eps)
    return y, mean, rstd


def conv2d_grad_input(gz, w, x_shape, stride, padding, fmt=torch.contiguous_format):
    n, ci, h, wd = x_shape
    co, _, kh, kw = w.shape
    gz, _ = _gspec(gz)
    dx = torch.empty((n, ci, h, wd), dtype=gz.dtype, device=gz.device, memory_format=fmt)
    GEMM = _gemm_config(gz)
    bm, bn, bk = GEMM["BLOCK_M"], GEMM["BLOCK_N"], GEMM["BLOCK_K"]
    n_pt = _launch.cdiv(h * wd, bm)
    grid = _launch.grid("conv2d data gradient", n * n_pt, _launch.cdiv(ci, bn))
    with _launch.device_guard(gz):
        _conv_dgrad[grid](gz, w, dx, h, wd, ci, gz.shape[2], gz.shape[3], co, n_pt, *gz.stride(), *w.stride(),
                          *dx.stride(), stride[0], stride[1], padding[0], padding[1], KH=kh, KW=kw,
                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=GEMM["num_warps"],
                          num_stages=GEMM["num_stages"])
    return dx


def conv2d_grad_weight(gz, x, w_shape, stride, padding, bias_grad: bool = False):
    """dw (C_out, C_in, kH, kW) contiguous; with ``bias_grad`` (dw, db), db = sum(gz) over (N, H, W)
    in gz's dtype, from the same launch (summed in fp32 in a fixed order: deterministic)."""
    co, ci, kh, kw = w_shape
    gz, _ = _gspec(gz)
    dw = torch.empty((co, ci, kh, kw), dtype=x.dtype, device=x.device)
    db = torch.empty((co,), dtype=gz.dtype, device=gz.device) if bias_grad else dw
    GEMM = _gemm_config(x)
    bm, bn, bk = GEMM["BLOCK_M"], GEMM["BLOCK_N"], GEMM["BLOCK_K"]
    # (co tiles, ci*kh*kw tiles): at most 1024 x 64 channels x taps, far below the axis limits
    grid = _launch.grid("conv2d weight gradient", _launch.cdiv(co, bm), _launch.cdiv(ci * kh * kw, bn))
    with _launch.device_guard(x):
        _conv_wgrad[grid](gz, x, dw, db, x.shape[0], x.shape[2], x.shape[3], ci, gz.shape[2], gz.shape[3], co,
                          *gz.stride(), *x.stride(), stride[0], stride[1], padding[0], padding[1], KH=kh, KW=kw,
                          BIAS=bias_grad, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=GEMM["num_warps"],
                          num_stages=GEMM["num_stages"])
    return (dw, db) if bias_grad else dw


def _egrid(t, name):
    """(N * pixel tiles, channel tiles) and the pixel tiles per image."""
    n_pt = _launch.cdiv(t.shape[2] * t.shape[3], ELEM["BLOCK_P"])
    return _launch.grid(name, t.shape[0] * n_pt, _launch.cdiv(t.shape[1], ELEM["BLOCK_C"])), n_pt


def _eplan(t, name):
    """An epilogue launch over ``t``: (grid, (C, H*W, pixel tiles per image, sn, sc, sp))."""
    def make():
        grid, n_pt = _egrid(t, name)
        return grid, (t.shape[1], t.shape[2] * t.shape[3], n_pt, *_ncp(t))
    return _cached(("e", t.shape, t.stride()), make)


_EKW = dict(BLOCK_P=ELEM["BLOCK_P"], BLOCK_C=ELEM["BLOCK_C"], num_warps=ELEM["num_warps"])


def bias_act_(y, bias, slope):
    """y = leaky_relu(y + bias, slope), in place."""
    grid, (c, hw, n_pt, sn, sc, sp) = _eplan(y, "conv bias + act")
    with _launch.device_guard(y):
        _bias_act[grid](y, bias if bias is not None else y, c, hw, n_pt, sn, sc, sp,
                        float(slope), HAS_BIAS=bias is not None, **_EKW)
    return y


def act_grad(grad, y, slope, bias_grad: bool = True):
    """gz = grad * (y > 0 ? 1 : slope) in y's layout, and (``bias_grad``) the bias gradient sum(gz)
    in fp32 from per-tile partials (one more kernel: their sum), else None. The routes take the
    bias gradient from the convolution's backward instead (convolution_backward's own, as eager's;
    the implicit GEMM's weight-gradient launch), which costs no launch of its own."""
    grad, gs = _gspec(grad)
    gz = torch.empty_like(y)
    grid, (c, hw, n_pt, sn, sc, sp) = _eplan(y, "conv act gradient")
    part = torch.empty((y.shape[0], n_pt, c), dtype=torch.float32, device=y.device) if bias_grad else gz
    with _launch.device_guard(y):
        _act_grad[grid](grad, *gs, y, sn, sc, sp, gz, part, c, hw, n_pt, float(slope), PARTIALS=bias_grad, **_EKW)
    return gz, (part.sum(dim=(0, 1)) if bias_grad else None)


def norm_act(c, mean, rstd, gamma, beta, slope):
    y = torch.empty_like(c)
    grid, (ch, hw, n_pt, sn, sc, sp) = _eplan(c, "instance norm + act")
    with _launch.device_guard(c):
        _norm_act[grid](c, y, sn, sc, sp, mean, rstd, gamma if gamma is not None else mean,
                        beta if beta is not None else mean, ch, hw, n_pt, float(slope),
                        HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, **_EKW)
    return y


# ------------------------------------------------------------------------- AOT (sm_80 / sm_90)
# PatchGAN discriminator layers (4x4 convs, stride 2 then 1) at 256x256 batch 1, as the ops run
# them on a GPU: vendor convolution + Triton epilogues (the default), and the implicit-GEMM path
AOT_LAYERS = [((1, 64, 128, 128), 128, 2), ((1, 256, 32, 32), 512, 1)]


def aot_cases():
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for (xs, co, st) in AOT_LAYERS:
                def run(xs=xs, co=co, st=st, dtype=dtype, fmt=fmt):
                    x = torch.empty(xs, device="meta", dtype=dtype, memory_format=fmt)
                    w = torch.empty((co, xs[1], 4, 4), device="meta", dtype=dtype)
                    b = torch.empty(co, device="meta", dtype=dtype)
                    gamma = torch.empty(co, device="meta", dtype=torch.float32)
                    y = conv2d(x, w, b, (st, st), (1, 1), slope=0.2, fmt=fmt)          # conv + bias + act
                    c, mean, rstd = conv2d(x, w, None, (st, st), (1, 1), fmt=fmt, stats_eps=1e-5)
                    g = torch.empty_like(y)
                    gz, _ = act_grad(g, y, 0.2, bias_grad=False)                   # as the routes run them
                    act_grad(g, y, 0.2)                                              # (+ bias partials)
                    conv2d_grad_input(gz, w, x.shape, (st, st), (1, 1), fmt)
                    conv2d_grad_weight(gz, x, w.shape, (st, st), (1, 1), bias_grad=True)
                    if st == 1:
                        return  # the epilogue kernels compile alike for every layer: once is enough
                    bias_act_(y, b, 0.2)                                              # vendor-conv epilogues
                    norm_act(c, mean, rstd, gamma, gamma, 0.2)
                layout = "NHWC" if fmt is torch.channels_last else "NCHW"
                yield f"{str(dtype)[6:]} {layout} conv4x4/s{st} {'x'.join(map(str, xs))}->{co}", run
