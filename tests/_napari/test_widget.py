"""The "EBM reconstruction" dock widget in a real napari viewer (run under xvfb-run)."""

import time

import numpy as np
import pytest
from napari.utils.notifications import NotificationSeverity, notification_manager
from prior_helpers import CallCountingPrior

from napari_ebm._napari.widget import ReconstructionWidget
from napari_ebm.cli import build_parser
from napari_ebm.resample import fourier_resample

pytestmark = pytest.mark.gui

RUN_TIMEOUT_MS = 120_000


@pytest.fixture
def widget(make_napari_viewer):
    viewer = make_napari_viewer()
    volume = np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32)
    volume[8:24, 8:24, 8:24] += 2.0
    viewer.add_image(volume, name="cube", scale=(4.0, 3.0, 2.0), translate=(10.0, 20.0, 30.0))
    _, dock = viewer.window.add_plugin_dock_widget("napari-ebm", "EBM reconstruction")
    return dock


def wait_idle(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.is_running(), timeout=RUN_TIMEOUT_MS)


def error_messages():
    return [str(n.message) for n in notification_manager.records if n.severity == NotificationSeverity.ERROR]


def test_widget_docks_from_manifest(widget):
    assert isinstance(widget, ReconstructionWidget)
    assert widget.input_combo.currentText() == "cube"


def test_langevin_streams_into_three_layers(widget, qtbot):
    viewer = widget.viewer
    widget.method_combo.setCurrentText("langevin")
    widget.steps_spin.setValue(30)
    widget.burn_in_spin.setValue(5)

    assert widget.start()
    qtbot.waitUntil(lambda: "cube sample" in viewer.layers, timeout=RUN_TIMEOUT_MS)
    sample_id = viewer.layers["cube sample"].unique_id
    wait_idle(qtbot, widget)

    names = [layer.name for layer in viewer.layers]
    assert names == ["cube", "cube sample", "cube mean", "cube std"]
    assert viewer.layers["cube sample"].unique_id == sample_id
    for name in ("cube sample", "cube mean", "cube std"):
        layer = viewer.layers[name]
        assert layer.data.shape == (32, 32, 32)
        np.testing.assert_allclose(layer.scale, (4.0, 3.0, 2.0))
        np.testing.assert_allclose(layer.translate, (10.0, 20.0, 30.0))
    assert float(viewer.layers["cube std"].data.max()) > 0.0
    assert "noise sigma" in widget.run_info.text()
    assert "(estimated)" in widget.run_info.text()
    assert "weight" in widget.run_info.text()


def test_output_metadata_keeps_trace(widget, qtbot):
    widget.method_combo.setCurrentText("map")
    widget.steps_spin.setValue(12)
    widget.sigma_edit.setText("0.5")

    assert widget.start()
    wait_idle(qtbot, widget)

    metadata = widget.viewer.layers["cube MAP"].metadata["napari_ebm"]
    rows = metadata["energy_trace"]["rows"]
    assert len(rows) >= 1
    assert rows[-1][1] < rows[0][1]
    assert metadata["parameters"]["noise_sigma_used"] == pytest.approx(0.5)
    assert "noise sigma 0.5 (given)" in widget.run_info.text()
    assert widget.plot.steps[-1] == rows[-1][0]


def test_map_start_reaches_run(widget, qtbot):
    widget.method_combo.setCurrentText("langevin")
    widget.burn_in_spin.setValue(3)
    widget.map_start_spin.setValue(3)

    assert widget.config().map_start_steps == 3

    widget.method_combo.setCurrentText("map")

    assert not widget.map_start_spin.isEnabled()
    assert widget.config().map_start_steps == 0


def test_default_steps_match_cli(widget):
    cli_defaults = build_parser().parse_args(["reconstruct", "input.mrc", "--out", "out.mrc"])

    assert widget.config().steps == cli_defaults.steps


def test_temperature_unset_uses_recommended(widget):
    widget.method_combo.setCurrentText("langevin")

    assert widget.temperature_spin.text() == "recommended"
    assert widget.config().temperature is None

    widget.temperature_spin.setValue(0.3)

    assert widget.config().temperature == pytest.approx(0.3)


def test_second_run_reuses_layers(widget, qtbot):
    viewer = widget.viewer
    widget.method_combo.setCurrentText("langevin")
    widget.steps_spin.setValue(8)
    widget.burn_in_spin.setValue(2)
    widget.start()
    wait_idle(qtbot, widget)
    first_ids = [viewer.layers[name].unique_id for name in ("cube sample", "cube mean", "cube std")]

    widget.seed_spin.setValue(5)
    widget.start()
    wait_idle(qtbot, widget)

    assert len(viewer.layers) == 4
    assert [viewer.layers[name].unique_id for name in ("cube sample", "cube mean", "cube std")] == first_ids


class CountingPrior(CallCountingPrior):
    """l2 energy that counts its evaluations, one per Langevin step, and takes at least 20 ms each.

    The count is the class attribute ``total_calls``, so a test can read it while the run's worker
    evaluates the prior.
    """

    name = "counting_l2"

    def on_call(self, calls, x, energy):
        time.sleep(0.02)
        return energy


@pytest.fixture
def counting_prior(register_prior):
    return register_prior("counting_l2", CountingPrior, "l2 energy that counts its evaluations")


def test_stop_aborts_within_one_step(counting_prior, widget, qtbot):
    widget.method_combo.setCurrentText("langevin")
    widget.prior_combo.setCurrentText(counting_prior)
    widget.steps_spin.setValue(1_000_000)
    widget.burn_in_spin.setValue(0)

    assert widget.start()
    qtbot.waitUntil(lambda: len(widget._trace) >= 3, timeout=RUN_TIMEOUT_MS)
    step_shown_at_stop = widget._trace[-1][0]
    step_started_at_stop = CountingPrior.total_calls
    widget.stop_button.click()
    wait_idle(qtbot, widget)
    qtbot.wait(200)

    layer = widget.viewer.layers["cube sample"]
    final_step = layer.metadata["napari_ebm"]["energy_trace"]["rows"][-1][0]
    assert final_step >= step_shown_at_stop
    assert final_step <= step_started_at_stop + 1
    assert widget._trace[-1][0] == final_step
    assert widget.progress.value() == final_step
    assert widget.status.text().startswith(f"stopped at step {final_step};")
    assert widget.start_button.isEnabled()
    assert layer.data.shape == (32, 32, 32)
    assert np.isfinite(layer.data).all()


def test_pause_holds_the_run(widget, qtbot):
    widget.method_combo.setCurrentText("langevin")
    widget.steps_spin.setValue(1_000_000)

    widget.start()
    qtbot.waitUntil(lambda: len(widget._trace) >= 2, timeout=RUN_TIMEOUT_MS)
    widget.pause_button.click()
    qtbot.wait(300)
    steps_paused = len(widget._trace)
    qtbot.wait(300)

    assert len(widget._trace) == steps_paused
    assert widget.pause_button.text() == "Resume"
    widget.pause_button.click()
    qtbot.waitUntil(lambda: len(widget._trace) > steps_paused, timeout=RUN_TIMEOUT_MS)
    widget.stop_button.click()
    wait_idle(qtbot, widget)


class FailsAtStepThree(CallCountingPrior):
    """l2 energy that raises on its third evaluation: one evaluation per Langevin step."""

    name = "fails_at_step_3"

    def on_call(self, calls, x, energy):
        if calls == 3:
            raise ValueError("synthetic failure in the prior")
        return energy


@pytest.fixture
def failing_prior(register_prior):
    return register_prior("fails_at_step_3", FailsAtStepThree, "raises on its third evaluation")


def test_step_error_notifies_and_recovers(make_napari_viewer, qtbot, failing_prior):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(1).normal(size=(32, 32, 32)).astype(np.float32), name="noise")
    _, widget = viewer.window.add_plugin_dock_widget("napari-ebm", "EBM reconstruction")
    widget.method_combo.setCurrentText("langevin")
    widget.prior_combo.setCurrentText(failing_prior)
    widget.steps_spin.setValue(10)
    widget.burn_in_spin.setValue(0)
    before = len(error_messages())

    assert widget.start()
    wait_idle(qtbot, widget)

    new_errors = error_messages()[before:]
    assert len(new_errors) == 1
    assert "step 3" in new_errors[0]
    assert "synthetic failure" in new_errors[0]
    assert widget.start_button.isEnabled()
    assert not widget.stop_button.isEnabled()

    widget.prior_combo.setCurrentText("l2")
    assert widget.start()
    wait_idle(qtbot, widget)
    assert widget.status.text().startswith("finished")


@pytest.mark.parametrize("field, text", [("step_size_edit", "0"), ("step_size_edit", "-1"), ("step_size_edit", "nan"), ("sigma_edit", "abc")])
def test_invalid_text_field_not_started(widget, field, text):
    getattr(widget, field).setText(text)

    started = widget.start()

    assert not started
    assert not widget.is_running()
    assert widget.status.text().startswith("not started")
    assert repr(text) in widget.status.text()


def test_divergence_keeps_finite_layer(widget, qtbot):
    widget.method_combo.setCurrentText("map")
    widget.operator_combo.setCurrentText("denoise")
    widget.prior_combo.setCurrentText("l2")
    widget.step_size_edit.setText("1e6")
    widget.steps_spin.setValue(100)

    widget.start()
    wait_idle(qtbot, widget)

    assert widget.status.text().startswith("failed")
    assert "non-finite" in widget.status.text()
    assert "at step" in widget.status.text()
    assert np.isfinite(widget.viewer.layers["cube MAP"].data).all()


def test_learned_prior_voxel_mismatch_warns(widget, qtbot):
    before = len(notification_manager.records)
    widget.prior_combo.setCurrentText("phantom_dsm")
    widget.method_combo.setCurrentText("map")
    widget.steps_spin.setValue(2)

    assert widget.start()
    wait_idle(qtbot, widget)

    messages = [str(n.message) for n in notification_manager.records[before:] if n.severity == NotificationSeverity.WARNING]
    assert any("differs from the 10 A" in message for message in messages)
    assert widget.viewer.layers["cube MAP"].data.shape == (32, 32, 32)


# The mean voxel size of this 20 x 24 x 28 layer at (20, 18, 16) A is 18 A, which differs from the
# 10 A of phantom_dsm by more than 25 %. Because of the anisotropy each axis resamples to another size.
COARSE_SHAPE = (20, 24, 28)
COARSE_SCALE = (20.0, 18.0, 16.0)
COARSE_TRANSLATE = (100.0, -50.0, 25.0)


@pytest.fixture
def coarse_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    volume = np.random.default_rng(2).normal(size=COARSE_SHAPE).astype(np.float32)
    volume[5:15, 6:18, 7:21] += 2.0
    viewer.add_image(volume, name="coarse", scale=COARSE_SCALE, translate=COARSE_TRANSLATE, units="angstrom")
    viewer.add_image(volume, name="fine", scale=(10.0, 10.0, 10.0), units="angstrom")
    _, dock = viewer.window.add_plugin_dock_widget("napari-ebm", "EBM reconstruction")
    dock.input_combo.setCurrentText("coarse")
    dock.prior_combo.setCurrentText("phantom_dsm")
    dock.method_combo.setCurrentText("map")
    dock.steps_spin.setValue(2)
    dock.seed_spin.setValue(0)
    return dock


def warning_messages(since):
    return [str(n.message) for n in notification_manager.records[since:] if n.severity == NotificationSeverity.WARNING]


def test_voxel_mismatch_offers_resample(coarse_widget):
    note = coarse_widget.voxel_size_note

    assert not coarse_widget.resample_check.isHidden()
    assert coarse_widget.resample_check.isEnabled()
    assert not coarse_widget.resample_check.isChecked()
    assert "Fourier" in coarse_widget.resample_check.toolTip()
    assert not note.isHidden()
    assert "20 x 18 x 16 A (mean 18 A)" in note.text()
    assert "10 A" in note.text()
    assert "'phantom_dsm'" in note.text()

    coarse_widget.resample_check.setChecked(True)
    assert "Start resamples the input to about 10 A" in note.text()


def test_voxel_note_follows_choices(coarse_widget):
    note = coarse_widget.voxel_size_note
    assert not note.isHidden()

    coarse_widget.input_combo.setCurrentText("fine")
    assert note.isHidden()

    coarse_widget.viewer.layers["fine"].scale = (30.0, 30.0, 30.0)
    assert not note.isHidden()
    assert "30 A" in note.text()

    coarse_widget.prior_combo.setCurrentText("tv")
    assert note.isHidden()

    coarse_widget.prior_combo.setCurrentText("phantom_dsm")
    assert not note.isHidden()

    coarse_widget.viewer.layers.remove("fine")
    assert coarse_widget.input_combo.currentText() == "coarse"
    assert "18 A" in note.text()


def test_resample_checked_outputs_prior_voxel_size(coarse_widget, qtbot):
    viewer = coarse_widget.viewer
    data = viewer.layers["coarse"].data
    expected, expected_voxel_size = fourier_resample(data, COARSE_SCALE, 10.0)
    before = len(notification_manager.records)
    coarse_widget.resample_check.setChecked(True)

    assert coarse_widget.start()
    assert not coarse_widget.resample_check.isEnabled()
    wait_idle(qtbot, coarse_widget)

    output = viewer.layers["coarse MAP"]
    assert expected.shape == (40, 43, 45)
    assert output.data.shape == expected.shape
    np.testing.assert_allclose(output.scale, expected_voxel_size, atol=1e-4)
    np.testing.assert_allclose(output.translate, COARSE_TRANSLATE)
    assert np.isfinite(output.data).all()
    assert coarse_widget.status.text().startswith("finished")
    resampled = output.metadata["napari_ebm"]["resampled"]
    np.testing.assert_allclose(resampled["from_voxel_size"], COARSE_SCALE)
    np.testing.assert_allclose(resampled["to_voxel_size"], expected_voxel_size, atol=1e-4)
    assert resampled["from_shape"] == list(COARSE_SHAPE)
    assert resampled["to_shape"] == list(expected.shape)
    assert "input resampled from 20 x 18 x 16 A" in coarse_widget.run_info.text()
    assert not any("differs from the 10 A" in message for message in warning_messages(before))
    infos = [str(n.message) for n in notification_manager.records[before:] if n.severity == NotificationSeverity.INFO]
    assert any(message.startswith("EBM reconstruction: resampled (20, 24, 28)") for message in infos)


def test_resample_unchecked_keeps_input_grid(coarse_widget, qtbot):
    viewer = coarse_widget.viewer
    before = len(notification_manager.records)

    assert coarse_widget.start()
    wait_idle(qtbot, coarse_widget)

    output = viewer.layers["coarse MAP"]
    assert output.data.shape == COARSE_SHAPE
    np.testing.assert_allclose(output.scale, COARSE_SCALE)
    np.testing.assert_allclose(output.translate, COARSE_TRANSLATE)
    assert output.metadata["napari_ebm"]["resampled"] is None
    assert coarse_widget.status.text().startswith("finished")
    warnings = warning_messages(before)
    assert any("differs from the 10 A" in message for message in warnings)
    assert any("Resample to the prior's voxel size" in message for message in warnings)


def test_resample_then_plain_run_regrids_layer(coarse_widget, qtbot):
    # The second run reuses the layer "coarse MAP" and must give it back the input's grid.
    viewer = coarse_widget.viewer
    coarse_widget.resample_check.setChecked(True)
    coarse_widget.start()
    wait_idle(qtbot, coarse_widget)
    layer_id = viewer.layers["coarse MAP"].unique_id

    coarse_widget.resample_check.setChecked(False)
    coarse_widget.start()
    wait_idle(qtbot, coarse_widget)

    output = viewer.layers["coarse MAP"]
    assert output.unique_id == layer_id
    assert output.data.shape == COARSE_SHAPE
    np.testing.assert_allclose(output.scale, COARSE_SCALE)
    np.testing.assert_allclose(output.translate, COARSE_TRANSLATE)
