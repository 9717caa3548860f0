"""The manifest's reader, writer and sample data in a real napari viewer."""

import mrcfile
import numpy as np
import pytest
from napari.utils.notifications import (
    ErrorNotification,
    NotificationSeverity,
    notification_manager,
)

from napari_ebm._napari.launch import open_viewer
from napari_ebm.io import read_volume

pytestmark = pytest.mark.gui


def write_test_mrc(
    path,
    shape=(10, 12, 14),
    voxel_size_zyx=(3.0, 2.0, 1.5),
    origin_zyx=(30.0, 20.0, 10.0),
    *,
    image_stack=False,
):
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        if image_stack:
            mrc.set_image_stack()
        mrc.voxel_size = tuple(reversed(voxel_size_zyx))
        mrc.header.origin = tuple(reversed(origin_zyx))
    return data


def error_messages():
    return [str(n.message) for n in notification_manager.records if n.severity == NotificationSeverity.ERROR]


def warning_messages():
    return [str(n.message) for n in notification_manager.records if n.severity == NotificationSeverity.WARNING]


def write_empty(folder):
    path = folder / "empty.mrc"
    path.write_bytes(b"")
    return path, ["is empty"]


def write_lfs_pointer(folder):
    path = folder / "pointer.mrc"
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        "size 1395232\n"
    )
    return path, ["Git LFS pointer", "git lfs pull"]


def write_truncated(folder):
    path = folder / "truncated.mrc"
    write_test_mrc(path, shape=(5, 6, 7))
    path.write_bytes(path.read_bytes()[:-100])
    expected = 1024 + 5 * 6 * 7 * 4
    return path, [f"{expected} bytes", f"{expected - 100} bytes", "truncated"]


def write_text(folder):
    path = folder / "notes.mrc"
    path.write_text("these are notes, not a volume\n" * 100)
    return path, ["not a valid MRC file"]


BAD_FILES = {
    "empty": write_empty,
    "lfs_pointer": write_lfs_pointer,
    "truncated": write_truncated,
    "text": write_text,
}


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


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_reader_bad_file_notifies(make_napari_viewer, tmp_path, case):
    path, phrases = BAD_FILES[case](tmp_path)
    viewer = make_napari_viewer()
    before = len(notification_manager.records)

    viewer.open(path, plugin="napari-ebm")

    new_records = notification_manager.records[before:]
    new_errors = [str(n.message) for n in new_records if n.severity == NotificationSeverity.ERROR]
    assert len(viewer.layers) == 0
    assert len(new_errors) == 1
    assert str(path) in new_errors[0]
    for phrase in phrases:
        assert phrase in new_errors[0]
    assert "Traceback" not in new_errors[0]
    # napari turns an uncaught exception into an ErrorNotification that carries its traceback.
    assert not any(isinstance(n, ErrorNotification) for n in new_records)


@pytest.mark.parametrize(
    ("voxel_size_zyx", "scale", "axes"),
    [((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "axes z, y, x"), ((0.0, 2.0, 1.5), (1.0, 2.0, 1.5), "axis z")],
)
def test_reader_zero_voxel_size_warns_once(make_napari_viewer, tmp_path, voxel_size_zyx, scale, axes):
    path = tmp_path / "no_voxel_size.mrc"
    write_test_mrc(path, voxel_size_zyx=voxel_size_zyx)
    viewer = make_napari_viewer()
    before = len(warning_messages())

    layers = viewer.open(path, plugin="napari-ebm")

    new_warnings = warning_messages()[before:]
    assert len(layers) == 1
    np.testing.assert_allclose(layers[0].scale, scale, rtol=1e-5)
    assert np.all(np.isfinite(layers[0].scale))
    assert len(new_warnings) == 1
    assert str(path) in new_warnings[0]
    assert axes in new_warnings[0]
    assert "fallback voxel size of 1 Angstrom" in new_warnings[0]


@pytest.mark.parametrize("suffix", [".st", ".ali"])
def test_reader_opens_stack(make_napari_viewer, tmp_path, suffix):
    path = tmp_path / f"tilt{suffix}"
    data = write_test_mrc(path, shape=(41, 12, 14), voxel_size_zyx=(99.0, 2.0, 1.5), image_stack=True)
    viewer = make_napari_viewer()

    layers = viewer.open(path, plugin="napari-ebm")

    assert len(layers) == 1
    assert layers[0].metadata["napari_ebm"]["is_stack"] is True
    np.testing.assert_allclose(layers[0].scale, (1.5, 2.0, 1.5), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(layers[0].data), data)


@pytest.mark.parametrize("suffix", [".rec", ".map"])
def test_reader_space_group_0_volume(make_napari_viewer, tmp_path, suffix):
    path = tmp_path / f"volume{suffix}"
    write_test_mrc(path, shape=(40, 12, 14), image_stack=True)
    viewer = make_napari_viewer()

    layers = viewer.open(path, plugin="napari-ebm")

    assert len(layers) == 1
    assert layers[0].metadata["napari_ebm"]["is_stack"] is False
    np.testing.assert_allclose(layers[0].scale, (3.0, 2.0, 1.5), rtol=1e-5)


def test_reader_unmarked_bytes_warn(make_napari_viewer, tmp_path):
    path = tmp_path / "bytes.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.arange(-128, 128, dtype=np.int8).reshape(4, 8, 8))
        mrc.voxel_size = 2.0
    viewer = make_napari_viewer()
    before = len(warning_messages())

    layers = viewer.open(path, plugin="napari-ebm")

    new_warnings = warning_messages()[before:]
    assert layers[0].data.dtype == np.int8
    assert len(new_warnings) == 1
    assert str(path) in new_warnings[0]
    assert "read as signed" in new_warnings[0]


def test_reader_opens_float16(make_napari_viewer, tmp_path):
    path = tmp_path / "half.mrc"
    data = np.random.default_rng(0).normal(size=(10, 12, 14)).astype(np.float16)
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 2.0
    viewer = make_napari_viewer()

    layers = viewer.open(path, plugin="napari-ebm")

    assert len(layers) == 1
    np.testing.assert_array_equal(np.asarray(layers[0].data), data)
    assert np.all(np.isfinite(layers[0].contrast_limits))


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
