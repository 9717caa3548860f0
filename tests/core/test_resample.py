"""Fourier resampling and the voxel-size check of learned priors."""

import numpy as np
import pytest

from napari_ebm.prior_files import resolve_prior
from napari_ebm.resample import fourier_resample, voxel_size_mismatch


def test_resample_halves_shape_keeps_mean():
    volume = np.random.default_rng(0).normal(3.0, 1.0, size=(32, 40, 48))

    data, voxel_size = fourier_resample(volume, (5.0, 5.0, 5.0), 10.0)

    assert data.shape == (16, 20, 24)
    assert voxel_size == (10.0, 10.0, 10.0)
    assert float(data.mean()) == pytest.approx(float(volume.mean()), rel=1e-6)


def test_resample_keeps_smooth_signal():
    z = np.arange(32)[:, None, None]
    volume = np.sin(2 * np.pi * z / 32) * np.ones((32, 16, 16))

    data, _ = fourier_resample(volume, (10.0, 10.0, 10.0), 5.0)

    expected = np.sin(2 * np.pi * np.arange(64) / 64)
    np.testing.assert_allclose(data[:, 3, 5], expected, atol=1e-5)


def test_mismatch_warns_for_learned_prior():
    prior = resolve_prior("phantom_dsm")

    assert voxel_size_mismatch(prior, (10.52, 10.52, 10.52)) is None
    assert "differs from the 10 A" in voxel_size_mismatch(prior, (5.0, 5.0, 5.0))


def test_hand_made_prior_never_warns():
    assert voxel_size_mismatch(resolve_prior("tv"), (1.0, 1.0, 1.0)) is None
