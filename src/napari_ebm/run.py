"""The reconstruction loop: one generator of snapshots shared by the GUI, the CLI and scripts.

A run normalises the observed tomogram (mean 0, standard deviation 1, unless turned off), builds
the posterior energy, repeats one MAP or Langevin step and yields a :class:`Snapshot` after every
step. Volumes in snapshots are copies in the input's intensity units, so a consumer may keep
them while the run goes on. Pausing or stopping a run means no longer asking the generator for
the next snapshot.
"""

import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import __version__
from .energy import PosteriorEnergy, estimate_noise_sigma, estimate_signal_std
from .errors import NonFiniteEnergyError, ParameterError, RunError
from .operators import OPERATORS, create_operator
from .prior_files import recommended_weight, resolve_prior
from .samplers import GaussianNoise, MapState, RunningMoments, langevin_step, map_step

logger = logging.getLogger(__name__)

METHODS = ("map", "langevin")
DEVICES = ("auto", "cpu", "cuda", "mps")

# Fractions of 1 / L, for the Lipschitz bound L of grad E, used when the step size is left unset.
# Langevin takes half, which inflates the variance by at most 1 / (1 - 0.25) in the stiffest
# directions and much less in the smooth ones that dominate a tomogram.
AUTO_STEP_FRACTION = {"map": 1.0, "langevin": 0.5}


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
    temperature : float
        T >= 0 (Langevin); 0 is plain gradient descent.
    burn_in : int
        Langevin steps discarded before the running mean and std start, >= 0 and < steps.
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
    temperature: float = 1.0
    burn_in: int = 0
    thin: int = 1
    tolerance: float = 1e-5
    seed: int | None = None
    device: str = "auto"
    normalize: bool = True
    preview_every: int = 1

    def to_dict(self):
        """Return the parameters as a JSON-friendly dict."""
        values = asdict(self)
        values["tilt_range"] = list(self.tilt_range)
        return values


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
    _require(_is_number(config.temperature) and config.temperature >= 0, "temperature", config.temperature, "must be a finite number >= 0")
    _require(isinstance(config.burn_in, int) and config.burn_in >= 0, "burn-in", config.burn_in, "must be an integer >= 0")
    _require(isinstance(config.thin, int) and config.thin >= 1, "thinning", config.thin, "must be an integer >= 1")
    if config.method == "langevin":
        _require(
            config.burn_in < config.steps, "burn-in", config.burn_in,
            f"must be smaller than the number of steps ({config.steps}) so that samples are kept",
        )
    _require(_is_number(config.tolerance) and config.tolerance >= 0, "tolerance", config.tolerance, "must be a finite number >= 0")
    _require(isinstance(config.preview_every, int) and config.preview_every >= 1, "preview interval", config.preview_every, "must be an integer >= 1")
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
        Observed tomogram of shape (z, y, x), finite values.
    config : RunConfig
    run_id : str, optional
        Identifier copied into every snapshot; a new one is made when omitted.

    Raises
    ------
    ParameterError
        If a parameter is invalid, the device is unavailable or the volume is constant.
    """

    def __init__(self, observed, config, run_id=None):
        validate_config(config)
        self.config = config
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.device = resolve_device(config.device)
        self.seed = config.seed if config.seed is not None else int(np.random.SeedSequence().entropy % 2**31)

        data = np.asarray(observed, dtype=np.float32)
        if data.ndim != 3:
            raise ParameterError(f"the volume must be 3D (z, y, x), got shape {data.shape}")
        if min(data.shape) < 2:
            raise ParameterError(f"the volume of shape {data.shape} is too thin: every side needs at least 2 voxels")
        non_finite = int(data.size - np.count_nonzero(np.isfinite(data)))
        if non_finite:
            raise ParameterError(f"the volume contains {non_finite} NaN or infinite voxels; replace them before a run")
        self.shape = data.shape

        self.offset, self.scale = 0.0, 1.0
        if config.normalize:
            self.offset = float(data.mean(dtype=np.float64))
            self.scale = float(data.std(dtype=np.float64))
            if not self.scale > 0:
                raise ParameterError("the volume is constant (standard deviation 0), so there is nothing to reconstruct")
        observed_normalised = torch.from_numpy((data - self.offset) / self.scale).to(self.device)

        self.noise_sigma_estimated = config.noise_sigma is None
        if self.noise_sigma_estimated:
            sigma = estimate_noise_sigma(observed_normalised)
            if not sigma > 0:
                raise ParameterError("the noise sigma estimated from the volume is 0; set the noise sigma explicitly")
        else:
            sigma = config.noise_sigma / self.scale

        operator = create_operator(config.operator, self.shape, config.tilt_range, device=self.device)
        prior = resolve_prior(config.prior, **config.prior_options).to(self.device)

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
        recommended = recommended_weight(prior)
        if config.weight is not None:
            self.weight = config.weight
        else:
            self.weight = recommended if recommended is not None else 1.0
        self.energy = PosteriorEnergy(operator, prior, observed_normalised, sigma, self.weight)
        self.initial = observed_normalised
        self._preview_requested = False
        self._latest = None

        fraction = AUTO_STEP_FRACTION[config.method]
        self.step_size = config.step_size if config.step_size is not None else fraction / self.energy.lipschitz
        logger.debug(
            "run %s prepared: %s on %s, shape %s, sigma %.4g (%s), step size %.4g, seed %d",
            self.run_id, config.method, self.device, self.shape, self.noise_sigma,
            "estimated" if self.noise_sigma_estimated else "given", self.step_size, self.seed,
        )

    def request_preview(self):
        """Make the next snapshot carry volumes; safe to call from another thread."""
        self._preview_requested = True

    def latest_snapshot(self):
        """Return a snapshot with volumes of the last completed step, or None before the first.

        Call it only while the generator from :meth:`snapshots` is suspended or closed, for
        example after a consumer stopped iterating, because it reads the run's current state.
        """
        if self._latest is None:
            return None
        step, terms, x, moments, started = self._latest
        return self._snapshot(step, terms, x, moments, started, with_volumes=True)

    def restore(self, x):
        """Return a normalised tensor as a numpy copy in the input's intensity units."""
        return (x.detach() * self.scale + self.offset).to("cpu", torch.float32).numpy().copy()

    def parameters(self):
        """Return every parameter needed to rerun, with resolved values, as a JSON-friendly dict."""
        values = self.config.to_dict()
        values.update(
            seed=self.seed,
            step_size_used=self.step_size,
            weight_used=self.weight,
            noise_sigma_used=self.noise_sigma,
            noise_sigma_estimated=self.noise_sigma_estimated,
            device_used=str(self.device),
            normalization={"offset": self.offset, "scale": self.scale, "kind": self.normalization},
            napari_ebm_version=__version__,
            torch_version=torch.__version__,
        )
        return values

    def snapshots(self):
        """Run and yield one :class:`Snapshot` per step.

        Yields
        ------
        Snapshot

        Raises
        ------
        NonFiniteEnergyError
            At the first step whose energy or gradient is not finite. The snapshot of the last
            finite state is yielded first and is also the error's ``last_snapshot``.
        RunError
            If a step fails for another reason; the message names the step.
        """
        config = self.config
        noise = GaussianNoise(self.seed, self.device)
        moments = RunningMoments()
        x = self.initial.clone()
        map_state = MapState(x, x)
        last = None
        started = time.perf_counter()
        logger.debug("run %s started", self.run_id)

        # The last point whose energy was finite, with its step and energies. Updates are out of
        # place, so keeping the reference costs no copy.
        finite_point = None

        for step in range(1, config.steps + 1):
            try:
                if config.method == "map":
                    map_state, terms, change, evaluated = map_step(map_state, self.energy, self.step_size)
                    x = map_state.x
                else:
                    evaluated = x
                    x, terms = langevin_step(x, self.energy, self.step_size, config.temperature, noise)
                    change = math.inf
            except Exception as error:  # noqa: BLE001 - any failure inside a step is reported with its step
                logger.debug("run %s failed at step %d", self.run_id, step, exc_info=True)
                raise RunError(
                    f"the run failed at step {step}: {type(error).__name__}: {error}", step, last
                ) from error

            if not terms.is_finite():
                message = (
                    f"the energy became non-finite at step {step} (step size {self.step_size:.4g}); "
                    "the run stopped and kept the last volume with a finite energy. "
                    "Lower the step size or the temperature."
                )
                logger.debug("run %s: %s", self.run_id, message)
                if finite_point is not None:
                    finite_step, finite_terms, point = finite_point
                    last = self._snapshot(finite_step, finite_terms, point, moments, started, with_volumes=True)
                    yield last
                raise NonFiniteEnergyError(message, step, last, step_size=self.step_size)
            finite_point = (step, terms, evaluated)

            if config.method == "langevin" and step > config.burn_in and (step - config.burn_in) % config.thin == 0:
                moments.update(x)

            self._latest = (step, terms, x, moments, started)
            converged = config.method == "map" and change < config.tolerance
            final = step == config.steps or converged
            with_volumes = final or step % config.preview_every == 0 or self._preview_requested
            if with_volumes:
                self._preview_requested = False
            last = self._snapshot(step, terms, x, moments, started, with_volumes, done=final, converged=converged)
            yield last
            if converged:
                logger.debug("run %s converged at step %d", self.run_id, step)
                break

        logger.debug("run %s finished after %d steps", self.run_id, last.step)

    def _snapshot(self, step, terms, x, moments, started, with_volumes, done=False, converged=False):
        snapshot = Snapshot(
            run_id=self.run_id,
            method=self.config.method,
            step=step,
            steps=self.config.steps,
            energy=terms.total,
            data_energy=terms.data,
            prior_energy=terms.prior,
            step_size=self.step_size,
            temperature=self.config.temperature if self.config.method == "langevin" else 0.0,
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
                snapshot.std = (moments.std * self.scale).to("cpu", torch.float32).numpy().copy()
        return snapshot


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
