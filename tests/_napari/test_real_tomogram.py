"""MAP and Langevin with the shipped prior on the real microtubule tomogram, in a real napari viewer."""

import numpy as np
import pytest

from napari_ebm.datasets import microtubule_path

pytestmark = pytest.mark.gui

RUN_TIMEOUT_MS = 120_000

TOMOGRAM_SHAPE = (36, 206, 94)
TOMOGRAM_VOXEL_SIZE = 10.52


@pytest.fixture
def tomogram_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open(microtubule_path(), plugin="napari-ebm")
    assert [layer.name for layer in layers] == ["microtubule_13pf"]
    _, dock = viewer.window.add_plugin_dock_widget("napari-ebm", "EBM reconstruction")
    dock.input_combo.setCurrentText("microtubule_13pf")
    dock.prior_combo.setCurrentText("phantom_dsm")
    dock.seed_spin.setValue(0)
    return dock


def run_to_end(qtbot, widget):
    assert widget.start()
    qtbot.waitUntil(lambda: not widget.is_running(), timeout=RUN_TIMEOUT_MS)
    assert widget.status.text().startswith("finished")


def check_output_layer(output, tomogram):
    assert output.data.shape == TOMOGRAM_SHAPE
    np.testing.assert_allclose(output.scale, (TOMOGRAM_VOXEL_SIZE,) * 3, atol=1e-4)
    np.testing.assert_allclose(output.translate, tomogram.translate)
    assert np.isfinite(output.data).all()


def test_tomogram_opens_at_its_voxel_size(tomogram_widget):
    tomogram = tomogram_widget.viewer.layers["microtubule_13pf"]

    assert tomogram.data.shape == TOMOGRAM_SHAPE
    np.testing.assert_allclose(tomogram.scale, (TOMOGRAM_VOXEL_SIZE,) * 3, atol=1e-4)
    # 10.52 A is within 25 % of the 10 A that phantom_dsm was trained at, so the widget offers no resampling.
    assert tomogram_widget.prior_combo.currentText() == "phantom_dsm"
    assert tomogram_widget.voxel_size_note.isHidden()


def test_shipped_prior_map_then_langevin(tomogram_widget, qtbot):
    viewer = tomogram_widget.viewer
    tomogram = viewer.layers["microtubule_13pf"]
    observed = np.asarray(tomogram.data, dtype=np.float32)

    tomogram_widget.method_combo.setCurrentText("map")
    tomogram_widget.steps_spin.setValue(3)
    run_to_end(qtbot, tomogram_widget)

    estimate = viewer.layers["microtubule_13pf MAP"]
    check_output_layer(estimate, tomogram)
    assert not np.allclose(estimate.data, observed)
    metadata = estimate.metadata["napari_ebm"]
    assert metadata["parameters"]["prior"] == "phantom_dsm"
    assert "weight 0.5 (the prior's default)" in tomogram_widget.run_info.text()
    assert metadata["resampled"] is None
    energies = [row[1] for row in metadata["energy_trace"]["rows"]]
    assert energies[-1] < energies[0]

    tomogram_widget.method_combo.setCurrentText("langevin")
    tomogram_widget.steps_spin.setValue(3)
    tomogram_widget.burn_in_spin.setValue(1)
    tomogram_widget.map_start_spin.setValue(1)
    run_to_end(qtbot, tomogram_widget)

    for name in ("microtubule_13pf sample", "microtubule_13pf mean", "microtubule_13pf std"):
        check_output_layer(viewer.layers[name], tomogram)
    assert not np.allclose(viewer.layers["microtubule_13pf sample"].data, observed)
    assert not np.allclose(viewer.layers["microtubule_13pf mean"].data, observed)
    assert float(viewer.layers["microtubule_13pf std"].data.max()) > 0.0
    sample_parameters = viewer.layers["microtubule_13pf sample"].metadata["napari_ebm"]["parameters"]
    assert sample_parameters["prior"] == "phantom_dsm"
    assert sample_parameters["map_start_steps"] == 1
    assert "temperature 1 (the prior's default)" in tomogram_widget.run_info.text()
