"""Exceptions raised by napari-ebm.

Every exception that a user can cause derives from :class:`EBMError`, so the command line and the
napari layer can show its message alone, without a traceback.
"""


class EBMError(Exception):
    """Base class for errors whose message is meant for the user."""


class VolumeReadError(EBMError, ValueError):
    """A file could not be read as a volume. The message names the file and the problem."""


class VolumeWriteError(EBMError, OSError):
    """An output file could not be written. The message names the file and the problem."""


class ParameterError(EBMError, ValueError):
    """A run parameter is invalid. The message names the parameter, its value and the valid range."""


class RunError(EBMError):
    """A run failed at a given step.

    Attributes
    ----------
    step : int
        The step (counted from 1) at which the run failed.
    last_snapshot : Snapshot or None
        The last snapshot whose energy was finite, if there was one.
    """

    def __init__(self, message, step, last_snapshot=None):
        super().__init__(message)
        self.step = step
        self.last_snapshot = last_snapshot


class NonFiniteEnergyError(RunError):
    """The energy became NaN or infinite during a run.

    Attributes
    ----------
    step_size : float or None
        The step size in use, in normalised units.
    """

    def __init__(self, message, step, last_snapshot=None, step_size=None):
        super().__init__(message, step, last_snapshot)
        self.step_size = step_size


class MissingVoxelSizeWarning(UserWarning):
    """A file has no valid voxel size on some axis, so a fallback voxel size was used."""
