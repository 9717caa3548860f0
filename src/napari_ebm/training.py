"""Training of energy priors by denoising score matching (DSM), optionally with contrastive divergence.

For a clean patch x, a noise level s and standard normal n, the conditional score of the noisy
patch x + s n is -n / s. DSM fits -grad E(x + s n) to it by minimising the mean over voxels of
|s grad E(x + s n) - n|^2 / 2, averaged over the noise levels (Vincent, 2011, "A connection
between score matching and denoising autoencoders").

The objective "dsm+cd" adds contrastive divergence (Hinton, 2002) with short Langevin chains
started at the data: the mean per-voxel energy of the data minus that of the chains' end points,
which lowers the energy of real patches and raises it where the sampler drifts, plus the squared
energies as a regulariser (Du and Mordatch, 2019, "Implicit generation and modeling with
energy-based models"). DSM shapes the score at the noise levels; CD shapes the energy near the
clean data, where MAP ends and where Langevin samples at temperature 1.

Training yields one :class:`TrainingSnapshot` per iteration, like a reconstruction run, and
saves resumable checkpoints as safetensors files.
"""

import copy
import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from . import __version__
from .errors import MissingVoxelSizeWarning, ParameterError, RunError
from .io import read_volume
from .metrics import psnr
from .networks import ARCHITECTURES
from .phantom import make_phantom, observe
from .prior_files import save_prior
from .run import RunConfig, intra_op_threads, reconstruct
from .sidecar import write_bytes_atomically

logger = logging.getLogger(__name__)

# Training objectives, with the text recorded in a prior's metadata.
OBJECTIVES = {
    "dsm": "denoising score matching over the noise levels (Vincent 2011)",
    "dsm+cd": (
        "denoising score matching over the noise levels (Vincent 2011) plus contrastive divergence "
        "with short Langevin chains started at the data (Hinton 2002; Du and Mordatch 2019)"
    ),
}

# Phantom seeds from this value on are used for training; smaller seeds are kept for evaluation,
# so a held-out phantom is never seen in training.
TRAINING_SEED_OFFSET = 1000


@dataclass
class TrainingConfig:
    """Parameters of a training run.

    Attributes
    ----------
    iterations : int
        Optimiser steps, > 0.
    patch_size : int
        Side of the cubic training patches in voxels, >= 8.
    batch_size : int
        Patches per iteration, >= 1.
    noise_levels : list of float
        DSM noise standard deviations, in normalised units (the clean volumes have std 1).
    learning_rate : float
        Adam learning rate, > 0.
    schedule : str
        "constant" keeps the learning rate; "cosine" lowers it along half a cosine from
        ``learning_rate`` at the first iteration to 0 after the last one.
    architecture : str
        A registered network architecture: "tv_conv_energy", "conv_energy",
        "squared_conv_energy" or "residual_conv_energy" (see :mod:`napari_ebm.networks`).
    channels, depth : int
        Network size (see :class:`napari_ebm.networks.ConvEnergy`).
    dilations : list of int or None
        Dilation of each hidden layer, ``depth`` integers >= 1; None means all 1.
    quadratic : float
        Weight A >= 0 of the term A * ||x||^2 / 2 of the energy, in normalised units.
    phantoms : int
        Number of phantom volumes made when no data folder is given.
    phantom_size : int
        Side of each phantom volume in voxels.
    voxel_size : float or None
        Voxel size in Angstrom of the phantoms (None: :data:`PHANTOM_VOXEL_SIZE`), and of the
        data volumes whose header has none (None: such a volume is rejected). The voxel size of
        the training volumes is recorded as the prior's training voxel size.
    data_folder : str or None
        Folder of MRC volumes to train on instead of phantoms.
    seed : int
        Seed of the network initialisation, the patch sampling and the noise.
    objective : str
        "dsm" (denoising score matching) or "dsm+cd" (DSM plus contrastive divergence).
    cd_weight : float
        Weight of the contrastive divergence loss in "dsm+cd", > 0.
    cd_steps : int
        Langevin steps of each contrastive divergence chain, >= 1.
    cd_step_size : float
        Langevin step size of the chains in normalised units, > 0.
    threads : int or None
        Torch CPU threads of each iteration, >= 1; None keeps torch's setting. The count changes
        the order of floating-point sums, so the same seed gives identical weights only with
        the same count.
    ema : float
        Decay d of an exponential moving average of the weights, 0 <= d < 1; 0 saves the last
        weights. With d > 0 the saved prior contains the average, updated after iteration t (from 0) with
        the decay min(d, (1 + t) / (10 + t)), so the random initial weights fade out early.
    """

    iterations: int = 300
    patch_size: int = 24
    batch_size: int = 4
    noise_levels: list = field(default_factory=lambda: [0.3, 0.5, 0.8])
    learning_rate: float = 2e-3
    schedule: str = "constant"
    architecture: str = "tv_conv_energy"
    channels: int = 8
    depth: int = 3
    dilations: list | None = None
    quadratic: float = 0.01
    phantoms: int = 6
    phantom_size: int = 48
    voxel_size: float | None = None
    data_folder: str | None = None
    seed: int = 0
    objective: str = "dsm"
    cd_weight: float = 1.0
    cd_steps: int = 10
    cd_step_size: float = 0.01
    threads: int | None = None
    ema: float = 0.0


@dataclass
class TrainingSnapshot:
    """The state of training after one iteration."""

    iteration: int
    iterations: int
    loss: float
    noise_level: float


# Settings of the shipped prior phantom_dsm, apart from its seed and objective. The "Train prior"
# widget trains with them, and README.md gives the full training command.
SHIPPED_SETTINGS = {
    "architecture": "tv_conv_energy",
    "channels": 16,
    "depth": 4,
    "dilations": [1, 2, 4, 1],
    "noise_levels": [0.2, 0.35, 0.5, 0.7],
    "phantoms": 8,
    "schedule": "cosine",
    "iterations": 2400,
}

# The prior weight recorded in the shipped prior, chosen by MAP PSNR on the validation phantom of
# benchmarks/bench_quality.py.
SHIPPED_RECOMMENDED_WEIGHT = 0.5

# Learning rate schedules.
SCHEDULES = ("constant", "cosine")

# Voxel size of the training phantoms in Angstrom when none is given.
PHANTOM_VOXEL_SIZE = 10.0

# Largest relative spread of the voxel sizes of the training volumes. A prior learns shapes at
# one scale, so a folder that mixes scales is rejected.
VOXEL_SIZE_SPREAD = 0.05

# Checkpoint settings that must match the resumed run, because they define the network.
NETWORK_SETTINGS = ("architecture", "channels", "depth", "dilations", "quadratic")


def learning_rate_at(config, iteration):
    """Return the learning rate of the 0-based ``iteration`` under ``config.schedule``.

    The rate depends on the iteration only, so a resumed run follows the same schedule.
    """
    if config.schedule == "cosine":
        return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * iteration / config.iterations))
    return config.learning_rate


def _normalise(volume):
    volume = np.asarray(volume, dtype=np.float32)
    return (volume - volume.mean()) / max(float(volume.std()), 1e-6)


def training_volumes(config):
    """Return the clean training volumes (normalised to mean 0, std 1), a description and the voxel size.

    Returns
    -------
    volumes : list of numpy.ndarray
    description : str
    voxel_size : float
        Voxel size of the volumes in Angstrom: the phantoms' voxel size, or the mean of the data
        volumes' voxel sizes.

    Raises
    ------
    ParameterError
        If the data folder does not exist or contains no MRC volume larger than a patch. Also
        if a volume has no valid voxel size and ``config.voxel_size`` is None, or if the voxel
        sizes of the volumes differ by more than :data:`VOXEL_SIZE_SPREAD`.
    """
    if config.data_folder is None:
        voxel_size = config.voxel_size or PHANTOM_VOXEL_SIZE
        volumes = [
            _normalise(make_phantom((config.phantom_size,) * 3, voxel_size, seed=TRAINING_SEED_OFFSET + index))
            for index in range(config.phantoms)
        ]
        description = (
            f"{config.phantoms} synthetic phantoms of {config.phantom_size}^3 voxels at {voxel_size:g} A "
            f"(napari_ebm.phantom, seeds {TRAINING_SEED_OFFSET} to {TRAINING_SEED_OFFSET + config.phantoms - 1})"
        )
        return volumes, description, voxel_size

    folder = Path(config.data_folder)
    if not folder.is_dir():
        raise ParameterError(f"training data folder {folder} not found")
    volumes = []
    sizes = {}
    for path in sorted(folder.glob("*.mrc")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MissingVoxelSizeWarning)
            volume = read_volume(path, fallback_voxel_size=config.voxel_size or 1.0)
        if any(issubclass(warning.category, MissingVoxelSizeWarning) for warning in caught):
            if config.voxel_size is None:
                raise ParameterError(
                    f"{path} has no valid voxel size in its header; set it there (for example with mrcfile) "
                    "or give the voxel size of such volumes (train --voxel-size)"
                )
            logger.info("%s has no valid voxel size, so %g A is used", path, config.voxel_size)
        if min(volume.data.shape) >= config.patch_size:
            volumes.append(_normalise(volume.data))
            sizes[path] = volume.voxel_size
    if not volumes:
        raise ParameterError(f"{folder} contains no .mrc volume with every side >= {config.patch_size} voxels")

    smallest = min(sizes, key=lambda path: min(sizes[path]))
    largest = max(sizes, key=lambda path: max(sizes[path]))
    if max(sizes[largest]) > (1 + VOXEL_SIZE_SPREAD) * min(sizes[smallest]):
        raise ParameterError(
            f"the training volumes in {folder} have different voxel sizes, from {min(sizes[smallest]):g} A "
            f"({smallest.name}) to {max(sizes[largest]):g} A ({largest.name}); a prior is trained at one voxel "
            "size, so resample the volumes to one size or train on one group at a time"
        )
    # MRC headers store float32, so the mean is rounded to 0.0001 A: 21.04, not 21.039999999999996.
    voxel_size = round(float(np.mean([size for path in sizes for size in sizes[path]])), 4)
    return volumes, f"{len(volumes)} MRC volumes from {folder} at {voxel_size:.4g} A", voxel_size


def _sample_batch(volumes, config, generator):
    patches = []
    size = config.patch_size
    for _ in range(config.batch_size):
        volume = volumes[int(generator.integers(len(volumes)))]
        corner = [int(generator.integers(0, n - size + 1)) for n in volume.shape]
        patch = volume[corner[0] : corner[0] + size, corner[1] : corner[1] + size, corner[2] : corner[2] + size]
        for axis in range(3):
            if generator.random() < 0.5:
                patch = np.flip(patch, axis=axis)
        patches.append(np.ascontiguousarray(patch))
    return torch.from_numpy(np.stack(patches))


def dsm_loss(network, clean, noise_level, noise):
    """Return the denoising score matching loss of ``network`` on a batch of clean patches."""
    noisy = (clean + noise_level * noise).requires_grad_(True)
    energy = network(noisy).sum()
    (gradient,) = torch.autograd.grad(energy, noisy, create_graph=True)
    return 0.5 * ((noise_level * gradient - noise) ** 2).mean()


def langevin_chains(network, start, steps, step_size, generator):
    """Run short Langevin chains on the energy ``network`` from ``start`` and return their ends.

    Each step is x <- x - step_size / 2 * grad E(x) + sqrt(step_size) * n, with n drawn from the
    numpy ``generator``. The result is detached: no gradient flows through the chains.
    """
    x = start.detach().clone()
    for _ in range(steps):
        x.requires_grad_(True)
        (gradient,) = torch.autograd.grad(network(x).sum(), x)
        noise = torch.from_numpy(generator.standard_normal(x.shape).astype(np.float32))
        x = (x.detach() - 0.5 * step_size * gradient + math.sqrt(step_size) * noise).detach()
    return x


def cd_loss(network, clean, negative, regularisation=0.1):
    """Return the contrastive divergence loss: data energy minus chain energy, per voxel.

    Parameters
    ----------
    network : nn.Module
        Energy network; returns one energy per volume of a batch.
    clean, negative : torch.Tensor
        Batches of data patches and of chain end points, both (batch, z, y, x).
    regularisation : float
        Weight of the squared per-voxel energies, which keeps both energies near 0.
    """
    voxels = clean[0].numel()
    positive_energy = network(clean) / voxels
    negative_energy = network(negative) / voxels
    contrast = positive_energy.mean() - negative_energy.mean()
    return contrast + regularisation * (positive_energy**2 + negative_energy**2).mean()


def estimate_lipschitz(network, volumes, config, iterations=10):
    """Estimate the Lipschitz constant of grad E by power iteration on a training patch.

    The result is the largest Hessian eigenvalue found at one patch, times 2 as a margin; it
    is an estimate, not a bound.
    """
    patch = _sample_batch(volumes, config, np.random.default_rng(config.seed))[0]
    vector = torch.randn(patch.shape, generator=torch.Generator().manual_seed(config.seed))
    eigenvalue = 1.0
    for _ in range(iterations):
        vector = vector / vector.norm()
        point = patch.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(network(point.unsqueeze(0)).sum(), point, create_graph=True)
        (product,) = torch.autograd.grad((gradient * vector).sum(), point)
        eigenvalue = float((product * vector).sum())
        vector = product.detach()
    # Some architectures have a known curvature that one patch may not show, such as the total
    # variation term or a saturated residual energy.
    return 2.0 * max(abs(eigenvalue), config.quadratic, network.curvature_floor(), 1e-3)


class Trainer:
    """A prepared training run; :meth:`iterations` trains and yields snapshots.

    Parameters
    ----------
    config : TrainingConfig
    checkpoint : str or Path, optional
        A checkpoint written by :meth:`save_checkpoint` to resume from.
    """

    def __init__(self, config, checkpoint=None):
        if not (isinstance(config.iterations, int) and config.iterations > 0):
            raise ParameterError(f"invalid number of iterations {config.iterations!r}: must be an integer > 0")
        if not (isinstance(config.patch_size, int) and config.patch_size >= 8):
            raise ParameterError(f"invalid patch size {config.patch_size!r}: must be an integer >= 8")
        for label, value in (
            ("batch size", config.batch_size), ("number of channels", config.channels),
            ("depth", config.depth), ("number of phantoms", config.phantoms),
        ):
            if not (isinstance(value, int) and value >= 1):
                raise ParameterError(f"invalid {label} {value!r}: must be an integer >= 1")
        if not (isinstance(config.learning_rate, (int, float)) and math.isfinite(config.learning_rate) and config.learning_rate > 0):
            raise ParameterError(f"invalid learning rate {config.learning_rate!r}: must be a number > 0")
        if config.voxel_size is not None and not (
            isinstance(config.voxel_size, (int, float)) and math.isfinite(config.voxel_size) and config.voxel_size > 0
        ):
            raise ParameterError(f"invalid voxel size {config.voxel_size!r}: must be a number > 0 (Angstrom)")
        if not config.noise_levels or not all(s > 0 for s in config.noise_levels):
            raise ParameterError(f"invalid noise levels {config.noise_levels!r}: give numbers > 0")
        if not (isinstance(config.quadratic, (int, float)) and math.isfinite(config.quadratic) and config.quadratic >= 0):
            raise ParameterError(f"invalid quadratic weight {config.quadratic!r}: must be a finite number >= 0")
        if config.architecture not in ARCHITECTURES:
            raise ParameterError(f"unknown architecture {config.architecture!r}: choose one of {', '.join(sorted(ARCHITECTURES))}")
        if config.schedule not in SCHEDULES:
            raise ParameterError(f"unknown learning rate schedule {config.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if config.dilations is not None and not (
            len(config.dilations) == config.depth and all(isinstance(d, int) and d >= 1 for d in config.dilations)
        ):
            raise ParameterError(
                f"invalid dilations {config.dilations!r}: give {config.depth} integers >= 1, one per hidden layer"
            )
        if config.threads is not None and not (isinstance(config.threads, int) and config.threads >= 1):
            raise ParameterError(f"invalid number of threads {config.threads!r}: must be an integer >= 1")
        if not (isinstance(config.ema, (int, float)) and 0 <= config.ema < 1):
            raise ParameterError(f"invalid weight average decay {config.ema!r}: must be >= 0 and < 1")
        if config.objective not in OBJECTIVES:
            raise ParameterError(f"unknown training objective {config.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if config.objective == "dsm+cd":
            if not (isinstance(config.cd_steps, int) and config.cd_steps >= 1):
                raise ParameterError(f"invalid CD chain length {config.cd_steps!r}: must be an integer >= 1")
            for label, value in (("CD weight", config.cd_weight), ("CD step size", config.cd_step_size)):
                if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                    raise ParameterError(f"invalid {label} {value!r}: must be a number > 0")

        self.config = config
        self.volumes, self.data_description, self.voxel_size = training_volumes(config)
        # The initial weights are drawn from torch's global generator, seeded on a fork of it,
        # so the same seed gives the same network and the caller's random state is unchanged.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.network = ARCHITECTURES[config.architecture](
                channels=config.channels, depth=config.depth, quadratic=config.quadratic, dilations=config.dilations
            )
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=config.learning_rate)
        self.average = copy.deepcopy(self.network) if config.ema > 0 else None
        self.iteration = 0
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)

    def iterations(self):
        """Train until ``config.iterations`` and yield one :class:`TrainingSnapshot` per iteration."""
        config = self.config
        while self.iteration < config.iterations:
            # Every iteration draws from its own seeded generators, so a resumed run continues
            # exactly as the uninterrupted one would.
            generator = np.random.default_rng([config.seed, self.iteration])
            clean = _sample_batch(self.volumes, config, generator)
            noise_level = float(config.noise_levels[self.iteration % len(config.noise_levels)])
            noise = torch.from_numpy(generator.standard_normal(clean.shape).astype(np.float32))

            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate_at(config, self.iteration)
            with intra_op_threads(config.threads or torch.get_num_threads()):
                self.optimizer.zero_grad()
                loss = dsm_loss(self.network, clean, noise_level, noise)
                if config.objective == "dsm+cd":
                    negative = langevin_chains(self.network, clean, config.cd_steps, config.cd_step_size, generator)
                    loss = loss + config.cd_weight * cd_loss(self.network, clean, negative)
                if not math.isfinite(loss.item()):
                    raise ParameterError(
                        f"the training loss became non-finite at iteration {self.iteration + 1}; lower the learning rate"
                    )
                loss.backward()
                self.optimizer.step()
                if self.average is not None:
                    self._update_average()
            self.iteration += 1
            yield TrainingSnapshot(self.iteration, config.iterations, loss.item(), noise_level)

    def _update_average(self):
        """Move the averaged weights towards the current ones by the decay of this iteration."""
        decay = min(self.config.ema, (1 + self.iteration) / (10 + self.iteration))
        with torch.no_grad():
            for average, current in zip(self.average.parameters(), self.network.parameters()):
                average.mul_(decay).add_(current.detach(), alpha=1 - decay)

    def trained_network(self):
        """Return the network that :meth:`save_prior` writes: the weight average, or the last weights."""
        return self.average if self.average is not None else self.network

    def save_checkpoint(self, path):
        """Write the network, the optimiser state and the iteration to ``path`` (.safetensors).

        The file is replaced atomically, so an interrupted write leaves the previous checkpoint.

        Raises
        ------
        VolumeWriteError
            If the file cannot be written.
        """
        tensors = {f"network.{key}": value.detach().contiguous() for key, value in self.network.state_dict().items()}
        if self.average is not None:
            tensors.update({f"average.{key}": value.detach().contiguous() for key, value in self.average.state_dict().items()})
        state = self.optimizer.state_dict()
        for index, values in state["state"].items():
            for key, value in values.items():
                tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().contiguous().reshape(-1) if key == "step" else value.detach().contiguous()
        metadata = {"iteration": str(self.iteration), "config": json.dumps(asdict(self.config))}
        write_bytes_atomically(path, save(tensors, metadata=metadata))
        logger.debug("checkpoint at iteration %d written to %s", self.iteration, path)

    def _load_checkpoint(self, path):
        """Load the state that :meth:`save_checkpoint` wrote to ``path``.

        Raises
        ------
        ParameterError
            If the file is not a readable checkpoint, was written for another network, or is at
            an iteration beyond ``config.iterations``.
        """
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            raise ParameterError(f"{path} is not a valid checkpoint file ({error}); give a file written by train --checkpoint") from error
        if "iteration" not in metadata or "config" not in metadata:
            raise ParameterError(
                f"{path} is not a training checkpoint (a prior file, perhaps); give a file written by train --checkpoint"
            )

        saved = json.loads(metadata["config"])
        current = asdict(self.config)
        for key in NETWORK_SETTINGS:
            if key in saved and saved[key] != current[key]:
                raise ParameterError(
                    f"{path} was written with {key} {saved[key]!r}, not {current[key]!r}; resume with the same network settings"
                )
        self.iteration = int(metadata["iteration"])
        if self.iteration > self.config.iterations:
            raise ParameterError(
                f"{path} is at iteration {self.iteration}, beyond the {self.config.iterations} iterations requested; "
                f"ask for {self.iteration} iterations or more"
            )

        self.network.load_state_dict({key[len("network."):]: value for key, value in tensors.items() if key.startswith("network.")})
        if self.average is not None:
            average = {key[len("average."):]: value for key, value in tensors.items() if key.startswith("average.")}
            # A checkpoint written without an average starts it from the resumed weights.
            self.average.load_state_dict(average or self.network.state_dict())
        state = self.optimizer.state_dict()
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                entry = state["state"].setdefault(int(index), {})
                entry[key] = value.reshape(()) if key == "step" else value
        self.optimizer.load_state_dict(state)
        logger.debug("resumed from %s at iteration %d", path, self.iteration)

    def save_prior(self, path, name, command, description=None, recommended_weight=1.0, recommended_temperature=1.0):
        """Write the trained network as a prior file with its full metadata.

        ``recommended_weight`` (>= 0) is the weight a run uses when none is given; choose it on
        validation data, for example with benchmarks/bench_quality.py. ``recommended_temperature``
        (>= 0) is the Langevin temperature a run uses when none is given.
        """
        config = self.config
        network = self.trained_network()
        metadata = {
            "name": name,
            "description": description or f"energy network trained by {config.objective.upper()} on {self.data_description}",
            "version": __version__,
            "architecture": config.architecture,
            "hyperparameters": network.hyperparameters,
            "training_voxel_size": float(self.voxel_size),
            "normalization": "each training volume scaled to mean 0 and standard deviation 1",
            "noise_levels": [float(s) for s in config.noise_levels],
            "objective": OBJECTIVES[config.objective],
            "data": self.data_description,
            "command": command,
            "seed": int(config.seed),
            "recommended_weight": float(recommended_weight),
            "recommended_temperature": float(recommended_temperature),
            "lipschitz_estimate": estimate_lipschitz(network, self.volumes, config),
            "training": {key: value for key, value in asdict(config).items()},
        }
        return save_prior(path, network, metadata)


@dataclass
class DriftCheck:
    """The result of :func:`check_drift`: PSNR in dB against the ground truth."""

    map_psnr: float
    input_psnr: float

    @property
    def drifted(self):
        """True when MAP ended further from the truth than the observation it started from."""
        return not self.map_psnr > self.input_psnr

    def summary(self):
        """Return the one-line result that the command line and the widget show."""
        return f"drift check on held-out phantom 0: MAP {self.map_psnr:.2f} dB PSNR, observation {self.input_psnr:.2f} dB"


def check_drift(prior_path, voxel_size, weight, size=48, steps=100):
    """Run MAP with a prior file on held-out phantom 0 and compare it with the observation.

    An energy that is not bounded below can pull MAP away from the data along the missing
    wedge, even after training that lowered the DSM loss. The observation is the phantom with
    white noise of std 0.5 and a -60..60 degree wedge.

    Parameters
    ----------
    prior_path : str or Path
        The .safetensors file.
    voxel_size : float
        Voxel size of the phantom in Angstrom.
    weight : float
        Prior weight, >= 0.
    size, steps : int
        Phantom side in voxels and MAP steps.

    Returns
    -------
    DriftCheck
        A run that diverges counts as drift, with a MAP PSNR of -inf.
    """
    truth = make_phantom((size,) * 3, voxel_size, seed=0)
    observed = observe(truth, (-60.0, 60.0), noise_sigma=0.5, seed=500)
    config = RunConfig(method="map", prior=str(prior_path), weight=weight, steps=steps, noise_sigma=0.5, seed=0, device="cpu")
    try:
        map_psnr = psnr(reconstruct(observed, config)[0].volume, truth)
    except RunError as error:
        logger.debug("drift check of %s diverged: %s", prior_path, error)
        map_psnr = -math.inf
    return DriftCheck(map_psnr, psnr(observed, truth))

