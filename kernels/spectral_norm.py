"""Triton kernels for spectral normalisation: the power iteration, sigma and ``W / sigma`` of
MANY weights at once (a whole model's spectral-normed layers in one launch per phase).

Every weight is read as a matrix M (H rows = the normalised dim, Wd columns = the rest,
flattened in order, as PyTorch's ``_reshape_weight_to_matrix``) through strides, so
contiguous, channels_last and ConvTranspose (dim=1) weights need no copy: a column index c is
split into (c // K, c % K) with strides (s_1, s_2) (see ``matrix_layout`` in
ganengine/ops/spectral_norm.py). Layers are described by one int64 table ``META`` (a row per
layer: pointers, sizes, strides, offsets into the flat work/output buffers) and every launch
runs over the blocks of all layers together (``BLK``: program -> (layer, block)); pointers are
read from the table (int64 -> pointer casts, as in Triton's grouped-GEMM tutorial).

The output (``W / sigma`` and dW, contiguous in the weight's shape) has its own split
(K_out, o_r, o_1, o_2), and so does each gradient (GT table: pointer, K, s_r, s_1, s_2).

A power iteration is a sequence of half steps, alternating:
  U step  t = M x   (x = the v side: the state v, or the previous s normalised)   row blocks
  V step  s = M^T y (y = the u side: the state u, or the previous t normalised)   column blocks
Each writes its raw result and one partial sum of squares per block; the next launch
normalises on the fly (``x / max(||x||, eps)``, F.normalize's rule) from the partials, summed
in a fixed order, so the result does not depend on the grouping and no atomics are used.
Block 0 of each layer also writes the (normalised) input vector of its step to the u/v outputs
(and, with WRITE_STATE, into the layer's state buffers: the in-place update of ``_u``/``_v``).

Sigma after a half step needs no extra pass over M: if the last step was V (v = s / m,
m = max(||s||, eps)), ``u . M v = (M^T u) . v = ||s||^2 / m``; symmetric for U. With no
iteration at all (eval) it is computed directly, ``sum_r u_r (M v)_r`` (row kernel, DIRECT).
The final launch (element blocks) writes ``W / sigma``, sigma and the last normalised vector.

Backward (``weight / sigma`` with sigma = u . M v, u and v constants, as PyTorch's graph):
  dW = g / sigma + (g_sigma - <g, W> / sigma^2) u v^T
in two launches over element blocks (partial <g, W> per block, then the apply).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

NMETA = 24
# META columns
_W, _UP, _VP, _H, _WD, _K, _SR, _S1, _S2, _OR, _O1, _O2 = range(12)
_OFF_U, _OFF_V, _OFF_W, _OFF_RB, _N_RB, _OFF_CB, _N_CB, _OFF_EB, _N_EB, _K_OUT = range(12, 22)

STEP, DIRECT = 0, 1          # row-kernel modes
LAST_U, LAST_V, LAST_DIRECT = 0, 1, 2

BLOCK_R, BLOCK_C = 16, 128     # U step tile (rows x columns)
VBLOCK_R, VBLOCK_C = 32, 64    # V step tile
BLOCK_E = 1024                 # element blocks (W / sigma, backward)
BLOCK_P = 128                  # partial sums read per iteration
APPLY_WARPS = 8                # backward apply: two int64 addresses per element spill at 4 warps


@triton.jit
def _sum_partials(P, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Sum of n partials in a fixed order (same bits for every program that asks)."""
    acc = tl.zeros([BLOCK], dtype=ACC)
    for i0 in range(0, n, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        acc += tl.load(P + offs, mask=offs < n, other=0.0).to(ACC)
    return tl.sum(acc, axis=0)


@triton.jit
def _maddr(r, c, K, s_r, s_1, s_2):
    """Address offset of matrix element (r, c): c is split into (c // K, c % K)."""
    return r.to(tl.int64) * s_r + (c // K).to(tl.int64) * s_1 + (c % K).to(tl.int64) * s_2


@triton.jit
def _layer_of(META, BLK, n_prog):
    """This program's (layer, its metadata row, block index): BLK holds the layer of every
    program, then its block within that layer."""
    pid = tl.program_id(0)
    layer = tl.load(BLK + pid)
    return layer, META + layer * 24, tl.load(BLK + n_prog + pid)


@triton.jit
def _matrix(m):
    """The layer's weight as a matrix: rows H, columns Wd (split as (Wd // K, K)), strides."""
    return tl.load(m + 3), tl.load(m + 4), tl.load(m + 5), tl.load(m + 6), tl.load(m + 7), tl.load(m + 8)


@triton.jit
def _norm_of(P, m, at: tl.constexpr, eps, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """max(||previous step's vector||, eps) from its partial sums of squares (metadata at, at+1)."""
    ssq = _sum_partials(P + tl.load(m + at), tl.load(m + at + 1), BLOCK_P, ACC)
    return tl.maximum(tl.sqrt(ssq), eps)


@triton.jit
def _publish(src_ptr, SRC, OUT, off, n, den, FIRST: tl.constexpr, WRITE_STATE: tl.constexpr,
             BLOCK: tl.constexpr):
    """Write this step's input vector (n entries) to OUT + off once it is final: the state vector
    itself on the first step, else the previous step's SRC + off normalised by den (and back into
    the state when WRITE_STATE)."""
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        mask = i < n
        if FIRST:
            tl.store(OUT + off + i, tl.load(src_ptr + i, mask=mask, other=0.0), mask=mask)
        else:
            x = (tl.load(SRC + off + i, mask=mask, other=0.0) / den).to(OUT.dtype.element_ty)
            tl.store(OUT + off + i, x, mask=mask)
            if WRITE_STATE:
                tl.store(src_ptr + i, x, mask=mask)


@triton.jit
def _row_kernel(META, BLK, n_prog, T, PT, S, PS, VOUT, eps,
                MODE: tl.constexpr, FIRST: tl.constexpr, WRITE_STATE: tl.constexpr, W_TY: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """U step (MODE=STEP): t = M x for BLOCK_R rows, partial ||t||^2; DIRECT: partial u . M v."""
    _, m, blk = _layer_of(META, BLK, n_prog)
    w_ptr = tl.load(m + 0).to(tl.pointer_type(W_TY))
    u_ptr = tl.load(m + 1).to(tl.pointer_type(W_TY))
    v_ptr = tl.load(m + 2).to(tl.pointer_type(W_TY))
    H, Wd, K, s_r, s_1, s_2 = _matrix(m)
    off_u = tl.load(m + 12)
    off_v = tl.load(m + 13)
    off_rb = tl.load(m + 15)
    den = 1.0
    if not FIRST:  # x = s / max(||s||, eps) from the previous V step
        den = _norm_of(PS, m, 17, eps, BLOCK_P, ACC)
    rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < H
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    for c0 in range(0, Wd, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < Wd
        if FIRST:
            x = tl.load(v_ptr + cols, mask=cmask, other=0.0).to(ACC)
        else:
            x = tl.load(S + off_v + cols, mask=cmask, other=0.0) / den
        addr = _maddr(rows[:, None], cols[None, :], K, s_r, s_1, s_2)
        wt = tl.load(w_ptr + addr, mask=rmask[:, None] & cmask[None, :], other=0.0).to(ACC)
        acc += wt * x[None, :]
    t = tl.sum(acc, axis=1)
    if MODE == 0:
        tl.store(T + off_u + rows, t, mask=rmask)
        tl.store(PT + off_rb + blk, tl.sum(t * t, axis=0))
        if blk == 0:  # this step's input vector is final for this step: publish it
            _publish(v_ptr, S, VOUT, off_v, Wd, den, FIRST, WRITE_STATE, BLOCK_C)
    else:
        u = tl.load(u_ptr + rows, mask=rmask, other=0.0).to(ACC)
        tl.store(PT + off_rb + blk, tl.sum(u * t, axis=0))


@triton.jit
def _col_kernel(META, BLK, n_prog, T, PT, S, PS, UOUT, eps,
                FIRST: tl.constexpr, WRITE_STATE: tl.constexpr, W_TY: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """V step: s = M^T y for BLOCK_C columns, partial ||s||^2."""
    _, m, blk = _layer_of(META, BLK, n_prog)
    w_ptr = tl.load(m + 0).to(tl.pointer_type(W_TY))
    u_ptr = tl.load(m + 1).to(tl.pointer_type(W_TY))
    H, Wd, K, s_r, s_1, s_2 = _matrix(m)
    off_u = tl.load(m + 12)
    off_v = tl.load(m + 13)
    off_cb = tl.load(m + 17)
    den = 1.0
    if not FIRST:  # y = t / max(||t||, eps) from the previous U step
        den = _norm_of(PT, m, 15, eps, BLOCK_P, ACC)
    cols = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < Wd
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    for r0 in range(0, H, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < H
        if FIRST:
            y = tl.load(u_ptr + rows, mask=rmask, other=0.0).to(ACC)
        else:
            y = tl.load(T + off_u + rows, mask=rmask, other=0.0) / den
        addr = _maddr(rows[:, None], cols[None, :], K, s_r, s_1, s_2)
        wt = tl.load(w_ptr + addr, mask=rmask[:, None] & cmask[None, :], other=0.0).to(ACC)
        acc += wt * y[:, None]
    s = tl.sum(acc, axis=0)
    tl.store(S + off_v + cols, s, mask=cmask)
    tl.store(PS + off_cb + blk, tl.sum(s * s, axis=0))
    if blk == 0:
        _publish(u_ptr, T, UOUT, off_u, H, den, FIRST, WRITE_STATE, BLOCK_R)


@triton.jit
def _final_kernel(META, BLK, n_prog, T, PT, S, PS, UOUT, VOUT, WOUT, SIGMA, eps,
                  LAST: tl.constexpr, WRITE_STATE: tl.constexpr, W_TY: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """sigma, W / sigma for BLOCK_E elements, and the last vector normalised (or copied)."""
    layer, m, blk = _layer_of(META, BLK, n_prog)
    w_ptr = tl.load(m + 0).to(tl.pointer_type(W_TY))
    u_ptr = tl.load(m + 1).to(tl.pointer_type(W_TY))
    v_ptr = tl.load(m + 2).to(tl.pointer_type(W_TY))
    H = tl.load(m + 3)
    Wd = tl.load(m + 4)
    K = tl.load(m + 5)
    off_u = tl.load(m + 12)
    off_v = tl.load(m + 13)
    den = 1.0
    if LAST == 2:    # DIRECT: sum of the partial u . M v
        sigma = _sum_partials(PT + tl.load(m + 15), tl.load(m + 16), BLOCK_P, ACC)
    elif LAST == 0:  # last step U: u = t / m, sigma = ||t||^2 / m
        ssq = _sum_partials(PT + tl.load(m + 15), tl.load(m + 16), BLOCK_P, ACC)
        den = tl.maximum(tl.sqrt(ssq), eps)
        sigma = ssq / den
    else:            # last step V: v = s / m, sigma = ||s||^2 / m
        ssq = _sum_partials(PS + tl.load(m + 17), tl.load(m + 18), BLOCK_P, ACC)
        den = tl.maximum(tl.sqrt(ssq), eps)
        sigma = ssq / den
    e = blk * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e < H * Wd
    r = e // Wd
    c = e % Wd
    w = tl.load(w_ptr + _maddr(r, c, K, tl.load(m + 6), tl.load(m + 7), tl.load(m + 8)), mask=emask,
                other=0.0).to(ACC)
    out = WOUT + tl.load(m + 14) + _maddr(r, c, tl.load(m + 21), tl.load(m + 9), tl.load(m + 10), tl.load(m + 11))
    tl.store(out, (w / sigma).to(WOUT.dtype.element_ty), mask=emask)
    if blk == 0:
        tl.store(SIGMA + layer, sigma)
    # element block b also handles entries [b * BLOCK_E, (b + 1) * BLOCK_E) of the vectors
    if LAST == 2:
        jm = e < H
        tl.store(UOUT + off_u + e, tl.load(u_ptr + e, mask=jm, other=0.0), mask=jm)
        jm = e < Wd
        tl.store(VOUT + off_v + e, tl.load(v_ptr + e, mask=jm, other=0.0), mask=jm)
    elif LAST == 0:
        jm = e < H
        y = (tl.load(T + off_u + e, mask=jm, other=0.0) / den).to(UOUT.dtype.element_ty)
        tl.store(UOUT + off_u + e, y, mask=jm)
        if WRITE_STATE:
            tl.store(u_ptr + e, y, mask=jm)
    else:
        jm = e < Wd
        x = (tl.load(S + off_v + e, mask=jm, other=0.0) / den).to(VOUT.dtype.element_ty)
        tl.store(VOUT + off_v + e, x, mask=jm)
        if WRITE_STATE:
            tl.store(v_ptr + e, x, mask=jm)


@triton.jit
def _bwd_dot_kernel(META, GT, BLK, n_prog, PE, W_TY: tl.constexpr, G_TY: tl.constexpr,
                    BLOCK_E: tl.constexpr, ACC: tl.constexpr):
    """Partial <g, W> per element block."""
    layer, m, blk = _layer_of(META, BLK, n_prog)
    gm = GT + layer * 5
    w_ptr = tl.load(m + 0).to(tl.pointer_type(W_TY))
    g_ptr = tl.load(gm + 0).to(tl.pointer_type(G_TY))
    H = tl.load(m + 3)
    Wd = tl.load(m + 4)
    K = tl.load(m + 5)
    e = blk * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e < H * Wd
    r = e // Wd
    c = e % Wd
    w = tl.load(w_ptr + _maddr(r, c, K, tl.load(m + 6), tl.load(m + 7), tl.load(m + 8)), mask=emask,
                other=0.0).to(ACC)
    g = tl.load(g_ptr + _maddr(r, c, tl.load(gm + 1), tl.load(gm + 2), tl.load(gm + 3), tl.load(gm + 4)),
                mask=emask, other=0.0).to(ACC)
    tl.store(PE + tl.load(m + 19) + blk, tl.sum(g * w, axis=0))


@triton.jit
def _bwd_apply_kernel(META, GT, BLK, n_prog, PE, GSIG, SIGMA, UOUT, VOUT, DW,
                      W_TY: tl.constexpr, G_TY: tl.constexpr, HAS_GSIG: tl.constexpr, BLOCK_E: tl.constexpr,
                      BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """dW = g / sigma + (g_sigma - <g, W> / sigma^2) u v^T for BLOCK_E elements."""
    layer, m, blk = _layer_of(META, BLK, n_prog)
    gm = GT + layer * 5
    g_ptr = tl.load(gm + 0).to(tl.pointer_type(G_TY))
    H = tl.load(m + 3)
    Wd = tl.load(m + 4)
    gw = _sum_partials(PE + tl.load(m + 19), tl.load(m + 20), BLOCK_P, ACC)
    sigma = tl.load(SIGMA + layer).to(ACC)
    coef = -gw / (sigma * sigma)
    if HAS_GSIG:
        coef += tl.load(GSIG + layer).to(ACC)
    e = blk * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e < H * Wd
    r = e // Wd
    c = e % Wd
    g = tl.load(g_ptr + _maddr(r, c, tl.load(gm + 1), tl.load(gm + 2), tl.load(gm + 3), tl.load(gm + 4)),
                mask=emask, other=0.0).to(ACC)
    u = tl.load(UOUT + tl.load(m + 12) + r, mask=emask, other=0.0).to(ACC)
    v = tl.load(VOUT + tl.load(m + 13) + c, mask=emask, other=0.0).to(ACC)
    dw = g / sigma + coef * u * v
    out = DW + tl.load(m + 14) + _maddr(r, c, tl.load(m + 21), tl.load(m + 9), tl.load(m + 10), tl.load(m + 11))
    tl.store(out, dw.to(DW.dtype.element_ty), mask=emask)


# ----------------------------------------------------------------------------- launchers
_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cdiv(a, b):
    return (a + b - 1) // b


class Layout:
    """Device tables for a list of layers: META, the block tables, flat-buffer sizes."""

    def __init__(self, layouts, ptrs, device):
        # layouts: per layer (H, Wd, K, s_r, s_1, s_2, K_out, o_r, o_1, o_2); ptrs: (w, u, v) addresses
        meta, rb, cb, eb = [], ([], []), ([], []), ([], [])
        off_u = off_v = off_w = off_rb = off_cb = off_eb = 0
        self.offsets = []
        for i, ((h, wd, k, sr, s1, s2, k_out, o_r, o1, o2), (wp, up, vp)) in enumerate(zip(layouts, ptrs)):
            n_rb, n_cb, n_eb = _cdiv(h, BLOCK_R), _cdiv(wd, VBLOCK_C), _cdiv(h * wd, BLOCK_E)
            row = [wp, up, vp, h, wd, k, sr, s1, s2, o_r, o1, o2, off_u, off_v, off_w, off_rb, n_rb, off_cb, n_cb,
                   off_eb, n_eb, k_out]
            meta.append(row + [0] * (NMETA - len(row)))
            for table, n in ((rb, n_rb), (cb, n_cb), (eb, n_eb)):
                table[0].extend([i] * n)
                table[1].extend(range(n))
            self.offsets.append((off_u, off_v, off_w, h, wd, h * wd))
            off_u, off_v, off_w = off_u + h, off_v + wd, off_w + h * wd
            off_rb, off_cb, off_eb = off_rb + n_rb, off_cb + n_cb, off_eb + n_eb
        self.sum_u, self.sum_v, self.sum_w = off_u, off_v, off_w
        self.n_rb, self.n_cb, self.n_eb = off_rb, off_cb, off_eb
        # the forward's workspace and sigma in one allocation: T, S, PT, PS (at least 1 element
        # each), then sigma[L]
        self.ws_parts = [max(off_u, 1), max(off_v, 1), max(off_rb, 1), max(off_cb, 1), len(self.offsets)]
        self.ws_size = sum(self.ws_parts)
        self.meta = torch.tensor(meta, dtype=torch.int64).to(device)
        # (layer ids, block ids) per launch kind, as [2 * n] int32
        self.rb = torch.tensor(rb[0] + rb[1], dtype=torch.int32).to(device)
        self.cb = torch.tensor(cb[0] + cb[1], dtype=torch.int32).to(device)
        self.eb = torch.tensor(eb[0] + eb[1], dtype=torch.int32).to(device)


def forward(layout: Layout, dtype, device, first: int, steps: int, eps: float, write_state: bool, w_shape=None):
    """Runs the power iteration and W / sigma for every layer of ``layout``.

    Returns flat (wout, uout, vout, sigma[acc]); ``first`` 0 = U step first, 1 = V step first.
    ``w_shape``: one layer's weight shape, wout's shape then (saves a view).
    """
    acc = _acc(dtype)
    ws = torch.empty(layout.ws_size, dtype=acc, device=device)
    T, S, PT, PS, sigma = ws.split_with_sizes(layout.ws_parts)  # one call for the five views
    uout = torch.empty(layout.sum_u, dtype=dtype, device=device)
    vout = torch.empty(layout.sum_v, dtype=dtype, device=device)
    wout = torch.empty(w_shape if w_shape is not None else layout.sum_w, dtype=dtype, device=device)
    ty, acc_ty = _TL[dtype], _TL[acc]
    with _launch.device_guard(ws):
        _forward_launches(layout, steps, first, eps, write_state, T, S, PT, PS, uout, vout, wout, sigma, ty, acc_ty)
    return wout, uout, vout, sigma


def _forward_launches(layout, steps, first, eps, write_state, T, S, PT, PS, uout, vout, wout, sigma, ty, acc_ty):
    side = first
    for k in range(steps):
        if side == 0:
            _row_kernel[(layout.n_rb,)](layout.meta, layout.rb, layout.n_rb, T, PT, S, PS, vout, eps,
                                        MODE=STEP, FIRST=k == 0, WRITE_STATE=write_state, W_TY=ty,
                                        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, ACC=acc_ty)
        else:
            _col_kernel[(layout.n_cb,)](layout.meta, layout.cb, layout.n_cb, T, PT, S, PS, uout, eps,
                                        FIRST=k == 0, WRITE_STATE=write_state, W_TY=ty,
                                        BLOCK_R=VBLOCK_R, BLOCK_C=VBLOCK_C, BLOCK_P=BLOCK_P, ACC=acc_ty)
        side ^= 1
    if steps == 0:
        _row_kernel[(layout.n_rb,)](layout.meta, layout.rb, layout.n_rb, T, PT, S, PS, vout, eps,
                                    MODE=DIRECT, FIRST=True, WRITE_STATE=False, W_TY=ty,
                                    BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, ACC=acc_ty)
        last = LAST_DIRECT
    else:
        last = LAST_U if (side ^ 1) == 0 else LAST_V
    _final_kernel[(layout.n_eb,)](layout.meta, layout.eb, layout.n_eb, T, PT, S, PS, uout, vout, wout, sigma, eps,
                                  LAST=last, WRITE_STATE=write_state and steps > 0, W_TY=ty,
                                  BLOCK_E=BLOCK_E, BLOCK_P=BLOCK_P, ACC=acc_ty)


_GRAD_TABLES: dict = {}
_GRAD_TABLES_MAX = 64


def _grad_table(rows: tuple, device) -> torch.Tensor:
    """The backward's per-layer (grad address, K, s_r, s_1, s_2) table on ``device``, cached on its
    contents: in training the caching allocator hands the gradients the same addresses step after
    step, and a new table is a host-to-device copy from pageable memory (which waits for the copy)
    on every backward. A table is only ever read by the kernels, so a cached one stays valid."""
    key = (rows, device)
    table = _GRAD_TABLES.get(key)
    if table is None:
        if len(_GRAD_TABLES) >= _GRAD_TABLES_MAX:
            _GRAD_TABLES.pop(next(iter(_GRAD_TABLES)))
        table = _GRAD_TABLES[key] = torch.tensor(rows, dtype=torch.int64).to(device)
    return table


def backward(layout: Layout, grads, grad_layouts, gsig, sigma, uout, vout, dtype, w_shape=None):
    # gsig: [L] gradients of the sigmas (accumulation dtype), or None when no sigma had one
    """dW for every layer, flat (weight dtype), or of ``w_shape`` (one layer's weight shape).
    ``grad_layouts``: (K, s_r, s_1, s_2) per grad."""
    device = uout.device
    acc = _acc(dtype)
    gdtype = grads[0].dtype
    gt = _grad_table(tuple((g.data_ptr(), *gl) for g, gl in zip(grads, grad_layouts)), device)
    pe = torch.empty(max(layout.n_eb, 1), dtype=acc, device=device)
    dw = torch.empty(w_shape if w_shape is not None else layout.sum_w, dtype=dtype, device=device)
    common = dict(W_TY=_TL[dtype], G_TY=_TL[gdtype], BLOCK_E=BLOCK_E, ACC=_TL[acc])
    with _launch.device_guard(dw):
        _bwd_dot_kernel[(layout.n_eb,)](layout.meta, gt, layout.eb, layout.n_eb, pe, **common)
        _bwd_apply_kernel[(layout.n_eb,)](layout.meta, gt, layout.eb, layout.n_eb, pe,
                                          gsig if gsig is not None else sigma, sigma, uout, vout, dw,
                                          HAS_GSIG=gsig is not None, BLOCK_P=BLOCK_P, num_warps=APPLY_WARPS,
                                          **common)
    return dw


# ----------------------------------------------------------------------------- AOT specs
def _aot_specs():
    specs = []
    for dt, ty in (("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16)):
        pty = {tl.float32: "*fp32", tl.bfloat16: "*bf16", tl.float16: "*fp16"}[ty]
        base = {"META": "*i64", "BLK": "*i32", "n_prog": "i32", "T": "*fp32", "PT": "*fp32", "S": "*fp32",
                "PS": "*fp32", "eps": "fp32"}
        for first in (True, False):
            specs.append(dict(kernel=_row_kernel, config=f"{dt},U step,FIRST={first}",
                              signature={**base, "VOUT": pty},
                              constexprs=dict(MODE=STEP, FIRST=first, WRITE_STATE=True, W_TY=ty, BLOCK_R=BLOCK_R,
                                              BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, ACC=tl.float32), num_warps=4))
            specs.append(dict(kernel=_col_kernel, config=f"{dt},V step,FIRST={first}",
                              signature={**base, "UOUT": pty},
                              constexprs=dict(FIRST=first, WRITE_STATE=True, W_TY=ty, BLOCK_R=VBLOCK_R,
                                              BLOCK_C=VBLOCK_C, BLOCK_P=BLOCK_P, ACC=tl.float32), num_warps=4))
        specs.append(dict(kernel=_row_kernel, config=f"{dt},direct sigma", signature={**base, "VOUT": pty},
                          constexprs=dict(MODE=DIRECT, FIRST=True, WRITE_STATE=False, W_TY=ty, BLOCK_R=BLOCK_R,
                                          BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, ACC=tl.float32), num_warps=4))
        for last in (LAST_U, LAST_V, LAST_DIRECT):
            specs.append(dict(kernel=_final_kernel, config=f"{dt},final,LAST={last}",
                              signature={**base, "UOUT": pty, "VOUT": pty, "WOUT": pty, "SIGMA": "*fp32"},
                              constexprs=dict(LAST=last, WRITE_STATE=last != LAST_DIRECT, W_TY=ty, BLOCK_E=BLOCK_E,
                                              BLOCK_P=BLOCK_P, ACC=tl.float32), num_warps=4))
        bsig = {"META": "*i64", "GT": "*i64", "BLK": "*i32", "n_prog": "i32", "PE": "*fp32"}
        specs.append(dict(kernel=_bwd_dot_kernel, config=f"{dt},backward dot", signature=bsig,
                          constexprs=dict(W_TY=ty, G_TY=ty, BLOCK_E=BLOCK_E, ACC=tl.float32), num_warps=4))
        for has_gsig in (False, True):
            specs.append(dict(kernel=_bwd_apply_kernel, config=f"{dt},backward apply,HAS_GSIG={has_gsig}",
                              signature={**bsig, "GSIG": "*fp32", "SIGMA": "*fp32", "UOUT": pty, "VOUT": pty,
                                         "DW": pty},
                              constexprs=dict(W_TY=ty, G_TY=ty, HAS_GSIG=has_gsig, BLOCK_E=BLOCK_E, BLOCK_P=BLOCK_P,
                                              ACC=tl.float32), num_warps=APPLY_WARPS))
    return specs


AOT_SPECS = _aot_specs()

# weight shapes of whole spectral-normed models (SAGAN 64x64 D, BigGAN-128 G's first blocks and a
# transposed conv's dim=1), grouped as SpectralNormGroup launches them
AOT_MODELS = {
    "SAGAN D": [((64, 3, 4, 4), 0), ((128, 64, 4, 4), 0), ((256, 128, 4, 4), 0), ((512, 256, 4, 4), 0),
                ((1, 512, 4, 4), 0)],
    "BigGAN G": [((24576, 148), 0), ((1536, 1536, 3, 3), 0), ((1536, 1536, 1, 1), 0), ((192, 1536, 1, 1), 0),
                 ((1, 128), 0)],
    "convT dim=1": [((64, 32, 4, 4), 1)],
}


def aot_cases():
    """(label, thunk) pairs: each thunk runs forward (train: steps 1, U first; eval: direct sigma)
    and backward on meta tensors of one model's layers; the AOT report records and compiles."""
    from ganengine.ops.spectral_norm import _contig_strides, matrix_layout

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, layers in AOT_MODELS.items():
            def run(layers=layers, dtype=dtype):
                dev = torch.device("meta")
                layouts, ptrs, grads, gl = [], [], [], []
                for shape, d in layers:
                    h, wd, k, sr, s1, s2 = matrix_layout(shape, _contig_strides(shape), d)
                    layouts.append((h, wd, k, sr, s1, s2, k, sr, s1, s2))
                    ptrs.append((0, 0, 0))
                    grads.append(torch.empty(shape, device=dev, dtype=dtype))
                    gl.append((k, sr, s1, s2))
                layout = Layout(layouts, ptrs, dev)
                for first, steps, write in ((0, 1, True), (1, 1, True), (0, 0, False)):
                    _, uout, vout, sigma = forward(layout, dtype, dev, first, steps, 1e-12, write)
                for gsig in (None, sigma):
                    backward(layout, grads, gl, gsig, sigma, uout, vout, dtype)
            yield f"{str(dtype)[6:]} {name}", run
