"""Run the sequence of runs that crashed the process when the wedge operator used irfftn on the CPU.

Run it from the repository root: ``.venv/bin/python scripts/reproduce_heap_crash.py``. It
prints "no crash" when the process survives.

With ``torch.fft.irfftn`` as the inverse transform of the wedge operator, on a 2 vCPU Intel Xeon
VM with torch 2.13.0+cpu, this sequence crashed in 8 of 10 tries with SIGABRT ("double free or
corruption" or "free(): invalid pointer" inside MKL's sgemm buffers) or SIGSEGV. It did not
crash without the first learned-prior run, or with the denoise operator in the first run or in
the large runs (7 tries each). A complex fftn in place of the forward transform still crashed
in 4 of 4 tries. A complex ifftn of the full spectrum in place of the inverse crashed in none of
4, so the wedge operator now uses that inverse on the CPU. Since then the script
printed "no crash" in 8 of 8 tries.
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
