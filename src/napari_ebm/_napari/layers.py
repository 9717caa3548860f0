"""Conversions between core volumes and napari layer data."""

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
    """Return the 0.5 and 99.5 percentiles of a strided subsample of ``data`` as (low, high)."""
    stride = max(1, int(np.ceil((data.size / max_voxels) ** (1.0 / 3.0))))
    sample = np.asarray(data[::stride, ::stride, ::stride], dtype=np.float32)
    low, high = np.percentile(sample, [0.5, 99.5])
    if not high > low:
        high = low + 1.0
    return float(low), float(high)

