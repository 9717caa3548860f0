"""Forward operators A of the data energy ||A x - y||^2 / (2 sigma^2).

Volumes are torch tensors of shape (z, y, x). Each operator is a real, linear, self-adjoint
orthogonal projection P, so ||A x - A y||^2 = ||P x - P y||^2 holds for A = (mask) * F with the
unitary Fourier transform F, and the data energy can be computed on real volumes.
"""

import logging
import math

import torch

from .errors import ParameterError
from .registry import Registry

logger = logging.getLogger(__name__)

OPERATORS = Registry("operator")


class Operator:
    """Base class: a linear map on (z, y, x) volumes with its adjoint.

    Subclasses implement :meth:`forward`; the adjoint of a self-adjoint projection is itself.
    """

    name = "operator"

    # Fraction of Fourier space that the operator keeps: the variance of white noise is scaled by it.
    measured_fraction = 1.0

    def forward(self, x):
        raise NotImplementedError

    def adjoint(self, r):
        return self.forward(r)

    def __call__(self, x):
        return self.forward(x)

    def describe(self):
        """Return the operator's parameters as a JSON-friendly dict."""
        return {"name": self.name}


@OPERATORS.register("denoise", "identity: the tomogram is observed directly, with noise")
class Denoise(Operator):
    """Identity operator: denoising without a missing wedge."""

    name = "denoise"

    def forward(self, x):
        return x


def wedge_mask(shape, tilt_range=(-60.0, 60.0), device="cpu"):
    """Build the mask of measured frequencies on the rfft grid of a (z, y, x) volume.

    A single-axis tilt series about Y measures, by the central slice theorem, the planes that
    contain the ky axis and are tilted by the tilt angle theta from the kx axis towards kz. A
    frequency (kz, ky, kx) is measured when atan(kz / kx) lies in ``tilt_range``; the ky axis
    (kx = kz = 0) is always measured. The angle of (kz, kx) and of (-kz, -kx) is the same, so the
    mask is Hermitian-symmetric and the projection it defines is real.

    Parameters
    ----------
    shape : tuple of int
        Volume shape (z, y, x).
    tilt_range : (float, float)
        Minimum and maximum tilt angle in degrees, each in [-90, 90].
    device : str or torch.device

    Returns
    -------
    torch.Tensor
        Boolean mask of shape (z, y, x // 2 + 1), matching ``torch.fft.rfftn`` of the volume.

    Raises
    ------
    ParameterError
        If the tilt range is not increasing or leaves [-90, 90] degrees.
    """
    low, high = (float(a) for a in tilt_range)
    if not (-90.0 <= low < high <= 90.0) or math.isnan(low) or math.isnan(high):
        raise ParameterError(
            f"invalid tilt range {low}..{high} degrees; give MIN < MAX, both between -90 and 90"
        )

    nz, _, nx = shape
    kz = torch.fft.fftfreq(nz, device=device).view(-1, 1, 1)
    kx = torch.fft.rfftfreq(nx, device=device).view(1, 1, -1)
    angle = torch.rad2deg(torch.atan2(kz, kx))

    # kx >= 0 on the rfft grid, so atan2 lies in [-90, 90]. The column kx = 0 contains angles of
    # +-90, which are the same direction; it is measured only when the range reaches 90 or -90.
    vertical = kx == 0
    in_range = (angle >= low) & (angle <= high)
    vertical_measured = (high >= 90.0) or (low <= -90.0)
    mask = torch.where(vertical, torch.tensor(vertical_measured, device=device), in_range)
    mask = mask | ((kz == 0) & (kx == 0))
    mask = mask.expand(nz, shape[1], nx // 2 + 1).clone()

    # For even nx the last rfft column (kx = 1/2) is its own Hermitian partner with kz -> -kz.
    # An asymmetric tilt range would measure only one of the two, and the projection would then
    # not be real. A frequency there is kept only when its partner is measured too.
    if nx % 2 == 0:
        partner = (-torch.arange(nz, device=device)) % nz
        mask[:, :, -1] &= mask[partner, :, -1]
    return mask


@OPERATORS.register("wedge", "Fourier transform restricted to the frequencies a tilt series about Y measures")
class Wedge(Operator):
    """Missing-wedge projection P = F^-1 M F for a single-axis tilt series about the Y axis.

    Parameters
    ----------
    shape : tuple of int
        Volume shape (z, y, x).
    tilt_range : (float, float)
        Tilt range in degrees (default -60..60).
    device : str or torch.device
    """

    name = "wedge"

    def __init__(self, shape, tilt_range=(-60.0, 60.0), device="cpu"):
        self.shape = tuple(int(n) for n in shape)
        self.tilt_range = (float(tilt_range[0]), float(tilt_range[1]))
        self.mask = wedge_mask(self.shape, self.tilt_range, device=device)
        # The rfft grid contains one of each pair of conjugate frequencies, except in the planes
        # kx = 0 and kx = nx / 2, so the other planes count twice.
        weights = torch.full((self.mask.shape[-1],), 2.0, device=self.mask.device)
        weights[0] = 1.0
        if self.shape[-1] % 2 == 0:
            weights[-1] = 1.0
        self.measured_fraction = float((self.mask.float() * weights).sum() / (weights.sum() * self.mask[..., 0].numel()))
        logger.debug("wedge %s: %.3f of the rfft grid measured", self.tilt_range, self.measured_fraction)

    def forward(self, x):
        spectrum = torch.fft.rfftn(x, dim=(-3, -2, -1), norm="ortho")
        spectrum = spectrum * self.mask
        if x.device.type != "cpu":
            return torch.fft.irfftn(spectrum, s=x.shape[-3:], dim=(-3, -2, -1), norm="ortho")

        # On the CPU, a sequence of runs with torch 2.13's irfftn here crashed the process with heap
        # corruption (scripts/reproduce_heap_crash.py). The complex inverse of the full spectrum
        # gives the same volume to about 1e-6, and the same sequence did not crash with it.
        full = hermitian_spectrum(spectrum, self.shape[-1])
        return torch.fft.ifftn(full, dim=(-3, -2, -1), norm="ortho").real

    def describe(self):
        return {"name": self.name, "tilt_range": list(self.tilt_range)}


def hermitian_spectrum(half, nx):
    """Return the full 3D spectrum of a real volume from its rfftn half.

    Parameters
    ----------
    half : torch.Tensor
        Complex spectrum from ``torch.fft.rfftn`` over the last three axes, with nx // 2 + 1
        entries on the last axis.
    nx : int
        Length of the last axis of the real volume.

    Returns
    -------
    torch.Tensor
        Complex spectrum with ``nx`` entries on the last axis. The entry at (-kz, -ky, -kx) is
        the complex conjugate of the entry at (kz, ky, kx), indices taken modulo the axis length.
    """
    missing = nx - half.shape[-1]
    mirrored = torch.flip(half[..., 1 : missing + 1], dims=(-3, -2, -1))
    mirrored = torch.roll(mirrored, shifts=(1, 1), dims=(-3, -2))
    return torch.cat([half, torch.conj(mirrored)], dim=-1)


def create_operator(name, shape, tilt_range=(-60.0, 60.0), device="cpu"):
    """Create the operator ``name`` for volumes of ``shape``.

    Raises
    ------
    ParameterError
        If the name is unknown or the tilt range is invalid.
    """
    if name == "wedge":
        return OPERATORS.create(name, shape=shape, tilt_range=tilt_range, device=device)
    return OPERATORS.create(name)
