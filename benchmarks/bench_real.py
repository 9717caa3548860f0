"""Real-data benchmark: how well tv and a learned prior predict measured data they were not given.

A real tomogram has no ground truth, but it has measured Fourier data. This benchmark keeps only
the tilt angles within -40..40 degrees of the tomogram's own data as the observation, runs MAP on
it, and scores how well each estimate predicts the band 40 < |angle| <= 55 degrees that was
hidden from it. That band lies inside the tilt range the tomogram was measured with (its power
drops beyond about 65 degrees), so it serves as a second missing wedge whose measured values
are known.

Stationary noise at one frequency is uncorrelated with the noise at the others, so the noise in
the hidden band adds the same constant to the expected error of every method, and a lower error
means a better prediction. Reported per tomogram:
the band error relative to the band's power (the input, which is 0 there, scores 1), the same as
a gain in dB, and the correlation of the predicted band with the measured band. These are given
over the whole band, then over its frequencies up to 0.25 cycles per voxel, where the signal is
strongest.

    .venv/bin/python benchmarks/bench_real.py --prior phantom_dsm
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from napari_ebm.datasets import microtubule_path
from napari_ebm.io import read_volume
from napari_ebm.operators import Wedge, wedge_mask
from napari_ebm.run import RunConfig, reconstruct

OBSERVED_RANGE = (-40.0, 40.0)
HIDDEN_RANGE = (-55.0, 55.0)
# Spatial frequency in cycles per voxel (4 voxels per period) below which the band is also scored
# alone, where the signal of a tomogram is strongest.
LOW_FREQUENCY = 0.25
SHARED_14PF = Path(__file__).resolve().parents[2] / "shared" / "data" / "tomograms" / "microtubule_14pf.mrc"


def band_masks(shape):
    """Return the rfft masks of the hidden band, over all frequencies and up to LOW_FREQUENCY."""
    band = wedge_mask(shape, HIDDEN_RANGE) & ~wedge_mask(shape, OBSERVED_RANGE)
    kz = torch.fft.fftfreq(shape[0]).view(-1, 1, 1)
    ky = torch.fft.fftfreq(shape[1]).view(1, -1, 1)
    kx = torch.fft.rfftfreq(shape[2]).view(1, 1, -1)
    low = (kz**2 + ky**2 + kx**2).sqrt() <= LOW_FREQUENCY
    return {"all": band, "low": band & low}


def band_scores(estimate, measured, mask):
    """Return (relative error, correlation) of ``estimate`` against ``measured`` on the rfft ``mask``."""
    def restrict(volume):
        volume = torch.from_numpy(np.asarray(volume, dtype=np.float32))
        spectrum = torch.fft.rfftn(volume, norm="ortho") * mask
        return torch.fft.irfftn(spectrum, s=volume.shape, norm="ortho")

    band_estimate, band_measured = restrict(estimate), restrict(measured)
    error = float(((band_estimate - band_measured) ** 2).sum() / (band_measured**2).sum())

    # An estimate that is 0 in the band, like the input, is numerically 1e-7 there, not exactly 0.
    norms = float(band_estimate.norm() * band_measured.norm())
    if norms <= 1e-6 * float(band_measured.norm()) ** 2:
        return error, 0.0
    return error, float((band_estimate * band_measured).sum()) / norms


def row(name, estimate, measured, masks):
    cells = []
    for mask in masks.values():
        error, correlation = band_scores(estimate, measured, mask)
        # Adding 0.0 turns -0.0 into 0.0.
        cells += [f"{error:.3f}", f"{round(-10 * math.log10(max(error, 1e-12)), 2) + 0.0:+.2f}", f"{correlation + 0.0:.3f}"]
    return f"| {name} | " + " | ".join(cells) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", default="phantom_dsm", help="learned prior: a name or a .safetensors path")
    parser.add_argument("--tv-weight", type=float, default=0.5, help="tv weight (default: 0.5, chosen on the validation phantom by bench_quality.py)")
    parser.add_argument("--learned-weight", type=float, default=0.5, help="learned prior weight (default: 0.5, chosen the same way)")
    parser.add_argument("--steps", type=int, default=100, help="MAP steps")
    parser.add_argument(
        "--tomograms", nargs="+", default=[str(microtubule_path())] + ([str(SHARED_14PF)] if SHARED_14PF.is_file() else []),
        help="MRC tomograms measured with a tilt range of at least -55..55 degrees about Y (default: the shipped "
        "13-protofilament microtubule, and the 14-protofilament one when ../shared/data holds it)",
    )
    args = parser.parse_args()
    started = time.perf_counter()

    for path in args.tomograms:
        volume = read_volume(path)
        measured = np.asarray(volume.data, dtype=np.float32)
        masks = band_masks(measured.shape)
        observed = Wedge(measured.shape, OBSERVED_RANGE)(torch.from_numpy(measured)).numpy()

        estimates = {}
        for name, prior, weight in (("tv", "tv", args.tv_weight), ("learned", args.prior, args.learned_weight)):
            config = RunConfig(method="map", operator="wedge", tilt_range=OBSERVED_RANGE, prior=prior, weight=weight, steps=args.steps, seed=0, device="cpu")
            estimates[f"{name} MAP (weight {weight:g})"] = reconstruct(observed, config)[0].volume

        print(f"\n{Path(path).name}, {measured.shape} at {volume.voxel_size[0]:.2f} A: observed {OBSERVED_RANGE[1]:g} degrees, hidden band {OBSERVED_RANGE[1]:g}..{HIDDEN_RANGE[1]:g}")
        print(f"| method | band error | gain (dB) | correlation | band error, k <= {LOW_FREQUENCY:g} | gain (dB) | correlation |")
        print("|---|---|---|---|---|---|---|")
        print(row("input (0 in the band)", observed, measured, masks))
        for name, estimate in estimates.items():
            print(row(name, estimate, measured, masks))

    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
