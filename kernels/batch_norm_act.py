"""Triton kernels for fused (conditional) batch norm + activation, forward and backward.

x is addressed as (n, c, s) with strides (sN, sC, sS): NCHW-dense (sS = 1) and channels-last
dense (sC = 1) tensors, and (N, C) / (N, C, L), without copies. A program owns BLOCK_C channels
and one "chunk" of the (n, s) plane of those channels, walked in [BLOCK_C, BLOCK_N, BLOCK_S]
tiles. The grid is 1-D (channel block fastest), so no grid axis limit applies.

Forward, training (``flags & 1``):
* one chunk per channel block (small N*S): one kernel computes the statistics (per tile the
  exact mean and M2 of d = x - K_c, K_c the channel's first element, merged with Chan's
  formula), updates the running statistics, and applies;
* otherwise a split reduction in two launches: partial (mean, M2) per (channel, chunk), then an
  apply kernel whose every program combines its channels' partials itself (fixed order, so all
  programs agree bit for bit; the chunk-0 program writes the statistics and the running
  statistics), then applies to its chunk.
The shift K makes a constant channel's mean exact and its M2 exactly 0 (eager's result).
Eval: one apply kernel reading running_mean/running_var.

Backward: sums of ga = grad * act'(z) and ga * xhat per channel (per (n, channel) for the
conditional form), then dx = ga * scale - (xhat * P + Q); one kernel when one program owns a
channel block, else a partial-sum kernel and a combine + dx kernel.

``stats`` is (3, C) in the accumulation dtype: mean, rstd, unbiased variance (of the batch in
training, of the running statistics in eval). ``flags``: 1 training, 2 activation, 4 per-sample.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _launch
from ._act import leaky_relu, leaky_relu_grad

# Programs that fill a GPU; fewer channel blocks than this split the (n, s) plane.
_TARGET_PROGRAMS = 512
# Under the interpreter (CPU tensors) every program runs in Python: split much less.
_TARGET_PROGRAMS_INTERPRETED = 4
_MAX_CHUNKS = 1024
_TILE = 1024  # elements per [BLOCK_C, BLOCK_N, BLOCK_S] tile, NCHW (4 warps x 32 lanes x 8)
_TILE_CL = 256  # channels-last: [32 channels, 8] tiles; larger ones spill in the backward kernels (aot_report)
_MAX_BLOCK_C = 32


def block_k(block_c: int) -> int:
    """Partials (or images) combined per step: [BLOCK_C, BLOCK_K] stays within 256 values."""
    return max(8, min(64, 256 // block_c))


@triton.jit
def _tile(c, cmask, n0, s0, n_hi, s_hi, sN, sC, sS, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    n = n0 + tl.arange(0, BLOCK_N)
    s = s0 + tl.arange(0, BLOCK_S)
    nmask = n < n_hi
    mask = cmask[:, None, None] & nmask[None, :, None] & (s < s_hi)[None, None, :]
    offs = ((c.to(tl.int64) * sC)[:, None, None] + (n.to(tl.int64) * sN)[None, :, None]
            + (s.to(tl.int64) * sS)[None, None, :])
    return offs, mask, n, nmask


@triton.jit
def _activate(z, slope, ACT: tl.constexpr):
    if ACT:
        z = leaky_relu(z, slope)
    return z


@triton.jit
def _coefs(W, B, c, cmask, n, nmask, wsN, mean, rstd, TRAINING: tl.constexpr, PER_SAMPLE: tl.constexpr,
           HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
           ACC: tl.constexpr):
    """scale and shift of z = (x - mz) * scale + shift: [BLOCK_C, BLOCK_N] per sample, else
    [BLOCK_C, 1] (fewer live registers); mz [BLOCK_C]; g the gain/weight, shaped like scale."""
    if PER_SAMPLE:
        m2d = cmask[:, None] & nmask[None, :]
        woffs = c.to(tl.int64)[:, None] + n.to(tl.int64)[None, :] * wsN
        g = tl.full([BLOCK_C, BLOCK_N], 1.0, ACC)
        if HAS_W:
            g = tl.load(W + woffs, mask=m2d, other=1.0).to(ACC)
        sh = tl.zeros([BLOCK_C, BLOCK_N], ACC)
        if HAS_B:
            sh = tl.load(B + woffs, mask=m2d, other=0.0).to(ACC)
    else:
        g = tl.full([BLOCK_C, 1], 1.0, ACC)
        if HAS_W:
            g = tl.load(W + c, mask=cmask, other=1.0).to(ACC)[:, None]
        sh = tl.zeros([BLOCK_C, 1], ACC)
        if HAS_B:
            sh = tl.load(B + c, mask=cmask, other=0.0).to(ACC)[:, None]
    scale = rstd[:, None] * g
    if TRAINING:
        mz = mean
        shift = sh
    else:  # eval: eager's x * scale + (b - running_mean * scale)
        mz = mean * 0
        shift = sh - mean[:, None] * scale
    return scale, shift, mz, g


@triton.jit
def _chunk_stats(X, K, c, cmask, n_lo, n_hi, s_lo, s_hi, sN, sC, sS, BLOCK_C: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """Exact mean of d = x - K and M2 over the chunk, per channel (per tile two passes in
    registers, merged with Chan's formula)."""
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    count = tl.zeros([1], dtype=ACC)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask, tn_, tnm_ = _tile(c, cmask, n0, s0, n_hi, s_hi, sN, sC, sS, BLOCK_N, BLOCK_S)
            x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
            d = tl.where(mask, x - K[:, None, None], 0.0)
            cnt = (tl.minimum(n_hi - n0, BLOCK_N) * tl.minimum(s_hi - s0, BLOCK_S)).to(ACC)
            tmean = tl.sum(tl.sum(d, axis=2), axis=1) / cnt
            e = tl.where(mask, d - tmean[:, None, None], 0.0)
            tm2 = tl.sum(tl.sum(e * e, axis=2), axis=1)
            tot = count + cnt
            delta = tmean - mean
            mean = mean + delta * (cnt / tot)
            # (delta * (delta * w): the first tile has w = 0, and delta^2 may overflow fp32 at |x| > ~1e19:
            # inf * 0 would be NaN where eager's statistics are inf and its output act(bias))
            m2 = m2 + tm2 + delta * (delta * (count * (cnt / tot)))
            count = tot
    return mean, m2


@triton.jit
def _chunk_count(kk, N, S, NPER, SPER, SCH):
    kn = kk // SCH
    ks = kk % SCH
    return tl.minimum(NPER, N - kn * NPER) * tl.minimum(SPER, S - ks * SPER)


@triton.jit
def _program_tile(N, C, S, n_cblocks, NPER, SPER, SCH, BLOCK_C: tl.constexpr):
    """This program's chunk k, its channels c (and mask), and the sample and spatial ranges of
    chunk k: programs walk the channel blocks fastest, then the chunks (SCH spatial chunks per
    sample chunk)."""
    pid = tl.program_id(0)
    k = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_lo = (k // SCH) * NPER
    s_lo = (k % SCH) * SPER
    return k, c, c < C, n_lo, tl.minimum(n_lo + NPER, N), s_lo, tl.minimum(s_lo + SPER, S)


@triton.jit
def _fwd_kernel(X, Y, W, B, RM, RV, STATS, PM, PQ,
                N, C, S, sN, sC, sS, wsN, sRM, sRV, n_cblocks, NPER, SPER, SCH, CHUNKS,
                factor, eps, slope,
                PHASE: tl.constexpr, PER_SAMPLE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                UPDATE: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    # PHASE 0: statistics + apply in one program (CHUNKS == 1); 1: partial statistics of a chunk;
    # 2: combine the partials + apply to the chunk; 3: eval (running statistics) apply.
    k, c, cmask, n_lo, n_hi, s_lo, s_hi = _program_tile(N, C, S, n_cblocks, NPER, SPER, SCH, BLOCK_C)
    first = cmask & (k == 0)
    if PHASE == 1:
        K = tl.load(X + c.to(tl.int64) * sC, mask=cmask, other=0.0).to(ACC)
        md, q = _chunk_stats(X, K, c, cmask, n_lo, n_hi, s_lo, s_hi, sN, sC, sS, BLOCK_C, BLOCK_N, BLOCK_S, ACC)
        tl.store(PM + c * CHUNKS + k, md, mask=cmask)
        tl.store(PQ + c * CHUNKS + k, q, mask=cmask)
    else:
        if PHASE == 3:
            mean = tl.load(RM + c.to(tl.int64) * sRM, mask=cmask, other=0.0).to(ACC)
            var = tl.load(RV + c.to(tl.int64) * sRV, mask=cmask, other=1.0).to(ACC)
            rstd = 1.0 / tl.sqrt(var + eps)
            tl.store(STATS + c, mean, mask=first)
            tl.store(STATS + C + c, rstd, mask=first)
            tl.store(STATS + 2 * C + c, var, mask=first)
        else:
            K = tl.load(X + c.to(tl.int64) * sC, mask=cmask, other=0.0).to(ACC)
            M = (N * S).to(ACC)
            if PHASE == 0:
                md, m2 = _chunk_stats(X, K, c, cmask, 0, N, 0, S, sN, sC, sS, BLOCK_C, BLOCK_N, BLOCK_S, ACC)
            else:
                # Combine every chunk's (mean, M2): total mean, then M2 = sum(M2_k + n_k (mean_k - mean)^2)
                msum = tl.zeros([BLOCK_C], dtype=ACC)
                for k0 in range(0, CHUNKS, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    pmask = cmask[:, None] & (kk < CHUNKS)[None, :]
                    cnt = tl.where(kk < CHUNKS, _chunk_count(kk, N, S, NPER, SPER, SCH), 0).to(ACC)
                    pm = tl.load(PM + c[:, None] * CHUNKS + kk[None, :], mask=pmask, other=0.0)
                    msum += tl.sum(pm * cnt[None, :], axis=1)
                md = msum / M
                m2 = tl.zeros([BLOCK_C], dtype=ACC)
                for k0 in range(0, CHUNKS, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    pmask = cmask[:, None] & (kk < CHUNKS)[None, :]
                    cnt = tl.where(kk < CHUNKS, _chunk_count(kk, N, S, NPER, SPER, SCH), 0).to(ACC)
                    pm = tl.load(PM + c[:, None] * CHUNKS + kk[None, :], mask=pmask, other=0.0)
                    pq = tl.load(PQ + c[:, None] * CHUNKS + kk[None, :], mask=pmask, other=0.0)
                    dev = pm - md[:, None]
                    m2 += tl.sum(tl.where(pmask, pq + cnt[None, :] * dev * dev, 0.0), axis=1)
            mean = K + md
            rstd = 1.0 / tl.sqrt(m2 / M + eps)
            tl.store(STATS + c, mean, mask=first)
            tl.store(STATS + C + c, rstd, mask=first)
            tl.store(STATS + 2 * C + c, m2 / (M - 1), mask=first)
            if UPDATE:
                rm = tl.load(RM + c.to(tl.int64) * sRM, mask=first, other=0.0).to(ACC)
                rv = tl.load(RV + c.to(tl.int64) * sRV, mask=first, other=0.0).to(ACC)
                tl.store(RM + c.to(tl.int64) * sRM, (factor * mean + (1 - factor) * rm).to(RM.dtype.element_ty),
                         mask=first)
                tl.store(RV + c.to(tl.int64) * sRV,
                         (factor * (m2 / (M - 1)) + (1 - factor) * rv).to(RV.dtype.element_ty), mask=first)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            scale, shift, mz, gw_ = _coefs(W, B, c, cmask, nn, nn < n_hi, wsN, mean, rstd, PHASE != 3, PER_SAMPLE,
                                           HAS_W, HAS_B, BLOCK_C, BLOCK_N, ACC)
            for s0 in range(s_lo, s_hi, BLOCK_S):
                offs, mask, tn_, tnm_ = _tile(c, cmask, n0, s0, n_hi, s_hi, sN, sC, sS, BLOCK_N, BLOCK_S)
                x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
                z = (x - mz[:, None, None]) * scale[:, :, None] + shift[:, :, None]
                tl.store(Y + offs, _activate(z, slope, ACT).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _grad_tile(X, G, offs, goffs, mask, mz, scale, shift, mean, rstd, slope, ACT: tl.constexpr, ACC: tl.constexpr):
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(G + goffs, mask=mask, other=0.0).to(ACC)
    if ACT:
        z = (x - mz[:, None, None]) * scale[:, :, None] + shift[:, :, None]
        g = leaky_relu_grad(g, z, slope)
    xhat = (x - mean[:, None, None]) * rstd[:, None, None]
    return tl.where(mask, g, 0.0), xhat


@triton.jit
def _bwd_kernel(X, G, DX, W, B, STATS, DW, DB, P1, P2,
                N, C, S, sN, sC, sS, gN, gC, gS, wsN, n_cblocks, NPER, SPER, SCH, CHUNKS, slope,
                PHASE: tl.constexpr, TRAINING: tl.constexpr, PER_SAMPLE: tl.constexpr, HAS_W: tl.constexpr,
                HAS_B: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    # PHASE 0: sums + dx in one program (CHUNKS == 1); 1: partial sums of a chunk;
    # 2: combine the partial sums + dx of the chunk.
    k, c, cmask, n_lo, n_hi, s_lo, s_hi = _program_tile(N, C, S, n_cblocks, NPER, SPER, SCH, BLOCK_C)
    first = cmask & (k == 0)
    mean = tl.load(STATS + c, mask=cmask, other=0.0)
    rstd = tl.load(STATS + C + c, mask=cmask, other=1.0)
    M = (N * S).to(ACC)
    a = tl.zeros([BLOCK_C], dtype=ACC)  # sum_n g_nc * Sg_nc
    b = tl.zeros([BLOCK_C], dtype=ACC)  # sum_n g_nc * Sgx_nc
    if PHASE != 2:
        tot_g = tl.zeros([BLOCK_C], dtype=ACC)
        tot_gx = tl.zeros([BLOCK_C], dtype=ACC)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            nmask = nn < n_hi
            scale, shift, mz, gw = _coefs(W, B, c, cmask, nn, nmask, wsN, mean, rstd, TRAINING, PER_SAMPLE, HAS_W,
                                          HAS_B, BLOCK_C, BLOCK_N, ACC)
            sg = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
            sgx = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
            for s0 in range(s_lo, s_hi, BLOCK_S):
                offs, mask, tn_, tnm_ = _tile(c, cmask, n0, s0, n_hi, s_hi, sN, sC, sS, BLOCK_N, BLOCK_S)
                goffs, gm_, gn_, gnm_ = _tile(c, cmask, n0, s0, n_hi, s_hi, gN, gC, gS, BLOCK_N, BLOCK_S)
                ga, xhat = _grad_tile(X, G, offs, goffs, mask, mz, scale, shift, mean, rstd, slope, ACT, ACC)
                sg += tl.sum(ga, axis=2)
                sgx += tl.sum(ga * xhat, axis=2)
            if PER_SAMPLE:
                m2d = cmask[:, None] & nmask[None, :]
                if PHASE == 0:  # one program owns every n of its channels: final per-(n, c) sums
                    po = nn.to(tl.int64)[None, :] * C + c[:, None]
                    tl.store(DB + po, sg, mask=m2d)
                    tl.store(DW + po, sgx, mask=m2d)
                    a += tl.sum(tl.where(m2d, gw * sg, 0.0), axis=1)
                    b += tl.sum(tl.where(m2d, gw * sgx, 0.0), axis=1)
                else:
                    po = c.to(tl.int64)[:, None] * N + nn[None, :]
                    tl.store(P1 + po, sg, mask=m2d)
                    tl.store(P2 + po, sgx, mask=m2d)
            else:
                tot_g += tl.sum(sg, axis=1)
                tot_gx += tl.sum(sgx, axis=1)
        if not PER_SAMPLE:
            if PHASE == 0:
                tl.store(DB + c, tot_g, mask=cmask)
                tl.store(DW + c, tot_gx, mask=cmask)
                gw0 = tl.full([BLOCK_C], 1.0, ACC)
                if HAS_W:
                    gw0 = tl.load(W + c, mask=cmask, other=1.0).to(ACC)
                a = gw0 * tot_g
                b = gw0 * tot_gx
            else:
                tl.store(P1 + c * CHUNKS + k, tot_g, mask=cmask)
                tl.store(P2 + c * CHUNKS + k, tot_gx, mask=cmask)
    else:
        # combine the partial sums of this channel block, in a fixed order
        if PER_SAMPLE:  # chunks split n only (_plan): one partial per (c, n)
            for n0 in range(0, N, BLOCK_K):
                nn = n0 + tl.arange(0, BLOCK_K)
                m2d = cmask[:, None] & (nn < N)[None, :]
                po = c.to(tl.int64)[:, None] * N + nn[None, :]
                sg = tl.load(P1 + po, mask=m2d, other=0.0)
                sgx = tl.load(P2 + po, mask=m2d, other=0.0)
                gw = tl.full([BLOCK_C, BLOCK_K], 1.0, ACC)
                if HAS_W:
                    gw = tl.load(W + nn.to(tl.int64)[None, :] * wsN + c[:, None], mask=m2d, other=1.0).to(ACC)
                a += tl.sum(gw * sg, axis=1)  # masked entries are 0
                b += tl.sum(gw * sgx, axis=1)
                if k == 0:
                    po = nn.to(tl.int64)[None, :] * C + c[:, None]
                    tl.store(DB + po, sg, mask=m2d)
                    tl.store(DW + po, sgx, mask=m2d)
        else:
            # accumulate [BLOCK_C, BLOCK_K] and reduce once after the loop: `acc += tl.sum(load)` in
            # the loop with acc used twice after it trips an assertion in Triton 3.8's
            # OptimizeThreadLocality pass (loopResult.hasOneUse) on a GPU target (aot_report)
            acc_g = tl.zeros([BLOCK_C, BLOCK_K], dtype=ACC)
            acc_gx = tl.zeros([BLOCK_C, BLOCK_K], dtype=ACC)
            for k0 in range(0, CHUNKS, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                pmask = cmask[:, None] & (kk < CHUNKS)[None, :]
                acc_g += tl.load(P1 + c[:, None] * CHUNKS + kk[None, :], mask=pmask, other=0.0)
                acc_gx += tl.load(P2 + c[:, None] * CHUNKS + kk[None, :], mask=pmask, other=0.0)
            tot_g = tl.sum(acc_g, axis=1)
            tot_gx = tl.sum(acc_gx, axis=1)
            tl.store(DB + c, tot_g, mask=first)
            tl.store(DW + c, tot_gx, mask=first)
            gw0 = tl.full([BLOCK_C], 1.0, ACC)
            if HAS_W:
                gw0 = tl.load(W + c, mask=cmask, other=1.0).to(ACC)
            a = gw0 * tot_g
            b = gw0 * tot_gx
    if PHASE != 1:
        P = rstd * (b / M)
        Q = rstd * (a / M)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            scale, shift, mz, gw_ = _coefs(W, B, c, cmask, nn, nn < n_hi, wsN, mean, rstd, TRAINING, PER_SAMPLE,
                                           HAS_W, HAS_B, BLOCK_C, BLOCK_N, ACC)
            for s0 in range(s_lo, s_hi, BLOCK_S):
                offs, mask, tn_, tnm_ = _tile(c, cmask, n0, s0, n_hi, s_hi, sN, sC, sS, BLOCK_N, BLOCK_S)
                goffs, gm_, gn_, gnm_ = _tile(c, cmask, n0, s0, n_hi, s_hi, gN, gC, gS, BLOCK_N, BLOCK_S)
                ga, xhat = _grad_tile(X, G, offs, goffs, mask, mz, scale, shift, mean, rstd, slope, ACT, ACC)
                dx = ga * scale[:, :, None]
                if TRAINING:  # (eval: no statistics term, so an inf x_hat cannot make 0 * inf = NaN)
                    dx = dx - (xhat * P[:, None, None] + Q[:, None, None])
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch helpers
COPY = "copy"  # a plan's answer for a layout the kernels do not address


def _ncs(shape, strides):
    """(sN, sC, sS) if the spatial dims flatten to one stride (dense NCHW / channels-last, (N, C),
    stride-0 grads), else None."""
    dims = [(z, st) for z, st in zip(shape[2:], strides[2:]) if z != 1]
    if not dims:
        return strides[0], strides[1], 1
    inner = expected = dims[-1][1]
    for z, st in reversed(dims):
        if st != expected:
            return None
        expected *= z
    return strides[0], strides[1], inner


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# the plans are cached on the sizes they depend on: ~25 us of Python per call otherwise, more than
# the kernels take at GAN sizes (callers only read them)
@functools.lru_cache(maxsize=1024)
def pick_config(n: int, c: int, s: int, channels_inner: bool) -> dict:
    """Tile shape: channels along the contiguous axis for channels-last, the (n, s) plane for NCHW."""
    if channels_inner:
        tile = _TILE_CL
        block_c = min(_launch.next_power_of_2(c), _MAX_BLOCK_C)
        block_s = min(_launch.next_power_of_2(max(s, 1)), max(1, tile // block_c))
    else:
        tile = _TILE
        block_c = 1
        block_s = min(_launch.next_power_of_2(max(s, 1)), tile)
    block_n = min(_launch.next_power_of_2(max(n, 1)), max(1, tile // (block_c * block_s)))
    return dict(BLOCK_C=block_c, BLOCK_N=block_n, BLOCK_S=block_s, BLOCK_K=block_k(block_c), num_warps=4)


def _plan(x: torch.Tensor, split: int | None, per_sample: bool = False):
    """(config, channel blocks, NPER, SPER, n-chunks, s-chunks). Per-sample (conditional) calls
    split along n only, so every (n, c) sum is one chunk's (the backward combine has no s loop)."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    return _plan_sizes(n, c, s, c > 1 and x.stride(1) == 1, split, per_sample, _launch.on_gpu(x))


@functools.lru_cache(maxsize=1024)
def _plan_sizes(n: int, c: int, s: int, channels_inner: bool, split: int | None, per_sample: bool, gpu: bool):
    cfg = pick_config(n, c, s, channels_inner)
    n_cblocks = _launch.cdiv(c, cfg["BLOCK_C"])
    tiles_n, tiles_s = _launch.cdiv(n, cfg["BLOCK_N"]), _launch.cdiv(s, cfg["BLOCK_S"])
    if split is None:
        target = _TARGET_PROGRAMS if gpu else _TARGET_PROGRAMS_INTERPRETED
        split = 1 if (n_cblocks >= target or tiles_n * tiles_s <= 2) else _launch.cdiv(target, n_cblocks)
    split = max(1, min(int(split), (tiles_n if per_sample else tiles_n * tiles_s), _MAX_CHUNKS))
    nch = min(tiles_n, split)
    sch = 1 if per_sample else min(tiles_s, _launch.cdiv(split, nch))
    nper = _launch.cdiv(tiles_n, nch) * cfg["BLOCK_N"]
    sper = _launch.cdiv(tiles_s, sch) * cfg["BLOCK_S"]
    return cfg, n_cblocks, nper, sper, _launch.cdiv(n, nper), _launch.cdiv(s, sper)


# A launch plan per call signature: every Python value a launch needs that depends only on a few
# ints (sizes, strides, dtype, flags, which optional tensors are given): the grid (checked against
# CUDA's limits), the integer arguments, the constexpr keywords per phase, the partials' size.
# Rebuilding them cost more host time per call than the rest of the launcher; the plan is a tuple
# the launcher unpacks, and a cached plan must never be mutated.
def _plan_shape(shape, strides, flags: int, gpu: bool, split):
    """What both plans derive from the sizes: (n, c, s, per_sample, cfg, channel blocks, the
    programs' split over N and S, S-chunks, chunks); None for an empty x."""
    n, c = shape[0], shape[1]
    numel = 1
    for z in shape:
        numel *= z
    if numel == 0:
        return None
    s = numel // (n * c)
    per_sample = bool(flags & 4)
    cfg, n_cblocks, nper, sper, nch, sch = _plan_sizes(n, c, s, c > 1 and strides[1] == 1, split, per_sample, gpu)
    return n, c, s, per_sample, cfg, n_cblocks, nper, sper, sch, nch * sch


@functools.lru_cache(maxsize=1024)
def _fwd_plan(shape, strides, dtype, flags: int, has_w: bool, has_b: bool, has_rm: bool, update: bool,
              gpu: bool, split):
    """(grid, int args before the running statistics' strides, int args after, kwargs per phase,
    partials' shape or None, stats' shape, accumulation dtype); None for an empty x, COPY for a
    layout the kernels do not address."""
    if 0 in shape:  # before the layout: an empty x's strides need not flatten, even contiguous
        return None
    ncs = _ncs(shape, strides)
    if ncs is None:
        return COPY
    sizes = _plan_shape(shape, strides, flags, gpu, split)
    n, c, s, per_sample, cfg, n_cblocks, nper, sper, sch, chunks = sizes
    training = bool(flags & 1)
    common = dict(PER_SAMPLE=per_sample, HAS_W=has_w, HAS_B=has_b, UPDATE=training and update and has_rm,
                  ACT=bool(flags & 2), BLOCK_C=cfg["BLOCK_C"], BLOCK_N=cfg["BLOCK_N"], BLOCK_S=cfg["BLOCK_S"],
                  BLOCK_K=cfg["BLOCK_K"], ACC=_acc(dtype), num_warps=cfg["num_warps"])
    phases = (3,) if not training else ((0,) if chunks == 1 else (1, 2))
    kwargs = tuple(dict(common, PHASE=ph) for ph in phases)
    head = (n, c, s, *ncs, c if per_sample else 0)
    tail = (n_cblocks, nper, sper, sch, chunks)
    grid = _launch.grid("batch_norm_act fwd", n_cblocks * chunks)
    acc_t = torch.float64 if dtype == torch.float64 else torch.float32
    return grid, head, tail, kwargs, ((c, chunks) if len(phases) == 2 else None), (3, c), acc_t


@functools.lru_cache(maxsize=1024)
def _bwd_plan(shape, strides, gstrides, dtype, flags: int, has_w: bool, has_b: bool, gpu: bool, split):
    """(grid, int args, kwargs per phase, partials' size or 0, the parameter gradients' shape);
    None for an empty x, COPY when x or grad_y has a layout the kernels do not address."""
    if 0 in shape:  # before the layouts (see _fwd_plan)
        return None
    ncs, gncs = _ncs(shape, strides), _ncs(shape, gstrides)
    if ncs is None or gncs is None:
        return COPY
    sizes = _plan_shape(shape, strides, flags, gpu, split)
    n, c, s, per_sample, cfg, n_cblocks, nper, sper, sch, chunks = sizes
    common = dict(TRAINING=bool(flags & 1), PER_SAMPLE=per_sample, HAS_W=has_w, HAS_B=has_b, ACT=bool(flags & 2),
                  BLOCK_C=cfg["BLOCK_C"], BLOCK_N=cfg["BLOCK_N"], BLOCK_S=cfg["BLOCK_S"], BLOCK_K=cfg["BLOCK_K"],
                  ACC=_acc(dtype), num_warps=cfg["num_warps"])
    phases = (0,) if chunks == 1 else (1, 2)
    kwargs = tuple(dict(common, PHASE=ph) for ph in phases)
    args = (n, c, s, *ncs, *gncs, c if per_sample else 0, n_cblocks, nper, sper,
            sch, chunks)
    grid = _launch.grid("batch_norm_act bwd", n_cblocks * chunks)
    return (grid, args, kwargs, (0 if chunks == 1 else (c * n if per_sample else c * chunks)),
            ((n, c) if per_sample else (c,)))


def _sample_params(w, b, n: int, c: int):
    """(gain, bias, row stride wsN) for the per-sample kernels, which read ``W + c + n * wsN``
    for both: channels unit-strided and one row stride shared by gain and bias. BigGAN's
    ``gain, bias = emb.chunk(2, 1)`` (rows 2C apart) and stride-0 rows (expand) are read in
    place; anything else (strided channels, different row strides) is copied to (N, C) dense."""
    rs = None
    for t in (w, b):
        if t is None:
            continue
        st = t.stride()
        if c > 1 and st[1] != 1:
            break
        r = st[0] if n > 1 else c  # (one row: its stride is never used)
        if rs is None:
            rs = r
        elif r != rs:
            break
    else:
        return w, b, (c if rs is None else rs)
    return (None if w is None else w.contiguous()), (None if b is None else b.contiguous()), c


def forward(x, weight, bias, running_mean, running_var, factor: float, eps: float, slope: float, flags: int,
            update_running: bool = True, split: int | None = None):
    """Returns (y, stats). Training: batch statistics, and the running statistics updated in the
    kernel when given and ``update_running``; eval: normalise with the running statistics."""
    plan = _fwd_plan(x.shape, x.stride(), x.dtype, flags, weight is not None, bias is not None,
                     running_mean is not None, update_running, _launch.on_gpu(x), split)
    if plan is COPY:
        x = x.contiguous()
        plan = _fwd_plan(x.shape, x.stride(), x.dtype, flags, weight is not None, bias is not None,
                         running_mean is not None, update_running, _launch.on_gpu(x), split)
    y = torch.empty_like(x)
    if plan is None:  # empty x
        acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
        stats = x.new_empty((3, x.shape[1]), dtype=acc_t)
        if flags & 1:
            stats.fill_(float("nan"))
        else:
            stats.copy_(torch.stack([running_mean.to(acc_t), torch.rsqrt(running_var.to(acc_t) + eps),
                                     running_var.to(acc_t)]))
        return y, stats
    grid, head, tail, kwargs, partial, stats_shape, acc_t = plan
    if flags & 4:
        weight, bias, wsn = _sample_params(weight, bias, head[0], head[1])
        if wsn != head[6]:
            head = (*head[:6], wsn)
    else:
        # the kernels read W + c: a strided or expanded (C) view (w[::2], w[:1].expand(C)) is copied;
        # contiguous() returns a dense one itself (cheaper than testing its stride first)
        weight = None if weight is None else weight.contiguous()
        bias = None if bias is None else bias.contiguous()
    stats = x.new_empty(stats_shape, dtype=acc_t)
    wt = weight if weight is not None else stats
    bt = bias if bias is not None else stats
    if running_mean is not None:
        rm, rv = running_mean, running_var
        args = (*head, rm.stride(0), rv.stride(0), *tail, float(factor), float(eps), float(slope))
    else:
        rm = rv = stats
        args = (*head, 0, 0, *tail, float(factor), float(eps), float(slope))
    with _launch.device_guard(x):
        if partial is None:
            _fwd_kernel[grid](x, y, wt, bt, rm, rv, stats, stats, stats, *args, **kwargs[0])
        else:
            pm = stats.new_empty(partial)
            pq = stats.new_empty(partial)
            _fwd_kernel[grid](x, y, wt, bt, rm, rv, stats, pm, pq, *args, **kwargs[0])
            _fwd_kernel[grid](x, y, wt, bt, rm, rv, stats, pm, pq, *args, **kwargs[1])
    return y, stats


def backward(grad_y, x, weight, bias, stats, slope: float, flags: int, split: int | None = None):
    """Returns (grad_x, grad_weight or grad_gain, grad_bias) in the accumulation dtype; the
    parameter gradients are (C) or, per sample, (N, C)."""
    plan = _bwd_plan(x.shape, x.stride(), grad_y.stride(), x.dtype, flags, weight is not None, bias is not None,
                     _launch.on_gpu(x), split)
    if plan is COPY:
        if _ncs(x.shape, x.stride()) is None:
            x = x.contiguous()
        if _ncs(grad_y.shape, grad_y.stride()) is None:
            grad_y = grad_y.contiguous()
        plan = _bwd_plan(x.shape, x.stride(), grad_y.stride(), x.dtype, flags, weight is not None,
                         bias is not None, _launch.on_gpu(x), split)
    dx = torch.empty_like(x)
    if plan is None:  # empty x
        shape = (x.shape[0], x.shape[1]) if flags & 4 else (x.shape[1],)
        return dx, stats.new_zeros(shape), stats.new_zeros(shape)
    grid, args, kwargs, psize, shape = plan
    if flags & 4:
        weight, bias, wsn = _sample_params(weight, bias, args[0], args[1])
        if wsn != args[9]:
            args = (*args[:9], wsn, *args[10:])
    else:
        # the kernels read W + c: a strided or expanded (C) view (w[::2], w[:1].expand(C)) is copied;
        # contiguous() returns a dense one itself (cheaper than testing its stride first)
        weight = None if weight is None else weight.contiguous()
        bias = None if bias is None else bias.contiguous()
    dw = stats.new_empty(shape)
    db = stats.new_empty(shape)
    wt = weight if weight is not None else stats
    bt = bias if bias is not None else stats
    args = (*args, float(slope))
    with _launch.device_guard(x):
        if not psize:
            _bwd_kernel[grid](x, grad_y, dx, wt, bt, stats, dw, db, stats, stats, *args, **kwargs[0])
            return dx, dw, db
        p1 = stats.new_empty(psize)
        p2 = stats.new_empty(psize)
        _bwd_kernel[grid](x, grad_y, dx, wt, bt, stats, dw, db, p1, p2, *args, **kwargs[0])
        _bwd_kernel[grid](x, grad_y, dx, wt, bt, stats, dw, db, p1, p2, *args, **kwargs[1])
    return dx, dw, db


# ----------------------------------------------------------------------------- AOT cases
# model shapes as the nn layers call the launchers: pix2pix U-Net / PatchGAN at 256x256 batch 1
# (1x64x128x128 splits the plane; 1x512x2x2 next to the bottleneck), DCGAN batch 64 (64x512x4x4,
# 64x128x16x16), StarGAN-like batch 16 channels-last (16x128x32x32), BatchNorm1d (256, 1024),
# BigGAN's conditional (per-sample gain/bias) 8x256x32x32, an odd shape (unaligned tails)
AOT_SHAPES = [((1, 64, 128, 128), False), ((1, 512, 2, 2), False), ((64, 512, 4, 4), False),
              ((64, 128, 16, 16), False), ((16, 128, 32, 32), False), ((256, 1024), False),
              ((8, 256, 32, 32), True), ((3, 5, 45, 51), False)]


def aot_cases():
    """(label, thunk) pairs: each thunk runs the launchers on meta tensors of one model shape
    (training forward + backward, and the eval forward); the AOT report records and compiles."""
    for dtype in (torch.float32, torch.bfloat16):  # fp16 compiles like bf16
        for shape, per_sample in AOT_SHAPES:
            fmts = (torch.contiguous_format, torch.channels_last) if len(shape) == 4 else (torch.contiguous_format,)
            for fmt in fmts:
                def run(shape=shape, per_sample=per_sample, dtype=dtype, fmt=fmt):
                    x = torch.empty(shape, device="meta", dtype=dtype, memory_format=fmt)
                    n, c = shape[0], shape[1]
                    w = torch.empty((n, c) if per_sample else (c,), device="meta", dtype=torch.float32)
                    rm = torch.empty(c, device="meta", dtype=torch.float32)
                    flags = 1 | 2 | (4 if per_sample else 0)
                    y, stats = forward(x, w, w, rm, rm, 0.1, 1e-5, 0.2, flags)
                    backward(torch.empty_like(y), x, w, w, stats, 0.2, flags)
                    forward(x, w, w, rm, rm, 0.1, 1e-5, 0.2, flags & ~1)  # eval
                layout = "NHWC" if fmt is torch.channels_last else ("NC" if len(shape) == 2 else "NCHW")
                tag = " per-sample" if per_sample else ""
                yield f"{str(dtype)[6:]} {layout} {'x'.join(map(str, shape))}{tag}", run
