"""napari reader for the MRC family (.mrc .rec .map .st .ali .mrcs)."""

import logging
import warnings
from pathlib import Path

from napari.utils.notifications import show_error, show_warning

from ..errors import VolumeReadError
from ..io import MRC_SUFFIXES, read_volume
from .layers import volume_layer_data

logger = logging.getLogger(__name__)


def get_reader(path):
    """Return :func:`read_layers` when ``path`` is a single file of the MRC family, else None."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if Path(str(path)).suffix.lower() not in MRC_SUFFIXES:
        return None
    return read_layers


def read_layers(path):
    """Read one MRC file into an image layer with scale from the voxel size.

    A file that cannot be read gives one error notification naming the file and the problem,
    and no layer. Each UserWarning from reading, for example a voxel size of 0 replaced by
    1 A, becomes one warning notification. Other warnings are logged at debug level.
    """
    if isinstance(path, (list, tuple)):
        path = path[0]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            volume = read_volume(path)
        except VolumeReadError as error:
            logger.debug("reading %s failed: %s", path, error)
            show_error(str(error))
            return [(None,)]

    for warning in caught:
        if issubclass(warning.category, UserWarning):
            show_warning(str(warning.message))
        else:
            logger.debug("while reading %s: %s", path, warning.message)

    return [volume_layer_data(volume, Path(path).stem)]
