"""Dock widget "Train prior": train an energy prior in the background with a live loss curve."""

import copy
import logging

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..errors import EBMError
from ..prior_files import prior_folders
from ..training import OBJECTIVES, SHIPPED_RECOMMENDED_WEIGHT, SHIPPED_SETTINGS, Trainer, TrainingConfig, check_drift
from .plot import EnergyPlot
from .widget import forward_errors, refresh_prior_lists

logger = logging.getLogger(__name__)


class TrainPriorWidget(QWidget):
    """Dock widget that trains a prior on phantoms or a folder of MRC volumes and saves it.

    The prior is written to the per-user prior folder, so it appears in the prior list of the
    "EBM reconstruction" widget. Stop ends training at the next iteration and saves nothing.
    After saving, a drift check (100 MAP steps on held-out phantom 0, about 10 s) runs in the
    background and warns when MAP with the new prior ends further from the truth than the
    observation. Stop does not interrupt the check.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    """

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self._worker = None
        self._trainer = None
        self._stopped = False
        self._last = None

        self.name_edit = QLineEdit("my_prior")
        self.name_edit.setToolTip("name of the prior file, written to the per-user prior folder")
        self.data_edit = QLineEdit("")
        self.data_edit.setPlaceholderText("synthetic phantoms")
        self.data_edit.setToolTip("folder of .mrc volumes to train on; empty trains on synthetic phantoms")
        self.browse_button = QPushButton("Browse...")
        self.browse_button.clicked.connect(self._browse)
        self.iterations_spin = QSpinBox()
        self.iterations_spin.setRange(1, 1_000_000)
        self.iterations_spin.setValue(SHIPPED_SETTINGS["iterations"])
        self.voxel_spin = QDoubleSpinBox()
        self.voxel_spin.setRange(0.1, 1000.0)
        self.voxel_spin.setValue(10.0)
        self.voxel_spin.setToolTip(
            "voxel size in Angstrom of the phantoms, and of data volumes whose header has none; "
            "the prior records the training volumes' own voxel size"
        )
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.objective_combo = QComboBox()
        self.objective_combo.addItems(list(OBJECTIVES))
        self.objective_combo.setToolTip(
            "dsm: denoising score matching; dsm+cd: DSM plus contrastive divergence with short "
            "Langevin chains started at the data (slower per iteration)"
        )

        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop)
        self.stop_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m iterations")
        self.status = QLabel("idle")
        self.status.setWordWrap(True)
        self.plot = EnergyPlot()
        self._timer = QTimer(self)
        self._timer.setInterval(1000)
        self._timer.timeout.connect(self._refresh)

        data_row = QHBoxLayout()
        data_row.addWidget(self.data_edit)
        data_row.addWidget(self.browse_button)
        form = QFormLayout()
        form.addRow("prior name", self.name_edit)
        form.addRow("training data", data_row)
        form.addRow("iterations", self.iterations_spin)
        form.addRow("voxel size (A)", self.voxel_spin)
        form.addRow("seed", self.seed_spin)
        form.addRow("objective", self.objective_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.stop_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.plot)
        layout.addStretch(1)

    def _browse(self):
        folder = QFileDialog.getExistingDirectory(self, "Folder of MRC volumes")
        if folder:
            self.data_edit.setText(folder)

    def output_path(self):
        """Return the prior file path in the per-user prior folder for the name entered."""
        return prior_folders()[1] / f"{self.name_edit.text().strip()}.safetensors"

    def start(self):
        """Prepare training and start it in a worker thread; return True when it started."""
        if self._worker is not None:
            return False
        name = self.name_edit.text().strip()
        try:
            if not name or not name.replace("_", "").replace("-", "").isalnum():
                raise EBMError(f"invalid prior name {name!r}: use letters, digits, '-' and '_'")
            if self.output_path().exists():
                raise EBMError(f"a prior named {name!r} exists at {self.output_path()}; choose another name")
            settings = copy.deepcopy(SHIPPED_SETTINGS)
            settings.update(
                iterations=self.iterations_spin.value(),
                voxel_size=self.voxel_spin.value(),
                data_folder=self.data_edit.text().strip() or None,
                seed=self.seed_spin.value(),
                objective=self.objective_combo.currentText(),
            )
            config = TrainingConfig(**settings)
            self._trainer = Trainer(config)
        except EBMError as error:
            self.status.setText(f"not started: {error}")
            show_error(f"Train prior not started: {error}")
            return False

        self._stopped = False
        self._last = None
        self.plot.clear()
        self.progress.setRange(0, config.iterations)
        self.status.setText(f"training on {self._trainer.data_description}")
        worker = create_worker(forward_errors, self._trainer.iterations(), _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_yielded)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.start_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self._timer.start()
        logger.debug("training of prior %r started", name)
        worker.start()
        return True

    def stop(self):
        """Stop training at the next iteration; nothing is saved."""
        if self._worker is not None:
            self._stopped = True
            self._worker.quit()
            logger.debug("training stop requested")

    def is_running(self):
        return self._worker is not None

    def _on_yielded(self, snapshot):
        self._last = snapshot
        # The plot's "total" curve shows the loss; the other two stay empty.
        self.plot.steps.append(snapshot.iteration)
        self.plot.values["total"].append(snapshot.loss)
        self.plot.values["data"].append(float("nan"))
        self.plot.values["prior"].append(float("nan"))

    def _refresh(self):
        if self._last is not None:
            self.progress.setValue(self._last.iteration)
            self.status.setText(f"iteration {self._last.iteration}/{self._last.iterations}   loss {self._last.loss:.4f}")
        self.plot.update()

    def _on_errored(self, error):
        logger.debug("training failed: %s", error)
        self.status.setText(f"failed: {error}")
        show_error(f"Train prior failed: {error}")
        self._stopped = True

    def _on_finished(self):
        self._timer.stop()
        self._refresh()
        if not self._stopped and self._last is not None and self._last.iteration == self._last.iterations:
            path = self.output_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._trainer.save_prior(
                path, path.stem, f"Train prior widget: {self._trainer.config}", recommended_weight=SHIPPED_RECOMMENDED_WEIGHT
            )
            refresh_prior_lists()
            show_info(f"Train prior: saved {path}; it is listed in the EBM reconstruction widget")
            self._start_drift_check(path)
            return

        if self._stopped and not self.status.text().startswith("failed"):
            self.status.setText("stopped; nothing saved")
        self._set_idle()

    def _start_drift_check(self, path):
        """Run :func:`check_drift` on the saved prior in a worker thread."""
        self.status.setText(f"saved {path}; checking MAP on held-out phantom 0 for drift...")
        self.stop_button.setEnabled(False)
        worker = create_worker(
            check_drift, path, self._trainer.voxel_size, SHIPPED_RECOMMENDED_WEIGHT,
            _start_thread=False, _ignore_errors=True,
        )
        worker.returned.connect(lambda check: self._on_drift_checked(path, check))
        worker.errored.connect(lambda error: self._on_drift_check_failed(path, error))
        worker.finished.connect(self._set_idle)
        self._worker = worker
        logger.debug("drift check of %s started", path)
        worker.start()

    def _on_drift_checked(self, path, check):
        logger.debug("%s: %s", path, check.summary())
        status = f"saved {path}; {check.summary()}"
        if check.drifted:
            status += "; the prior drifts"
            show_warning(
                f"Train prior: MAP with {path.name} ended further from the truth than the observation, so the "
                "prior drifts along the missing wedge. Train again with fewer iterations or another seed"
            )
        self.status.setText(status)

    def _on_drift_check_failed(self, path, error):
        logger.debug("drift check of %s failed: %s", path, error)
        self.status.setText(f"saved {path}; the drift check failed: {error}")
        show_error(f"Train prior: saved {path}, but its drift check failed: {error}")

    def _set_idle(self):
        self._worker = None
        self.start_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        logger.debug("training finished; widget idle")
