"""Reliability of runs in the "EBM reconstruction" widget: errors, warnings, stop, close, memory.

Runs under xvfb-run in a real napari viewer, with test priors registered for the test's duration.
"""

import contextlib
import gc
import logging
import threading
import time
import tracemalloc
import warnings
import weakref

import mrcfile
import numpy as np
import pytest
import torch
from napari.utils.notifications import NotificationSeverity, notification_manager
from prior_helpers import CallCountingPrior

from napari_ebm._napari.streaming import OutputLayers
from napari_ebm.priors import Prior
from napari_ebm.run import Snapshot

pytestmark = pytest.mark.gui

RUN_TIMEOUT_MS = 120_000

# Size of one float32 volume of 128^3 voxels, the unit of the memory checks.
VOLUME_BYTES = 128**3 * 4


class WarnsAtStepFive(CallCountingPrior):
    """l2 energy that raises a UserWarning at its fifth evaluation, that is at Langevin step 5."""

    name = "warns_at_step_5"

    def on_call(self, calls, x, energy):
        if calls == 5:
            warnings.warn("synthetic warning from the prior", UserWarning, stacklevel=3)
        return energy


class WarnsWhenCreated(CallCountingPrior):
    """l2 energy whose construction raises a UserWarning."""

    name = "warns_when_created"

    def __init__(self):
        super().__init__()
        warnings.warn("synthetic warning while creating the prior", UserWarning, stacklevel=2)


class OutOfMemoryPrior(Prior):
    """A prior whose construction raises MemoryError, as a huge learned prior could."""

    name = "out_of_memory"

    def __init__(self):
        raise MemoryError("synthetic allocation failure")


class FailsAtStepTwo(CallCountingPrior):
    """l2 energy that raises at its second evaluation, that is at Langevin step 2."""

    name = "fails_at_step_2"

    def on_call(self, calls, x, energy):
        if calls == 2:
            raise ValueError("synthetic failure in the prior")
        return energy


class SlowPrior(CallCountingPrior):
    """l2 energy that sleeps 0.1 s per evaluation and counts its evaluations in ``total_calls``."""

    name = "slow_l2"

    def on_call(self, calls, x, energy):
        time.sleep(0.1)
        return energy


TEST_PRIORS = (WarnsAtStepFive, WarnsWhenCreated, OutOfMemoryPrior, FailsAtStepTwo, SlowPrior)


@pytest.fixture
def test_priors(register_prior):
    for prior in TEST_PRIORS:
        register_prior(prior.name, prior, prior.__doc__)


@pytest.fixture
def widget(test_priors, make_napari_viewer):
    viewer = make_napari_viewer()
    volume = np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32)
    volume[8:24, 8:24, 8:24] += 2.0
    viewer.add_image(volume, name="cube", scale=(4.0, 3.0, 2.0))
    _, dock = viewer.window.add_plugin_dock_widget("napari-ebm", "EBM reconstruction")
    dock.method_combo.setCurrentText("langevin")
    dock.burn_in_spin.setValue(0)
    return dock


def wait_idle(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.is_running(), timeout=RUN_TIMEOUT_MS)


def notifications(severity, since):
    return [str(n.message) for n in notification_manager.records[since:] if n.severity == severity]


def write_mrc(path, data, voxel_size=4.0, image_stack=False):
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel_size
        if image_stack:
            mrc.set_image_stack()


# ---- errors and warnings inside and before a run ----------------------------------------------


def test_run_warning_names_step(widget, qtbot):
    widget.prior_combo.setCurrentText("warns_at_step_5")
    widget.steps_spin.setValue(10)
    before = len(notification_manager.records)

    assert widget.start()
    wait_idle(qtbot, widget)

    warned = [m for m in notifications(NotificationSeverity.WARNING, before) if "synthetic warning" in m]
    assert len(warned) == 1
    assert "step 5" in warned[0]
    assert notifications(NotificationSeverity.ERROR, before) == []
    assert widget.status.text().startswith("finished")
    assert widget.start_button.isEnabled()
    assert not widget.stop_button.isEnabled()

    widget.prior_combo.setCurrentText("l2")
    assert widget.start()
    wait_idle(qtbot, widget)
    assert widget.status.text().startswith("finished")


def test_construction_warning_notifies(widget, qtbot):
    widget.prior_combo.setCurrentText("warns_when_created")
    widget.steps_spin.setValue(3)
    before = len(notification_manager.records)

    assert widget.start()
    warned = [m for m in notifications(NotificationSeverity.WARNING, before) if "synthetic warning" in m]
    wait_idle(qtbot, widget)

    assert len(warned) == 1
    assert "preparing the run" in warned[0]
    assert widget.status.text().startswith("finished")


def test_thin_volume_warns_before_run(test_priors, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(5).normal(size=(8, 32, 32)).astype(np.float32), name="slab")
    _, widget = viewer.window.add_plugin_dock_widget("napari-ebm", "EBM reconstruction")
    widget.method_combo.setCurrentText("map")
    widget.steps_spin.setValue(2)
    before = len(notification_manager.records)

    assert widget.start()
    warned = [m for m in notifications(NotificationSeverity.WARNING, before) if "thin" in m]
    wait_idle(qtbot, widget)

    assert len(warned) == 1
    assert "(8, 32, 32)" in warned[0]
    assert "preparing the run" in warned[0]
    assert widget.status.text().startswith(("finished", "converged"))


def test_memory_error_not_started(widget, caplog):
    widget.prior_combo.setCurrentText("out_of_memory")
    before = len(notification_manager.records)

    with caplog.at_level(logging.ERROR, logger="napari_ebm"):
        started = widget.start()

    errors = notifications(NotificationSeverity.ERROR, before)
    assert not started
    assert not widget.is_running()
    assert len(errors) == 1
    assert "MemoryError" in errors[0]
    assert "synthetic allocation failure" in errors[0]
    assert widget.status.text().startswith("not started")
    assert widget.start_button.isEnabled()
    assert any(record.exc_info and record.exc_info[0] is MemoryError for record in caplog.records)


def test_memory_error_then_run_works(widget, qtbot):
    widget.prior_combo.setCurrentText("out_of_memory")
    assert not widget.start()

    widget.prior_combo.setCurrentText("l2")
    widget.steps_spin.setValue(3)
    assert widget.start()
    wait_idle(qtbot, widget)

    assert widget.status.text().startswith("finished")


# ---- checks of the input layer and the device ------------------------------------------------


@pytest.mark.parametrize("bad_size", [np.inf, np.nan, -2.0])
def test_invalid_scale_not_started(widget, bad_size):
    layer = widget.viewer.layers["cube"]
    # napari 0.9 stores a non-finite scale and then raises ValueError while it updates the
    # viewer's extent, so the layer keeps the invalid scale, as it would in a session.
    with contextlib.suppress(ValueError):
        layer.scale = (4.0, bad_size, 2.0)
    np.testing.assert_array_equal(layer.scale, (4.0, bad_size, 2.0))
    before = len(notification_manager.records)

    started = widget.start()

    errors = notifications(NotificationSeverity.ERROR, before)
    assert not started
    assert not widget.is_running()
    assert len(errors) == 1
    assert "'cube'" in errors[0]
    assert "invalid scale" in errors[0]
    assert str(bad_size) in errors[0]
    assert "layer.scale" in errors[0]
    assert "header" in errors[0]
    assert "cube sample" not in widget.viewer.layers


def test_tilt_series_rejects_wedge(test_priors, make_napari_viewer, qtbot, tmp_path):
    path = tmp_path / "tilt.st"
    write_mrc(path, np.random.default_rng(3).normal(size=(21, 32, 32)).astype(np.float32), image_stack=True)
    viewer = make_napari_viewer()
    layer = viewer.open(path, plugin="napari-ebm")[0]
    assert layer.metadata["napari_ebm"]["is_stack"] is True
    _, widget = viewer.window.add_plugin_dock_widget("napari-ebm", "EBM reconstruction")
    widget.input_combo.setCurrentText("tilt")
    widget.operator_combo.setCurrentText("wedge")
    before = len(notification_manager.records)

    started = widget.start()

    errors = notifications(NotificationSeverity.ERROR, before)
    assert not started
    assert len(errors) == 1
    assert "'tilt' is a tilt series" in errors[0]
    assert "Reconstruct a tomogram" in errors[0]
    assert "tilt MAP" not in viewer.layers

    widget.operator_combo.setCurrentText("denoise")
    widget.method_combo.setCurrentText("map")
    widget.steps_spin.setValue(2)
    assert widget.start()
    wait_idle(qtbot, widget)
    assert widget.status.text().startswith(("finished", "converged"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_gpu_not_started(widget):
    widget.device_combo.setCurrentText("cuda")
    before = len(notification_manager.records)

    started = widget.start()

    errors = notifications(NotificationSeverity.ERROR, before)
    assert not started
    assert not widget.is_running()
    assert len(errors) == 1
    assert "'cuda'" in errors[0]
    assert "choose device 'cpu' or 'auto'" in errors[0]
    assert "cube sample" not in widget.viewer.layers


# ---- end of a run: references, stop, close ---------------------------------------------------


@pytest.mark.parametrize("ending", ["finished", "stopped", "failed"])
def test_run_end_releases_reconstruction(widget, qtbot, ending):
    widget.prior_combo.setCurrentText("fails_at_step_2" if ending == "failed" else "l2")
    widget.steps_spin.setValue(1_000_000 if ending == "stopped" else 5)

    assert widget.start()
    reconstruction = weakref.ref(widget._reconstruction)
    if ending == "stopped":
        qtbot.waitUntil(lambda: len(widget._trace) >= 2, timeout=RUN_TIMEOUT_MS)
        widget.stop_button.click()
    wait_idle(qtbot, widget)
    qtbot.wait(50)
    gc.collect()

    assert widget.status.text().startswith(ending)
    assert widget._reconstruction is None
    assert reconstruction() is None
    assert np.isfinite(widget.viewer.layers["cube sample"].data).all()


def test_close_viewer_during_run(widget, qtbot, capfd, caplog, qtlog):
    viewer = widget.viewer
    widget.prior_combo.setCurrentText("slow_l2")
    widget.steps_spin.setValue(1_000_000)
    caplog.set_level(logging.DEBUG, logger="napari_ebm")

    assert widget.start()
    worker = widget._worker
    qtbot.waitUntil(lambda: len(widget._trace) >= 2, timeout=RUN_TIMEOUT_MS)
    viewer.close()
    qtbot.waitUntil(worker.done.is_set, timeout=RUN_TIMEOUT_MS)
    calls_after_close = SlowPrior.total_calls
    qtbot.wait(500)

    assert worker.abort_requested
    assert SlowPrior.total_calls == calls_after_close
    assert widget._worker is None
    assert "widget closing, stopping the worker" in caplog.text
    out, err = capfd.readouterr()
    messages = "\n".join([out, err, caplog.text] + [record.message for record in qtlog.records])
    for text in ("Destroyed while thread", "QThread: Destroyed", "wrapped C/C++ object"):
        assert text not in messages


# ---- streaming: memory, layer count, main thread, dropped updates ----------------------------


class UpdateSpy:
    """Replaces ``OutputLayers._update`` with a wrapper that counts calls and their threads.

    Only the last call's data is kept, so the spy keeps at most one extra volume alive.
    """

    def __init__(self, monkeypatch):
        self.calls = 0
        self.off_main_thread = 0
        self.last = None
        original = OutputLayers._update

        def update(outputs, name, data, is_std):
            self.calls += 1
            if threading.current_thread() is not threading.main_thread():
                self.off_main_thread += 1
            self.last = (name, data)
            return original(outputs, name, data, is_std)

        monkeypatch.setattr(OutputLayers, "_update", update)


def start_paused_run(qtbot, widget):
    """Start a Langevin run and pause it, so snapshots can be fed to the widget by hand."""
    widget.prior_combo.setCurrentText("l2")
    widget.steps_spin.setValue(1_000_000)
    assert widget.start()
    widget.toggle_pause()
    qtbot.waitUntil(lambda: widget._worker.is_paused, timeout=RUN_TIMEOUT_MS)
    qtbot.wait(100)


def make_snapshot(run_id, step, volume):
    return Snapshot(
        run_id=run_id, method="langevin", step=step, steps=1_000_000, energy=1000.0 - step, data_energy=500.0,
        prior_energy=100.0, step_size=0.1, temperature=1.0, noise_sigma=1.0, elapsed=0.01 * step, volume=volume,
    )


def test_layer_updates_on_main_thread(widget, qtbot, monkeypatch):
    spy = UpdateSpy(monkeypatch)
    widget.steps_spin.setValue(30)

    assert widget.start()
    wait_idle(qtbot, widget)

    assert spy.calls >= 1
    assert spy.off_main_thread == 0
    assert widget.status.text().startswith("finished")


def test_display_drops_older_snapshots(widget, qtbot, monkeypatch):
    spy = UpdateSpy(monkeypatch)
    start_paused_run(qtbot, widget)
    run_id = widget._run_id
    first_step = widget._received_step + 1
    calls_before = spy.calls

    for index in range(10):
        volume = np.full((32, 32, 32), float(index + 1), dtype=np.float32)
        widget._on_yielded(run_id, make_snapshot(run_id, first_step + index, volume))
    widget._display_tick()

    assert spy.calls == calls_before + 1
    assert spy.last[0] == "cube sample"
    assert float(widget.viewer.layers["cube sample"].data[0, 0, 0]) == 10.0
    assert widget.progress.value() == first_step + 9
    widget.stop()
    wait_idle(qtbot, widget)


def test_streaming_keeps_memory_flat(widget, qtbot, monkeypatch):
    spy = UpdateSpy(monkeypatch)
    start_paused_run(qtbot, widget)
    viewer = widget.viewer
    run_id = widget._run_id
    first_step = widget._received_step + 1
    volumes = [np.full((128, 128, 128), float(index), dtype=np.float32) for index in range(3)]

    def stream(steps):
        for step in steps:
            widget._on_yielded(run_id, make_snapshot(run_id, step, volumes[step % len(volumes)]))
            widget._display_tick()

    # The first snapshots create the 128^3 slice and thumbnail buffers, which the later ones reuse.
    stream(range(first_step, first_step + 10))
    layer_count = len(viewer.layers)
    sample_id = viewer.layers["cube sample"].unique_id
    calls_before = spy.calls
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        stream(range(first_step + 10, first_step + 510))
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert current - baseline < 3 * VOLUME_BYTES
    assert spy.calls == calls_before + 500
    assert spy.off_main_thread == 0
    assert len(viewer.layers) == layer_count
    assert viewer.layers["cube sample"].unique_id == sample_id
    assert viewer.layers["cube sample"].data.shape == (128, 128, 128)
    widget.stop()
    wait_idle(qtbot, widget)


# ---- saving an output layer ------------------------------------------------------------------


def test_writer_rejects_output_over_input(test_priors, make_napari_viewer, qtbot, tmp_path):
    source = tmp_path / "input.mrc"
    write_mrc(source, np.random.default_rng(4).normal(size=(24, 24, 24)).astype(np.float32))
    before = source.read_bytes()
    viewer = make_napari_viewer()
    viewer.open(source, plugin="napari-ebm")
    _, widget = viewer.window.add_plugin_dock_widget("napari-ebm", "EBM reconstruction")
    widget.input_combo.setCurrentText("input")
    widget.method_combo.setCurrentText("map")
    widget.steps_spin.setValue(2)
    assert widget.start()
    wait_idle(qtbot, widget)
    output = viewer.layers["input MAP"]
    viewer.layers.selection.clear()
    viewer.layers.selection.add(output)

    with pytest.raises(Exception, match="input.mrc"):
        viewer.layers.save(str(source), selected=True, plugin="napari-ebm")

    assert output.metadata["napari_ebm"]["input_source_path"] == str(source)
    assert source.read_bytes() == before
    target = tmp_path / "output.mrc"
    viewer.layers.save(str(target), selected=True, plugin="napari-ebm")
    with mrcfile.open(target) as mrc:
        np.testing.assert_allclose(mrc.data, output.data)
