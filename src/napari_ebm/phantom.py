"""A synthetic cryo-ET-like phantom with a known ground truth, and its simulated observation.

The phantom contains a vesicle (a spherical lipid bilayer of two dense leaflets), straight
filaments, globular particles and a weak ice background, in arbitrary density units where the
ice is 0 and protein is about 1. It serves as sample data and in tests, where the ground truth
lets a reconstruction be scored.
"""

import logging

import numpy as np
import torch

from .operators import Wedge

logger = logging.getLogger(__name__)


def _coordinates(shape):
    return np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")


def make_phantom(shape=(64, 64, 64), voxel_size=10.0, seed=0):
    """Make a phantom volume of shape (z, y, x) at ``voxel_size`` Angstrom per voxel.

    Feature sizes are set in Angstrom and converted to voxels. The bilayer leaflets are 15 A
    thick and 40 A apart, and the particles have radii of 50 to 100 A. The filaments are solid
    with a 125 A radius, the size of a microtubule, which is in fact a hollow 250 A tube.

    Parameters
    ----------
    shape : tuple of int
        Volume shape (z, y, x), each side at least 16.
    voxel_size : float
        Angstrom per voxel, > 0.
    seed : int
        Seed of the placement; the same seed gives the same phantom.

    Returns
    -------
    numpy.ndarray
        float32 volume of ``shape``.

    Raises
    ------
    ValueError
        If a side is shorter than 16 voxels or the voxel size is not positive.
    """
    if min(shape) < 16 or len(shape) != 3:
        raise ValueError(f"phantom shape must be 3D with every side >= 16 voxels, got {shape}")
    if not voxel_size > 0:
        raise ValueError(f"voxel size must be > 0 Angstrom, got {voxel_size}")

    rng = np.random.default_rng(seed)
    z, y, x = _coordinates(shape)
    extent = np.array(shape, dtype=np.float32)
    volume = np.zeros(shape, dtype=np.float32)

    # Vesicle: two leaflets of a bilayer at radius r and r + 40 A.
    centre = extent * rng.uniform(0.35, 0.65, size=3)
    radius = 0.25 * float(extent.min())
    distance = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    leaflet = 15.0 / voxel_size
    for shell in (radius, radius + 40.0 / voxel_size):
        volume += 0.8 * np.exp(-0.5 * ((distance - shell) / leaflet) ** 2)

    # Filaments along random directions in the XY plane, so the missing wedge smears them in Z.
    for _ in range(2):
        point = extent * rng.uniform(0.2, 0.8, size=3)
        angle = rng.uniform(0, np.pi)
        direction = np.array([rng.uniform(-0.2, 0.2), np.sin(angle), np.cos(angle)], dtype=np.float32)
        direction /= np.linalg.norm(direction)
        offset = np.stack([z - point[0], y - point[1], x - point[2]])
        along = np.tensordot(direction, offset, axes=1)
        across = np.sqrt(np.maximum((offset**2).sum(0) - along**2, 0.0))
        volume += 1.0 / (1.0 + np.exp((across - 125.0 / voxel_size) * 2.0))

    # Globular particles.
    for _ in range(6):
        point = extent * rng.uniform(0.1, 0.9, size=3)
        particle_radius = rng.uniform(50.0, 100.0) / voxel_size
        distance = np.sqrt((z - point[0]) ** 2 + (y - point[1]) ** 2 + (x - point[2]) ** 2)
        volume += 1.0 / (1.0 + np.exp((distance - particle_radius) * 2.0))

    # Ice: a weak, smooth background.
    ice = rng.normal(size=shape).astype(np.float32)
    ice = np.fft.irfftn(np.fft.rfftn(ice) * _lowpass(shape, 0.05), s=shape).astype(np.float32)
    volume += 0.05 * ice / max(float(ice.std()), 1e-6)
    return volume


def _lowpass(shape, cutoff):
    kz = np.fft.fftfreq(shape[0])[:, None, None]
    ky = np.fft.fftfreq(shape[1])[None, :, None]
    kx = np.fft.rfftfreq(shape[2])[None, None, :]
    return np.exp(-0.5 * (kz**2 + ky**2 + kx**2) / cutoff**2)


def observe(volume, tilt_range=(-60.0, 60.0), noise_sigma=0.5, seed=0):
    """Simulate a tomogram of ``volume``: add white noise, then remove the missing wedge.

    Parameters
    ----------
    volume : numpy.ndarray
        Ground truth of shape (z, y, x).
    tilt_range : (float, float)
        Tilt range about the Y axis in degrees.
    noise_sigma : float
        Standard deviation of the added noise, in the units of ``volume``.
    seed : int

    Returns
    -------
    numpy.ndarray
        float32 observation of the same shape.
    """
    rng = np.random.default_rng(seed)
    noisy = volume + rng.normal(0.0, noise_sigma, size=volume.shape).astype(np.float32)
    wedge = Wedge(volume.shape, tilt_range)
    return wedge(torch.from_numpy(noisy)).numpy().astype(np.float32)
