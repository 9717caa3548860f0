"""The phantom generator used for sample data, training and the quality benchmark."""

import numpy as np
import pytest

from napari_ebm.phantom import make_phantom, observe


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
    # A frequency along kz alone (angle 90 degrees) is outside the -60..60 range.
    # float32 round-off leaves about 1e-7 of the largest coefficient at removed frequencies.
    assert spectrum[5, 0, 0] < 1e-5 * spectrum.max()
    assert spectrum[0, 0, 5] > 1e-3 * spectrum.max()
