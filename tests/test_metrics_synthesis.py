"""Synthesis metrics on features and logits: precision/recall, density/coverage, Inception Score.

Each is checked against a direct numpy transcription of the paper's definition (all pairwise
distances at once, ``np.partition`` for the k-th neighbour, the conventions of the authors'
codes: Euclidean, self excluded, ``<=`` for precision/recall as Kynkaanniemi et al.'s code and
``<`` for density/coverage as the prdc code), against cases with known answers, and for
chunked evaluation equal to unchunked.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ganengine.metrics as gm
from ganengine.metrics import manifold
from tests._tolerance import gamma, unit_roundoff

F64 = torch.float64


def _pairwise(a, b):
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def _prdc_numpy(real, fake, k):
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    r_rad = np.partition(_pairwise(real, real), k, axis=1)[:, k]
    f_rad = np.partition(_pairwise(fake, fake), k, axis=1)[:, k]
    d_rf = _pairwise(real, fake)
    precision = (d_rf <= r_rad[:, None]).any(axis=0).mean()
    recall = (d_rf <= f_rad[None, :]).any(axis=1).mean()
    density = (1.0 / k) * (d_rf < r_rad[:, None]).sum(axis=0).mean()
    coverage = (d_rf.min(axis=1) < r_rad).mean()
    return precision, recall, density, coverage


def _features(seed, n_real=120, n_fake=90, d=7, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_real, d, generator=g), torch.randn(n_fake, d, generator=g) * 1.2 + shift


@pytest.mark.parametrize("seed,k", [(0, 3), (1, 5), (2, 1)])
def test_matches_definition(seed, k):
    real, fake = _features(seed)
    p, r, d, c = _prdc_numpy(real.numpy(), fake.numpy(), k)
    pr = gm.precision_recall(real, fake, k=k)
    dc = gm.density_coverage(real, fake, k=k)
    # counts of comparisons of float64 distances: equal up to ties, which random data has none of
    assert pr == (p, r) and pr.precision == pr["precision"] == p and pr["recall"] == r
    # density: a mean of n_fake counts times 1/k, fp64 both sides (gamma_{n + 2} relative each)
    assert abs(dc.density - d) <= 2 * gamma(fake.shape[0] + 2, F64) * abs(d) and dc.coverage == c
    assert dict(pr.items()) == {"precision": p, "recall": r}


def test_chunking_is_exact(monkeypatch):
    real, fake = _features(3)
    whole = (gm.precision_recall(real, fake), gm.density_coverage(real, fake))
    monkeypatch.setattr(manifold, "_CHUNK_ELEMENTS", 50)  # a few rows per chunk, odd tails
    assert (gm.precision_recall(real, fake), gm.density_coverage(real, fake)) == whole


def test_known_answers():
    real, _ = _features(4)
    same = gm.precision_recall(real, real.clone(), k=3)
    assert same == (1.0, 1.0)
    assert gm.density_coverage(real, real.clone(), k=5).coverage == 1.0
    far = gm.precision_recall(real, real + 1e3, k=3)
    assert far == (0.0, 0.0)
    assert gm.density_coverage(real, real + 1e3, k=5) == (0.0, 0.0)
    # fakes collapsed onto one real sample: high precision, recall of a single ball
    collapsed = real[:1].repeat(50, 1)
    pr = gm.precision_recall(real, collapsed + 1e-9, k=3)
    assert pr.precision == 1.0 and pr.recall < 0.2
    # duplicated samples (a data set with repeated images, a generator repeating one): the k-th
    # neighbour radius is 0, and a set still covers itself (Kynkaanniemi et al.'s code: <=)
    repeated = real[:10].repeat(4, 1)
    assert gm.precision_recall(repeated, repeated.clone(), k=3) == (1.0, 1.0)


def test_numpy_input_and_errors():
    real, fake = _features(5)
    assert gm.precision_recall(real.numpy(), fake.numpy()) == gm.precision_recall(real, fake)
    with pytest.raises(ValueError, match="feature dimension"):
        gm.precision_recall(real, fake[:, :3])
    with pytest.raises(ValueError, match="k="):
        gm.density_coverage(real[:4], fake, k=5)
    with pytest.raises(ValueError, match="k must be"):
        gm.precision_recall(real, fake, k=0)
    with pytest.raises(ValueError, match="NaN"):
        gm.precision_recall(real, torch.full_like(fake, float("nan")))
    with pytest.raises(ValueError, match="N, D"):
        gm.density_coverage(real[0], fake)


def _fid_error(x, y, d=5):
    """A bound of frechet_distance's fp64 rounding: the means' and covariances' sums (gamma_n of
    sum |x|^2), and the matrix square root of S_x S_y (Schur method: backward error ~ d^3 u ||A||,
    Higham, Functions of Matrices 6.2, amplified by at most cond(A) <= cond(S_x) cond(S_y)) in
    its trace term 2 tr(sqrtm(S_x S_y))."""
    x, y = x.double(), y.double()
    e = 0.0
    conds = []
    for t in (x, y):
        cov = torch.cov(t.T)
        ev = torch.linalg.eigvalsh(cov)
        conds.append(float(ev.max() / ev.min()))
        e += gamma(t.shape[0] + 8, F64) * float(t.pow(2).sum()) * 4 / max(t.shape[0] - 1, 1)
    tr = float(torch.cov(x.T).trace() + torch.cov(y.T).trace())
    return e + 2 * d ** 3 * unit_roundoff(F64) * conds[0] * conds[1] * tr


def _is_numpy(logits, splits):
    """Transcription of openai/improved-gan inception_score.py on softmax(logits)."""
    x = np.asarray(logits, np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(splits):
        part = p[i * p.shape[0] // splits:(i + 1) * p.shape[0] // splits]
        kl = part * (np.log(part) - np.log(np.expand_dims(part.mean(0), 0)))
        scores.append(np.exp(kl.sum(1).mean()))
    return np.mean(scores), np.std(scores)


@pytest.mark.parametrize("n,splits", [(1000, 10), (97, 4), (10, 10)])
def test_inception_score_matches_reference(n, splits):
    logits = torch.randn(n, 13, generator=torch.Generator().manual_seed(n)) * 2.5
    mean, std = _is_numpy(logits.numpy(), splits)
    s = gm.inception_score(logits, splits=splits)
    # float64 both sides: each part's KL = mean_i sum_c p (log p - log pbar) is a sum over the
    # part's rows x 13 classes (n) of terms up to p (|log p| + |log pbar|), with a few ulps per
    # softmax, log and exp: |d KL| <= gamma_{n + 16} S; the score exp(KL) moves by that
    # relative; the mean over the parts adds gamma_splits, the std (a difference of scores)
    # the scores' own errors over its value
    x = logits.double()
    p = torch.softmax(x, 1)
    e_scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        terms = part * (part.log().abs() + part.mean(0, keepdim=True).log().abs())
        e_scores.append(gamma(part.numel() + 16, F64) * terms.sum(1).mean().item())
    scores = np.array(s.scores)
    e_rel = np.array(e_scores)
    e_mean = 2 * (float((e_rel * scores).mean()) + gamma(splits, F64) * mean)
    assert abs(float(s) - mean) <= e_mean
    assert abs(s.std - std) <= 2 * (float((e_rel * scores).max()) * 2 + gamma(splits + 4, F64) * std) + 1e-300
    m2, s2 = s
    assert (m2, s2) == (float(s), s.std) and len(s.scores) == splits


def test_inception_score_bounds_and_errors():
    # exact answers up to rounding: the probabilities are exact one-hots (exp(-200) underflows
    # against 1), the KL sums 40 x 10 terms of p log(p / pbar) (log 10 each, a few ulps), and
    # exp(KL) and the mean over 5 parts a few ulps more: gamma_{400 + 16} relative
    confident = torch.eye(10).repeat(20, 1) * 200.0     # one-hot, spread evenly: IS = classes
    assert abs(gm.inception_score(confident, splits=5) - 10.0) <= gamma(400 + 16, F64) * 10.0
    same = torch.zeros(50, 10)
    same[:, 3] = 200.0                                   # every sample the same class: IS = 1
    assert abs(gm.inception_score(same, splits=5) - 1.0) <= gamma(500 + 16, F64)
    assert np.isfinite(float(gm.inception_score(torch.randn(40, 6) * 1e3, splits=4)))
    with pytest.raises(ValueError, match="splits"):
        gm.inception_score(torch.randn(5, 10), splits=10)
    with pytest.raises(ValueError, match="classes"):
        gm.inception_score(torch.randn(5), splits=1)
    with pytest.raises(ValueError, match="NaN"):
        gm.inception_score(torch.full((20, 4), float("nan")), splits=2)


def test_intra_class_fid():
    g = torch.Generator().manual_seed(7)
    real = torch.randn(60, 5, generator=g)
    labels = torch.arange(60) % 3
    fake = real + 0.5 * (labels[:, None] == 1)            # only class 1 moves
    mean, per = gm.intra_class_frechet_distance(real, labels, fake, labels, return_per_class=True)
    # identical sets give exactly 0 up to rounding (_fid_error); the mean of the three is
    # per[1] / 3 plus the other two's rounding and its own
    e = {c: _fid_error(real[labels == c], fake[labels == c]) for c in (0, 1, 2)}
    assert abs(per[0]) <= e[0] and abs(per[2]) <= e[2]
    assert abs(per[1] - gm.frechet_distance(real[labels == 1], fake[labels == 1])) <= 2 * e[1]
    assert abs(mean - per[1] / 3) <= (e[0] + e[2] + 4 * unit_roundoff(F64) * abs(per[1])) / 3
    with pytest.raises(ValueError, match="class 2"):
        gm.intra_class_frechet_distance(real, labels, fake[:-3], labels[:-3] % 2)


def test_integer_arguments_take_numpy_and_tensor_integers():
    """k / splits / subsets / subset_size from numpy (np.int64(3)) were refused as "not a positive
    int"; bools (KID took True as 1 subset) and floats are refused, naming the argument."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 4)), rng.normal(size=(10, 4))
    for k in (np.int64(3), torch.tensor(3)):
        assert gm.precision_recall(a, b, k=k) == gm.precision_recall(a, b, k=3)
        assert gm.density_coverage(a, b, k=k) == gm.density_coverage(a, b, k=3)
    logits = torch.from_numpy(rng.normal(size=(12, 5)))
    assert float(gm.inception_score(logits, splits=np.int32(2))) == float(gm.inception_score(logits, splits=2))
    kid = gm.kernel_inception_distance(a, b, subsets=np.int64(2), subset_size=np.int64(5))
    assert float(kid) == float(gm.kernel_inception_distance(a, b, subsets=2, subset_size=5))
    for bad in (True, 3.0, np.float64(3), torch.tensor(3.0), 0):
        with pytest.raises(ValueError, match="precision_recall: k must be a positive int"):
            gm.precision_recall(a, b, k=bad)
    with pytest.raises(ValueError, match="kernel_inception_distance: subsets must be a positive int"):
        gm.kernel_inception_distance(a, b, subsets=True)
    with pytest.raises(ValueError, match="kernel_inception_distance: subset_size must be an int >= 2"):
        gm.kernel_inception_distance(a, b, subset_size=np.int64(1))
