"""Reproduce a crash of the Python process that mixes learned-prior and wedge runs.

Run it from the repository root: ``.venv/bin/python scripts/reproduce_heap_crash.py``.
On a 2 vCPU Intel Xeon VM with torch 2.13.0+cpu it crashed in 8 of 10 tries, mostly in the
first repetition. The process ended with SIGABRT ("double free or corruption" or "free():
invalid pointer" inside MKL's sgemm buffers) or with SIGSEGV. It printed "no crash" in all
7 tries without the first learned-prior run, in all 7 with the denoise operator in place of
the wedge in the large runs, and in all 7 with the denoise operator in the first run. With
``tv`` in place of the last learned prior it crashed in 1 of 4 tries, so the heap is already
damaged before that run. The cause is not known.
"""

import warnings

import numpy as np

from napari_ebm.run import Reconstruction, RunConfig


def noisy_volume(shape):
    """Return a bright box on a flat background with Gaussian noise, as float32."""
    volume = np.random.default_rng(0).normal(0.0, 0.5, size=shape).astype(np.float32)
    volume[tuple(slice(n // 4, max(n // 4 + 1, 3 * n // 4)) for n in shape)] += 2.0
    return volume


def run(shape, **settings):
    """Run 2 steps on a noisy volume of ``shape`` and discard the result."""
    for _ in Reconstruction(noisy_volume(shape), RunConfig(steps=2, seed=0, **settings)).snapshots():
        pass


def main():
    warnings.simplefilter("ignore")

    run((16, 20, 18), method="map", prior="phantom_dsm")

    for repetition in range(3):
        run((8, 512, 512), method="map", operator="wedge", prior="tv", tolerance=0.0)
        run((8, 512, 512), method="langevin", operator="wedge", prior="tv", tolerance=0.0)
        run((1, 64, 64), method="langevin", operator="wedge", prior="phantom_dsm")
        print(f"repetition {repetition + 1} of 3 finished", flush=True)

    print("no crash")


if __name__ == "__main__":
    main()
