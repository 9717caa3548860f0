"""One step of each method, and the running moments of a chain.

The loop that repeats steps, applies burn-in and thinning and yields snapshots lives in
:mod:`napari_ebm.run`; the functions here do a single update and know nothing of it.
All updates are out of place, so the caller keeps the previous iterate without copying it.
"""

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class MapState:
    """Iterate of Nesterov's accelerated gradient descent.

    Attributes
    ----------
    x : torch.Tensor
        Current iterate.
    x_previous : torch.Tensor
        Previous iterate (equal to ``x`` at the start).
    momentum : float
        Nesterov's t_k, starting at 1.
    energy : float
        Energy at the last extrapolated point, for the adaptive restart (inf at the start).
    """

    x: torch.Tensor
    x_previous: torch.Tensor
    momentum: float = 1.0
    energy: float = math.inf


def map_step(state, energy, step_size):
    """Make one step of Nesterov's accelerated gradient descent with adaptive restart.

    The gradient is taken at the extrapolated point y = x + (t_{k-1} - 1) / t_k * (x - x_prev).
    When the energy there rises above that of the previous step, the momentum restarts
    (O'Donoghue and Candes, 2015), which keeps the iteration monotone in practice.

    Parameters
    ----------
    state : MapState
    energy : napari_ebm.energy.PosteriorEnergy
    step_size : float
        Gradient step in normalised intensity units per unit energy; at most 1 / L for
        Lipschitz constant L of grad E guarantees convergence.

    Returns
    -------
    new_state : MapState
    terms : napari_ebm.energy.EnergyTerms
        Energies at the point where the gradient was taken.
    relative_change : float
        ||x_new - x|| / ||x||, the quantity compared with the stopping tolerance.
    evaluated : torch.Tensor
        The point where the gradient was taken, whose energy ``terms`` holds.
    """
    momentum = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * state.momentum**2))
    extrapolated = state.x + ((state.momentum - 1.0) / momentum) * (state.x - state.x_previous)
    terms, grad = energy.value_and_grad(extrapolated)

    if terms.total > state.energy:
        momentum = 1.0
        terms, grad = energy.value_and_grad(state.x)
        extrapolated = state.x

    x_new = extrapolated - step_size * grad
    relative_change = float(torch.linalg.vector_norm(x_new - state.x)) / max(
        float(torch.linalg.vector_norm(state.x)), 1e-12
    )
    return MapState(x_new, state.x, momentum, terms.total), terms, relative_change, extrapolated


class GaussianNoise:
    """Standard normal noise from the run's private generators.

    On the CPU, drawing normal numbers with one torch generator is single-threaded and took
    about a fifth of the time of a gradient of E at 128^3. The volume is therefore cut into
    two slabs along z, each with its own generator, drawn in parallel threads. Two slabs were
    faster than one or four on 2 cores (benchmarks/bench_speed.py). The number of slabs does
    not depend on the machine, so a seed gives the same noise everywhere. Other devices use
    one generator on the device.

    Parameters
    ----------
    seed : int
    device : torch.device
    parallel : bool
        Draw the CPU slabs on background threads. False draws them one after the other in the
        calling thread, which gives the same numbers.
    """

    SLABS = 2
    _pool = None

    def __init__(self, seed, device, parallel=True):
        self.device = torch.device(device)
        self.parallel = parallel
        if self.device.type == "cpu":
            states = np.random.SeedSequence(seed).generate_state(self.SLABS, dtype=np.uint64)
            self.generators = [torch.Generator().manual_seed(int(state)) for state in states]
        else:
            self.generators = [torch.Generator(device=self.device).manual_seed(seed)]

    @classmethod
    def _executor(cls):
        if cls._pool is None:
            cls._pool = ThreadPoolExecutor(max_workers=cls.SLABS, thread_name_prefix="napari-ebm-noise")
        return cls._pool

    def sample(self, shape, dtype=torch.float32):
        """Return a tensor of ``shape`` with independent standard normal entries."""
        return self.start(shape, dtype)()

    def start(self, shape, dtype=torch.float32):
        """Start drawing noise of ``shape`` in the background and return a function that waits for it.

        The Langevin step starts the draw before it computes the gradient, so the two overlap.
        Without ``parallel``, the noise is drawn before this method returns.
        """
        noise = torch.empty(shape, dtype=dtype, device=self.device)
        if len(self.generators) == 1:
            noise.normal_(generator=self.generators[0])
            return lambda: noise

        slabs = torch.tensor_split(noise, self.SLABS, dim=0)
        if not self.parallel:
            for slab, generator in zip(slabs, self.generators):
                slab.normal_(generator=generator)
            return lambda: noise

        futures = [
            self._executor().submit(slab.normal_, generator=generator)
            for slab, generator in zip(slabs, self.generators)
            if slab.numel() > 0
        ]

        def wait():
            for future in futures:
                future.result()
            return noise

        return wait


def langevin_step(x, energy, step_size, temperature, noise):
    """Make one step of the unadjusted Langevin algorithm.

    x_new = x - step_size * grad E(x) + sqrt(2 * step_size * T) * xi, with standard normal xi.
    Its stationary law approaches p(x) proportional to exp(-E(x) / T) as step_size goes to 0;
    for a Gaussian with precision a / T the variance is too large by the factor
    1 / (1 - step_size * a / 2). T = 0 makes it plain gradient descent and draws no noise.

    Parameters
    ----------
    x : torch.Tensor
    energy : napari_ebm.energy.PosteriorEnergy
    step_size : float
        Must be > 0.
    temperature : float
        Must be >= 0.
    noise : GaussianNoise
        The run's private noise source, on the device of ``x``.

    Returns
    -------
    x_new : torch.Tensor
    terms : napari_ebm.energy.EnergyTerms
        Energies at ``x``, where the gradient was taken.
    """
    pending_noise = noise.start(x.shape, x.dtype) if temperature > 0 else None
    try:
        terms, grad = energy.value_and_grad(x)
    finally:
        # The noise buffer must not be released while a background draw still writes to it.
        noise_sample = pending_noise() if pending_noise is not None else None

    x_new = torch.add(x, grad, alpha=-step_size)
    if noise_sample is not None:
        x_new.add_(noise_sample, alpha=math.sqrt(2.0 * step_size * temperature))
    return x_new, terms


class RunningMoments:
    """Running mean and standard deviation of a stream of tensors (Welford's algorithm).

    The standard deviation is the sample estimate (divisor n - 1); it is 0 for a single sample.
    """

    def __init__(self):
        self.count = 0
        self.mean = None
        self._squares = None

    def update(self, x):
        """Add one sample; it is not stored."""
        self.count += 1
        if self.mean is None:
            self.mean = x.detach().clone()
            self._squares = torch.zeros_like(self.mean)
            return
        delta = x - self.mean
        self.mean += delta / self.count
        self._squares += delta * (x - self.mean)

    @property
    def std(self):
        if self.count < 2:
            return torch.zeros_like(self.mean)
        return torch.sqrt(self._squares / (self.count - 1))
