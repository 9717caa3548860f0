"""Speed benchmark: Langevin step cost and the cost of streaming into napari.

Prints, for phantom volumes of 64^3 and 128^3 voxels on the CPU:

1. the time of one Langevin step divided by the time of one gradient of E (target <= 1.15),
   for the wedge operator and the tv prior;
2. steps per second of a Langevin run started from the "EBM reconstruction" widget, streaming
   into a napari viewer, divided by the same run consumed headless (target >= 0.9).

Both ratios come from runs made side by side, alternating, in this one process; the medians
over the rounds are reported. Part 2 needs an OpenGL display: run it as

    xvfb-run -a .venv/bin/python benchmarks/bench_speed.py

or pass --no-gui for part 1 only.
"""

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from napari_ebm.phantom import make_phantom, observe
from napari_ebm.run import Reconstruction, RunConfig
from napari_ebm.samplers import GaussianNoise, langevin_step


def observed_phantom(size):
    truth = make_phantom((size, size, size), voxel_size=10.0, seed=0)
    return observe(truth, (-60.0, 60.0), noise_sigma=0.5, seed=1)


def langevin_config(steps, **overrides):
    values = dict(method="langevin", operator="wedge", prior="tv", steps=steps, burn_in=0, seed=0, device="cpu")
    values.update(overrides)
    return RunConfig(**values)


def time_calls(function, repeats):
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def step_over_gradient(size, rounds, repeats):
    reconstruction = Reconstruction(observed_phantom(size), langevin_config(1))
    energy = reconstruction.energy
    x = reconstruction.initial.clone()
    noise = GaussianNoise(0, torch.device("cpu"))

    def gradient():
        energy.value_and_grad(x)

    def step():
        langevin_step(x, energy, reconstruction.step_size, 1.0, noise)

    gradient()
    step()
    gradient_times, step_times = [], []
    for _ in range(rounds):
        gradient_times.append(time_calls(gradient, repeats))
        step_times.append(time_calls(step, repeats))
    return statistics.median(gradient_times), statistics.median(step_times)


def headless_rate(volume, steps):
    started = time.perf_counter()
    for _ in Reconstruction(volume, langevin_config(steps, preview_every=steps)).snapshots():
        pass
    return steps / (time.perf_counter() - started)


def widget_rate(viewer, widget, app, steps):
    widget.steps_spin.setValue(steps)
    started = time.perf_counter()
    if not widget.start():
        raise RuntimeError(f"the widget did not start: {widget.status.text()}")
    while widget.is_running():
        app.processEvents()
        time.sleep(0.002)
    return steps / (time.perf_counter() - started)


def streaming_ratio(size, steps, rounds, ndisplay):
    import napari
    from qtpy.QtWidgets import QApplication

    volume = observed_phantom(size)
    viewer = napari.Viewer(show=True)
    viewer.add_image(volume, name="phantom", scale=(10.0, 10.0, 10.0))
    viewer.dims.ndisplay = ndisplay
    _, widget = viewer.window.add_plugin_dock_widget("napari-ebm", "EBM reconstruction")
    widget.method_combo.setCurrentText("langevin")
    widget.operator_combo.setCurrentText("wedge")
    widget.prior_combo.setCurrentText("tv")
    widget.burn_in_spin.setValue(0)
    widget.seed_spin.setValue(0)
    widget.device_combo.setCurrentText("cpu")
    app = QApplication.instance()

    widget_rate(viewer, widget, app, 5)
    headless, streamed = [], []
    for _ in range(rounds):
        headless.append(headless_rate(volume, steps))
        streamed.append(widget_rate(viewer, widget, app, steps))
    layer_count = len(viewer.layers)
    viewer.close()
    return statistics.median(headless), statistics.median(streamed), layer_count


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="volume side lengths in voxels")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per measurement")
    parser.add_argument("--no-gui", action="store_true", help="skip the napari streaming measurement")
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")

    print("\n1. Langevin step / gradient of E (wedge operator, tv prior; target <= 1.15)")
    for size in args.sizes:
        repeats = max(3, int(2e6 / size**3) * 5)
        gradient_seconds, step_seconds = step_over_gradient(size, args.rounds, repeats)
        print(f"   {size}^3: gradient {gradient_seconds * 1e3:8.2f} ms, step {step_seconds * 1e3:8.2f} ms, "
              f"ratio {step_seconds / gradient_seconds:.3f}")

    if args.no_gui:
        return

    print("\n2. steps/s streaming into napari / headless (Langevin, wedge, tv; target >= 0.9)")
    for ndisplay in (2, 3):
        for size in args.sizes:
            steps = max(20, int(60 * (64 / size) ** 3))
            headless, streamed, layers = streaming_ratio(size, steps, args.rounds, ndisplay)
            print(f"   {size}^3, {ndisplay}D view, {steps} steps: headless {headless:7.2f} steps/s, "
                  f"widget {streamed:7.2f} steps/s, ratio {streamed / headless:.3f} ({layers} layers)")


if __name__ == "__main__":
    main()
