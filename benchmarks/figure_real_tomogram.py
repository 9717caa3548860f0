"""Draw the before/after picture of the README: the real microtubule tomogram and its MAP estimate.

Runs MAP with a prior on src/napari_ebm/data/microtubule_13pf.mrc and writes a PNG, scaled 3x.
The top row is the XY slice at the middle z and the bottom row the XZ slice at the middle y. The
input is on the left and the estimate on the right, each shown between its 1st and 99th
percentile.

    .venv/bin/python benchmarks/figure_real_tomogram.py --prior phantom_dsm --steps 60
"""

import argparse
import time

import numpy as np
from PIL import Image

from napari_ebm.datasets import microtubule_path
from napari_ebm.io import read_volume
from napari_ebm.run import RunConfig, reconstruct


def to_grey(image):
    low, high = np.percentile(image, [1, 99])
    return (255 * np.clip((image - low) / max(high - low, 1e-12), 0, 1)).astype(np.uint8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", default="phantom_dsm", help="prior name or .safetensors path")
    parser.add_argument("--steps", type=int, default=60, help="MAP steps")
    parser.add_argument("--out", default="docs/images/microtubule_before_after.png", help="PNG to write")
    args = parser.parse_args()

    volume = read_volume(microtubule_path())
    observed = np.asarray(volume.data, dtype=np.float32)
    started = time.perf_counter()
    final = reconstruct(observed, RunConfig(method="map", operator="wedge", prior=args.prior, steps=args.steps, seed=0))[0]
    print(f"MAP with {args.prior}, {final.step} steps on {observed.shape}: {time.perf_counter() - started:.0f} s")

    z, y = observed.shape[0] // 2, observed.shape[1] // 2
    gap = np.full((observed.shape[1], 2), 255, dtype=np.uint8)
    top = np.concatenate([to_grey(observed[z]), gap, to_grey(final.volume[z])], axis=1)
    gap = np.full((observed.shape[0], 2), 255, dtype=np.uint8)
    bottom = np.concatenate([to_grey(observed[:, y]), gap, to_grey(final.volume[:, y])], axis=1)
    rows = np.concatenate([top, np.full((2, top.shape[1]), 255, dtype=np.uint8), bottom], axis=0)

    # Each voxel becomes a 3 x 3 block of pixels, so single voxels stay visible on screen.
    image = Image.fromarray(rows)
    image.resize((3 * rows.shape[1], 3 * rows.shape[0]), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
