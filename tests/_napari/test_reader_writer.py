"""The manifest's reader, writer and sample data in a real napari viewer."""

import mrcfile
import numpy as np
import pytest
from napari.utils.notifications import NotificationSeverity, notification_manager

from napari_ebm._napari.launch import open_viewer
from napari_ebm.io import read_volume

pytestmark = pytest.mark.gui


def write_test_mrc(path, shape=(10, 12, 14), voxel_size_zyx=(3.0, 2.0, 1.5), origin_zyx=(30.0, 20.0, 10.0)):
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = tuple(reversed(voxel_size_zyx))
        mrc.header.origin = tuple(reversed(origin_zyx))
    return data


def error_messages():
    return [str(n.message) for n in notification_manager.records if n.severity == NotificationSeverity.ERROR]


@pytest.mark.parametrize("suffix", [".mrc", ".rec", ".map"])
def test_reader_sets_scale_and_translate(make_napari_viewer, tmp_path, suffix):
    path = tmp_path / f"volume{suffix}"
    data = write_test_mrc(path)
    viewer = make_napari_viewer()

    layers = viewer.open(path, plugin="napari-ebm")

    assert len(layers) == 1
    np.testing.assert_allclose(layers[0].scale, (3.0, 2.0, 1.5), rtol=1e-5)
    np.testing.assert_allclose(layers[0].translate, (30.0, 20.0, 10.0), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(layers[0].data), data)


def test_reader_bad_file_notifies(make_napari_viewer, tmp_path):
    path = tmp_path / "notes.mrc"
    path.write_text("these are notes, not a volume\n" * 100)
    viewer = make_napari_viewer()
    before = len(error_messages())

    viewer.open(path, plugin="napari-ebm")

    new_errors = error_messages()[before:]
    assert len(viewer.layers) == 0
    assert len(new_errors) == 1
    assert "notes.mrc" in new_errors[0]


def test_writer_keeps_voxel_size(make_napari_viewer, tmp_path):
    source = tmp_path / "input.mrc"
    write_test_mrc(source)
    viewer = make_napari_viewer()
    layer = viewer.open(source, plugin="napari-ebm")[0]
    target = tmp_path / "saved.mrc"

    viewer.layers.save(str(target), selected=False, plugin="napari-ebm")

    saved = read_volume(target)
    np.testing.assert_allclose(saved.voxel_size, (3.0, 2.0, 1.5), atol=1e-4)
    np.testing.assert_allclose(saved.origin, (30.0, 20.0, 10.0), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(saved.data), np.asarray(layer.data))


def test_writer_refuses_source_file(make_napari_viewer, tmp_path):
    source = tmp_path / "input.mrc"
    write_test_mrc(source)
    before = source.read_bytes()
    viewer = make_napari_viewer()
    viewer.open(source, plugin="napari-ebm")

    with pytest.raises(Exception, match="input.mrc"):
        viewer.layers.save(str(source), selected=False, plugin="napari-ebm")

    assert source.read_bytes() == before


def test_microtubule_sample_opens(make_napari_viewer):
    viewer = make_napari_viewer()

    viewer.open_sample("napari-ebm", "microtubule")

    layer = viewer.layers["microtubule_13pf"]
    assert layer.data.shape == (36, 206, 94)
    np.testing.assert_allclose(layer.scale, (10.52, 10.52, 10.52), rtol=1e-4)


def test_phantom_sample_has_ground_truth(make_napari_viewer):
    viewer = make_napari_viewer()

    viewer.open_sample("napari-ebm", "phantom")

    names = [layer.name for layer in viewer.layers]
    assert names == ["phantom ground truth", "phantom observed"]
    assert viewer.layers["phantom observed"].data.shape == (64, 64, 64)


def test_open_viewer_docks_widget(qtbot):
    viewer = open_viewer(run=False)
    try:
        dock_names = list(viewer.window.dock_widgets)
        widget = viewer.window.dock_widgets[dock_names[0]]
        assert [layer.name for layer in viewer.layers] == ["microtubule_13pf"]
        assert any("EBM reconstruction" in name for name in dock_names)
        assert widget.input_combo.currentText() == "microtubule_13pf"
    finally:
        viewer.close()
