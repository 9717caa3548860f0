"""Trainable 3D energy networks E_phi(x) for use as priors.

The energy is a sum of per-voxel energies computed by a fully convolutional network, so a
network works on any volume larger than its receptive field, and autograd gives dE/dx for MAP
and Langevin. A small quadratic term keeps the energy bounded below, so Langevin cannot drift
to infinity along directions the network never saw.
"""

import torch
from torch import nn

from .priors import Prior

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
        Number of hidden convolution layers, >= 1. The receptive field is 2 * depth + 1 voxels.
    quadratic : float
        Weight alpha >= 0 of the term alpha * ||x||^2 / 2 added to the summed network output.
    """

    architecture = "conv_energy"

    def __init__(self, channels=16, depth=4, quadratic=0.01):
        super().__init__()
        if not (isinstance(channels, int) and channels >= 1):
            raise ValueError(f"channels must be an integer >= 1, got {channels!r}")
        if not (isinstance(depth, int) and depth >= 1):
            raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
        if not quadratic >= 0:
            raise ValueError(f"quadratic must be >= 0, got {quadratic!r}")

        layers = []
        in_channels = 1
        for _ in range(depth):
            layers.append(nn.Conv3d(in_channels, channels, kernel_size=3, padding=1, padding_mode="replicate"))
            layers.append(nn.Softplus())
            in_channels = channels
        layers.append(nn.Conv3d(in_channels, 1, kernel_size=1))
        self.body = nn.Sequential(*layers)
        self.quadratic = float(quadratic)
        self.hyperparameters = {"channels": channels, "depth": depth, "quadratic": float(quadratic)}

    def voxel_energies(self, x):
        """Return the per-voxel energies of volumes ``x`` of shape (batch, z, y, x)."""
        return self.body(x.unsqueeze(1)).squeeze(1)

    def forward(self, x):
        """Return the energy of each volume in ``x`` (batch, z, y, x) as a tensor of shape (batch,)."""
        network = self.voxel_energies(x).flatten(1).sum(1)
        return network + 0.5 * self.quadratic * (x * x).flatten(1).sum(1)


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
