"""napari writer: an image layer to an MRC file with the layer's voxel size and origin."""

import logging

import numpy as np

from ..io import write_mrc

logger = logging.getLogger(__name__)


def write_image(path, data, attributes):
    """Write a 3D image layer to ``path`` as MRC and return the written paths.

    The voxel size is the layer's scale and the origin its translate (Angstrom). napari's save
    dialog has already asked before replacing an existing file. Two files are never replaced:
    the file the layer was read from, and for an output layer of a run, the input's source file.

    Raises
    ------
    napari_ebm.errors.VolumeWriteError
        If the file cannot be written, or is the layer's source file or its run's input file.
    ValueError
        If the layer is not 3D.
    """
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"MRC output needs a 3D image layer; layer {attributes.get('name')!r} has shape {data.shape}")

    scale = tuple(float(s) for s in attributes.get("scale", (1.0, 1.0, 1.0))[-3:])
    translate = tuple(float(t) for t in attributes.get("translate", (0.0, 0.0, 0.0))[-3:])
    metadata = (attributes.get("metadata") or {}).get("napari_ebm") or {}
    sources = (metadata.get("source_path"), metadata.get("input_source_path"))
    protected = tuple(source for source in sources if source)

    written = write_mrc(path, data, scale, translate, overwrite=True, protected_paths=protected)
    logger.debug("wrote layer %r to %s", attributes.get("name"), written)
    return [str(written)]
