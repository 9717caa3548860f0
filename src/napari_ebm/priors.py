"""Energy priors E_prior(x) on (z, y, x) volumes, registered by name.

A prior is a callable ``prior(x) -> scalar tensor`` that autograd can differentiate. Its energy
is in units of the normalised intensity (mean 0, standard deviation 1 by default) and is summed
over voxels, so it grows with the volume size like the data energy does. Finite differences are
taken in voxel units.
"""

import logging

import torch

from .registry import Registry

logger = logging.getLogger(__name__)

PRIORS = Registry("prior")


def forward_differences(x):
    """Return the forward differences of ``x`` along z, y and x, zero at the far edge.

    Returns
    -------
    tuple of torch.Tensor
        Three tensors of the shape of ``x`` (Neumann boundary: the last difference is 0).
    """
    differences = []
    for dim in (-3, -2, -1):
        d = torch.diff(x, dim=dim)
        pad = [0, 0] * 3
        pad[2 * (-1 - dim) + 1] = 1
        differences.append(torch.nn.functional.pad(d, pad))
    return tuple(differences)


class Prior(torch.nn.Module):
    """Base class of energy priors.

    Attributes
    ----------
    name : str
        Registered name.
    lipschitz : float
        An upper bound on the Lipschitz constant of the gradient of the energy, used to choose
        a default step size.
    """

    name = "prior"
    lipschitz = 1.0

    def describe(self):
        """Return the prior's parameters as a JSON-friendly dict."""
        return {"name": self.name}


@PRIORS.register("l2", "Gaussian prior ||x||^2 / 2: shrinks every voxel towards 0")
class L2Prior(Prior):
    """Energy ||x||^2 / 2."""

    name = "l2"
    lipschitz = 1.0

    def forward(self, x):
        return 0.5 * (x * x).sum()


@PRIORS.register("smooth", "Smoothness prior ||grad x||^2 / 2: penalises differences between neighbours")
class SmoothPrior(Prior):
    """Energy ||grad x||^2 / 2 with forward differences (a Gaussian Markov random field)."""

    name = "smooth"

    # The largest eigenvalue of the 3D Neumann Laplacian with unit spacing is below 4 per axis.
    lipschitz = 12.0

    def forward(self, x):
        return 0.5 * sum((d * d).sum() for d in forward_differences(x))


@PRIORS.register("tv", "Smoothed total variation sum sqrt(|grad x|^2 + eps^2): keeps edges sharp")
class TotalVariationPrior(Prior):
    """Smoothed isotropic total variation, sum over voxels of sqrt(|grad x|^2 + eps^2) - eps.

    Parameters
    ----------
    eps : float
        Smoothing in normalised intensity units (> 0); the energy is quadratic for gradients
        much smaller than ``eps`` and linear for larger ones.
    """

    name = "tv"

    def __init__(self, eps=0.1):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"tv smoothing eps must be > 0, got {eps}")
        self.eps = float(eps)
        self.lipschitz = 12.0 / self.eps

    def forward(self, x):
        dz, dy, dx = forward_differences(x)
        magnitude = torch.sqrt(dz * dz + dy * dy + dx * dx + self.eps**2)
        return (magnitude - self.eps).sum()

    def describe(self):
        return {"name": self.name, "eps": self.eps}


def create_prior(name, **kwargs):
    """Create the registered prior ``name``.

    Raises
    ------
    ParameterError
        If no prior of that name is registered. The message lists the registered names.
    """
    prior = PRIORS.create(name, **kwargs)
    logger.debug("created prior %r", name)
    return prior


def list_priors():
    """Return (name, description) for every registered prior, sorted by name."""
    return [(name, PRIORS.describe(name)) for name in PRIORS.names()]
