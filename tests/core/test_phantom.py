"""The phantom generator used for sample data, training and the quality benchmark."""

import numpy as np
import pytest

from napari_ebm.phantom import (
    DENSITY_MAPS,
    MICROTUBULE_INNER_RADIUS,
    MICROTUBULE_OUTER_RADIUS,
    _density_map,
    _line_distances,
    _place_map,
    _soft_step,
    make_phantom,
    observe,
)


def test_phantom_is_reproducible():
    first = make_phantom((32, 32, 32), seed=4)
    second = make_phantom((32, 32, 32), seed=4)

    np.testing.assert_array_equal(first, second)


def test_seeds_give_different_phantoms():
    assert not np.array_equal(make_phantom((32, 32, 32), seed=1), make_phantom((32, 32, 32), seed=2))


def test_small_shape_rejected():
    with pytest.raises(ValueError, match="every side >= 16"):
        make_phantom((8, 32, 32))


def test_observation_lacks_wedge():
    truth = make_phantom((32, 32, 32), seed=0)
    observed = observe(truth, (-60.0, 60.0), noise_sigma=0.0)

    spectrum = np.abs(np.fft.rfftn(observed))
    truth_spectrum = np.abs(np.fft.rfftn(truth))
    # A frequency along kz alone (angle 90 degrees) is outside the -60..60 range. One along kx
    # alone (angle 0) is inside, so without noise it is kept unchanged. float32 round-off leaves
    # about 1e-7 of the largest coefficient at removed frequencies.
    assert spectrum[5, 0, 0] < 1e-5 * spectrum.max()
    assert truth_spectrum[5, 0, 0] > 1e-4 * spectrum.max()
    assert spectrum[0, 0, 5] == pytest.approx(truth_spectrum[0, 0, 5], rel=1e-3)


def test_crowding_fills_more_of_the_volume():
    sparse = make_phantom((48, 48, 48), seed=5, crowding=0.0)
    crowded = make_phantom((48, 48, 48), seed=5, crowding=0.3)

    assert (crowded > 0.5).mean() > (sparse > 0.5).mean() + 0.1


@pytest.mark.parametrize("crowding", [-0.1, 0.8, float("nan")])
def test_bad_crowding_rejected(crowding):
    with pytest.raises(ValueError, match="crowding must be a volume fraction"):
        make_phantom((32, 32, 32), crowding=crowding)


@pytest.mark.parametrize("name", DENSITY_MAPS)
def test_rotated_map_keeps_mass(name):
    density, map_voxel_size = _density_map(name)
    rng = np.random.default_rng(0)
    placed = []
    for _ in range(2):
        volume = np.zeros((48, 48, 48), dtype=np.float32)
        _place_map(volume, name, (24, 24, 24), 8.0, rng)
        placed.append(volume)

    # Resampled from map_voxel_size to 8 A, the summed density scales with the voxel volume.
    expected = density.sum() * (map_voxel_size / 8.0) ** 3
    for volume in placed:
        assert volume.sum() == pytest.approx(expected, rel=0.05)
    assert not np.allclose(placed[0], placed[1], atol=0.05)


def test_microtubule_wall_is_hollow():
    for voxel_size in (5.0, 10.0):
        across = _line_distances((48, 48, 48), np.array([24.0, 24.0, 24.0]), np.array([0.0, 0.0, 1.0]))
        phantom_slice = make_phantom((48, 48, 48), voxel_size=voxel_size, seed=3, crowding=0.0)
        assert phantom_slice.shape == (48, 48, 48)
        # The wall lies between the inner and outer radius, the lumen is empty.
        wall = (across > MICROTUBULE_INNER_RADIUS / voxel_size + 1) & (across < MICROTUBULE_OUTER_RADIUS / voxel_size - 1)
        lumen = across < MICROTUBULE_INNER_RADIUS / voxel_size - 2
        tube = _soft_step(across - MICROTUBULE_OUTER_RADIUS / voxel_size) - _soft_step(across - MICROTUBULE_INNER_RADIUS / voxel_size)
        assert tube[wall].min() > 0.9
        assert tube[lumen].max() < 0.05
