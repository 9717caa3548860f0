"""Provenance records written next to each output file, and atomic text writes.

Every output ``<name>`` gets a JSON sidecar ``<name>.json``. It records the command, the input,
the resolved parameters (including the seed), the result and the timings, so that the output can
be traced back to its input and the run can be repeated.
"""

import contextlib
import json
import logging
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from .errors import VolumeWriteError

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"

OUTPUT_KINDS = ("map", "posterior_mean", "posterior_std", "sample", "energy_trace")


def sidecar_path(output_path):
    """Return the sidecar path of ``output_path``: the same path with ``.json`` appended."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.name + SIDECAR_SUFFIX)


def utc_timestamp():
    """Return the current time as an ISO-8601 string in UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_record(*, command, volume, output_path, kind, parameters, result, timings):
    """Build the provenance record of one output file as a JSON-friendly dict.

    Parameters
    ----------
    command : list of str
        The command line that produced the output, one argument per item.
    volume : napari_ebm.io.Volume
        The input volume; its path, shape, voxel size and origin are recorded.
    output_path : str or os.PathLike
        The output file that the record describes.
    kind : str
        One of ``OUTPUT_KINDS``.
    parameters : dict
        ``Reconstruction.parameters()``: every resolved parameter, including the seed.
    result : dict
        Steps run, convergence, final energy terms and number of samples.
    timings : dict
        "started" (ISO-8601 UTC), "prepare_seconds", "run_seconds" and "steps_per_second".

    Raises
    ------
    ValueError
        If ``kind`` is not one of ``OUTPUT_KINDS``.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {', '.join(OUTPUT_KINDS)}")

    input_path = None if volume.path is None else str(Path(volume.path).resolve())
    return {
        "napari_ebm_version": __version__,
        "command": list(command),
        "input": {
            "path": input_path,
            "shape": list(volume.data.shape),
            "dtype": str(volume.data.dtype),
            "voxel_size": list(volume.voxel_size),
            "origin": list(volume.origin),
        },
        "output": {"path": str(Path(output_path).resolve()), "kind": kind},
        "parameters": parameters,
        "result": result,
        "timings": timings,
    }


def write_sidecar(output_path, record):
    """Write ``record`` as JSON to the sidecar of ``output_path`` and return the sidecar path.

    The file is replaced atomically (see :func:`write_text_atomically`), so an existing sidecar
    is overwritten. Callers check beforehand whether that is allowed.

    Raises
    ------
    VolumeWriteError
        If the sidecar cannot be written. The message names the file.
    ValueError
        If ``record`` contains NaN or infinity, which strict JSON cannot store.
    """
    path = sidecar_path(output_path)
    # allow_nan=False keeps the file strict JSON; a successful run has only finite values.
    text = json.dumps(record, indent=2, allow_nan=False, default=_to_json) + "\n"
    write_text_atomically(path, text)
    logger.debug("wrote sidecar %s", path)
    return path


def write_text_atomically(path, text):
    """Write ``text`` (UTF-8) to ``path`` like :func:`write_bytes_atomically`.

    Raises
    ------
    VolumeWriteError
        If the file cannot be written. The message names the file and the operating system error.
    """
    return write_bytes_atomically(path, text.encode("utf-8"))


def write_bytes_atomically(path, data):
    """Write ``data`` to ``path`` through a temporary file and :func:`os.replace`.

    The temporary file ``.<name>.<random>.tmp`` is created in the target's folder and flushed to
    disk before the rename, so ``path`` is either unchanged or complete. The temporary file is
    removed if writing fails or is interrupted. It is opened with mode 0o666 and the user's
    umask, so the output gets ordinary permissions (tempfile would give 0o600).

    Raises
    ------
    VolumeWriteError
        If the file cannot be written. The message names the file and the operating system error.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    created = False
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
        with open(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise VolumeWriteError(
            f"could not write {path}: {error}. Check that the folder is writable and that the disk has free "
            "space; an existing file at that path was left unchanged."
        ) from error
    finally:
        if created:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
    return path


def _to_json(value):
    """Convert the numpy scalars, numpy arrays and paths that :mod:`json` cannot store."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
