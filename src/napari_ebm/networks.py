"""Trainable 3D energy networks E_phi(x) for use as priors.

The energy is a sum of per-voxel energies computed by a fully convolutional network, so a
network works on any volume larger than its receptive field, and autograd gives dE/dx for MAP
and Langevin. A small quadratic term keeps the energy bounded below, so Langevin cannot drift
to infinity along directions the network never saw.
"""

import math

import torch
from torch import nn

from .priors import Prior, forward_differences

# Architectures that a prior file may name, with the keyword arguments they accept.
ARCHITECTURES = {}


def register_architecture(cls):
    """Register an architecture class under its ``architecture`` name."""
    ARCHITECTURES[cls.architecture] = cls
    return cls


@register_architecture
class ConvEnergy(nn.Module):
    """A fully convolutional network of 3x3x3 convolutions with softplus activations.

    Parameters
    ----------
    channels : int
        Feature channels of each hidden layer, >= 1.
    depth : int
        Number of hidden convolution layers, >= 1.
    quadratic : float
        Weight alpha >= 0 of the term alpha * ||x||^2 / 2 added to the summed network output.
    dilations : sequence of int, optional
        Dilation of each hidden layer, ``depth`` integers >= 1 (default: all 1). The receptive
        field is 2 * sum(dilations) + 1 voxels, so dilations widen it at no extra cost; the
        missing wedge smears density along z over more voxels than a 9-voxel field covers.
    """

    architecture = "conv_energy"

    def __init__(self, channels=16, depth=4, quadratic=0.01, dilations=None):
        super().__init__()
        if not (isinstance(channels, int) and channels >= 1):
            raise ValueError(f"channels must be an integer >= 1, got {channels!r}")
        if not (isinstance(depth, int) and depth >= 1):
            raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
        if not quadratic >= 0:
            raise ValueError(f"quadratic must be >= 0, got {quadratic!r}")
        dilations = [1] * depth if dilations is None else list(dilations)
        if len(dilations) != depth or not all(isinstance(d, int) and d >= 1 for d in dilations):
            raise ValueError(f"dilations must be {depth} integers >= 1 (one per layer), got {dilations!r}")

        layers = []
        in_channels = 1
        for dilation in dilations:
            layers.append(
                nn.Conv3d(in_channels, channels, kernel_size=3, padding=dilation, dilation=dilation, padding_mode="replicate")
            )
            layers.append(nn.Softplus())
            in_channels = channels
        layers.append(nn.Conv3d(in_channels, 1, kernel_size=1))
        self.body = nn.Sequential(*layers)
        self.quadratic = float(quadratic)
        self.hyperparameters = {"channels": channels, "depth": depth, "quadratic": float(quadratic), "dilations": dilations}

    def voxel_energies(self, x):
        """Return the per-voxel energies of volumes ``x`` of shape (batch, z, y, x)."""
        return self.body(x.unsqueeze(1)).squeeze(1)

    def curvature_floor(self):
        """Return a lower bound on the Lipschitz constant of grad E that one patch may not show.

        The plain network has none, so the result is 0.
        """
        return 0.0

    def forward(self, x):
        """Return the energy of each volume in ``x`` (batch, z, y, x) as a tensor of shape (batch,)."""
        network = self.voxel_energies(x).flatten(1).sum(1)
        return network + 0.5 * self.quadratic * (x * x).flatten(1).sum(1)


@register_architecture
class SquaredConvEnergy(ConvEnergy):
    """A :class:`ConvEnergy` whose per-voxel energies are squares, so the energy is bounded below.

    The per-voxel energy is r^2 / 2, where r is the output of the same convolutional network.
    An unbounded per-voxel output can decrease without limit along directions that the data
    do not constrain, such as the missing wedge, so MAP can drift away. A square cannot.
    The parameters are those of :class:`ConvEnergy`.
    """

    architecture = "squared_conv_energy"

    def voxel_energies(self, x):
        """Return the per-voxel energies r^2 / 2 of volumes ``x`` of shape (batch, z, y, x)."""
        return 0.5 * super().voxel_energies(x) ** 2


@register_architecture
class ResidualConvEnergy(ConvEnergy):
    """A gradient-step energy: half the squared distance of x from a bounded denoised volume.

    The per-voxel energy is (x - D(x))^2 / (2 tau^2) with D(x) = bound * tanh((x + h(x)) / bound),
    where h is the convolutional network of :class:`ConvEnergy`, so D starts near the identity,
    and tau is a trained scale: at the noise level tau, D is a denoiser. Because |D(x)| < bound, the energy grows
    at least like (|x| - bound)^2 / 2 per voxel, so MAP and Langevin cannot drift to large
    values along directions that the data do not constrain, such as the missing wedge. The form
    follows the gradient-step denoisers of Hurault, Leclaire and Papadakis (2022).

    Parameters
    ----------
    channels, depth, quadratic, dilations
        As for :class:`ConvEnergy`.
    bound : float
        Largest absolute value of D(x) in normalised units, > 0.
    """

    architecture = "residual_conv_energy"

    def __init__(self, channels=16, depth=4, quadratic=0.01, dilations=None, bound=4.0):
        super().__init__(channels=channels, depth=depth, quadratic=quadratic, dilations=dilations)
        if not bound > 0:
            raise ValueError(f"bound must be > 0, got {bound!r}")
        self.bound = float(bound)
        self.hyperparameters["bound"] = self.bound
        self.log_tau = nn.Parameter(torch.zeros(()))

    def curvature_floor(self):
        """Return 1 / tau^2, the curvature of the energy wherever D saturates."""
        return float(torch.exp(-2.0 * self.log_tau.detach()))

    def voxel_energies(self, x):
        """Return the per-voxel energies (x - D(x))^2 / (2 tau^2) of volumes ``x`` (batch, z, y, x)."""
        denoised = self.bound * torch.tanh((x + super().voxel_energies(x)) / self.bound)
        return 0.5 * (x - denoised) ** 2 * torch.exp(-2.0 * self.log_tau)


@register_architecture
class TVConvEnergy(ConvEnergy):
    """A :class:`ConvEnergy` plus a trained multiple of smoothed total variation.

    The per-voxel energy is the network's output plus a * (sqrt(|grad x|^2 + eps^2) - eps), with
    a > 0 trained with the network. Total variation alone already fills the missing wedge
    well, so the network only has to learn what it misses.

    Parameters
    ----------
    channels, depth, quadratic, dilations
        As for :class:`ConvEnergy`.
    eps : float
        Smoothing of the total variation in normalised units, > 0.
    """

    architecture = "tv_conv_energy"

    def __init__(self, channels=16, depth=4, quadratic=0.01, dilations=None, eps=0.1):
        super().__init__(channels=channels, depth=depth, quadratic=quadratic, dilations=dilations)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps = float(eps)
        self.hyperparameters["eps"] = self.eps
        self.log_tv_weight = nn.Parameter(torch.tensor(math.log(0.5)))

    def curvature_floor(self):
        """Return the Lipschitz constant of the gradient of the total variation term."""
        return float(torch.exp(self.log_tv_weight.detach())) * 12.0 / self.eps

    def voxel_energies(self, x):
        """Return the per-voxel energies of volumes ``x`` of shape (batch, z, y, x)."""
        dz, dy, dx = forward_differences(x)
        variation = torch.sqrt(dz * dz + dy * dy + dx * dx + self.eps**2) - self.eps
        return super().voxel_energies(x) + torch.exp(self.log_tv_weight) * variation


class LearnedPrior(Prior):
    """A trained energy network used as a prior on one (z, y, x) volume.

    Parameters
    ----------
    network : nn.Module
        A registered architecture, in evaluation mode.
    metadata : dict
        The validated metadata of the prior file.
    """

    def __init__(self, network, metadata):
        super().__init__()
        self.network = network.eval()
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)
        self.metadata = metadata
        self.name = metadata["name"]

        # NOTE: this Lipschitz value is an estimate made at training time by power iteration on
        # one training patch, not a proven bound. The automatic step size relies on it.
        self.lipschitz = float(metadata["lipschitz_estimate"])

    def forward(self, x):
        return self.network(x.unsqueeze(0))[0]

    def describe(self):
        return {"name": self.name, "file": self.metadata.get("file"), "version": self.metadata["version"]}
