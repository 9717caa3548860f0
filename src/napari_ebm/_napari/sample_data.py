"""Sample data: the real microtubule tomogram shipped with the package, and a synthetic phantom."""

from ..datasets import microtubule_path
from ..io import read_volume
from ..phantom import make_phantom, observe
from .layers import subsample_contrast_limits, volume_layer_data

PHANTOM_VOXEL_SIZE = 10.0


def microtubule_tomogram():
    """Return the real microtubule tomogram as an image layer at 10.52 A per voxel."""
    return [volume_layer_data(read_volume(microtubule_path()), "microtubule_13pf")]


def synthetic_phantom():
    """Return a 64^3 phantom at 10 A per voxel and its observation with a -60..60 wedge and noise."""
    truth = make_phantom((64, 64, 64), voxel_size=PHANTOM_VOXEL_SIZE, seed=0)
    observed = observe(truth, (-60.0, 60.0), noise_sigma=0.5, seed=1)
    scale = (PHANTOM_VOXEL_SIZE,) * 3
    return [
        (truth, {"name": "phantom ground truth", "scale": scale, "units": "angstrom", "visible": False,
                 "contrast_limits": subsample_contrast_limits(truth)}, "image"),
        (observed, {"name": "phantom observed", "scale": scale, "units": "angstrom",
                    "contrast_limits": subsample_contrast_limits(observed)}, "image"),
    ]
