"""Winograd F(m, r) transform matrices (Toom-Cook), exactly, and their fp32 error.

    python -m ganengine.tools.winograd_matrices            # the C++ structs + fp32 errors
    python -m ganengine.tools.winograd_matrices --check    # verify csrc/cpu/winograd_engine.h

F(m, r) computes m outputs of an r-tap correlation from n = m + r - 1 inputs with n multiplies:
y = AT [(G g) * (BT d)]. With the finite points p_0..p_{n-2} plus infinity:
AT[i][j] = p_j^i (the infinity column is e_{m-1}), G[j][k] = p_j^k / prod_{l != j}(p_j - p_l)
(infinity row e_{r-1}), and BT is solved for exactly (rational arithmetic) from the identity
sum_j AT[i][j] G[j][k] BT[j][l] = [l == i + k]. The 2-D transform nests the 1-D one.
``--check`` parses every ``Wino<M, R>`` struct in the header and verifies that identity exactly,
so a typo in a coefficient fails CI (tests/test_conv4x4.py runs it).
"""
from __future__ import annotations

import argparse
import re
from fractions import Fraction
from pathlib import Path

HEADER = Path(__file__).resolve().parents[2] / "csrc" / "cpu" / "winograd_engine.h"

# (m, r, finite points) the engine builds; F(2, 3) and F(4, 3) keep Lavin & Gray's published
# matrices (other signs, same points)
CHOICES = [(2, 2, [0, 1]), (3, 2, [0, 1, -1]), (4, 2, [0, 1, -1, 2]), (2, 4, [0, 1, -1, -2]),
           (3, 4, [0, 1, -1, Fraction(1, 2), Fraction(-1, 2)]), (2, 3, [0, 1, -1]), (4, 3, [0, 1, -1, 2, -2])]


def _solve(E, rhs):
    """The exact solution of the consistent overdetermined system E x = rhs (normal equations)."""
    n = len(E[0])
    A = [[sum(row[i] * row[j] for row in E) for j in range(n)] + [sum(row[i] * b for row, b in zip(E, rhs))]
         for i in range(n)]
    for c in range(n):
        p = next(r for r in range(c, n) if A[r][c] != 0)
        A[c], A[p] = A[p], A[c]
        for r in range(n):
            if r != c and A[r][c] != 0:
                f = A[r][c] / A[c][c]
                A[r] = [a - f * b for a, b in zip(A[r], A[c])]
    x = [A[i][n] / A[i][i] for i in range(n)]
    if any(sum(e * v for e, v in zip(row, x)) != b for row, b in zip(E, rhs)):
        raise ValueError("inconsistent system: the points do not give a Winograd transform")
    return x


def toom_cook(m: int, r: int, points) -> tuple[list, list, list]:
    """(AT (m x n), G (n x r), BT (n x n)) as Fractions for F(m, r) at ``points`` + infinity."""
    pts = [Fraction(p) for p in points]
    n = m + r - 1
    if len(pts) != n - 1 or len(set(pts)) != len(pts):
        raise ValueError(f"F({m}, {r}) needs {n - 1} distinct finite points, got {points}")
    AT = [[p ** i for p in pts] + [Fraction(int(i == m - 1))] for i in range(m)]
    G = []
    for j, p in enumerate(pts):
        f = Fraction(1)
        for q in pts[:j] + pts[j + 1:]:
            f *= p - q
        G.append([p ** k / f for k in range(r)])
    G.append([Fraction(int(k == r - 1)) for k in range(r)])
    E = [[AT[i][j] * G[j][k] for j in range(n)] for i in range(m) for k in range(r)]
    cols = [_solve(E, [Fraction(int(l == i + k)) for i in range(m) for k in range(r)]) for l in range(n)]
    BT = [[cols[l][j] for l in range(n)] for j in range(n)]
    return AT, G, BT


def identity_holds(AT, G, BT, m: int, r: int) -> bool:
    """Exactly: sum_j AT[i][j] G[j][k] BT[j][l] == [l == i + k] for all i < m, k < r, l < n."""
    n = m + r - 1
    return all(sum(Fraction(AT[i][j]) * Fraction(G[j][k]) * Fraction(BT[j][l]) for j in range(n)) == (l == i + k)
               for i in range(m) for k in range(r) for l in range(n))


def fp32_error(AT, G, BT, m: int, r: int, channels: int = 256, tiles: int = 200, seed: int = 0) -> tuple[float, float]:
    """Max error of the 2-D transform in fp32 and of the direct fp32 correlation, both against an
    fp64 reference, relative to the output's max (random normal data, `channels` summed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    at, g_, bt = (np.array([[float(v) for v in row] for row in X], dtype=np.float32) for X in (AT, G, BT))
    a = m + r - 1
    d = rng.standard_normal((tiles, channels, a, a)).astype(np.float32)
    g = (rng.standard_normal((8, channels, r, r)) * 0.05).astype(np.float32)
    V = np.einsum("ij,tcjk,lk->tcil", bt, d, bt).astype(np.float32)
    U = np.einsum("ij,kcjl,ml->kcim", g_, g, g_).astype(np.float32)
    M = np.einsum("kcij,tcij->tkij", U, V).astype(np.float32)
    y = np.einsum("ij,tkjl,ml->tkim", at, M, at)
    ref, direct = np.zeros((tiles, 8, m, m)), np.zeros((tiles, 8, m, m), np.float32)
    for i in range(m):
        for j in range(m):
            ref[:, :, i, j] = np.einsum("tcuv,kcuv->tk", d[:, :, i:i + r, j:j + r].astype(np.float64), g.astype(np.float64))
            direct[:, :, i, j] = np.einsum("tcuv,kcuv->tk", d[:, :, i:i + r, j:j + r], g)
    scale = np.abs(ref).max()
    return float(np.abs(y - ref).max() / scale), float(np.abs(direct - ref).max() / scale)


def _cpp(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}.f / {v.denominator}"


def cpp_struct(m: int, r: int, points) -> str:
    AT, G, BT = toom_cook(m, r, points)
    a = m + r - 1
    rows = lambda X: "{" + ", ".join("{" + ", ".join(_cpp(v) for v in row) + "}" for row in X) + "}"
    return (f"template <> struct Wino<{m}, {r}> {{\n  static constexpr int A = {a};\n"
            f"  static constexpr float BT[{a}][{a}] = {rows(BT)};\n"
            f"  static constexpr float G[{a}][{r}] = {rows(G)};\n"
            f"  static constexpr float AT[{m}][{a}] = {rows(AT)};\n}};")


def _value(tok: str) -> Fraction:
    tok = tok.strip().replace(".f", "").replace("f", "")
    if "/" in tok:
        num, den = tok.split("/")
        return Fraction(num.strip()) / Fraction(den.strip())
    return Fraction(tok)


def parse_header(path: Path = HEADER) -> dict:
    """{(m, r): (AT, G, BT)} from every ``template <> struct Wino<m, r>`` in the header."""
    text = path.read_text()
    out = {}
    for m, r, body in re.findall(r"struct Wino<(\d+), (\d+)> \{(.*?)\n\};", text, flags=re.S):
        mats = {}
        for name, init in re.findall(r"float (BT|G|AT)\[\d+\]\[\d+\] = \{(.*?)\};", body, flags=re.S):
            mats[name] = [[_value(t) for t in row.split(",")] for row in re.findall(r"\{([^{}]*)\}", init)]
        out[(int(m), int(r))] = (mats["AT"], mats["G"], mats["BT"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify the header's matrices exactly")
    args = ap.parse_args(argv)
    if args.check:
        found = parse_header()
        bad = [k for k, (AT, G, BT) in found.items() if not identity_holds(AT, G, BT, *k)]
        print(f"{len(found)} transforms in {HEADER.name}: " + ("all exact" if not bad else f"WRONG: {bad}"))
        return 1 if bad or not found else 0
    for m, r, pts in CHOICES:
        AT, G, BT = toom_cook(m, r, pts)
        err, direct = fp32_error(AT, G, BT, m, r)
        print(f"// F({m}, {r}), points {', '.join(str(p) for p in pts)}, inf: fp32 error {err:.1e} "
              f"({err / direct:.1f}x the direct conv's {direct:.1e})")
        print(cpp_struct(m, r, pts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
