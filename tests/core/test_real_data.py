"""Reconstruction of the real microtubule tomogram shipped with the package."""

import numpy as np
import pytest

from napari_ebm.datasets import microtubule_path
from napari_ebm.io import read_volume
from napari_ebm.run import RunConfig, reconstruct


@pytest.fixture(scope="module")
def tomogram():
    return read_volume(microtubule_path())


@pytest.fixture(scope="module")
def tv_map(tomogram):
    config = RunConfig(method="map", operator="wedge", prior="tv", weight=1.0, steps=40, seed=0)
    return reconstruct(tomogram.data, config)


def test_tv_map_lowers_energy(tomogram, tv_map):
    last, trace = tv_map

    energies = [row[1] for row in trace]
    assert last.done
    assert energies[-1] < 0.8 * energies[0]
    assert last.volume.shape == tomogram.data.shape
    assert np.isfinite(last.volume).all()


def test_tv_map_reduces_noise(tomogram, tv_map):
    # The MAP estimate keeps the data's mean but is smoother: neighbouring voxels differ less
    # than in the input.
    last, _ = tv_map

    data = np.asarray(tomogram.data, dtype=np.float32)
    roughness_in = np.abs(np.diff(data, axis=2)).mean()
    roughness_out = np.abs(np.diff(last.volume, axis=2)).mean()
    assert roughness_out < 0.7 * roughness_in
    assert abs(float(last.volume.mean()) - float(data.mean())) < 0.1 * float(data.std())


def test_langevin_on_tomogram_gives_std_map(tomogram):
    config = RunConfig(method="langevin", operator="wedge", prior="tv", steps=20, burn_in=5, seed=0)

    last, _ = reconstruct(tomogram.data, config)

    assert last.samples == 15
    assert last.std.shape == tomogram.data.shape
    assert float(last.std.mean()) > 0.0


def test_shipped_prior_map_lowers_energy(tomogram):
    # A 36 x 64 x 64 crop keeps the test fast; the network costs far more per voxel than tv.
    crop = np.asarray(tomogram.data[:, :64, :64])
    config = RunConfig(method="map", operator="wedge", prior="phantom_dsm", steps=5, seed=0)

    last, trace = reconstruct(crop, config)

    assert trace[-1][1] < trace[0][1]
    assert np.isfinite(last.volume).all()
