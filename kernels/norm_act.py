"""Triton kernels for fused instance norm + activation (forward and backward).

Memory is addressed as (n, c, hw) with strides (sN, sC, sHW), which covers NCHW-dense
(sHW = 1) and NHWC-dense (sC = 1, sHW = C) tensors without copies. A program owns BLOCK_C
channels of one instance and walks the plane in [BLOCK_C, BLOCK_HW] tiles:

* fused kernels (one program per (n, channel block)): a plane of up to _MAX_TILE elements is
  one tile, read once and kept in registers (forward: read x once, write y once; backward:
  read x and grad once, write dx once); larger planes keep per-lane Welford accumulators
  (count, mean, M2 per lane, no per-element division: the count is uniform per tile) merged
  once at the end with Chan's formula, then read the plane a second time to apply.
* split kernels (grid (n * channel blocks, SPLIT)): when there are too few programs to fill
  the GPU (batch 1, 64 channels), each plane is cut into SPLIT chunks; stage 1 writes per-chunk
  statistics, stage 2 merges them per plane in a fixed order (deterministic; every chunk's
  program computes the same merge) and applies. Two launches, no host-side reduction.
* tiny planes (8x8 and below) are packed several per program (BLOCK_C > 1 in NCHW too), so a
  program's lanes are not mostly masked off.

Programs are sized from the device's SM count (_PROGRAMS_PER_SM per SM). Activation:
z = x_hat * w + b, y = z > 0 ? z : slope * z (relu: slope 0), or y = z. With eps = 0 and a
constant plane the variance is 0: rstd = 0 there, as ATen (the output is the bias).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _launch
from ._act import leaky_relu, leaky_relu_grad

# largest plane tile kept in registers (one read): 16 warps x 32 lanes x 32 values in NCHW,
# where loads vectorise; NHWC tiles hold half that (per-pixel pointers cost registers). Checked
# for spills by the AOT report, forward and backward, on sm_80 and sm_90.
_MAX_TILE = {False: 16384, True: 8192}
# tile of the looping kernels (planes too big for one tile, split chunks): each lane keeps
# Welford / gradient-sum accumulators, 8 values per thread
_LOOP_TILE = 4096
# tiny planes are packed into tiles of about this many elements
_PACK_TILE = 2048
# at least this many programs per SM; below it, planes are split (when they are big enough)
_PROGRAMS_PER_SM = 4
# a split chunk is at least this many elements: below, the extra launch and re-read cost more
_MIN_CHUNK = 2048


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _chan(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan's merge of two (mean, M2, count) summaries; an empty side leaves the other as is."""
    n = n_a + n_b
    w = n_b / tl.maximum(n, 1.0)
    d = mean_b - mean_a
    return mean_a + d * w, m2_a + m2_b + d * d * (n_a * w), n


@triton.jit
def _lane_welford(X, base, start, end, sHW, cmask, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                  ACC: tl.constexpr):
    """(mean, M2, count) per channel row of hw in [start, end): Welford per lane, one merge."""
    mean = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    m2 = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    for hw0 in range(start, end, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = cmask[:, None] & (hw < end)[None, :]
        x = tl.load(X + base[:, None] + hw[None, :].to(tl.int64) * sHW, mask=mask, other=0.0).to(ACC)
        # only the last tile is partial: a valid lane has one value per earlier tile, so its
        # count is the tile number, and 1/count is one scalar division per tile (in ACC: an fp32
        # reciprocal left fp64 planes only ~1e-8 accurate)
        inv = 1.0 / tl.cast((hw0 - start) // BLOCK_HW + 1, ACC)
        d = x - mean
        new_mean = mean + d * inv
        m2 = tl.where(mask, m2 + d * (x - new_mean), m2)
        mean = tl.where(mask, new_mean, mean)
    # per-lane counts: one per full tile, plus one if the lane is valid in the last tile
    full = (end - start - 1) // BLOCK_HW  # tiles before the last
    last = start + full * BLOCK_HW + tl.arange(0, BLOCK_HW)
    in_last = cmask[:, None] & (last < end)[None, :]
    cnt = tl.where(cmask[:, None], full + in_last.to(ACC), 0.0)
    return tl.reduce((mean, m2, cnt), 1, _chan)


@triton.jit
def _rstd(m2, HW, eps):
    v = m2 / HW + eps
    # eps = 0 on a constant plane: ATen's invstd = 0 (the output is the bias), not inf
    return tl.where(v == 0, 0.0, 1.0 / tl.sqrt(v))


@triton.jit
def _activate(z, slope, ACT: tl.constexpr):
    if ACT:
        z = leaky_relu(z, slope)
    return z


@triton.jit
def _scale_shift(W, B, c, cmask, rstd, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(W + c, mask=cmask, other=1.0).to(ACC)
    shift = rstd * 0  # centred form (x - mean) * scale + b keeps precision for large means
    if HAS_B:
        shift = tl.load(B + c, mask=cmask, other=0.0).to(ACC)
    return scale, shift


@triton.jit
def _col(v, BLOCK_C: tl.constexpr):
    """v[:, None] for broadcasting a per-row value over a [BLOCK_C, BLOCK_HW] tile. With one row
    it is a scalar instead: broadcasting the row vector made Triton 3.6 convert the whole
    broadcast [1, BLOCK_HW] tile's layout through shared memory (the split-plane kernels' PTX
    grew to 16K lines and 95 barriers; seen in the sm_90 TTGIR)."""
    if BLOCK_C == 1:
        return tl.sum(v, axis=0)
    else:
        return v[:, None]


@triton.jit
def _apply_range(X, Y, base, start, end, sHW, cmask, mean, scale, shift, slope, ACT: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    m, a, t = _col(mean, BLOCK_C), _col(scale, BLOCK_C), _col(shift, BLOCK_C)
    for hw0 in range(start, end, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = cmask[:, None] & (hw < end)[None, :]
        offs = base[:, None] + hw[None, :].to(tl.int64) * sHW
        x = tl.load(X + offs, mask=mask, other=0.0).to(mean.dtype)
        y = _activate((x - m) * a + t, slope, ACT)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _program_rows(C, sN, sC, n_cblocks, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    return n, c, cmask, n.to(tl.int64) * sN + c.to(tl.int64) * sC


# ----------------------------------------------------------------------------- forward
@triton.jit(do_not_specialize=["n_cblocks"])
def _fwd_fused_kernel(X, Y, W, B, MEAN, RSTD, C, HW, sN, sC, sHW, n_cblocks, eps, slope,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, SINGLE: tl.constexpr,
                      ACC: tl.constexpr):
    n, c, cmask, base = _program_rows(C, sN, sC, n_cblocks, BLOCK_C)
    if SINGLE:  # the whole plane in registers: exact two-pass statistics, one read
        hw = tl.arange(0, BLOCK_HW)
        mask = cmask[:, None] & (hw < HW)[None, :]
        offs = base[:, None] + hw[None, :].to(tl.int64) * sHW
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        mean = tl.sum(x, axis=1) / HW
        d = tl.where(mask, x - mean[:, None], 0.0)
        m2 = tl.sum(d * d, axis=1)
    else:
        mean, m2, _ = _lane_welford(X, base, 0, HW, sHW, cmask, BLOCK_C, BLOCK_HW, ACC)
    rstd = _rstd(m2, HW, eps)
    tl.store(MEAN + n * C + c, mean, mask=cmask)
    tl.store(RSTD + n * C + c, rstd, mask=cmask)
    scale, shift = _scale_shift(W, B, c, cmask, rstd, HAS_W, HAS_B, ACC)
    if SINGLE:
        y = _activate(d * scale[:, None] + shift[:, None], slope, ACT)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    else:
        _apply_range(X, Y, base, 0, HW, sHW, cmask, mean, scale, shift, slope, ACT, BLOCK_C, BLOCK_HW)


@triton.jit(do_not_specialize=["n_cblocks", "SPLIT"])
def _fwd_partial_kernel(X, PMEAN, PM2, C, HW, sN, sC, sHW, n_cblocks, CHUNK, SPLIT,
                        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
    n, c, cmask, base = _program_rows(C, sN, sC, n_cblocks, BLOCK_C)
    s = tl.program_id(1)
    start = s * CHUNK
    mean, m2, _ = _lane_welford(X, base, start, tl.minimum(start + CHUNK, HW), sHW, cmask, BLOCK_C, BLOCK_HW, ACC)
    out = (n * C + c) * SPLIT + s
    tl.store(PMEAN + out, mean, mask=cmask)
    tl.store(PM2 + out, m2, mask=cmask)


@triton.jit(do_not_specialize=["n_cblocks", "SPLIT"])
def _fwd_apply_kernel(X, Y, W, B, PMEAN, PM2, MEAN, RSTD, C, HW, sN, sC, sHW, n_cblocks, CHUNK, SPLIT, eps,
                      slope, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, SPLIT_P2: tl.constexpr,
                      ACC: tl.constexpr):
    n, c, cmask, base = _program_rows(C, sN, sC, n_cblocks, BLOCK_C)
    s = tl.program_id(1)
    # merge the chunk statistics of these planes in a fixed order (same bits in every chunk)
    k = tl.arange(0, SPLIT_P2)
    kmask = cmask[:, None] & (k < SPLIT)[None, :]
    idx = (n * C + c)[:, None] * SPLIT + k[None, :]
    pmean = tl.load(PMEAN + idx, mask=kmask, other=0.0)
    pm2 = tl.load(PM2 + idx, mask=kmask, other=0.0)
    cnt = tl.where(kmask, tl.minimum(HW - k * CHUNK, CHUNK).to(ACC)[None, :], 0.0)
    mean, m2, _ = tl.reduce((pmean, pm2, cnt), 1, _chan)
    rstd = _rstd(m2, HW, eps)
    tl.store(MEAN + n * C + c, mean, mask=cmask & (s == 0))
    tl.store(RSTD + n * C + c, rstd, mask=cmask & (s == 0))
    scale, shift = _scale_shift(W, B, c, cmask, rstd, HAS_W, HAS_B, ACC)
    start = s * CHUNK
    _apply_range(X, Y, base, start, tl.minimum(start + CHUNK, HW), sHW, cmask, mean, scale, shift, slope, ACT,
                 BLOCK_C, BLOCK_HW)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _bwd_tile(X, G, base, gbase, hw0, end, sHW, gHW, cmask, mean, rstd, w, b, slope,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
    """x_hat and the activation-masked upstream gradient ga (0 on masked lanes) for one tile."""
    hw = hw0 + tl.arange(0, BLOCK_HW)
    mask = cmask[:, None] & (hw < end)[None, :]
    hw64 = hw[None, :].to(tl.int64)
    x = tl.load(X + base[:, None] + hw64 * sHW, mask=mask, other=0.0).to(ACC)
    g = tl.load(G + gbase[:, None] + hw64 * gHW, mask=mask, other=0.0).to(ACC)
    xhat = (x - _col(mean, BLOCK_C)) * _col(rstd, BLOCK_C)
    if ACT:
        z = xhat
        if HAS_W:
            z = z * _col(w, BLOCK_C)
        if HAS_B:
            z = z + _col(b, BLOCK_C)
        g = leaky_relu_grad(g, z, slope)
    return xhat, g, mask, hw64


@triton.jit
def _bwd_sums(X, G, base, gbase, start, end, sHW, gHW, cmask, mean, rstd, w, b, slope,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
    """sum(ga), sum(ga * x_hat) over hw in [start, end): per-lane accumulators, one reduction."""
    acc_g = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    acc_gx = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    for hw0 in range(start, end, BLOCK_HW):
        xh, g, _, _ = _bwd_tile(X, G, base, gbase, hw0, end, sHW, gHW, cmask, mean, rstd, w, b, slope,
                                HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_HW, ACC)
        acc_g += g
        acc_gx += g * xh
    return tl.sum(acc_g, axis=1), tl.sum(acc_gx, axis=1)


@triton.jit
def _bwd_apply_range(X, G, DX, base, gbase, start, end, sHW, gHW, cmask, mean, rstd, w, b, k, mg, mgx, slope,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
    kc, mgc, mgxc = _col(k, BLOCK_C), _col(mg, BLOCK_C), _col(mgx, BLOCK_C)
    for hw0 in range(start, end, BLOCK_HW):
        xh, g, mask, hw64 = _bwd_tile(X, G, base, gbase, hw0, end, sHW, gHW, cmask, mean, rstd, w, b, slope,
                                      HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_HW, ACC)
        dx = kc * (g - mgc - xh * mgxc)
        tl.store(DX + base[:, None] + hw64 * sHW, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_load_params(W, B, MEAN, RSTD, n, c, C, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     ACC: tl.constexpr):
    mean = tl.load(MEAN + n * C + c, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + n * C + c, mask=cmask, other=1.0)
    w = rstd * 0 + 1.0
    b = rstd * 0
    if HAS_W:
        w = tl.load(W + c, mask=cmask, other=1.0).to(ACC)
    if HAS_B:
        b = tl.load(B + c, mask=cmask, other=0.0).to(ACC)
    return mean, rstd, w, b


@triton.jit(do_not_specialize=["n_cblocks"])
def _bwd_fused_kernel(X, G, DX, W, B, MEAN, RSTD, DW, DB, C, HW, sN, sC, sHW, gN, gC, gHW,
                      n_cblocks, slope,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, SINGLE: tl.constexpr,
                      ACC: tl.constexpr):
    n, c, cmask, base = _program_rows(C, sN, sC, n_cblocks, BLOCK_C)
    gbase = n.to(tl.int64) * gN + c.to(tl.int64) * gC
    mean, rstd, w, b = _bwd_load_params(W, B, MEAN, RSTD, n, c, C, cmask, HAS_W, HAS_B, ACC)
    if SINGLE:  # x and grad read once, kept in registers
        xhat, ga, mask, hw64 = _bwd_tile(X, G, base, gbase, 0, HW, sHW, gHW, cmask, mean, rstd, w, b,
                                         slope, HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_HW, ACC)
        sum_g = tl.sum(ga, axis=1)
        sum_gx = tl.sum(ga * xhat, axis=1)
    else:
        sum_g, sum_gx = _bwd_sums(X, G, base, gbase, 0, HW, sHW, gHW, cmask, mean, rstd, w, b, slope,
                                  HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_HW, ACC)
    tl.store(DB + n * C + c, sum_g, mask=cmask)
    tl.store(DW + n * C + c, sum_gx, mask=cmask)
    k = rstd * w
    mg = sum_g / HW
    mgx = sum_gx / HW
    if SINGLE:
        dx = k[:, None] * (ga - mg[:, None] - xhat * mgx[:, None])
        tl.store(DX + base[:, None] + hw64 * sHW, dx.to(DX.dtype.element_ty), mask=mask)
    else:
        _bwd_apply_range(X, G, DX, base, gbase, 0, HW, sHW, gHW, cmask, mean, rstd, w, b, k, mg, mgx, slope,
                         HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_HW, ACC)


@triton.jit(do_not_specialize=["n_cblocks", "SPLIT"])
def _bwd_partial_kernel(X, G, W, B, MEAN, RSTD, PG, PGX, C, HW, sN, sC, sHW, gN, gC, gHW,
                        n_cblocks, CHUNK, SPLIT, slope,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
    n, c, cmask, base = _program_rows(C, sN, sC, n_cblocks, BLOCK_C)
    s = tl.program_id(1)
    gbase = n.to(tl.int64) * gN + c.to(tl.int64) * gC
    mean, rstd, w, b = _bwd_load_params(W, B, MEAN, RSTD, n, c, C, cmask, HAS_W, HAS_B, ACC)
    start = s * CHUNK
    sum_g, sum_gx = _bwd_sums(X, G, base, gbase, start, tl.minimum(start + CHUNK, HW), sHW, gHW, cmask, mean,
                              rstd, w, b, slope, HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_HW, ACC)
    out = (n * C + c) * SPLIT + s
    tl.store(PG + out, sum_g, mask=cmask)
    tl.store(PGX + out, sum_gx, mask=cmask)


@triton.jit(do_not_specialize=["n_cblocks", "SPLIT"])
def _bwd_apply_kernel(X, G, DX, W, B, MEAN, RSTD, PG, PGX, DW, DB, C, HW, sN, sC, sHW, gN, gC, gHW,
                      n_cblocks, CHUNK, SPLIT, slope,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, SPLIT_P2: tl.constexpr,
                      ACC: tl.constexpr):
    n, c, cmask, base = _program_rows(C, sN, sC, n_cblocks, BLOCK_C)
    s = tl.program_id(1)
    gbase = n.to(tl.int64) * gN + c.to(tl.int64) * gC
    mean, rstd, w, b = _bwd_load_params(W, B, MEAN, RSTD, n, c, C, cmask, HAS_W, HAS_B, ACC)
    k = tl.arange(0, SPLIT_P2)
    kmask = cmask[:, None] & (k < SPLIT)[None, :]
    idx = (n * C + c)[:, None] * SPLIT + k[None, :]
    sum_g = tl.sum(tl.load(PG + idx, mask=kmask, other=0.0), axis=1)
    sum_gx = tl.sum(tl.load(PGX + idx, mask=kmask, other=0.0), axis=1)
    tl.store(DB + n * C + c, sum_g, mask=cmask & (s == 0))
    tl.store(DW + n * C + c, sum_gx, mask=cmask & (s == 0))
    start = s * CHUNK
    _bwd_apply_range(X, G, DX, base, gbase, start, tl.minimum(start + CHUNK, HW), sHW, gHW, cmask, mean, rstd, w,
                     b, rstd * w, sum_g / HW, sum_gx / HW, slope, HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_HW, ACC)


# ----------------------------------------------------------------------------- launch plan
def _flat_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(sN, sC, sHW) if t's (H, W) dims flatten to one stride, else None."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if h == 1:
        return sn, sc, sw
    if w == 1 or sh == w * sw:
        return sn, sc, (sh if w == 1 else sw)
    return None


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _p2(v: int) -> int:
    return _launch.next_power_of_2(max(int(v), 1))


@functools.lru_cache(maxsize=1024)
def pick_config(n: int, c: int, hw: int, channels_last: bool, elem_size: int, sms: int,
                split: int | None = None) -> dict:
    """Tile shape, warps and plane split of one call (the single source of truth: the
    launchers and the AOT report both use it).

    NHWC tiles take at least one 32-byte sector of channels per pixel (coalesced loads);
    NCHW tiles take whole planes, several tiny ones per tile. ``split`` forces a split of each
    plane into about that many chunks (tests); None decides from the SM count. Cached: planning
    cost ~20 us of Python per call, more than the kernel at GAN sizes (callers only read it)."""
    target = _PROGRAMS_PER_SM * sms
    bc_min = min(_p2(c), max(1, 32 // elem_size)) if channels_last else 1
    block_hw = min(_p2(hw), _MAX_TILE[channels_last] // bc_min)
    block_c = min(_p2(c), max(bc_min, _PACK_TILE // block_hw))
    while block_c > bc_min and n * _launch.cdiv(c, block_c) < target:  # packing must not starve the GPU
        block_c //= 2
    programs = n * _launch.cdiv(c, block_c)
    tiles = _launch.cdiv(hw, block_hw)
    if split is None:
        want = _launch.cdiv(target, programs) if 0 < programs < target else 1  # (0: no planes)
        want = min(want, max(1, hw // _MIN_CHUNK))
        if tiles == 1 and programs >= sms:
            want = 1  # the plane fits on chip and every SM has a program: one read beats more programs
    else:
        want = max(1, int(split))
    if want > 1:
        block_hw = min(block_hw, _p2(_launch.cdiv(hw, want)))
        tiles = _launch.cdiv(hw, block_hw)
    single = want == 1 and block_hw >= hw
    if not single:  # looping kernels: smaller tiles (accumulators per lane)
        block_hw = min(block_hw, max(1, _LOOP_TILE // block_c))
        tiles = _launch.cdiv(hw, block_hw)
    want = max(1, min(want, tiles))
    chunk = max(1, tiles // want) * block_hw  # at least `want` chunks
    nsplit = _launch.cdiv(hw, chunk)
    tile = block_c * block_hw
    warps = min(16, max(4, tile // 1024)) if single else min(8, max(4, tile // 256))
    return dict(BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps, n_cblocks=_launch.cdiv(c, block_c),
                split=nsplit, chunk=chunk, SINGLE=single, SPLIT_P2=_p2(nsplit))


def _plan(x: torch.Tensor, split: int | None) -> dict:
    n, c, h, w = x.shape
    channels_last = x.stride(1) == 1 and c > 1
    return pick_config(n, c, h * w, channels_last, x.element_size(), _launch.sm_count(x), split)


def _dense(t: torch.Tensor):
    strides = _flat_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _flat_strides(t)
    return t, strides


def forward(x, weight, bias, eps: float, apply_act: bool, slope: float, split: int | None = None):
    """Returns (y, mean, rstd). ``split`` forces the split-plane scheme (tests); None = auto."""
    x, strides = _dense(x)
    # the kernels read W + c: a strided or expanded (C) view (w[::2], w[:1].expand(C)) is copied;
    # contiguous() returns a dense one itself (cheaper than testing its stride first)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    n, c, h, w = x.shape
    hw = h * w
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty_like(x)
    if hw == 0 or n * c == 0:  # empty planes: mean and variance are undefined (NaN, as torch.var_mean);
        # no planes (N or C of 0): (N, C) statistics with no entries, nothing to launch (the planner
        # divides by the program count)
        nan = torch.full((n, c), float("nan"), device=x.device, dtype=acc_t)
        return y, nan, nan.clone()
    mean = torch.empty((n, c), device=x.device, dtype=acc_t)
    rstd = torch.empty((n, c), device=x.device, dtype=acc_t)
    cfg = _plan(x, split)
    nb, nsplit = cfg["n_cblocks"], cfg["split"]
    wt = weight if weight is not None else mean  # dummy pointer, never read
    bt = bias if bias is not None else mean
    common = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=apply_act,
                  BLOCK_C=cfg["BLOCK_C"], BLOCK_HW=cfg["BLOCK_HW"], ACC=_acc(x.dtype),
                  num_warps=cfg["num_warps"])
    with _launch.device_guard(x):
        if nsplit == 1:
            _fwd_fused_kernel[_launch.grid("norm_act fwd", n * nb)](
                x, y, wt, bt, mean, rstd, c, hw, *strides, nb, eps, slope, SINGLE=cfg["SINGLE"], **common)
            return y, mean, rstd
        pmean = torch.empty((n * c, nsplit), device=x.device, dtype=acc_t)
        pm2 = torch.empty_like(pmean)
        grid = _launch.grid("norm_act fwd (split)", n * nb, nsplit)
        _fwd_partial_kernel[grid](x, pmean, pm2, c, hw, *strides, nb, cfg["chunk"], nsplit,
                                  BLOCK_C=cfg["BLOCK_C"], BLOCK_HW=cfg["BLOCK_HW"], ACC=_acc(x.dtype),
                                  num_warps=cfg["num_warps"])
        _fwd_apply_kernel[grid](x, y, wt, bt, pmean, pm2, mean, rstd, c, hw, *strides, nb, cfg["chunk"], nsplit,
                                eps, slope, SPLIT_P2=cfg["SPLIT_P2"], **common)
    return y, mean, rstd


def backward(grad_y, x, weight, bias, mean, rstd, apply_act: bool, slope: float, split: int | None = None):
    """Returns (grad_x, grad_weight per instance (N, C), grad_bias per instance (N, C))."""
    x, strides = _dense(x)
    # the kernels read W + c: a strided or expanded (C) view (w[::2], w[:1].expand(C)) is copied;
    # contiguous() returns a dense one itself (cheaper than testing its stride first)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    grad_y, gstrides = _dense(grad_y)
    n, c, h, w = x.shape
    hw = h * w
    dx = torch.empty_like(x)
    if hw == 0 or n * c == 0:  # (nothing to launch: see forward)
        return dx, torch.zeros_like(mean), torch.zeros_like(mean)
    dw = torch.empty_like(mean)
    db = torch.empty_like(mean)
    cfg = _plan(x, split)
    nb, nsplit = cfg["n_cblocks"], cfg["split"]
    wt = weight if weight is not None else mean
    bt = bias if bias is not None else mean
    common = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=apply_act,
                  BLOCK_C=cfg["BLOCK_C"], BLOCK_HW=cfg["BLOCK_HW"], ACC=_acc(x.dtype),
                  num_warps=cfg["num_warps"])
    with _launch.device_guard(x):
        if nsplit == 1:
            _bwd_fused_kernel[_launch.grid("norm_act bwd", n * nb)](
                x, grad_y, dx, wt, bt, mean, rstd, dw, db, c, hw, *strides, *gstrides, nb, slope,
                SINGLE=cfg["SINGLE"], **common)
            return dx, dw, db
        pg = torch.empty((n * c, nsplit), device=x.device, dtype=mean.dtype)
        pgx = torch.empty_like(pg)
        grid = _launch.grid("norm_act bwd (split)", n * nb, nsplit)
        _bwd_partial_kernel[grid](x, grad_y, wt, bt, mean, rstd, pg, pgx, c, hw, *strides, *gstrides, nb,
                                  cfg["chunk"], nsplit, slope, **common)
        _bwd_apply_kernel[grid](x, grad_y, dx, wt, bt, mean, rstd, pg, pgx, dw, db, c, hw, *strides, *gstrides,
                                nb, cfg["chunk"], nsplit, slope, SPLIT_P2=cfg["SPLIT_P2"], **common)
    return dx, dw, db


# ----------------------------------------------------------------------------- AOT cases
# model shapes (N, C, H, W): CycleGAN/pix2pix at 256x256 batch 1 (split planes; the 64x64
# resblocks on chip), StarGAN batch 16 at 128x128 (16K planes on chip) and 32x32, deep U-Net
# levels (tiny planes packed), odd sizes (unaligned tails)
AOT_SHAPES = [(1, 64, 256, 256), (1, 256, 64, 64), (16, 64, 128, 128), (16, 256, 32, 32), (64, 1024, 2, 2),
              (2, 3, 45, 51)]


def aot_cases():
    """(label, thunk) pairs: each thunk runs the launchers on meta tensors of one model shape;
    the AOT report records the launches (inside ``_launch.planning_for_gpu``) and compiles them."""
    for dtype in (torch.float32, torch.bfloat16):  # fp16 compiles like bf16
        for shape in AOT_SHAPES:
            for fmt in (torch.contiguous_format, torch.channels_last):
                def run(shape=shape, dtype=dtype, fmt=fmt):
                    x = torch.empty(shape, device="meta", dtype=dtype, memory_format=fmt)
                    wb = torch.empty(shape[1], device="meta", dtype=torch.float32)
                    y, mean, rstd = forward(x, wb, wb, 1e-5, True, 0.2)
                    backward(torch.empty_like(y), x, wb, wb, mean, rstd, True, 0.2)
                layout = "NHWC" if fmt is torch.channels_last else "NCHW"
                yield f"{str(dtype)[6:]} {layout} {'x'.join(map(str, shape))}", run
