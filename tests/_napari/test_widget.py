"""The "EBM reconstruction" dock widget in a real napari viewer (run under xvfb-run)."""

import numpy as np
import pytest
from napari.utils.notifications import NotificationSeverity, notification_manager

from napari_ebm._napari.widget import ReconstructionWidget
from napari_ebm.priors import PRIORS, Prior

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
    assert "(given)" in widget.run_info.text()
    assert widget.plot.steps[-1] == rows[-1][0]


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


def test_stop_aborts_within_one_step(widget, qtbot):
    widget.method_combo.setCurrentText("langevin")
    widget.steps_spin.setValue(1_000_000)
    widget.burn_in_spin.setValue(0)

    assert widget.start()
    qtbot.waitUntil(lambda: len(widget._trace) >= 3, timeout=RUN_TIMEOUT_MS)
    widget.stop_button.click()
    steps_at_stop = len(widget._trace)
    wait_idle(qtbot, widget)
    qtbot.wait(200)

    assert len(widget._trace) <= steps_at_stop + 1
    assert widget.status.text().startswith("stopped")
    assert widget.start_button.isEnabled()
    assert np.isfinite(widget.viewer.layers["cube sample"].data).all()


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


class FailsAtStepThree(Prior):
    """l2 energy that raises on its third evaluation: one evaluation per Langevin step."""

    name = "fails_at_step_3"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise ValueError("synthetic failure in the prior")
        return 0.5 * (x * x).sum()


@pytest.fixture
def failing_prior():
    PRIORS.register("fails_at_step_3", "raises on its third evaluation")(FailsAtStepThree)
    yield "fails_at_step_3"
    PRIORS.unregister("fails_at_step_3")


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
    assert "non-finite at step" in widget.status.text()
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
