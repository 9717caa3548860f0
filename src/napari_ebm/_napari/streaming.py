"""Output layers of a run: created once, then updated in place from snapshots."""

import logging

import numpy as np

from .layers import subsample_contrast_limits

logger = logging.getLogger(__name__)


class OutputLayers:
    """The layers "<input> MAP" (or "<input> sample"), "<input> mean" and "<input> std".

    A layer that already exists under one of these names, from an earlier run, is reused and its
    data replaced, so the layer count stays constant across runs. The layers get the input
    layer's translate and its scale, or ``scale`` when the input was resampled. Their metadata
    records the input's source file as "input_source_path", so the napari writer rejects saving
    an output over it. Call only from the main thread.

    Parameters
    ----------
    viewer : napari.Viewer
    input_layer : napari.layers.Image
    method : str
        "map" or "langevin".
    scale : sequence of float, optional
        Voxel size (z, y, x) of the outputs in Angstrom, when it differs from the input's.
    """

    def __init__(self, viewer, input_layer, method, scale=None):
        self.viewer = viewer
        self.input_layer = input_layer
        self.scale = np.asarray(input_layer.scale if scale is None else scale, dtype=float)
        base = input_layer.name
        self.names = {"volume": f"{base} MAP" if method == "map" else f"{base} sample"}
        if method == "langevin":
            self.names.update(mean=f"{base} mean", std=f"{base} std")
        self.input_source_path = input_source_path(input_layer)
        self.metadata = {"input_source_path": self.input_source_path}

    def apply(self, snapshot):
        """Show the volumes of ``snapshot`` (those that are not None)."""
        for key, name in self.names.items():
            data = getattr(snapshot, key)
            if data is not None:
                self._update(name, data, is_std=(key == "std"))

    def set_metadata(self, metadata):
        """Store ``metadata`` and the input's source path under "napari_ebm" in every output layer that exists."""
        self.metadata = {**metadata, "input_source_path": self.input_source_path}
        for name in self.names.values():
            if name in self.viewer.layers:
                self.viewer.layers[name].metadata["napari_ebm"] = self.metadata

    def _update(self, name, data, is_std):
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if layer.data.shape != data.shape or not np.array_equal(layer.scale, self.scale):
                # A layer of the same name from a run on another volume: replace its data and geometry.
                layer.scale = self.scale
                layer.translate = self.input_layer.translate
            layer.data = data
            if is_std:
                layer.contrast_limits = _std_limits(data)
            return

        limits = _std_limits(data) if is_std else tuple(self.input_layer.contrast_limits)
        layer = self.viewer.add_image(
            data,
            name=name,
            scale=self.scale,
            translate=self.input_layer.translate,
            contrast_limits=limits,
            colormap="magma" if is_std else "gray",
            # The std map would cover the mean and the sample, so it starts hidden.
            visible=not is_std,
            units=self.input_layer.units,
            metadata={"napari_ebm": self.metadata},
        )
        logger.debug("created output layer %r", layer.name)


def input_source_path(layer):
    """Return the path of the file that ``layer``'s data comes from, or None.

    napari sets ``layer.source.path`` when a reader opens a file. The plugin's reader also stores
    the path under ``metadata["napari_ebm"]["source_path"]``. An output layer of an earlier run
    has neither, so it passes on the source file of that run's input.
    """
    path = getattr(layer.source, "path", None)
    if path:
        return str(path)

    metadata = layer.metadata.get("napari_ebm") or {}
    return metadata.get("source_path") or metadata.get("input_source_path")


def _std_limits(data):
    low, high = subsample_contrast_limits(data)
    return (max(0.0, low), high if high > max(0.0, low) else max(0.0, low) + float(np.finfo(np.float32).eps))
