"""Tolerances derived from error bounds, not from one machine's observed error.

A backend's result differs from the fp64 reference by its rounding errors, which depend on the
summation order and the instruction set (AVX2 and AVX-512 builds, oneDNN versions, GPU vs CPU
reductions all sum in different orders). What does not depend on the order is the classical
bound (Higham, Accuracy and Stability of Numerical Algorithms, ch. 3): a sum or dot product of
length n computed in a precision with unit roundoff u, in any order, satisfies

    |fl(s) - s| <= gamma_n * sum|terms|,        gamma_n = n u / (1 - n u),

and storing the result in a format with unit roundoff u_out adds u_out * |s|. So a test states:
the reduction length n, the precision the backend accumulates in, the scale sum|terms| (the same
computation on absolute values, in fp64: elementwise, or its maximum for a normwise bound) and
a constant c for what the formula does beyond one plain reduction (Winograd transforms, a
two-pass variance, an exp...), with a comment saying where c comes from. Then

    assert_within_bound(actual, ref64, scale, n=..., acc_dtype=..., c=...)

holds on every x86 machine; a wrong index or a dropped term still fails it by orders of
magnitude, because it gives errors of the size of the values themselves.

Scales of the ops (fp64, from the tests' own inputs): tests/_conv_bounds.py (direct and Winograd
convolutions, forward and both gradients), tests/_norm_bounds.py (instance/batch norm +
activation), tests/_attention_bounds.py (SAGAN attention), tests/_chain_bounds.py (a block of
layers, errors carried elementwise); whole networks: tests/_model_bounds.py (normwise, with
Higham & Mary's probabilistic gamma_prob, since worst-case bounds compound over depth).
``assert_below`` takes a bound assembled by those helpers.
"""
from __future__ import annotations

import torch

_UNIT_ROUNDOFF = {
    torch.float64: 2.0 ** -53,
    torch.float32: 2.0 ** -24,
    torch.float16: 2.0 ** -11,
    torch.bfloat16: 2.0 ** -8,
}
# smallest normal numbers: results below them lose relative precision (flushed or subnormal)
_TINY = {torch.float64: 2.2250738585072014e-308, torch.float32: 1.1754943508222875e-38,
         torch.float16: 6.103515625e-05, torch.bfloat16: 1.1754943508222875e-38}


def unit_roundoff(dtype: torch.dtype) -> float:
    return _UNIT_ROUNDOFF[dtype]


def gamma(n: int, dtype: torch.dtype) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of a length-n reduction in ``dtype``."""
    nu = max(int(n), 1) * unit_roundoff(dtype)
    if nu >= 0.5:
        raise ValueError(f"gamma({n}, {dtype}): n*u = {nu:.3g} is too large for the bound to mean anything")
    return nu / (1.0 - nu)


def gamma_prob(n: int, dtype: torch.dtype, lam: float = 8.0) -> float:
    """Higham & Mary's probabilistic gamma (SIAM J. Sci. Comput. 41(5), 2019, Thm 2.4): with
    rounding errors modelled as independent mean-zero random variables, a length-n reduction's
    relative error is at most exp(lam sqrt(n) u + n u^2 / (1 - u)) - 1 ~ lam sqrt(n) u, except
    with probability <= 2 n exp(-lam^2 (1 - u)^2 / 2) (lam = 8: < 3e-14 n). Used for whole
    networks (tests/_model_bounds.py), where the worst-case n u compounds over many layers."""
    import math

    u = unit_roundoff(dtype)
    return math.expm1(lam * math.sqrt(max(int(n), 1)) * u + n * u * u / (1 - u))


def bound(scale, n: int, acc_dtype: torch.dtype, c: float = 1.0, out_dtype: torch.dtype | None = None,
          ref: torch.Tensor | None = None, out_round: float = 1.0):
    """The allowed |actual - ref|: ``c * gamma_n(acc) * scale + out_round * u(out) * |ref|``
    (+ the out format's smallest normal, for results that underflow). ``out_round`` = 2 where
    the final conversion truncates instead of rounding to nearest (tests/_backends.out_round)."""
    out_dtype = out_dtype or acc_dtype
    allowed = c * gamma(n, acc_dtype) * scale
    if ref is not None:
        allowed = allowed + out_round * unit_roundoff(out_dtype) * ref.abs()
    return allowed + _TINY[out_dtype]


def assert_within_bound(actual: torch.Tensor, ref: torch.Tensor, scale, n: int, acc_dtype: torch.dtype,
                        c: float = 1.0, out_dtype: torch.dtype | None = None, name: str = "",
                        out_round: float = 1.0) -> float:
    """Assert |actual - ref| <= bound elementwise; returns the largest error / bound ratio.

    ``ref`` is the fp64 reference computed from the same (already rounded) inputs; ``scale``
    is sum|terms| (a tensor broadcastable to ref, or a number for a normwise bound).
    ``out_dtype`` defaults to ``actual``'s dtype.
    """
    out_dtype = out_dtype or actual.dtype
    ref = ref.double()
    if isinstance(scale, torch.Tensor):
        scale = scale.double()
    err = (actual.double() - ref).abs()
    allowed = bound(scale, n, acc_dtype, c, out_dtype, ref, out_round)
    if err.numel() == 0:
        return 0.0
    ratio = (err / allowed).max().item()
    assert torch.isfinite(err).all() or torch.equal(torch.isfinite(actual), torch.isfinite(ref)), \
        f"{name}: non-finite values where the reference is finite"
    assert ratio <= 1.0, (
        f"{name}: error {err.max().item():.3g} exceeds the bound c*gamma_n*scale + u*|ref| "
        f"(n={n}, acc={acc_dtype}, c={c}) by {ratio:.3g}x")
    return ratio


def assert_below(actual: torch.Tensor, ref: torch.Tensor, allowed, out_dtype: torch.dtype | None = None,
                 name: str = "", out_round: float = 1.0) -> float:
    """Assert |actual - ref| <= allowed + u(out) |ref| (+ the smallest normal) elementwise, for
    bounds assembled from several terms (an op's own rounding plus the errors it inherits, e.g.
    a convolution's error carried through an instance norm); returns the largest ratio."""
    out_dtype = out_dtype or actual.dtype
    ref = ref.double()
    err = (actual.double() - ref).abs()
    if err.numel() == 0:
        return 0.0
    if isinstance(allowed, torch.Tensor):
        allowed = allowed.double()
    allowed = allowed + out_round * unit_roundoff(out_dtype) * ref.abs() + _TINY[out_dtype]
    assert torch.equal(torch.isfinite(actual), torch.isfinite(ref)), f"{name}: non-finite values differ from the reference"
    fin = torch.isfinite(ref)
    ratio = (err / allowed)[fin].max().item() if fin.any() else 0.0
    assert ratio <= 1.0, f"{name}: error {err[fin].max().item():.3g} exceeds its bound by {ratio:.3g}x"
    return ratio


def normwise_scale(*abs_terms: torch.Tensor) -> float:
    """max of an absolute-value computation: the scale of a normwise bound."""
    return max(float(t.double().abs().max()) if t.numel() else 0.0 for t in abs_terms)
