"""Triton kernels for the SAGAN attention core (flash-style, unequal head dims).

Shapes (channel-major, any strides, so NCHW and channels_last inputs need no transposing copy):
q (B, DQK, N), k (B, DQK, M), v (B, DV, M), x / out / o (B, DV, N), lse / delta (B, N).

Forward: one program per (query tile, DV chunk, batch); online softmax over key tiles with fp32
accumulation; epilogue writes o and out = gamma * o + x. DV (= C, up to 512+) is split into
chunks of BLOCK_DV so the accumulator fits in registers; each chunk recomputes the cheap
q^T k scores (DQK = C/8). Head dims are padded to powers of two (>= 16 for tl.dot) by masks.

Backward (P recomputed from lse; delta = gamma * rowsum(grad * o) comes in):
  _bwd_dv: per (key tile, DV chunk): dv = sum_i P^T dO
  _bwd_dk: per key tile: dk = sum_i dS^T q, dS = P * (dO^T v - delta), dO^T v summed over DV chunks
  _bwd_dq: per query tile: dq = sum_j dS k
Three deterministic kernels, no atomics. dO = gamma * grad is formed on the fly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: tf32x3 (three tensor-core passes, about fp32 accuracy, like torch's fp32 bmm
    # without TF32); fp16/bf16: one MMA with fp32 accumulation. The interpreter computes in fp32.
    if IEEE:
        return tl.dot(a, b, input_precision="tf32x3")
    return tl.dot(a, b)


@triton.jit
def _attn_fwd(Q, K, V, X, OUT, O, LSE, GAMMA,
              sqb, sqc, sqn, skb, skc, skn, svb, svc, svn, sxb, sxc, sxn, sob, soc, son,
              N, M, DQK, DV,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
              BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
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
        s = _dot(q, kt, IEEE) * LOG2E                        # base-2 scores
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
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
    if pid_d == 0:
        tl.store(LSE + b * N + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=m_ok)


@triton.jit
def _bwd_dv(Q, K, G, LSE, GAMMA, DV_OUT,
            sqb, sqc, sqn, skb, skc, skn, sgb, sgc, sgn, sdb, sdc, sdn,
            N, M, DQK, DV,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
            BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_DQK)
    offs_d = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    n_ok = offs_n < M
    k_ok = offs_k < DQK
    d_ok = offs_d < DV
    k = tl.load(K + b * skb + offs_k[None, :] * skc + offs_n[:, None] * skn,
                mask=n_ok[:, None] & k_ok[None, :], other=0.0)          # (BLOCK_N, DQK)
    gamma = tl.load(GAMMA).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        qt = tl.load(Q + b * sqb + offs_k[:, None] * sqc + offs_m[None, :] * sqn,
                     mask=k_ok[:, None] & m_ok[None, :], other=0.0)     # (DQK, BLOCK_M)
        lse = tl.load(LSE + b * N + offs_m, mask=m_ok, other=float("inf"))
        pt = tl.exp2(_dot(k, qt, IEEE) * LOG2E - lse[None, :] * LOG2E)  # (BLOCK_N, BLOCK_M)
        g = tl.load(G + b * sgb + offs_d[None, :] * sgc + offs_m[:, None] * sgn,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)      # (BLOCK_M, BLOCK_DV)
        acc += _dot(pt.to(g.dtype), g, IEEE)
    acc = acc * gamma
    tl.store(DV_OUT + b * sdb + offs_d[None, :] * sdc + offs_n[:, None] * sdn,
             acc.to(DV_OUT.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_dk(Q, K, V, G, LSE, DELTA, GAMMA, DK_OUT,
            sqb, sqc, sqn, skb, skc, skn, svb, svc, svn, sgb, sgc, sgn, sdb, sdc, sdn,
            N, M, DQK, DV,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
            BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_DQK)
    n_ok = offs_n < M
    k_ok = offs_k < DQK
    k = tl.load(K + b * skb + offs_k[None, :] * skc + offs_n[:, None] * skn,
                mask=n_ok[:, None] & k_ok[None, :], other=0.0)          # (BLOCK_N, DQK)
    gamma = tl.load(GAMMA).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DQK], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        qt = tl.load(Q + b * sqb + offs_k[:, None] * sqc + offs_m[None, :] * sqn,
                     mask=k_ok[:, None] & m_ok[None, :], other=0.0)     # (DQK, BLOCK_M)
        lse = tl.load(LSE + b * N + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + b * N + offs_m, mask=m_ok, other=0.0)
        pt = tl.exp2(_dot(k, qt, IEEE) * LOG2E - lse[None, :] * LOG2E)  # (BLOCK_N, BLOCK_M)
        dpt = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for d0 in range(0, DV, BLOCK_DV):
            offs_d = d0 + tl.arange(0, BLOCK_DV)
            d_ok = offs_d < DV
            v = tl.load(V + b * svb + offs_d[None, :] * svc + offs_n[:, None] * svn,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_DV)
            gt = tl.load(G + b * sgb + offs_d[:, None] * sgc + offs_m[None, :] * sgn,
                         mask=d_ok[:, None] & m_ok[None, :], other=0.0)  # (BLOCK_DV, BLOCK_M)
            dpt += _dot(v, gt.to(v.dtype), IEEE)
        dst = pt * (dpt * gamma - delta[None, :])
        acc += _dot(dst.to(qt.dtype), tl.trans(qt), IEEE)
    tl.store(DK_OUT + b * sdb + offs_k[None, :] * sdc + offs_n[:, None] * sdn,
             acc.to(DK_OUT.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def _bwd_dq(Q, K, V, G, LSE, DELTA, GAMMA, DQ_OUT,
            sqb, sqc, sqn, skb, skc, skn, svb, svc, svn, sgb, sgc, sgn, sdb, sdc, sdn,
            N, M, DQK, DV,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
            BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_DQK)
    m_ok = offs_m < N
    k_ok = offs_k < DQK
    q = tl.load(Q + b * sqb + offs_k[None, :] * sqc + offs_m[:, None] * sqn,
                mask=m_ok[:, None] & k_ok[None, :], other=0.0)          # (BLOCK_M, DQK)
    lse = tl.load(LSE + b * N + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + b * N + offs_m, mask=m_ok, other=0.0)
    gamma = tl.load(GAMMA).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < M
        kt = tl.load(K + b * skb + offs_k[:, None] * skc + offs_n[None, :] * skn,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)     # (DQK, BLOCK_N)
        p = tl.exp2(_dot(q, kt, IEEE) * LOG2E - lse[:, None] * LOG2E)
        p = tl.where(n_ok[None, :], p, 0.0)
        dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, DV, BLOCK_DV):
            offs_d = d0 + tl.arange(0, BLOCK_DV)
            d_ok = offs_d < DV
            g = tl.load(G + b * sgb + offs_d[None, :] * sgc + offs_m[:, None] * sgn,
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_DV)
            vt = tl.load(V + b * svb + offs_d[:, None] * svc + offs_n[None, :] * svn,
                         mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_DV, BLOCK_N)
            dp += _dot(g.to(vt.dtype), vt, IEEE)
        ds = p * (dp * gamma - delta[:, None])
        acc += _dot(ds.to(kt.dtype), tl.trans(kt), IEEE)
    tl.store(DQ_OUT + b * sdb + offs_k[None, :] * sdc + offs_m[:, None] * sdn,
             acc.to(DQ_OUT.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, BLOCK_DV, num_warps) per kernel: the largest tiles that compile without
# register spills on sm_80 and sm_90 at BLOCK_DQK = 64 (C = 512), checked by AOT_SPECS /
# ganengine.tools.aot_report. fp32 runs its dots as tf32x3 (three tensor-core passes, fp32-level
# accuracy), which needs smaller tiles than fp16/bf16.
_CONFIGS = {
    "half": {"fwd": (128, 64, 64, 8), "dv": (64, 64, 128, 8), "dk": (64, 32, 64, 8), "dq": (64, 32, 64, 8)},
    "fp32": {"fwd": (32, 32, 64, 4), "dv": (32, 32, 64, 4), "dk": (32, 16, 32, 4), "dq": (16, 32, 32, 4)},
}


def _config(kernel: str, dqk: int, dv: int, dtype: torch.dtype) -> dict:
    bm, bn, bdv, warps = _CONFIGS["fp32" if dtype == torch.float32 else "half"][kernel]
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DQK=_p2(dqk), BLOCK_DV=min(_p2(dv), bdv),
                IEEE=dtype == torch.float32, num_warps=warps)


def _strides(t):
    return tuple(t.stride())


def forward(q, k, v, x, gamma):
    b, dqk, n = q.shape
    m, dv = k.shape[2], v.shape[1]
    cfg = _config("fwd", dqk, dv, q.dtype)
    out = torch.empty_like(x)
    o = torch.empty_like(x, dtype=v.dtype)
    lse = torch.empty((b, n), device=x.device, dtype=torch.float32)
    gamma = gamma.reshape(1).to(torch.float32)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(dv, cfg["BLOCK_DV"]), b)
    assert out.stride() == o.stride()
    _attn_fwd[grid](q, k, v, x, out, o, lse, gamma,
                    *_strides(q), *_strides(k), *_strides(v), *_strides(x), *_strides(out),
                    n, m, dqk, dv, **cfg)
    return out, o, lse


def backward(grad, q, k, v, lse, delta, gamma):
    b, dqk, n = q.shape
    m, dv = k.shape[2], v.shape[1]
    lse = lse.to(torch.float32).contiguous()
    delta = delta.to(torch.float32).contiguous()
    gamma = gamma.reshape(1).to(torch.float32)
    dq, dk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cfg = _config("dv", dqk, dv, q.dtype)
    _bwd_dv[(triton.cdiv(m, cfg["BLOCK_N"]), triton.cdiv(dv, cfg["BLOCK_DV"]), b)](
        q, k, grad, lse, gamma, dvv,
        *_strides(q), *_strides(k), *_strides(grad), *_strides(dvv), n, m, dqk, dv, **cfg)
    cfg = _config("dk", dqk, dv, q.dtype)
    _bwd_dk[(triton.cdiv(m, cfg["BLOCK_N"]), b)](
        q, k, v, grad, lse, delta, gamma, dk,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad), *_strides(dk), n, m, dqk, dv, **cfg)
    cfg = _config("dq", dqk, dv, q.dtype)
    _bwd_dq[(triton.cdiv(n, cfg["BLOCK_M"]), b)](
        q, k, v, grad, lse, delta, gamma, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad), *_strides(dq), n, m, dqk, dv, **cfg)
    return dq, dk, dvv


# ----------------------------------------------------------------------------- AOT specs
_PTR_TYPES = {"LSE": "*fp32", "DELTA": "*fp32", "GAMMA": "*fp32"}
_INT_ARGS = ("N", "M", "DQK", "DV")


def _signature(kernel, dt: str, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.isupper() and name not in _INT_ARGS:   # pointer arguments are upper case
            sig[name] = _PTR_TYPES.get(name, "*" + dt)
        else:
            sig[name] = "i32"
    return sig


def _aot_specs():
    specs = []
    kernels = {"fwd": _attn_fwd, "dv": _bwd_dv, "dk": _bwd_dk, "dq": _bwd_dq}
    for dt, tdt in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        for dqk in (8, 32, 64):  # C = 64, 256, 512
            for name, kernel in kernels.items():
                cfg = _config(name, dqk, 512, tdt)
                warps = cfg.pop("num_warps")
                label = ",".join(f"{k}={v}" for k, v in cfg.items()) + f",warps={warps},{dt}"
                specs.append(dict(kernel=kernel, config=label, signature=_signature(kernel, dt, cfg),
                                  constexprs=cfg, num_warps=warps, num_stages=2))
    return specs


AOT_SPECS = _aot_specs()
