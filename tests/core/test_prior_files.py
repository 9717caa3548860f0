"""Prior files: safetensors weights with JSON metadata, loaded without unpickling."""

import json
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_ebm.networks import ConvEnergy, LearnedPrior
from napari_ebm.prior_files import (
    PriorFileError,
    list_available_priors,
    load_prior,
    resolve_prior,
    save_prior,
)
from napari_ebm.run import Reconstruction, RunConfig
from napari_ebm.training import Trainer, TrainingConfig


def metadata(**overrides):
    values = {
        "name": "test_prior",
        "description": "a small untrained network for tests",
        "version": "0.0.1",
        "architecture": "conv_energy",
        "hyperparameters": {"channels": 4, "depth": 2, "quadratic": 0.01},
        "training_voxel_size": 10.0,
        "normalization": "mean 0, standard deviation 1 per volume",
        "noise_levels": [0.1, 0.2],
        "objective": "denoising score matching",
        "data": "none: random weights",
        "command": "python -c 'not trained'",
        "seed": 0,
        "recommended_weight": 0.5,
        "recommended_temperature": 1.0,
        "lipschitz_estimate": 20.0,
    }
    values.update(overrides)
    return values


@pytest.fixture
def prior_path(tmp_path):
    torch.manual_seed(0)
    network = ConvEnergy(channels=4, depth=2, quadratic=0.01)
    return save_prior(tmp_path / "test_prior.safetensors", network, metadata())


class TouchOnUnpickle:
    """An object whose unpickling creates a marker file, to detect code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_round_trip_same_energy(prior_path):
    volume = torch.randn(12, 12, 12, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    original = ConvEnergy(channels=4, depth=2, quadratic=0.01)

    loaded = load_prior(prior_path)

    assert isinstance(loaded, LearnedPrior)
    assert float(loaded(volume)) == pytest.approx(float(original(volume.unsqueeze(0))[0]), rel=1e-6)


def test_energy_differentiable_in_volume(prior_path):
    prior = load_prior(prior_path)
    volume = torch.randn(10, 10, 10, requires_grad=True)

    (gradient,) = torch.autograd.grad(prior(volume), volume)

    assert gradient.shape == volume.shape
    assert float(gradient.abs().sum()) > 0.0


@pytest.mark.parametrize("with_metadata", [True, False])
def test_pickle_renamed_is_rejected_unexecuted(tmp_path, with_metadata):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(TouchOnUnpickle(marker)))
    if with_metadata:
        path.with_suffix(".json").write_text(json.dumps(metadata(name="evil")))

    with pytest.raises(PriorFileError, match="not a valid safetensors file"):
        load_prior(path)

    assert not marker.exists()


def test_torch_save_renamed_is_rejected(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    torch.save(ConvEnergy(channels=4, depth=2).state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(metadata(name="checkpoint")))

    with pytest.raises(PriorFileError, match="checkpoint.safetensors"):
        load_prior(path)


@pytest.mark.parametrize(
    "overrides, phrase",
    [
        (dict(training_voxel_size=0), "'training_voxel_size' is invalid"),
        (dict(architecture="transformer"), "'architecture' is invalid"),
        (dict(noise_levels=[]), "'noise_levels' is invalid"),
        (dict(seed=-1), "'seed' is invalid"),
    ],
)
def test_invalid_metadata_rejected(prior_path, overrides, phrase):
    prior_path.with_suffix(".json").write_text(json.dumps(metadata(**overrides)))

    with pytest.raises(PriorFileError, match=phrase):
        load_prior(prior_path)


def test_missing_metadata_field_named(prior_path):
    values = metadata()
    del values["recommended_weight"]
    prior_path.with_suffix(".json").write_text(json.dumps(values))

    with pytest.raises(PriorFileError, match="'recommended_weight' is missing"):
        load_prior(prior_path)


def test_missing_metadata_file_named(prior_path):
    prior_path.with_suffix(".json").unlink()

    with pytest.raises(PriorFileError, match="test_prior.json: metadata file not found"):
        load_prior(prior_path)


def test_weights_not_fitting_rejected(prior_path):
    prior_path.with_suffix(".json").write_text(json.dumps(metadata(hyperparameters={"channels": 8, "depth": 2})))

    with pytest.raises(PriorFileError, match=r"do not fit the architecture in the metadata \(size mismatch for body\.0\.weight"):
        load_prior(prior_path)


def test_path_prior_runs_map(prior_path):
    volume = np.random.default_rng(0).normal(size=(12, 14, 16)).astype(np.float32)
    config = RunConfig(method="map", prior=str(prior_path), steps=5, seed=0)

    reconstruction = Reconstruction(volume, config)
    snapshots = list(reconstruction.snapshots())

    assert reconstruction.weight == 0.5
    assert snapshots[-1].volume.shape == volume.shape


def test_explicit_weight_overrides_recommended(prior_path):
    volume = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)

    reconstruction = Reconstruction(volume, RunConfig(prior=str(prior_path), weight=2.0, steps=1))

    assert reconstruction.weight == 2.0


def test_recommended_temperature_reaches_langevin(tmp_path):
    torch.manual_seed(0)
    path = save_prior(tmp_path / "cold.safetensors", ConvEnergy(channels=4, depth=2), metadata(recommended_temperature=0.25))
    volume = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    common = dict(method="langevin", prior=str(path), noise_sigma=1.0, steps=4, seed=3, threads=1)

    unset = Reconstruction(volume, RunConfig(**common))
    unset_last = list(unset.snapshots())[-1]
    given_last = list(Reconstruction(volume, RunConfig(temperature=0.25, **common)).snapshots())[-1]
    hot = Reconstruction(volume, RunConfig(temperature=2.0, **common))

    assert unset.temperature == 0.25
    assert unset.parameters()["temperature_used"] == 0.25
    assert unset_last.temperature == 0.25
    np.testing.assert_array_equal(unset_last.volume, given_last.volume)
    assert hot.temperature == 2.0
    assert Reconstruction(volume, RunConfig(method="langevin", prior="tv", noise_sigma=1.0, steps=1)).temperature == 1.0


def test_user_folder_prior_listed(tmp_path, monkeypatch):
    monkeypatch.setattr("napari_ebm.prior_files.prior_folders", lambda: [tmp_path / "priors"])
    (tmp_path / "priors").mkdir()
    save_prior(tmp_path / "priors" / "membranes.safetensors", ConvEnergy(channels=4, depth=2), metadata(name="membranes"))

    rows = {name: (description, voxel_size) for name, description, voxel_size in list_available_priors()}

    assert rows["membranes"] == ("a small untrained network for tests", 10.0)
    assert rows["tv"][1] is None
    assert isinstance(resolve_prior("membranes"), LearnedPrior)


def test_saved_prior_has_ordinary_permissions(tmp_path):
    trainer = Trainer(TrainingConfig(iterations=1, patch_size=8, batch_size=1, channels=2, depth=1, phantoms=1, phantom_size=16))
    previous = os.umask(0o022)
    try:
        path = trainer.save_prior(tmp_path / "shared.safetensors", "shared", "napari-ebm train")
        trainer.save_checkpoint(tmp_path / "checkpoint.safetensors")
    finally:
        os.umask(previous)

    for written in (path, path.with_suffix(".json"), tmp_path / "checkpoint.safetensors"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o644, written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors", "shared.json", "shared.safetensors"]
    assert load_prior(path).metadata["name"] == "shared"
