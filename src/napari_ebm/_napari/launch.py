"""Open a napari viewer with a tomogram and the "EBM reconstruction" widget docked."""

import logging

import napari

from ..datasets import microtubule_path
from ..io import read_volume
from .layers import volume_layer_data

logger = logging.getLogger(__name__)


def open_viewer(volume=None, run=True):
    """Show ``volume`` (default: the shipped microtubule tomogram) with the widget docked.

    Parameters
    ----------
    volume : napari_ebm.io.Volume, optional
        A volume read with :func:`napari_ebm.io.read_volume`.
    run : bool
        Start napari's event loop and return when the window closes.

    Returns
    -------
    napari.Viewer
    """
    if volume is None:
        volume = read_volume(microtubule_path())
    name = volume.path.stem if volume.path is not None else "volume"
    viewer = napari.Viewer(title=f"napari-ebm: {name}")
    data, attributes, _ = volume_layer_data(volume, name)
    layer = viewer.add_image(data, **attributes)
    _, widget = viewer.window.add_plugin_dock_widget("napari-ebm", "EBM reconstruction")
    widget.input_combo.setCurrentText(layer.name)
    logger.debug("viewer opened with %s", volume.path)
    if run:
        napari.run()
    return viewer
