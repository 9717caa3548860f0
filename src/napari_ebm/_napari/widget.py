"""Dock widget "EBM reconstruction": set up a run, start it in the background, watch it stream.

The widget builds a :class:`napari_ebm.run.Reconstruction` on the main thread, so every invalid
parameter is reported before a worker starts, then consumes its snapshot generator in napari's
thread worker. Pause and Stop take effect at the next snapshot, that is within one step.
Every run carries an id, and signals from an older run are ignored.
"""

import logging
import math
import threading
import time
import warnings
import weakref
from types import SimpleNamespace

import numpy as np
from napari.layers import Image
from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractSpinBox,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..errors import EBMError, ParameterError
from ..operators import OPERATORS
from ..prior_files import PRIOR_SUFFIX, PriorFileError, find_prior_files, list_available_priors, read_metadata
from ..priors import PRIORS
from ..resample import VOXEL_SIZE_TOLERANCE, format_voxel_size, fourier_resample, resampling_record, voxel_size_mismatch
from ..run import DEVICES, METHODS, Reconstruction, RunConfig, describe_prior_settings
from .plot import EnergyPlot
from .streaming import OutputLayers

logger = logging.getLogger(__name__)

# The display (output layers, progress bar, status line and energy plot) is refreshed in one
# tick, because with software OpenGL every repaint of the window recomposes the whole canvas.
# Refreshing the status four times a second and the layers once a second separately cost 25 %
# of the steps per second of a 64^3 run on 2 CPU cores. One joint tick per second still cost
# 12 to 15 % (benchmarks/bench_speed.py), so the tick comes every 2 s.
DISPLAY_INTERVAL_SECONDS = 2.0

# The first tick comes sooner, so the output layers appear soon after Start.
FIRST_DISPLAY_SECONDS = 0.2

# The next tick waits at least this many times the duration of the last one, so a slow display
# takes at most about a twentieth of the main thread. Between ticks the run copies no volumes, and
# a snapshot that arrives while the display is busy replaces the older one.
DISPLAY_BUDGET_FACTOR = 20.0


# A widget that closes during a run waits this long for the worker to finish its current step.
# A step on a large volume on a CPU can take longer. The worker thread then ends by itself after
# that step, and the widget has disconnected its signals, so nothing touches the deleted widget.
SHUTDOWN_WAIT_SECONDS = 10.0

# Last entry of the prior list, which opens a file dialog for a .safetensors prior file.
BROWSE_ITEM = "Browse..."

# Every open reconstruction widget, so that a prior trained in the "Train prior" widget can be
# added to their prior lists. Closed widgets leave the set when they are deleted.
_OPEN_WIDGETS = weakref.WeakSet()


def refresh_prior_lists():
    """Refill the prior list of every open "EBM reconstruction" widget, keeping each choice."""
    for widget in list(_OPEN_WIDGETS):
        try:
            widget.refresh_priors()
        except RuntimeError:
            # Qt has deleted a closed widget whose Python object is still alive.
            _OPEN_WIDGETS.discard(widget)
    logger.debug("prior lists of %d widgets refreshed", len(_OPEN_WIDGETS))


# Warnings of these categories are meant for developers, so a run logs them instead of showing them.
DEVELOPER_WARNINGS = (DeprecationWarning, PendingDeprecationWarning)


class WorkerFailure(EBMError):
    """An unexpected error inside a run, re-raised so napari's worker reports it.

    The GeneratorWorker that napari uses (superqt 0.9) drops a RuntimeError raised by the
    generator without emitting ``errored`` or ``finished``, because it takes it for a deleted
    Qt object. Every error therefore leaves the generator as this type instead.
    """


def forward_errors(items):
    """Yield from the iterator ``items``, re-raising unexpected errors as :class:`WorkerFailure`."""
    try:
        yield from items
    except EBMError:
        raise
    except Exception as error:  # noqa: BLE001 - forwarded to the main thread as a notification
        raise WorkerFailure(f"{type(error).__name__}: {error}") from error


class RunWorker(GeneratorWorker):
    """napari's generator worker with an event that is set once its thread has left :meth:`run`.

    The event lets a closing widget wait for its own worker alone. The class method
    ``await_workers`` would instead wait for every worker in the process, such as a training run
    of the "Train prior" widget.

    Attributes
    ----------
    done : threading.Event
        Set in the worker thread after the last signal (``finished``) was emitted.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.done = threading.Event()

    def run(self):
        try:
            super().run()
        finally:
            self.done.set()


def check_input_layer(layer, operator):
    """Raise ParameterError when ``layer`` cannot be the input of a run with ``operator``.

    Raises
    ------
    ParameterError
        If the layer's scale (its voxel size in Angstrom) is not finite and > 0 on each of the
        last three axes, or if the layer is a tilt series and ``operator`` is "wedge".
    """
    scale = [float(size) for size in layer.scale[-3:]]
    if not all(math.isfinite(size) and size > 0 for size in scale):
        raise ParameterError(
            f"layer {layer.name!r} has an invalid scale {tuple(scale)}. Each voxel size must be a finite "
            "number > 0 (Angstrom). Set the layer's scale (layer.scale in napari's console), or fix the "
            "voxel size in the file's header and open the file again"
        )

    metadata = layer.metadata.get("napari_ebm") or {}
    if metadata.get("is_stack") and operator == "wedge":
        raise ParameterError(
            f"layer {layer.name!r} is a tilt series (an image stack of projections), but the wedge operator "
            "models the missing wedge of a reconstructed tomogram. Reconstruct a tomogram from the tilt "
            "series first, for example with IMOD or AreTomo, and open that"
        )


def show_caught_warning(message, category, context):
    """Show a warning caught during a run as a warning notification, or log it for developers.

    ``context`` precedes the message, for example "at step 5".
    """
    if issubclass(category, DEVELOPER_WARNINGS):
        logger.debug("%s: %s: %s", context, category.__name__, message)
        return
    logger.info("%s: %s: %s", context, category.__name__, message)
    show_warning(f"EBM reconstruction, {context}: {message}")


def snapshot_is_finite(snapshot):
    """Return whether every volume of ``snapshot`` (those that are not None) is finite."""
    volumes = (snapshot.volume, snapshot.mean, snapshot.std)
    return all(volume is None or bool(np.isfinite(volume).all()) for volume in volumes)


def describe_unexpected_error(error):
    """Format an error that is not an :class:`EBMError` for a notification, with a hint for MemoryError."""
    text = f"preparing the run failed with {type(error).__name__}"
    if str(error):
        text += f": {error}"
    if isinstance(error, MemoryError):
        text += ". There is not enough free memory for this run. Close other programs or layers, or crop the volume"
    return text


def prior_file_metadata(name_or_path):
    """Read the metadata of the prior file that ``name_or_path`` names, without loading its weights.

    Returns None for a registered hand-made prior, an unknown name or an invalid file. The run
    reports the last two when it resolves the prior.
    """
    if name_or_path in PRIORS:
        return None

    if str(name_or_path).endswith(PRIOR_SUFFIX):
        path = name_or_path
    else:
        path = find_prior_files().get(name_or_path)
        if path is None:
            return None

    try:
        return read_metadata(path)
    except PriorFileError as error:
        logger.debug("no voxel-size check for prior %r: %s", name_or_path, error)
        return None


def parse_optional_positive(text, label):
    """Return None for "auto" or an empty field, else a finite float > 0.

    Raises
    ------
    ParameterError
        Naming ``label`` and the text, for anything else (0, negative, NaN, not a number).
    """
    text = text.strip()
    if text.lower() in ("", "auto"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ParameterError(f"invalid {label} {text!r}: enter a number > 0, or 'auto'")
    return value


class ReconstructionWidget(QWidget):
    """Dock widget that runs MAP or Langevin reconstruction on a 3D image layer.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    """

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self._worker = None
        self._worker_slots = []
        self._generator = None
        self._run_id = None
        self._reconstruction = None
        self._received_step = 0
        self._warnings_seen = {}
        self._outputs = None
        self._trace = []
        self._last = None
        self._pending = None
        self._paused = False
        self._stopping = False
        self._display_ended = True
        self._started_at = 0.0
        self._watched_layer = None

        self._build_controls()
        self._build_layout()
        self.refresh_layers()
        self.refresh_priors()
        self._set_running(False)
        _OPEN_WIDGETS.add(self)

        for event in self._layer_list_events():
            event.connect(self.refresh_layers)
        self.destroyed.connect(lambda *_: self._shutdown())

    def _layer_list_events(self):
        events = self.viewer.layers.events
        return (events.inserted, events.removed, events.moved, events.changed)

    # ---- construction --------------------------------------------------------------------

    def _build_controls(self):
        self.input_combo = QComboBox()
        self.input_combo.setToolTip("3D image layer to reconstruct")
        self.input_combo.currentTextChanged.connect(self.update_voxel_size_check)

        self.operator_combo = QComboBox()
        self.operator_combo.addItems(OPERATORS.names())
        self.operator_combo.setCurrentText("wedge")
        self.operator_combo.setToolTip("denoise: no missing wedge; wedge: single-axis tilt about Y")
        self.operator_combo.currentTextChanged.connect(self._update_enabled)

        self.tilt_min = self._double_spin(-90.0, 90.0, -60.0, 1)
        self.tilt_max = self._double_spin(-90.0, 90.0, 60.0, 1)
        for spin in (self.tilt_min, self.tilt_max):
            # Two spin boxes share a row; without the arrow buttons "-60.0" fits.
            spin.setButtonSymbols(QAbstractSpinBox.ButtonSymbols.NoButtons)

        self.prior_combo = QComboBox()
        self.prior_combo.currentTextChanged.connect(self._on_prior_chosen)
        self._prior_choice = "tv"

        self.resample_check = QCheckBox("Resample to the prior's voxel size")
        self.resample_check.setToolTip(
            f"When the input layer's voxel size differs from the learned prior's training voxel size by more "
            f"than {VOXEL_SIZE_TOLERANCE:.0%}, Start first resamples the input to the prior's voxel size by "
            "Fourier cropping or padding. The output layers then have that voxel size and the input's origin."
        )
        self.resample_check.toggled.connect(self.update_voxel_size_check)
        self.voxel_size_note = QLabel("")
        self.voxel_size_note.setWordWrap(True)
        # Without a minimum vertical policy a short dock squeezes the wrapped text to one line.
        self.voxel_size_note.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
        self.voxel_size_note.setVisible(False)

        self.weight_spin = self._double_spin(-1.0, 1e6, -1.0, 4)
        self.weight_spin.setSpecialValueText("recommended")
        self.weight_spin.setToolTip(
            "weight of the prior energy, >= 0; 'recommended' uses the prior file's recommended weight, or 1 for l2, smooth and tv"
        )

        self.sigma_edit = QLineEdit("auto")
        self.sigma_edit.setToolTip("noise standard deviation in the input's intensity units, or 'auto' to estimate it")

        self.method_combo = QComboBox()
        self.method_combo.addItems(METHODS)
        self.method_combo.setToolTip("map: lowest-energy volume; langevin: posterior samples, mean and std")
        self.method_combo.currentTextChanged.connect(self._update_enabled)

        self.temperature_spin = self._double_spin(-1.0, 1e6, -1.0, 4)
        self.temperature_spin.setSpecialValueText("recommended")
        self.temperature_spin.setToolTip(
            "T >= 0 of p(x) ~ exp(-E(x)/T); 0 is gradient descent; 'recommended' uses the prior file's "
            "recommended temperature, or 1 for l2, smooth and tv"
        )

        self.step_size_edit = QLineEdit("auto")
        self.step_size_edit.setToolTip("step size in normalised units (> 0), or 'auto' for a fraction of 1/L")

        # The CLI's default too. phantom_dsm MAP is best near 100 steps and loses PSNR after.
        self.steps_spin = self._int_spin(1, 10_000_000, 100)
        self.burn_in_spin = self._int_spin(0, 10_000_000, 50)
        self.burn_in_spin.setToolTip("Langevin steps discarded before the mean and std start")
        self.map_start_spin = self._int_spin(0, 10_000_000, 0)
        self.map_start_spin.setToolTip(
            "Langevin: the first N steps are MAP steps, so the chain starts near the posterior mode; "
            "they count as burn-in"
        )
        self.thin_spin = self._int_spin(1, 1_000_000, 1)
        self.seed_spin = self._int_spin(-1, 2**31 - 1, -1)
        self.seed_spin.setSpecialValueText("random")
        self.seed_spin.setToolTip("seed of the run's random generator; 'random' draws one, shown after Start")

        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)

        self.normalize_check = QCheckBox("normalise intensities (mean 0, std 1)")
        self.normalize_check.setChecked(True)
        self.normalize_check.setToolTip(
            "Scale the input to mean 0 and standard deviation 1 before the run; outputs are in the input's "
            "units. With a trained prior the scale is the estimated standard deviation of the clean signal."
        )

        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.pause_button = QPushButton("Pause")
        self.pause_button.clicked.connect(self.toggle_pause)
        self.stop_button = QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop)

        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m steps")
        self.status = QLabel("idle")
        self.status.setWordWrap(True)
        self.run_info = QLabel("")
        self.run_info.setWordWrap(True)
        self.run_info.setToolTip("values the last run used, after 'auto' was resolved")
        self.plot = EnergyPlot()
        self._display_timer = QTimer(self)
        self._display_timer.setSingleShot(True)
        self._display_timer.timeout.connect(self._display_tick)

    @staticmethod
    def _double_spin(low, high, value, decimals, suffix=""):
        spin = QDoubleSpinBox()
        spin.setRange(low, high)
        spin.setDecimals(decimals)
        spin.setValue(value)
        spin.setSuffix(suffix)
        return spin

    @staticmethod
    def _int_spin(low, high, value):
        spin = QSpinBox()
        spin.setRange(low, high)
        spin.setValue(value)
        return spin

    def _build_layout(self):
        form = QFormLayout()
        form.addRow("input layer", self.input_combo)
        form.addRow("operator", self.operator_combo)
        tilt = QHBoxLayout()
        tilt.addWidget(self.tilt_min)
        tilt.addWidget(self.tilt_max)
        form.addRow("tilt range (deg)", tilt)
        form.addRow("prior", self.prior_combo)
        form.addRow(self.resample_check)
        form.addRow(self.voxel_size_note)
        form.addRow("weight", self.weight_spin)
        form.addRow("noise sigma", self.sigma_edit)
        form.addRow("method", self.method_combo)
        form.addRow("temperature T", self.temperature_spin)
        form.addRow("step size", self.step_size_edit)
        form.addRow("steps", self.steps_spin)
        form.addRow("burn-in", self.burn_in_spin)
        form.addRow("MAP start steps", self.map_start_spin)
        form.addRow("thinning", self.thin_spin)
        form.addRow("seed", self.seed_spin)
        form.addRow("device", self.device_combo)
        form.addRow(self.normalize_check)

        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.pause_button)
        buttons.addWidget(self.stop_button)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.run_info)
        layout.addWidget(self.plot)
        layout.addStretch(1)

    # ---- choices -------------------------------------------------------------------------

    def refresh_layers(self, event=None):
        """Fill the input list with the 3D image layers, keeping the current choice if it exists."""
        current = self.input_combo.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image) and layer.ndim == 3]
        outputs = set(self._outputs.names.values()) if self._outputs else set()
        names = [name for name in names if name not in outputs] + [name for name in names if name in outputs]
        self.input_combo.blockSignals(True)
        self.input_combo.clear()
        self.input_combo.addItems(names)
        if current in names:
            self.input_combo.setCurrentText(current)
        self.input_combo.blockSignals(False)
        self.update_voxel_size_check()

    def refresh_priors(self):
        """Fill the prior list from the registry and the prior folders, then "Browse..."."""
        current = self.prior_combo.currentText() or "tv"
        self.prior_combo.blockSignals(True)
        self.prior_combo.clear()
        for name, description, voxel_size in list_available_priors():
            if voxel_size is not None:
                description = f"{description} (trained at {voxel_size:g} A per voxel)"
            self.prior_combo.addItem(name)
            self.prior_combo.setItemData(self.prior_combo.count() - 1, description, Qt.ItemDataRole.ToolTipRole)
        self.prior_combo.addItem(BROWSE_ITEM)
        self.prior_combo.setCurrentText(current if self.prior_combo.findText(current) >= 0 else "tv")
        self._prior_choice = self.prior_combo.currentText()
        self.prior_combo.blockSignals(False)
        self.update_voxel_size_check()

    def _on_prior_chosen(self, text):
        if text != BROWSE_ITEM:
            self._prior_choice = text
            self.update_voxel_size_check()
            return
        path, _ = QFileDialog.getOpenFileName(self, "Open a trained prior", "", "Prior files (*.safetensors)")
        self.prior_combo.blockSignals(True)
        if path:
            if self.prior_combo.findText(path) < 0:
                self.prior_combo.insertItem(self.prior_combo.count() - 1, path)
            self.prior_combo.setCurrentText(path)
            self._prior_choice = path
        else:
            self.prior_combo.setCurrentText(self._prior_choice)
        self.prior_combo.blockSignals(False)
        self.update_voxel_size_check()

    def prior_voxel_size_mismatch(self, layer):
        """Compare ``layer``'s voxel size with the training voxel size of the chosen prior.

        The layer's scale is its voxel size in Angstrom. Hand-made priors have no training voxel
        size, so they never mismatch.

        NOTE: the scale is read as Angstrom whatever the layer's units, as the MRC writer does,
        so a layer scaled in nanometres or pixels is compared wrongly.

        Returns
        -------
        tuple of (str, float) or None
            The warning message and the prior's training voxel size in Angstrom when they
            differ by more than ``VOXEL_SIZE_TOLERANCE``, else None.
        """
        if layer is None:
            return None

        metadata = prior_file_metadata(self.prior_combo.currentText())
        if metadata is None:
            return None

        # An invalid scale is reported by Start, naming the layer and the fix.
        if not all(math.isfinite(float(size)) and size > 0 for size in layer.scale[-3:]):
            return None

        # voxel_size_mismatch reads only the prior's metadata, so the weights need not be loaded.
        message = voxel_size_mismatch(SimpleNamespace(metadata=metadata), tuple(layer.scale[-3:]))
        if message is None:
            return None
        return message, float(metadata["training_voxel_size"])

    def update_voxel_size_check(self, *_):
        """Show or hide the voxel-size note for the chosen input layer and prior.

        The note follows the choice of layer and prior, the resample box and the layer's scale.
        """
        layer = self.input_layer()
        self._watch_layer_scale(layer)
        mismatch = self.prior_voxel_size_mismatch(layer)
        if mismatch is None:
            self.voxel_size_note.setText("")
            self.voxel_size_note.setVisible(False)
            return

        _, target = mismatch
        sizes = layer.scale[-3:]
        mean_size = float(np.mean(sizes))
        voxel_size = format_voxel_size(sizes)
        if not np.allclose(sizes, mean_size, rtol=1e-6):
            voxel_size += f" (mean {mean_size:.4g} A)"
        text = (
            f"The voxel size of {layer.name!r}, {voxel_size}, differs from the {target:g} A that prior "
            f"{self.prior_combo.currentText()!r} was trained at by more than {VOXEL_SIZE_TOLERANCE:.0%}."
        )
        if self.resample_check.isChecked():
            text += f" Start resamples the input to about {target:g} A before the run."
        else:
            text += f" Check the box above to resample the input to about {target:g} A, or expect a poorer result."
        self.voxel_size_note.setText(text)
        self.voxel_size_note.setVisible(True)

    def _watch_layer_scale(self, layer):
        if layer is self._watched_layer:
            return
        if self._watched_layer is not None:
            self._watched_layer.events.scale.disconnect(self.update_voxel_size_check)
        if layer is not None:
            layer.events.scale.connect(self.update_voxel_size_check)
        self._watched_layer = layer

    def _update_enabled(self, *_):
        running = self._worker is not None
        wedge = self.operator_combo.currentText() == "wedge"
        langevin = self.method_combo.currentText() == "langevin"
        self.tilt_min.setEnabled(wedge and not running)
        self.tilt_max.setEnabled(wedge and not running)
        for control in (self.temperature_spin, self.burn_in_spin, self.map_start_spin, self.thin_spin):
            control.setEnabled(langevin and not running)

    def _set_running(self, running):
        for control in (
            self.input_combo, self.operator_combo, self.prior_combo, self.weight_spin, self.sigma_edit,
            self.method_combo, self.step_size_edit, self.steps_spin, self.seed_spin, self.device_combo,
            self.normalize_check, self.resample_check, self.start_button,
        ):
            control.setEnabled(not running)
        self.pause_button.setEnabled(running)
        self.stop_button.setEnabled(running)
        self.pause_button.setText("Pause")
        self._update_enabled()

    # ---- run control ---------------------------------------------------------------------

    def config(self):
        """Return the :class:`RunConfig` set in the controls.

        Raises
        ------
        ParameterError
            If a text field contains an invalid value.
        """
        return RunConfig(
            method=self.method_combo.currentText(),
            operator=self.operator_combo.currentText(),
            tilt_range=(self.tilt_min.value(), self.tilt_max.value()),
            prior=self.prior_combo.currentText(),
            weight=None if self.weight_spin.value() < 0 else self.weight_spin.value(),
            noise_sigma=parse_optional_positive(self.sigma_edit.text(), "noise sigma"),
            steps=self.steps_spin.value(),
            step_size=parse_optional_positive(self.step_size_edit.text(), "step size"),
            temperature=None if self.temperature_spin.value() < 0 else self.temperature_spin.value(),
            burn_in=self.burn_in_spin.value(),
            map_start_steps=self.map_start_spin.value() if self.method_combo.currentText() == "langevin" else 0,
            thin=self.thin_spin.value(),
            seed=None if self.seed_spin.value() < 0 else self.seed_spin.value(),
            device=self.device_combo.currentText(),
            normalize=self.normalize_check.isChecked(),
            preview_every=self.steps_spin.value(),
        )

    def input_layer(self):
        """Return the chosen input layer, or None when none is chosen."""
        name = self.input_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def start(self):
        """Validate the controls, prepare the run and start it in a worker thread.

        Returns True when a worker started. Invalid input, or any other error while preparing
        the run, gives an error notification, the status line shows the reason, and no worker
        starts. Warnings raised while preparing the run become warning notifications.
        """
        if self._worker is not None:
            return False

        layer = self.input_layer()
        if layer is None:
            self._fail_before_start("choose a 3D image layer as input (open a tomogram first)")
            return False
        try:
            config = self.config()
            check_input_layer(layer, config.operator)
            data, resampled = self._input_data(layer)
            reconstruction = self._create_reconstruction(data, config)
        except EBMError as error:
            self._fail_before_start(str(error))
            return False
        except Exception as error:  # noqa: BLE001 - shown as a notification instead of a traceback
            logger.exception("preparing the run on layer %r failed", layer.name)
            self._fail_before_start(describe_unexpected_error(error))
            return False

        self._reconstruction = reconstruction
        self._run_id = reconstruction.run_id
        scale = None if resampled is None else resampled["to_voxel_size"]
        self._outputs = OutputLayers(self.viewer, layer, config.method, scale=scale)
        self._outputs.set_metadata({
            "run_id": self._run_id,
            "input": layer.name,
            "resampled": resampled,
            "parameters": reconstruction.parameters(),
        })
        self._trace = []
        self._last = None
        self._pending = None
        self._received_step = 0
        self._warnings_seen = {}
        self._stopping = False
        self._display_ended = False
        self.plot.clear()
        self.progress.setRange(0, config.steps)
        self.progress.setValue(0)
        sigma_source = "estimated" if reconstruction.noise_sigma_estimated else "given"
        self.status.setText("starting")
        run_info = (
            f"{describe_prior_settings(reconstruction)}noise sigma {reconstruction.noise_sigma:.4g} ({sigma_source}), step size {reconstruction.step_size:.4g}, "
            f"seed {reconstruction.seed}, device {reconstruction.device}"
        )
        if resampled is not None:
            run_info += (
                f", input resampled from {format_voxel_size(resampled['from_voxel_size'])} "
                f"to {format_voxel_size(resampled['to_voxel_size'])}"
            )
        self.run_info.setText(run_info)

        run_id = self._run_id
        self._generator = reconstruction.snapshots()
        worker = create_worker(
            forward_errors, self._generator, _start_thread=False, _ignore_errors=True, _worker_class=RunWorker
        )
        self._worker_slots = [
            (worker.yielded, lambda snapshot: self._on_yielded(run_id, snapshot)),
            (worker.errored, lambda error: self._on_errored(run_id, error)),
            (worker.warned, lambda warning: self._on_warned(run_id, warning)),
            (worker.aborted, lambda: self._on_aborted(run_id)),
            (worker.finished, lambda: self._on_finished(run_id)),
        ]
        for signal, slot in self._worker_slots:
            signal.connect(slot)
        self._worker = worker
        self._set_running(True)
        self._started_at = time.perf_counter()
        logger.debug("run %s: starting %s on layer %r", run_id, config.method, layer.name)
        reconstruction.request_preview()
        self._display_timer.start(int(FIRST_DISPLAY_SECONDS * 1000))
        worker.start()
        return True

    def _create_reconstruction(self, data, config):
        """Create the :class:`Reconstruction` and show the warnings raised meanwhile as notifications.

        Warnings are shown even when the construction fails, before its error.
        """
        # NOTE: catch_warnings changes the process-wide warning state. A warning that a worker
        # thread raises meanwhile, such as one of the "Train prior" widget, is caught here too.
        caught = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return Reconstruction(data, config)
        finally:
            for warning in caught:
                show_caught_warning(warning.message, warning.category, "preparing the run")

    def _input_data(self, layer):
        """Prepare the run's input volume, and resample it when the box is checked and the voxel sizes mismatch.

        A mismatch with the box unchecked gives a warning notification and leaves the volume as it is.

        Returns
        -------
        data : array-like
            ``layer.data``, or its float32 resampled copy.
        resampled : dict or None
            The voxel sizes (z, y, x) in Angstrom and the shapes before and after resampling,
            recorded in the output layers' metadata. None when the input was not resampled.
        """
        self.update_voxel_size_check()
        mismatch = self.prior_voxel_size_mismatch(layer)
        if mismatch is None:
            return layer.data, None

        message, target = mismatch
        if not self.resample_check.isChecked():
            show_warning(f"EBM reconstruction: {message}")
            return layer.data, None

        voxel_size = tuple(float(size) for size in layer.scale[-3:])
        data, new_voxel_size = fourier_resample(layer.data, voxel_size, target)
        message = (
            f"resampled {tuple(layer.data.shape)} at {format_voxel_size(voxel_size)} "
            f"to {data.shape} at {format_voxel_size(new_voxel_size)}"
        )
        logger.info("layer %r: %s", layer.name, message)
        show_info(f"EBM reconstruction: {message}")
        return data, resampling_record(layer.data.shape, voxel_size, data.shape, new_voxel_size)

    def toggle_pause(self):
        """Pause the running worker at its next step, or resume it."""
        if self._worker is None:
            return
        if self._paused:
            self._worker.resume()
            self._paused = False
            self.pause_button.setText("Pause")
            logger.debug("run %s: resume requested", self._run_id)
        else:
            self._worker.pause()
            self._paused = True
            self.pause_button.setText("Resume")
            logger.debug("run %s: pause requested", self._run_id)

    def stop(self):
        """Stop the run at its next step; the layers keep the last volumes shown.

        Snapshots that the worker produced before it saw the request but that have not been
        shown yet are dropped, so nothing changes on screen after Stop.
        """
        if self._worker is None:
            return
        logger.debug("run %s: stop requested", self._run_id)
        self._stopping = True
        self._pending = None
        if self._paused:
            self._worker.resume()
            self._paused = False
        self._worker.quit()
        self.stop_button.setEnabled(False)
        self.pause_button.setEnabled(False)

    def is_running(self):
        return self._worker is not None

    def _fail_before_start(self, message):
        logger.debug("not started: %s", message)
        self.status.setText(f"not started: {message}")
        show_error(f"EBM reconstruction not started: {message}")

    # ---- worker signals (main thread) ----------------------------------------------------

    def _on_yielded(self, run_id, snapshot):
        if run_id != self._run_id:
            return
        self._received_step = snapshot.step
        if self._stopping:
            return

        self._last = snapshot
        weighted_prior = snapshot.energy - snapshot.data_energy
        self._trace.append((snapshot.step, snapshot.energy, snapshot.data_energy, snapshot.prior_energy))
        self.plot.append(snapshot.step, snapshot.energy, snapshot.data_energy, weighted_prior)

        if snapshot.volume is not None:
            self._pending = snapshot

    def _display_tick(self):
        """Show the latest progress and volumes, then ask the run for fresh volumes."""
        if self._worker is None:
            return

        started = time.perf_counter()
        self._refresh_display()
        self._reconstruction.request_preview()

        # A zero-delay timer fires once Qt has handled the repaints that the tick posted.
        run_id = self._run_id
        QTimer.singleShot(0, lambda: self._schedule_tick(run_id, started))

    def _schedule_tick(self, run_id, tick_started):
        if run_id != self._run_id or self._worker is None:
            return
        cost = time.perf_counter() - tick_started
        delay = max(DISPLAY_INTERVAL_SECONDS, DISPLAY_BUDGET_FACTOR * cost)
        logger.debug("run %s: display tick took %.3f s, next in %.2f s", run_id, cost, delay)
        self._display_timer.start(int(delay * 1000))

    def _refresh_display(self):
        snapshot, self._pending = self._pending, None
        if snapshot is not None and self._outputs is not None and snapshot.run_id == self._run_id:
            self._outputs.apply(snapshot)

        self.plot.update()
        last = self._last
        if last is None or last.run_id != self._run_id:
            return
        self.progress.setValue(last.step)
        text = f"step {last.step}/{last.steps}   E = {last.energy:.6g}   {last.steps_per_second:.1f} steps/s"
        if last.method == "langevin":
            text += f"   samples {last.samples}"
        if self._paused:
            text += "   (paused)"
        self.status.setText(text)

    def _end_display(self):
        """Stop the ticks and show the final state once; later calls in the same run do nothing."""
        if self._display_ended:
            return
        self._display_ended = True
        self._display_timer.stop()
        self._refresh_display()

    def _on_errored(self, run_id, error):
        if run_id != self._run_id:
            return
        logger.debug("run %s errored: %s", run_id, error)
        last = getattr(error, "last_snapshot", None)
        if last is not None and last.volume is not None:
            self._pending = last
        self._end_display()
        self.status.setText(f"failed: {error}")
        show_error(f"EBM reconstruction failed: {error}")

    def _on_warned(self, run_id, warning):
        """Show a warning raised inside the run, naming its step. Repeats of it are logged and counted.

        ``warning`` contains the arguments of ``warnings.showwarning``, starting with the message
        and the category.
        """
        if run_id != self._run_id:
            return

        # The worker emits its signals in order, so every step before the one that warned has
        # already been received.
        step = self._received_step + 1
        message, category = warning[0], warning[1]

        key = (category, str(message))
        repeats = self._warnings_seen.get(key, 0)
        self._warnings_seen[key] = repeats + 1
        if repeats:
            logger.debug("run %s: warning at step %d repeated %d times: %s", run_id, step, repeats, message)
            return
        show_caught_warning(message, category, f"run {run_id} at step {step}")

    def _on_aborted(self, run_id):
        if run_id != self._run_id:
            return

        # The worker has left the generator, so its state can be read: show the step it
        # stopped at, at most one step after the request.
        latest = self._reconstruction.latest_snapshot()
        if latest is not None and not snapshot_is_finite(latest):
            # The update of the last step left non-finite voxels, which the next step would have
            # reported. The layers keep the volumes shown before.
            logger.info("run %s: the state at step %d is not finite; keeping the volumes shown", run_id, latest.step)
            latest = None
        if latest is not None:
            if not self._trace or self._trace[-1][0] < latest.step:
                self._trace.append((latest.step, latest.energy, latest.data_energy, latest.prior_energy))
                self.plot.append(latest.step, latest.energy, latest.data_energy, latest.energy - latest.data_energy)
            self._last = latest
            self._pending = latest
        self._end_display()
        step = self._last.step if self._last is not None else 0
        self.status.setText(f"stopped at step {step}; the layers keep the last volumes shown")
        logger.debug("run %s aborted", run_id)

    def _on_finished(self, run_id):
        if run_id != self._run_id:
            return
        self._end_display()
        if self._outputs is not None:
            metadata = dict(self._outputs.metadata)
            metadata["energy_trace"] = {
                "columns": ["step", "energy", "data_energy", "prior_energy"],
                "rows": list(self._trace),
            }
            self._outputs.set_metadata(metadata)
        if self._last is not None and self._last.done:
            elapsed = time.perf_counter() - self._started_at
            ending = "converged" if self._last.converged else "finished"
            self.status.setText(f"{ending} after {self._last.step} steps in {elapsed:.1f} s")
            show_info(f"EBM reconstruction {ending} after {self._last.step} steps in {elapsed:.1f} s")
        self._release_run()
        self._paused = False
        self._set_running(False)
        logger.debug("run %s finished; widget idle", run_id)

    def _release_run(self):
        """Disconnect the worker and drop the references to it, its generator and the Reconstruction.

        The layers keep the output volumes, and the Reconstruction's tensors (input, operator,
        prior, state) are freed before the next run. Call only when the worker thread no longer
        uses the generator.
        """
        self._disconnect_worker()
        if self._generator is not None:
            # A stopped run leaves its generator suspended, which keeps the Reconstruction alive.
            self._generator.close()
            self._generator = None
        self._worker = None
        self._reconstruction = None

    def _disconnect_worker(self):
        for signal, slot in self._worker_slots:
            try:
                signal.disconnect(slot)
            except (TypeError, RuntimeError) as error:
                logger.debug("run %s: signal already disconnected: %s", self._run_id, error)
        self._worker_slots = []

    def _shutdown(self):
        """Stop this widget's worker and wait for its thread, so no run outlives the widget.

        Called when the widget is destroyed, for example when the viewer closes: its Qt children
        are already deleted, so only Python state and the worker are touched.
        """
        self._watch_layer_scale(None)
        for event in self._layer_list_events():
            event.disconnect(self.refresh_layers)

        worker = self._worker
        if worker is None:
            return

        run_id = self._run_id
        logger.debug("run %s: widget closing, stopping the worker", run_id)

        # Signals that are already queued refer to this run id and are ignored from now on.
        self._run_id = None
        self._disconnect_worker()
        worker.quit()
        if self._paused:
            worker.resume()

        if worker.done.wait(SHUTDOWN_WAIT_SECONDS):
            self._release_run()
            logger.debug("run %s: worker stopped", run_id)
        else:
            # The generator is still running in the worker thread, so it must not be closed here.
            self._generator = None
            self._worker = None
            self._reconstruction = None
            logger.warning(
                "run %s: the worker did not stop within %.0f s after the widget closed; "
                "its thread ends after the current step",
                run_id, SHUTDOWN_WAIT_SECONDS,
            )
