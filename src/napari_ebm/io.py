"""Read and write volumes in MRC and TIFF files, with their voxel size and origin.

All sizes and positions are in Angstrom and all axis orders are (z, y, x), as in the numpy
arrays. MRC headers store (x, y, z), and this module converts between the two orders. This module
is part of the numeric core, so it imports neither Qt nor napari.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import mrcfile
import numpy as np
import tifffile

from napari_ebm.errors import MissingVoxelSizeWarning, ParameterError, VolumeReadError, VolumeWriteError

logger = logging.getLogger(__name__)

MRC_SUFFIXES = (".mrc", ".rec", ".map", ".st", ".ali", ".mrcs")
TIFF_SUFFIXES = (".tif", ".tiff")

# Suffixes that IMOD and RELION use for image stacks (tilt series, aligned stacks, particle
# stacks). A file with one of these suffixes and space group 0 is read as a stack.
STACK_SUFFIXES = (".st", ".ali", ".mrcs")

MRC_HEADER_BYTES = 1024

# MRC modes from the MRC2014 format definition, with the dtype that each is read as. Mode 0 is
# read as uint8 instead when an IMOD header flag marks its bytes as unsigned.
_ACCEPTED_MRC_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}

# MRC modes that napari-ebm rejects, each with a description of its data and the advice shown to
# the user. napari-ebm reconstructs real-valued data of at least 8 bits per voxel.
_COMPLEX_MODE_ADVICE = (
    "Convert the data to real values first, for example to the amplitude (absolute value) of "
    "each voxel, and save it as float32 (mode 2)."
)
_UNSUPPORTED_MRC_MODES = {
    3: ("complex int16", _COMPLEX_MODE_ADVICE),
    4: ("complex float32", _COMPLEX_MODE_ADVICE),
    101: (
        "4-bit packed integers",
        "Convert the data to 8- or 16-bit integers (mode 0, 1 or 6) or float32 (mode 2) first.",
    ),
}

# IMOD writes this stamp ("IMOD" in ASCII) as an int32 at byte 152 of the header, followed by the
# int32 imodFlags at byte 156. Bit 0 of imodFlags is set when mode 0 bytes are signed.
_IMOD_STAMP = 1146047817
_IMOD_STAMP_OFFSET = 152
_IMOD_FLAG_SIGNED_BYTES = 1

_LFS_POINTER_PREFIX = b"version https://git-lfs"

# Sections (slices along axis 0) checked for NaN and infinity per step, which bounds the memory
# that the check needs to this many sections, whatever the size of the file.
_SCAN_SECTIONS = 16

# read_volume checks float data up to this size for NaN and infinity in full. Checking larger
# data in full would read the whole memory-mapped file from disk when it is opened, so only
# evenly spaced sections of at most _SAMPLED_CHECK_BYTES in total are checked.
_FULL_CHECK_MAX_BYTES = 1 << 30  # 1 GiB
_SAMPLED_CHECK_BYTES = 128 << 20  # 128 MiB

# Length units that ImageJ writes into the "unit" field of its TIFF metadata.
_TIFF_UNIT_TO_ANGSTROM = {
    "a": 1.0,
    "å": 1.0,
    "angstrom": 1.0,
    "nm": 10.0,
    "nanometer": 10.0,
    "micron": 1.0e4,
    "microns": 1.0e4,
    "um": 1.0e4,
    "µm": 1.0e4,  # U+00B5 MICRO SIGN
    "μm": 1.0e4,  # U+03BC GREEK SMALL LETTER MU
    "\\u00b5m": 1.0e4,  # ImageJ writes the micro sign as this escape in its TIFF description
}

_AXIS_NAMES = ("z", "y", "x")

# Integer dtypes that write_mrc stores, and the dtype written for each. uint8 is widened to
# uint16 without loss, because MRC2014 defines mode 0 as signed int8.
_MRC_INTEGER_WRITE_DTYPES = {
    np.dtype(np.int8): np.dtype(np.int8),
    np.dtype(np.int16): np.dtype(np.int16),
    np.dtype(np.uint16): np.dtype(np.uint16),
    np.dtype(np.uint8): np.dtype(np.uint16),
}


@dataclass
class Volume:
    """A 3D volume or image stack with its voxel size and origin.

    Attributes
    ----------
    data : numpy.ndarray
        Voxel values with shape (z, y, x), in the dtype stored in the file. Data read from a
        file is usually a read-only :class:`numpy.memmap`, so copy it before changing it.
    voxel_size : tuple of float
        Voxel size in Angstrom per voxel, order (z, y, x). All values are finite and > 0.
    origin : tuple of float
        Position of voxel (0, 0, 0) in Angstrom, order (z, y, x).
    path : pathlib.Path or None
        File that the volume was read from, or None for a volume made in memory. A string is
        converted to a Path.
    is_stack : bool
        True for an image stack such as a tilt series. Axis 0 is then the view index, not a
        spatial axis, and ``voxel_size[0]`` is only a copy of the x voxel size.

    Raises
    ------
    ValueError
        If `data` is not 3D, a voxel size is not finite or not > 0, or an origin value is not
        finite. The values are checked when the volume is created, not on later assignment.
    """

    data: np.ndarray
    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float]
    path: Path | None = None
    is_stack: bool = False

    def __post_init__(self):
        if self.data.ndim != 3:
            raise ValueError(
                f"Volume data must be 3D (z, y, x), but it has shape {self.data.shape}."
            )

        self.voxel_size = _as_float_triple("voxel_size", self.voxel_size)
        self.origin = _as_float_triple("origin", self.origin)
        if self.path is not None:
            self.path = Path(self.path)

        if not all(math.isfinite(value) and value > 0 for value in self.voxel_size):
            raise ValueError(
                f"Volume voxel_size must be finite and > 0 on every axis, "
                f"but it is {self.voxel_size} Angstrom (z, y, x)."
            )
        if not all(math.isfinite(value) for value in self.origin):
            raise ValueError(
                f"Volume origin must be finite on every axis, "
                f"but it is {self.origin} Angstrom (z, y, x)."
            )


def read_volume(path: str | os.PathLike, *, fallback_voxel_size: float = 1.0) -> Volume:
    """Read a 3D volume or image stack from an MRC or TIFF file.

    MRC files (suffixes in ``MRC_SUFFIXES``, in any letter case) are memory-mapped, so a large
    file is not read into memory. The returned data is a read-only :class:`numpy.memmap` that
    stays valid after this function returns. TIFF files (``TIFF_SUFFIXES``) are memory-mapped
    when their image data is stored uncompressed in one contiguous block, and read into memory
    otherwise.

    The voxel size comes from the MRC header (cell size divided by sampling) or from the ImageJ
    metadata of a TIFF file (z spacing, XResolution and YResolution tags, and the length unit).
    The origin comes from the MRC header's ``origin`` field. TIFF files get origin (0, 0, 0).

    An MRC file with space group 0 and a stack suffix (``.st``, ``.ali``, ``.mrcs``) is read as
    an image stack (``is_stack=True``). Axis 0 of a stack is the view index, not a spatial
    axis, so ``voxel_size[0]`` is set to the x voxel size. Other files with space group 0 are
    read as volumes.

    MRC mode 0 is read as int8, as MRC2014 defines it, unless the header has the IMOD stamp
    and its imodFlags mark the bytes as unsigned, in which case the data is read as uint8.

    Float data is checked for NaN and infinity. Data up to 1 GiB is checked in full. For larger
    data only evenly spaced sections (slices along axis 0) of about 128 MiB in total are read,
    so that opening a large tomogram does not read the whole file.

    Parameters
    ----------
    path : str or os.PathLike
        File to read.
    fallback_voxel_size : float, optional
        Voxel size in Angstrom used for each axis whose voxel size in the file is missing, zero,
        negative or not finite. Must be finite and > 0. Default 1.0.

    Returns
    -------
    Volume
        The data with shape (z, y, x), its voxel size and origin in Angstrom, and `path`.

    Raises
    ------
    VolumeReadError
        If the file is missing, is a folder, is empty, is a Git LFS pointer or has an
        unsupported suffix. Also if it is not a valid MRC or TIFF file, is truncated, uses an
        MRC mode other than 0, 1, 2, 6 or 12, or contains NaN or infinite
        values in the checked sections. Errors from mrcfile, tifffile and the operating system
        are re-raised as VolumeReadError. The message names the file, the problem and what to
        do.
    ParameterError
        If `fallback_voxel_size` is not finite or not > 0.

    Warns
    -----
    UserWarning
        Once per file when the fallback voxel size replaces a missing or invalid voxel size on
        one or more axes, naming the file, the axes and the fallback. Also when a non-finite
        origin is replaced by 0, and when an MRC mode 0 file does not say whether its bytes
        are signed.

    Notes
    -----
    NaN or infinity in the sections of a file over 1 GiB that were not checked is found when
    a run converts the volume to float32, because :class:`napari_ebm.run.Reconstruction`
    counts the non-finite voxels and raises a ParameterError.
    """
    fallback = _check_fallback_voxel_size(fallback_voxel_size)
    path = Path(path).expanduser()

    file_size = _check_readable_file(path)

    suffix = path.suffix.lower()
    if suffix in MRC_SUFFIXES:
        volume = _read_mrc(path, file_size, fallback)
    else:
        volume = _read_tiff(path, fallback)

    _check_finite_data(path, volume.data)

    logger.debug(
        "Read %s: shape %s, dtype %s, voxel size %s A, origin %s A, image stack %s",
        path,
        volume.data.shape,
        volume.data.dtype,
        volume.voxel_size,
        volume.origin,
        volume.is_stack,
    )
    return volume


def write_mrc(
    path: str | os.PathLike,
    data: np.ndarray,
    voxel_size: Iterable[float],
    origin: Iterable[float] = (0.0, 0.0, 0.0),
    *,
    overwrite: bool = False,
    protected_paths: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write a 3D volume to an MRC file, replacing the target in one atomic step.

    Floating-point data is written as float32 (mode 2). int8 (mode 0), int16 (mode 1) and
    uint16 (mode 6) data keep their dtype, and uint8 data is widened to uint16 without loss,
    because MRC mode 0 is signed. The header gets the voxel size, the origin, space group 1
    (a single volume) and the data statistics (minimum, maximum, mean, RMS). int8 data also
    gets the IMOD stamp with the flag for signed bytes, so IMOD and :func:`read_volume` read
    it back as signed without a warning.

    The file is first written to a temporary file ``.<name>.<random>.tmp`` in the target's
    folder, flushed to disk with ``os.fsync`` and then renamed onto the target with
    :func:`os.replace`. If writing fails or is interrupted, the temporary file is removed and
    an existing target is left unchanged. A process killed mid-write (for example by SIGKILL
    or a power loss) can leave the temporary file behind, but never a half-written target.

    Parameters
    ----------
    path : str or os.PathLike
        Output file. Its suffix must be one of ``MRC_SUFFIXES``.
    data : numpy.ndarray
        Volume with shape (z, y, x). All values must be finite.
    voxel_size : sequence of 3 float
        Voxel size in Angstrom, order (z, y, x). Each value must be finite and > 0.
    origin : sequence of 3 float, optional
        Position of voxel (0, 0, 0) in Angstrom, order (z, y, x). Default (0, 0, 0).
    overwrite : bool, optional
        Replace `path` if it exists. Default False.
    protected_paths : iterable of str or os.PathLike, optional
        Files that must never be replaced, such as the input volume. Writing to one of them is
        rejected even with ``overwrite=True``.

    Returns
    -------
    pathlib.Path
        The path of the written file.

    Raises
    ------
    VolumeWriteError
        If the target exists and `overwrite` is False, is one of `protected_paths`, is a folder,
        lies in a folder that does not exist, or does not have an MRC suffix. Also if `data` is
        not 3D, contains NaN or infinity, or has a dtype that MRC cannot store, and if writing
        fails. The message names the file and what to do.
    ParameterError
        If `voxel_size` or `origin` does not contain three finite values, or a voxel size is
        not > 0. ParameterError is a subclass of ValueError.
    """
    target = Path(path).expanduser()
    voxel_zyx = _check_triple("voxel_size", voxel_size, positive=True)
    origin_zyx = _check_triple("origin", origin, positive=False)

    array = _prepare_mrc_data(target, data)
    _check_write_target(target, overwrite, protected_paths)

    _write_mrc_atomically(target, array, voxel_zyx, origin_zyx)

    logger.info(
        "Wrote %s: shape %s, dtype %s, voxel size %s A (z, y, x)",
        target,
        array.shape,
        array.dtype,
        voxel_zyx,
    )
    return target


# ---------------------------------------------------------------------------------------------
# Checks shared by all formats


def _check_fallback_voxel_size(value: float) -> float:
    try:
        fallback = float(value)
    except (TypeError, ValueError):
        fallback = math.nan

    if not (math.isfinite(fallback) and fallback > 0):
        raise ParameterError(
            f"fallback_voxel_size must be a finite number > 0 in Angstrom, but it is {value!r}."
        )
    return fallback


def _check_readable_file(path: Path) -> int:
    """Check that `path` is a regular, non-empty file with a supported suffix.

    Returns the file size in bytes.
    """
    if not path.exists():
        raise VolumeReadError(
            f"File not found: {path}. Check the path. A relative path is resolved from the "
            f"current folder {Path.cwd()}."
        )
    if path.is_dir():
        raise VolumeReadError(
            f"{path} is a folder, not a file. Give the path of an MRC or TIFF file."
        )
    if not path.is_file():
        raise VolumeReadError(
            f"{path} is not a regular file (it may be a device or a pipe). "
            f"Give the path of an MRC or TIFF file."
        )

    suffix = path.suffix.lower()
    if suffix not in MRC_SUFFIXES + TIFF_SUFFIXES:
        raise VolumeReadError(
            f"{path} has the unsupported suffix '{path.suffix}'. napari-ebm reads MRC files "
            f"({', '.join(MRC_SUFFIXES)}) and TIFF files ({', '.join(TIFF_SUFFIXES)}). "
            f"Convert the file to one of these formats."
        )

    try:
        file_size = path.stat().st_size
        with path.open("rb") as stream:
            start = stream.read(len(_LFS_POINTER_PREFIX))
    except OSError as err:
        raise VolumeReadError(
            f"Could not read {path}: {err}. Check that you have permission to read the file."
        ) from err

    if file_size == 0:
        raise VolumeReadError(
            f"{path} is empty (0 bytes). The copy or download probably failed, so copy the "
            f"file again."
        )
    if start == _LFS_POINTER_PREFIX:
        raise VolumeReadError(
            f"{path} is a Git LFS pointer file, not the data itself. Run `git lfs pull` in the "
            f"repository that contains it to download the data."
        )
    return file_size


def _check_finite_data(path: Path, data: np.ndarray) -> None:
    if data.dtype.kind != "f":
        return

    sections = _sections_to_check(data)
    if sections is None:
        non_finite = _count_non_finite(data)
        if non_finite:
            raise VolumeReadError(
                f"{path} contains {non_finite} non-finite voxels (NaN or infinity) out of "
                f"{data.size}. napari-ebm needs finite values, so replace them (for example "
                f"with the volume mean) and save the file again."
            )
        return

    # NOTE: NaN or infinity in the sections not checked here is found only when a run converts
    # the volume to float32, where napari_ebm.run.Reconstruction counts them and raises a
    # ParameterError.
    non_finite = sum(_count_non_finite(data[index]) for index in sections)
    logger.debug(
        "Checked %d of the %d sections of %s (%d bytes) for NaN and infinity",
        len(sections),
        data.shape[0],
        path,
        data.nbytes,
    )
    if non_finite:
        raise VolumeReadError(
            f"{path} contains non-finite voxels (NaN or infinity): {non_finite} in the "
            f"{len(sections)} of its {data.shape[0]} sections that were checked. napari-ebm "
            f"needs finite values, so replace them (for example with the volume mean) and save "
            f"the file again."
        )


def _sections_to_check(data: np.ndarray) -> list[int] | None:
    """Choose the sections along axis 0 that the finite check reads, or None for all of them.

    Above `_FULL_CHECK_MAX_BYTES`, evenly spaced sections of at most `_SAMPLED_CHECK_BYTES` in
    total are chosen, including the first one. One section is always checked, even if it alone
    is larger than `_SAMPLED_CHECK_BYTES`.
    """
    if data.nbytes <= _FULL_CHECK_MAX_BYTES:
        return None

    section_count = data.shape[0]
    section_bytes = data.nbytes // section_count
    checked_count = min(section_count, max(1, _SAMPLED_CHECK_BYTES // section_bytes))

    indices = np.linspace(0, section_count - 1, checked_count).round().astype(int)
    return sorted(set(indices.tolist()))


def _count_non_finite(data: np.ndarray) -> int:
    """Count NaN and infinite values, reading `_SCAN_SECTIONS` slices of axis 0 at a time."""
    if data.dtype.kind != "f":
        return 0

    count = 0
    for start in range(0, data.shape[0], _SCAN_SECTIONS):
        sections = data[start : start + _SCAN_SECTIONS]
        count += int(np.count_nonzero(~np.isfinite(sections)))
    return count


def _replace_invalid_voxel_sizes(
    path: Path, sizes: dict[str, float], fallback: float, advice: str
) -> dict[str, float]:
    """Replace each voxel size that is not finite and > 0 by `fallback`.

    Parameters
    ----------
    path : pathlib.Path
        File that the sizes come from, named in the warning.
    sizes : dict of str to float
        Voxel size in Angstrom per axis name, in the order that the warning lists them.
    fallback : float
        Voxel size in Angstrom that replaces each invalid value.
    advice : str
        Advice on how to set the voxel size in this kind of file, which ends the warning.

    Returns
    -------
    dict of str to float
        The sizes in Angstrom, with the invalid ones replaced.

    Warns
    -----
    MissingVoxelSizeWarning
        Once, when one or more sizes are invalid. It names the file, the axes, their values and
        the fallback. It is a UserWarning.
    """
    invalid_axes = [
        axis for axis, value in sizes.items() if not (math.isfinite(value) and value > 0)
    ]
    if not invalid_axes:
        return dict(sizes)

    axis_word = "axis" if len(invalid_axes) == 1 else "axes"
    value_word = "value" if len(invalid_axes) == 1 else "values"
    values = ", ".join(f"{sizes[axis]:g}" for axis in invalid_axes)
    warnings.warn(
        f"{path} has no valid voxel size on {axis_word} {', '.join(invalid_axes)} ({value_word} "
        f"{values} Angstrom), so the fallback voxel size of {fallback:g} Angstrom is used "
        f"instead. If that is wrong, {advice}",
        MissingVoxelSizeWarning,
    )

    return {axis: fallback if axis in invalid_axes else value for axis, value in sizes.items()}


def _float32_to_float(value) -> float:
    """Convert a float32 header value to the shortest Python float that rounds back to it.

    This gives 10.52 for the float32 closest to 10.52, not 10.520000457763672.
    """
    return float(str(np.float32(value)))


def _as_float_triple(name: str, values) -> tuple[float, float, float]:
    try:
        triple = tuple(float(value) for value in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be three numbers (z, y, x), but it is {values!r}.") from err

    if len(triple) != 3:
        raise ValueError(f"{name} must be three numbers (z, y, x), but it is {values!r}.")
    return triple


# ---------------------------------------------------------------------------------------------
# MRC reading


class _MrcLayout(NamedTuple):
    """Header values of an MRC file, copied out so that the mrcfile object can be closed."""

    mode: int
    nx: int
    ny: int
    nz: int
    nsymbt: int
    ispg: int
    voxel_size_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    data_dtype: np.dtype | None
    data_shape: tuple[int, ...] | None
    imod_stamp: int
    imod_flags: int
    mrcfile_warnings: tuple[str, ...]


def _read_mrc(path: Path, file_size: int, fallback: float) -> Volume:
    if file_size < MRC_HEADER_BYTES:
        raise VolumeReadError(
            f"{path} is too short to be an MRC file: it has {file_size} bytes, but an MRC file "
            f"needs at least a {MRC_HEADER_BYTES}-byte header. The file is probably incomplete "
            f"or not an MRC file. Copy it again or check its format."
        )

    layout = _inspect_mrc(path)
    for message in layout.mrcfile_warnings:
        logger.debug("mrcfile warning for %s: %s", path, message)

    _check_mrc_mode_and_shape(path, layout)
    _check_mrc_size(path, layout, file_size)
    if layout.mode == 0:
        layout = layout._replace(data_dtype=_mode_0_dtype(path, layout))
    data = _map_mrc_data(path, layout)

    is_stack = layout.ispg == 0 and path.suffix.lower() in STACK_SUFFIXES
    voxel_size = _mrc_voxel_size(path, layout, fallback, is_stack)
    origin = _mrc_origin(path, layout)

    return Volume(data=data, voxel_size=voxel_size, origin=origin, path=path, is_stack=is_stack)


def _inspect_mrc(path: Path) -> _MrcLayout:
    """Read the header with mrcfile in permissive mode and copy out the values needed.

    Permissive mode turns header problems into RuntimeWarnings, so files with an odd header
    (for example no "MAP " id and machine stamp 0) still open.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with mrcfile.mmap(path, mode="r", permissive=True) as mrc:
                layout = _layout_from_mrc(mrc)
        except (OSError, ValueError) as err:
            raise VolumeReadError(
                f"Could not read {path} as an MRC file: {err}. Check that the file is a "
                f"complete MRC file."
            ) from err

    return layout._replace(mrcfile_warnings=tuple(str(warning.message) for warning in caught))


def _layout_from_mrc(mrc) -> _MrcLayout:
    header = mrc.header
    voxel_size = mrc.voxel_size
    data = mrc.data

    # mrcfile has no named field for the IMOD stamp and flags, so they are read from the raw
    # header bytes in the header's byte order.
    imod_stamp, imod_flags = np.frombuffer(
        header.tobytes(), dtype=header.dtype["nx"], count=2, offset=_IMOD_STAMP_OFFSET
    )

    return _MrcLayout(
        mode=int(header.mode),
        nx=int(header.nx),
        ny=int(header.ny),
        nz=int(header.nz),
        nsymbt=int(header.nsymbt),
        ispg=int(header.ispg),
        voxel_size_xyz=tuple(_float32_to_float(voxel_size[axis]) for axis in "xyz"),
        origin_xyz=tuple(_float32_to_float(header.origin[axis]) for axis in "xyz"),
        data_dtype=None if data is None else data.dtype,
        data_shape=None if data is None else data.shape,
        imod_stamp=int(imod_stamp),
        imod_flags=int(imod_flags),
        mrcfile_warnings=(),
    )


def _check_mrc_mode_and_shape(path: Path, layout: _MrcLayout) -> None:
    problems = []
    if layout.mode not in _ACCEPTED_MRC_MODES and layout.mode not in _UNSUPPORTED_MRC_MODES:
        problems.append(f"mode {layout.mode} is not an MRC data mode")
    if min(layout.nx, layout.ny, layout.nz) < 1:
        problems.append(
            f"the dimensions (nx, ny, nz) = ({layout.nx}, {layout.ny}, {layout.nz}) are not "
            f"all positive"
        )
    if layout.nsymbt < 0:
        problems.append(f"the extended header size {layout.nsymbt} is negative")
    if problems:
        raise VolumeReadError(
            f"{path} is not a valid MRC file: {' and '.join(problems)}. The header gives mode "
            f"{layout.mode}, dimensions (nx, ny, nz) = ({layout.nx}, {layout.ny}, {layout.nz}) "
            f"and an extended header of {layout.nsymbt} bytes. Check that the file is an MRC "
            f"file and convert other formats to MRC first."
        )

    if layout.mode in _UNSUPPORTED_MRC_MODES:
        content, advice = _UNSUPPORTED_MRC_MODES[layout.mode]
        accepted = ", ".join(f"{mode} ({name})" for mode, name in _ACCEPTED_MRC_MODES.items())
        raise VolumeReadError(
            f"{path} uses MRC mode {layout.mode} ({content}), which napari-ebm cannot read, "
            f"because it reconstructs real-valued volumes stored in the modes {accepted}. "
            f"{advice}"
        )

    # A file with one section is read as a volume of shape (1, ny, nx), so an output written from
    # it has one section too.


def _mode_0_dtype(path: Path, layout: _MrcLayout) -> np.dtype:
    """Return int8 or uint8 for mode 0 data, from the IMOD stamp and flags in the header.

    MRC2014 defines mode 0 as signed, but files from IMOD can contain unsigned bytes, and IMOD
    marks signed ones with bit 0 of imodFlags. Without the IMOD stamp the bytes are read as
    signed.

    Warns
    -----
    UserWarning
        When the header has no IMOD stamp, so the file does not say whether its bytes are
        signed.
    """
    if layout.imod_stamp == _IMOD_STAMP:
        if layout.imod_flags & _IMOD_FLAG_SIGNED_BYTES:
            return np.dtype(np.int8)
        return np.dtype(np.uint8)

    warnings.warn(
        f"{path} stores 8-bit values (MRC mode 0) but has no IMOD header stamp that says "
        f"whether they are signed, so they are read as signed (-128 to 127), as the MRC2014 "
        f"standard defines. If the values look wrong, for example with bright and dark "
        f"swapped in parts of the volume, the file contains unsigned bytes (0 to 255). "
        f"Convert it to 16-bit integers (MRC mode 1 or 6) and open the converted file.",
        UserWarning,
    )
    return np.dtype(np.int8)


def _check_mrc_size(path: Path, layout: _MrcLayout, file_size: int) -> None:
    itemsize = np.dtype(_ACCEPTED_MRC_MODES[layout.mode]).itemsize
    voxel_bytes = layout.nx * layout.ny * layout.nz * itemsize
    expected = MRC_HEADER_BYTES + layout.nsymbt + voxel_bytes

    if file_size < expected:
        raise VolumeReadError(
            f"{path} is truncated: its header describes {expected} bytes (a "
            f"{MRC_HEADER_BYTES}-byte header, a {layout.nsymbt}-byte extended header and "
            f"{layout.nx} x {layout.ny} x {layout.nz} voxels of {itemsize} bytes), but the file "
            f"has {file_size} bytes. The file is probably incomplete, so copy it again from its "
            f"source."
        )

    if layout.data_dtype is None:
        # The sizes agree, so mrcfile failed for another reason, which its warnings give.
        details = " ".join(layout.mrcfile_warnings) or "no reason given"
        raise VolumeReadError(
            f"mrcfile could not read the data block of {path}: {details}. Check that the file "
            f"is a complete MRC file."
        )


def _map_mrc_data(path: Path, layout: _MrcLayout) -> np.ndarray:
    """Memory-map the data block read-only.

    The map is opened here with numpy rather than kept from mrcfile, because mrcfile drops and
    may release its map when the MrcMemmap object is closed or garbage-collected. A
    numpy.memmap of our own keeps its mmap alive for as long as any array refers to it, and
    keeps no open file object.
    """
    if len(layout.data_shape) != 3:
        raise VolumeReadError(
            f"{path} contains data of shape {layout.data_shape} (space group {layout.ispg}), "
            f"but napari-ebm reads one 3D volume (z, y, x) per file. Save each volume of the "
            f"stack to its own file."
        )

    offset = MRC_HEADER_BYTES + layout.nsymbt
    try:
        return np.memmap(
            path, dtype=layout.data_dtype, mode="r", offset=offset, shape=layout.data_shape
        )
    except (OSError, ValueError) as err:
        raise VolumeReadError(
            f"Could not memory-map the data of {path}: {err}. Check that the file is complete "
            f"and that you have permission to read it."
        ) from err


_MRC_VOXEL_SIZE_ADVICE = (
    "pass the voxel size on the command line (--voxel-size, in Angstrom), set the layer's scale "
    "in napari, or set it in the file's header, for example with mrcfile (mrc.voxel_size = the "
    "size in Angstrom), and open the file again."
)


def _mrc_voxel_size(
    path: Path, layout: _MrcLayout, fallback: float, is_stack: bool
) -> tuple[float, float, float]:
    header_x, header_y, header_z = layout.voxel_size_xyz
    sizes = {"z": header_z, "y": header_y, "x": header_x}
    if is_stack:
        # Axis 0 of a stack is the view index, so its header spacing is not a length and is
        # neither checked nor used.
        del sizes["z"]

    sizes = _replace_invalid_voxel_sizes(path, sizes, fallback, _MRC_VOXEL_SIZE_ADVICE)

    z_size = sizes["x"] if is_stack else sizes["z"]
    return (z_size, sizes["y"], sizes["x"])


def _mrc_origin(path: Path, layout: _MrcLayout) -> tuple[float, float, float]:
    # NOTE: only the MRC2014 origin field is read. The older nxstart/nystart/nzstart fields,
    # which some programs use for the position of the first voxel, are ignored.
    origin = {}
    for axis, value in zip("xyz", layout.origin_xyz):
        if not math.isfinite(value):
            warnings.warn(
                f"{path} has a non-finite origin of {value} Angstrom on the {axis} axis, so 0 "
                f"is used instead.",
                UserWarning,
            )
            value = 0.0
        origin[axis] = value

    return (origin["z"], origin["y"], origin["x"])


# ---------------------------------------------------------------------------------------------
# TIFF reading


def _read_tiff(path: Path, fallback: float) -> Volume:
    try:
        with tifffile.TiffFile(path) as tif:
            page_count = len(tif.pages)
            if page_count > 0:
                data, axes = _load_tiff_series(path, tif)
                samples_per_pixel = tif.pages[0].samplesperpixel
                imagej_metadata = tif.imagej_metadata
                x_resolution = _resolution_tag(tif.pages[0], "XResolution")
                y_resolution = _resolution_tag(tif.pages[0], "YResolution")
    except (OSError, ValueError) as err:
        # tifffile.TiffFileError, raised for invalid TIFF structure, is a ValueError.
        raise VolumeReadError(
            f"Could not read {path} as a TIFF file: {err}. Check that the file is a complete "
            f"TIFF file and that you have permission to read it."
        ) from err

    if page_count == 0:
        raise VolumeReadError(
            f"{path} is a TIFF file without images. The file is probably incomplete, so copy "
            f"it again or save it again."
        )

    if data.ndim == 2 and samples_per_pixel == 1:
        # A single image is read as a volume with one section, like an MRC file with nz = 1.
        data, axes = data[np.newaxis], "Z" + axes
    _check_tiff_shape(path, data, axes, samples_per_pixel)

    voxel_size = _tiff_voxel_size(path, imagej_metadata, x_resolution, y_resolution, fallback)
    return Volume(data=data, voxel_size=voxel_size, origin=(0.0, 0.0, 0.0), path=path)


def _load_tiff_series(path: Path, tif: tifffile.TiffFile) -> tuple[np.ndarray, str]:
    """Return the first image series and its axes, memory-mapped where the layout allows."""
    series = tif.series[0]

    if series.dataoffset is None:
        # Compressed or scattered image data cannot be memory-mapped.
        return series.asarray(), series.axes

    # The same mapping that tifffile.memmap makes for an existing file.
    dtype = np.dtype(tif.byteorder + series.dtype.char)
    data = np.memmap(path, dtype=dtype, mode="r", offset=series.dataoffset, shape=series.shape)
    return data, series.axes


def _resolution_tag(page, name: str) -> tuple[int, int] | None:
    tag = page.tags.get(name)
    if tag is None:
        return None
    return tag.value


def _check_tiff_shape(path: Path, data: np.ndarray, axes: str, samples_per_pixel: int) -> None:
    if samples_per_pixel > 1:
        raise VolumeReadError(
            f"{path} is a colour image with {samples_per_pixel} samples per pixel (shape "
            f"{data.shape}, axes {axes}). napari-ebm needs a single-channel 3D volume (z, y, x), "
            f"so convert it to greyscale first."
        )
    if "C" in axes:
        raise VolumeReadError(
            f"{path} has a channel axis (shape {data.shape}, axes {axes}), but napari-ebm needs "
            f"a single-channel 3D volume (z, y, x). If the channels are really z sections, set "
            f"them as slices in ImageJ (Image > Properties) and save the file again."
        )
    if data.ndim != 3:
        raise VolumeReadError(
            f"{path} has {data.ndim} dimensions (shape {data.shape}, axes {axes}), but "
            f"napari-ebm needs a single-channel 3D volume (z, y, x). Save one channel and time "
            f"point as its own file."
        )


def _tiff_voxel_size(
    path: Path,
    imagej_metadata: dict | None,
    x_resolution: tuple[int, int] | None,
    y_resolution: tuple[int, int] | None,
    fallback: float,
) -> tuple[float, float, float]:
    """Compute the voxel size in Angstrom from ImageJ metadata and the resolution tags.

    XResolution and YResolution are pixels per unit, stored as (numerator, denominator).
    """
    scale = _tiff_unit_scale(path, imagej_metadata, fallback)
    if scale is None:
        return (fallback, fallback, fallback)

    sizes = {
        "z": _metadata_float(imagej_metadata.get("spacing")) * scale,
        "y": _pixel_size(y_resolution) * scale,
        "x": _pixel_size(x_resolution) * scale,
    }
    advice = "set the voxel size in ImageJ (Image > Properties) and save the file again."
    sizes = _replace_invalid_voxel_sizes(path, sizes, fallback, advice)
    return (sizes["z"], sizes["y"], sizes["x"])


def _tiff_unit_scale(path: Path, imagej_metadata: dict | None, fallback: float) -> float | None:
    """Return Angstrom per ImageJ length unit, or None (with a warning) when it is unknown."""
    if imagej_metadata is None:
        reason = "has no ImageJ metadata"
    elif "unit" not in imagej_metadata:
        reason = "has ImageJ metadata without a length unit"
    else:
        unit = str(imagej_metadata["unit"]).strip()
        scale = _TIFF_UNIT_TO_ANGSTROM.get(unit.lower())
        if scale is not None:
            return scale
        reason = f"gives its voxel size in the unit '{unit}', which is not a length unit"

    warnings.warn(
        f"{path} {reason}, so its voxel size is unknown and the fallback voxel size of "
        f"{fallback} Angstrom is used on all axes. If that is wrong, set the voxel size in nm "
        f"or micron in ImageJ (Image > Properties) and save the file again.",
        UserWarning,
    )
    return None


def _metadata_float(value) -> float:
    """Convert an ImageJ metadata value to float, or NaN when it is missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _pixel_size(resolution: tuple[int, int] | None) -> float:
    """Convert a (numerator, denominator) pixels-per-unit tag to units per pixel."""
    if resolution is None or resolution[0] == 0:
        return math.nan
    return resolution[1] / resolution[0]


# ---------------------------------------------------------------------------------------------
# MRC writing


def _check_triple(name: str, values, *, positive: bool) -> tuple[float, float, float]:
    try:
        triple = _as_float_triple(name, values)
    except ValueError as err:
        raise ParameterError(str(err)) from err

    for axis, value in zip(_AXIS_NAMES, triple):
        if not math.isfinite(value):
            raise ParameterError(
                f"{name} must be finite on every axis, but the {axis} value is {value} "
                f"(all values: {triple} Angstrom, order z, y, x)."
            )
        if positive and value <= 0:
            raise ParameterError(
                f"{name} must be > 0 on every axis, but the {axis} value is {value} "
                f"(all values: {triple} Angstrom, order z, y, x)."
            )
    return triple


def _prepare_mrc_data(target: Path, data) -> np.ndarray:
    """Convert `data` to a native-byte-order dtype that MRC stores, and check its values."""
    array = np.asarray(data)
    if array.ndim != 3:
        raise VolumeWriteError(
            f"Cannot write {target}: the data has shape {array.shape}, but write_mrc writes "
            f"3D volumes (z, y, x)."
        )

    dtype = _mrc_dtype_for(array.dtype)
    if dtype is None:
        raise VolumeWriteError(
            f"Cannot write {target}: MRC files cannot store data of dtype {array.dtype}. "
            f"Convert the data to float32, int8, int16, uint8 or uint16 first."
        )
    array = array.astype(dtype, copy=False)

    non_finite = _count_non_finite(array)
    if non_finite:
        raise VolumeWriteError(
            f"Cannot write {target}: the data contains {non_finite} non-finite values (NaN or "
            f"infinity) out of {array.size}. Replace them before writing."
        )
    return array


def _mrc_dtype_for(dtype: np.dtype) -> np.dtype | None:
    if dtype.kind == "f":
        return np.dtype(np.float32)
    return _MRC_INTEGER_WRITE_DTYPES.get(dtype.newbyteorder("="))


def _check_write_target(
    target: Path, overwrite: bool, protected_paths: Iterable[str | os.PathLike]
) -> None:
    if target.suffix.lower() not in MRC_SUFFIXES:
        raise VolumeWriteError(
            f"Cannot write {target}: write_mrc writes MRC files, so the name must end in one of "
            f"{', '.join(MRC_SUFFIXES)}. Use for example {target.with_suffix('.mrc').name}."
        )
    if target.is_dir():
        raise VolumeWriteError(
            f"Cannot write {target}: it is a folder. Give a file name for the output, for "
            f"example {target / 'volume.mrc'}."
        )
    if not target.parent.is_dir():
        raise VolumeWriteError(
            f"Cannot write {target}: the folder {target.parent} does not exist. Create it "
            f"first or choose another output folder."
        )

    for protected in protected_paths:
        if _is_same_file(target, Path(protected).expanduser()):
            raise VolumeWriteError(
                f"Cannot write {target}: it is the input file {protected}, and writing over "
                f"the input is not allowed. Choose another output name."
            )

    if target.exists() and not overwrite:
        raise VolumeWriteError(
            f"Cannot write {target}: the file already exists. Choose another output name, or "
            f"pass overwrite=True (command line: --overwrite) to replace it."
        )


def _is_same_file(first: Path, second: Path) -> bool:
    """Return True if both paths exist and name the same file (through links as well)."""
    try:
        return os.path.samefile(first, second)
    except OSError:
        # samefile raises when either path does not exist, and writing to a path that does
        # not exist yet cannot replace an existing file.
        return False


def _write_mrc_atomically(
    target: Path,
    array: np.ndarray,
    voxel_zyx: tuple[float, float, float],
    origin_zyx: tuple[float, float, float],
) -> None:
    temporary = None
    try:
        temporary = _create_temporary_file(target)
        _write_mrc_file(temporary, array, voxel_zyx, origin_zyx)
        _fsync_path(temporary)
        os.replace(temporary, target)
    except (OSError, ValueError) as err:
        _remove_temporary_file(temporary)
        raise VolumeWriteError(
            f"Could not write {target}: {err}. Check that the folder is writable and that the "
            f"disk has free space. Any existing file at {target} was left unchanged."
        ) from err
    except BaseException:
        # Also covers KeyboardInterrupt, which is re-raised unchanged after the cleanup.
        _remove_temporary_file(temporary)
        raise

    _fsync_folder(target.parent)


def _create_temporary_file(target: Path) -> Path:
    """Create an empty, new temporary file beside `target`.

    os.open with mode 0o666 applies the user's umask, as for any new file, so the renamed output
    gets ordinary permissions. tempfile.NamedTemporaryFile would create it with mode 0o600.
    """
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(descriptor)
    return temporary


def _write_mrc_file(
    path: Path,
    array: np.ndarray,
    voxel_zyx: tuple[float, float, float],
    origin_zyx: tuple[float, float, float],
) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(array)
        mrc.set_volume()

        # mrcfile stores the voxel size and the origin in (x, y, z) order.
        mrc.voxel_size = tuple(reversed(voxel_zyx))
        mrc.header.origin = tuple(reversed(origin_zyx))
        mrc.update_header_stats()

        if array.dtype == np.int8:
            _stamp_signed_bytes(mrc.header)


def _stamp_signed_bytes(header) -> None:
    """Write the IMOD stamp and the imodFlags bit for signed bytes into an mrcfile header.

    The two int32 values lie inside mrcfile's unnamed ``extra2`` field (bytes 112 to 195).
    """
    values = np.array([_IMOD_STAMP, _IMOD_FLAG_SIGNED_BYTES], dtype=header.dtype["nx"])
    extra2 = bytearray(header.extra2.tobytes())
    start = _IMOD_STAMP_OFFSET - header.dtype.fields["extra2"][1]
    extra2[start : start + values.nbytes] = values.tobytes()
    header.extra2 = np.void(bytes(extra2))


def _fsync_path(path: Path) -> None:
    with open(path, "r+b") as stream:
        os.fsync(stream.fileno())


def _fsync_folder(folder: Path) -> None:
    """Flush the folder entry of a renamed file to disk, where the system supports it."""
    if os.name != "posix":
        return

    try:
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError as err:
        # The file is complete and renamed, so this failure only weakens crash safety.
        logger.warning("Could not flush the folder %s to disk after a write: %s", folder, err)


def _remove_temporary_file(temporary: Path | None) -> None:
    if temporary is None:
        return

    try:
        temporary.unlink(missing_ok=True)
    except OSError as err:
        logger.warning("Could not remove the temporary file %s: %s", temporary, err)
