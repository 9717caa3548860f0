"""Training by denoising score matching, checkpoints, and the quality metrics."""

import json
import math

import numpy as np
import pytest
import torch

from napari_ebm.cli import main
from napari_ebm.metrics import fourier_shell_correlation, psnr, ssim
from napari_ebm.networks import ConvEnergy, ResidualConvEnergy, SquaredConvEnergy, TVConvEnergy
from napari_ebm.priors import TotalVariationPrior
from napari_ebm.prior_files import load_prior, resolve_prior
from napari_ebm.run import Reconstruction, RunConfig
from napari_ebm.errors import ParameterError
from napari_ebm.training import Trainer, TrainingConfig, cd_loss, check_drift, langevin_chains, learning_rate_at


def small_config(**overrides):
    values = dict(iterations=6, patch_size=12, batch_size=2, channels=4, depth=2, phantoms=2, phantom_size=20, seed=3)
    values.update(overrides)
    return TrainingConfig(**values)


def test_training_lowers_dsm_loss():
    trainer = Trainer(small_config(iterations=60, learning_rate=5e-3))

    losses = [snapshot.loss for snapshot in trainer.iterations()]

    assert len(losses) == 60
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def train_command(tmp_path, *options):
    return [
        "train", "--out", str(tmp_path / "prior.safetensors"), "--patch-size", "12", "--batch-size", "1",
        "--channels", "4", "--depth", "2", "--phantoms", "1", "--no-drift-check", "--quiet", "--overwrite", *options,
    ]


def test_resumed_loss_log_keeps_rows(tmp_path):
    log = tmp_path / "loss.csv"
    checkpoint = tmp_path / "checkpoint.safetensors"

    first = main(train_command(tmp_path, "--iterations", "3", "--checkpoint", str(checkpoint), "--checkpoint-every", "2", "--loss-log", str(log)))
    resumed = main(train_command(tmp_path, "--iterations", "4", "--resume", str(checkpoint), "--loss-log", str(log)))

    assert first == 0
    assert resumed == 0
    iterations = [line.split(",")[0] for line in log.read_text().splitlines()]
    assert iterations == ["iteration", "1", "2", "3", "4"]


def test_existing_loss_log_kept(tmp_path, capsys):
    log = tmp_path / "loss.csv"
    log.write_text("earlier results\n")

    code = main(["train", "--out", str(tmp_path / "prior.safetensors"), "--iterations", "1", "--loss-log", str(log), "--quiet"])

    assert code == 2
    assert f"--loss-log {log}: the file exists" in capsys.readouterr().err
    assert log.read_text() == "earlier results\n"


def test_bad_resume_files_rejected(tmp_path):
    from napari_ebm.errors import ParameterError

    checkpoint = tmp_path / "checkpoint.safetensors"
    trainer = Trainer(small_config(iterations=3))
    for _ in trainer.iterations():
        pass
    trainer.save_checkpoint(checkpoint)
    prior = trainer.save_prior(tmp_path / "prior.safetensors", "prior", "napari-ebm train")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")

    with pytest.raises(ParameterError, match="garbage.safetensors is not a valid checkpoint file"):
        Trainer(small_config(), checkpoint=garbage)
    with pytest.raises(ParameterError, match="prior.safetensors is not a training checkpoint"):
        Trainer(small_config(), checkpoint=prior)
    with pytest.raises(ParameterError, match="was written with channels 4, not 8"):
        Trainer(small_config(channels=8), checkpoint=checkpoint)
    with pytest.raises(ParameterError, match="was written with architecture 'tv_conv_energy', not 'conv_energy'"):
        Trainer(small_config(architecture="conv_energy"), checkpoint=checkpoint)
    with pytest.raises(ParameterError, match="is at iteration 3, beyond the 2 iterations requested"):
        Trainer(small_config(iterations=2), checkpoint=checkpoint)


def test_resume_matches_uninterrupted(tmp_path):
    uninterrupted = Trainer(small_config(iterations=6))
    for _ in uninterrupted.iterations():
        pass

    first = Trainer(small_config(iterations=3))
    for _ in first.iterations():
        pass
    first.save_checkpoint(tmp_path / "checkpoint.safetensors")
    resumed = Trainer(small_config(iterations=6), checkpoint=tmp_path / "checkpoint.safetensors")
    for _ in resumed.iterations():
        pass

    for key, value in uninterrupted.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[key], value)


def test_saved_prior_loads_with_metadata(tmp_path):
    trainer = Trainer(small_config())
    for _ in trainer.iterations():
        pass

    path = trainer.save_prior(tmp_path / "tiny.safetensors", "tiny", "napari-ebm train --out tiny.safetensors")
    prior = load_prior(path)

    assert prior.metadata["seed"] == 3
    assert prior.metadata["training_voxel_size"] == 10.0
    assert prior.metadata["command"] == "napari-ebm train --out tiny.safetensors"
    assert prior.lipschitz > 0


def test_train_command_writes_prior(tmp_path, capsys):
    out = tmp_path / "cli_prior.safetensors"
    log = tmp_path / "loss.csv"

    code = main([
        "train", "--out", str(out), "--iterations", "3", "--patch-size", "12", "--batch-size", "1",
        "--channels", "4", "--depth", "2", "--phantoms", "1", "--loss-log", str(log), "--recommended-weight", "0.5",
        "--recommended-temperature", "0.3", "--quiet",
    ])

    metadata = json.loads(out.with_suffix(".json").read_text())
    assert code == 0
    assert metadata["name"] == "cli_prior"
    assert metadata["recommended_weight"] == 0.5
    observed = np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float32)
    assert Reconstruction(observed, RunConfig(prior=str(out), noise_sigma=1.0, steps=1)).weight == 0.5
    assert metadata["recommended_temperature"] == 0.3
    assert Reconstruction(observed, RunConfig(method="langevin", prior=str(out), noise_sigma=1.0, steps=1)).temperature == 0.3
    assert metadata["command"].startswith("napari-ebm train --out")
    assert len(log.read_text().splitlines()) == 4
    assert "drift check on held-out phantom 0: MAP" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--recommended-weight", "-1"], "--recommended-weight -1: must be >= 0"),
        (["--recommended-temperature", "-0.5"], "--recommended-temperature -0.5: must be >= 0"),
        (["--quadratic", "-0.1"], "invalid quadratic weight -0.1: must be a finite number >= 0"),
        (["--batch-size", "0"], "invalid batch size 0: must be an integer >= 1"),
        (["--channels", "0"], "invalid number of channels 0: must be an integer >= 1"),
        (["--depth", "0"], "invalid depth 0: must be an integer >= 1"),
        (["--learning-rate", "-1"], "invalid learning rate -1.0: must be a number > 0"),
        (["--voxel-size", "0"], "invalid voxel size 0.0: must be a number > 0"),
        (["--checkpoint-every", "0"], "invalid --checkpoint-every 0: must be > 0"),
    ],
)
def test_negative_train_option_rejected(tmp_path, capsys, options, message):
    out = tmp_path / "prior.safetensors"

    code = main(["train", "--out", str(out), *options, "--iterations", "1", "--quiet"])

    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_train_command_keeps_existing_prior(tmp_path, capsys):
    out = tmp_path / "existing.safetensors"
    out.write_bytes(b"keep me")

    code = main(["train", "--out", str(out), "--iterations", "1", "--quiet"])

    assert code == 2
    assert out.read_bytes() == b"keep me"
    assert "--overwrite" in capsys.readouterr().err


def test_fsc_of_identical_volumes_is_one():
    volume = np.random.default_rng(0).normal(size=(16, 16, 16))

    _, fsc = fourier_shell_correlation(volume, volume)

    np.testing.assert_allclose(fsc, 1.0, atol=1e-9)


def test_fsc_of_independent_noise_is_small():
    rng = np.random.default_rng(0)

    _, fsc = fourier_shell_correlation(rng.normal(size=(32, 32, 32)), rng.normal(size=(32, 32, 32)))

    assert np.abs(fsc[4:]).max() < 0.2


def test_psnr_and_ssim_rank_estimates():
    rng = np.random.default_rng(0)
    truth = np.zeros((16, 16, 16))
    truth[4:12, 4:12, 4:12] = 1.0
    close = truth + 0.05 * rng.normal(size=truth.shape)
    far = truth + 0.5 * rng.normal(size=truth.shape)

    assert psnr(close, truth) > psnr(far, truth)
    assert ssim(close, truth) > ssim(far, truth)
    assert ssim(truth, truth) == pytest.approx(1.0)


def write_training_volumes(folder, voxel_sizes):
    """Write one 16^3 noise volume per voxel size (Angstrom, or None for no voxel size) to ``folder``."""
    import mrcfile

    folder.mkdir(exist_ok=True)
    for index, voxel_size in enumerate(voxel_sizes):
        with mrcfile.new(folder / f"volume{index}.mrc") as mrc:
            mrc.set_data(np.random.default_rng(index).normal(size=(16, 16, 16)).astype(np.float32))
            if voxel_size is not None:
                mrc.voxel_size = voxel_size


def test_training_reads_mrc_folder(tmp_path):
    write_training_volumes(tmp_path, [21.04, 21.04])

    trainer = Trainer(small_config(data_folder=str(tmp_path), iterations=2))
    losses = [snapshot.loss for snapshot in trainer.iterations()]
    path = trainer.save_prior(tmp_path / "data.safetensors", "data", "napari-ebm train --data")

    assert trainer.data_description == f"2 MRC volumes from {tmp_path} at 21.04 A"
    assert len(losses) == 2
    assert json.loads(path.with_suffix(".json").read_text())["training_voxel_size"] == pytest.approx(21.04)


def test_mixed_voxel_sizes_rejected(tmp_path):
    from napari_ebm.errors import ParameterError

    write_training_volumes(tmp_path, [10.52, 21.04])

    with pytest.raises(ParameterError, match=r"different voxel sizes, from 10.52 A \(volume0.mrc\) to 21.04 A \(volume1.mrc\)"):
        Trainer(small_config(data_folder=str(tmp_path)))


def test_missing_voxel_size_needs_fallback(tmp_path):
    from napari_ebm.errors import ParameterError

    write_training_volumes(tmp_path, [None, None])

    with pytest.raises(ParameterError, match=r"volume0.mrc has no valid voxel size .*train --voxel-size"):
        Trainer(small_config(data_folder=str(tmp_path)))
    trainer = Trainer(small_config(data_folder=str(tmp_path), voxel_size=14.0))
    assert trainer.voxel_size == 14.0


def test_train_command_records_data_voxel_size(tmp_path, capsys):
    write_training_volumes(tmp_path / "volumes", [21.04, 21.04])
    out = tmp_path / "data_prior.safetensors"

    code = main([
        "train", "--out", str(out), "--data", str(tmp_path / "volumes"), "--iterations", "1", "--patch-size", "12",
        "--batch-size", "1", "--channels", "4", "--depth", "2", "--no-drift-check", "--quiet",
    ])

    assert code == 0
    assert json.loads(out.with_suffix(".json").read_text())["training_voxel_size"] == 21.04
    assert "at 21.04 A, from iteration 0" in capsys.readouterr().out


def test_empty_data_folder_rejected(tmp_path):
    from napari_ebm.errors import ParameterError

    with pytest.raises(ParameterError, match="contains no .mrc volume"):
        Trainer(small_config(data_folder=str(tmp_path)))


class QuadraticEnergy(torch.nn.Module):
    """E(x) = a |x|^2 / 2 per volume; its Boltzmann density is Gaussian with variance 1 / a."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x):
        return 0.5 * self.a * (x * x).flatten(1).sum(1)


def test_cd_chains_sample_gaussian():
    start = torch.full((2, 16, 16, 16), 3.0)

    ends = langevin_chains(QuadraticEnergy(4.0), start, steps=400, step_size=0.05, generator=np.random.default_rng(0))

    # The unadjusted chain's stationary variance is 1 / (a (1 - a step / 4)), 0.2632 here.
    assert abs(float(ends.mean())) < 0.05
    assert float(ends.var()) == pytest.approx(1.0 / (4.0 * (1.0 - 4.0 * 0.05 / 4.0)), rel=0.05)


def test_cd_loss_is_the_energy_contrast():
    energy = QuadraticEnergy(1.0)
    clean = torch.zeros(1, 4, 4, 4)
    negative = torch.ones(1, 4, 4, 4)

    # Per voxel: data energy 0, chain energy 0.5, so the contrast is -0.5 and the penalty 0.1 * 0.25.
    assert float(cd_loss(energy, clean, negative)) == pytest.approx(-0.5 + 0.1 * 0.25)
    assert float(cd_loss(energy, clean, clean)) == pytest.approx(0.0)


def test_dsm_cd_resumes_and_records(tmp_path):
    config = small_config(iterations=4, objective="dsm+cd", cd_steps=3)
    uninterrupted = Trainer(config)
    for _ in uninterrupted.iterations():
        pass
    first = Trainer(small_config(iterations=2, objective="dsm+cd", cd_steps=3))
    for _ in first.iterations():
        pass
    first.save_checkpoint(tmp_path / "checkpoint.safetensors")
    resumed = Trainer(config, checkpoint=tmp_path / "checkpoint.safetensors")
    for _ in resumed.iterations():
        pass

    for key, value in uninterrupted.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[key], value)
    path = resumed.save_prior(tmp_path / "cd.safetensors", "cd", "napari-ebm train --objective dsm+cd")
    assert "contrastive divergence" in load_prior(path).metadata["objective"]


def test_cd_changes_training():
    dsm = Trainer(small_config(iterations=3))
    both = Trainer(small_config(iterations=3, objective="dsm+cd", cd_steps=2))

    dsm_losses = [snapshot.loss for snapshot in dsm.iterations()]
    both_losses = [snapshot.loss for snapshot in both.iterations()]

    assert dsm_losses[0] != both_losses[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"objective": "nce"}, "unknown training objective 'nce'"),
        ({"objective": "dsm+cd", "cd_steps": 0}, "CD chain length 0"),
        ({"objective": "dsm+cd", "cd_step_size": -1.0}, "CD step size -1.0"),
        ({"objective": "dsm+cd", "cd_weight": float("nan")}, "CD weight nan"),
    ],
)
def test_bad_objective_settings_rejected(overrides, message):
    with pytest.raises(ParameterError, match=message):
        Trainer(small_config(**overrides))


@pytest.mark.parametrize("scale", [10.0, -10.0])
def test_residual_energy_grows_at_large_values(scale):
    network = ResidualConvEnergy(channels=4, depth=2, bound=4.0)
    x = scale * torch.randn(1, 12, 12, 12, generator=torch.Generator().manual_seed(0)).abs()

    # |D(x)| < 4, so each voxel contributes at least (|x| - 4)^2 / 2.
    lower_bound = 0.5 * ((x.abs() - 4.0).clamp(min=0.0) ** 2).sum()

    assert float(network(x)) >= float(lower_bound)


def test_squared_energy_is_bounded_below():
    network = SquaredConvEnergy(channels=4, depth=2, quadratic=0.0)

    assert float(network.voxel_energies(torch.randn(2, 10, 10, 10)).min()) >= 0.0


def test_learned_prior_run_scales_by_signal(tmp_path):
    trainer = Trainer(small_config(iterations=2))
    for _ in trainer.iterations():
        pass
    path = trainer.save_prior(tmp_path / "tiny.safetensors", "tiny", "napari-ebm train")
    rng = np.random.default_rng(0)
    observed = (rng.normal(size=(16, 16, 16)) * 3.0).astype(np.float32)

    learned = Reconstruction(observed, RunConfig(prior=str(path), noise_sigma=2.0, steps=1, seed=0))
    hand_made = Reconstruction(observed, RunConfig(prior="tv", noise_sigma=2.0, steps=1, seed=0))

    assert learned.normalization == "signal"
    assert hand_made.normalization == "std"
    # The noise sigma in the input's units does not depend on the normalisation.
    assert learned.noise_sigma == pytest.approx(2.0)
    assert learned.scale < hand_made.scale


def test_tv_energy_adds_weighted_variation():
    network = TVConvEnergy(channels=4, depth=2, eps=0.1)
    plain = ConvEnergy(channels=4, depth=2)
    plain.load_state_dict({key: value for key, value in network.state_dict().items() if key != "log_tv_weight"})
    x = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(0))

    variation = TotalVariationPrior(eps=0.1)(x[0])
    expected = plain(x) + float(torch.exp(network.log_tv_weight)) * variation

    torch.testing.assert_close(network(x), expected)
    assert network.curvature_floor() == pytest.approx(0.5 * 12.0 / 0.1)


def test_residual_curvature_floor_is_inverse_tau_squared():
    network = ResidualConvEnergy(channels=4, depth=2)
    with torch.no_grad():
        network.log_tau.fill_(math.log(0.5))

    assert network.curvature_floor() == pytest.approx(4.0)
    assert ConvEnergy(channels=4, depth=2).curvature_floor() == 0.0


def receptive_radius(network, size=21):
    """Return how far from the centre voxel its energy depends on the input, in voxels along z."""
    x = torch.randn(1, size, size, size, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    centre = size // 2
    (gradient,) = torch.autograd.grad(network.voxel_energies(x)[0, centre, centre, centre], x)
    reached = gradient[0, :, centre, centre].abs() > 0
    return int(reached.nonzero().max()) - centre


def test_dilations_widen_receptive_field():
    assert receptive_radius(ConvEnergy(channels=2, depth=2)) == 2
    assert receptive_radius(ConvEnergy(channels=2, depth=2, dilations=[1, 3])) == 4
    assert ConvEnergy(channels=2, depth=2, dilations=[1, 3]).hyperparameters["dilations"] == [1, 3]


def test_dilated_prior_file_loads(tmp_path):
    trainer = Trainer(small_config(iterations=2, dilations=[2, 1]))
    for _ in trainer.iterations():
        pass

    prior = load_prior(trainer.save_prior(tmp_path / "dilated.safetensors", "dilated", "napari-ebm train"))

    assert prior.metadata["hyperparameters"]["dilations"] == [2, 1]
    x = torch.randn(12, 12, 12)
    torch.testing.assert_close(prior(x), trainer.network(x.unsqueeze(0))[0])


@pytest.mark.parametrize("dilations", [[1], [1, 0], [1, 1.5]])
def test_bad_dilations_rejected(dilations):
    with pytest.raises(ParameterError, match="invalid dilations .*2 integers >= 1"):
        Trainer(small_config(dilations=dilations))


def test_wrong_dilation_count_rejected(tmp_path, capsys):
    out = tmp_path / "prior.safetensors"

    code = main(["train", "--out", str(out), "--depth", "2", "--dilations", "1", "2", "4", "--iterations", "1", "--quiet"])

    assert code == 2
    assert "invalid dilations [1, 2, 4]: give 2 integers" in capsys.readouterr().err
    assert not out.exists()


def test_quadratic_weight_reaches_network():
    trainer = Trainer(small_config(quadratic=0.1))

    assert trainer.network.hyperparameters["quadratic"] == 0.1


def test_cosine_schedule_falls_to_zero():
    config = small_config(iterations=10, learning_rate=1e-3, schedule="cosine")

    rates = [learning_rate_at(config, iteration) for iteration in range(10)]

    assert rates[0] == pytest.approx(1e-3)
    assert rates[5] == pytest.approx(0.5e-3)
    assert all(later < earlier for earlier, later in zip(rates, rates[1:]))
    assert learning_rate_at(small_config(learning_rate=1e-3), 5) == 1e-3


def test_cosine_schedule_resumes_exactly(tmp_path):
    uninterrupted = Trainer(small_config(iterations=6, schedule="cosine"))
    for _ in uninterrupted.iterations():
        pass

    first = Trainer(small_config(iterations=6, schedule="cosine"))
    for snapshot in first.iterations():
        if snapshot.iteration == 3:
            break
    first.save_checkpoint(tmp_path / "checkpoint.safetensors")
    resumed = Trainer(small_config(iterations=6, schedule="cosine"), checkpoint=tmp_path / "checkpoint.safetensors")
    for _ in resumed.iterations():
        pass

    for key, value in uninterrupted.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[key], value)
    constant = Trainer(small_config(iterations=6))
    for _ in constant.iterations():
        pass
    assert not torch.equal(constant.network.body[0].weight, uninterrupted.network.body[0].weight)


def test_unknown_schedule_rejected():
    with pytest.raises(ParameterError, match="unknown learning rate schedule 'step'"):
        Trainer(small_config(schedule="step"))


def test_drift_check_flags_a_drifting_prior(tmp_path):
    trainer = Trainer(small_config(iterations=1, depth=1, channels=1, architecture="conv_energy"))
    # Per-voxel energy -5 * softplus(x): it keeps falling as x grows, so MAP runs away.
    with torch.no_grad():
        first, last = trainer.network.body[0], trainer.network.body[2]
        first.weight.zero_()
        first.weight[0, 0, 1, 1, 1] = 1.0
        first.bias.zero_()
        last.weight.fill_(-5.0)
        last.bias.zero_()
    path = trainer.save_prior(tmp_path / "drifting.safetensors", "drifting", "napari-ebm train")

    check = check_drift(path, voxel_size=10.0, weight=1.0, size=24, steps=30)

    assert check.drifted
    assert check.map_psnr < check.input_psnr


def test_drift_check_passes_shipped_prior():
    shipped = resolve_prior("phantom_dsm").metadata

    check = check_drift(shipped["file"], voxel_size=10.0, weight=shipped["recommended_weight"], size=32, steps=60)

    assert not check.drifted
    assert check.map_psnr > check.input_psnr + 1.0


def test_weight_average_is_saved(tmp_path):
    trainer = Trainer(small_config(iterations=4, ema=0.9))
    expected = [parameter.detach().clone() for parameter in trainer.network.parameters()]

    for snapshot in trainer.iterations():
        decay = min(0.9, snapshot.iteration / (9 + snapshot.iteration))
        for average, parameter in zip(expected, trainer.network.parameters()):
            average.mul_(decay).add_(parameter.detach(), alpha=1 - decay)
    path = trainer.save_prior(tmp_path / "averaged.safetensors", "averaged", "test")
    saved = load_prior(path).network.state_dict()

    names = [name for name, _ in trainer.network.named_parameters()]
    for average, name in zip(expected, names):
        torch.testing.assert_close(saved[name], average)
    # The energy's constant (the last bias) gets no gradient, so only the other weights move.
    assert not all(torch.equal(saved[name], parameter.detach()) for name, parameter in trainer.network.named_parameters())


def test_weight_average_resumes_exactly(tmp_path):
    uninterrupted = Trainer(small_config(iterations=6, ema=0.9))
    for _ in uninterrupted.iterations():
        pass

    first = Trainer(small_config(iterations=3, ema=0.9))
    for _ in first.iterations():
        pass
    first.save_checkpoint(tmp_path / "checkpoint.safetensors")
    resumed = Trainer(small_config(iterations=6, ema=0.9), checkpoint=tmp_path / "checkpoint.safetensors")
    for _ in resumed.iterations():
        pass

    for key, value in uninterrupted.average.state_dict().items():
        torch.testing.assert_close(resumed.average.state_dict()[key], value, rtol=0, atol=0)


def test_average_starts_from_plain_checkpoint(tmp_path):
    first = Trainer(small_config(iterations=2))
    for _ in first.iterations():
        pass
    first.save_checkpoint(tmp_path / "checkpoint.safetensors")

    resumed = Trainer(small_config(iterations=2, ema=0.9), checkpoint=tmp_path / "checkpoint.safetensors")

    for key, value in first.network.state_dict().items():
        torch.testing.assert_close(resumed.average.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_invalid_weight_average_rejected(tmp_path, capsys, decay):
    out = tmp_path / "prior.safetensors"

    code = main(["train", "--out", str(out), "--ema", str(decay), "--iterations", "1", "--quiet"])

    assert code == 2
    assert f"invalid weight average decay {decay!r}: must be >= 0 and < 1" in capsys.readouterr().err
    assert not out.exists()
