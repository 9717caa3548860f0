"""Posterior energy E(x) = E_data(x) + weight * E_prior(x) and noise estimation.

E_data(x) = ||A x - y||^2 / (2 sigma^2), with the forward operator A, the observed tomogram y
and the noise standard deviation sigma. The posterior density is p(x) proportional to
exp(-E(x) / T). Its normaliser is never computed, because MAP optimisation and Langevin sampling
need only E and its gradient.
"""

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class EnergyTerms:
    """Energy values at one point, as Python floats.

    Attributes
    ----------
    total : float
        E(x) = data + weight * prior.
    data : float
        E_data(x).
    prior : float
        E_prior(x), before multiplication by the weight.
    """

    total: float
    data: float
    prior: float

    def is_finite(self):
        return math.isfinite(self.total) and math.isfinite(self.data) and math.isfinite(self.prior)


class PosteriorEnergy:
    """The posterior energy of a reconstruction problem in normalised units.

    Parameters
    ----------
    operator : napari_ebm.operators.Operator
        Forward operator A (an orthogonal projection).
    prior : napari_ebm.priors.Prior
        Energy prior.
    observed : torch.Tensor
        Observed tomogram y of shape (z, y, x).
    sigma : float
        Noise standard deviation, in the units of ``observed``; must be > 0.
    weight : float
        Weight of the prior energy; must be >= 0.
    """

    def __init__(self, operator, prior, observed, sigma, weight):
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"noise sigma must be finite and > 0, got {sigma}")
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"prior weight must be finite and >= 0, got {weight}")

        self.operator = operator
        self.prior = prior
        self.sigma = float(sigma)
        self.weight = float(weight)
        self.measured = operator(observed)

    @property
    def lipschitz(self):
        """An upper bound on the Lipschitz constant of grad E (the operator norm of A is 1)."""
        return 1.0 / self.sigma**2 + self.weight * float(self.prior.lipschitz)

    def terms(self, x):
        """Return (total, data, prior) energies at ``x`` as tensors that autograd can follow."""
        residual = self.operator(x) - self.measured
        data = (residual * residual).sum() / (2.0 * self.sigma**2)
        prior = self.prior(x)
        return data + self.weight * prior, data, prior

    def value_and_grad(self, x):
        """Return the energy terms at ``x`` and the gradient of the total energy.

        Returns
        -------
        terms : EnergyTerms
        grad : torch.Tensor
            dE/dx, of the shape of ``x``, detached from autograd.
        """
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            total, data, prior = self.terms(x)
            (grad,) = torch.autograd.grad(total, x)
        terms = EnergyTerms(float(total.detach()), float(data.detach()), float(prior.detach()))
        return terms, grad


def estimate_noise_sigma(volume):
    """Estimate the standard deviation of white noise in a volume.

    The estimate is the median absolute deviation of the finest Haar wavelet coefficients that
    are high-pass along every axis of at least 2 voxels, divided by 0.6745 (Donoho's estimator,
    extended to 3D). Each coefficient combines 2^k neighbouring voxels, for k such axes, with
    weights +-1/sqrt(2^k), so it carries the noise at full strength and little of a smooth
    signal. An axis of 1 voxel is skipped, so a single section (1, y, x) gets the 2D estimator.

    Parameters
    ----------
    volume : numpy.ndarray or torch.Tensor
        Array of shape (z, y, x) with at least one side of 2 voxels or more.

    Returns
    -------
    float
        The estimate, in the units of ``volume``.

    Raises
    ------
    ValueError
        If every side of ``volume`` is 1 voxel, so that no pair of neighbours exists.

    Notes
    -----
    NOTE: noise that was filtered (for example the missing wedge of a tomogram, or binning)
    is not white, and the estimate then describes only its high-frequency part.
    """
    v = torch.as_tensor(np.asarray(volume) if not torch.is_tensor(volume) else volume)
    v = v.to(torch.float64)
    dims = [dim for dim in range(max(v.ndim - 3, 0), v.ndim) if v.shape[dim] >= 2]
    if not dims:
        raise ValueError(
            f"the noise of a volume of shape {tuple(v.shape)} cannot be estimated, because every side is 1 voxel"
        )

    coefficients = v
    for dim in dims:
        even = coefficients.narrow(dim, 0, coefficients.shape[dim] // 2 * 2)
        shape = list(even.shape)
        shape[dim : dim + 1] = [shape[dim] // 2, 2]
        pairs = even.reshape(shape)
        coefficients = (pairs.select(dim + 1, 0) - pairs.select(dim + 1, 1)) / math.sqrt(2.0)

    median = coefficients.flatten().median()
    return float((coefficients - median).abs().median() / 0.6744897501960817)


def estimate_signal_std(volume, noise_sigma, measured_fraction=1.0, floor=0.05):
    """Estimate the standard deviation of the clean signal in an observed volume.

    The observed variance is the signal's plus the noise's within the measured part of Fourier
    space. The noise variance there is ``measured_fraction * noise_sigma**2``, and the signal is
    assumed to spread its variance over Fourier space like the noise, so the clean signal's
    variance is (var(y) - f sigma^2) / f.

    Parameters
    ----------
    volume : torch.Tensor
        Observed volume (z, y, x).
    noise_sigma : float
        Noise standard deviation in the units of ``volume``.
    measured_fraction : float
        Fraction f of Fourier space that the operator keeps, in (0, 1].
    floor : float
        The signal's variance is taken as at least ``floor`` times the observed variance, for
        volumes that are mostly noise.

    Returns
    -------
    float
        The estimate, in the units of ``volume``.

    Notes
    -----
    NOTE: a real signal does not lose the same share of its variance to the missing wedge as white
    noise does. On the synthetic phantoms, with the true sigma, the estimate was 3 to 11 % below
    the clean standard deviation, so treat it as a scale, not a measurement.
    """
    observed_variance = float(volume.to(torch.float64).var())
    signal_variance = max(observed_variance - measured_fraction * noise_sigma**2, floor * observed_variance)
    return math.sqrt(signal_variance / measured_fraction)
