"""Quality benchmark: tv MAP against a learned prior on held-out phantoms with a missing wedge.

For each held-out phantom (seeds below napari_ebm.training.TRAINING_SEED_OFFSET, never used in
training), the observation is the phantom plus white noise, restricted to a -60..60 degree wedge.
The prior weight of each method is chosen from a grid by PSNR on a separate validation phantom.
The learned Langevin chain starts with as many MAP steps as the MAP runs make, then keeps as many
samples at T = 1.
Prints PSNR (dB), SSIM and the FSC resolutions at 0.5 and 0.143 against the ground truth, and the
PSNR gain of the learned MAP over the best tv MAP (target >= 1.0 dB).

    .venv/bin/python benchmarks/bench_quality.py --prior PATH.safetensors
"""

import argparse
import time

import numpy as np

from napari_ebm.metrics import fsc_resolution, psnr, ssim
from napari_ebm.phantom import make_phantom, observe
from napari_ebm.run import RunConfig, reconstruct

VOXEL_SIZE = 10.0


def phantom_pair(seed, size, noise_sigma):
    truth = make_phantom((size,) * 3, voxel_size=VOXEL_SIZE, seed=seed)
    return truth, observe(truth, (-60.0, 60.0), noise_sigma=noise_sigma, seed=seed + 500)


def run_map(observed, prior, weight, steps, noise_sigma):
    config = RunConfig(method="map", operator="wedge", prior=prior, weight=weight, steps=steps, noise_sigma=noise_sigma, seed=0, device="cpu")
    return reconstruct(observed, config)[0].volume


def run_langevin_mean(observed, prior, weight, map_steps, samples, noise_sigma):
    """Return the posterior mean of ``samples`` Langevin steps at T = 1 after ``map_steps`` MAP steps."""
    config = RunConfig(
        method="langevin", operator="wedge", prior=prior, weight=weight, steps=map_steps + samples, burn_in=map_steps,
        map_start_steps=map_steps, temperature=1.0, noise_sigma=noise_sigma, seed=0, device="cpu",
    )
    return reconstruct(observed, config)[0].mean


def best_weight(observed, truth, prior, weights, steps, noise_sigma):
    scores = {weight: psnr(run_map(observed, prior, weight, steps, noise_sigma), truth) for weight in weights}
    return max(scores, key=scores.get), scores


def row(name, estimate, truth):
    return (f"| {name} | {psnr(estimate, truth):.2f} | {ssim(estimate, truth):.3f} | "
            f"{fsc_resolution(estimate, truth, VOXEL_SIZE, 0.5):.1f} | {fsc_resolution(estimate, truth, VOXEL_SIZE, 0.143):.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", required=True, help="learned prior: a name or a .safetensors path")
    parser.add_argument("--size", type=int, default=64, help="phantom side in voxels")
    parser.add_argument("--noise-sigma", type=float, default=0.5, help="noise standard deviation added to the phantom")
    parser.add_argument("--steps", type=int, default=150, help="MAP steps")
    parser.add_argument("--test-seeds", type=int, nargs="+", default=[1, 2], help="held-out test phantom seeds")
    args = parser.parse_args()
    started = time.perf_counter()

    validation_truth, validation_observed = phantom_pair(0, args.size, args.noise_sigma)
    tv_weight, tv_scores = best_weight(validation_observed, validation_truth, "tv", [0.25, 0.5, 1.0, 2.0, 4.0], args.steps, args.noise_sigma)
    learned_weight, learned_scores = best_weight(validation_observed, validation_truth, args.prior, [0.25, 0.5, 1.0, 2.0], args.steps, args.noise_sigma)
    print(f"validation phantom (seed 0): tv PSNR by weight {tv_scores}, best {tv_weight}")
    print(f"validation phantom (seed 0): learned PSNR by weight {learned_scores}, best {learned_weight}")

    gains = []
    for seed in args.test_seeds:
        truth, observed = phantom_pair(seed, args.size, args.noise_sigma)
        tv_map = run_map(observed, "tv", tv_weight, args.steps, args.noise_sigma)
        learned_map = run_map(observed, args.prior, learned_weight, args.steps, args.noise_sigma)
        learned_mean = run_langevin_mean(observed, args.prior, learned_weight, args.steps, args.steps, args.noise_sigma)
        print(f"\nheld-out phantom seed {seed}, {args.size}^3 at {VOXEL_SIZE:g} A, wedge -60..60, noise sigma {args.noise_sigma}")
        print("| method | PSNR (dB) | SSIM | FSC 0.5 (A) | FSC 0.143 (A) |")
        print("|---|---|---|---|---|")
        print(row("input", observed, truth))
        print(row(f"tv MAP (weight {tv_weight})", tv_map, truth))
        print(row(f"learned MAP (weight {learned_weight})", learned_map, truth))
        print(row("learned Langevin mean (T = 1, from MAP)", learned_mean, truth))
        gains.append(psnr(learned_map, truth) - psnr(tv_map, truth))

    print(f"\nlearned MAP - best tv MAP: {', '.join(f'{g:+.2f}' for g in gains)} dB (target >= +1.0); "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
