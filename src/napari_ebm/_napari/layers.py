"""Conversions between core volumes and napari layer data."""

import math

import numpy as np


def volume_layer_data(volume, name):
    """Return a napari LayerData tuple for a :class:`napari_ebm.io.Volume`.

    The layer's scale is the voxel size and its translate the origin, both in Angstrom, so
    layers of different voxel sizes overlay correctly. Contrast limits come from a subsample,
    so a memory-mapped volume is not read whole.
    """
    metadata = {
        "napari_ebm": {
            "source_path": str(volume.path) if volume.path else None,
            "voxel_size": list(volume.voxel_size),
            "origin": list(volume.origin),
            "is_stack": volume.is_stack,
        }
    }
    attributes = {
        "name": name,
        "scale": tuple(volume.voxel_size),
        "translate": tuple(volume.origin),
        "metadata": metadata,
        "contrast_limits": subsample_contrast_limits(volume.data),
        "units": "angstrom",
    }
    return (volume.data, attributes, "image")


def subsample_contrast_limits(data, max_voxels=2_000_000):
    """Compute display contrast limits from a strided subsample of a volume.

    The limits are the 0.5 and 99.5 percentiles of the finite values in the subsample. Data of
    at most `max_voxels` voxels is used whole. Larger data is sampled as whole x rows from
    evenly strided sections and rows, because reading a memory-mapped file touches whole
    pages, so a row costs little more than one of its voxels. An 8 GiB float32 tomogram of
    shape (512, 2048, 2048) is sampled in 961 rows of 8 KiB, about 8 MiB of data, although
    the kernel may read more pages around each row.

    Parameters
    ----------
    data : array_like
        Volume of shape (z, y, x), for example a read-only :class:`numpy.memmap`.
    max_voxels : int, optional
        Maximum number of voxels in the subsample, > 0. Default 2 000 000.

    Returns
    -------
    tuple of float
        (low, high) in the intensity units of `data`, both finite and with high > low. A
        subsample without finite values gives (0, 1).
    """
    sample = np.asarray(data[_subsample_slices(data.shape, max_voxels)], dtype=np.float32)
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return 0.0, 1.0

    low, high = np.percentile(finite, [0.5, 99.5])
    if not high > low:
        high = low + 1.0
    return float(low), float(high)


def _subsample_slices(shape, max_voxels):
    """Return (z, y, x) slices that select at most `max_voxels` voxels, whole rows if possible."""
    depth, height, width = shape
    if depth * height * width <= max_voxels:
        return (slice(None), slice(None), slice(None))

    x_step = max(1, math.ceil(width / max_voxels))
    row_budget = max(1, max_voxels // math.ceil(width / x_step))

    # About as many sections as rows per section spreads the rows over the whole volume.
    z_step = math.ceil(depth / min(depth, max(1, math.isqrt(row_budget))))
    sections = math.ceil(depth / z_step)
    rows_per_section = max(1, row_budget // sections)
    y_step = math.ceil(height / min(height, rows_per_section))

    return (slice(None, None, z_step), slice(None, None, y_step), slice(None, None, x_step))
