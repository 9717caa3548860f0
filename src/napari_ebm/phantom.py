"""Synthetic cryo-ET-like phantoms with a known ground truth, and their simulated observation.

A phantom contains what a cellular tomogram shows, with sizes set in Angstrom: vesicles bounded by
a lipid bilayer, hollow microtubules and thin actin-like filaments, globular macromolecules
(two real density maps placed at random orientations and lumpy ribosome-sized particles),
crowded to a chosen volume fraction, over a weak, smooth ice background. Densities are in
arbitrary units where the ice is 0 and protein is about 1. Phantoms serve as sample data, as
training data for learned priors and, with other seeds, as held-out data in the quality
benchmark.
"""

import logging
from functools import lru_cache
from importlib.resources import files

import numpy as np
import torch
import torch.nn.functional as F

from .operators import Wedge

logger = logging.getLogger(__name__)

# Real density maps shipped in napari_ebm/data/maps, with their voxel sizes in Angstrom; see the
# README there for provenance and licences.
DENSITY_MAPS = ("EMD-3197.map", "beta_tubulin.mrc")

MICROTUBULE_OUTER_RADIUS = 125.0
MICROTUBULE_INNER_RADIUS = 85.0
ACTIN_RADIUS = 35.0
LEAFLET_WIDTH = 10.0
LEAFLET_SEPARATION = 40.0


def _coordinates(shape):
    return np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")


def _soft_step(distance, edge=1.0):
    """Return 1 inside (distance < 0) and 0 outside, with a smooth edge ``edge`` voxels wide."""
    return 1.0 / (1.0 + np.exp(np.clip(distance / (0.25 * edge), -50.0, 50.0)))


def _random_rotation(rng):
    """Return a rotation matrix drawn uniformly from SO(3)."""
    quaternion = rng.normal(size=4)
    w, x, y, z = quaternion / np.linalg.norm(quaternion)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ],
        dtype=np.float32,
    )


@lru_cache(maxsize=None)
def _density_map(name):
    """Return a shipped density map scaled so that its highest density is 1, and its voxel size."""
    from .io import read_volume

    volume = read_volume(files("napari_ebm") / "data" / "maps" / name)
    data = np.asarray(volume.data, dtype=np.float32)

    # The solvent level is taken from the box's outer shell and removed, and a soft spherical
    # mask hides the box corners, so that a rotated map shows no edges of its box.
    radius = np.sqrt(sum((c - (n - 1) / 2.0) ** 2 for c, n in zip(_coordinates(data.shape), data.shape)))
    outer = radius > 0.45 * min(data.shape)
    data = np.clip(data - float(np.median(data[outer])), 0.0, None) * _soft_step(radius - 0.4 * min(data.shape), 2.0)
    return data / max(float(data.max()), 1e-6), float(np.mean(volume.voxel_size))


def _place_map(volume, name, centre, voxel_size, rng):
    """Add density map ``name``, rotated at random and resampled to ``voxel_size``, at ``centre``."""
    density, map_voxel_size = _density_map(name)
    extent = density.shape[0] * map_voxel_size / voxel_size
    half = int(np.ceil(extent * 0.5 * np.sqrt(3)))
    size = 2 * half + 1

    # Each output voxel of the box looks up the map at its rotated position. grid_sample takes
    # positions in the map's own normalised coordinates, -1..1 from edge to edge.
    rotation = _random_rotation(rng)
    grid = np.stack(_coordinates((size,) * 3), axis=-1) - half
    grid = grid @ rotation.T * (voxel_size / map_voxel_size) / (0.5 * density.shape[0])
    sampled = F.grid_sample(
        torch.from_numpy(density)[None, None],
        torch.from_numpy(grid[..., ::-1].copy())[None],
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )[0, 0].numpy()
    _add_box(volume, sampled, centre)


def _add_box(volume, box, centre):
    """Add ``box`` to ``volume`` centred at ``centre`` (voxels), clipped at the volume's edges."""
    corner = np.round(np.asarray(centre)).astype(int) - np.array(box.shape) // 2
    target, source = [], []
    for start, length, side in zip(corner, box.shape, volume.shape):
        low, high = max(start, 0), min(start + length, side)
        if high <= low:
            return
        target.append(slice(low, high))
        source.append(slice(low - start, high - start))
    volume[tuple(target)] += box[tuple(source)]


def _lumpy_particle(radius, rng):
    """Return a box with a ribosome-like particle: a sphere of ``radius`` voxels made of lumps."""
    half = int(np.ceil(radius * 1.3)) + 2
    z, y, x = _coordinates((2 * half + 1,) * 3)
    box = np.zeros(z.shape, dtype=np.float32)
    for _ in range(8):
        offset = rng.normal(size=3)
        offset *= rng.uniform(0.2, 0.6) * radius / np.linalg.norm(offset)
        lump = 0.55 * radius * rng.uniform(0.8, 1.2)
        distance = np.sqrt((z - half - offset[0]) ** 2 + (y - half - offset[1]) ** 2 + (x - half - offset[2]) ** 2)
        box = np.maximum(box, _soft_step(distance - lump))
    return box


def _line_distances(shape, point, direction):
    """Return the distance of each voxel to the line through ``point`` along ``direction``."""
    z, y, x = _coordinates(shape)
    offset = np.stack([z - point[0], y - point[1], x - point[2]])
    along = np.tensordot(direction, offset, axes=1)
    return np.sqrt(np.maximum((offset**2).sum(0) - along**2, 0.0))


def _random_direction(rng, tilt=0.3):
    """Return a unit vector mostly in the XY plane, as filaments lie in a thin lamella."""
    angle = rng.uniform(0, np.pi)
    direction = np.array([rng.uniform(-tilt, tilt), np.sin(angle), np.cos(angle)], dtype=np.float32)
    return direction / np.linalg.norm(direction)


def make_phantom(shape=(64, 64, 64), voxel_size=10.0, seed=0, crowding=0.15):
    """Make a phantom volume of shape (z, y, x) at ``voxel_size`` Angstrom per voxel.

    Feature sizes are set in Angstrom and converted to voxels:

    - one or two vesicles, each bounded by a bilayer of two 10 A leaflets 40 A apart;
    - one or two hollow microtubules (outer radius 125 A, inner radius 85 A);
    - up to two actin-like filaments with a 35 A radius;
    - globular macromolecules until ``crowding`` of the volume is filled: the density maps
      EMD-3197 and beta-tubulin resampled to ``voxel_size`` at random orientations, and lumpy
      particles with radii of 60 to 130 A;
    - a weak, smooth ice background of mean 0.

    Parameters
    ----------
    shape : tuple of int
        Volume shape (z, y, x), each side at least 16.
    voxel_size : float
        Angstrom per voxel, > 0.
    seed : int
        Seed of the placement; the same seed gives the same phantom.
    crowding : float
        Target fraction of the volume filled by macromolecules, 0 to 0.5.

    Returns
    -------
    numpy.ndarray
        float32 volume of ``shape``.

    Raises
    ------
    ValueError
        If a side is shorter than 16 voxels, the voxel size is not positive or ``crowding`` is
        outside 0 to 0.5.
    """
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"phantom shape must be 3D with every side >= 16 voxels, got {shape}")
    if not voxel_size > 0:
        raise ValueError(f"voxel size must be > 0 Angstrom, got {voxel_size}")
    if not 0.0 <= crowding <= 0.5:
        raise ValueError(f"crowding must be a volume fraction from 0 to 0.5, got {crowding}")

    rng = np.random.default_rng(seed)
    z, y, x = _coordinates(shape)
    extent = np.array(shape, dtype=np.float32)
    volume = np.zeros(shape, dtype=np.float32)
    edge = max(1.0, 20.0 / voxel_size)

    for _ in range(int(rng.integers(1, 3))):
        centre = extent * rng.uniform(0.2, 0.8, size=3)
        radius = rng.uniform(0.15, 0.35) * float(extent.min())
        axes = rng.uniform(0.85, 1.15, size=3)
        distance = np.sqrt(((z - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2 + ((x - centre[2]) / axes[2]) ** 2)
        leaflet = LEAFLET_WIDTH / voxel_size
        for shell in (radius, radius + LEAFLET_SEPARATION / voxel_size):
            np.maximum(volume, 0.8 * np.exp(-0.5 * ((distance - shell) / leaflet) ** 2), out=volume)

    for _ in range(int(rng.integers(1, 3))):
        across = _line_distances(shape, extent * rng.uniform(0.2, 0.8, size=3), _random_direction(rng))
        outer = _soft_step(across - MICROTUBULE_OUTER_RADIUS / voxel_size, edge)
        inner = _soft_step(across - MICROTUBULE_INNER_RADIUS / voxel_size, edge)
        np.maximum(volume, outer - inner, out=volume)

    for _ in range(int(rng.integers(0, 3))):
        across = _line_distances(shape, extent * rng.uniform(0.1, 0.9, size=3), _random_direction(rng, tilt=1.0))
        np.maximum(volume, 0.9 * _soft_step(across - ACTIN_RADIUS / voxel_size, edge), out=volume)

    # Macromolecules at random places until the target volume fraction is filled. Densities of
    # overlapping objects are combined by their maximum, not summed, as matter excludes matter.
    filled, budget = 0.0, crowding * volume.size
    particles = np.zeros(shape, dtype=np.float32)
    while filled < budget:
        centre = extent * rng.uniform(0.0, 1.0, size=3)
        kind = rng.random()
        if kind < 0.25:
            _place_map(particles, DENSITY_MAPS[0], centre, voxel_size, rng)
        elif kind < 0.5:
            _place_map(particles, DENSITY_MAPS[1], centre, voxel_size, rng)
        else:
            _add_box(particles, _lumpy_particle(rng.uniform(60.0, 130.0) / voxel_size, rng), centre)
        filled = float(np.minimum(particles, 1.0).sum())
    np.maximum(volume, np.minimum(particles, 1.0), out=volume)

    ice = rng.normal(size=shape).astype(np.float32)
    ice = np.fft.irfftn(np.fft.rfftn(ice) * _lowpass(shape, 0.05), s=shape, axes=(0, 1, 2)).astype(np.float32)
    volume += 0.05 * ice / max(float(ice.std()), 1e-6)
    logger.debug("phantom %s at %g A, seed %d, crowding %.2f made", shape, voxel_size, seed, crowding)
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
