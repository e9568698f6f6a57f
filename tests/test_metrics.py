"""ganengine.metrics: FD/KID maths against direct numpy/scipy computations, streaming statistics,
paired metrics, accuracy, the FID Inception definition, and evaluate_generator."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from ganengine.metrics import (AttributeAccuracy, FeatureStats, FIDInceptionV3, attribute_accuracy,
                               evaluate_generator, frechet_distance, frechet_distance_from_stats, is_better,
                               kernel_inception_distance, l1_error, load_fid_inception, parse_metrics, psnr,
                               resolve_feature_extractor, ssim)
from ganengine.metrics.inception import WEIGHTS_FILE, resize_bilinear_tf1
from tests._tolerance import assert_below, gamma

scipy_linalg = pytest.importorskip("scipy.linalg", reason="scipy gives the reference sqrtm")


def _features(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / math.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix) * scale + shift


def _fd_scipy(a, b):
    """pytorch-fid's formula: sqrtm of the product, eps offset when it is near singular."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy_linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- Frechet distance
@pytest.mark.parametrize("n_a,n_b,d", [(64, 80, 8), (200, 150, 24)])
def test_frechet_matches_scipy_sqrtm(n_a, n_b, d):
    a = _features(n_a, d, 1)
    b = _features(n_b, d, 2, shift=0.3, scale=1.4)
    ours = frechet_distance(a, b)
    assert ours == pytest.approx(_fd_scipy(a, b), rel=1e-9, abs=1e-9)
    assert ours > 0.1


def test_frechet_torch_numpy_and_stats_inputs_agree():
    a, b = _features(50, 6, 3), _features(70, 6, 4, shift=1.0)
    ref = frechet_distance(a, b)
    assert frechet_distance(torch.tensor(a, dtype=torch.float64), torch.tensor(b)) == pytest.approx(ref, rel=1e-12)
    sa, sb = FeatureStats().update(torch.tensor(a)), FeatureStats().update(torch.tensor(b))
    assert frechet_distance(sa, sb) == pytest.approx(ref, rel=1e-10)


def test_frechet_identical_sets_is_zero():
    a = _features(100, 16, 5, shift=3.0)
    assert abs(frechet_distance(a, a)) < 1e-9
    assert abs(frechet_distance(torch.tensor(a, dtype=torch.float32), torch.tensor(a, dtype=torch.float32))) < 1e-6


def test_frechet_singular_covariances_closed_form():
    # diagonal (commuting) covariances with zero variances: d^2 = |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2
    var_a = np.array([0.0, 1.0, 4.0, 0.0, 2.5])
    var_b = np.array([0.0, 9.0, 1.0, 0.25, 0.0])
    mu_a, mu_b = np.array([0.0, 1, 2, 3, 4]), np.array([1.0, 1, 0, 3, 4])
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    got = frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_fewer_samples_than_dimensions():
    # rank-deficient covariances (N < D), the usual case of small evaluation sets
    a, b = _features(10, 40, 6), _features(12, 40, 7, shift=0.5)
    ours = frechet_distance(a, b)
    assert np.isfinite(ours) and ours > 0
    assert ours == pytest.approx(_fd_scipy(a, b), rel=1e-5)


def test_frechet_errors():
    with pytest.raises(ValueError, match="same feature dimension"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(np.zeros(5), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((5, 3), np.nan), np.zeros((5, 3)))


# ----------------------------------------------------------------------------- streaming statistics
def _stats_bounds(x, chunks):
    """Bounds of FeatureStats' mean and covariance (fp64, Chan's pairwise merge of per-chunk
    centred sums) against numpy's two-pass ones, both sides: the chunk means' error
    gamma_{chunk + 4 merges} mean|x| (the merges' mean updates a few ulps each); the
    covariance's own rounding 2 gamma_{n + merges + 2} sum|x_i - mu_i||x_j - mu_j| / (n - 1)
    (the centring error cancels to first order, sum (x - mu) = 0); each merge's
    outer(delta, delta) n_a n_b / n carries the chunk means' errors: |delta| <= 2 max|x - mu|."""
    f64 = torch.float64
    xt = torch.tensor(x, dtype=f64)
    n, k = xt.shape[0], chunks
    chunk = -(-n // k)
    mean_abs = xt.abs().mean(0)
    e_mean = (gamma(chunk + 4 * k, f64) + gamma(n, f64)) * mean_abs
    xc = xt - xt.mean(0)
    s_cov = xc.abs().T @ xc.abs() / (n - 1)
    big = 2 * xc.abs().max(0).values
    e_merge = k * (torch.outer(big, e_mean) + torch.outer(e_mean, big)) * (n / 4) / (n - 1)
    return e_mean, 2 * gamma(n + k + 2, f64) * s_cov + e_merge


def _ssim_bound(data_range, k1=0.01, k2=0.03, window=11, vmax=None):
    """A bound of SSIM's error, fp64 both sides, for data of magnitude at most R' (``vmax``,
    default R/2: data in [-R/2, R/2]; SSIM itself runs on [0, R], R' = R): per window,
    (2 mx my + c1)(2 cov + c2) / ((mx^2 + my^2 + c1)(vx + vy + c2)), each factor within gamma_w
    (w = window^2 + 8) of its sum |terms| (2 R'^2 + c1, 8 R'^2 + c2, itself, 4 R'^2 + c2 with
    R' = R/2) relative to its value (>= c1 or c2); |ssim_w| <= 1 and the mean over windows adds
    gamma_w; both sides."""
    r2 = (data_range / 2 if vmax is None else vmax) ** 2
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    rel = (2 * r2 + c1) / c1 + (8 * r2 + c2) / c2 + 1 + (4 * r2 + c2) / c2
    return 2 * gamma(window * window + 8, torch.float64) * (rel + 1)


def test_feature_stats_streaming_equals_batch_and_merges():
    x = _features(103, 12, 8, shift=5.0)
    stats = FeatureStats()
    for chunk in np.array_split(x, 7):
        stats.update(torch.tensor(chunk))
    e_mean, e_cov = _stats_bounds(x, 7)
    assert_below(torch.tensor(stats.mean), torch.tensor(x.mean(0)), e_mean, name="mean")
    assert_below(torch.tensor(stats.covariance()), torch.tensor(np.cov(x, rowvar=False)), e_cov, name="cov")
    left, right = FeatureStats().update(x[:40]), FeatureStats().update(x[40:])
    merged = left.merge(right)
    assert_below(torch.tensor(merged.covariance()), torch.tensor(np.cov(x, rowvar=False)), _stats_bounds(x, 2)[1],
                 name="merged cov")
    assert merged.count == 103
    # deterministic: the same batches in the same order give bit-identical results
    again = FeatureStats()
    for chunk in np.array_split(x, 7):
        again.update(torch.tensor(chunk))
    assert np.array_equal(again.covariance(), stats.covariance())
    restored = FeatureStats.from_state_dict(stats.state_dict())
    assert np.array_equal(restored.covariance(), stats.covariance())


def test_feature_stats_accurate_with_large_offset():
    # E[xx^T] - mu mu^T would lose every digit here; the pairwise update keeps them
    x = _features(500, 4, 9, shift=1e6, scale=1e-3)
    stats = FeatureStats()
    for chunk in np.array_split(x, 9):
        stats.update(torch.tensor(chunk, dtype=torch.float64))
    # within the centred (Chan) bound; E[xx^T] - mu mu^T's error would be ~u mu^2 = 1e-4 x the
    # 1e-6 covariance, which the bound (~1e-5 of it here) rejects
    assert_below(torch.tensor(stats.covariance()), torch.tensor(np.cov(x, rowvar=False)), _stats_bounds(x, 9)[1])


def test_feature_stats_errors():
    s = FeatureStats().update(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="expected 4 features"):
        s.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="at least"):
        FeatureStats().update(torch.zeros(1, 4)).covariance()


# ----------------------------------------------------------------------------- KID
def _kid_direct(a, b, subsets, subset_size, seed):
    """Explicit double sums of the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3."""
    d = a.shape[1]
    k = lambda x, y: (x @ y / d + 1.0) ** 3  # noqa: E731
    rng = np.random.RandomState(seed)
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), subset_size, replace=False)]
        y = b[rng.choice(len(b), subset_size, replace=False)]
        m = subset_size
        kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
        vals.append(kxx + kyy - 2 * kxy)
    return float(np.mean(vals)), float(np.std(vals))


def test_kid_matches_direct_computation():
    a, b = _features(40, 5, 10), _features(30, 5, 11, shift=0.7)
    mean, std = kernel_inception_distance(a, b, subsets=4, subset_size=12, seed=7, return_std=True)
    ref_mean, ref_std = _kid_direct(a, b, 4, 12, 7)
    assert mean == pytest.approx(ref_mean, rel=1e-10)
    assert std == pytest.approx(ref_std, rel=1e-8)
    assert kernel_inception_distance(torch.tensor(a), torch.tensor(b), subsets=4, subset_size=12,
                                     seed=7) == pytest.approx(ref_mean, rel=1e-10)


def test_kid_same_distribution_near_zero_and_shift_positive():
    a = _features(600, 8, 12)
    rng = np.random.default_rng(13)
    same = a[rng.permutation(600)]  # the same set, in another order
    shifted = a + 0.5
    kid_same = kernel_inception_distance(a, same, subsets=20, subset_size=100)
    kid_shift = kernel_inception_distance(a, shifted, subsets=20, subset_size=100)
    assert kid_shift > 0.1
    assert abs(kid_same) < 0.05 * kid_shift


def test_kid_subset_size_clipped_and_deterministic():
    a, b = _features(20, 4, 14), _features(15, 4, 15, shift=1.0)
    v1 = kernel_inception_distance(a, b)  # defaults: 100 subsets of 1000 -> clipped to 15
    assert v1 == kernel_inception_distance(a, b)
    assert v1 == pytest.approx(kernel_inception_distance(a, b, subset_size=15), rel=0, abs=0)
    with pytest.raises(ValueError, match="subsets"):
        kernel_inception_distance(a, b, subsets=0)


# ----------------------------------------------------------------------------- paired metrics
def _ssim_direct(x, y, data_range, size=11, sigma=1.5):
    """Per-image SSIM by explicit sliding windows (valid region), numpy float64."""
    coords = np.arange(size) - (size - 1) / 2
    g = np.exp(-coords ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for n in range(x.shape[0]):
        vals = []
        for c in range(x.shape[1]):
            for i in range(x.shape[2] - size + 1):
                for j in range(x.shape[3] - size + 1):
                    px, py = x[n, c, i:i + size, j:j + size], y[n, c, i:i + size, j:j + size]
                    mx, my = (w * px).sum(), (w * py).sum()
                    vx = (w * (px - mx) ** 2).sum()
                    vy = (w * (py - my) ** 2).sum()
                    cov = (w * (px - mx) * (py - my)).sum()
                    vals.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        out.append(np.mean(vals))
    return np.array(out)


def test_ssim_psnr_l1_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 14, 15, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(2, 3, 14, 15, generator=g)).clamp(-1, 1)
    xn, yn = x.double().numpy(), y.double().numpy()
    f64, n = torch.float64, x[0].numel()
    # SSIM on [-1, 1] images is SSIM of the images on [0, 2] (non-negative, as Wang et al.'s code
    # and pytorch-msssim compute it: its luminance term is not shift-invariant)
    e_ssim = _ssim_bound(2.0, vmax=2.0)
    assert_below(ssim(x, y), torch.tensor(_ssim_direct(xn + 1, yn + 1, 2.0)), e_ssim, name="ssim")
    # ... which is SSIM of the same images as 8-bit pictures on [0, 255] (scale-invariant: the
    # constants scale with the range), and of the [0, 1] images, however the range is given
    x255, y255 = (x.double() + 1) * 127.5, (y.double() + 1) * 127.5
    e_255 = _ssim_bound(255.0, vmax=255.0) + e_ssim
    assert_below(ssim(x255, y255, data_range=255.0), ssim(x, y), e_255, name="ssim 0..255")
    assert_below(ssim(x255, y255, value_range=(0, 255)), ssim(x, y), e_255, name="ssim value_range 0..255")
    assert_below(ssim((x + 1) / 2, (y + 1) / 2, data_range=1.0), ssim(x, y), e_ssim, name="ssim 0..1")
    assert_below(ssim(x, y, value_range=(-1, 1)), ssim(x, y), 0 * e_ssim, name="ssim value_range -1..1")
    mse = ((xn - yn) ** 2).reshape(2, -1).mean(1)
    # psnr = 10 log10(R^2 / mse): mse's relative error (a mean of n squares, both sides) times
    # 10 / ln 10, plus a few ulps of the log; l1: a mean of n terms, both sides
    e_psnr = 2 * 10 / math.log(10) * gamma(n + 4, f64)
    assert_below(psnr(x, y), torch.tensor(10 * np.log10(4.0 / mse)), e_psnr, name="psnr")
    assert_below(psnr(x, y, data_range=1.0), torch.tensor(10 * np.log10(1.0 / mse)), e_psnr, name="psnr 1")
    l1 = torch.tensor(np.abs(xn - yn).reshape(2, -1).mean(1))
    assert_below(l1_error(x, y), l1, 2 * gamma(n + 2, f64) * l1, name="l1")
    ones = ssim(x, x)
    assert_below(ones, torch.ones_like(ones, dtype=f64), e_ssim, name="ssim(x, x)")
    assert torch.isinf(psnr(x, x)).all()


def test_non_finite_features_are_named_on_the_streaming_path():
    # a diverged generator's NaN images: FID through FeatureStats (evaluate, --eval_every) says so
    # (numpy's eigen-solver failed with "did not converge" before)
    bad = torch.randn(12, 5)
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        FeatureStats().update(bad)
    good = FeatureStats().update(torch.randn(12, 5))
    with pytest.raises(ValueError, match="mu_a contains NaN"):
        frechet_distance_from_stats(np.full(5, np.nan), good.covariance(), good.mean, good.covariance())

    class NaNGenerator(nn.Module):
        def forward(self, a):
            return a * float("nan")

    loader = [{"A": torch.rand(4, 3, 8, 8) * 2 - 1, "B": torch.rand(4, 3, 8, 8) * 2 - 1}]
    with pytest.raises(ValueError, match="NaN or infinite"):
        evaluate_generator(NaNGenerator(), loader, ["fid"], nn.Flatten())


def test_uint8_images_are_read_as_8_bit_pictures():
    from ganengine.metrics import extract_features

    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (2, 3, 299, 299), generator=g, dtype=torch.uint8)
    as_float = u8.float() / 255
    for resize in ("pytorch-fid", "tf1"):
        net = FIDInceptionV3(resize=resize)
        assert torch.equal(net.preprocess(u8), net.preprocess(as_float)), resize
    # (x * 2 - 1 mapped back to [0, 1]: a rounding of 2^-24 at most each way)
    assert_below(extract_features(nn.Flatten(), u8), extract_features(nn.Flatten(), as_float * 2 - 1),
                 torch.full((2, 3 * 299 * 299), 2.0 ** -23), name="uint8 vs [-1, 1]")
    with pytest.raises(TypeError, match="uint8"):
        extract_features(nn.Flatten(), u8.long())
    with pytest.raises(TypeError, match="uint8"):
        FIDInceptionV3().preprocess(u8.int())


def test_grayscale_translation_is_evaluated_as_rgb():
    # pix2pix / CycleGAN with --output_nc 1: the feature network gets RGB, as evaluate_synthesis does
    class RGBOnly(nn.Module):
        def forward(self, x):
            assert x.shape[1] == 3, x.shape
            return x.mean((2, 3))

    g = torch.Generator().manual_seed(1)
    loader = [{"A": torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, "B": torch.rand(4, 1, 8, 8, generator=g) * 2 - 1}
              for _ in range(2)]
    out = evaluate_generator(nn.Identity(), loader, ["fid", "l1"], RGBOnly())
    assert out["images"] == 8 and math.isfinite(out["fid"])


def test_paired_metric_errors():
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 17))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="value_range must be"):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), value_range=(1, 1))
    with pytest.raises(ValueError, match="data_range must be positive"):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), data_range=0)


# ----------------------------------------------------------------------------- accuracy
def test_attribute_accuracy_multi_label_and_one_hot():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, -0.1]])
    multi = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # hits: row0 [T, T, F], row1 [T, T, T] -> 5/6
    acc = AttributeAccuracy(multi_label=True).update(logits, multi)
    assert acc.compute() == pytest.approx(5 / 6)
    assert acc.per_attribute() == pytest.approx([1.0, 1.0, 0.5])
    one_hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert attribute_accuracy(nn.Identity(), logits, one_hot) == pytest.approx(0.5)  # argmax: hit, miss


# ----------------------------------------------------------------------------- Inception
def test_fid_inception_structure_and_weights_file(tmp_path):
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    # torchvision's Inception-v3 without the aux head and with 1008 classes (pytorch-fid's model)
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    # a file in the weights' format: no num_batches_tracked, as the pytorch-fid file
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / WEIGHTS_FILE
    torch.save(state, path)
    loaded = load_fid_inception(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for key, value in net.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        feats = loaded(torch.rand(1, 3, 40, 48))  # any input size: resized to 299x299
    assert feats.shape == (1, 2048) and torch.isfinite(feats).all()


def test_fid_inception_missing_and_wrong_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_fid_inception(None)
    with pytest.raises(FileNotFoundError, match="mseitzer/pytorch-fid/releases"):
        load_fid_inception(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="--inception_weights"):
        resolve_feature_extractor(None, None)
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not an FID Inception-v3 weights file"):
        load_fid_inception(bad)


def test_tf1_resize_against_formula():
    x = torch.rand(1, 1, 5, 7, dtype=torch.float64)
    out = resize_bilinear_tf1(x, 3)
    for i in range(3):
        for j in range(3):
            sy, sx = i * 5 / 3, j * 7 / 3
            y0, x0 = int(math.floor(sy)), int(math.floor(sx))
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
            wy, wx = sy - y0, sx - x0
            v = ((1 - wy) * ((1 - wx) * x[0, 0, y0, x0] + wx * x[0, 0, y0, x1])
                 + wy * ((1 - wx) * x[0, 0, y1, x0] + wx * x[0, 0, y1, x1]))
            assert float(out[0, 0, i, j]) == pytest.approx(float(v), rel=1e-12)


# ----------------------------------------------------------------------------- evaluate_generator
class _Shift(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return torch.tanh(self.conv(x))


def test_evaluate_generator_matches_direct_metrics():
    from tests.feature_extractor import SmallFeatureExtractor

    g = torch.Generator().manual_seed(1)
    batches = [{"A": torch.rand(4, 3, 16, 16, generator=g) * 2 - 1,
                "B": torch.rand(4, 3, 16, 16, generator=g) * 2 - 1} for _ in range(3)]
    model, fx = _Shift(), SmallFeatureExtractor()
    out = evaluate_generator(model, batches, "fid,kid,l1,psnr,ssim", fx, kid_options={"subsets": 5})
    with torch.no_grad():
        fake = torch.cat([model(b["A"]) for b in batches])
    real = torch.cat([b["B"] for b in batches])
    f_fake, f_real = fx((fake + 1) / 2), fx((real + 1) / 2)
    assert out["images"] == 12
    assert out["fid"] == pytest.approx(frechet_distance(f_real, f_fake), rel=1e-6)
    assert out["kid"] == pytest.approx(kernel_inception_distance(f_real, f_fake, subsets=5), rel=1e-5, abs=1e-9)
    assert out["l1"] == pytest.approx(float(l1_error(fake, real).mean()), rel=1e-6)
    assert out["psnr"] == pytest.approx(float(psnr(fake, real).mean()), rel=1e-6)
    assert out["ssim"] == pytest.approx(float(ssim(fake, real).mean()), rel=1e-6)
    assert evaluate_generator(model, batches, ["l1"], max_images=5)["images"] == 5


def test_metric_names_and_best_direction():
    assert parse_metrics("fid, SSIM,fid") == ("fid", "ssim")
    with pytest.raises(ValueError, match="subset of"):
        parse_metrics("fid,is")
    assert is_better("fid", 1.0, 2.0) and not is_better("fid", 3.0, 2.0)
    assert is_better("ssim", 0.9, 0.8) and is_better("psnr", 1.0, None)
    with pytest.raises(ValueError, match="feature extractor"):
        evaluate_generator(_Shift(), [], "fid")


class _LabelPainter(nn.Module):
    """A StarGAN stand-in whose output encodes the target labels it was given."""

    MODEL_NAME = "stargan"

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.seen = []

    def translate(self, batch):
        t = batch["target_label"]
        self.seen.append(t)
        return (t[:, :3, None, None] * 2 - 1).expand(-1, -1, 8, 8) * self.scale


def test_evaluate_generator_accuracy_uses_the_reference_test_targets():
    """Without target labels each image is translated to one of the reference test's
    create_labels targets of its own labels: image i (counted over the run) flips attribute
    i mod c (CelebA attributes), whatever the batch size (another image's labels, rolled within
    the batch, were mostly the image's own on domain-sorted data)."""
    g = torch.Generator().manual_seed(2)
    labels = [(torch.rand(5, 3, generator=g) > 0.5).float() for _ in range(2)]
    batches = [{"image": torch.zeros(5, 3, 8, 8), "label": lab} for lab in labels]

    class ReadBack(nn.Module):  # logit > 0 exactly where the painted channel is +1
        def forward(self, x):
            return x.mean((2, 3))

    # scored against the targets the images were translated to: all correct
    painter = _LabelPainter()
    out = evaluate_generator(painter, batches, "acc", classifier=ReadBack())
    assert out["acc"] == 1.0 and out["images"] == 10
    everything = torch.cat(labels)
    want = everything.clone()
    for i in range(10):
        want[i, i % 3] = 1 - want[i, i % 3]
    assert torch.equal(torch.cat(painter.seen), want)
    one = _LabelPainter()  # one image per batch: the same targets
    evaluate_generator(one, [{"image": torch.zeros(1, 3, 8, 8), "label": lab[None]} for lab in everything], "acc",
                       classifier=ReadBack())
    assert torch.equal(torch.cat(one.seen), want)
    # explicit targets are used as given
    explicit = [{**b, "target_label": b["label"]} for b in batches]
    assert evaluate_generator(_LabelPainter(), explicit, "acc", classifier=ReadBack())["acc"] == 1.0
    with pytest.raises(ValueError, match="classifier"):
        evaluate_generator(_LabelPainter(), batches, "acc")
