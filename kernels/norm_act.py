"""Triton kernels for fused instance norm + activation (forward and backward).

Memory is addressed as (n, c, hw) with strides (sN, sC, sHW), which covers NCHW-dense
(sHW = 1) and NHWC-dense (sC = 1, sHW = C) tensors without copies. A program owns BLOCK_C
channels of one instance and walks the plane in [BLOCK_C, BLOCK_HW] tiles:

* fused kernels (one program per (n, channel block)): when the plane fits in one tile it is
  read once and kept in registers (read 1x, write 1x); otherwise statistics are merged tile by
  tile (Chan's parallel formula on exact per-tile mean/M2: numerically stable, no
  E[x^2]-E[x]^2) and the plane is read a second time to apply.
* split kernels (grid (n * channel blocks, SPLIT)): when there are too few planes to fill the
  GPU (batch 1, 64 channels), each plane is cut into SPLIT chunks; partial statistics are
  combined per plane in a fixed order (deterministic), then the apply kernel runs on the chunks.

Activation: z = x_hat * w + b, y = z > 0 ? z : slope * z (relu: slope 0), or y = z.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Above this many programs the fused per-plane kernel fills the GPU; below it, split planes.
_TARGET_PROGRAMS = 256
# Largest plane tile kept in registers (8 warps x 32 lanes x 8 values): larger spills.
_MAX_PLANE_TILE = 2048


@triton.jit
def _plane_stats(X, base, hw0, HW, sHW, cmask, BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
    """Exact mean and M2 of one [BLOCK_C, BLOCK_HW] tile (count = valid hw in the tile)."""
    hw = hw0 + tl.arange(0, BLOCK_HW)
    mask = cmask[:, None] & (hw < HW)[None, :]
    x = tl.load(X + base[:, None] + hw[None, :].to(tl.int64) * sHW, mask=mask, other=0.0).to(ACC)
    cnt = tl.minimum(HW - hw0, BLOCK_HW).to(ACC)
    tmean = tl.sum(x, axis=1) / cnt
    d = tl.where(mask, x - tmean[:, None], 0.0)
    return x, mask, tmean, tl.sum(d * d, axis=1), cnt


@triton.jit
def _activate(z, slope, ACT: tl.constexpr):
    if ACT:
        z = tl.where(z > 0, z, z * slope)
    return z


@triton.jit
def _fwd_fused_kernel(X, Y, W, B, MEAN, RSTD, C, HW, sN, sC, sHW, n_cblocks, eps, slope,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, SINGLE: tl.constexpr,
                      ACC: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = n.to(tl.int64) * sN + c.to(tl.int64) * sC
    if SINGLE:
        x, mask, mean, m2, cnt = _plane_stats(X, base, 0, HW, sHW, cmask, BLOCK_HW, ACC)
    else:
        mean = tl.zeros([BLOCK_C], dtype=ACC)
        m2 = tl.zeros([BLOCK_C], dtype=ACC)
        count = tl.zeros([1], dtype=ACC)
        for hw0 in range(0, HW, BLOCK_HW):
            _, _, tmean, tm2, cnt = _plane_stats(X, base, hw0, HW, sHW, cmask, BLOCK_HW, ACC)
            tot = count + cnt
            delta = tmean - mean
            mean = mean + delta * (cnt / tot)
            m2 = m2 + tm2 + delta * delta * (count * cnt / tot)
            count = tot
    rstd = 1.0 / tl.sqrt(m2 / HW + eps)
    tl.store(MEAN + n * C + c, mean, mask=cmask)
    tl.store(RSTD + n * C + c, rstd, mask=cmask)
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(W + c, mask=cmask, other=1.0).to(ACC)
    shift = mean * 0  # centred form (x - mean) * scale + b keeps precision for large means
    if HAS_B:
        shift = tl.load(B + c, mask=cmask, other=0.0).to(ACC)
    if SINGLE:
        hw = tl.arange(0, BLOCK_HW)
        y = _activate((x - mean[:, None]) * scale[:, None] + shift[:, None], slope, ACT)
        tl.store(Y + base[:, None] + hw[None, :].to(tl.int64) * sHW, y.to(Y.dtype.element_ty), mask=mask)
    else:
        for hw0 in range(0, HW, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            mask = cmask[:, None] & (hw < HW)[None, :]
            offs = base[:, None] + hw[None, :].to(tl.int64) * sHW
            x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
            y = _activate((x - mean[:, None]) * scale[:, None] + shift[:, None], slope, ACT)
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_partial_kernel(X, PMEAN, PM2, C, HW, sN, sC, sHW, n_cblocks, CHUNK, SPLIT,
                        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    n = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = n.to(tl.int64) * sN + c.to(tl.int64) * sC
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    count = tl.zeros([1], dtype=ACC)
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    for hw0 in range(start, end, BLOCK_HW):
        _, _, tmean, tm2, cnt = _plane_stats(X, base, hw0, end, sHW, cmask, BLOCK_HW, ACC)
        tot = count + cnt
        delta = tmean - mean
        mean = mean + delta * (cnt / tot)
        m2 = m2 + tm2 + delta * delta * (count * cnt / tot)
        count = tot
    out = (n * C + c) * SPLIT + s
    tl.store(PMEAN + out, mean, mask=cmask)
    tl.store(PM2 + out, m2, mask=cmask)


@triton.jit
def _fwd_apply_kernel(X, Y, W, B, MEAN, RSTD, C, HW, sN, sC, sHW, n_cblocks, CHUNK, slope,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    n = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = n.to(tl.int64) * sN + c.to(tl.int64) * sC
    mean = tl.load(MEAN + n * C + c, mask=cmask, other=0.0)
    scale = tl.load(RSTD + n * C + c, mask=cmask, other=1.0)
    if HAS_W:
        scale = scale * tl.load(W + c, mask=cmask, other=1.0).to(ACC)
    shift = mean * 0  # centred form (x - mean) * scale + b keeps precision for large means
    if HAS_B:
        shift = tl.load(B + c, mask=cmask, other=0.0).to(ACC)
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    for hw0 in range(start, end, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = cmask[:, None] & (hw < end)[None, :]
        offs = base[:, None] + hw[None, :].to(tl.int64) * sHW
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        y = _activate((x - mean[:, None]) * scale[:, None] + shift[:, None], slope, ACT)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(X, G, base, gbase, hw0, end, sHW, gHW, cmask, mean, rstd, w, b, slope,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
              BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
    """x_hat and the activation-masked upstream gradient ga for one tile."""
    hw = hw0 + tl.arange(0, BLOCK_HW)
    mask = cmask[:, None] & (hw < end)[None, :]
    hw64 = hw[None, :].to(tl.int64)
    x = tl.load(X + base[:, None] + hw64 * sHW, mask=mask, other=0.0).to(ACC)
    g = tl.load(G + gbase[:, None] + hw64 * gHW, mask=mask, other=0.0).to(ACC)
    xhat = (x - mean[:, None]) * rstd[:, None]
    if ACT:
        z = xhat
        if HAS_W:
            z = z * w[:, None]
        if HAS_B:
            z = z + b[:, None]
        g = tl.where(z > 0, g, g * slope)
    return xhat, g, mask, hw64


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


@triton.jit
def _bwd_fused_kernel(X, G, DX, W, B, MEAN, RSTD, DW, DB, C, HW, sN, sC, sHW, gN, gC, gHW,
                      n_cblocks, slope,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, SINGLE: tl.constexpr,
                      ACC: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = n.to(tl.int64) * sN + c.to(tl.int64) * sC
    gbase = n.to(tl.int64) * gN + c.to(tl.int64) * gC
    mean, rstd, w, b = _bwd_load_params(W, B, MEAN, RSTD, n, c, C, cmask, HAS_W, HAS_B, ACC)
    if SINGLE:
        xhat, ga, mask, hw64 = _bwd_tile(X, G, base, gbase, 0, HW, sHW, gHW, cmask, mean, rstd, w, b,
                                         slope, HAS_W, HAS_B, ACT, BLOCK_HW, ACC)
        sum_g = tl.sum(ga, axis=1)
        sum_gx = tl.sum(ga * xhat, axis=1)
    else:
        sum_g = tl.zeros([BLOCK_C], dtype=ACC)
        sum_gx = tl.zeros([BLOCK_C], dtype=ACC)
        for hw0 in range(0, HW, BLOCK_HW):
            xh, g, _, _ = _bwd_tile(X, G, base, gbase, hw0, HW, sHW, gHW, cmask, mean, rstd, w, b,
                                    slope, HAS_W, HAS_B, ACT, BLOCK_HW, ACC)
            sum_g += tl.sum(g, axis=1)
            sum_gx += tl.sum(g * xh, axis=1)
    tl.store(DB + n * C + c, sum_g, mask=cmask)
    tl.store(DW + n * C + c, sum_gx, mask=cmask)
    k = rstd * w
    mg = sum_g / HW
    mgx = sum_gx / HW
    if SINGLE:
        dx = k[:, None] * (ga - mg[:, None] - xhat * mgx[:, None])
        tl.store(DX + base[:, None] + hw64 * sHW, dx.to(DX.dtype.element_ty), mask=mask)
    else:
        for hw0 in range(0, HW, BLOCK_HW):
            xh, g, mask, hw64 = _bwd_tile(X, G, base, gbase, hw0, HW, sHW, gHW, cmask, mean, rstd, w, b,
                                          slope, HAS_W, HAS_B, ACT, BLOCK_HW, ACC)
            dx = k[:, None] * (g - mg[:, None] - xh * mgx[:, None])
            tl.store(DX + base[:, None] + hw64 * sHW, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_partial_kernel(X, G, W, B, MEAN, RSTD, PG, PGX, C, HW, sN, sC, sHW, gN, gC, gHW,
                        n_cblocks, CHUNK, SPLIT, slope,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    n = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = n.to(tl.int64) * sN + c.to(tl.int64) * sC
    gbase = n.to(tl.int64) * gN + c.to(tl.int64) * gC
    mean, rstd, w, b = _bwd_load_params(W, B, MEAN, RSTD, n, c, C, cmask, HAS_W, HAS_B, ACC)
    sum_g = tl.zeros([BLOCK_C], dtype=ACC)
    sum_gx = tl.zeros([BLOCK_C], dtype=ACC)
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    for hw0 in range(start, end, BLOCK_HW):
        xh, g, _, _ = _bwd_tile(X, G, base, gbase, hw0, end, sHW, gHW, cmask, mean, rstd, w, b,
                                slope, HAS_W, HAS_B, ACT, BLOCK_HW, ACC)
        sum_g += tl.sum(g, axis=1)
        sum_gx += tl.sum(g * xh, axis=1)
    out = (n * C + c) * SPLIT + s
    tl.store(PG + out, sum_g, mask=cmask)
    tl.store(PGX + out, sum_gx, mask=cmask)


@triton.jit
def _bwd_apply_kernel(X, G, DX, W, B, MEAN, RSTD, SG, SGX, C, HW, sN, sC, sHW, gN, gC, gHW,
                      n_cblocks, CHUNK, slope,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    n = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = n.to(tl.int64) * sN + c.to(tl.int64) * sC
    gbase = n.to(tl.int64) * gN + c.to(tl.int64) * gC
    mean, rstd, w, b = _bwd_load_params(W, B, MEAN, RSTD, n, c, C, cmask, HAS_W, HAS_B, ACC)
    k = rstd * w
    mg = tl.load(SG + n * C + c, mask=cmask, other=0.0) / HW
    mgx = tl.load(SGX + n * C + c, mask=cmask, other=0.0) / HW
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    for hw0 in range(start, end, BLOCK_HW):
        xh, g, mask, hw64 = _bwd_tile(X, G, base, gbase, hw0, end, sHW, gHW, cmask, mean, rstd, w, b,
                                      slope, HAS_W, HAS_B, ACT, BLOCK_HW, ACC)
        dx = k[:, None] * (g - mg[:, None] - xh * mgx[:, None])
        tl.store(DX + base[:, None] + hw64 * sHW, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch helpers
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


def pick_config(x: torch.Tensor) -> dict:
    """Tile shape: channels along the contiguous axis for NHWC, the plane for NCHW."""
    n, c, h, w = x.shape
    hw = h * w
    channels_last = x.stride(1) == 1 and c > 1
    if channels_last:
        block_c = min(triton.next_power_of_2(c), 32)
        block_hw = 32 if block_c >= 32 else 64
    else:
        block_c = 1
        block_hw = min(max(triton.next_power_of_2(hw), 16), _MAX_PLANE_TILE)
    num_warps = 8 if block_c * block_hw >= 2048 else 4
    return dict(BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps)


def _plan(x: torch.Tensor, split: int | None):
    n, c, h, w = x.shape
    hw = h * w
    cfg = pick_config(x)
    n_cblocks = triton.cdiv(c, cfg["BLOCK_C"])
    programs = n * n_cblocks
    tiles = triton.cdiv(hw, cfg["BLOCK_HW"])
    if split is None:
        split = 1 if (programs >= _TARGET_PROGRAMS or tiles <= 1) else min(tiles, triton.cdiv(_TARGET_PROGRAMS, programs))
    split = max(1, min(int(split), tiles))
    chunk = triton.cdiv(tiles, split) * cfg["BLOCK_HW"]
    split = triton.cdiv(hw, chunk)
    return cfg, n_cblocks, split, chunk


def forward(x, weight, bias, eps: float, apply_act: bool, slope: float, split: int | None = None):
    """Returns (y, mean, rstd). ``split`` forces the split-plane scheme (tests); None = auto."""
    strides = _flat_strides(x)
    if strides is None:
        x = x.contiguous()
        strides = _flat_strides(x)
    n, c, h, w = x.shape
    hw = h * w
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty_like(x)
    mean = torch.empty((n, c), device=x.device, dtype=acc_t)
    rstd = torch.empty((n, c), device=x.device, dtype=acc_t)
    cfg, n_cblocks, nsplit, chunk = _plan(x, split)
    wt = weight if weight is not None else mean  # dummy pointer, never read
    bt = bias if bias is not None else mean
    common = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=apply_act,
                  BLOCK_C=cfg["BLOCK_C"], BLOCK_HW=cfg["BLOCK_HW"], ACC=_acc(x.dtype),
                  num_warps=cfg["num_warps"])
    if nsplit == 1:
        _fwd_fused_kernel[(n * n_cblocks,)](x, y, wt, bt, mean, rstd, c, hw, *strides, n_cblocks, eps, slope,
                                            SINGLE=hw <= cfg["BLOCK_HW"], **common)
        return y, mean, rstd
    pmean = torch.empty((n * c, nsplit), device=x.device, dtype=acc_t)
    pm2 = torch.empty_like(pmean)
    _fwd_partial_kernel[(n * n_cblocks, nsplit)](x, pmean, pm2, c, hw, *strides, n_cblocks, chunk, nsplit,
                                                 BLOCK_C=cfg["BLOCK_C"], BLOCK_HW=cfg["BLOCK_HW"],
                                                 ACC=_acc(x.dtype), num_warps=cfg["num_warps"])
    # Chan's combination of the chunk statistics, in a fixed order
    counts = torch.clamp(hw - torch.arange(nsplit, device=x.device, dtype=acc_t) * chunk, 0, chunk)
    m = (pmean * counts).sum(1) / hw
    m2 = (pm2 + counts * (pmean - m[:, None]) ** 2).sum(1)
    mean.copy_(m.view(n, c))
    rstd.copy_(torch.rsqrt(m2 / hw + eps).view(n, c))
    _fwd_apply_kernel[(n * n_cblocks, nsplit)](x, y, wt, bt, mean, rstd, c, hw, *strides, n_cblocks, chunk,
                                               slope, **common)
    return y, mean, rstd


def backward(grad_y, x, weight, bias, mean, rstd, apply_act: bool, slope: float, split: int | None = None):
    """Returns (grad_x, grad_weight per instance (N, C), grad_bias per instance (N, C))."""
    strides = _flat_strides(x)
    if strides is None:
        x = x.contiguous()
        strides = _flat_strides(x)
    gstrides = _flat_strides(grad_y)
    if gstrides is None:
        grad_y = grad_y.contiguous()
        gstrides = _flat_strides(grad_y)
    n, c, h, w = x.shape
    hw = h * w
    dx = torch.empty_like(x)
    dw = torch.empty_like(mean)
    db = torch.empty_like(mean)
    cfg, n_cblocks, nsplit, chunk = _plan(x, split)
    wt = weight if weight is not None else mean
    bt = bias if bias is not None else mean
    common = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=apply_act,
                  BLOCK_C=cfg["BLOCK_C"], BLOCK_HW=cfg["BLOCK_HW"], ACC=_acc(x.dtype),
                  num_warps=cfg["num_warps"])
    if nsplit == 1:
        _bwd_fused_kernel[(n * n_cblocks,)](x, grad_y, dx, wt, bt, mean, rstd, dw, db, c, hw, *strides,
                                            *gstrides, n_cblocks, slope, SINGLE=hw <= cfg["BLOCK_HW"], **common)
        return dx, dw, db
    pg = torch.empty((n * c, nsplit), device=x.device, dtype=mean.dtype)
    pgx = torch.empty_like(pg)
    _bwd_partial_kernel[(n * n_cblocks, nsplit)](x, grad_y, wt, bt, mean, rstd, pg, pgx, c, hw, *strides,
                                                 *gstrides, n_cblocks, chunk, nsplit, slope, **common)
    db.copy_(pg.sum(1).view(n, c))
    dw.copy_(pgx.sum(1).view(n, c))
    _bwd_apply_kernel[(n * n_cblocks, nsplit)](x, grad_y, dx, wt, bt, mean, rstd, db, dw, c, hw, *strides,
                                               *gstrides, n_cblocks, chunk, slope, **common)
    return dx, dw, db


# ----------------------------------------------------------------------------- AOT specs
def _aot_specs():
    specs = []
    for dt, ty in (("fp32", "*fp32"), ("bf16", "*bf16"), ("fp16", "*fp16")):
        for block_c, block_hw, warps, single, layout in ((1, 2048, 8, True, "NCHW"), (1, 2048, 8, False, "NCHW"),
                                                        (32, 32, 4, False, "NHWC")):
            cfg = f"{dt},{layout},BLOCK_C={block_c},BLOCK_HW={block_hw},SINGLE={single},warps={warps}"
            const = dict(HAS_W=True, HAS_B=True, ACT=True, BLOCK_C=block_c, BLOCK_HW=block_hw, ACC=tl.float32)
            fsig = {"X": ty, "Y": ty, "W": "*fp32", "B": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32", "C": "i32",
                    "HW": "i32", "sN": "i64", "sC": "i32", "sHW": "i32", "n_cblocks": "i32", "eps": "fp32",
                    "slope": "fp32"}
            specs.append(dict(kernel=_fwd_fused_kernel, config=cfg, signature=fsig,
                              constexprs={**const, "SINGLE": single}, num_warps=warps))
            bsig = {"X": ty, "G": ty, "DX": ty, "W": "*fp32", "B": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32",
                    "DW": "*fp32", "DB": "*fp32", "C": "i32", "HW": "i32", "sN": "i64", "sC": "i32", "sHW": "i32",
                    "gN": "i64", "gC": "i32", "gHW": "i32", "n_cblocks": "i32", "slope": "fp32"}
            specs.append(dict(kernel=_bwd_fused_kernel, config=cfg, signature=bsig,
                              constexprs={**const, "SINGLE": single}, num_warps=warps))
        cfg = f"{dt},NCHW,BLOCK_C=1,BLOCK_HW=2048,split,warps=8"
        const = dict(BLOCK_C=1, BLOCK_HW=2048, ACC=tl.float32)
        specs.append(dict(kernel=_fwd_partial_kernel, config=cfg, constexprs=const, num_warps=8, signature={
            "X": ty, "PMEAN": "*fp32", "PM2": "*fp32", "C": "i32", "HW": "i32", "sN": "i64", "sC": "i32",
            "sHW": "i32", "n_cblocks": "i32", "CHUNK": "i32", "SPLIT": "i32"}))
        act = dict(HAS_W=True, HAS_B=True, ACT=True, **const)
        specs.append(dict(kernel=_fwd_apply_kernel, config=cfg, constexprs=act, num_warps=8, signature={
            "X": ty, "Y": ty, "W": "*fp32", "B": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32", "C": "i32",
            "HW": "i32", "sN": "i64", "sC": "i32", "sHW": "i32", "n_cblocks": "i32", "CHUNK": "i32",
            "slope": "fp32"}))
        specs.append(dict(kernel=_bwd_partial_kernel, config=cfg, constexprs=act, num_warps=8, signature={
            "X": ty, "G": ty, "W": "*fp32", "B": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32", "PG": "*fp32",
            "PGX": "*fp32", "C": "i32", "HW": "i32", "sN": "i64", "sC": "i32", "sHW": "i32", "gN": "i64",
            "gC": "i32", "gHW": "i32", "n_cblocks": "i32", "CHUNK": "i32", "SPLIT": "i32", "slope": "fp32"}))
        specs.append(dict(kernel=_bwd_apply_kernel, config=cfg, constexprs=act, num_warps=8, signature={
            "X": ty, "G": ty, "DX": ty, "W": "*fp32", "B": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32",
            "SG": "*fp32", "SGX": "*fp32", "C": "i32", "HW": "i32", "sN": "i64", "sC": "i32", "sHW": "i32",
            "gN": "i64", "gC": "i32", "gHW": "i32", "n_cblocks": "i32", "CHUNK": "i32", "slope": "fp32"}))
    return specs


AOT_SPECS = _aot_specs()
