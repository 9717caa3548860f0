"""The ``napari-ebm`` command line: list priors and reconstruct a tomogram without napari.

Exit codes: 0 success, 1 the run or writing its outputs failed, 2 invalid input or parameters,
130 interrupted (Ctrl+C). Errors are printed as one line without a traceback, except with
``--debug``, which also re-raises unexpected exceptions.
"""

import argparse
import contextlib
import csv
import dataclasses
import logging
import math
import os
import re
import sys
import time
import warnings
from io import StringIO
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import __version__
from .errors import EBMError, NonFiniteEnergyError, ParameterError, RunError, VolumeReadError, VolumeWriteError
from .io import MRC_SUFFIXES, Volume, read_volume, write_mrc
from .operators import OPERATORS
from .prior_files import list_available_priors, prior_folders, resolve_prior
from .resample import format_voxel_size, fourier_resample, resampling_record, voxel_size_mismatch
from .priors import PRIORS
from .run import DEVICES, METHODS, Reconstruction, RunConfig, describe_prior_settings, validate_config
from .sidecar import build_record, sidecar_path, utc_timestamp, write_sidecar, write_text_atomically

logger = logging.getLogger(__name__)

PROG = "napari-ebm"

DEBUG_LOG_FORMAT = "%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130

TRACE_COLUMNS = ("step", "energy", "data_energy", "prior_energy")

# The names that validate_config uses in its messages, and the options that set them. A message
# "invalid step size 0.0: ..." becomes "invalid --step-size 0.0: ...".
PARAMETER_OPTIONS = {
    "method": "--method",
    "operator": "--operator",
    "prior": "--prior",
    "device": "--device",
    "weight": "--weight",
    "noise sigma": "--noise-sigma",
    "number of steps": "--steps",
    "step size": "--step-size",
    "temperature": "--temperature",
    "burn-in": "--burn-in",
    "number of MAP start steps": "--map-start-steps",
    "thinning": "--thin",
    "tolerance": "--tolerance",
    "tilt range": "--tilt-range",
    "number of threads": "--threads",
}


class CommandInterrupted(Exception):
    """Ctrl+C during a command. The message names the step in progress and the files written."""


# ---------------------------------------------------------------------------------------------
# Argument types


def finite_float(text):
    """Parse a finite float; argparse shows the message with the option name."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def integer(text):
    """Parse an integer written in decimal digits (no fraction, no exponent)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def seed_value(text):
    """Parse a seed: an integer from 0 to 2**64 - 1, the range of torch.Generator.manual_seed."""
    value = integer(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range; give an integer from 0 to 2**64 - 1")
    return value


# ---------------------------------------------------------------------------------------------
# Parser


def build_parser():
    """Build the argument parser of ``napari-ebm`` and its subcommands."""
    debug_parent = argparse.ArgumentParser(add_help=False)
    debug_parent.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log debug messages to stderr and show the traceback of unexpected errors",
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Energy-based reconstruction of cryo-ET tomograms (MAP and Langevin sampling).",
        epilog="Exit codes: 0 success, 1 the run or writing its outputs failed, "
        "2 invalid input or parameters, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False,
        help="log debug messages to stderr and show the traceback of unexpected errors",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")

    priors = subparsers.add_parser(
        "priors", parents=[debug_parent], help="list the available priors",
        description="List the available priors: the built-in ones, then the prior files in these folders: "
        + ", ".join(str(folder) for folder in prior_folders()) + ".",
    )
    priors.set_defaults(handler=run_priors)

    reconstruct = subparsers.add_parser(
        "reconstruct",
        parents=[debug_parent],
        help="reconstruct a tomogram and write the result to an MRC file",
        description="Reconstruct a tomogram by MAP estimation or Langevin sampling and write the result, "
        "with a JSON sidecar (<output>.json) that records the command, the parameters and the seed.",
        epilog="Exit codes: 0 success, 1 the run or writing its outputs failed, "
        "2 invalid input or parameters, 130 interrupted.",
    )
    _add_reconstruct_arguments(reconstruct)
    reconstruct.set_defaults(handler=run_reconstruct)

    train = subparsers.add_parser(
        "train",
        parents=[debug_parent],
        help="train an energy prior by denoising score matching (optionally with contrastive divergence)",
        description="Train an energy prior by denoising score matching (optionally with contrastive divergence) on phantoms or a folder of MRC volumes, "
        "and write it as PRIOR.safetensors with PRIOR.json beside it.",
    )
    _add_train_arguments(train)
    train.set_defaults(handler=run_train)

    view = subparsers.add_parser(
        "view",
        parents=[debug_parent],
        help="open napari with a tomogram and the EBM reconstruction widget",
        description="Open napari with a tomogram (default: the real microtubule tomogram shipped with the "
        "package) and the EBM reconstruction widget docked.",
    )
    view.add_argument(
        "input", nargs="?", metavar="INPUT", help="tomogram to open: an MRC-family file (.mrc .rec .map .st .ali .mrcs) or a TIFF"
    )
    _add_voxel_size_argument(view)
    view.set_defaults(handler=run_view)
    return parser


def _add_voxel_size_argument(parser):
    parser.add_argument(
        "--voxel-size", type=finite_float, default=1.0, metavar="A",
        help="voxel size in Angstrom used on each axis where the file's header has none (0, NaN or infinite); "
        "a valid header value is always kept (default: 1)",
    )


def _add_reconstruct_arguments(parser):
    parser.add_argument("input", metavar="INPUT", help="input tomogram (MRC or TIFF file)")
    _add_voxel_size_argument(parser)
    parser.add_argument(
        "--out",
        required=True,
        metavar="OUT",
        help="output MRC file: the MAP volume, or the posterior mean with --method langevin; "
        "it keeps the input's voxel size and origin",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--operator",
        choices=OPERATORS.names(),
        default="wedge",
        help="forward operator: 'wedge' models the missing wedge of a single-axis tilt series, "
        "'denoise' the identity (default: wedge)",
    )
    model.add_argument(
        "--tilt-range",
        nargs=2,
        type=finite_float,
        default=(-60.0, 60.0),
        metavar=("MIN", "MAX"),
        help="tilt range of the wedge operator in degrees, -90 <= MIN < MAX <= 90 (default: -60 60)",
    )
    model.add_argument(
        "--prior",
        default="tv",
        metavar="NAME",
        help=f"prior: one of {', '.join(PRIORS.names())}, the name of an installed prior file, or the path of a "
        "trained prior (.safetensors with its .json beside it); 'napari-ebm priors' lists them (default: tv)",
    )
    model.add_argument(
        "--weight",
        type=finite_float,
        default=None,
        metavar="W",
        help="prior weight, >= 0, dimensionless (default: the prior file's recommended weight, or 1.0 for l2, smooth and tv)",
    )
    model.add_argument(
        "--noise-sigma",
        type=finite_float,
        default=None,
        metavar="S",
        help="noise standard deviation in the input's intensity units, > 0 "
        "(default: estimated from the data and printed)",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--method",
        choices=METHODS,
        default="map",
        help="'map' finds the lowest-energy volume, 'langevin' samples the posterior (default: map)",
    )
    run.add_argument("--steps", type=integer, default=100, metavar="N", help="number of steps, > 0 (default: 100)")
    run.add_argument(
        "--step-size",
        type=finite_float,
        default=None,
        metavar="H",
        help="step size H of the update x - H grad E(x), in normalised intensity units "
        "(raw ones with --no-normalize), > 0 "
        "(default: automatic from the Lipschitz bound of the energy gradient, and printed)",
    )
    run.add_argument(
        "--temperature",
        type=finite_float,
        default=None,
        metavar="T",
        help="Langevin temperature, >= 0, dimensionless; 0 is gradient descent "
        "(default: the prior file's recommended temperature, or 1.0 for l2, smooth and tv)",
    )
    run.add_argument(
        "--burn-in",
        type=integer,
        default=0,
        metavar="N",
        help="Langevin steps discarded before the mean and std start, >= 0 and < --steps (default: 0)",
    )
    run.add_argument(
        "--map-start-steps",
        type=integer,
        default=0,
        metavar="N",
        help="Langevin: make the first N steps MAP steps, so the chain starts near the posterior mode "
        "instead of at the input; they count as burn-in, so N <= --burn-in (default: 0)",
    )
    run.add_argument(
        "--thin",
        type=integer,
        default=1,
        metavar="N",
        help="Langevin: every N-th step after the burn-in enters the mean and std, >= 1 (default: 1)",
    )
    run.add_argument(
        "--tolerance",
        type=finite_float,
        default=1e-5,
        metavar="TOL",
        help="MAP stops when the relative change ||x_new - x|| / ||x|| falls below TOL, >= 0; "
        "0 never stops early (default: 1e-5)",
    )
    run.add_argument(
        "--seed",
        type=seed_value,
        default=None,
        metavar="N",
        help="seed of the random generator, 0 to 2**64 - 1 (default: drawn at random, printed and recorded)",
    )
    run.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="torch device; 'auto' takes CUDA, then Apple MPS, then the CPU (default: auto)",
    )
    run.add_argument(
        "--threads",
        type=integer,
        default=None,
        metavar="N",
        help="CPU threads that torch uses for each step, >= 1 (default: the cores this process may use, "
        "at most 4). A rerun is bit-identical only with the same number",
    )
    run.add_argument(
        "--no-normalize",
        dest="normalize",
        action="store_false",
        help="run on the raw intensities instead of normalising them to mean 0 and standard deviation 1 "
        "(default: normalise); outputs are in the input's intensity units either way",
    )

    outputs = parser.add_argument_group("outputs")
    outputs.add_argument(
        "--std-out",
        metavar="PATH",
        help="Langevin only: MRC file for the posterior standard deviation; OUT then contains the posterior mean "
        "(default: not written)",
    )
    outputs.add_argument(
        "--trace",
        metavar="PATH.csv",
        help="CSV file of the energy terms per step, columns step,energy,data_energy,prior_energy, each taken "
        "where the step took its gradient (row 1: the input). prior_energy is unweighted: energy = data_energy "
        "+ weight * prior_energy (default: not written)",
    )
    outputs.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing outputs and their sidecars, but not the input, which needs --overwrite-input "
        "(default: off)",
    )
    outputs.add_argument(
        "--overwrite-input",
        action="store_true",
        help="allow --out to be the input file, which is then read into memory and replaced once the output "
        "is completely written (default: off, and an output on the input is an error)",
    )
    outputs.add_argument("--quiet", action="store_true", help="hide the progress bar (default: shown on stderr)")
    outputs.add_argument(
        "--resample",
        action="store_true",
        help="when a trained prior's training voxel size differs from the input's by more than 25 %%, resample "
        "the input to it by Fourier cropping or padding; outputs are then written at that voxel size",
    )


# ---------------------------------------------------------------------------------------------
# Entry point


def main(argv=None):
    """Run the ``napari-ebm`` command line and return its exit code.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when omitted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        # argparse exits after --help, --version (code 0) and after printing a usage error (code 2).
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_INVALID

    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_INVALID

    debug = args.debug
    with _logging_to_stderr(debug):
        try:
            return args.handler(args, [PROG, *argv])
        except CommandInterrupted as interrupt:
            _print_error_line(str(interrupt))
            return EXIT_INTERRUPTED
        except KeyboardInterrupt:
            _print_error_line("interrupted; no output written")
            return EXIT_INTERRUPTED
        except NonFiniteEnergyError as error:
            logger.debug("run diverged", exc_info=True)
            _print_error_line("error: " + _join_sentences(_with_option_advice(str(error)), "No output was written."))
            return EXIT_FAILED
        except RunError as error:
            logger.debug("run failed", exc_info=True)
            _print_error_line("error: " + _join_sentences(str(error), "No output was written."))
            return EXIT_FAILED
        except EBMError as error:
            logger.debug("command failed", exc_info=True)
            _print_error_line(f"error: {error}")
            return EXIT_INVALID
        except Exception as error:
            if debug:
                raise
            _print_error_line(
                f"error: unexpected {type(error).__name__}: {error} (run with --debug for the traceback)"
            )
            return EXIT_FAILED


@contextlib.contextmanager
def _logging_to_stderr(debug):
    """Send the package's log records to stderr while a command runs.

    With ``debug``, every record is shown with a timestamp and the thread name. Otherwise only
    warnings and errors are shown. The handler is removed afterwards, so repeated calls of
    :func:`main` (as in tests) neither stack handlers nor write to a replaced stderr.
    """
    package_logger = logging.getLogger("napari_ebm")
    handler = logging.StreamHandler(sys.stderr)
    if debug:
        handler.setFormatter(logging.Formatter(DEBUG_LOG_FORMAT))
    else:
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    previous_level = package_logger.level
    package_logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    package_logger.addHandler(handler)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)


def _with_option_advice(message):
    """Replace the advice of a run's divergence message by the options that follow it."""
    return message.replace(
        "Lower the step size, or the temperature for Langevin.", "Lower --step-size, or --temperature for Langevin."
    )


def _join_sentences(first, second):
    separator = " " if first.rstrip().endswith((".", "!", "?")) else ". "
    return first.rstrip() + separator + second


def _print_error_line(message):
    print(f"{PROG}: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# napari-ebm priors


def run_priors(args, command):
    """Print one prior per line: its name, then its description and training voxel size."""
    priors = list_available_priors()
    width = max(len(name) for name, _, _ in priors)
    for name, description, voxel_size in priors:
        trained_at = f" (trained at {voxel_size:g} A per voxel)" if voxel_size is not None else ""
        print(f"{name:<{width}}  {description}{trained_at}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# napari-ebm reconstruct


def _add_train_arguments(parser):
    parser.add_argument("--out", required=True, metavar="PRIOR.safetensors", help="prior file to write; its .json is written beside it")
    parser.add_argument("--name", default=None, help="prior name (default: the file name without suffix)")
    parser.add_argument("--data", default=None, metavar="FOLDER", help="folder of .mrc volumes to train on (default: synthetic phantoms)")
    parser.add_argument("--iterations", type=integer, default=800, metavar="N", help="optimiser steps, > 0 (default: 800)")
    parser.add_argument("--channels", type=integer, default=16, metavar="N", help="channels per hidden layer (default: 16)")
    parser.add_argument("--depth", type=integer, default=4, metavar="N", help="hidden 3x3x3 convolution layers (default: 4)")
    parser.add_argument(
        "--quadratic", type=finite_float, default=0.01, metavar="A",
        help="weight A >= 0 of the term A * ||x||^2 / 2 added to the network's energy, in normalised units; "
        "a larger A keeps MAP from drifting to large values (default: 0.01)",
    )
    parser.add_argument(
        "--dilations", type=integer, nargs="+", default=None, metavar="D",
        help="dilation of each hidden layer, one integer >= 1 per layer (default: all 1); "
        "the receptive field is 2 * sum + 1 voxels",
    )
    parser.add_argument("--patch-size", type=integer, default=24, metavar="N", help="training patch side in voxels (default: 24)")
    parser.add_argument("--batch-size", type=integer, default=4, metavar="N", help="patches per iteration (default: 4)")
    parser.add_argument(
        "--noise-levels", type=finite_float, nargs="+", default=[0.2, 0.35, 0.5, 0.7], metavar="S",
        help="DSM noise standard deviations in normalised units (default: 0.2 0.35 0.5 0.7)",
    )
    parser.add_argument("--learning-rate", type=finite_float, default=2e-3, metavar="LR", help="Adam learning rate (default: 0.002)")
    parser.add_argument(
        "--schedule", choices=["constant", "cosine"], default="constant",
        help="learning rate schedule: constant, or cosine decay to 0 at the last iteration (default: constant)",
    )
    parser.add_argument(
        "--architecture", choices=["tv_conv_energy", "conv_energy", "squared_conv_energy", "residual_conv_energy"], default="tv_conv_energy",
        help="energy network: a sum of per-voxel network outputs plus a trained multiple of total variation; "
        "the network outputs alone; their squares, which are bounded below; or "
        "(x - D(x))^2 / (2 tau^2) with a bounded network D, which grows away from the data (default: tv_conv_energy)",
    )
    parser.add_argument(
        "--objective", choices=["dsm", "dsm+cd"], default="dsm",
        help="dsm: denoising score matching; dsm+cd: DSM plus contrastive divergence with short Langevin chains (default: dsm)",
    )
    parser.add_argument("--cd-steps", type=integer, default=10, metavar="N", help="Langevin steps per contrastive divergence chain (default: 10)")
    parser.add_argument("--cd-step-size", type=finite_float, default=0.01, metavar="S", help="Langevin step size of the chains (default: 0.01)")
    parser.add_argument("--cd-weight", type=finite_float, default=1.0, metavar="W", help="weight of the contrastive divergence loss (default: 1)")
    parser.add_argument("--phantoms", type=integer, default=8, metavar="N", help="phantom volumes made without --data (default: 8)")
    parser.add_argument(
        "--voxel-size", type=finite_float, default=None, metavar="A",
        help="voxel size in Angstrom of the phantoms (default: 10), and of --data volumes whose header has none "
        "(default: such a volume is rejected). The prior records the training volumes' voxel size",
    )
    parser.add_argument("--seed", type=integer, default=0, metavar="N", help="seed of initialisation, patches and noise (default: 0)")
    parser.add_argument(
        "--threads", type=integer, default=None, metavar="N",
        help="CPU threads that torch uses for each iteration, >= 1 (default: torch's setting). "
        "The same seed gives the same weights only with the same number",
    )
    parser.add_argument(
        "--ema", type=finite_float, default=0.0, metavar="D",
        help="save an exponential moving average of the weights with decay D, 0 <= D < 1 (default: 0, the last weights)",
    )
    parser.add_argument("--checkpoint", default=None, metavar="PATH", help="checkpoint file (.safetensors) written every --checkpoint-every iterations")
    parser.add_argument("--checkpoint-every", type=integer, default=100, metavar="N", help="iterations between checkpoints, > 0 (default: 100)")
    parser.add_argument("--resume", default=None, metavar="PATH", help="checkpoint to resume from")
    parser.add_argument(
        "--loss-log", default=None, metavar="PATH.csv",
        help="write the loss per iteration to this CSV file; with --resume, the rows up to the checkpoint's "
        "iteration are kept and the new ones added",
    )
    parser.add_argument(
        "--recommended-weight", type=finite_float, default=1.0, metavar="W",
        help="prior weight recorded in the prior file, used by runs that give none, >= 0 (default: 1)",
    )
    parser.add_argument(
        "--recommended-temperature", type=finite_float, default=1.0, metavar="T",
        help="Langevin temperature recorded in the prior file, used by runs that give none, >= 0 (default: 1)",
    )
    parser.add_argument("--overwrite", action="store_true", help="allow replacing an existing prior file")
    parser.add_argument(
        "--no-drift-check", action="store_true",
        help="skip the MAP run on a held-out phantom that warns when the new prior drifts (about 10 s)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _loss_log_text(path, losses, resumed_at):
    """Return the CSV text of the loss log: the rows of ``path`` up to ``resumed_at`` (when
    resuming and the file exists), then ``losses``."""
    header = "iteration,noise_level,loss\n"
    earlier_rows = []
    if resumed_at is not None and path.exists():
        for line in path.read_text().splitlines()[1:]:
            iteration = line.split(",", 1)[0]
            if iteration.isdigit() and int(iteration) <= resumed_at:
                earlier_rows.append(line + "\n")
    rows = "".join(f"{iteration},{level},{loss}\n" for iteration, level, loss in losses)
    return header + "".join(earlier_rows) + rows


def run_train(args, command):
    """Train a prior and write it; return 0 on success."""
    from .training import Trainer, TrainingConfig, check_drift

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ParameterError(f"--out {out}: a prior file must end in .safetensors")
    if not out.parent.is_dir():
        raise ParameterError(f"--out {out}: the folder {out.parent} does not exist")
    if not args.overwrite and (out.exists() or out.with_suffix(".json").exists()):
        raise ParameterError(f"--out {out}: the prior file or its .json exists; choose another name or pass --overwrite")
    if args.resume is not None and not Path(args.resume).is_file():
        raise ParameterError(f"--resume {args.resume}: checkpoint file not found")
    if args.recommended_weight < 0:
        raise ParameterError(f"invalid --recommended-weight {args.recommended_weight:g}: must be >= 0")
    if args.recommended_temperature < 0:
        raise ParameterError(f"invalid --recommended-temperature {args.recommended_temperature:g}: must be >= 0")
    if args.checkpoint_every < 1:
        raise ParameterError(f"invalid --checkpoint-every {args.checkpoint_every}: must be > 0")
    loss_log = Path(args.loss_log) if args.loss_log else None
    if loss_log is not None:
        if not loss_log.parent.is_dir():
            raise ParameterError(f"--loss-log {loss_log}: the folder {loss_log.parent} does not exist")
        if loss_log.exists() and args.resume is None and not args.overwrite:
            raise ParameterError(f"--loss-log {loss_log}: the file exists; choose another name, pass --overwrite, or --resume to add to it")

    config = TrainingConfig(
        iterations=args.iterations, patch_size=args.patch_size, batch_size=args.batch_size,
        noise_levels=list(args.noise_levels), learning_rate=args.learning_rate, channels=args.channels,
        depth=args.depth, quadratic=args.quadratic, dilations=args.dilations, schedule=args.schedule, phantoms=args.phantoms, voxel_size=args.voxel_size, data_folder=args.data, seed=args.seed,
        architecture=args.architecture, objective=args.objective, threads=args.threads, ema=args.ema, cd_steps=args.cd_steps, cd_step_size=args.cd_step_size, cd_weight=args.cd_weight,
    )
    trainer = Trainer(config, checkpoint=args.resume)
    resumed_at = trainer.iteration
    print(f"training on {trainer.data_description}, from iteration {trainer.iteration}")

    losses = []
    with tqdm(total=config.iterations, initial=trainer.iteration, desc="train", unit="it", file=sys.stderr, disable=args.quiet) as bar:
        for snapshot in trainer.iterations():
            losses.append((snapshot.iteration, snapshot.noise_level, snapshot.loss))
            bar.update(1)
            bar.set_postfix(loss=f"{snapshot.loss:.4f}")
            if args.checkpoint and snapshot.iteration % args.checkpoint_every == 0:
                trainer.save_checkpoint(args.checkpoint)

    if loss_log is not None:
        write_text_atomically(loss_log, _loss_log_text(loss_log, losses, resumed_at if args.resume else None))
    trainer.save_prior(
        out, args.name or out.stem, " ".join(command),
        recommended_weight=args.recommended_weight, recommended_temperature=args.recommended_temperature,
    )
    print(f"wrote {out} and {out.with_suffix('.json')}")

    if not args.no_drift_check:
        check = check_drift(out, trainer.voxel_size, args.recommended_weight)
        print(check.summary())
        if check.drifted:
            print(
                f"{PROG}: warning: MAP with {out} ended further from the truth than the observation, so the prior "
                "drifts along the missing wedge; train with fewer iterations, another seed or --schedule cosine",
                file=sys.stderr,
            )
    return EXIT_OK


def _require_display():
    """Raise EBMError on Linux when no X11 or Wayland display is set and no Qt platform is chosen."""
    if not sys.platform.startswith("linux"):
        return
    if any(os.environ.get(name) for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")):
        return
    raise EBMError(
        "no display to open napari on: DISPLAY and WAYLAND_DISPLAY are not set. Run it in a desktop "
        "session, over ssh -X, or under a virtual display, for example: xvfb-run -a bash scripts/view.sh"
    )


def run_view(args, command):
    """Open the napari viewer; return 0 when its window closes.

    The input is read before napari starts, so a bad file gets the same one-line error and exit
    code as in ``reconstruct``. On Linux without a display, Qt would abort the process, so the
    command then stops with an error that explains how to get one.
    """
    volume = None
    if args.input is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            volume = read_volume(args.input, fallback_voxel_size=_fallback_voxel_size(args))
        for warning in caught:
            if issubclass(warning.category, UserWarning) and not issubclass(warning.category, RuntimeWarning):
                print(f"{PROG}: warning: {warning.message}", file=sys.stderr)

    _require_display()
    try:
        from ._napari.launch import open_viewer
    except ImportError as error:
        raise EBMError(
            f"napari is not installed ({error}); install it with: pip install 'napari-ebm[napari]'"
        ) from error
    open_viewer(volume)
    return EXIT_OK


def run_reconstruct(args, command):
    """Check everything, run the reconstruction, then write the outputs and their sidecars.

    Nothing is written and no step runs unless all parameters and output paths are valid.
    """
    started = utc_timestamp()
    clock = time.perf_counter()
    input_path, source, volume, outputs, reconstruction = _prepare_run(args)
    prepare_seconds = time.perf_counter() - clock

    print(_describe_run(volume, reconstruction))
    logger.info("reconstruction %s of %s started", reconstruction.run_id, input_path)
    run_clock = time.perf_counter()
    last, trace = _run_with_progress(reconstruction, quiet=args.quiet)
    run_seconds = time.perf_counter() - run_clock
    logger.info("reconstruction %s finished after %d steps", reconstruction.run_id, last.step)

    timings = {
        "started": started,
        "prepare_seconds": prepare_seconds,
        "run_seconds": run_seconds,
        "steps_per_second": last.step / run_seconds if run_seconds > 0 else None,
    }
    records = {
        path: build_record(
            command=command,
            volume=source,
            output_path=path,
            kind=kind,
            parameters=reconstruction.parameters(),
            result=_describe_result(last),
            timings=timings,
        )
        for _, path, kind in outputs
    }
    if volume is not source:
        for record in records.values():
            record["resampled"] = resampling_record(source.data.shape, source.voxel_size, volume.data.shape, volume.voxel_size)
    written = _write_outputs(outputs, last, trace, volume, input_path, records, args.overwrite, args.overwrite_input)
    if written is None:
        return EXIT_FAILED

    step_word = "step" if last.step == 1 else "steps"
    if last.converged:
        stopped = f"converged after {last.step} of {last.steps} steps"
    else:
        stopped = f"{last.step} {step_word}"
    rate = timings["steps_per_second"]
    rate_text = f", {rate:.2f} steps/s" if rate is not None else ""
    sidecars = "each with a .json sidecar" if len(written) > 1 else "with a .json sidecar"
    print(f"wrote {', '.join(str(path) for path, _ in written)} ({sidecars}): {stopped} in {run_seconds:.1f} s{rate_text}")
    return EXIT_OK


def _prepare_run(args):
    """Validate the options, read the input, check the outputs and prepare the reconstruction.

    Returns
    -------
    input_path : pathlib.Path
    source : napari_ebm.io.Volume
        The volume as read from the file.
    volume : napari_ebm.io.Volume
        The volume that the run reconstructs: ``source``, or with ``--resample`` its resampled copy.
    outputs : list of (option, pathlib.Path, kind)
    reconstruction : Reconstruction

    Raises
    ------
    EBMError
        ParameterError, VolumeReadError or VolumeWriteError, naming the option or file.
    """
    config = _config_from_args(args)
    input_path = Path(args.input).expanduser()
    volume = _read_input(input_path, _fallback_voxel_size(args))
    outputs = _plan_outputs(args, config)
    _check_output_paths(input_path, outputs, args.overwrite, args.overwrite_input)

    if any(_replaces_input(option, path, input_path, args.overwrite_input) for option, path, _ in outputs):
        # The output replaces the input file, so the input is read into memory instead of being
        # read from a memory map of the file that is about to be replaced. The output is written
        # to the resolved path, so that a symbolic link to the input is followed, not replaced.
        outputs = [
            (option, path.resolve() if _replaces_input(option, path, input_path, True) else path, kind)
            for option, path, kind in outputs
        ]
        volume = dataclasses.replace(volume, data=np.array(volume.data))

    if volume.is_stack and config.operator == "wedge":
        raise ParameterError(
            f"{input_path} is an image stack (for example a tilt series), not a tomogram, so the wedge "
            "operator does not apply. Reconstruct the tomogram first, or use --operator denoise"
        )
    if volume.is_stack:
        _print_error_line(
            f"warning: {input_path} is an image stack. It is denoised as a volume whose z voxel size "
            "is a copy of the x voxel size"
        )

    source = volume
    volume = _check_prior_voxel_size(config, volume, args.resample)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            reconstruction = Reconstruction(volume.data, config)
        except ParameterError as error:
            raise ParameterError(_with_option_names(str(error))) from error
    _print_user_warnings(caught, "preparing the run")
    return input_path, source, volume, outputs, reconstruction


def _check_prior_voxel_size(config, volume, resample):
    """Warn about, or with ``resample`` remove, a mismatch with a trained prior's voxel size."""
    prior = resolve_prior(config.prior, **config.prior_options)
    message = voxel_size_mismatch(prior, volume.voxel_size)
    if message is None:
        return volume
    if not resample:
        _print_error_line(f"warning: {message}")
        return volume

    target = float(prior.metadata["training_voxel_size"])
    data, voxel_size = fourier_resample(volume.data, volume.voxel_size, target)
    print(f"resampled {volume.data.shape} at {format_voxel_size(volume.voxel_size)} to {data.shape} at {format_voxel_size(voxel_size)}")
    return Volume(data=data, voxel_size=voxel_size, origin=volume.origin, path=volume.path, is_stack=volume.is_stack)


def _describe_result(last):
    """Return the "result" entry of a sidecar from the final snapshot."""
    return {
        "steps_run": last.step,
        "steps_requested": last.steps,
        "converged": last.converged,
        "energy": last.energy,
        "data_energy": last.data_energy,
        "prior_energy": last.prior_energy,
        "samples": last.samples,
    }


def _config_from_args(args):
    """Build the RunConfig from the options and validate it.

    ``preview_every`` equals the number of steps, so volumes are copied only into the last snapshot.

    Raises
    ------
    ParameterError
        Naming the option, its value and the valid range.
    """
    config = RunConfig(
        method=args.method,
        operator=args.operator,
        tilt_range=tuple(args.tilt_range),
        prior=args.prior,
        weight=args.weight,
        noise_sigma=args.noise_sigma,
        steps=args.steps,
        step_size=args.step_size,
        temperature=args.temperature,
        burn_in=args.burn_in,
        map_start_steps=args.map_start_steps,
        thin=args.thin,
        tolerance=args.tolerance,
        seed=args.seed,
        device=args.device,
        normalize=args.normalize,
        preview_every=max(args.steps, 1),
        threads=args.threads,
    )
    try:
        validate_config(config)
    except ParameterError as error:
        raise ParameterError(_with_option_names(str(error))) from error

    if config.method == "langevin":
        samples_kept = (config.steps - config.burn_in) // config.thin
        if samples_kept == 0:
            raise ParameterError(
                f"invalid --thin {config.thin}: with --steps {config.steps} and --burn-in {config.burn_in} "
                f"no sample enters the posterior mean. Use --thin {config.steps - config.burn_in} or less"
            )
    elif args.std_out is not None:
        raise ParameterError(
            "--std-out needs --method langevin: a MAP run has no posterior standard deviation"
        )
    return config


def _with_option_names(message):
    """Replace the parameter name in a validate_config or resolve_device message by its option."""
    message = message.replace(", or unset for", ", or omit the option for").replace(
        ", or unset to", ", or omit the option to"
    )
    device_request = re.match(r"device '(\w+)' was requested", message)
    if device_request:
        return f"--device {device_request.group(1)} was requested" + message[device_request.end():]
    for name in sorted(PARAMETER_OPTIONS, key=len, reverse=True):
        prefix = f"invalid {name} "
        if message.startswith(prefix):
            return f"invalid {PARAMETER_OPTIONS[name]} " + message[len(prefix):]
    return message


def _plan_outputs(args, config):
    """Return (option, path, kind) for every output that the command writes."""
    out_kind = "posterior_mean" if config.method == "langevin" else "map"
    outputs = [("--out", Path(args.out).expanduser(), out_kind)]
    if args.std_out is not None:
        outputs.append(("--std-out", Path(args.std_out).expanduser(), "posterior_std"))
    if args.trace is not None:
        outputs.append(("--trace", Path(args.trace).expanduser(), "energy_trace"))
    return outputs


def _replaces_input(option, path, input_path, overwrite_input):
    """Return True when the output of ``option`` at ``path`` is the input and may replace it."""
    return overwrite_input and option == "--out" and _same_file(path, input_path)


def _check_output_paths(input_path, outputs, overwrite, overwrite_input=False):
    """Check every output and sidecar path, so that a clash is found before the run starts.

    Raises
    ------
    VolumeWriteError
        If a volume output lacks an MRC suffix, two outputs share a path, an output is the input
        (allowed for --out with ``overwrite_input``), is a folder, lies in a missing or
        read-only folder, or exists without ``overwrite``.
    """
    targets = []
    for option, path, kind in outputs:
        if kind != "energy_trace" and path.suffix.lower() not in MRC_SUFFIXES:
            raise VolumeWriteError(
                f"{option} {path} must be an MRC file. Give it one of the suffixes {', '.join(MRC_SUFFIXES)}"
            )
        targets.append((f"{option} {path}", path))
        targets.append((f"the sidecar of {option}, {sidecar_path(path)},", sidecar_path(path)))

    seen = {}
    for label, path in targets:
        key = path.resolve()
        if key in seen:
            raise VolumeWriteError(f"{label} and {seen[key]} are the same file. Give each output its own path")
        seen[key] = label

    replacing = {path for option, path, _ in outputs if _replaces_input(option, path, input_path, overwrite_input)}
    for label, path in targets:
        if _same_file(path, input_path) and path not in replacing:
            if label.startswith("--out "):
                advice = "Add --overwrite-input to replace the input with the result, or choose another output path"
            else:
                advice = "Choose another output path. Only --out may replace the input, with --overwrite-input"
            raise VolumeWriteError(f"{label} is the input file, which napari-ebm does not replace by default. {advice}")
        folder = path.parent
        if not folder.is_dir():
            raise VolumeWriteError(f"the output folder {folder} of {label} does not exist. Create it first")
        if path.is_dir():
            raise VolumeWriteError(f"{label} is a folder. Give the path of a file")
        if path.exists() and not overwrite and path not in replacing:
            raise VolumeWriteError(f"{label} already exists. Use --overwrite to replace it, or choose another path")
        if not _is_writable_folder(folder):
            raise VolumeWriteError(f"the output folder {folder} of {label} is not writable")


def _same_file(path, other):
    if path.resolve() == other.resolve():
        return True
    try:
        return path.exists() and other.exists() and path.samefile(other)
    except OSError:
        return False


def _is_writable_folder(folder):
    return os.access(folder, os.W_OK | os.X_OK)


def _fallback_voxel_size(args):
    """Return --voxel-size, or raise ParameterError when it is not > 0."""
    if not args.voxel_size > 0:
        raise ParameterError(f"invalid --voxel-size {args.voxel_size!r}: must be a number of Angstrom > 0")
    return args.voxel_size


def _read_input(input_path, fallback_voxel_size=1.0):
    """Read the input volume and print each UserWarning from reading as a warning line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = read_volume(input_path, fallback_voxel_size=fallback_voxel_size)
    _print_user_warnings(caught, f"reading {input_path}")
    return volume


def _print_user_warnings(caught, activity):
    """Print each UserWarning in ``caught`` as a warning line on stderr and log the others."""
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            _print_error_line(f"warning: {warning.message}")
        else:
            logger.debug("warning while %s: %s", activity, warning.message)


def _describe_run(volume, reconstruction):
    """Return the line printed before a run: shape, voxel size and the resolved parameters."""
    config = reconstruction.config
    shape = " x ".join(str(n) for n in volume.data.shape)
    voxel_size = " x ".join(f"{size:g}" for size in volume.voxel_size)
    sigma_source = "estimated" if reconstruction.noise_sigma_estimated else "given"
    step_source = "automatic" if config.step_size is None else "given"
    seed_source = "drawn" if config.seed is None else "given"
    return (
        f"{config.method} reconstruction of {shape} voxels (z, y, x), voxel size {voxel_size} Angstrom: "
        f"{describe_prior_settings(reconstruction)}noise sigma {reconstruction.noise_sigma:.4g} ({sigma_source}), "
        f"step size {reconstruction.step_size:.4g} ({step_source}), "
        f"seed {reconstruction.seed} ({seed_source}), device {reconstruction.device}, "
        f"{reconstruction.threads} CPU thread{'' if reconstruction.threads == 1 else 's'}"
    )


def _run_with_progress(reconstruction, quiet):
    """Iterate over the run's snapshots with a progress bar on stderr.

    Returns
    -------
    last : Snapshot
        The final snapshot, which carries the volumes.
    trace : list of tuple
        (step, energy, data_energy, prior_energy) for every step.

    Raises
    ------
    CommandInterrupted
        On Ctrl+C, naming the step in progress.
    """
    steps = reconstruction.config.steps
    trace = []
    last = None
    with tqdm(total=steps, desc=reconstruction.config.method, unit="step", file=sys.stderr, disable=quiet) as bar:
        try:
            for snapshot in reconstruction.snapshots():
                # Before a NonFiniteEnergyError the run yields its last finite step a second time.
                if last is None or snapshot.step > last.step:
                    trace.append((snapshot.step, snapshot.energy, snapshot.data_energy, snapshot.prior_energy))
                last = snapshot
                bar.set_postfix(energy=f"{snapshot.energy:.6g}", refresh=False)
                bar.update(snapshot.step - bar.n)
        except KeyboardInterrupt:
            step = min((last.step if last is not None else 0) + 1, steps)
            raise CommandInterrupted(f"interrupted at step {step}; no output written") from None
    return last, trace


def _write_outputs(outputs, last, trace, volume, input_path, records, overwrite, overwrite_input=False):
    """Write each output, then each sidecar, and return [(path, kind)] of the outputs.

    Every file is written to a temporary file and renamed onto its path, so an output that
    replaces the input (``overwrite_input``) replaces it only once it is complete.

    Returns None after printing the error if a write fails; outputs written before it remain
    and are listed in the message.
    """
    arrays = {"map": last.volume, "posterior_mean": last.mean, "posterior_std": last.std}
    written = []
    try:
        for option, path, kind in outputs:
            if kind == "energy_trace":
                write_text_atomically(path, _trace_csv(trace))
            else:
                if arrays[kind] is None:
                    raise RunError(f"the run finished without a {kind.replace('_', ' ')} for {option}", last.step)
                replaces_input = _replaces_input(option, path, input_path, overwrite_input)
                write_mrc(
                    path,
                    arrays[kind],
                    volume.voxel_size,
                    volume.origin,
                    overwrite=overwrite or replaces_input,
                    protected_paths=() if replaces_input else (input_path,),
                )
            written.append((path, kind))
        for path, _ in written:
            write_sidecar(path, records[path])
    except EBMError as error:
        logger.debug("writing the outputs failed", exc_info=True)
        done = ", ".join(str(path) for path, _ in written) or "none"
        _print_error_line("error: " + _join_sentences(str(error), f"Outputs written before the error: {done}."))
        return None
    except KeyboardInterrupt:
        done = ", ".join(str(path) for path, _ in written) or "none"
        raise CommandInterrupted(
            f"interrupted while writing the outputs; complete files written: {done}"
        ) from None
    return written


def _trace_csv(trace):
    buffer = StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TRACE_COLUMNS)
    for step, energy, data_energy, prior_energy in trace:
        writer.writerow((step, repr(energy), repr(data_energy), repr(prior_energy)))
    return buffer.getvalue()
