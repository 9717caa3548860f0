"""Forward operators and priors: projection and adjoint identities, registry behaviour."""

import numpy as np
import pytest
import torch

from napari_ebm.energy import estimate_noise_sigma, estimate_signal_std
from napari_ebm.errors import ParameterError
from napari_ebm.operators import OPERATORS, Wedge, create_operator, hermitian_spectrum, wedge_mask
from napari_ebm.priors import create_prior, list_priors

SHAPES = [(16, 12, 10), (15, 13, 11), (9, 8, 16)]
TILT_RANGES = [(-60.0, 60.0), (-50.0, 65.0), (-30.0, 45.0)]


def random_pair(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    y = torch.randn(shape, generator=generator, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tilt_range", TILT_RANGES)
def test_wedge_is_idempotent(shape, tilt_range):
    wedge = Wedge(shape, tilt_range)
    x, _ = random_pair(shape)

    once = wedge(x)
    twice = wedge(once)

    assert torch.allclose(twice, once, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tilt_range", TILT_RANGES)
def test_wedge_dot_product_adjoint(shape, tilt_range):
    wedge = Wedge(shape, tilt_range)
    x, y = random_pair(shape, seed=1)

    left = float((wedge(x) * y).sum())
    right = float((x * wedge.adjoint(y)).sum())

    assert left == pytest.approx(right, rel=1e-10, abs=1e-10)


def test_wedge_removes_energy():
    wedge = Wedge((32, 32, 32), (-60.0, 60.0))
    x, _ = random_pair((32, 32, 32))

    kept = float((wedge(x) ** 2).sum() / (x**2).sum())

    # For white noise the kept energy is the measured fraction of Fourier space, about 2/3.
    assert kept == pytest.approx(wedge.measured_fraction, abs=0.02)
    assert 0.6 < kept < 0.72


def test_wedge_keeps_in_plane_frequencies():
    mask = wedge_mask((16, 16, 16), (-60.0, 60.0))

    assert bool(mask[0, :, :].all())
    assert not bool(mask[4, 0, 1])
    assert bool(mask[1, 0, 4])


def test_full_tilt_range_is_identity():
    wedge = Wedge((12, 10, 14), (-90.0, 90.0))
    x, _ = random_pair((12, 10, 14))

    assert torch.allclose(wedge(x), x, atol=1e-12)


def test_denoise_is_identity():
    operator = create_operator("denoise", (4, 4, 4))
    x, _ = random_pair((4, 4, 4))

    assert operator(x) is x


@pytest.mark.parametrize("tilt_range", [(60.0, -60.0), (-95.0, 60.0), (float("nan"), 60.0)])
def test_invalid_tilt_range_rejected(tilt_range):
    with pytest.raises(ParameterError, match="tilt range"):
        create_operator("wedge", (8, 8, 8), tilt_range)


def test_unknown_operator_lists_choices():
    with pytest.raises(ParameterError, match="denoise, wedge"):
        OPERATORS.create("radon")


def test_priors_are_registered():
    names = [name for name, _ in list_priors()]

    assert {"l2", "smooth", "tv"} <= set(names)


@pytest.mark.parametrize("name", ["l2", "smooth", "tv"])
def test_prior_gradient_matches_finite_difference(name):
    prior = create_prior(name).double()
    x, direction = random_pair((6, 7, 8), seed=2)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(prior(x), x)

    epsilon = 1e-6
    with torch.no_grad():
        numeric = (prior(x + epsilon * direction) - prior(x - epsilon * direction)) / (2 * epsilon)

    assert float((grad * direction).sum()) == pytest.approx(float(numeric), rel=1e-6)


def test_smooth_prior_is_zero_on_constant():
    prior = create_prior("smooth")

    assert float(prior(torch.full((5, 5, 5), 3.0))) == 0.0


def test_tv_prior_prefers_sharp_edge_to_noise():
    prior = create_prior("tv")
    edge = torch.zeros(8, 8, 8)
    edge[:, :, 4:] = 1.0
    noisy = edge + 0.3 * torch.randn(8, 8, 8, generator=torch.Generator().manual_seed(0))

    assert float(prior(edge)) < float(prior(noisy))


def test_noise_estimate_on_white_noise():
    noise = np.random.default_rng(0).normal(0.0, 0.7, size=(32, 32, 32))
    smooth = np.sin(np.linspace(0, 3, 32))[:, None, None] * np.ones((32, 32, 32)) * 5

    estimate = estimate_noise_sigma(noise + smooth)

    assert estimate == pytest.approx(0.7, rel=0.05)


@pytest.mark.parametrize("operator_name", ["denoise", "wedge"])
def test_signal_estimate_removes_noise(operator_name):
    rng = np.random.default_rng(1)
    signal = torch.from_numpy(rng.normal(size=(48, 48, 48))).float()
    operator = create_operator(operator_name, signal.shape)
    noise = torch.from_numpy(rng.normal(0.0, 1.5, size=signal.shape)).float()

    # White signal of std 1 and white noise of std 1.5 lose the same fraction to the wedge.
    observed = operator(signal + noise)
    estimate = estimate_signal_std(observed, 1.5, operator.measured_fraction)

    assert estimate == pytest.approx(1.0, rel=0.05)


def test_signal_estimate_has_a_floor():
    observed = torch.from_numpy(np.random.default_rng(2).normal(size=(32, 32, 32))).float()

    assert estimate_signal_std(observed, 2.0) == pytest.approx(np.sqrt(0.05 * float(observed.var())), rel=1e-6)


@pytest.mark.parametrize("shape", [(6, 8, 10), (5, 7, 9), (1, 6, 7)])
def test_hermitian_spectrum_matches_fftn(shape):
    volume = torch.randn(shape, dtype=torch.float64)

    full = hermitian_spectrum(torch.fft.rfftn(volume), shape[-1])

    torch.testing.assert_close(full, torch.fft.fftn(volume))


@pytest.mark.parametrize("shape", [(16, 20, 18), (9, 11, 13)])
def test_wedge_cpu_path_matches_irfftn(shape):
    operator = Wedge(shape)
    volume = torch.randn(shape)

    spectrum = torch.fft.rfftn(volume, norm="ortho") * operator.mask
    expected = torch.fft.irfftn(spectrum, s=shape, norm="ortho")

    torch.testing.assert_close(operator.forward(volume), expected, rtol=0, atol=1e-5)
