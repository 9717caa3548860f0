"""Paths of the data files shipped with the package (provenance in data/README.md)."""

from importlib.resources import files


def microtubule_path():
    """Return the path of the real 13-protofilament microtubule tomogram, 10.52 A per voxel."""
    return files("napari_ebm") / "data" / "microtubule_13pf.mrc"
