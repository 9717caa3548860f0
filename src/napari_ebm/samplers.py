"""One step of each method, and the running moments of a chain.

The loop that repeats steps, applies burn-in and thinning and yields snapshots lives in
:mod:`napari_ebm.run`; the functions here do a single update and know nothing of it.
All updates are out of place, so the caller keeps the previous iterate without copying it.
"""

import logging
import math
from dataclasses import dataclass

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


def langevin_step(x, energy, step_size, temperature, generator):
    """Make one step of the unadjusted Langevin algorithm.

    x_new = x - step_size * grad E(x) + sqrt(2 * step_size * T) * noise, with standard normal
    noise. Its stationary law approaches p(x) proportional to exp(-E(x) / T) as step_size goes
    to 0; for a Gaussian with precision a / T the variance is too large by the factor
    1 / (1 - step_size * a / 2). T = 0 makes it plain gradient descent and draws no noise.

    Parameters
    ----------
    x : torch.Tensor
    energy : napari_ebm.energy.PosteriorEnergy
    step_size : float
        Must be > 0.
    temperature : float
        Must be >= 0.
    generator : torch.Generator
        The run's private random generator, on the device of ``x``.

    Returns
    -------
    x_new : torch.Tensor
    terms : napari_ebm.energy.EnergyTerms
        Energies at ``x``, where the gradient was taken.
    """
    terms, grad = energy.value_and_grad(x)
    x_new = x - step_size * grad
    if temperature > 0:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_new = x_new + math.sqrt(2.0 * step_size * temperature) * noise
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
