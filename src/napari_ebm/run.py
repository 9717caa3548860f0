"""The reconstruction loop: one generator of snapshots shared by the GUI, the CLI and scripts.

A run normalises the observed tomogram (mean 0, standard deviation 1, unless turned off), builds
the posterior energy, repeats one MAP or Langevin step and yields a :class:`Snapshot` after every
step. Volumes in snapshots are copies in the input's intensity units, so a consumer may keep
them while the run goes on. Pausing or stopping a run means no longer asking the generator for
the next snapshot.
"""

import contextlib
import gc
import logging
import math
import os
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from . import __version__
from .energy import PosteriorEnergy, estimate_noise_sigma, estimate_signal_std
from .errors import NonFiniteEnergyError, ParameterError, RunError
from .operators import OPERATORS, create_operator
from .prior_files import recommended_temperature, recommended_weight, resolve_prior
from .samplers import GaussianNoise, MapState, RunningMoments, langevin_step, map_step

logger = logging.getLogger(__name__)

METHODS = ("map", "langevin")
DEVICES = ("auto", "cpu", "cuda", "mps")

# torch.OutOfMemoryError exists from torch 2.5; older versions have only the CUDA name.
OUT_OF_MEMORY_ERROR = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

# Fractions of 1 / L, for the Lipschitz bound L of grad E, used when the step size is left unset.
# Langevin takes half, which inflates the variance by at most 1 / (1 - 0.25) in the stiffest
# directions and much less in the smooth ones that dominate a tomogram.
AUTO_STEP_FRACTION = {"map": 1.0, "langevin": 0.5}

# A side shorter than this many voxels gets a warning before the run, because the missing wedge
# and the prior's edge handling then affect most of the volume along that side.
THIN_SIDE = 16

# The default number of torch CPU threads per run is the number of usable cores, at most this,
# so that a run started from napari leaves cores to the viewer. RunConfig.threads sets more.
DEFAULT_MAX_THREADS = 4

# Peak memory of a run in volume-sized float32 buffers, measured as the growth of the peak
# resident memory (VmHWM) over a run of 128^3 and 208^3 voxels with torch 2.13 on a Linux CPU.
# The method's count contains the normalised data, the iterate and its state, the gradient and
# the intermediates of the data energy. The operator and the hand-made priors add their own
# autograd intermediates, which do not peak at the same time, so the larger of the two counts.
# The wedge count includes the full complex spectrum that the CPU inverse transform builds, which
# raised the peak of a 128^3 MAP run with tv by one buffer.
METHOD_BUFFERS = {"map": 9, "langevin": 11}
OPERATOR_BUFFERS = {"denoise": 0, "wedge": 6}
PRIOR_BUFFERS = {"l2": 0, "smooth": 3, "tv": 3}

# Buffers that a learned architecture adds outside its convolutions. The total variation term of
# tv_conv_energy added 5 over conv_energy in runs of 48^3 and 64^3 voxels.
ARCHITECTURE_BUFFERS = {"tv_conv_energy": 5}

# Factor on the buffers of a learned prior. The same 48^3 Langevin run with phantom_dsm peaked
# at 116 MB on the development VM and at 136 MB on the CI machine, so 20 % is added.
# NOTE: the cause of that difference is not known, so another CPU may need more than 20 %.
LEARNED_MARGIN = 1.2

# Memory of a run that does not grow with the volume, such as the workspaces of torch's CPU
# convolutions. The same measurement found about 13 MiB with the 16-channel shipped prior.
RUN_OVERHEAD_BYTES = 16 * 1024**2


@dataclass
class RunConfig:
    """Parameters of a reconstruction run.

    Attributes
    ----------
    method : str
        "map" (Nesterov-accelerated gradient descent to the lowest energy) or "langevin"
        (unadjusted Langevin sampling of p(x) proportional to exp(-E(x) / T)).
    operator : str
        Registered forward operator: "denoise" (identity) or "wedge" (missing wedge).
    tilt_range : (float, float)
        Tilt range of the wedge operator in degrees.
    prior : str
        Registered prior name.
    prior_options : dict
        Keyword arguments of the prior (for example {"eps": 0.1} for "tv").
    weight : float or None
        Prior weight, >= 0. None uses the prior file's recommended weight, or 1 for a
        hand-made prior.
    noise_sigma : float or None
        Noise standard deviation in the input's intensity units; None estimates it.
    steps : int
        Number of steps, > 0. MAP may stop earlier at ``tolerance``.
    step_size : float or None
        Step size in normalised units, > 0; None uses a fraction of 1 / L (see AUTO_STEP_FRACTION).
    temperature : float or None
        T >= 0 (Langevin); 0 is plain gradient descent. None uses the prior file's recommended
        temperature, or 1 for a hand-made prior.
    burn_in : int
        Langevin steps discarded before the running mean and std start, >= 0 and < steps.
    map_start_steps : int
        Langevin: the first ``map_start_steps`` steps are MAP steps from the observation, so the
        chain starts near the posterior mode instead of at the observation, >= 0 and <= burn_in.
        They use the MAP step size. Ignored by MAP.
    thin : int
        Every ``thin``-th step after burn-in enters the running mean and std, >= 1.
    tolerance : float
        MAP stops when ||x_new - x|| / ||x|| falls below this, >= 0 (0 never stops early).
    seed : int or None
        Seed of the run's private random generator; None draws one, which the run records.
    device : str
        "auto", "cpu", "cuda" or "mps".
    normalize : bool
        Normalise intensities to mean 0 and std 1 before the run; outputs are always restored to
        the input's units.
    preview_every : int
        Every ``preview_every``-th step's snapshot carries volumes (the last step always does).
    threads : int or None
        Torch CPU threads of each step, >= 1; None uses :func:`default_threads`. Langevin also
        draws its noise on 2 background threads while the gradient is computed, unless this is 1.
        The count changes the order of floating-point sums, so a rerun gives bit-identical
        results only with the same count.
    """

    method: str = "map"
    operator: str = "wedge"
    tilt_range: tuple = (-60.0, 60.0)
    prior: str = "tv"
    prior_options: dict = field(default_factory=dict)
    weight: float | None = None
    noise_sigma: float | None = None
    steps: int = 100
    step_size: float | None = None
    temperature: float | None = None
    burn_in: int = 0
    map_start_steps: int = 0
    thin: int = 1
    tolerance: float = 1e-5
    seed: int | None = None
    device: str = "auto"
    normalize: bool = True
    preview_every: int = 1
    threads: int | None = None

    def to_dict(self):
        """Return the parameters as a JSON-friendly dict."""
        values = asdict(self)
        values["tilt_range"] = list(self.tilt_range)
        return values

    @classmethod
    def from_parameters(cls, parameters):
        """Build the configuration that repeats a run from its recorded parameters.

        The seed, the number of threads and the device are taken from the values the run used
        ("seed", "threads_used", "device_used"), so that the same input gives a bit-identical
        result on the same machine. Keys that are not fields of RunConfig, such as the resolved
        step size, are ignored, because the run computes them again from the same input.

        Parameters
        ----------
        parameters : dict
            :meth:`Reconstruction.parameters`, for example the "parameters" entry of a JSON
            sidecar.

        Returns
        -------
        RunConfig
            Not yet validated; :class:`Reconstruction` validates it.
        """
        names = {item.name for item in fields(cls)}
        values = {key: value for key, value in parameters.items() if key in names}
        if "tilt_range" in values:
            values["tilt_range"] = tuple(values["tilt_range"])
        if parameters.get("seed") is not None:
            values["seed"] = parameters["seed"]
        if parameters.get("threads_used") is not None:
            values["threads"] = parameters["threads_used"]
        if parameters.get("device_used"):
            # A run on device "cuda" or "auto" records "cuda:0", and the rerun drops the index.
            values["device"] = str(parameters["device_used"]).split(":")[0]
        return cls(**values)


def _require(condition, name, value, expectation):
    if not condition:
        raise ParameterError(f"invalid {name} {value!r}: {expectation}")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_config(config):
    """Check every parameter of ``config``; nothing is replaced by a default.

    Raises
    ------
    ParameterError
        Naming the first invalid parameter, its value and the valid range.
    """
    _require(config.method in METHODS, "method", config.method, f"choose one of {', '.join(METHODS)}")
    _require(config.operator in OPERATORS, "operator", config.operator, f"choose one of {', '.join(OPERATORS.names())}")
    _require(isinstance(config.prior, str) and config.prior.strip() != "", "prior", config.prior, "give a prior name or the path of a .safetensors file")
    _require(config.device in DEVICES, "device", config.device, f"choose one of {', '.join(DEVICES)}")
    if config.weight is not None:
        _require(_is_number(config.weight) and config.weight >= 0, "weight", config.weight, "must be a finite number >= 0, or unset for the prior's recommended weight")
    if config.noise_sigma is not None:
        _require(
            _is_number(config.noise_sigma) and config.noise_sigma > 0,
            "noise sigma", config.noise_sigma, "must be a finite number > 0, or unset to estimate it",
        )
    _require(isinstance(config.steps, int) and config.steps > 0, "number of steps", config.steps, "must be an integer > 0")
    if config.step_size is not None:
        _require(
            _is_number(config.step_size) and config.step_size > 0,
            "step size", config.step_size, "must be a finite number > 0, or unset for the automatic step size",
        )
    if config.temperature is not None:
        _require(
            _is_number(config.temperature) and config.temperature >= 0,
            "temperature", config.temperature, "must be a finite number >= 0, or unset for the prior's recommended temperature",
        )
    _require(isinstance(config.burn_in, int) and config.burn_in >= 0, "burn-in", config.burn_in, "must be an integer >= 0")
    _require(isinstance(config.thin, int) and config.thin >= 1, "thinning", config.thin, "must be an integer >= 1")
    _require(
        isinstance(config.map_start_steps, int) and not isinstance(config.map_start_steps, bool) and config.map_start_steps >= 0,
        "number of MAP start steps", config.map_start_steps, "must be an integer >= 0",
    )
    if config.method == "langevin":
        _require(
            config.burn_in < config.steps, "burn-in", config.burn_in,
            f"must be smaller than the number of steps ({config.steps}) so that samples are kept",
        )
        _require(
            config.map_start_steps <= config.burn_in, "number of MAP start steps", config.map_start_steps,
            f"must be at most the burn-in ({config.burn_in}), so that the MAP steps do not enter the mean",
        )
    _require(_is_number(config.tolerance) and config.tolerance >= 0, "tolerance", config.tolerance, "must be a finite number >= 0")
    _require(isinstance(config.preview_every, int) and config.preview_every >= 1, "preview interval", config.preview_every, "must be an integer >= 1")
    if config.threads is not None:
        _require(
            isinstance(config.threads, int) and not isinstance(config.threads, bool) and config.threads >= 1,
            "number of threads", config.threads, "must be an integer >= 1, or unset for the default",
        )
    low, high = config.tilt_range
    _require(
        _is_number(low) and _is_number(high) and -90 <= low < high <= 90,
        "tilt range", tuple(config.tilt_range), "give MIN < MAX in degrees, both between -90 and 90",
    )


def resolve_device(name):
    """Return the torch device for "auto", "cpu", "cuda" or "mps".

    Raises
    ------
    ParameterError
        If the requested device is not available in this torch build or on this machine.
    """
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if cuda:
            return torch.device("cuda")
        if mps:
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not cuda:
        raise ParameterError(
            f"device 'cuda' was requested, but torch {torch.__version__} finds no CUDA GPU on this "
            "machine; choose device 'cpu' or 'auto', or install a CUDA build of torch"
        )
    if name == "mps" and not mps:
        raise ParameterError("device 'mps' was requested, but this machine has no Apple GPU; choose 'cpu' or 'auto'")
    return torch.device(name)


def default_threads():
    """Return the default number of torch CPU threads of a run.

    It is the number of cores this process may use, at most :data:`DEFAULT_MAX_THREADS`.
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        # os.sched_getaffinity exists on Linux only.
        usable = os.cpu_count() or 1
    return max(1, min(usable, DEFAULT_MAX_THREADS))


@contextlib.contextmanager
def intra_op_threads(count):
    """Set torch's CPU thread count to ``count`` inside the block and restore it afterwards.

    torch.set_num_threads applies to the calling thread in OpenMP builds of torch and to the
    whole process in other builds, so a run sets it only while it computes a step.
    """
    previous = torch.get_num_threads()
    if previous != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if previous != count:
            torch.set_num_threads(previous)


def estimate_memory(shape, method, prior, operator="wedge"):
    """Estimate the peak memory of a run, in bytes.

    The estimate counts volume-sized float32 buffers: the counts in :data:`METHOD_BUFFERS`,
    :data:`OPERATOR_BUFFERS` and :data:`PRIOR_BUFFERS` (the normalised data, the iterate, the
    momentum or the noise, the gradient, the running mean and M2 of Langevin, and the autograd
    intermediates of the energy), plus one buffer of margin and :data:`RUN_OVERHEAD_BYTES`.
    A learned prior adds the activations that autograd keeps for each hidden layer of its
    network: the input padded by the layer's dilation, the convolution output and the
    activation output, each with ``channels`` channels, plus the unfolded 3x3x3 input of one
    convolution (27 buffers per input channel) and :data:`ARCHITECTURE_BUFFERS`. The CPU
    convolution unfolds only the first layer when there are 8 channels or more. These buffers
    are multiplied by :data:`LEARNED_MARGIN`. The counts were measured on a Linux CPU with
    torch 2.13 (see :data:`METHOD_BUFFERS`), and tests/core/test_reliability.py checks them
    against the peak resident memory of two runs.

    Parameters
    ----------
    shape : tuple of int
        Volume shape (z, y, x), or (y, x) for a single section.
    method : str
        "map" or "langevin".
    prior : napari_ebm.priors.Prior
        The prior; a learned one is sized from the "hyperparameters" of its metadata.
    operator : str
        "denoise" or "wedge".

    Returns
    -------
    int
        Bytes.

    Raises
    ------
    ValueError
        If ``method`` is not one of :data:`METHODS`.

    Notes
    -----
    NOTE: the counts were not measured on CUDA or MPS, where the convolution workspaces of
    cuDNN or Metal may need more, and the allocator's caching may keep some freed memory.
    """
    if method not in METHOD_BUFFERS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    shape = tuple(int(n) for n in shape)
    voxels = math.prod(shape)
    operator_buffers = OPERATOR_BUFFERS.get(operator, max(OPERATOR_BUFFERS.values()))

    metadata = getattr(prior, "metadata", None)
    if metadata:
        hyperparameters = metadata.get("hyperparameters", {})
        channels = int(hyperparameters.get("channels", 16))
        depth = int(hyperparameters.get("depth", 4))
        dilations = hyperparameters.get("dilations") or [1] * depth
        padded = sum(math.prod(n + 2 * int(dilation) for n in shape) / voxels for dilation in dilations)
        activations = channels * (2.0 * len(dilations) + padded)
        unfolded = 27 * (1 + (channels if channels < 8 else 0))
        extra = ARCHITECTURE_BUFFERS.get(metadata.get("architecture"), 0)
        buffers = LEARNED_MARGIN * (METHOD_BUFFERS[method] + operator_buffers + activations + unfolded + extra)
    else:
        prior_buffers = PRIOR_BUFFERS.get(getattr(prior, "name", None), max(PRIOR_BUFFERS.values()))
        buffers = METHOD_BUFFERS[method] + max(operator_buffers, prior_buffers) + 1
    return int(math.ceil(buffers * voxels * 4)) + RUN_OVERHEAD_BYTES


def available_memory(device):
    """Return the memory free for a run on ``device`` in bytes, or None when it is unknown.

    On the CPU it is MemAvailable of /proc/meminfo (memory that can be given to programs
    without swapping), or the free pages from :func:`os.sysconf` where /proc is missing. A lower
    limit of a cgroup v2 (a container) counts as well. On CUDA it is the free memory of the GPU
    plus the memory that torch's caching allocator has reserved but not allocated.

    Parameters
    ----------
    device : torch.device

    Returns
    -------
    int or None
        Bytes; None on MPS and where the operating system does not report it.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type != "cpu":
        return None

    free = _meminfo_available()
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            free = None
    limit = _cgroup_available()
    if free is None:
        return limit
    return free if limit is None else min(free, limit)


def _meminfo_available():
    try:
        with open("/proc/meminfo", encoding="ascii") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available():
    """Return the memory left under this process's cgroup v2 limit, or None without a limit."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as stream:
            limit = stream.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as stream:
            current = int(stream.read().strip())
        return max(int(limit) - current, 0)
    except (OSError, ValueError):
        return None


def format_bytes(count):
    """Format a number of bytes for a message, for example "3.2 GiB" or "512 bytes"."""
    if count < 1024:
        return f"{int(count)} bytes"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024.0
        if value < 1024.0 or unit == "TiB":
            return f"{value:.3g} {unit}"


def _is_out_of_memory(error):
    """Return True when ``error`` reports that an allocation failed."""
    if isinstance(error, (MemoryError, OUT_OF_MEMORY_ERROR)):
        return True
    # The CPU allocator of torch 2.x raises a plain RuntimeError ("DefaultCPUAllocator: can't
    # allocate memory"), and the MPS backend one that contains "out of memory".
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _call_unless_out_of_memory(function, *args):
    """Call ``function`` and return (its result, None), or (None, message) if an allocation failed.

    The allocation failure is returned as a message and not raised, so that the tensors which
    its traceback refers to are freed before the caller releases memory.
    """
    try:
        return function(*args), None
    except Exception as error:  # noqa: BLE001 - every other error is re-raised
        if not _is_out_of_memory(error):
            raise
        return None, f"{type(error).__name__}: {_first_line(error)}"


def _release_memory(device):
    """Collect garbage and return the memory that torch caches on a GPU to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Snapshot:
    """The state of a run after one step. Arrays are copies in the input's intensity units.

    Attributes
    ----------
    run_id : str
        Identifier of the run, so a consumer can ignore snapshots of an older run.
    method : str
    step : int
        Steps completed, from 1.
    steps : int
        Steps requested.
    energy, data_energy, prior_energy : float
        E, E_data and E_prior (unweighted) at the point where this step took its gradient.
    step_size, temperature, noise_sigma : float
        Values in use; ``noise_sigma`` in the input's intensity units.
    elapsed : float
        Seconds since the first step started.
    volume : numpy.ndarray or None
        Current iterate (MAP) or current sample (Langevin), on preview steps only.
    mean, std : numpy.ndarray or None
        Running posterior mean and standard deviation (Langevin, after burn-in, preview steps).
    samples : int
        Samples in the running mean.
    done : bool
        True for the last snapshot of a completed run.
    converged : bool
        True when MAP stopped at its tolerance before the last step.
    """

    run_id: str
    method: str
    step: int
    steps: int
    energy: float
    data_energy: float
    prior_energy: float
    step_size: float
    temperature: float
    noise_sigma: float
    elapsed: float
    volume: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    samples: int = 0
    done: bool = False
    converged: bool = False

    @property
    def steps_per_second(self):
        return self.step / self.elapsed if self.elapsed > 0 else 0.0


class Reconstruction:
    """A prepared run: the normalised data, the energy and the resolved parameters.

    Creating it validates everything, so errors come before any work starts; iterating over
    :meth:`snapshots` does the work.

    Parameters
    ----------
    observed : array_like
        Observed tomogram of shape (z, y, x), or a single section of shape (y, x), with finite
        values. A section is run as a volume of shape (1, y, x), and every volume in the
        snapshots and from :meth:`restore` has the input's shape.
    config : RunConfig
    run_id : str, optional
        Identifier copied into every snapshot; a new one is made when omitted.

    Raises
    ------
    ParameterError
        If a parameter is invalid, the device is unavailable, the volume is empty, constant or
        contains NaN or infinity, or the run needs more memory than is free on the device
        (see :func:`estimate_memory` and :func:`available_memory`).

    Warns
    -----
    UserWarning
        When a side of the volume is shorter than :data:`THIN_SIDE` voxels. The message names
        the shape and the thin axes and explains the effect on the result. It is issued at the
        end of a successful preparation, before any step runs.
    """

    def __init__(self, observed, config, run_id=None):
        validate_config(config)
        self.config = config
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.device = resolve_device(config.device)
        self.seed = config.seed if config.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
        self.threads = config.threads if config.threads is not None else default_threads()

        data, self.input_shape = _volume_from_input(observed)
        self.shape = data.shape

        self.offset, self.scale = 0.0, 1.0
        if config.normalize:
            self.offset = float(data.mean(dtype=np.float64))
            self.scale = float(data.std(dtype=np.float64))
            if not self.scale > 0:
                raise ParameterError("the volume is constant (standard deviation 0), so there is nothing to reconstruct")

        prior = resolve_prior(config.prior, **config.prior_options)
        prior_file = (getattr(prior, "metadata", None) or {}).get("file")
        self.prior_file = None if prior_file is None else os.path.abspath(prior_file)
        self.memory_needed = estimate_memory(self.shape, config.method, prior, config.operator)
        self._check_memory()

        _, failure = _call_unless_out_of_memory(self._prepare_energy, data, prior)
        if failure is not None:
            _release_memory(self.device)
            raise ParameterError(
                f"there is not enough memory on {self.device} to prepare the run ({failure}). The run needs "
                f"about {format_bytes(self.memory_needed)}. Crop or bin the tomogram, or choose another device"
            )

        self._preview_requested = False
        self._latest = None

        self.step_size = self._resolve_step_size(config.method)
        self.map_step_size = self._resolve_step_size("map")
        self.map_start_steps = config.map_start_steps if config.method == "langevin" else 0
        logger.debug(
            "run %s prepared: %s on %s with %d threads, shape %s, sigma %.4g (%s), step size %.4g, seed %d, "
            "about %s of memory",
            self.run_id, config.method, self.device, self.threads, self.shape, self.noise_sigma,
            "estimated" if self.noise_sigma_estimated else "given", self.step_size, self.seed,
            format_bytes(self.memory_needed),
        )

        thin_message = _thin_volume_message(self.input_shape, config.operator)
        if thin_message is not None:
            warnings.warn(thin_message, UserWarning, stacklevel=2)

    def _resolve_step_size(self, method):
        """Return the given step size, or the automatic one of ``method``: a fraction of 1 / L."""
        if self.config.step_size is not None:
            return self.config.step_size
        return AUTO_STEP_FRACTION[method] / self.energy.lipschitz

    def _check_memory(self):
        """Raise ParameterError when the estimated memory of the run exceeds the free memory."""
        free = available_memory(self.device)
        if free is None:
            logger.debug("run %s: the free memory on %s is unknown, so it is not checked", self.run_id, self.device)
            return
        if self.memory_needed > free:
            shape = " x ".join(str(n) for n in self.input_shape)
            raise ParameterError(
                f"the run needs about {format_bytes(self.memory_needed)} on {self.device} "
                f"({self.config.method} with prior {self.config.prior!r} on {shape} voxels), but only "
                f"{format_bytes(free)} is free. Crop or bin the tomogram, close other programs, or "
                "choose a device with more memory"
            )

    def _prepare_energy(self, data, prior):
        """Normalise the data on the device, estimate the noise and build the posterior energy."""
        config = self.config
        observed_normalised = torch.from_numpy((data - self.offset) / self.scale).to(self.device)

        self.noise_sigma_estimated = config.noise_sigma is None
        if self.noise_sigma_estimated:
            try:
                sigma = estimate_noise_sigma(observed_normalised)
            except ValueError:
                sigma = 0.0
            if not sigma > 0:
                raise ParameterError("the noise sigma estimated from the volume is 0; set the noise sigma explicitly")
        else:
            sigma = config.noise_sigma / self.scale

        operator = create_operator(config.operator, self.shape, config.tilt_range, device=self.device)
        prior = prior.to(self.device)

        # A learned prior was trained on clean volumes of standard deviation 1, so its input is
        # scaled by the estimated clean signal, not by the noisy tomogram.
        self.normalization = "std" if config.normalize else "none"
        if config.normalize and getattr(prior, "metadata", None):
            signal = estimate_signal_std(observed_normalised, sigma, getattr(operator, "measured_fraction", 1.0))
            observed_normalised = observed_normalised / signal
            sigma = sigma / signal
            self.scale *= signal
            self.normalization = "signal"
        self.noise_sigma = sigma * self.scale
        # Unset values come from the prior file, or are 1 for a hand-made prior.
        self.weight = _first_set(config.weight, recommended_weight(prior), 1.0)
        self.temperature = _first_set(config.temperature, recommended_temperature(prior), 1.0)
        self.energy = PosteriorEnergy(operator, prior, observed_normalised, sigma, self.weight)
        self.initial = observed_normalised

    def request_preview(self):
        """Make the next snapshot carry volumes; safe to call from another thread."""
        self._preview_requested = True

    def latest_snapshot(self):
        """Return a snapshot with volumes of the last completed step, or None before the first.

        Call it only while the generator from :meth:`snapshots` is suspended or closed, for
        example after a consumer stopped iterating, because it reads the run's current state.
        After a NonFiniteEnergyError it returns the last step whose volume and energy were
        finite. After the run ran out of memory it returns None, because the run released its
        state. The RunError's ``last_snapshot`` then contains the last step's volumes.
        """
        if self._latest is None:
            return None
        step, terms, x, moments, started = self._latest
        return self._snapshot(step, terms, x, moments, started, with_volumes=True)

    def restore(self, x):
        """Return a normalised tensor as a numpy copy in the input's intensity units and shape."""
        return self._to_input(x * self.scale + self.offset)

    def _to_input(self, x):
        return x.detach().to("cpu", torch.float32).numpy().reshape(self.input_shape).copy()

    def parameters(self):
        """Return every parameter needed to rerun, with resolved values, as a JSON-friendly dict.

        :meth:`RunConfig.from_parameters` builds the configuration of the rerun from it.
        """
        values = self.config.to_dict()
        values.update(
            seed=self.seed,
            threads_used=self.threads,
            step_size_used=self.step_size,
            weight_used=self.weight,
            temperature_used=self.temperature,
            noise_sigma_used=self.noise_sigma,
            noise_sigma_estimated=self.noise_sigma_estimated,
            device_used=str(self.device),
            normalization={"offset": self.offset, "scale": self.scale, "kind": self.normalization},
            memory_estimate_bytes=self.memory_needed,
            prior_file=self.prior_file,
            napari_ebm_version=__version__,
            torch_version=torch.__version__,
        )
        return values

    def snapshots(self):
        """Run and yield one :class:`Snapshot` per step.

        Each step runs with torch's CPU thread count set to the run's ``threads``, and the
        previous count is restored before each snapshot is yielded.

        Yields
        ------
        Snapshot

        Raises
        ------
        NonFiniteEnergyError
            At the first step whose energy, or whose new volume, is not finite (NaN or
            infinite). The message names the step and the step size. The snapshot of the
            previous step, with its volumes, is yielded first and is also the error's
            ``last_snapshot``; it is None when the first step fails.
        RunError
            If a step runs out of memory ("out of memory at step N"), after the run has
            released its memory, or if a step fails for another reason. The message names the
            step.
        """
        config = self.config
        noise = GaussianNoise(self.seed, self.device, parallel=self.threads > 1)
        moments = RunningMoments()
        x = self.initial.clone()
        map_state = MapState(x, x)
        self._latest = None
        last = None
        started = time.perf_counter()
        logger.debug("run %s started", self.run_id)

        for step in range(1, config.steps + 1):
            result, out_of_memory = self._guarded(step, last, self._step, map_state, x, noise, step)
            if out_of_memory is not None:
                map_state = x = x_new = moments = None
                raise self._out_of_memory_error(step, out_of_memory)
            map_state, x_new, terms, change, volume_finite = result
            if step == self.map_start_steps:
                logger.debug("run %s: MAP start finished at step %d, Langevin follows", self.run_id, step)
            result = None

            if not (terms.is_finite() and volume_finite):
                error = self._non_finite_error(step, "energy" if not terms.is_finite() else "volume")
                if error.last_snapshot is not None:
                    yield error.last_snapshot
                raise error
            x = x_new

            if config.method == "langevin" and step > config.burn_in and (step - config.burn_in) % config.thin == 0:
                moments.update(x)

            self._latest = (step, terms, x, moments, started)
            converged = config.method == "map" and change < config.tolerance
            final = step == config.steps or converged
            with_volumes = final or step % config.preview_every == 0 or self._preview_requested
            if with_volumes:
                self._preview_requested = False
            last, out_of_memory = self._guarded(
                step, last, self._snapshot, step, terms, x, moments, started, with_volumes, final, converged
            )
            if out_of_memory is not None:
                map_state = x = x_new = moments = None
                raise self._out_of_memory_error(step, out_of_memory)
            yield last
            if converged:
                logger.debug("run %s converged at step %d", self.run_id, step)
                break

        logger.debug("run %s finished after %d steps", self.run_id, last.step)

    def _is_map_step(self, step):
        """Return True when 1-based ``step`` is a MAP step: every step of MAP, the start of Langevin."""
        return self.config.method == "map" or step <= self.map_start_steps

    def _step(self, map_state, x, noise, step):
        """Compute one step and return (map_state, x_new, terms, relative change, x_new finite)."""
        with intra_op_threads(self.threads):
            if self._is_map_step(step):
                map_state, terms, change, _ = map_step(map_state, self.energy, self.map_step_size)
                x_new = map_state.x
            else:
                x_new, terms = langevin_step(x, self.energy, self.step_size, self.temperature, noise)
                change = math.inf
            volume_finite = bool(torch.isfinite(x_new).all())
        return map_state, x_new, terms, change, volume_finite

    def _guarded(self, step, last, function, *args):
        """Call ``function`` as :func:`_call_unless_out_of_memory` does, for step ``step``.

        Raises
        ------
        RunError
            If ``function`` fails for a reason other than memory. The message names the step.
        """
        try:
            return _call_unless_out_of_memory(function, *args)
        except Exception as error:  # noqa: BLE001 - any failure inside a step is reported with its step
            logger.debug("run %s failed at step %d", self.run_id, step, exc_info=True)
            raise RunError(f"the run failed at step {step}: {type(error).__name__}: {error}", step, last) from error

    def _non_finite_error(self, step, quantity):
        """Build the NonFiniteEnergyError of ``step``, with the previous step's snapshot."""
        last = self.latest_snapshot()
        if quantity == "energy":
            cause = f"the energy became non-finite (NaN or infinite) at step {step} with step size {self.step_size:.4g}"
        else:
            cause = (
                f"the volume became non-finite (NaN or infinite) at step {step} with step size {self.step_size:.4g}, "
                "although its energy was finite, so the gradient was not finite or the step overflowed"
            )
        stopped = f"The run stopped after step {last.step}" if last is not None else "The run stopped at its first step"
        message = f"{cause}. {stopped}. Lower the step size, or the temperature for Langevin."
        logger.debug("run %s: %s", self.run_id, message)
        return NonFiniteEnergyError(message, step, last, step_size=self.step_size)

    def _out_of_memory_error(self, step, detail):
        """Release the run's memory and return the RunError that reports the allocation failure.

        The caller drops its own references to the run's tensors first. The error keeps a host
        copy of the last step's volumes when there is memory for it.
        """
        _release_memory(self.device)
        last = None
        if self._latest is not None:
            try:
                last = self.latest_snapshot()
            except Exception as error:  # noqa: BLE001 - only an allocation failure is expected here
                if not _is_out_of_memory(error):
                    raise
        self._latest = None
        _release_memory(self.device)

        message = (
            f"out of memory at step {step} on {self.device} ({detail}). The run stopped and released its memory. "
            f"It was estimated to need about {format_bytes(self.memory_needed)}. Crop or bin the tomogram, "
            "close other programs, or choose a device with more memory"
        )
        logger.debug("run %s: %s", self.run_id, message)
        return RunError(message, step, last)

    def _snapshot(self, step, terms, x, moments, started, with_volumes, done=False, converged=False):
        snapshot = Snapshot(
            run_id=self.run_id,
            method=self.config.method,
            step=step,
            steps=self.config.steps,
            energy=terms.total,
            data_energy=terms.data,
            prior_energy=terms.prior,
            step_size=self.map_step_size if self._is_map_step(step) else self.step_size,
            temperature=0.0 if self._is_map_step(step) else self.temperature,
            noise_sigma=self.noise_sigma,
            elapsed=time.perf_counter() - started,
            samples=moments.count,
            done=done,
            converged=converged,
        )
        if with_volumes:
            snapshot.volume = self.restore(x)
            if moments.count > 0:
                snapshot.mean = self.restore(moments.mean)
                snapshot.std = self._to_input(moments.std * self.scale)
        return snapshot


def _volume_from_input(observed):
    """Return the input as a float32 (z, y, x) array and the input's own shape.

    Raises
    ------
    ParameterError
        If the input is not 2D or 3D, is empty, or contains NaN or infinity.
    """
    data = np.asarray(observed, dtype=np.float32)
    if data.ndim not in (2, 3):
        raise ParameterError(
            f"the volume must be 3D (z, y, x) or a 2D section (y, x), got shape {data.shape}"
        )
    if data.size == 0:
        raise ParameterError(f"the volume of shape {data.shape} is empty; every side needs at least 1 voxel")
    non_finite = int(data.size - np.count_nonzero(np.isfinite(data)))
    if non_finite:
        raise ParameterError(f"the volume contains {non_finite} NaN or infinite voxels; replace them before a run")
    input_shape = data.shape
    if data.ndim == 2:
        data = data[np.newaxis]
    return data, input_shape


def _thin_volume_message(shape, operator):
    """Return the warning for a volume with a side shorter than THIN_SIDE, or None.

    ``shape`` is the input's shape: (z, y, x), or (y, x) for a single section, which is not
    thin along z.
    """
    names = ("z", "y", "x")[-len(shape):]
    thin = [(name, n) for name, n in zip(names, shape) if n < THIN_SIDE]
    if not thin:
        return None

    sides = [f"{name} ({n} voxel{'' if n == 1 else 's'})" for name, n in thin]
    sides = sides[0] if len(sides) == 1 else ", ".join(sides[:-1]) + " and " + sides[-1]
    parts = [f"the volume of shape {tuple(shape)} is thin along {sides}, fewer than {THIN_SIDE} voxels."]
    thin_names = {name for name, _ in thin}

    if operator == "wedge" and len(shape) == 3 and shape[0] == 1:
        parts.append(
            "A single section has no missing wedge to fill, so the wedge operator keeps every frequency "
            "and the run only denoises it."
        )
    elif operator == "wedge" and thin_names & {"z", "x"}:
        sides = dict(thin)
        samples = f"{sides['z']} sections" if "z" in sides else f"{sides['x']} voxels along x"
        parts.append(
            f"The missing wedge lies in the z-x plane of Fourier space, and with {samples} it can be filled in "
            "only coarsely."
        )
    parts.append(
        "Across a thin side the prior sees few neighbours and repeats the edge voxels (replicate padding), "
        "which affects much of the volume. Check the result, or reconstruct a thicker volume."
    )
    return " ".join(parts)


def describe_prior_settings(reconstruction):
    """Return "weight W (source), " and, for Langevin, "temperature T (source), " of a prepared run.

    The source is "given" when the configuration set the value, else "the prior's default".
    """
    config = reconstruction.config
    settings = [("weight", reconstruction.weight, config.weight)]
    if config.method == "langevin":
        settings.append(("temperature", reconstruction.temperature, config.temperature))
    parts = []
    for name, value, configured in settings:
        source = "given" if configured is not None else "the prior's default"
        parts.append(f"{name} {value:.4g} ({source}), ")
    return "".join(parts)


def _first_set(*values):
    """Return the first of ``values`` that is not None."""
    return next(value for value in values if value is not None)


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def reconstruct(observed, config, run_id=None):
    """Run to the end and return the last snapshot and the energy trace.

    Returns
    -------
    last : Snapshot
    trace : list of tuple
        (step, total, data, prior) for every step.

    Raises
    ------
    ParameterError, NonFiniteEnergyError, RunError
        As :class:`Reconstruction` and :meth:`Reconstruction.snapshots`.
    """
    reconstruction = Reconstruction(observed, config, run_id=run_id)
    trace = []
    last = None
    for snapshot in reconstruction.snapshots():
        trace.append((snapshot.step, snapshot.energy, snapshot.data_energy, snapshot.prior_energy))
        last = snapshot
    return last, trace
