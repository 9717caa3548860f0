"""napari writer: an image layer to an MRC file with the layer's voxel size and origin."""

import logging

import numpy as np

from ..io import write_mrc

logger = logging.getLogger(__name__)


def write_image(path, data, attributes):
    """Write a 3D image layer to ``path`` as MRC and return the written paths.

    The voxel size is the layer's scale and the origin its translate (Angstrom). napari's save
    dialog has already asked before replacing an existing file, but the file the layer was read
    from is never replaced.

    Raises
    ------
    napari_ebm.errors.VolumeWriteError
        If the file cannot be written or is the layer's own source file.
    ValueError
        If the layer is not 3D.
    """
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"MRC output needs a 3D image layer; layer {attributes.get('name')!r} has shape {data.shape}")

    scale = tuple(float(s) for s in attributes.get("scale", (1.0, 1.0, 1.0))[-3:])
    translate = tuple(float(t) for t in attributes.get("translate", (0.0, 0.0, 0.0))[-3:])
    metadata = attributes.get("metadata") or {}
    source = (metadata.get("napari_ebm") or {}).get("source_path")
    protected = (source,) if source else ()

    written = write_mrc(path, data, scale, translate, overwrite=True, protected_paths=protected)
    logger.debug("wrote layer %r to %s", attributes.get("name"), written)
    return [str(written)]
