"""Speed benchmark: Langevin step cost and the cost of streaming into napari.

Prints, for phantom volumes of 64^3 and 128^3 voxels on the CPU:

1. the time of one Langevin step divided by the time of one gradient of E (target <= 1.15),
   for the wedge operator and the tv prior;
2. steps per second of a Langevin run started from the "EBM reconstruction" widget, streaming
   into a napari viewer, divided by the same run consumed headless (target >= 0.9).

Both ratios come from runs made side by side, alternating, in this one process. Each round gives
one ratio, and the median over the rounds is reported, because the load of a shared machine
changes from one second to the next. Part 2 needs an OpenGL display: run it as

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

    # Gradient and step alternate call by call, and each pair gives one ratio, so a change of
    # the machine's load affects both sides of a ratio alike.
    gradient_times, step_times, ratios = [], [], []
    for _ in range(rounds * repeats):
        gradient_seconds = time_calls(gradient, 1)
        step_seconds = time_calls(step, 1)
        gradient_times.append(gradient_seconds)
        step_times.append(step_seconds)
        ratios.append(step_seconds / gradient_seconds)
    return statistics.median(gradient_times), statistics.median(step_times), statistics.median(ratios)


def headless_rate(volume, steps):
    started = time.perf_counter()
    for _ in Reconstruction(volume, langevin_config(steps, preview_every=steps)).snapshots():
        pass
    return steps / (time.perf_counter() - started)


def widget_rate(widget, steps):
    """Run ``steps`` from the widget inside a Qt event loop and return steps per second."""
    from qtpy.QtCore import QEventLoop, QTimer

    widget.steps_spin.setValue(steps)
    loop = QEventLoop()
    poll = QTimer()
    poll.setInterval(50)
    poll.timeout.connect(lambda: None if widget.is_running() else loop.quit())

    started = time.perf_counter()
    if not widget.start():
        raise RuntimeError(f"the widget did not start: {widget.status.text()}")
    poll.start()
    loop.exec()
    poll.stop()
    return steps / (time.perf_counter() - started)


def streaming_ratio(size, seconds, rounds, ndisplay):
    import napari

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

    # A first short run creates the output layers; the timed runs update them in place. Each
    # timed run lasts about ``seconds``, so the start and the last update weigh little.
    widget_rate(widget, 5)
    steps = max(10, int(seconds * headless_rate(volume, 10)))
    headless, streamed = [], []
    for _ in range(rounds):
        headless.append(headless_rate(volume, steps))
        streamed.append(widget_rate(widget, steps))
    ratios = [widget / alone for widget, alone in zip(streamed, headless)]
    layer_count = len(viewer.layers)
    viewer.close()
    return steps, statistics.median(headless), statistics.median(streamed), statistics.median(ratios), layer_count


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="volume side lengths in voxels")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per measurement")
    parser.add_argument("--seconds", type=float, default=8.0, help="approximate duration of each streaming run")
    parser.add_argument("--views", type=int, nargs="+", default=[2, 3], help="napari display dimensions to measure")
    parser.add_argument("--no-gui", action="store_true", help="skip the napari streaming measurement")
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")

    print("\n1. Langevin step / gradient of E (wedge operator, tv prior; target <= 1.15)")
    for size in args.sizes:
        repeats = max(3, int(2e6 / size**3) * 5)
        gradient_seconds, step_seconds, ratio = step_over_gradient(size, args.rounds, repeats)
        print(f"   {size}^3: gradient {gradient_seconds * 1e3:8.2f} ms, step {step_seconds * 1e3:8.2f} ms, "
              f"median ratio over {args.rounds * repeats} pairs {ratio:.3f}")

    if args.no_gui:
        return

    print("\n2. steps/s streaming into napari / headless (Langevin, wedge, tv; target >= 0.9)")
    for ndisplay in args.views:
        for size in args.sizes:
            steps, headless, streamed, ratio, layers = streaming_ratio(size, args.seconds, args.rounds, ndisplay)
            print(f"   {size}^3, {ndisplay}D view, {steps} steps: headless {headless:7.2f} steps/s, "
                  f"widget {streamed:7.2f} steps/s, median ratio over {args.rounds} rounds {ratio:.3f} "
                  f"({layers} layers)")


if __name__ == "__main__":
    main()
