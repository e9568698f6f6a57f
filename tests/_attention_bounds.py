"""Error bounds of SAGAN self-attention (ganengine.ops.attention), elementwise, in fp64.

Core (q (B,d,N), k (B,d,M), v (B,C,M), x (B,C,N)): S = q^T k, P = softmax_rows(S),
O = v P^T, out = gamma O + x. Each product is a reduction: its own rounding is gamma_n times
the same product on absolute values (n = d, M, N or C), plus the errors of its factors carried
through with absolute values. Softmax: a perturbation dS changes P by P (dS - sum_k P_k dS_k),
so |dP| <= P (E_S + sum_k P_k E_S_k) + P gamma_{2M+8}: the normaliser's sum of M terms, up
to M rescalings of the online (flash) softmax, exp and the division a few ulps each (c = 1,
n = 2M + 8). Backward: dv = dO P, dP = dO^T v, D = rowsum(dO o O) (the kernels' form; the same
as sum_j P dP in exact arithmetic, both forms are bounded), dS = P o (dP - D), dq = k dS^T,
dk = q dS, dgamma = sum(go O), dO = gamma go. The block adds the three 1x1 convolutions in
front (q = Wq x + bq, ...) and their backward, dx = go + Wq^T dq + Wk^T dk + Wv^T dv.
``store_dtype``: a format the intermediates (q, k, v, the core's outputs and the conv inputs'
gradients) may be rounded to between the steps (fp16 runs): u |t| each.
"""
from __future__ import annotations

import torch

from tests._tolerance import gamma as g_, unit_roundoff


def _bmm(a, b):
    return torch.bmm(a, b)


def core_bounds(q, k, v, x, gamma, go, acc=torch.float32, e_q=None, e_k=None, e_v=None, store_dtype=None,
                u_gamma=0.0, product_u=0.0):
    """dict of fp64 bounds: out, attn, q, k, v (their gradients), gamma (its gradient); plus the
    fp64 intermediates the block needs ("_dq", "_dk", "_dv", "out_ref"). ``u_gamma``: a relative
    error in gamma itself (its rounding to the input format); ``product_u``: the products' inputs
    rounded to a narrower format first (TF32 on a GPU: 2^-11), 2 product_u per product."""
    pu = 2 * product_u
    q, k, v, x = (t.detach().double() for t in (q, k, v, x))
    go = None if go is None else go.detach().double()
    gm = gamma.detach().double().reshape(())
    B, d, N = q.shape
    M, C = k.shape[2], v.shape[1]
    u = unit_roundoff(acc)
    us = 0.0 if store_dtype is None else unit_roundoff(store_dtype)
    z = torch.zeros_like
    e_q = z(q) if e_q is None else e_q
    e_k = z(k) if e_k is None else e_k
    e_v = z(v) if e_v is None else e_v
    qa, ka, va = q.abs(), k.abs(), v.abs()
    S = _bmm(q.transpose(1, 2), k)
    E_S = (g_(d, acc) + pu) * _bmm(qa.transpose(1, 2), ka) + _bmm(e_q.transpose(1, 2), ka) + _bmm(qa.transpose(1, 2), e_k)
    P = torch.softmax(S, -1)
    E_P = P * (E_S + (P * E_S).sum(-1, keepdim=True) + g_(2 * M + 8, acc))
    O = _bmm(v, P.transpose(1, 2))
    E_O = ((g_(2 * M + 8, acc) + pu) * _bmm(va, P.transpose(1, 2)) + _bmm(e_v, P.transpose(1, 2))
           + _bmm(va, E_P.transpose(1, 2)))
    out = gm * O + x
    E_out = gm.abs() * E_O + 2 * u * ((gm * O).abs() + out.abs()) + us * out.abs()
    res = {"out": E_out, "attn": E_P + us * P, "out_ref": out}
    if go is None:
        return res
    dO = gm * go
    goa, dOa = go.abs(), dO.abs()
    E_dO = (u + u_gamma) * dOa
    res["gamma"] = (g_(B * C * N, acc) * (goa * O.abs()).sum() + (goa * E_O).sum()).reshape(gamma.shape)
    dv = _bmm(dO, P)
    E_dv = (g_(N + 2, acc) + pu) * _bmm(dOa, P) + _bmm(dOa, E_P) + _bmm(E_dO, P)
    dP = _bmm(dO.transpose(1, 2), v)  # (B, N, M)
    E_dP = ((g_(C, acc) + pu) * _bmm(dOa.transpose(1, 2), va) + _bmm(dOa.transpose(1, 2), e_v)
            + _bmm(E_dO.transpose(1, 2), va))
    D = (dO * O).sum(1).unsqueeze(-1)  # (B, N, 1)
    E_D = ((g_(C, acc) + pu) * (dOa * O.abs()).sum(1) + (dOa * E_O).sum(1) + (E_dO * O.abs()).sum(1)).unsqueeze(-1)
    E_D = E_D + (E_P * dP.abs() + P * E_dP).sum(-1, keepdim=True) + g_(M, acc) * (P * dP.abs()).sum(-1, keepdim=True)
    dS = P * (dP - D)
    E_dS = E_P * (dP.abs() + D.abs()) + P * (E_dP + E_D) + g_(4, acc) * P * (dP.abs() + D.abs())
    dSa = dS.abs()
    dq = _bmm(k, dS.transpose(1, 2))
    E_dq = (g_(M + 2, acc) + pu) * _bmm(ka, dSa.transpose(1, 2)) + _bmm(e_k, dSa.transpose(1, 2)) + _bmm(ka, E_dS.transpose(1, 2))
    dk = _bmm(q, dS)
    E_dk = (g_(N + 2, acc) + pu) * _bmm(qa, dSa) + _bmm(e_q, dSa) + _bmm(qa, E_dS)
    res.update(q=E_dq + us * dq.abs(), k=E_dk + us * dk.abs(), v=E_dv + us * dv.abs(), _dq=dq, _dk=dk, _dv=dv)
    return res


def self_attention_bounds(x, qw, qb, kw, kb, vw, vb, gamma, go, acc=torch.float32, store_dtype=None,
                          input_dtype=None, product_u=0.0):
    """Bounds of out and of the gradients of (x, qw, qb, kw, kb, vw, vb, gamma), in that order
    (a list; out first), for ganengine.functional.self_attention2d and upstream ``go``.
    ``input_dtype``: the inputs are that format's rounding of the values given (the reference
    ran on the unrounded ones): u(input) relative errors in x, the weights and gamma."""
    B, C, H, W = x.shape
    N = H * W
    x2 = x.detach().double().flatten(2)
    xa = x2.abs()
    us = 0.0 if store_dtype is None else unit_roundoff(store_dtype)
    ui = 0.0 if input_dtype is None else unit_roundoff(input_dtype)
    ui = ui + product_u  # (TF32 products: like inputs rounded to 2^-11, for the 1x1 convs too)
    proj, errs, wts = [], [], []
    for w, b in ((qw, qb), (kw, kb), (vw, vb)):
        w2, b2 = w.detach().double().flatten(1), b.detach().double()
        t = torch.einsum("oc,bcn->bon", w2, x2) + b2[None, :, None]
        ta = torch.einsum("oc,bcn->bon", w2.abs(), xa) + b2.abs()[None, :, None]
        proj.append(t)
        errs.append((g_(C + 1, acc) + 2 * ui) * ta + us * t.abs())
        wts.append(w2)
    go2 = None if go is None else go.detach().double().flatten(2)
    core = core_bounds(*proj, x2, gamma, go2, acc, *errs, store_dtype=store_dtype, u_gamma=ui, product_u=product_u)
    o_abs = (core["out_ref"] - x2).abs()  # |gamma O|
    out = [(core["out"] + ui * (xa + o_abs)).view(x.shape)]
    if go is None:
        return out
    dx = go2.abs()
    e_dx = 0.0
    grads = []
    for (w2, name), t_err in zip(zip(wts, "qkv"), errs):
        dt, e_dt = core["_d" + name], core[name]
        dta = dt.abs()
        e_dw = (g_(B * N, acc) + ui) * torch.einsum("bon,bcn->oc", dta, xa) + torch.einsum("bon,bcn->oc", e_dt, xa)
        e_db = g_(B * N, acc) * dta.sum((0, 2)) + e_dt.sum((0, 2))
        grads += [e_dw.view(-1, C, 1, 1), e_db]
        dx = dx + torch.einsum("oc,bon->bcn", w2.abs(), dta)
        e_dx = e_dx + torch.einsum("oc,bon->bcn", w2.abs(), e_dt)
    e_dx = (g_(2 * proj[0].shape[1] + C + 3, acc) + ui) * dx + e_dx + us * dx
    return out + [e_dx.view(x.shape)] + grads + [core["gamma"].reshape(gamma.shape)]
