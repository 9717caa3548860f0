"""The "Train prior" dock widget in a real napari viewer."""

import pytest

from napari_ebm._napari.train_widget import TrainPriorWidget
from napari_ebm.prior_files import load_prior, resolve_prior

pytestmark = pytest.mark.gui


@pytest.fixture
def train_widget(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setattr("napari_ebm._napari.train_widget.prior_folders", lambda: [tmp_path / "package", tmp_path / "user"])
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-ebm", "Train prior")
    return widget


def test_train_widget_docks_from_manifest(train_widget):
    assert isinstance(train_widget, TrainPriorWidget)


def test_training_saves_loadable_prior(train_widget, qtbot, tmp_path):
    train_widget.name_edit.setText("tiny")
    train_widget.iterations_spin.setValue(3)

    assert train_widget.start()
    qtbot.waitUntil(lambda: not train_widget.is_running(), timeout=120_000)

    path = tmp_path / "user" / "tiny.safetensors"
    assert train_widget.status.text().startswith(f"saved {path}; drift check on held-out phantom 0: MAP ")
    metadata = load_prior(path).metadata
    assert metadata["name"] == "tiny"
    assert metadata["recommended_weight"] == 0.5
    assert train_widget.plot.steps == [1, 2, 3]


def test_drift_check_runs_after_saving(train_widget, qtbot, tmp_path):
    train_widget.name_edit.setText("checked")
    train_widget.iterations_spin.setValue(2)

    train_widget.start()
    qtbot.waitUntil(lambda: "checking MAP on held-out phantom 0" in train_widget.status.text(), timeout=120_000)

    # The check cannot be stopped, and a second training cannot start while it runs.
    assert not train_widget.stop_button.isEnabled()
    assert not train_widget.start()
    qtbot.waitUntil(lambda: not train_widget.is_running(), timeout=120_000)

    status = train_widget.status.text()
    map_psnr, input_psnr = (float(part.split(" dB")[0]) for part in status.split("MAP ")[1].split("observation "))
    assert input_psnr < 10.0
    assert status.endswith("; the prior drifts") == (map_psnr <= input_psnr)
    assert train_widget.start_button.isEnabled()


def test_stop_saves_nothing(train_widget, qtbot, tmp_path):
    train_widget.name_edit.setText("stopped")
    train_widget.iterations_spin.setValue(100_000)

    train_widget.start()
    qtbot.waitUntil(lambda: train_widget._last is not None, timeout=120_000)
    train_widget.stop_button.click()
    qtbot.waitUntil(lambda: not train_widget.is_running(), timeout=120_000)

    assert train_widget.status.text() == "stopped; nothing saved"
    assert not (tmp_path / "user" / "stopped.safetensors").exists()


def test_invalid_name_not_started(train_widget):
    train_widget.name_edit.setText("bad name/../x")

    assert not train_widget.start()
    assert train_widget.status.text().startswith("not started: invalid prior name")


def test_objective_choice_reaches_training(train_widget, qtbot):
    train_widget.name_edit.setText("with_cd")
    train_widget.iterations_spin.setValue(100_000)
    train_widget.objective_combo.setCurrentText("dsm+cd")

    assert train_widget.start()
    objective = train_widget._trainer.config.objective
    train_widget.stop_button.click()
    qtbot.waitUntil(lambda: not train_widget.is_running(), timeout=120_000)

    assert objective == "dsm+cd"


def test_widget_trains_with_shipped_settings(train_widget, qtbot):
    train_widget.name_edit.setText("like_shipped")
    train_widget.iterations_spin.setValue(100_000)

    assert train_widget.start()
    config = train_widget._trainer.config
    train_widget.stop_button.click()
    qtbot.waitUntil(lambda: not train_widget.is_running(), timeout=120_000)

    shipped = resolve_prior("phantom_dsm").metadata["training"]
    for key in ("architecture", "channels", "depth", "dilations", "noise_levels", "phantoms", "schedule"):
        assert getattr(config, key) == shipped[key], key


def test_trained_prior_reaches_open_widget(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    import napari_ebm.prior_files as prior_files

    folders = [prior_files.prior_folders()[0], tmp_path / "user"]
    monkeypatch.setattr("napari_ebm.prior_files.prior_folders", lambda: folders)
    monkeypatch.setattr("napari_ebm._napari.train_widget.prior_folders", lambda: folders)
    viewer = make_napari_viewer()
    _, reconstruction = viewer.window.add_plugin_dock_widget("napari-ebm", "EBM reconstruction")
    _, trainer = viewer.window.add_plugin_dock_widget("napari-ebm", "Train prior")
    reconstruction.prior_combo.setCurrentText("tv")
    trainer.name_edit.setText("fresh")
    trainer.iterations_spin.setValue(2)

    assert reconstruction.prior_combo.findText("fresh") == -1
    assert trainer.start()
    qtbot.waitUntil(lambda: not trainer.is_running(), timeout=120_000)

    assert reconstruction.prior_combo.findText("fresh") >= 0
    assert reconstruction.prior_combo.currentText() == "tv"
