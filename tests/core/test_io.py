"""Tests for reading and writing MRC and TIFF volumes (napari_ebm.io)."""

import gc
import math
import os
import re
import struct
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile
import torch

from napari_ebm import io as ebm_io
from napari_ebm._napari.layers import subsample_contrast_limits
from napari_ebm.errors import ParameterError, VolumeReadError, VolumeWriteError
from napari_ebm.io import STACK_SUFFIXES, Volume, read_volume, write_mrc
from napari_ebm.run import Reconstruction, RunConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def _find_shared_data() -> Path | None:
    # A development checkout has shared/ beside the repository root. A fresh clone in CI has it
    # beside the clone, and some test machines place it inside the repository root.
    for candidate in (REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


SHARED_DATA = _find_shared_data()
needs_shared_data = pytest.mark.skipif(
    SHARED_DATA is None, reason="shared/data was not found beside or inside the repository root"
)


def _write_test_mrc(path, data, voxel_size_xyz=(1.0, 1.0, 1.0), *, image_stack=False):
    """Write `data` with mrcfile directly, as another program would, and return the path."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if image_stack:
            mrc.set_image_stack()
        mrc.voxel_size = voxel_size_xyz
    return Path(path)


def _float_volume(shape=(4, 5, 6)):
    rng = np.random.default_rng(0)
    return rng.normal(size=shape).astype(np.float32)


def _files_in(folder):
    return sorted(entry.name for entry in Path(folder).iterdir())


def _read_with_warnings(path, **kwargs):
    """Read `path` and return the volume and the messages of all UserWarnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = read_volume(path, **kwargs)

    messages = [str(warning.message) for warning in caught if issubclass(warning.category, UserWarning)]
    return volume, messages


def _patch_header_int32(path, offset, values):
    """Overwrite int32 values in an MRC header written by mrcfile, which uses native byte order."""
    raw = bytearray(Path(path).read_bytes())
    for index, value in enumerate(values):
        start = offset + 4 * index
        raw[start : start + 4] = struct.pack("=i", value)
    Path(path).write_bytes(bytes(raw))


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("suffix", [".mrc", ".rec", ".map"])
def test_round_trip_keeps_geometry(tmp_path, suffix):
    data = _float_volume()
    path = tmp_path / f"volume{suffix}"

    write_mrc(path, data, (3.0, 2.0, 1.5), origin=(10.0, -20.5, 30.25))
    volume = read_volume(path)

    assert volume.data.shape == (4, 5, 6)
    assert np.array_equal(volume.data, data)
    assert volume.voxel_size == pytest.approx((3.0, 2.0, 1.5), abs=1e-4)
    assert volume.origin == pytest.approx((10.0, -20.5, 30.25), abs=1e-4)
    assert volume.path == path
    assert volume.is_stack is False


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float32])
def test_round_trip_keeps_dtype(tmp_path, dtype):
    data = (np.arange(4 * 5 * 6) % 100).reshape(4, 5, 6).astype(dtype)
    path = tmp_path / "volume.mrc"

    write_mrc(path, data, (1.0, 1.0, 1.0))
    volume = read_volume(path)

    assert volume.data.dtype == np.dtype(dtype)
    assert np.array_equal(volume.data, data)


def test_float64_written_as_float32(tmp_path):
    data = _float_volume().astype(np.float64)
    path = tmp_path / "volume.mrc"

    write_mrc(path, data, (1.0, 1.0, 1.0))
    volume = read_volume(path)

    assert volume.data.dtype == np.float32
    assert np.array_equal(volume.data, data.astype(np.float32))


def test_uint8_written_as_uint16(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    path = tmp_path / "volume.mrc"

    write_mrc(path, data, (1.0, 1.0, 1.0))
    volume = read_volume(path)

    assert volume.data.dtype == np.uint16
    assert np.array_equal(volume.data, data)


def test_write_non_contiguous_data(tmp_path):
    data = _float_volume((6, 8, 10))[:, ::2, ::-1]
    path = tmp_path / "volume.mrc"

    write_mrc(path, data, (1.0, 1.0, 1.0))

    assert np.array_equal(read_volume(path).data, data)


def test_write_big_endian_data(tmp_path):
    data = _float_volume().astype(">f4")
    path = tmp_path / "volume.mrc"

    write_mrc(path, data, (1.0, 1.0, 1.0))

    assert np.array_equal(read_volume(path).data, data)


def test_written_header_values(tmp_path):
    data = _float_volume()
    path = tmp_path / "volume.mrc"

    write_mrc(path, data, (3.0, 2.0, 1.5), origin=(7.0, 8.0, 9.0))

    with mrcfile.open(path) as mrc:
        assert int(mrc.header.mode) == 2
        assert int(mrc.header.ispg) == 1
        assert float(mrc.voxel_size.x) == pytest.approx(1.5)
        assert float(mrc.voxel_size.z) == pytest.approx(3.0)
        assert float(mrc.header.origin.x) == pytest.approx(9.0)
        assert float(mrc.header.dmax) == pytest.approx(float(data.max()))
        assert float(mrc.header.dmin) == pytest.approx(float(data.min()))


def test_uppercase_suffix_reads(tmp_path):
    path = _write_test_mrc(tmp_path / "VOLUME.MRC", _float_volume(), (2.0, 2.0, 2.0))

    assert read_volume(path).voxel_size == pytest.approx((2.0, 2.0, 2.0))


@pytest.mark.skipif(os.name != "posix", reason="file modes and umask are POSIX features")
def test_written_file_uses_umask(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "volume.mrc"

    write_mrc(path, _float_volume(), (1.0, 1.0, 1.0))

    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------
# Memory mapping


def test_mrc_data_is_memory_mapped(tmp_path):
    path = _write_test_mrc(tmp_path / "volume.mrc", _float_volume())

    volume = read_volume(path)

    assert isinstance(volume.data, np.memmap)
    assert volume.data.flags.writeable is False


def test_mapped_data_outlives_reader(tmp_path):
    data = _float_volume()
    path = _write_test_mrc(tmp_path / "volume.mrc", data)

    mapped = read_volume(path).data
    gc.collect()

    assert np.array_equal(mapped, data)


# ---------------------------------------------------------------------------------------------
# Real files in the shared data folder


@needs_shared_data
def test_real_uint16_mrc():
    volume = read_volume(SHARED_DATA / "tomograms" / "microtubule_13pf.mrc")

    assert volume.data.shape == (36, 206, 94)
    assert volume.data.dtype == np.uint16
    assert volume.voxel_size == pytest.approx((10.52, 10.52, 10.52), abs=1e-3)


@needs_shared_data
def test_real_imod_int8_mrc():
    # The header has no "MAP " id and machine stamp 0, which mrcfile reports as warnings.
    volume = read_volume(SHARED_DATA / "tomograms" / "imod_dual_axis_int8.mrc")

    assert volume.data.shape == (78, 64, 32)
    assert volume.data.dtype == np.int8
    assert volume.voxel_size == pytest.approx((23.2, 23.2, 23.2), abs=1e-3)


@needs_shared_data
def test_real_imagej_tiff():
    volume = read_volume(SHARED_DATA / "tomograms" / "microtubule_13pf.tif")

    assert volume.data.shape == (36, 206, 94)
    assert volume.voxel_size == pytest.approx((10.52, 10.52, 10.52), abs=1e-3)
    assert volume.origin == (0.0, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------
# Invalid input files


def _make_missing(folder):
    return folder / "missing.mrc", ["not found"]


def _make_directory(folder):
    path = folder / "folder.mrc"
    path.mkdir()
    return path, ["is a folder"]


def _make_empty(folder):
    path = folder / "empty.mrc"
    path.write_bytes(b"")
    return path, ["is empty"]


def _make_short(folder):
    path = folder / "short.mrc"
    path.write_bytes(b"\0" * 500)
    return path, ["500 bytes", "1024-byte header"]


def _make_lfs_pointer(folder):
    path = folder / "pointer.mrc"
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        "size 1395232\n"
    )
    return path, ["Git LFS pointer", "git lfs pull"]


def _make_text(folder):
    path = folder / "notes.mrc"
    path.write_text(("This is a text file, not a volume.\n" * 100)[:2000])
    return path, ["not a valid MRC file", "mode"]


def _make_truncated(folder):
    path = _write_test_mrc(folder / "truncated.mrc", _float_volume((5, 6, 7)))
    path.write_bytes(path.read_bytes()[:-100])
    expected = 1024 + 5 * 6 * 7 * 4
    return path, [f"{expected} bytes", f"{expected - 100} bytes", "incomplete"]


def _make_mode(folder, mode):
    path = _write_test_mrc(folder / f"mode{mode}.mrc", _float_volume())
    header = bytearray(path.read_bytes())
    # mrcfile writes the native byte order, and the mode is the int32 at byte offset 12.
    header[12:16] = struct.pack("=i", mode)
    path.write_bytes(bytes(header))
    return path, [f"mode {mode}"]



def _make_nan(folder):
    data = _float_volume((40, 5, 6))
    data[0, 0, 0] = np.nan
    data[20, 2, 2] = -np.inf
    data[39, 1, 1] = np.inf
    with warnings.catch_warnings():
        # mrcfile warns about NaN values when it computes the header statistics.
        warnings.simplefilter("ignore", RuntimeWarning)
        path = _write_test_mrc(folder / "nan.mrc", data)
    return path, ["3 non-finite voxels"]


def _make_png(folder):
    path = folder / "picture.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 2000)
    return path, ["unsupported suffix", ".mrc"]


def _make_corrupt_tiff(folder):
    path = folder / "corrupt.tif"
    path.write_text("This is a text file, not a TIFF file.\n" * 50)
    return path, ["Could not read", "TIFF"]


def _make_tiff_without_pages(folder):
    path = folder / "nopages.tif"
    # A little-endian TIFF header whose first image file directory offset is 0.
    path.write_bytes(b"II*\x00" + struct.pack("<I", 0) + b"\0" * 100)
    return path, ["without images"]


BAD_INPUTS = {
    "missing": _make_missing,
    "directory": _make_directory,
    "empty": _make_empty,
    "short": _make_short,
    "lfs_pointer": _make_lfs_pointer,
    "text": _make_text,
    "truncated": _make_truncated,
    "mode3": lambda folder: _make_mode(folder, 3),
    "mode4": lambda folder: _make_mode(folder, 4),
    "mode7": lambda folder: _make_mode(folder, 7),
    "mode101": lambda folder: _make_mode(folder, 101),
    "mode99": lambda folder: _make_mode(folder, 99),
    "nan": _make_nan,
    "png": _make_png,
    "corrupt_tiff": _make_corrupt_tiff,
    "tiff_without_pages": _make_tiff_without_pages,
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file(tmp_path, case):
    path, _ = BAD_INPUTS[case](tmp_path)

    with pytest.raises(VolumeReadError) as caught:
        read_volume(path)

    assert str(path) in str(caught.value)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_problem(tmp_path, case):
    path, phrases = BAD_INPUTS[case](tmp_path)

    with pytest.raises(VolumeReadError) as caught:
        read_volume(path)

    for phrase in phrases:
        assert phrase in str(caught.value)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_failed_read_keeps_file(tmp_path, case):
    path, _ = BAD_INPUTS[case](tmp_path)
    before = path.read_bytes() if path.is_file() else None

    with pytest.raises(VolumeReadError):
        read_volume(path)

    after = path.read_bytes() if path.is_file() else None
    assert after == before


def test_text_message_gives_dimensions(tmp_path):
    path, _ = _make_text(tmp_path)

    with pytest.raises(VolumeReadError, match=r"dimensions \(nx, ny, nz\) = \("):
        read_volume(path)


def test_volume_stack_rejected(tmp_path):
    path = tmp_path / "volumes.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(_float_volume((2, 3, 4, 5)))

    with pytest.raises(VolumeReadError, match="one 3D volume"):
        read_volume(path)


def test_read_error_is_value_error(tmp_path):
    path, _ = _make_empty(tmp_path)

    with pytest.raises(ValueError):
        read_volume(path)


# ---------------------------------------------------------------------------------------------
# Invalid voxel size and origin in the header


def test_zero_voxel_size_uses_fallback(tmp_path):
    path = _write_test_mrc(tmp_path / "volume.mrc", _float_volume(), 0.0)

    with pytest.warns(UserWarning, match=re.escape(str(path))):
        volume = read_volume(path, fallback_voxel_size=2.5)

    assert volume.voxel_size == (2.5, 2.5, 2.5)
    assert 0.0 not in volume.voxel_size


def test_unset_cell_warns_once(tmp_path):
    path = tmp_path / "no_cell.mrc"
    with mrcfile.new(path) as mrc:
        # The cell is never set, so mrcfile leaves it at 0 on every axis.
        mrc.set_data(_float_volume())

    volume, messages = _read_with_warnings(path)

    assert volume.voxel_size == (1.0, 1.0, 1.0)
    assert len(messages) == 1
    assert str(path) in messages[0]
    assert "axes z, y, x" in messages[0]
    assert "values 0, 0, 0 Angstrom" in messages[0]
    assert "fallback voxel size of 1 Angstrom" in messages[0]
    assert "set it in the file's header" in messages[0]
    assert "--voxel-size" in messages[0]


def test_one_zero_axis_warns_once(tmp_path):
    path = _write_test_mrc(tmp_path / "volume.mrc", _float_volume(), (4.0, 4.0, 4.0))
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.header.cella.z = 0.0

    volume, messages = _read_with_warnings(path, fallback_voxel_size=2.5)

    assert volume.voxel_size == (2.5, 4.0, 4.0)
    assert len(messages) == 1
    assert str(path) in messages[0]
    assert "on axis z (value 0 Angstrom)" in messages[0]
    assert "fallback voxel size of 2.5 Angstrom" in messages[0]


def test_nan_voxel_size_uses_fallback(tmp_path):
    path = _write_test_mrc(tmp_path / "volume.mrc", _float_volume(), (4.0, 4.0, 4.0))
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.header.cella.x = np.nan

    with pytest.warns(UserWarning, match="fallback voxel size of 3 Angstrom"):
        volume = read_volume(path, fallback_voxel_size=3.0)

    assert volume.voxel_size == (4.0, 4.0, 3.0)


def test_stack_zero_x_warns_once(tmp_path):
    path = _write_test_mrc(
        tmp_path / "tilt.st", _float_volume((41, 5, 6)), (0.0, 5.0, 0.0), image_stack=True
    )

    volume, messages = _read_with_warnings(path, fallback_voxel_size=2.0)

    # The z spacing of a stack is not a length, so only the x axis is reported.
    assert volume.voxel_size == (2.0, 5.0, 2.0)
    assert len(messages) == 1
    assert "on axis x (value 0 Angstrom)" in messages[0]


def test_tiff_zero_spacing_warns_once(tmp_path):
    path = tmp_path / "volume.tif"
    tifffile.imwrite(
        path,
        _float_volume(),
        imagej=True,
        resolution=(1 / 0.2, 1 / 0.3),
        metadata={"spacing": 0.0, "unit": "nm", "axes": "ZYX"},
    )

    volume, messages = _read_with_warnings(path, fallback_voxel_size=7.0)

    assert volume.voxel_size == pytest.approx((7.0, 3.0, 2.0))
    assert len(messages) == 1
    assert str(path) in messages[0]
    assert "on axis z" in messages[0]
    assert "ImageJ (Image > Properties)" in messages[0]


def test_nan_origin_becomes_zero(tmp_path):
    path = _write_test_mrc(tmp_path / "volume.mrc", _float_volume())
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.header.origin = (np.nan, 5.0, 6.0)

    with pytest.warns(UserWarning, match="non-finite origin"):
        volume = read_volume(path)

    assert volume.origin == (6.0, 5.0, 0.0)


@pytest.mark.parametrize("fallback", [0.0, -1.0, math.nan, math.inf])
def test_invalid_fallback_rejected(tmp_path, fallback):
    path = _write_test_mrc(tmp_path / "volume.mrc", _float_volume())

    with pytest.raises(ParameterError, match="fallback_voxel_size"):
        read_volume(path, fallback_voxel_size=fallback)


# ---------------------------------------------------------------------------------------------
# Image stacks


@pytest.mark.parametrize("suffix", STACK_SUFFIXES)
def test_stack_suffix_reads_stack(tmp_path, suffix):
    path = _write_test_mrc(
        tmp_path / f"tilt{suffix}", _float_volume((41, 5, 6)), (4.0, 5.0, 99.0), image_stack=True
    )

    volume = read_volume(path)

    assert volume.is_stack is True
    assert volume.voxel_size == (4.0, 5.0, 4.0)


@pytest.mark.parametrize("suffix", [".mrc", ".rec", ".map"])
def test_volume_suffix_space_group_0_is_volume(tmp_path, suffix):
    path = _write_test_mrc(
        tmp_path / f"volume{suffix}", _float_volume((40, 5, 6)), (4.0, 5.0, 7.0), image_stack=True
    )
    with mrcfile.open(path, permissive=True) as mrc:
        assert int(mrc.header.ispg) == 0

    volume = read_volume(path)

    assert volume.is_stack is False
    assert volume.data.shape == (40, 5, 6)
    assert volume.voxel_size == (7.0, 5.0, 4.0)


def test_st_space_group_1_is_volume(tmp_path):
    path = _write_test_mrc(tmp_path / "volume.st", _float_volume(), (4.0, 4.0, 2.0))

    volume = read_volume(path)

    assert volume.is_stack is False
    assert volume.voxel_size == (2.0, 4.0, 4.0)


# ---------------------------------------------------------------------------------------------
# MRC modes

# Byte offset of the IMOD stamp in the MRC header. The int32 imodFlags follows at byte 156.
IMOD_STAMP_OFFSET = 152
IMOD_STAMP = 1146047817
BYTE_VALUES = np.arange(-128, 128, dtype=np.int8)


def _write_int8_mrc(path, imod_stamp=None, imod_flags=0):
    """Write all 256 byte values as mode 0, with the IMOD stamp and flags when given."""
    data = np.resize(BYTE_VALUES, 4 * 8 * 8).reshape(4, 8, 8)
    _write_test_mrc(path, data)
    if imod_stamp is not None:
        _patch_header_int32(path, IMOD_STAMP_OFFSET, [imod_stamp, imod_flags])
    return Path(path), data


def test_mode0_imod_signed_reads_int8(tmp_path):
    path, data = _write_int8_mrc(tmp_path / "signed.mrc", IMOD_STAMP, imod_flags=1)

    volume, messages = _read_with_warnings(path)

    assert volume.data.dtype == np.int8
    assert np.array_equal(volume.data, data)
    assert int(volume.data.min()) == -128
    assert messages == []


def test_mode0_imod_unsigned_reads_uint8(tmp_path):
    # imodFlags 4 sets another bit (origin sign) but leaves bit 0, the signed-bytes bit, clear.
    path, data = _write_int8_mrc(tmp_path / "unsigned.mrc", IMOD_STAMP, imod_flags=4)

    volume, messages = _read_with_warnings(path)

    assert volume.data.dtype == np.uint8
    assert np.array_equal(volume.data, data.view(np.uint8))
    assert int(volume.data.max()) == 255
    assert int(volume.data.min()) == 0
    assert isinstance(volume.data, np.memmap)
    assert messages == []


def test_mode0_without_stamp_warns_signed(tmp_path):
    # Flag bit 0 alone means nothing without the stamp.
    path, data = _write_int8_mrc(tmp_path / "plain.mrc", imod_stamp=0, imod_flags=1)

    volume, messages = _read_with_warnings(path)

    assert volume.data.dtype == np.int8
    assert np.array_equal(volume.data, data)
    assert len(messages) == 1
    assert str(path) in messages[0]
    assert "read as signed (-128 to 127)" in messages[0]
    assert "If the values look wrong" in messages[0]
    assert "Convert it to 16-bit integers" in messages[0]


def test_mode0_unsigned_file_opens_in_reconstruction(tmp_path):
    path, _ = _write_int8_mrc(tmp_path / "unsigned.mrc", IMOD_STAMP, imod_flags=0)
    volume = read_volume(path)

    reconstruction = Reconstruction(volume.data, RunConfig(steps=1, seed=0))
    restored = reconstruction.restore(reconstruction.initial)

    assert float(restored.min()) == pytest.approx(0.0, abs=1e-3)
    assert float(restored.max()) == pytest.approx(255.0, abs=1e-3)


def test_write_int8_sets_signed_flag(tmp_path):
    data = BYTE_VALUES.reshape(4, 8, 8)
    path = tmp_path / "signed.mrc"

    write_mrc(path, data, (1.0, 1.0, 1.0))
    header = path.read_bytes()[:1024]
    volume, messages = _read_with_warnings(path)

    stamp, flags = struct.unpack_from("=2i", header, IMOD_STAMP_OFFSET)
    assert stamp == IMOD_STAMP
    assert flags & 1 == 1
    assert volume.data.dtype == np.int8
    assert np.array_equal(volume.data, data)
    assert messages == []
    with open(os.devnull, "w") as report:
        assert mrcfile.validate(path, print_file=report) is True


def test_mode6_stays_positive(tmp_path):
    data = np.full((3, 4, 5), 40000, dtype=np.uint16)
    data[0, 0, 0] = 65535
    path = _write_test_mrc(tmp_path / "uint16.mrc", data)

    volume = read_volume(path)
    with mrcfile.open(path) as mrc:
        mode = int(mrc.header.mode)

    assert mode == 6
    assert volume.data.dtype == np.uint16
    assert int(volume.data[1, 1, 1]) == 40000
    assert int(volume.data.max()) == 65535


def test_mode12_reads_float16(tmp_path):
    data = _float_volume().astype(np.float16)
    path = _write_test_mrc(tmp_path / "half.mrc", data)

    volume = read_volume(path)
    with mrcfile.open(path) as mrc:
        mode = int(mrc.header.mode)

    assert mode == 12
    assert volume.data.dtype == np.float16
    assert np.array_equal(volume.data, data)


def test_mode12_runs_as_float32(tmp_path):
    data = _float_volume((8, 10, 12)).astype(np.float16)
    path = _write_test_mrc(tmp_path / "half.mrc", data)
    volume = read_volume(path)

    reconstruction = Reconstruction(volume.data, RunConfig(steps=1, seed=0))
    snapshots = list(reconstruction.snapshots())
    restored = reconstruction.restore(reconstruction.initial)

    assert reconstruction.initial.dtype == torch.float32
    assert restored.dtype == np.float32
    np.testing.assert_allclose(restored, data.astype(np.float32), atol=1e-3)
    assert len(snapshots) == 1
    assert snapshots[-1].volume.dtype == np.float32
    assert np.all(np.isfinite(snapshots[-1].volume))


@pytest.mark.parametrize(("mode", "content"), [(3, "complex int16"), (4, "complex float32")])
def test_complex_mode_rejected_with_fix(tmp_path, mode, content):
    path, _ = _make_mode(tmp_path, mode)

    with pytest.raises(VolumeReadError) as caught:
        read_volume(path)

    message = str(caught.value)
    assert str(path) in message
    assert f"mode {mode} ({content})" in message
    assert "real-valued" in message
    assert "amplitude" in message


def test_mode101_rejected_with_fix(tmp_path):
    path, _ = _make_mode(tmp_path, 101)

    with pytest.raises(VolumeReadError) as caught:
        read_volume(path)

    message = str(caught.value)
    assert "mode 101 (4-bit packed integers)" in message
    assert "Convert the data to 8- or 16-bit integers" in message


@pytest.mark.parametrize("mode", [5, 7, 99, -1])
def test_unknown_mode_rejected(tmp_path, mode):
    path, _ = _make_mode(tmp_path, mode)

    with pytest.raises(VolumeReadError) as caught:
        read_volume(path)

    assert f"mode {mode} is not an MRC data mode" in str(caught.value)
    assert str(path) in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Large files

LARGE_SHAPE = (512, 2048, 2048)  # 8 GiB of float32


def _write_sparse_float32_mrc(path, shape):
    """Write an MRC header for float32 data of `shape` and extend the file without writing data.

    Returns the path, or calls pytest.skip when the file system does not store sparse files.
    """
    depth, height, width = shape
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((2, 2, 2), dtype=np.float32))
        mrc.voxel_size = 10.0
        mrc.header.nx, mrc.header.ny, mrc.header.nz = width, height, depth
        mrc.header.mx, mrc.header.my, mrc.header.mz = width, height, depth
        mrc.header.cella = (10.0 * width, 10.0 * height, 10.0 * depth)

    data_bytes = depth * height * width * 4
    with open(path, "r+b") as stream:
        stream.truncate(1024 + data_bytes)

    allocated_bytes = os.stat(path).st_blocks * 512
    if allocated_bytes > 64 << 20:
        path.unlink()
        pytest.skip(
            f"the file system of {path.parent} allocated {allocated_bytes} bytes for a sparse "
            f"file, so an 8 GiB test file would use 8 GiB of disk"
        )
    return path


def _resident_bytes(path):
    """Sum the resident memory (Rss) of this process's memory maps of `path`, from smaps.

    A page of a memory-mapped file becomes resident when it is read, so this is an upper bound
    on what was read through the maps that are still open. The kernel maps up to 64 KiB of
    neighbouring pages on each page fault, which this count includes.
    """
    total_kib = 0
    in_map_of_path = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and not fields[0].endswith(":"):
                # A map header line: address range, permissions, offset, device, inode, path.
                in_map_of_path = line.rstrip("\n").endswith(f" {path}")
            elif in_map_of_path and fields[0] == "Rss:":
                total_kib += int(fields[1])
    return total_kib * 1024


needs_smaps = pytest.mark.skipif(
    not Path("/proc/self/smaps").is_file(),
    reason="resident memory per map is read from /proc/self/smaps, which only Linux has",
)


@needs_smaps
def test_large_mrc_opens_without_reading(tmp_path, monkeypatch):
    path = _write_sparse_float32_mrc(tmp_path / "large.mrc", LARGE_SHAPE)
    checked_bytes = []
    count_non_finite = ebm_io._count_non_finite

    def spy(data):
        checked_bytes.append(data.nbytes)
        return count_non_finite(data)

    monkeypatch.setattr(ebm_io, "_count_non_finite", spy)

    volume = read_volume(path)
    resident = _resident_bytes(path.resolve())

    assert isinstance(volume.data, np.memmap)
    assert volume.data.shape == LARGE_SHAPE
    assert volume.voxel_size == pytest.approx((10.0, 10.0, 10.0))
    assert 0 < sum(checked_bytes) <= 128 << 20
    assert resident <= 192 << 20


@needs_smaps
def test_large_mrc_contrast_from_subsample(tmp_path):
    path = _write_sparse_float32_mrc(tmp_path / "large.mrc", LARGE_SHAPE)
    data = np.memmap(path, dtype=np.float32, mode="r", offset=1024, shape=LARGE_SHAPE)

    low, high = subsample_contrast_limits(data)
    resident = _resident_bytes(path.resolve())

    assert math.isfinite(low)
    assert math.isfinite(high)
    assert high > low
    assert resident <= 128 << 20


def test_large_mrc_nan_in_checked_section(tmp_path, monkeypatch):
    # Lower the limits so that a small file is checked by sections, as a large one is.
    monkeypatch.setattr(ebm_io, "_FULL_CHECK_MAX_BYTES", 1000)
    monkeypatch.setattr(ebm_io, "_SAMPLED_CHECK_BYTES", 3 * 6 * 7 * 4)
    data = _float_volume((10, 6, 7))
    data[9, 2, 3] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        path = _write_test_mrc(tmp_path / "nan.mrc", data)

    with pytest.raises(VolumeReadError) as caught:
        read_volume(path)

    assert str(path) in str(caught.value)
    assert "1 in the 3 of its 10 sections that were checked" in str(caught.value)


def test_contrast_limits_ignore_nan():
    data = np.linspace(0.0, 1.0, 1000, dtype=np.float32).reshape(10, 10, 10)
    data[0, 0, :5] = np.nan

    low, high = subsample_contrast_limits(data)

    assert 0.0 <= low < 0.05
    assert 0.95 < high <= 1.0


# ---------------------------------------------------------------------------------------------
# TIFF files


@pytest.mark.parametrize(
    ("unit", "angstrom_per_unit"),
    [("nm", 10.0), ("micron", 1e4), ("um", 1e4), ("\\u00B5m", 1e4), ("A", 1.0), ("angstrom", 1.0)],
)
def test_tiff_units_converted(tmp_path, unit, angstrom_per_unit):
    path = tmp_path / "volume.tif"
    tifffile.imwrite(
        path,
        _float_volume(),
        imagej=True,
        resolution=(1 / 0.2, 1 / 0.3),
        metadata={"spacing": 0.5, "unit": unit, "axes": "ZYX"},
    )

    volume = read_volume(path)

    expected = (0.5 * angstrom_per_unit, 0.3 * angstrom_per_unit, 0.2 * angstrom_per_unit)
    assert volume.voxel_size == pytest.approx(expected, rel=1e-6)


def test_tiff_data_read_unchanged(tmp_path):
    data = _float_volume()
    path = tmp_path / "volume.tif"
    metadata = {"spacing": 1.0, "unit": "nm", "axes": "ZYX"}
    tifffile.imwrite(path, data, imagej=True, metadata=metadata)

    volume = read_volume(path)

    assert isinstance(volume.data, np.memmap)
    assert np.array_equal(volume.data, data)


def test_compressed_tiff_reads(tmp_path):
    data = _float_volume()
    path = tmp_path / "volume.tiff"
    tifffile.imwrite(path, data, photometric="minisblack", compression="zlib")

    with pytest.warns(UserWarning):
        volume = read_volume(path)

    assert np.array_equal(volume.data, data)


def test_plain_tiff_uses_fallback(tmp_path):
    path = tmp_path / "volume.tif"
    tifffile.imwrite(path, _float_volume(), photometric="minisblack")

    with pytest.warns(UserWarning, match="no ImageJ metadata"):
        volume = read_volume(path, fallback_voxel_size=7.0)

    assert volume.voxel_size == (7.0, 7.0, 7.0)


def test_tiff_pixel_unit_uses_fallback(tmp_path):
    path = tmp_path / "volume.tif"
    tifffile.imwrite(path, _float_volume(), imagej=True, metadata={"unit": "pixel", "axes": "ZYX"})

    with pytest.warns(UserWarning, match="'pixel'"):
        volume = read_volume(path, fallback_voxel_size=7.0)

    assert volume.voxel_size == (7.0, 7.0, 7.0)


def test_tiff_2d_image_reads_one_section(tmp_path):
    path = tmp_path / "image.tif"
    image = _float_volume((1, 6, 7))[0]
    tifffile.imwrite(path, image)

    volume = read_volume(path, fallback_voxel_size=2.0)

    assert volume.data.shape == (1, 6, 7)
    np.testing.assert_array_equal(volume.data[0], image)


def test_single_section_mrc_reads_one_section(tmp_path):
    data = _float_volume((1, 6, 7))
    path = _write_test_mrc(tmp_path / "image.mrc", data)

    volume = read_volume(path)

    assert volume.data.shape == (1, 6, 7)
    np.testing.assert_array_equal(volume.data, data)


def test_rgb_tiff_rejected(tmp_path):
    path = tmp_path / "colour.tif"
    tifffile.imwrite(path, np.zeros((4, 6, 7, 3), dtype=np.uint8), photometric="rgb")

    with pytest.raises(VolumeReadError, match="colour image"):
        read_volume(path)


def test_tiff_channels_rejected(tmp_path):
    path = tmp_path / "channels.tif"
    tifffile.imwrite(path, _float_volume(), imagej=True, metadata={"axes": "CYX"})

    with pytest.raises(VolumeReadError, match="channel axis"):
        read_volume(path)


def test_tiff_nan_rejected(tmp_path):
    data = _float_volume()
    data[3, 4, 5] = np.nan
    path = tmp_path / "nan.tif"
    metadata = {"spacing": 1.0, "unit": "nm", "axes": "ZYX"}
    tifffile.imwrite(path, data, imagej=True, metadata=metadata)

    with pytest.raises(VolumeReadError, match="1 non-finite voxels"):
        read_volume(path)


# ---------------------------------------------------------------------------------------------
# write_mrc: rejected requests


def test_write_rejects_existing_target(tmp_path):
    path = _write_test_mrc(tmp_path / "output.mrc", _float_volume())
    before = path.read_bytes()

    with pytest.raises(VolumeWriteError, match="already exists") as caught:
        write_mrc(path, _float_volume() + 1, (1.0, 1.0, 1.0))

    assert "--overwrite" in str(caught.value)
    assert path.read_bytes() == before


def test_write_overwrite_replaces_target(tmp_path):
    path = _write_test_mrc(tmp_path / "output.mrc", _float_volume())
    data = _float_volume() + 1

    write_mrc(path, data, (1.0, 1.0, 1.0), overwrite=True)

    assert np.array_equal(read_volume(path).data, data)
    assert _files_in(tmp_path) == ["output.mrc"]


def test_write_rejects_protected_input(tmp_path):
    path = _write_test_mrc(tmp_path / "input.mrc", _float_volume())
    before = path.read_bytes()

    with pytest.raises(VolumeWriteError, match="writing over the input is not allowed"):
        write_mrc(
            path, _float_volume() + 1, (1.0, 1.0, 1.0), overwrite=True, protected_paths=[path]
        )

    assert path.read_bytes() == before


def test_write_rejects_input_alias(tmp_path):
    path = _write_test_mrc(tmp_path / "input.mrc", _float_volume())
    (tmp_path / "sub").mkdir()
    alias = tmp_path / "sub" / ".." / "input.mrc"

    with pytest.raises(VolumeWriteError, match="input file"):
        write_mrc(alias, _float_volume(), (1.0, 1.0, 1.0), overwrite=True, protected_paths=[path])


@pytest.mark.parametrize("bad_value", [0.0, -1.0, math.nan, math.inf])
def test_write_rejects_bad_voxel_size(tmp_path, bad_value):
    path = tmp_path / "output.mrc"

    with pytest.raises(ParameterError, match=re.escape(str(bad_value))):
        write_mrc(path, _float_volume(), (1.0, bad_value, 1.0))

    assert not path.exists()


def test_bad_voxel_size_is_value_error(tmp_path):
    with pytest.raises(ValueError):
        write_mrc(tmp_path / "output.mrc", _float_volume(), (0.0, 0.0, 0.0))


def test_write_rejects_nan_origin(tmp_path):
    with pytest.raises(ParameterError, match="origin"):
        write_mrc(tmp_path / "output.mrc", _float_volume(), (1.0, 1.0, 1.0), (0.0, math.nan, 0.0))


def test_write_rejects_2d_data(tmp_path):
    path = tmp_path / "output.mrc"

    with pytest.raises(VolumeWriteError, match=r"shape \(5, 6\)"):
        write_mrc(path, np.zeros((5, 6), np.float32), (1.0, 1.0, 1.0))

    assert not path.exists()


def test_write_rejects_nan_data(tmp_path):
    data = _float_volume()
    data[1, 2, 3] = np.nan
    path = tmp_path / "output.mrc"

    with pytest.raises(VolumeWriteError, match="1 non-finite values"):
        write_mrc(path, data, (1.0, 1.0, 1.0))

    assert not path.exists()


def test_write_rejects_int32_data(tmp_path):
    with pytest.raises(VolumeWriteError, match="int32"):
        write_mrc(tmp_path / "output.mrc", np.zeros((2, 3, 4), np.int32), (1.0, 1.0, 1.0))


def test_write_rejects_tiff_suffix(tmp_path):
    with pytest.raises(VolumeWriteError, match="output.mrc"):
        write_mrc(tmp_path / "output.tif", _float_volume(), (1.0, 1.0, 1.0))


def test_write_rejects_missing_folder(tmp_path):
    with pytest.raises(VolumeWriteError, match="does not exist"):
        write_mrc(tmp_path / "missing" / "output.mrc", _float_volume(), (1.0, 1.0, 1.0))


# ---------------------------------------------------------------------------------------------
# write_mrc: failures during the write


def _failing_mrcfile_new(exception):
    """Return a stand-in for mrcfile.new that writes part of a file and then raises."""

    def new(name, *args, **kwargs):
        Path(name).write_bytes(b"\0" * 100)
        raise exception

    return new


def test_failed_write_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.setattr(ebm_io.mrcfile, "new", _failing_mrcfile_new(OSError("disk full")))
    path = tmp_path / "output.mrc"

    with pytest.raises(VolumeWriteError, match="disk full") as caught:
        write_mrc(path, _float_volume(), (1.0, 1.0, 1.0))

    assert str(path) in str(caught.value)
    assert _files_in(tmp_path) == []


def test_interrupted_write_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.setattr(ebm_io.mrcfile, "new", _failing_mrcfile_new(KeyboardInterrupt()))

    with pytest.raises(KeyboardInterrupt):
        write_mrc(tmp_path / "output.mrc", _float_volume(), (1.0, 1.0, 1.0))

    assert _files_in(tmp_path) == []


def test_failed_replace_keeps_target(tmp_path, monkeypatch):
    path = _write_test_mrc(tmp_path / "output.mrc", _float_volume())
    before = path.read_bytes()

    def fail_replace(source, destination):
        raise OSError("rename failed")

    monkeypatch.setattr(ebm_io.os, "replace", fail_replace)

    with pytest.raises(VolumeWriteError, match="rename failed"):
        write_mrc(path, _float_volume() + 1, (1.0, 1.0, 1.0), overwrite=True)

    assert path.read_bytes() == before
    assert _files_in(tmp_path) == ["output.mrc"]


# ---------------------------------------------------------------------------------------------
# Volume


def test_volume_rejects_2d_data():
    with pytest.raises(ValueError, match="3D"):
        Volume(data=np.zeros((5, 6)), voxel_size=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))


def test_volume_rejects_zero_voxel_size():
    with pytest.raises(ValueError, match="voxel_size"):
        Volume(data=np.zeros((2, 5, 6)), voxel_size=(1.0, 0.0, 1.0), origin=(0.0, 0.0, 0.0))


def test_volume_normalizes_fields():
    volume = Volume(
        data=np.zeros((2, 5, 6)), voxel_size=[1, 2, 3], origin=np.zeros(3), path="a.mrc"
    )

    assert volume.voxel_size == (1.0, 2.0, 3.0)
    assert volume.origin == (0.0, 0.0, 0.0)
    assert volume.path == Path("a.mrc")
