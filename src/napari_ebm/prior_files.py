"""Prior files: trained energy networks stored as safetensors weights plus JSON metadata.

A prior named NAME is the pair NAME.safetensors (the weights) and NAME.json (the metadata).
Loading never unpickles anything: the weights are read with safetensors, which stores raw
tensors, and the metadata with the json module. Prior files are found in the package (shipped
priors), in a per-user folder and at any path given.
"""

import json
import logging
import math
from pathlib import Path

import platformdirs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import EBMError, ParameterError
from .networks import ARCHITECTURES, LearnedPrior
from .priors import PRIORS, create_prior
from .sidecar import write_bytes_atomically, write_text_atomically

logger = logging.getLogger(__name__)

PRIOR_SUFFIX = ".safetensors"


class PriorFileError(EBMError, ValueError):
    """A prior file is invalid. The message names the file and the problem."""


def _text(value):
    return isinstance(value, str) and value.strip() != ""


def _positive(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _non_negative(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


# Each metadata field with its check and a description of valid values for the error message.
METADATA_FIELDS = {
    "name": (_text, "a non-empty string"),
    "description": (_text, "a non-empty string"),
    "version": (_text, "a non-empty string"),
    "architecture": (lambda v: v in ARCHITECTURES, f"one of {', '.join(sorted(ARCHITECTURES))}"),
    "hyperparameters": (lambda v: isinstance(v, dict), "an object of keyword arguments"),
    "training_voxel_size": (_positive, "a number > 0 (Angstrom)"),
    "normalization": (_text, "a non-empty string"),
    "noise_levels": (lambda v: isinstance(v, list) and len(v) > 0 and all(_positive(s) for s in v), "a list of numbers > 0"),
    "objective": (_text, "a non-empty string"),
    "data": (_text, "a non-empty string"),
    "command": (_text, "a non-empty string"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "recommended_weight": (_non_negative, "a number >= 0"),
    "recommended_temperature": (_non_negative, "a number >= 0"),
    "lipschitz_estimate": (_positive, "a number > 0"),
}


def prior_folders():
    """Return the folders searched for prior files: the package's, then the user's."""
    package = Path(__file__).parent / "data" / "priors"
    user = Path(platformdirs.user_data_dir("napari-ebm")) / "priors"
    return [package, user]


def validate_metadata(metadata, source):
    """Raise PriorFileError naming ``source`` unless ``metadata`` has every field, each valid."""
    if not isinstance(metadata, dict):
        raise PriorFileError(f"{source}: the metadata must be a JSON object, found {type(metadata).__name__}")
    for field, (check, expectation) in METADATA_FIELDS.items():
        if field not in metadata:
            raise PriorFileError(f"{source}: the metadata field {field!r} is missing; it must be {expectation}")
        if not check(metadata[field]):
            raise PriorFileError(f"{source}: the metadata field {field!r} is invalid ({metadata[field]!r}); it must be {expectation}")


def save_prior(path, network, metadata):
    """Write ``network``'s weights to ``path`` (.safetensors) and ``metadata`` beside it (.json).

    Raises
    ------
    PriorFileError
        If ``path`` does not end in .safetensors or the metadata is invalid.
    VolumeWriteError
        If a file cannot be written; an existing file at that path is left unchanged.
    """
    path = Path(path)
    if path.suffix != PRIOR_SUFFIX:
        raise PriorFileError(f"{path}: a prior file must end in {PRIOR_SUFFIX}")
    validate_metadata(metadata, path.with_suffix(".json"))

    # safetensors.torch.save_file creates the file with mode 0o600 and writes it in place. The
    # atomic writer gives the user's usual permissions and never leaves half a file.
    state = {key: value.detach().contiguous().cpu() for key, value in network.state_dict().items()}
    write_bytes_atomically(path, save(state))
    write_text_atomically(path.with_suffix(".json"), json.dumps(metadata, indent=2) + "\n")
    logger.debug("saved prior %r to %s", metadata["name"], path)
    return path


def read_metadata(path):
    """Read and validate the JSON metadata beside the prior file ``path``.

    Raises
    ------
    PriorFileError
        If the .json file is missing, not valid JSON or fails validation.
    """
    metadata_path = Path(path).with_suffix(".json")
    try:
        metadata = json.loads(metadata_path.read_text())
    except FileNotFoundError:
        raise PriorFileError(f"{metadata_path}: metadata file not found; a prior needs NAME.json beside NAME.safetensors") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PriorFileError(f"{metadata_path}: cannot read the metadata as JSON ({error})") from None
    validate_metadata(metadata, metadata_path)
    return metadata


def load_prior(path):
    """Load the prior file ``path`` as a :class:`napari_ebm.networks.LearnedPrior`.

    Raises
    ------
    PriorFileError
        If the file is missing, is not valid safetensors (a pickle renamed to .safetensors is
        rejected without being executed), its metadata is invalid, or its weights do not fit
        the architecture named in the metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise PriorFileError(f"{path}: prior file not found")

    # The weights are checked first, so a file of another format is named as such even when
    # its .json is missing too.
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise PriorFileError(f"{path}: not a valid safetensors file ({error}); it cannot be loaded as a prior") from None
    metadata = read_metadata(path)

    try:
        # Building the layers draws their initial weights from torch's global random generator.
        # The weights are replaced by the file's, so the draw happens on a forked generator
        # and leaves the caller's random state unchanged.
        with torch.random.fork_rng(devices=[]):
            network = ARCHITECTURES[metadata["architecture"]](**metadata["hyperparameters"])
    except (TypeError, ValueError) as error:
        raise PriorFileError(f"{path}: the hyperparameters in the metadata do not fit {metadata['architecture']!r}: {error}") from None
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        # torch puts a title on the first line and one mismatch per line after it.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise PriorFileError(
            f"{path}: the weights do not fit the architecture in the metadata ({detail}); "
            "use the .json that was written with these weights"
        ) from None

    metadata = dict(metadata, file=str(path))
    logger.debug("loaded prior %r from %s", metadata["name"], path)
    return LearnedPrior(network.float(), metadata)


def find_prior_files():
    """Return {name: path} for the prior files in :func:`prior_folders`; earlier folders win."""
    found = {}
    for folder in prior_folders():
        if folder.is_dir():
            for path in sorted(folder.glob(f"*{PRIOR_SUFFIX}")):
                found.setdefault(path.stem, path)
    return found


def list_available_priors():
    """Return (name, description, training voxel size in Angstrom or None) for every prior.

    Registered priors come first, then prior files; a file whose metadata is invalid is listed
    with the reason instead of its description.
    """
    rows = [(name, PRIORS.describe(name), None) for name in PRIORS.names()]
    for name, path in find_prior_files().items():
        try:
            metadata = read_metadata(path)
        except PriorFileError as error:
            rows.append((name, f"invalid: {error}", None))
            continue
        rows.append((name, metadata["description"], float(metadata["training_voxel_size"])))
    return rows


def resolve_prior(name_or_path, **options):
    """Create the prior a user named: a registered name, a prior file's name or a .safetensors path.

    Raises
    ------
    ParameterError
        If nothing of that name or path exists; the message lists the available priors.
    PriorFileError
        If the prior file exists but cannot be loaded.
    """
    if name_or_path in PRIORS:
        return create_prior(name_or_path, **options)
    if str(name_or_path).endswith(PRIOR_SUFFIX):
        return load_prior(name_or_path)
    files = find_prior_files()
    if name_or_path in files:
        return load_prior(files[name_or_path])
    names = ", ".join(PRIORS.names() + sorted(files))
    raise ParameterError(f"unknown prior {name_or_path!r}; choose one of: {names}, or give the path of a {PRIOR_SUFFIX} file")


def recommended_weight(prior):
    """Return the prior file's recommended weight, or None for a hand-made prior."""
    metadata = getattr(prior, "metadata", None)
    return float(metadata["recommended_weight"]) if metadata else None


def recommended_temperature(prior):
    """Return the prior file's recommended Langevin temperature, or None for a hand-made prior."""
    metadata = getattr(prior, "metadata", None)
    return float(metadata["recommended_temperature"]) if metadata else None


__all__ = [
    "PriorFileError",
    "list_available_priors",
    "load_prior",
    "prior_folders",
    "read_metadata",
    "resolve_prior",
    "save_prior",
]
