"""Paired-translation metrics (pix2pix): L1, PSNR and SSIM between outputs and targets.

Images are (N, C, H, W) tensors. ganengine's images live in [-1, 1], so ``data_range``
(max - min of the value range) defaults to 2.0; pass 1.0 for [0, 1] images or 255.0 for uint8
scales. Every function returns one value per image (shape (N,), float64) so that a streaming
evaluation can average over a data set exactly; ``.mean()`` gives the usual number.

SSIM is Wang et al. (2004) as in their reference code and the common PyTorch ports
(pytorch-msssim, torchmetrics' defaults): an 11x11 gaussian window with sigma 1.5, K1 = 0.01,
K2 = 0.03, computed per channel on the 'valid' region (no padding) and averaged over channels
and pixels. SSIM is not shift-invariant (its luminance term compares means): like those codes it
is computed on non-negative values, the images shifted to [0, data_range] first. The images'
range is ``value_range`` (low, high) where given, else [-1, 1] for data_range 2 (ganengine's
images) and [0, data_range] otherwise; on [-1, 1] images the result equals SSIM of the same
images as 8-bit [0, 255] pictures.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F


def _check_pair(output: torch.Tensor, target: torch.Tensor, fn: str) -> None:
    if not isinstance(output, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: output and target must be tensors")
    if output.shape != target.shape:
        raise ValueError(f"{fn}: output and target must have the same shape, got {tuple(output.shape)} "
                         f"and {tuple(target.shape)}")
    if output.dim() != 4:
        raise ValueError(f"{fn}: expected (N, C, H, W) images, got shape {tuple(output.shape)}")


def l1_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per image, shape (N,)."""
    _check_pair(output, target, "l1_error")
    return (output.double() - target.double()).abs().flatten(1).mean(1)


def psnr(output: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, 10 log10(data_range^2 / MSE); inf where equal."""
    _check_pair(output, target, "psnr")
    if data_range <= 0:
        raise ValueError(f"psnr: data_range must be positive, got {data_range}")
    mse = (output.double() - target.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    """Normalised 1-D gaussian of ``size`` taps (the separable SSIM window)."""
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssim(output: torch.Tensor, target: torch.Tensor, data_range: float = 2.0, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
         value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Structural similarity per image, shape (N,), computed in float64 on the images shifted to
    [0, data_range] (see the module docstring: ``value_range`` defaults to [-1, 1] for
    data_range 2, else [0, data_range]; given, it sets data_range to high - low)."""
    _check_pair(output, target, "ssim")
    if value_range is not None:
        low, high = (float(v) for v in value_range)
        if not high > low:
            raise ValueError(f"ssim: value_range must be (low, high) with high > low, got {value_range}")
        data_range = high - low
    else:
        if data_range <= 0:
            raise ValueError(f"ssim: data_range must be positive, got {data_range}")
        low = -1.0 if data_range == 2.0 else 0.0
    if output.shape[-1] < window_size or output.shape[-2] < window_size:
        raise ValueError(f"ssim: images must be at least {window_size}x{window_size} for the "
                         f"{window_size}x{window_size} window, got {tuple(output.shape[-2:])}")
    if window_size % 2 != 1:
        raise ValueError(f"ssim: window_size must be odd, got {window_size}")
    x, y = output.double() - low, target.double() - low
    g = gaussian_window(window_size, sigma, device=x.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = _blur(x, g), _blur(y, g)
    sxx = _blur(x * x, g) - mu_x ** 2
    syy = _blur(y * y, g) - mu_y ** 2
    sxy = _blur(x * y, g) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


__all__ = ["l1_error", "psnr", "ssim", "gaussian_window"]
