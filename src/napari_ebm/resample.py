"""Fourier resampling of volumes to another voxel size, and the voxel-size check of priors."""

import numpy as np

# A learned prior is used on a tomogram whose voxel size differs from its training voxel size by
# more than this fraction only after a warning, because its features are learned in voxels.
VOXEL_SIZE_TOLERANCE = 0.25


def voxel_size_mismatch(prior, voxel_size):
    """Return a warning message when ``prior`` was trained at another voxel size, else None.

    Parameters
    ----------
    prior : napari_ebm.priors.Prior
        Hand-made priors (without metadata) never give a warning.
    voxel_size : sequence of float
        The tomogram's voxel size (z, y, x) in Angstrom.
    """
    metadata = getattr(prior, "metadata", None)
    if not metadata:
        return None
    trained = float(metadata["training_voxel_size"])
    mean_size = float(np.mean(voxel_size))
    if abs(mean_size - trained) <= VOXEL_SIZE_TOLERANCE * trained:
        return None
    return (
        f"the tomogram's voxel size {mean_size:.4g} A differs from the {trained:g} A that prior "
        f"{metadata['name']!r} was trained at by more than {VOXEL_SIZE_TOLERANCE:.0%}; resample the "
        f"tomogram to {trained:g} A first (--resample on the command line, \"Resample to the prior's voxel "
        f"size\" in the widget) or expect a poorer result"
    )


def fourier_resample(volume, voxel_size, target_voxel_size):
    """Resample a (z, y, x) volume to about ``target_voxel_size`` by Fourier cropping or padding.

    Returns
    -------
    data : numpy.ndarray
        float32 volume of shape round(shape * voxel_size / target_voxel_size), at least 2 per side.
    voxel_size : tuple of float
        The exact new voxel size (z, y, x) in Angstrom, voxel_size * old_shape / new_shape.
    """
    data = np.asarray(volume, dtype=np.float64)
    old_shape = np.array(data.shape)
    new_shape = np.maximum(2, np.round(old_shape * np.asarray(voxel_size, float) / float(target_voxel_size))).astype(int)

    spectrum = np.fft.fftshift(np.fft.fftn(data))
    resized = np.zeros(tuple(new_shape), dtype=complex)
    source, target = [], []
    for old, new in zip(old_shape, new_shape):
        keep = min(old, new)
        source.append(slice(old // 2 - keep // 2, old // 2 - keep // 2 + keep))
        target.append(slice(new // 2 - keep // 2, new // 2 - keep // 2 + keep))
    resized[tuple(target)] = spectrum[tuple(source)]

    # The scale keeps the mean intensity: the DC term grows with the number of voxels.
    result = np.fft.ifftn(np.fft.ifftshift(resized)).real * (new_shape.prod() / old_shape.prod())
    new_voxel_size = tuple(float(v) for v in np.asarray(voxel_size, float) * old_shape / new_shape)
    return result.astype(np.float32), new_voxel_size


def format_voxel_size(voxel_size):
    """Format a (z, y, x) voxel size in Angstrom as "10.52 A", or "4 x 3 x 2 A" when anisotropic."""
    sizes = [float(size) for size in voxel_size]
    if np.allclose(sizes, sizes[0], rtol=1e-6):
        return f"{sizes[0]:.4g} A"
    return " x ".join(f"{size:.4g}" for size in sizes) + " A"


def resampling_record(from_shape, from_voxel_size, to_shape, to_voxel_size):
    """Return the record of one resampling that sidecars and layer metadata store, as a dict of lists."""
    return {
        "from_voxel_size": [float(size) for size in from_voxel_size],
        "to_voxel_size": [float(size) for size in to_voxel_size],
        "from_shape": [int(n) for n in from_shape],
        "to_shape": [int(n) for n in to_shape],
    }
