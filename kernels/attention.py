"""Triton kernels for the SAGAN attention core (flash-style, unequal head dims).

Shapes (channel-major, any strides, so NCHW and channels_last inputs need no transposing copy):
q (B, DQK, N), k (B, DQK, M), v (B, DV, M), x / out / o (B, DV, N), lse / delta (B, N).
Every grid puts (tile, batch) on axis 0 and the DV chunk on axis 1 (CUDA caps axes 1 and 2
at 65535; DV chunks are at most 16).

Forward: one program per (query tile, DV chunk); online softmax over key tiles with fp32
accumulation; epilogue writes o and out = gamma * o + x. DV (= C, up to 1024) is split into
chunks of BLOCK_DV so the accumulator fits in registers; each chunk recomputes the cheap
q^T k scores (DQK = C/8). Head dims are padded to powers of two (>= 16 for tl.dot) by masks.
Scores stay in natural units until the max is subtracted (s - m is exact where it matters;
scaling s by log2(e) first would add an error of u * |s| to every exponent).

Backward (delta = gamma * rowsum(grad * o); dO = gamma * grad formed on the fly):
  _bwd_dq:   per query tile: pass 1 recomputes the row statistics (max m, sum l) from the same
             score bits the backward uses (the forward's lse, rounded to fp32, cannot give back
             P exactly once |s| is large: at |s| = 1e8 its rounding is 8 units of exponent);
             writes them for _bwd_dkdv; then rowsum(grad * o) over DV (written out: _bwd_dkdv
             reads it, and dgamma is its sum); pass 2: dq = sum_j dS k.
  _bwd_dkdv: per (key tile, DV chunk): dv = gamma * sum_i P^T grad for the chunk; the chunk-0
             program also forms dS = P * (dO v^T - delta) and dk = sum_i dS^T q (P computed once
             for both). Chunk-0 programs come first in the grid, so the heavy ones start first.
  Every kernel computes the scores as dot(q tile, k^T tile) and dO v^T as dot(grad tile, v^T
  tile) with one block shape, so the bits agree across kernels. Where a row's softmax is
  saturated (P exactly one-hot: l == 1 and s == m), dS = 0 exactly, as eager's
  p * (dp - sum(p * dp)) gives there; o-based delta would leave u * |dO v| of noise, which
  the large |k|, |q| of such rows multiply into wrong gradients.
Deterministic: no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, _launch.next_power_of_2(int(n)))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: tf32x3 (three tensor-core passes, about fp32 accuracy, like torch's fp32 bmm
    # without TF32); fp16/bf16: one MMA with fp32 accumulation. The interpreter computes in fp32.
    if IEEE:
        return tl.dot(a, b, input_precision="tf32x3")
    return tl.dot(a, b)


@triton.jit
def _exp_rel(s, m):
    """exp(s - m) with exp(0) = 1 exactly (a saturated row sums to exactly 1)."""
    return tl.where(s == m, 1.0, tl.exp2((s - m) * LOG2E))


@triton.jit
def _attn_fwd(Q, K, V, X, OUT, O, LSE, GAMMA,
              sqb, sqc, sqn, skb, skc, skn, svb, svc, svn, sxb, sxc, sxn, sob, soc, son,
              N, M, DQK, DV, n_tiles,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
              BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0) % n_tiles
    b = (tl.program_id(0) // n_tiles).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_DQK)
    offs_d = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_ok = offs_m < N
    k_ok = offs_k < DQK
    d_ok = offs_d < DV
    q = tl.load(Q + b * sqb + offs_k[None, :] * sqc + offs_m[:, None] * sqn,
                mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < M
        kt = tl.load(K + b * skb + offs_k[:, None] * skc + offs_n[None, :] * skn,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        s = _dot(q, kt, IEEE)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = _exp_rel(m_i, m_new)
        p = _exp_rel(s, m_new[:, None])
        p = tl.where(n_ok[None, :], p, 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(V + b * svb + offs_d[None, :] * svc + offs_n[:, None] * svn,
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, IEEE)
        m_i = m_new
    o = acc / l_i[:, None]
    gamma = tl.load(GAMMA).to(tl.float32)
    io_mask = m_ok[:, None] & d_ok[None, :]
    x = tl.load(X + b * sxb + offs_d[None, :] * sxc + offs_m[:, None] * sxn, mask=io_mask, other=0.0)
    out = gamma * o + x.to(tl.float32)
    optr = offs_d[None, :] * soc + offs_m[:, None] * son + b * sob
    tl.store(O + optr, o.to(O.dtype.element_ty), mask=io_mask)
    tl.store(OUT + optr, out.to(OUT.dtype.element_ty), mask=io_mask)
    tl.store(LSE + b * N + offs_m, m_i + tl.log2(l_i) * LN2, mask=m_ok & (pid_d == 0))


@triton.jit
def _scores(Q, b, sqb, sqc, sqn, offs_m, m_ok, offs_k, k_ok, kt, IEEE: tl.constexpr):
    """q tile (BLOCK_M, DQK) and its scores dot(q, k^T tile) (BLOCK_M, BLOCK_N)."""
    q = tl.load(Q + b * sqb + offs_k[None, :] * sqc + offs_m[:, None] * sqn,
                mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    return q, _dot(q, kt, IEEE)


@triton.jit
def _dp_tile(G, V, b, sgb, sgc, sgn, svb, svc, svn, offs_m, m_ok, offs_n, n_ok, DV,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DP: tl.constexpr, IEEE: tl.constexpr):
    """grad v^T for a (query tile, key tile): sum over DV chunks of dot(grad tile, v^T tile)."""
    dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, DV, BLOCK_DP):
        offs_d = d0 + tl.arange(0, BLOCK_DP)
        d_ok = offs_d < DV
        g = tl.load(G + b * sgb + offs_d[None, :] * sgc + offs_m[:, None] * sgn,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        vt = tl.load(V + b * svb + offs_d[:, None] * svc + offs_n[None, :] * svn,
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        dp += _dot(g.to(vt.dtype), vt, IEEE)
    return dp


@triton.jit
def _dscores(p, s, m, l, dp, delta, gamma):
    """dS = P * (gamma * dp - delta); exactly 0 where the row is saturated (P one-hot), unless
    the term is inf / NaN (a NaN gamma, an inf in v or grad): ds - ds keeps eager's NaN there."""
    ds = p * (dp * gamma - delta[:, None])
    return tl.where((s == m[:, None]) & (l[:, None] == 1.0), ds - ds, ds)


@triton.jit
def _rowdot(G, O, b, sgb, sgc, sgn, sob, soc, son, offs_m, m_ok, DV, BLOCK_M: tl.constexpr,
            BLOCK_DP: tl.constexpr):
    """rowsum(grad * o) over the DV channels for a query tile, in fp32 (BLOCK_M,)."""
    acc = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(0, DV, BLOCK_DP):
        offs_d = d0 + tl.arange(0, BLOCK_DP)
        mask = m_ok[:, None] & (offs_d < DV)[None, :]
        g = tl.load(G + b * sgb + offs_d[None, :] * sgc + offs_m[:, None] * sgn, mask=mask, other=0.0)
        o = tl.load(O + b * sob + offs_d[None, :] * soc + offs_m[:, None] * son, mask=mask, other=0.0)
        acc += tl.sum(g.to(tl.float32) * o.to(tl.float32), 1)
    return acc


@triton.jit
def _bwd_dq(Q, K, V, G, O, STATS, GAMMA, DQ_OUT,
            sqb, sqc, sqn, skb, skc, skn, svb, svc, svn, sgb, sgc, sgn, sob, soc, son, sdb, sdc, sdn,
            N, M, DQK, DV, n_tiles, PLANE,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
            BLOCK_DV: tl.constexpr, BLOCK_DP: tl.constexpr, IEEE: tl.constexpr):
    # STATS: three (B, N) fp32 planes, PLANE = B * N apart: rowsum(grad * o), row max, row sum
    # (offsets summed from b * N, an int64: 2 * PLANE alone could wrap int32)
    pid_m = tl.program_id(0) % n_tiles
    b = (tl.program_id(0) // n_tiles).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_DQK)
    m_ok = offs_m < N
    k_ok = offs_k < DQK
    # pass 1: the row statistics from these very score bits
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < M
        kt = tl.load(K + b * skb + offs_k[:, None] * skc + offs_n[None, :] * skn,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)     # (DQK, BLOCK_N)
        q, s = _scores(Q, b, sqb, sqc, sqn, offs_m, m_ok, offs_k, k_ok, kt, IEEE)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.where(n_ok[None, :], _exp_rel(s, m_new[:, None]), 0.0)
        l_i = l_i * _exp_rel(m_i, m_new) + tl.sum(p, 1)
        m_i = m_new
    tl.store(STATS + (b * N + PLANE) + offs_m, m_i, mask=m_ok)
    tl.store(STATS + (b * N + PLANE + PLANE) + offs_m, l_i, mask=m_ok)
    # rowsum(grad * o) of these rows, for delta here, for _bwd_dkdv and for dgamma (formed here,
    # where delta is first needed: its registers live through pass 2 only)
    rowdot = _rowdot(G, O, b, sgb, sgc, sgn, sob, soc, son, offs_m, m_ok, DV, BLOCK_M, BLOCK_DP)
    tl.store(STATS + b * N + offs_m, rowdot, mask=m_ok)
    # pass 2: dq
    rl = 1.0 / l_i
    gamma = tl.load(GAMMA).to(tl.float32)
    delta = rowdot * gamma
    acc = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < M
        kt = tl.load(K + b * skb + offs_k[:, None] * skc + offs_n[None, :] * skn,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        q, s = _scores(Q, b, sqb, sqc, sqn, offs_m, m_ok, offs_k, k_ok, kt, IEEE)
        p = tl.where(n_ok[None, :], _exp_rel(s, m_i[:, None]) * rl[:, None], 0.0)
        dp = _dp_tile(G, V, b, sgb, sgc, sgn, svb, svc, svn, offs_m, m_ok, offs_n, n_ok, DV,
                      BLOCK_M, BLOCK_N, BLOCK_DP, IEEE)
        ds = _dscores(p, s, m_i, l_i, dp, delta, gamma)
        acc += _dot(ds.to(kt.dtype), tl.trans(kt), IEEE)
    tl.store(DQ_OUT + b * sdb + offs_k[None, :] * sdc + offs_m[:, None] * sdn,
             acc.to(DQ_OUT.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def _bwd_dkdv(Q, K, V, G, STATS, GAMMA, DK_OUT, DV_OUT,
              sqb, sqc, sqn, skb, skc, skn, svb, svc, svn, sgb, sgc, sgn,
              skob, skoc, skon, svob, svoc, svon,
              N, M, DQK, DV, n_tiles, PLANE,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
              BLOCK_DV: tl.constexpr, BLOCK_DP: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0) % n_tiles
    b = (tl.program_id(0) // n_tiles).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_DQK)
    offs_d = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    n_ok = offs_n < M
    k_ok = offs_k < DQK
    d_ok = offs_d < DV
    kt = tl.load(K + b * skb + offs_k[:, None] * skc + offs_n[None, :] * skn,
                 mask=k_ok[:, None] & n_ok[None, :], other=0.0)         # (DQK, BLOCK_N)
    gamma = tl.load(GAMMA).to(tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    dk_acc = tl.zeros([BLOCK_N, BLOCK_DQK], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        q, s = _scores(Q, b, sqb, sqc, sqn, offs_m, m_ok, offs_k, k_ok, kt, IEEE)
        m_i = tl.load(STATS + (b * N + PLANE) + offs_m, mask=m_ok, other=0.0)
        l_i = tl.load(STATS + (b * N + PLANE + PLANE) + offs_m, mask=m_ok, other=1.0)
        p = _exp_rel(s, m_i[:, None]) * (1.0 / l_i)[:, None]
        p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)             # (BLOCK_M, BLOCK_N)
        g = tl.load(G + b * sgb + offs_d[None, :] * sgc + offs_m[:, None] * sgn,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)      # (BLOCK_M, BLOCK_DV)
        dv_acc += _dot(tl.trans(p.to(g.dtype)), g, IEEE)
        if pid_d == 0:
            delta = tl.load(STATS + b * N + offs_m, mask=m_ok, other=0.0) * gamma  # (as _bwd_dq forms it)
            dp = _dp_tile(G, V, b, sgb, sgc, sgn, svb, svc, svn, offs_m, m_ok, offs_n, n_ok, DV,
                          BLOCK_M, BLOCK_N, BLOCK_DP, IEEE)
            ds = _dscores(p, s, m_i, l_i, dp, delta, gamma)
            dk_acc += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    tl.store(DV_OUT + b * svob + offs_d[None, :] * svoc + offs_n[:, None] * svon,
             (dv_acc * gamma).to(DV_OUT.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
    tl.store(DK_OUT + b * skob + offs_k[None, :] * skoc + offs_n[:, None] * skon,
             dk_acc.to(DK_OUT.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :] & (pid_d == 0))


# ----------------------------------------------------------------------------- configs
# Per kernel: (BLOCK_M, BLOCK_N, BLOCK_DV, BLOCK_DP, num_warps, num_stages), keyed by (dtype
# family, wide head (DQK > 64, i.e. C > 512), Hopper). The single source of truth for the
# launchers and the AOT report, which compiles every C = 64..1024 model case for sm_80 and
# sm_90 and fails on spills. BLOCK_DV: the DV chunk of an output/accumulator tile (grid axis
# 1); BLOCK_DP: the DV chunk of the dO v^T reduction. The two backward kernels share one shape
# (their score and dO v^T bits must agree). On sm_90, BLOCK_M = BLOCK_N = 64 with 4 warps gives
# wgmma (64-row tiles per warpgroup); sm_80's mma.sync needs fewer registers at BLOCK_M = 32.
# fp32 runs its dots as tf32x3 (three tensor-core passes, fp32-level accuracy, three times the
# operand registers): smaller tiles.
_CONFIGS = {
    ("half", False, True): {"fwd": (128, 64, 64, 64, 8, 2), "bwd": (64, 64, 64, 32, 4, 2)},
    ("half", True, True): {"fwd": (64, 64, 64, 64, 4, 2), "bwd": (64, 64, 64, 32, 4, 2)},
    ("half", False, False): {"fwd": (128, 64, 64, 64, 8, 2), "bwd": (32, 64, 64, 32, 4, 2)},
    ("half", True, False): {"fwd": (64, 64, 64, 64, 4, 2), "bwd": (32, 64, 64, 32, 4, 2)},
    ("fp32", False, True): {"fwd": (32, 32, 64, 64, 4, 2), "bwd": (32, 32, 64, 16, 4, 1)},
    ("fp32", True, True): {"fwd": (16, 32, 32, 32, 4, 1), "bwd": (16, 32, 32, 16, 4, 1)},
    ("fp32", False, False): {"fwd": (32, 32, 64, 64, 4, 2), "bwd": (32, 32, 64, 16, 4, 1)},
    ("fp32", True, False): {"fwd": (16, 32, 32, 32, 4, 1), "bwd": (16, 32, 32, 16, 4, 1)},
}


_CONFIG_CACHE: dict = {}


def _config(kernel: str, dqk: int, dv: int, dtype: torch.dtype, hopper: bool = True) -> dict:
    """The launch config (a shared dict: callers must not modify it), planned once per
    (kernel, dqk, dv, dtype, hopper): planning cost ~5 us a call on the Python route."""
    key = (kernel, dqk, dv, dtype, hopper)
    cfg = _CONFIG_CACHE.get(key)
    if cfg is None:
        cfg = _CONFIG_CACHE[key] = _plan(kernel, dqk, dv, dtype, hopper)
    return cfg


def _plan(kernel: str, dqk: int, dv: int, dtype: torch.dtype, hopper: bool) -> dict:
    family = "fp32" if dtype == torch.float32 else "half"
    bm, bn, bdv, bdp, warps, stages = _CONFIGS[(family, _p2(dqk) > 64, hopper)][kernel]
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DQK=_p2(dqk), BLOCK_DV=min(_p2(dv), bdv),
               IEEE=dtype == torch.float32, num_warps=warps, num_stages=stages)
    if kernel == "bwd":
        if family == "fp32" and _p2(dqk) <= 16:
            bdp = 32  # C <= 128: ptxas spills the dq kernel at BLOCK_DP = 16 (and not at 32)
        cfg["BLOCK_DP"] = min(_p2(dv), bdp)
    return cfg


def _gamma32(gamma):
    """gamma as the fp32 one-element buffer the kernels load (a (1,) or () fp32 tensor as it is: the
    kernels read its one element through the pointer; no reshape/to calls, ~1 us)."""
    return gamma if gamma.dtype == torch.float32 else gamma.reshape(1).to(torch.float32)


def forward(q, k, v, x, gamma):
    b, dqk, n = q.shape
    m, dv = k.shape[2], v.shape[1]
    cfg = _config("fwd", dqk, dv, q.dtype, _launch.capability(q) >= (9, 0))
    # out and o share x's strides (empty_like of one tensor): the kernel takes one set for both
    out = torch.empty_like(x)
    o = torch.empty_like(x, dtype=v.dtype)
    lse = x.new_empty((b, n), dtype=torch.float32)  # (new_empty: less host work than torch.empty(..., device=))
    n_tiles = _launch.cdiv(n, cfg["BLOCK_M"])
    grid = _launch.grid("attention forward", n_tiles * b, _launch.cdiv(dv, cfg["BLOCK_DV"]))
    with _launch.device_guard(x):
        _attn_fwd[grid](q, k, v, x, out, o, lse, _gamma32(gamma),
                        *q.stride(), *k.stride(), *v.stride(), *x.stride(), *out.stride(),
                        n, m, dqk, dv, n_tiles, **cfg)
    return out, o, lse


def backward(grad, q, k, v, o, gamma, out=None):
    """(dq, dk, dv, rowdot), rowdot = rowsum(grad * o) (B, N) in fp32 (dgamma = rowdot.sum();
    delta = gamma * rowdot is formed in the kernels). The row statistics are recomputed exactly
    (see the module docstring): the forward's lse is not needed. ``out``: (dq, dk, dv) to write
    (any strides; e.g. the channel slices of one stacked gradient), else new tensors like q, k, v."""
    b, dqk, n = q.shape
    m, dv = k.shape[2], v.shape[1]
    dq, dk, dvv = out if out is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    # rowdot, the row max and the row sum: three (B, N) planes of one buffer (one allocation, and
    # no views of it but the rowdot returned)
    stats = q.new_empty((3, b, n), dtype=torch.float32)
    gamma = _gamma32(gamma)
    cfg = _config("bwd", dqk, dv, q.dtype, _launch.capability(q) >= (9, 0))
    qs, ks, vs, gs = q.stride(), k.stride(), v.stride(), grad.stride()
    with _launch.device_guard(q):
        n_tiles = _launch.cdiv(n, cfg["BLOCK_M"])
        _bwd_dq[_launch.grid("attention backward (dq)", n_tiles * b)](
            q, k, v, grad, o, stats, gamma, dq,
            *qs, *ks, *vs, *gs, *o.stride(), *dq.stride(), n, m, dqk, dv, n_tiles, b * n, **cfg)
        n_tiles = _launch.cdiv(m, cfg["BLOCK_N"])
        _bwd_dkdv[_launch.grid("attention backward (dk, dv)", n_tiles * b, _launch.cdiv(dv, cfg["BLOCK_DV"]))](
            q, k, v, grad, stats, gamma, dk, dvv,
            *qs, *ks, *vs, *gs, *dk.stride(), *dvv.stride(),
            n, m, dqk, dv, n_tiles, b * n, **cfg)
    return dq, dk, dvv, stats[0]


# ----------------------------------------------------------------------------- AOT cases
def aot_cases():
    """SAGAN / BigGAN attention layers: C = 64 .. 1024 (BigGAN: keys pooled to N/4), forward and
    backward, fp32 and bf16."""
    for dtype in (torch.float32, torch.bfloat16):  # fp16 compiles like bf16
        for c, hw, pool in ((64, 64 * 64, 1), (256, 32 * 32, 4), (512, 16 * 16, 1), (1024, 8 * 8, 1)):
            def run(c=c, hw=hw, pool=pool, dtype=dtype):
                def t(ch, npos):
                    return torch.empty((2, ch, npos), device="meta", dtype=dtype)
                q, k, v, x = t(c // 8, hw), t(c // 8, hw // pool), t(c, hw // pool), t(c, hw)
                gamma = torch.empty(1, device="meta", dtype=torch.float32)
                out, o, lse = forward(q, k, v, x, gamma)
                backward(torch.empty_like(out), q, k, v, o, gamma)
            yield f"{str(dtype)[6:]} C={c} N={hw} M={hw // pool}", run
