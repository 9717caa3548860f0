"""Reliability of a run: odd shapes, divergence, memory, reproducibility and threads.

Every test builds its own small array. The largest, 8 x 512 x 512 voxels, is stepped at most
twice.
"""

import math
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from prior_helpers import CallCountingPrior

from napari_ebm import run as run_module
from napari_ebm.energy import estimate_noise_sigma
from napari_ebm.errors import NonFiniteEnergyError, ParameterError, RunError
from napari_ebm.prior_files import resolve_prior
from napari_ebm.priors import Prior
from napari_ebm.run import (
    THIN_SIDE,
    Reconstruction,
    RunConfig,
    estimate_memory,
    format_bytes,
    reconstruct,
)
from napari_ebm.training import Trainer, TrainingConfig

SOURCE = Path(__file__).resolve().parents[2] / "src"

SHAPES = [(64, 64), (1, 64, 64), (8, 512, 512), (31, 37, 41)]


def noisy_volume(shape, seed=0):
    """Return a bright box on a flat background with Gaussian noise, as float32."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(0.0, 0.5, size=shape).astype(np.float32)
    box = tuple(slice(n // 4, max(n // 4 + 1, 3 * n // 4)) for n in shape)
    volume[box] += 2.0
    return volume


def prepare_quietly(observed, config):
    """Create a Reconstruction, ignoring the warning about thin volumes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return Reconstruction(observed, config)


def reconstruct_quietly(observed, config):
    """Run to the end with reconstruct(), ignoring the warning about thin volumes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return reconstruct(observed, config)


def gaussian_config(**overrides):
    """Return the configuration of a run on E(x) = ||x - y||^2 / (2 * 0.5^2) + ||x||^2 in raw units."""
    values = dict(operator="denoise", prior="l2", weight=2.0, noise_sigma=0.5, normalize=False, seed=3)
    values.update(overrides)
    return RunConfig(**values)


# ---------------------------------------------------------------------------------------------
# Thin and odd shapes


@pytest.mark.parametrize("operator", ["denoise", "wedge"])
@pytest.mark.parametrize("method", ["map", "langevin"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, shape)) for shape in SHAPES])
def test_output_shape_equals_input(shape, method, operator):
    observed = noisy_volume(shape)
    config = RunConfig(method=method, operator=operator, prior="tv", steps=2, seed=0, tolerance=0.0)

    reconstruction = prepare_quietly(observed, config)
    snapshots = list(reconstruction.snapshots())
    last = snapshots[-1]

    assert [snapshot.step for snapshot in snapshots] == [1, 2]
    assert last.volume.shape == shape
    assert np.isfinite(last.volume).all()
    assert reconstruction.restore(reconstruction.initial).shape == shape
    assert reconstruction.latest_snapshot().volume.shape == shape
    if method == "langevin":
        assert last.mean.shape == shape
        assert last.std.shape == shape
        assert np.isfinite(last.mean).all()
        assert np.isfinite(last.std).all()


def test_learned_prior_on_single_section():
    observed = noisy_volume((1, 64, 64))
    config = RunConfig(method="langevin", operator="wedge", prior="phantom_dsm", steps=2, seed=0)

    last, _ = reconstruct_quietly(observed, config)

    assert last.volume.shape == (1, 64, 64)
    assert np.isfinite(last.volume).all()
    assert np.isfinite(last.std).all()


def test_section_restores_input_units():
    # With weight 0 the MAP estimate is the data itself, so a 2D input comes back unchanged.
    observed = noisy_volume((40, 48)) * 100.0 + 7.0
    config = RunConfig(method="map", operator="denoise", prior="l2", weight=0.0, noise_sigma=50.0, steps=20, seed=0)

    last, _ = reconstruct(observed, config)

    assert last.volume.shape == (40, 48)
    np.testing.assert_allclose(last.volume, observed, rtol=1e-4, atol=1e-3)


def test_noise_estimate_of_single_section():
    noise = np.random.default_rng(4).normal(0.0, 0.7, size=(1, 96, 96))

    estimate = estimate_noise_sigma(noise)

    assert estimate == pytest.approx(0.7, rel=0.1)


def test_noise_estimate_of_one_voxel_raises():
    with pytest.raises(ValueError, match="every side is 1 voxel"):
        estimate_noise_sigma(np.ones((1, 1, 1)))


@pytest.mark.parametrize(
    ("shape", "operator", "phrases"),
    [
        ((1, 64, 64), "wedge", ["(1, 64, 64)", "thin along z (1 voxel)", "single section"]),
        ((8, 512, 512), "wedge", ["(8, 512, 512)", "thin along z (8 voxels)", "8 sections", "missing wedge"]),
        ((8, 512, 512), "denoise", ["thin along z (8 voxels)", "replicate padding"]),
        ((20, 9, 30), "denoise", ["thin along y (9 voxels)"]),
    ],
)
def test_thin_volume_warns_before_run(shape, operator, phrases):
    config = RunConfig(operator=operator, prior="tv", steps=1, seed=0)

    with pytest.warns(UserWarning) as caught:
        Reconstruction(noisy_volume(shape), config)
    messages = [str(warning.message) for warning in caught if "thin along" in str(warning.message)]

    assert len(messages) == 1
    for phrase in phrases:
        assert phrase in messages[0]


@pytest.mark.parametrize("shape", [(31, 37, 41), (64, 64), (THIN_SIDE, THIN_SIDE, THIN_SIDE)])
def test_thick_volume_does_not_warn(shape):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        Reconstruction(noisy_volume(shape), RunConfig(prior="tv", steps=1, seed=0))


@pytest.mark.parametrize(("shape", "phrase"), [((0, 8, 8), "empty"), ((2, 8, 8, 8), "3D"), ((16,), "3D")])
def test_unusable_shape_rejected(shape, phrase):
    with pytest.raises(ParameterError, match=phrase):
        Reconstruction(np.ones(shape, dtype=np.float32), RunConfig(steps=1))


# ---------------------------------------------------------------------------------------------
# Divergence


class NaNFromCallSeven(CallCountingPrior):
    """The l2 energy, which is NaN from its seventh evaluation on."""

    name = "nan_from_call_7"

    def on_call(self, calls, x, energy):
        return energy * math.nan if calls >= 7 else energy


class _ZeroWithNaNGradient(torch.autograd.Function):
    """The value 0, whose gradient is NaN everywhere."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad_output):
        return torch.full(ctx.shape, math.nan, dtype=grad_output.dtype, device=grad_output.device)


class NaNGradientFromCallFour(CallCountingPrior):
    """The l2 energy, whose gradient is NaN from its fourth evaluation on, while the energy stays finite."""

    name = "nan_gradient_from_call_4"

    def on_call(self, calls, x, energy):
        return energy + _ZeroWithNaNGradient.apply(x) if calls >= 4 else energy


def run_until_error(reconstruction):
    """Iterate over the run's snapshots and return them with the error that ended the run."""
    snapshots = []
    with pytest.raises(NonFiniteEnergyError) as raised:
        for snapshot in reconstruction.snapshots():
            snapshots.append(snapshot)
    return snapshots, raised.value


def test_nan_energy_stops_at_step_7(register_prior):
    name = register_prior("nan_from_call_7", NaNFromCallSeven)
    observed = noisy_volume((12, 12, 12))
    config = gaussian_config(method="langevin", prior=name, steps=20, step_size=0.01, temperature=1.0)
    reference, _ = reconstruct(observed, gaussian_config(method="langevin", steps=6, step_size=0.01, temperature=1.0))

    reconstruction = Reconstruction(observed, config)
    snapshots, error = run_until_error(reconstruction)

    assert error.step == 7
    assert "step 7" in str(error)
    assert "step size 0.01" in str(error)
    assert "energy became non-finite" in str(error)
    assert error.last_snapshot.step == 6
    assert snapshots[-1] is error.last_snapshot
    assert [snapshot.step for snapshot in snapshots[:-1]] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(error.last_snapshot.volume, reference.volume)
    np.testing.assert_array_equal(reconstruction.latest_snapshot().volume, reference.volume)
    assert np.isfinite(error.last_snapshot.volume).all()


def test_nan_gradient_stops_at_step_4(register_prior):
    name = register_prior("nan_gradient_from_call_4", NaNGradientFromCallFour)
    observed = noisy_volume((12, 12, 12))
    config = gaussian_config(method="langevin", prior=name, steps=20, step_size=0.02, temperature=1.0)
    reference, _ = reconstruct(observed, gaussian_config(method="langevin", steps=3, step_size=0.02, temperature=1.0))

    reconstruction = Reconstruction(observed, config)
    _, error = run_until_error(reconstruction)

    assert error.step == 4
    assert "volume became non-finite" in str(error)
    assert "step 4" in str(error)
    assert "step size 0.02" in str(error)
    assert math.isfinite(error.last_snapshot.energy)
    np.testing.assert_array_equal(error.last_snapshot.volume, reference.volume)
    np.testing.assert_array_equal(reconstruction.latest_snapshot().volume, reference.volume)


@pytest.mark.parametrize("method", ["map", "langevin"])
def test_huge_step_size_stops_run(method):
    reconstruction = Reconstruction(noisy_volume((12, 12, 12)), gaussian_config(method=method, step_size=1e3, steps=500))

    snapshots, error = run_until_error(reconstruction)

    assert f"step {error.step} " in str(error)
    assert "step size 1000" in str(error)
    assert error.last_snapshot.step == error.step - 1
    assert all(math.isfinite(snapshot.energy) for snapshot in snapshots)
    assert np.isfinite(error.last_snapshot.volume).all()
    np.testing.assert_array_equal(reconstruction.latest_snapshot().volume, error.last_snapshot.volume)


def test_first_step_divergence_has_no_snapshot(register_prior):
    class NaNAlways(Prior):
        """An energy that is always NaN."""

        def forward(self, x):
            return (x * x).sum() * math.nan

    name = register_prior("nan_always", NaNAlways)
    reconstruction = Reconstruction(noisy_volume((8, 8, 8)), gaussian_config(prior=name, steps=5))

    snapshots, error = run_until_error(reconstruction)

    assert snapshots == []
    assert error.step == 1
    assert error.last_snapshot is None
    assert "stopped at its first step" in str(error)


def test_zero_temperature_is_gradient_descent():
    observed = noisy_volume((10, 10, 10))
    step_size, sigma, weight = 0.05, 0.5, 2.0
    expected = observed.astype(np.float64)
    for _ in range(3):
        gradient = (expected - observed) / sigma**2 + weight * expected
        expected = expected - step_size * gradient

    runs = [
        reconstruct(observed, gaussian_config(method="langevin", temperature=0.0, step_size=step_size, steps=3, seed=seed))[0]
        for seed in (1, 2)
    ]

    np.testing.assert_array_equal(runs[0].volume, runs[1].volume)
    np.testing.assert_allclose(runs[0].volume, expected, rtol=1e-5, atol=1e-5)
    assert runs[0].temperature == 0.0


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        (dict(step_size=0.0), "step size"),
        (dict(step_size=-1.0), "step size"),
        (dict(step_size=math.nan), "step size"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.nan), "temperature"),
    ],
)
def test_invalid_step_size_or_temperature_rejected(overrides, name):
    with pytest.raises(ParameterError, match=f"invalid {name}"):
        Reconstruction(noisy_volume((8, 8, 8)), gaussian_config(method="langevin", **overrides))


# ---------------------------------------------------------------------------------------------
# Memory


def test_memory_check_names_both_numbers(monkeypatch):
    monkeypatch.setattr(run_module, "available_memory", lambda device: 12345)
    observed = noisy_volume((16, 16, 16))
    needed = estimate_memory(observed.shape, "map", resolve_prior("tv"), "wedge")

    with pytest.raises(ParameterError) as raised:
        Reconstruction(observed, RunConfig(prior="tv", steps=1))

    message = str(raised.value)
    assert f"needs about {format_bytes(needed)}" in message
    assert "only 12.1 KiB is free" in message
    assert "crop or bin" in message.lower()


def test_memory_estimate_grows_with_model():
    shape = (64, 64, 64)
    tv = resolve_prior("tv")

    map_tv = estimate_memory(shape, "map", tv, "wedge")
    langevin_tv = estimate_memory(shape, "langevin", tv, "wedge")
    learned = estimate_memory(shape, "map", resolve_prior("phantom_dsm"), "wedge")
    larger = estimate_memory((128, 128, 128), "map", tv, "wedge")

    overhead = run_module.RUN_OVERHEAD_BYTES

    assert map_tv == 16 * 4 * 64**3 + overhead
    assert langevin_tv > map_tv
    assert learned - overhead > 10 * (map_tv - overhead)
    assert larger - overhead == 8 * (map_tv - overhead)


def test_memory_estimate_dilation_and_tv():
    shipped = resolve_prior("phantom_dsm")
    assert shipped.metadata["architecture"] == "tv_conv_energy"
    assert shipped.metadata["hyperparameters"]["dilations"] == [1, 2, 4, 1]

    def estimate(architecture, dilations):
        hyperparameters = dict(shipped.metadata["hyperparameters"], dilations=dilations)
        metadata = dict(shipped.metadata, architecture=architecture, hyperparameters=hyperparameters)
        return estimate_memory((48, 48, 48), "langevin", SimpleNamespace(metadata=metadata), "wedge")

    buffer = 4 * 48**3
    plain = estimate("conv_energy", [1, 1, 1, 1])
    dilated = estimate("conv_energy", [1, 2, 4, 1])
    with_tv = estimate("tv_conv_energy", [1, 2, 4, 1])

    # Compared with padding by 1 voxel, the layers padded by 2 and 4 voxels add 16 channels of
    # (52/48)^3 - (50/48)^3 and (56/48)^3 - (50/48)^3 buffers.
    extra_padding = 16 * ((52**3 - 50**3) + (56**3 - 50**3)) / 48**3
    assert dilated - plain == pytest.approx(run_module.LEARNED_MARGIN * extra_padding * buffer, rel=1e-6)
    assert with_tv - dilated == pytest.approx(run_module.LEARNED_MARGIN * 5 * buffer, rel=1e-6)
    assert with_tv == estimate_memory((48, 48, 48), "langevin", shipped, "wedge")


PEAK_SCRIPT = textwrap.dedent(
    """
    import re, sys
    import numpy as np, torch
    from napari_ebm.prior_files import resolve_prior
    from napari_ebm.run import Reconstruction, RunConfig, estimate_memory

    def resident(field):
        status = open("/proc/self/status").read()
        return int(re.search(field + r":\\s+(\\d+) kB", status).group(1)) * 1024

    method, prior, side = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    small = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    list(Reconstruction(small, RunConfig(method=method, prior=prior, steps=3, seed=0, threads=1)).snapshots())
    data = np.random.default_rng(0).normal(size=(side, side, side)).astype(np.float32)
    open("/proc/self/clear_refs", "w").write("5")
    base = resident("VmRSS")
    config = RunConfig(method=method, prior=prior, steps=3, seed=0, threads=1, preview_every=10)
    for _ in Reconstruction(data, config).snapshots():
        pass
    print(resident("VmHWM") - base, estimate_memory(data.shape, method, resolve_prior(prior), "wedge"))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak memory through Linux /proc")
@pytest.mark.parametrize(("method", "prior", "side"), [("map", "tv", 128), ("langevin", "phantom_dsm", 48)])
def test_memory_estimate_covers_measured_peak(method, prior, side):
    # A fixed mmap threshold makes glibc return freed buffers to the system at once, as it does
    # for buffers over 32 MiB, so the peak resident memory counts live buffers only.
    environment = dict(os.environ, PYTHONPATH=str(SOURCE), MALLOC_MMAP_THRESHOLD_="131072")

    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, method, prior, str(side)],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    if result.returncode != 0 and "clear_refs" in result.stderr:
        pytest.skip("this system does not allow resetting the peak resident memory")
    assert result.returncode == 0, result.stderr
    measured, estimated = (int(value) for value in result.stdout.split())

    assert measured <= estimated
    assert estimated <= 1.5 * measured


class MemoryErrorAtCallThree(CallCountingPrior):
    """The l2 energy, which raises MemoryError on its third evaluation."""

    name = "memory_error_at_call_3"

    def on_call(self, calls, x, energy):
        if calls == 3:
            raise MemoryError("test allocation failure")
        return energy


class HugeAllocationAtCallThree(CallCountingPrior):
    """The l2 energy, which requests 4 PiB from torch on its third evaluation."""

    name = "huge_allocation_at_call_3"

    def on_call(self, calls, x, energy):
        if calls == 3:
            torch.empty(2**50, dtype=torch.float32)
        return energy


@pytest.mark.parametrize("prior_class", [MemoryErrorAtCallThree, HugeAllocationAtCallThree])
def test_memory_error_stops_and_recovers(register_prior, prior_class):
    name = register_prior(prior_class.name, prior_class)
    reconstruction = Reconstruction(noisy_volume((24, 24, 24)), gaussian_config(method="langevin", prior=name, steps=10))

    with pytest.raises(RunError, match="out of memory at step 3") as raised:
        list(reconstruction.snapshots())

    error = raised.value
    assert not isinstance(error, NonFiniteEnergyError)
    assert error.step == 3
    assert "crop or bin" in str(error).lower()
    assert error.last_snapshot.step == 2
    assert np.isfinite(error.last_snapshot.volume).all()
    assert reconstruction.latest_snapshot() is None

    del reconstruction, error, raised
    smaller, _ = reconstruct(noisy_volume((12, 12, 12)), gaussian_config(method="langevin", steps=3))
    assert smaller.step == 3
    assert np.isfinite(smaller.volume).all()


# ---------------------------------------------------------------------------------------------
# Reproducibility and threads


@pytest.mark.parametrize("method", ["map", "langevin"])
def test_run_keeps_global_random_state(method):
    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()
    config = RunConfig(method=method, prior="phantom_dsm", steps=2, seed=5)

    reconstruct(noisy_volume((16, 16, 16)), config)

    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])


def small_training_config(**overrides):
    values = dict(iterations=2, phantoms=1, phantom_size=16, patch_size=8, batch_size=1, channels=2, depth=1, seed=4)
    values.update(overrides)
    return TrainingConfig(**values)


def test_trainer_keeps_global_random_state():
    torch_state = torch.get_rng_state()

    trainer = Trainer(small_training_config())
    list(trainer.iterations())

    assert torch.equal(torch.get_rng_state(), torch_state)


def test_trainer_seed_fixes_initial_weights():
    first = Trainer(small_training_config()).network.state_dict()
    torch.randn(1000)
    second = Trainer(small_training_config()).network.state_dict()
    other_seed = Trainer(small_training_config(seed=5)).network.state_dict()

    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other_seed[key]) for key in first)


def test_interleaved_runs_match_single_run():
    observed = noisy_volume((20, 22, 18))
    config = RunConfig(method="langevin", operator="wedge", prior="tv", steps=6, seed=11)
    alone, _ = reconstruct(observed, config)

    runs = [Reconstruction(observed, config).snapshots() for _ in range(2)]
    finals = [None, None]
    rng = np.random.default_rng(0)
    for _ in range(config.steps):
        for index, snapshots in enumerate(runs):
            finals[index] = next(snapshots)
            torch.randn(50)
            np.random.normal(size=50)
            rng.normal(size=50)

    for final in finals:
        assert final.step == config.steps
        np.testing.assert_array_equal(final.volume, alone.volume)
        np.testing.assert_array_equal(final.mean, alone.mean)
        np.testing.assert_array_equal(final.std, alone.std)


class ThreadSpy(CallCountingPrior):
    """The l2 energy, which records torch's CPU thread count at each evaluation."""

    name = "thread_spy"
    seen = []

    def on_call(self, calls, x, energy):
        ThreadSpy.seen.append(torch.get_num_threads())
        return energy


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(previous)


@pytest.mark.parametrize("method", ["map", "langevin"])
def test_run_sets_threads_during_steps(register_prior, two_threads, method):
    name = register_prior("thread_spy", ThreadSpy)
    ThreadSpy.seen = []
    reconstruction = Reconstruction(noisy_volume((8, 8, 8)), gaussian_config(method=method, prior=name, steps=4, threads=1))

    between_steps = [torch.get_num_threads() for _ in reconstruction.snapshots()]

    assert ThreadSpy.seen
    assert set(ThreadSpy.seen) == {1}
    assert between_steps == [two_threads] * len(between_steps)
    assert torch.get_num_threads() == two_threads
    assert reconstruction.parameters()["threads_used"] == 1


def test_default_threads_recorded():
    reconstruction = Reconstruction(noisy_volume((8, 8, 8)), gaussian_config(steps=1))

    threads = reconstruction.parameters()["threads_used"]

    assert 1 <= threads <= run_module.DEFAULT_MAX_THREADS
    assert reconstruction.parameters()["threads"] is None


@pytest.mark.parametrize("threads", [0, -2, 1.5, True])
def test_invalid_threads_rejected(threads):
    with pytest.raises(ParameterError, match=re.escape(f"invalid number of threads {threads!r}")):
        Reconstruction(noisy_volume((8, 8, 8)), gaussian_config(threads=threads))


def test_parameters_rebuild_same_run():
    observed = noisy_volume((16, 18, 20))
    config = RunConfig(method="langevin", operator="wedge", prior="tv", steps=4, burn_in=1)
    first = Reconstruction(observed, config)
    first_last = list(first.snapshots())[-1]

    rebuilt = RunConfig.from_parameters(first.parameters())
    second_last, _ = reconstruct(observed, rebuilt)

    assert rebuilt.seed == first.seed
    assert rebuilt.threads == first.threads
    assert rebuilt.step_size is None
    np.testing.assert_array_equal(second_last.mean, first_last.mean)
    np.testing.assert_array_equal(second_last.std, first_last.std)
