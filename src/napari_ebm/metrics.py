"""Quality metrics of a reconstruction against a ground truth: PSNR, SSIM and FSC."""

import math

import numpy as np
import torch


def psnr(estimate, truth):
    """Return the peak signal-to-noise ratio in dB, with the truth's value range as the peak."""
    estimate = np.asarray(estimate, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    mse = float(np.mean((estimate - truth) ** 2))
    peak = float(truth.max() - truth.min())
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def ssim(estimate, truth, sigma=1.5):
    """Return the mean structural similarity of two volumes (Wang et al. 2004, 3D Gaussian window).

    The constants use the truth's value range L: C1 = (0.01 L)^2 and C2 = (0.03 L)^2.
    """
    x = torch.as_tensor(np.asarray(estimate, dtype=np.float32))[None, None]
    y = torch.as_tensor(np.asarray(truth, dtype=np.float32))[None, None]
    radius = int(math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel_1d = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel_1d /= kernel_1d.sum()

    def blur(volume):
        for dim in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + dim] = -1
            volume = torch.nn.functional.conv3d(volume, kernel_1d.view(shape), padding="same")
        return volume

    value_range = float(y.max() - y.min())
    c1, c2 = (0.01 * value_range) ** 2, (0.03 * value_range) ** 2
    mean_x, mean_y = blur(x), blur(y)
    var_x = blur(x * x) - mean_x**2
    var_y = blur(y * y) - mean_y**2
    covariance = blur(x * y) - mean_x * mean_y
    index = ((2 * mean_x * mean_y + c1) * (2 * covariance + c2)) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean())


def fourier_shell_correlation(estimate, truth):
    """Return (frequencies in cycles per voxel, FSC) over spherical shells of width 1/n."""
    a = np.fft.rfftn(np.asarray(estimate, dtype=np.float64))
    b = np.fft.rfftn(np.asarray(truth, dtype=np.float64))
    shape = np.asarray(estimate).shape
    grids = np.meshgrid(np.fft.fftfreq(shape[0]), np.fft.fftfreq(shape[1]), np.fft.rfftfreq(shape[2]), indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids))
    shells = np.minimum((radius * min(shape)).astype(int), min(shape) // 2)
    count = min(shape) // 2
    numerator = np.bincount(shells.ravel(), (a * np.conj(b)).real.ravel(), minlength=count + 1)
    power_a = np.bincount(shells.ravel(), (np.abs(a) ** 2).ravel(), minlength=count + 1)
    power_b = np.bincount(shells.ravel(), (np.abs(b) ** 2).ravel(), minlength=count + 1)
    fsc = numerator / np.sqrt(np.maximum(power_a * power_b, 1e-30))
    return np.arange(count) / min(shape), fsc[:count]


def fsc_resolution(estimate, truth, voxel_size, threshold):
    """Return the resolution in Angstrom where the FSC first falls below ``threshold``."""
    frequencies, fsc = fourier_shell_correlation(estimate, truth)
    below = np.nonzero(fsc[1:] < threshold)[0]
    frequency = frequencies[below[0] + 1] if below.size else frequencies[-1]
    return voxel_size / frequency
