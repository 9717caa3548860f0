"""Open a napari viewer with a tomogram and the "EBM reconstruction" widget docked."""

import logging
from pathlib import Path

import napari

from ..datasets import microtubule_path

logger = logging.getLogger(__name__)


def open_viewer(path=None, run=True):
    """Open ``path`` (default: the shipped microtubule tomogram) and dock the widget.

    Parameters
    ----------
    path : str or Path, optional
        A file of the MRC family, opened with this plugin's reader.
    run : bool
        Start napari's event loop and return when the window closes.

    Returns
    -------
    napari.Viewer
    """
    path = Path(path) if path is not None else Path(str(microtubule_path()))
    viewer = napari.Viewer(title=f"napari-ebm: {path.name}")
    layers = viewer.open(path, plugin="napari-ebm")
    _, widget = viewer.window.add_plugin_dock_widget("napari-ebm", "EBM reconstruction")
    if layers:
        widget.input_combo.setCurrentText(layers[0].name)
    logger.debug("viewer opened with %s", path)
    if run:
        napari.run()
    return viewer
