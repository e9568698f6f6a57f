"""Triton kernels for the fused GAN loss reductions (see ganengine/ops/losses.py for the ops).

Two-stage deterministic reductions over several terms in one launch:

* stage 1, grid (blocks, terms): program (b, i) reduces CHUNK = BLOCK * ITERS contiguous
  elements of term i into PART[i, b] (the adversarial kernel also stores scale_i * dl/dx there
  and then, in the same pass); programs past a term's end write 0;
* stage 2, one program: sums PART[i, :] in a fixed order, scales each term and writes the
  terms and their total.

Where every adversarial term fits one CHUNK (one stage-1 program), one program does both stages
(``_adv_single_kernel``: one launch, the same bits).

No atomics, so the bits do not depend on scheduling. Accumulation in fp32 (fp64 for fp64).
Per-term scalars (gradient scale, target, final scale) are read from a small device tensor of
the accumulation dtype (cached per value tuple): Python float kernel arguments are fp32, which
would round 1/n and label values for fp64 inputs.

Loss codes: 0 BCE-with-logits to t, 1 (x - t)^2, 2 relu(1 - x), 3 relu(1 + x), 4 linear x
(times t in the final scale).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _launch

BLOCK = 1024
ITERS = 4
CHUNK = BLOCK * ITERS
FINAL_BLOCK = 1024
NUM_WARPS = 4
MAX_ADV_TERMS = 2
MAX_L1_TERMS = 4
LINEAR = 4


@triton.jit
def _log1p_small(e):
    # log1p for e in (0, 1]: log(1 + e) loses e's digits when e << 1, the series does not
    return tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))


@triton.jit
def _adv_elem(x, t, MODE: tl.constexpr):
    """(elementwise loss, dl/dx) of one loss code; non-finite x gives eager's values."""
    if MODE == 0:
        e = tl.exp(-tl.abs(x))
        inv = 1.0 / (1.0 + e)
        g = tl.where(x >= 0, inv, e * inv) - t
        l = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL) - x * t + _log1p_small(e)
        # eager's formula (1 - t) x + m + log(exp(-m) + exp(-x - m)), m = max(-x, 0), at x = +-inf:
        # (1 - t) * inf at +inf (inf, or NaN for t = 1), NaN at -inf
        l = tl.where(x == float("inf"), (1.0 - t) * x, tl.where(x == float("-inf"), float("nan"), l))
    elif MODE == 1:
        d = x - t
        g = 2.0 * d
        l = d * d
    elif MODE == 2:
        # torch's relu backward passes the gradient unless relu's output is <= 0: relu'(0) = 0,
        # and a NaN logit gets the gradient (-1), as eager
        g = tl.where(x >= 1.0, 0.0, -1.0)
        l = tl.maximum(1.0 - x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif MODE == 3:
        g = tl.where(x <= -1.0, 0.0, 1.0)
        l = tl.maximum(1.0 + x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        g = x * 0.0 + t
        l = x
    return l, g


@triton.jit
def _adv_term(X, G, N, PARAMS, term, K: tl.constexpr, pid, MODE: tl.constexpr, GRAD: tl.constexpr,
              BLOCK: tl.constexpr, ITERS: tl.constexpr, ACC: tl.constexpr):
    scale = tl.load(PARAMS + term)
    t = tl.load(PARAMS + K + term)
    acc = tl.zeros([BLOCK], dtype=ACC)
    base = pid.to(tl.int64) * (BLOCK * ITERS)
    for it in range(ITERS):
        offs = base + it * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(X + offs, mask=m, other=0.0).to(ACC)
        l, g = _adv_elem(x, t, MODE)
        acc += tl.where(m, l, 0.0)
        if GRAD:
            tl.store(G + offs, (g * scale).to(G.dtype.element_ty), mask=m)
    return tl.sum(acc, axis=0)


@triton.jit
def _adv_partial_kernel(X0, X1, G0, G1, PART, PARAMS, N0, N1, NBLK,
                        K: tl.constexpr, MODE0: tl.constexpr, MODE1: tl.constexpr, GRAD0: tl.constexpr,
                        GRAD1: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    term = tl.program_id(1)
    if term == 0:
        part = _adv_term(X0, G0, N0, PARAMS, 0, K, pid, MODE0, GRAD0, BLOCK, ITERS, ACC)
    else:
        part = _adv_term(X1, G1, N1, PARAMS, 1, K, pid, MODE1, GRAD1, BLOCK, ITERS, ACC)
    tl.store(PART + term * NBLK + pid, part)


@triton.jit
def _adv_single_kernel(X0, X1, G0, G1, TOTAL, PARAMS, FSCALE, N0, N1, K: tl.constexpr, MODE0: tl.constexpr,
                       MODE1: tl.constexpr, GRAD0: tl.constexpr, GRAD1: tl.constexpr, BLOCK: tl.constexpr,
                       ITERS: tl.constexpr, ACC: tl.constexpr):
    """Both stages in one program where every term fits one CHUNK (a PatchGAN map at small
    batches): the per-term sums of stage 1, scaled and added as stage 2 does (the same bits)."""
    pid = tl.program_id(0)  # (0: one program)
    # stage 2's arithmetic as _final_kernel has it: each term scaled, placed in a [2] vector by a
    # select, then summed (written as a*s0 + b*s1, the compiler contracts it into an FMA on GPUs,
    # which would not round a*s0: other bits than the two stages')
    idx = tl.arange(0, 2)
    part = _adv_term(X0, G0, N0, PARAMS, 0, K, pid, MODE0, GRAD0, BLOCK, ITERS, ACC)
    terms = tl.where(idx == 0, part * tl.load(FSCALE), tl.zeros([2], dtype=ACC))
    if K == 2:
        part = _adv_term(X1, G1, N1, PARAMS, 1, K, pid, MODE1, GRAD1, BLOCK, ITERS, ACC)
        terms = tl.where(idx == 1, part * tl.load(FSCALE + 1), terms)
    tl.store(TOTAL, tl.sum(terms, axis=0))


@triton.jit
def _l1_term(P, Q, G, N, c, pid, GRAD: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
             ACC: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=ACC)
    base = pid.to(tl.int64) * (BLOCK * ITERS)
    for it in range(ITERS):
        offs = base + it * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        d = tl.load(P + offs, mask=m, other=0.0).to(ACC) - tl.load(Q + offs, mask=m, other=0.0).to(ACC)
        acc += tl.abs(d)
        if GRAD:  # c * sign(d), sign(0) = 0 as torch
            tl.store(G + offs, tl.where(d > 0, c, tl.where(d < 0, -c, 0.0)).to(G.dtype.element_ty), mask=m)
    return tl.sum(acc, axis=0)


@triton.jit
def _l1_partial_kernel(P0, P1, P2, P3, Q0, Q1, Q2, Q3, G0, G1, G2, G3, PART, SCALE, N0, N1, N2, N3, NBLK,
                       GRAD: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    term = tl.program_id(1)
    c = tl.load(SCALE + term)
    if term == 0:
        part = _l1_term(P0, Q0, G0, N0, c, pid, GRAD, BLOCK, ITERS, ACC)
    elif term == 1:
        part = _l1_term(P1, Q1, G1, N1, c, pid, GRAD, BLOCK, ITERS, ACC)
    elif term == 2:
        part = _l1_term(P2, Q2, G2, N2, c, pid, GRAD, BLOCK, ITERS, ACC)
    else:
        part = _l1_term(P3, Q3, G3, N3, c, pid, GRAD, BLOCK, ITERS, ACC)
    tl.store(PART + term * NBLK + pid, part)


@triton.jit
def _sign_term(P, Q, G, N, c, pid, BLOCK: tl.constexpr, ITERS: tl.constexpr, ACC: tl.constexpr):
    base = pid.to(tl.int64) * (BLOCK * ITERS)
    for it in range(ITERS):
        offs = base + it * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        d = tl.load(P + offs, mask=m, other=0.0).to(ACC) - tl.load(Q + offs, mask=m, other=0.0).to(ACC)
        g = tl.where(d > 0, c, tl.where(d < 0, -c, 0.0))  # sign(0) = 0, as torch
        tl.store(G + offs, g.to(G.dtype.element_ty), mask=m)


@triton.jit
def _l1_bwd_kernel(P0, P1, P2, P3, Q0, Q1, Q2, Q3, G0, G1, G2, G3, COEF, N0, N1, N2, N3,
                   BLOCK: tl.constexpr, ITERS: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    term = tl.program_id(1)
    c = tl.load(COEF + term).to(ACC)
    if term == 0:
        _sign_term(P0, Q0, G0, N0, c, pid, BLOCK, ITERS, ACC)
    elif term == 1:
        _sign_term(P1, Q1, G1, N1, c, pid, BLOCK, ITERS, ACC)
    elif term == 2:
        _sign_term(P2, Q2, G2, N2, c, pid, BLOCK, ITERS, ACC)
    else:
        _sign_term(P3, Q3, G3, N3, c, pid, BLOCK, ITERS, ACC)


@triton.jit(do_not_specialize=["NBLK"])  # NBLK % 16 == 0 made ptxas use 8 B of stack on sm_90
def _final_kernel(PART, SCALE, TOTAL, TERMS, NBLK, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
                  ACC: tl.constexpr, STORE_TERMS: tl.constexpr):
    """TERMS[i] = SCALE[i] * sum(PART[i, :NBLK]) in a fixed order; TOTAL = their sum."""
    idx = tl.arange(0, KP)
    terms = tl.zeros([KP], dtype=ACC)
    for i in tl.static_range(K):
        acc = tl.zeros([BLOCK], dtype=ACC)
        for b in range(0, NBLK, BLOCK):
            offs = b + tl.arange(0, BLOCK)
            acc += tl.load(PART + i * NBLK + offs, mask=offs < NBLK, other=0.0)
        term = tl.sum(acc, axis=0) * tl.load(SCALE + i)
        terms = tl.where(idx == i, term, terms)
    if STORE_TERMS:
        tl.store(TERMS + idx, terms, mask=idx < K)
    tl.store(TOTAL, tl.sum(terms, axis=0))


# ----------------------------------------------------------------------------- launchers
def _acc(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


@functools.lru_cache(maxsize=256)
def _params(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # read-only per-term scalars; training calls repeat the same values, so this is a cache hit
    return torch.tensor(values, dtype=dtype, device=device)


def _pad(lst, n, fill):
    return list(lst) + [fill] * (n - len(lst))


def _final(part, scale_vals, acc_t, acc_tl, device, k, nblk, with_terms):
    total = torch.empty((), dtype=acc_t, device=device)
    terms = torch.empty(k, dtype=acc_t, device=device) if with_terms else total
    kp = max(2, _launch.next_power_of_2(k))
    # one program, a short loop: no software pipelining (at the default 3 stages ptxas spills)
    _final_kernel[(1,)](part, _params(tuple(scale_vals), acc_t, device), total, terms, nblk, K=k, KP=kp,
                        BLOCK=FINAL_BLOCK, ACC=acc_tl, STORE_TERMS=with_terms, num_warps=NUM_WARPS, num_stages=1)
    return total, terms


def adv_fwd(xs, modes, targets, scales, want_grad):
    """xs: 1 or 2 contiguous tensors of one dtype. Returns (0-d total, grads)."""
    k = len(xs)
    if not 1 <= k <= MAX_ADV_TERMS:
        raise ValueError(f"triton adv_fwd takes 1 to {MAX_ADV_TERMS} inputs, got {k}")
    acc_t, acc_tl = _acc(xs[0].dtype)
    device = xs[0].device
    grad_on = [bool(want_grad and m != LINEAR) for m in modes]
    grads = [torch.empty(x.shape, dtype=x.dtype, device=device) if g else x.new_empty(0) for x, g in zip(xs, grad_on)]
    nblk = max(_launch.cdiv(x.numel(), CHUNK) for x in xs)
    params = _params(tuple(float(s) for s in scales) + tuple(float(t) for t in targets), acc_t, device)
    xp = _pad(xs, 2, xs[0])
    gp = [g if g.numel() else xs[0] for g in grads] + [xs[0]] * (2 - k)
    final_scale = [s * t if m == LINEAR else s for s, t, m in zip(scales, targets, modes)]
    with _launch.device_guard(xs[0]):
        if nblk == 1:  # one launch instead of two (the eager loss it replaces issues one or two)
            total = torch.empty((), dtype=acc_t, device=device)
            _adv_single_kernel[(1,)](
                xp[0], xp[1], gp[0], gp[1], total, params, _params(tuple(final_scale), acc_t, device),
                xp[0].numel(), xp[1].numel(), K=k, MODE0=int(modes[0]), MODE1=int(modes[-1]), GRAD0=grad_on[0],
                GRAD1=grad_on[-1], BLOCK=BLOCK, ITERS=ITERS, ACC=acc_tl, num_warps=NUM_WARPS)
            return total, grads
        part = torch.empty((k, nblk), dtype=acc_t, device=device)
        _adv_partial_kernel[_launch.grid("adversarial loss", nblk, k)](
            xp[0], xp[1], gp[0], gp[1], part, params, xp[0].numel(), xp[1].numel(), nblk,
            K=k, MODE0=int(modes[0]), MODE1=int(modes[-1]), GRAD0=grad_on[0], GRAD1=grad_on[-1],
            BLOCK=BLOCK, ITERS=ITERS, ACC=acc_tl, num_warps=NUM_WARPS)
        return _final(part, final_scale, acc_t, acc_tl, device, k, nblk, False)[0], grads


def l1_fwd(preds, targets, scales, want_grad=False):
    """Returns (0-d total, terms [k], grads): grads_i = scale_i * sign(p - q) when asked."""
    k = len(preds)
    if not 1 <= k <= MAX_L1_TERMS:
        raise ValueError(f"triton l1_fwd takes 1 to {MAX_L1_TERMS} pairs, got {k}")
    acc_t, acc_tl = _acc(preds[0].dtype)
    device = preds[0].device
    nblk = max(_launch.cdiv(p.numel(), CHUNK) for p in preds)
    part = torch.empty((k, nblk), dtype=acc_t, device=device)
    grads = [torch.empty(p.shape, dtype=p.dtype, device=device) if want_grad else p.new_empty(0) for p in preds]
    P, Q = _pad(preds, 4, preds[0]), _pad(targets, 4, targets[0])
    G = _pad(grads, 4, grads[0]) if want_grad else P
    scale_t = _params(tuple(float(s) for s in scales), acc_t, device)
    with _launch.device_guard(preds[0]):
        _l1_partial_kernel[_launch.grid("L1 loss", nblk, k)](
            *P, *Q, *G, part, scale_t, *[p.numel() for p in P], nblk, GRAD=bool(want_grad),
            BLOCK=BLOCK, ITERS=ITERS, ACC=acc_tl, num_warps=NUM_WARPS)
        total, terms = _final(part, [float(s) for s in scales], acc_t, acc_tl, device, k, nblk, True)
    return total, terms, grads


def l1_bwd(preds, targets, coef):
    k = len(preds)
    if not 1 <= k <= MAX_L1_TERMS:
        raise ValueError(f"triton l1_bwd takes 1 to {MAX_L1_TERMS} pairs, got {k}")
    _, acc_tl = _acc(preds[0].dtype)
    grads = [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in preds]
    nblk = max(_launch.cdiv(p.numel(), CHUNK) for p in preds)
    P, Q, G = _pad(preds, 4, preds[0]), _pad(targets, 4, targets[0]), _pad(grads, 4, grads[0])
    with _launch.device_guard(preds[0]):
        _l1_bwd_kernel[_launch.grid("L1 loss backward", nblk, k)](
            *P, *Q, *G, coef, *[p.numel() for p in P], BLOCK=BLOCK, ITERS=ITERS, ACC=acc_tl, num_warps=NUM_WARPS)
    return grads


# ----------------------------------------------------------------------------- AOT cases
def aot_cases():
    """A CycleGAN step's losses: two 30x30 PatchGAN maps (BCE and MSE, with gradients), the four
    256x256 L1 terms (forward with and without the gradient, backward)."""
    for dtype in (torch.float32, torch.bfloat16):
        def run(dtype=dtype):
            maps = [torch.empty((1, 1, 30, 30), device="meta", dtype=dtype) for _ in range(2)]
            for mode in (0, 1):
                adv_fwd(maps, [mode, mode], [1.0, 0.0], [0.5 / 900, 0.5 / 900], True)
            adv_fwd(maps[:1], [LINEAR], [-1.0], [1.0 / 900], True)
            big = [torch.empty((16, 1, 30, 30), device="meta", dtype=dtype) for _ in range(2)]  # two stages
            adv_fwd(big, [1, 1], [1.0, 0.0], [0.5 / 14400, 0.5 / 14400], True)
            imgs = [torch.empty((1, 3, 256, 256), device="meta", dtype=dtype) for _ in range(4)]
            l1_fwd(imgs, imgs[::-1], [1e-4] * 4, False)
            l1_fwd(imgs, imgs[::-1], [1e-4] * 4, True)
            coef = torch.empty(4, device="meta", dtype=torch.float32)
            l1_bwd(imgs, imgs[::-1], coef)
        yield f"{str(dtype)[6:]} CycleGAN losses", run
