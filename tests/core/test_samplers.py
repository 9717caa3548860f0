"""MAP and Langevin against the closed-form Gaussian posterior.

With the identity operator and the l2 prior, E(x) = ||x - y||^2 / (2 sigma^2) + w ||x||^2 / 2,
so p(x) proportional to exp(-E / T) is Gaussian, independently per voxel, with
precision a / T for a = 1 / sigma^2 + w and mean y / (sigma^2 a).
"""

import math

import numpy as np
import pytest
from prior_helpers import CallCountingPrior

from napari_ebm.errors import NonFiniteEnergyError, ParameterError, RunError
from napari_ebm.run import Reconstruction, RunConfig, reconstruct

SIGMA = 0.5
WEIGHT = 2.0
PRECISION = 1.0 / SIGMA**2 + WEIGHT


def observed_volume(shape=(24, 24, 24), seed=0):
    return np.random.default_rng(seed).normal(1.5, 2.0, size=shape).astype(np.float32)


def gaussian_config(**overrides):
    values = dict(operator="denoise", prior="l2", weight=WEIGHT, noise_sigma=SIGMA, normalize=False, seed=3)
    values.update(overrides)
    return RunConfig(**values)


def test_map_reaches_gaussian_mean():
    y = observed_volume()
    expected = y / (SIGMA**2 * PRECISION)

    last, _ = reconstruct(y, gaussian_config(method="map", steps=200, tolerance=1e-9))

    relative_error = np.linalg.norm(last.volume - expected) / np.linalg.norm(expected)
    assert relative_error < 1e-3


def test_map_reaches_mean_with_small_step():
    y = observed_volume()
    expected = y / (SIGMA**2 * PRECISION)

    last, _ = reconstruct(y, gaussian_config(method="map", steps=500, step_size=0.2 / PRECISION, tolerance=1e-9))

    relative_error = np.linalg.norm(last.volume - expected) / np.linalg.norm(expected)
    assert relative_error < 1e-3


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_langevin_matches_gaussian_moments(temperature):
    # The volume is 24^3 independent voxel chains. After burn-in, the time average per voxel
    # estimates the posterior mean, and the median over voxels of the sample std is precise.
    y = observed_volume()
    step_size = 0.2 / PRECISION
    expected_mean = y / (SIGMA**2 * PRECISION)
    # The unadjusted chain's stationary variance is T / (a (1 - h a / 2)), 11 % above T / a here.
    expected_std = math.sqrt(temperature / (PRECISION * (1.0 - step_size * PRECISION / 2.0)))

    config = gaussian_config(method="langevin", steps=1500, burn_in=300, thin=5, step_size=step_size, temperature=temperature)
    last, _ = reconstruct(y, config)

    # Each voxel mean averages 240 samples with lag-one correlation 0.8^5 = 0.33, so its error has
    # a standard deviation of about 0.09 posterior standard deviations.
    mean_error = np.abs(last.mean - expected_mean).mean()
    std_ratio = float(np.median(last.std)) / expected_std
    assert last.samples == 240
    assert mean_error < 0.15 * expected_std
    assert abs(std_ratio - 1.0) < 0.1


def test_langevin_std_scales_with_temperature():
    y = observed_volume()
    config = dict(method="langevin", steps=800, burn_in=200, step_size=0.2 / PRECISION)

    cold, _ = reconstruct(y, gaussian_config(temperature=0.5, **config))
    hot, _ = reconstruct(y, gaussian_config(temperature=2.0, **config))

    ratio = float(np.median(hot.std) / np.median(cold.std))
    assert abs(ratio - 2.0) < 0.15


def test_zero_temperature_is_deterministic():
    y = observed_volume()
    config = dict(method="langevin", steps=20, temperature=0.0)

    first, _ = reconstruct(y, gaussian_config(seed=1, **config))
    second, _ = reconstruct(y, gaussian_config(seed=2, **config))

    np.testing.assert_array_equal(first.volume, second.volume)


def test_same_seed_same_samples():
    y = observed_volume()
    config = dict(method="langevin", steps=10, temperature=1.0, seed=7)

    first, _ = reconstruct(y, gaussian_config(**config))
    np.random.seed(0)
    np.random.random(100)
    second, _ = reconstruct(y, gaussian_config(**config))

    np.testing.assert_array_equal(first.volume, second.volume)


def test_normalisation_restores_units():
    y = observed_volume() * 1000.0 + 5000.0
    sigma = SIGMA * 1000.0
    config = RunConfig(method="map", operator="denoise", prior="l2", weight=0.0, noise_sigma=sigma, steps=50, seed=1)

    last, _ = reconstruct(y, config)

    # With weight 0 the MAP estimate is the data itself, in the input's units.
    np.testing.assert_allclose(last.volume, y, rtol=1e-4)
    assert last.noise_sigma == pytest.approx(sigma)


def test_map_lowers_tv_energy_with_wedge():
    y = observed_volume((16, 20, 18))

    last, trace = reconstruct(y, RunConfig(method="map", operator="wedge", prior="tv", steps=30, seed=0))

    assert trace[-1][1] < trace[0][1]
    assert last.volume.shape == y.shape


def test_snapshots_carry_run_id():
    reconstruction = Reconstruction(observed_volume((8, 8, 8)), gaussian_config(steps=3), run_id="abc")

    ids = {snapshot.run_id for snapshot in reconstruction.snapshots()}

    assert ids == {"abc"}


def test_preview_every_limits_volumes():
    config = gaussian_config(method="langevin", steps=10, preview_every=4)
    snapshots = list(Reconstruction(observed_volume((8, 8, 8)), config).snapshots())

    with_volume = [s.step for s in snapshots if s.volume is not None]

    assert with_volume == [4, 8, 10]


@pytest.mark.parametrize(
    "overrides, name",
    [
        (dict(step_size=0.0), "step size"),
        (dict(step_size=-1.0), "step size"),
        (dict(step_size=float("nan")), "step size"),
        (dict(temperature=-0.1), "temperature"),
        (dict(steps=0), "number of steps"),
        (dict(method="langevin", burn_in=10, steps=10), "burn-in"),
        (dict(method="langevin", burn_in=5, map_start_steps=6, steps=10), "MAP start steps"),
        (dict(method="langevin", burn_in=5, map_start_steps=-1, steps=10), "MAP start steps"),
        (dict(thin=0), "thinning"),
        (dict(weight=-1.0), "weight"),
        (dict(noise_sigma=0.0), "noise sigma"),
        (dict(tilt_range=(60.0, -60.0)), "tilt range"),
        (dict(prior="nonexistent"), "prior"),
        (dict(method="mcmc"), "method"),
    ],
)
def test_invalid_parameter_rejected(overrides, name):
    with pytest.raises(ParameterError, match=name):
        Reconstruction(observed_volume((8, 8, 8)), gaussian_config(**overrides))


def test_non_finite_volume_rejected():
    volume = observed_volume((8, 8, 8))
    volume[2, 3, 4] = np.nan

    with pytest.raises(ParameterError, match="1 NaN or infinite"):
        Reconstruction(volume, gaussian_config())


def test_cuda_without_gpu_rejected():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")

    with pytest.raises(ParameterError, match="no CUDA GPU"):
        Reconstruction(observed_volume((8, 8, 8)), gaussian_config(device="cuda"))


def test_divergence_keeps_last_finite_volume():
    y = observed_volume((12, 12, 12))
    config = gaussian_config(method="map", step_size=1e3, steps=200)
    snapshots = []

    with pytest.raises(NonFiniteEnergyError, match=r"non-finite \(NaN or infinite\) at step") as raised:
        for snapshot in Reconstruction(y, config).snapshots():
            snapshots.append(snapshot)

    kept = raised.value.last_snapshot
    assert kept is snapshots[-1]
    assert kept.step == raised.value.step - 1
    assert np.isfinite(kept.volume).all()
    assert math.isfinite(kept.energy)


class FailingPrior(CallCountingPrior):
    """The l2 energy, which raises on its third evaluation."""

    name = "failing"

    def on_call(self, calls, x, energy):
        if calls == 3:
            raise RuntimeError("synthetic failure")
        return energy


@pytest.fixture
def failing_prior(register_prior):
    return register_prior("failing", FailingPrior, "fails at its third evaluation")


def test_step_error_names_step(failing_prior):
    config = gaussian_config(method="langevin", prior=failing_prior, steps=10)

    with pytest.raises(RunError, match="step 3") as raised:
        list(Reconstruction(observed_volume((8, 8, 8)), config).snapshots())

    assert raised.value.step == 3


def test_map_start_steps_are_map_steps():
    y = observed_volume()
    common = dict(steps=12, step_size=0.02 / PRECISION, tolerance=0.0)

    langevin_snapshots = list(Reconstruction(
        y, gaussian_config(method="langevin", burn_in=12 - 1, map_start_steps=12 - 1, preview_every=1, **common)
    ).snapshots())
    map_snapshots = list(Reconstruction(y, gaussian_config(method="map", preview_every=1, **common)).snapshots())

    np.testing.assert_array_equal(langevin_snapshots[-2].volume, map_snapshots[-2].volume)
    assert [snapshot.temperature for snapshot in langevin_snapshots] == [0.0] * 11 + [1.0]
    assert langevin_snapshots[-1].samples == 1


def test_map_start_brings_chain_to_mode():
    # With a step size of 0.02 / a, Langevin from the observation closes only 1 - 0.98^30 = 45 %
    # of the distance to the mean in 30 steps, while 30 MAP steps with momentum close nearly all.
    y = observed_volume()
    expected_mean = y / (SIGMA**2 * PRECISION)
    common = dict(method="langevin", steps=60, burn_in=30, step_size=0.02 / PRECISION, temperature=0.01)

    started_at_mode, _ = reconstruct(y, gaussian_config(map_start_steps=30, **common))
    started_at_input, _ = reconstruct(y, gaussian_config(**common))

    distance = np.linalg.norm(y - expected_mean)
    assert np.linalg.norm(started_at_mode.mean - expected_mean) < 0.1 * distance
    assert np.linalg.norm(started_at_input.mean - expected_mean) > 0.3 * distance
