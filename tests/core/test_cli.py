"""The napari-ebm command line, run in-process through main() and as real subprocesses.

Inputs are small MRC files written with mrcfile, with a voxel size of (3.0, 2.0, 1.5) Angstrom
and a non-zero origin in (z, y, x) order, so that a swapped axis order shows up in the outputs.
"""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from prior_helpers import CallCountingPrior

from napari_ebm import __version__
from napari_ebm.cli import main
from napari_ebm.datasets import microtubule_path
from napari_ebm.io import read_volume
from napari_ebm.run import Reconstruction, RunConfig, reconstruct

SHAPE = (16, 20, 18)
VOXEL_SIZE = (3.0, 2.0, 1.5)
ORIGIN = (30.0, -20.0, 10.5)
SOURCE = Path(__file__).resolve().parents[2] / "src"


def write_input(path, voxel_size=VOXEL_SIZE, origin=ORIGIN):
    """Write a noisy cube on a flat background as float32 MRC. Sizes and origin are (z, y, x)."""
    rng = np.random.default_rng(0)
    data = rng.normal(0.0, 0.5, size=SHAPE).astype(np.float32)
    data[4:12, 5:15, 4:14] += 2.0
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = tuple(reversed(voxel_size))
        mrc.header.origin = tuple(reversed(origin))
    return path


def read_mrc(path):
    with mrcfile.open(path) as mrc:
        data = mrc.data.copy()
        voxel_size = tuple(float(mrc.voxel_size[axis]) for axis in "zyx")
        origin = tuple(float(mrc.header.origin[axis]) for axis in "zyx")
    return data, voxel_size, origin


def read_sidecar(path):
    return json.loads(Path(f"{path}.json").read_text())


@pytest.fixture
def volume_path(tmp_path):
    return write_input(tmp_path / "input.mrc")


def run_cli(capsys, *args):
    """Run main() with ``args`` converted to strings and return (exit code, stdout, stderr)."""
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------
# Successful runs


def test_map_keeps_voxel_size_and_origin(tmp_path, volume_path, capsys):
    out = tmp_path / "map.mrc"

    code, _, err = run_cli(capsys, "reconstruct", volume_path, "--out", out, "--steps", 5, "--quiet")
    data, voxel_size, origin = read_mrc(out)

    assert code == 0, err
    assert data.shape == SHAPE
    assert voxel_size == pytest.approx(VOXEL_SIZE, abs=1e-4)
    assert origin == pytest.approx(ORIGIN, abs=1e-4)


def test_map_prints_run_and_result_lines(tmp_path, volume_path, capsys):
    out = tmp_path / "map.mrc"

    code, stdout, _ = run_cli(capsys, "reconstruct", volume_path, "--out", out, "--steps", 5, "--seed", 11, "--quiet")
    first, last = stdout.strip().splitlines()

    assert code == 0
    assert "16 x 20 x 18 voxels" in first
    assert "voxel size 3 x 2 x 1.5 Angstrom" in first
    assert re.search(r"noise sigma [0-9.e+-]+ \(estimated\)", first)
    assert re.search(r"step size [0-9.e+-]+ \(automatic\)", first)
    assert "seed 11 (given)" in first
    assert re.search(r"device (cpu|cuda|mps)", first)
    assert str(out) in last
    assert "steps/s" in last


def test_langevin_writes_mean_and_std(tmp_path, volume_path, capsys):
    mean_path = tmp_path / "mean.mrc"
    std_path = tmp_path / "std.mrc"

    code, _, err = run_cli(
        capsys, "reconstruct", volume_path, "--out", mean_path, "--std-out", std_path,
        "--method", "langevin", "--steps", 20, "--burn-in", 5, "--seed", 1, "--quiet",
    )
    mean, _, _ = read_mrc(mean_path)
    std, voxel_size, origin = read_mrc(std_path)

    assert code == 0, err
    assert mean.shape == SHAPE
    assert std.shape == SHAPE
    assert np.all(std >= 0)
    assert np.any(std > 0)
    assert voxel_size == pytest.approx(VOXEL_SIZE, abs=1e-4)
    assert origin == pytest.approx(ORIGIN, abs=1e-4)


def test_langevin_map_start_recorded(tmp_path, volume_path, capsys):
    mean_path = tmp_path / "mean.mrc"

    code, _, err = run_cli(
        capsys, "reconstruct", volume_path, "--out", mean_path, "--method", "langevin", "--steps", 8,
        "--burn-in", 4, "--map-start-steps", 3, "--seed", 1, "--quiet",
    )
    parameters = read_sidecar(mean_path)["parameters"]

    assert code == 0, err
    assert parameters["map_start_steps"] == 3


def test_trace_has_row_per_step(tmp_path, volume_path, capsys):
    trace = tmp_path / "trace.csv"
    steps = 7

    code, _, err = run_cli(
        capsys, "reconstruct", volume_path, "--out", tmp_path / "map.mrc", "--trace", trace,
        "--steps", steps, "--tolerance", 0, "--quiet",
    )
    with trace.open(newline="") as stream:
        rows = list(csv.reader(stream))

    assert code == 0, err
    assert rows[0] == ["step", "energy", "data_energy", "prior_energy"]
    assert len(rows) == steps + 1
    assert [int(row[0]) for row in rows[1:]] == list(range(1, steps + 1))
    assert all(np.isfinite(float(value)) for row in rows[1:] for value in row[1:])


def test_sidecars_record_seed_and_command(tmp_path, volume_path, capsys):
    mean_path = tmp_path / "mean.mrc"
    std_path = tmp_path / "std.mrc"
    trace = tmp_path / "trace.csv"
    argv = [
        "reconstruct", str(volume_path), "--out", str(mean_path), "--std-out", str(std_path),
        "--trace", str(trace), "--method", "langevin", "--steps", "6", "--seed", "42", "--quiet",
    ]

    code = main(argv)
    capsys.readouterr()

    assert code == 0
    for path, kind in ((mean_path, "posterior_mean"), (std_path, "posterior_std"), (trace, "energy_trace")):
        record = read_sidecar(path)
        assert record["napari_ebm_version"] == __version__
        assert record["command"] == ["napari-ebm", *argv]
        assert record["output"] == {"path": str(path.resolve()), "kind": kind}
        assert record["parameters"]["seed"] == 42
        assert record["parameters"]["method"] == "langevin"
        assert record["parameters"]["step_size_used"] > 0
        assert record["input"]["path"] == str(volume_path.resolve())
        assert record["input"]["shape"] == list(SHAPE)
        assert record["input"]["voxel_size"] == pytest.approx(VOXEL_SIZE)
        assert record["input"]["origin"] == pytest.approx(ORIGIN)
        assert record["result"]["steps_run"] == 6
        assert record["result"]["samples"] == 6
        assert record["timings"]["steps_per_second"] > 0
        assert record["timings"]["started"].endswith("+00:00")


def test_drawn_seed_is_printed_and_recorded(tmp_path, volume_path, capsys):
    out = tmp_path / "map.mrc"

    code, stdout, _ = run_cli(capsys, "reconstruct", volume_path, "--out", out, "--steps", 2, "--quiet")
    seed = read_sidecar(out)["parameters"]["seed"]

    assert code == 0
    assert f"seed {seed} (drawn)" in stdout
    assert "weight 1 (the prior's default)" in stdout
    assert "temperature" not in stdout


def test_langevin_run_line_names_temperature(tmp_path, volume_path, capsys):
    lines = []
    for extra in ([], ["--temperature", "0.5"]):
        out = tmp_path / f"langevin{len(extra)}.mrc"
        code, stdout, _ = run_cli(capsys, "reconstruct", volume_path, "--out", out, "--method", "langevin", "--steps", 2, "--quiet", *extra)
        assert code == 0
        lines.append(stdout)

    assert "temperature 1 (the prior's default)" in lines[0]
    assert "temperature 0.5 (given)" in lines[1]
    assert read_sidecar(tmp_path / "langevin2.mrc")["parameters"]["temperature_used"] == 0.5


def test_same_seed_same_langevin_output(tmp_path, volume_path, capsys):
    outputs = []
    for run in ("a", "b"):
        mean_path = tmp_path / f"mean_{run}.mrc"
        std_path = tmp_path / f"std_{run}.mrc"
        code, _, err = run_cli(
            capsys, "reconstruct", volume_path, "--out", mean_path, "--std-out", std_path,
            "--method", "langevin", "--steps", 10, "--seed", 123, "--device", "cpu", "--quiet",
        )
        assert code == 0, err
        outputs.append((read_mrc(mean_path)[0], read_mrc(std_path)[0]))

    assert np.array_equal(outputs[0][0], outputs[1][0])
    assert np.array_equal(outputs[0][1], outputs[1][1])


def test_overwrite_replaces_existing_out(tmp_path, volume_path, capsys):
    out = tmp_path / "map.mrc"
    out.write_bytes(b"old")
    Path(f"{out}.json").write_text("{}")

    code, _, err = run_cli(
        capsys, "reconstruct", volume_path, "--out", out, "--steps", 2, "--overwrite", "--quiet"
    )

    assert code == 0, err
    assert read_mrc(out)[0].shape == SHAPE
    assert read_sidecar(out)["output"]["kind"] == "map"


def test_priors_lists_one_per_line(capsys):
    code, stdout, _ = run_cli(capsys, "priors")
    names = [line.split()[0] for line in stdout.splitlines()]

    assert code == 0
    assert names[:3] == ["l2", "smooth", "tv"]
    assert "phantom_dsm" in names
    assert all(len(line.split(maxsplit=1)) == 2 for line in stdout.splitlines())


def test_priors_shows_training_voxel_size(capsys):
    _, stdout, _ = run_cli(capsys, "priors")

    shipped = [line for line in stdout.splitlines() if line.startswith("phantom_dsm")]

    assert len(shipped) == 1
    assert "trained at 10 A per voxel" in shipped[0]


def test_fallback_voxel_size_warns(tmp_path, capsys):
    path = tmp_path / "no_voxel_size.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.random.default_rng(1).normal(size=SHAPE).astype(np.float32))

    code, _, err = run_cli(capsys, "reconstruct", path, "--out", tmp_path / "map.mrc", "--steps", 2, "--quiet")

    assert code == 0
    assert "napari-ebm: warning:" in err
    assert "voxel size" in err


def test_voxel_size_option_fills_missing_header(tmp_path, capsys):
    path = tmp_path / "no_voxel_size.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.random.default_rng(1).normal(size=SHAPE).astype(np.float32))
    out = tmp_path / "map.mrc"

    code, _, err = run_cli(capsys, "reconstruct", path, "--out", out, "--steps", 2, "--quiet", "--voxel-size", 2.5)

    assert code == 0
    assert "fallback voxel size of 2.5 Angstrom" in err
    _, voxel_size, _ = read_mrc(out)
    np.testing.assert_allclose(voxel_size, (2.5, 2.5, 2.5), atol=1e-4)


def test_voxel_size_option_keeps_header_value(tmp_path, capsys):
    path = write_input(tmp_path / "in.mrc")
    out = tmp_path / "map.mrc"

    code, _, _ = run_cli(capsys, "reconstruct", path, "--out", out, "--steps", 2, "--quiet", "--voxel-size", 2.5)

    assert code == 0
    _, voxel_size, _ = read_mrc(out)
    np.testing.assert_allclose(voxel_size, VOXEL_SIZE, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Rejected input: exit code 2, a message naming the option or file, nothing written

INVALID_OPTIONS = [
    (["--temperature", "-1"], "--temperature"),
    (["--step-size", "0"], "--step-size"),
    (["--step-size", "-0.5"], "--step-size"),
    (["--step-size", "nan"], "--step-size"),
    (["--step-size", "-1"], "--step-size"),
    (["--temperature", "nan"], "--temperature"),
    (["--threads", "0"], "--threads"),
    (["--voxel-size", "0"], "--voxel-size"),
    (["--voxel-size", "-2"], "--voxel-size"),
    (["--threads", "-3"], "--threads"),
    (["--weight", "inf"], "--weight"),
    (["--steps", "0"], "--steps"),
    (["--steps", "1.5"], "--steps"),
    (["--tilt-range", "60", "-60"], "--tilt-range"),
    (["--std-out", "std.mrc"], "--std-out"),
    (["--method", "langevin", "--steps", "10", "--burn-in", "10"], "--burn-in"),
    (["--method", "langevin", "--steps", "10", "--thin", "20"], "--thin"),
    (["--method", "langevin", "--steps", "10", "--burn-in", "2", "--map-start-steps", "3"], "--map-start-steps"),
    (["--prior", "nonexistent"], "nonexistent"),
    (["--seed", "-1"], "--seed"),
]


@pytest.mark.parametrize(("options", "named"), INVALID_OPTIONS, ids=[" ".join(case[0]) for case in INVALID_OPTIONS])
def test_invalid_option_exits_2(tmp_path, volume_path, capsys, options, named):
    out = tmp_path / "map.mrc"
    options = [str(tmp_path / option) if option == "std.mrc" else option for option in options]

    code, _, err = run_cli(capsys, "reconstruct", volume_path, "--out", out, "--quiet", *options)

    assert code == 2
    assert named in err
    assert "Traceback" not in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [volume_path]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_exits_2(tmp_path, volume_path, capsys):
    out = tmp_path / "map.mrc"

    code, _, err = run_cli(capsys, "reconstruct", volume_path, "--out", out, "--device", "cuda", "--quiet")

    assert code == 2
    assert "--device cuda" in err
    assert not out.exists()


def test_missing_input_exits_2(tmp_path, capsys):
    missing = tmp_path / "missing.mrc"

    code, _, err = run_cli(capsys, "reconstruct", missing, "--out", tmp_path / "map.mrc", "--quiet")

    assert code == 2
    assert str(missing) in err
    assert "not found" in err


def test_existing_out_kept_without_overwrite(tmp_path, volume_path, capsys):
    out = tmp_path / "map.mrc"
    out.write_bytes(b"keep me")

    code, _, err = run_cli(capsys, "reconstruct", volume_path, "--out", out, "--quiet")

    assert code == 2
    assert "--overwrite" in err
    assert str(out) in err
    assert out.read_bytes() == b"keep me"
    assert not Path(f"{out}.json").exists()


def test_existing_sidecar_kept_without_overwrite(tmp_path, volume_path, capsys):
    out = tmp_path / "map.mrc"
    sidecar = Path(f"{out}.json")
    sidecar.write_text("{}")

    code, _, err = run_cli(capsys, "reconstruct", volume_path, "--out", out, "--quiet")

    assert code == 2
    assert str(sidecar) in err
    assert not out.exists()
    assert sidecar.read_text() == "{}"


def test_out_equal_input_rejected(tmp_path, volume_path, capsys):
    before = volume_path.read_bytes()

    code, _, err = run_cli(capsys, "reconstruct", volume_path, "--out", volume_path, "--overwrite", "--quiet")

    assert code == 2
    assert "is the input file" in err
    assert "--overwrite-input" in err
    assert volume_path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [volume_path]


def test_out_through_symlink_to_input_rejected(tmp_path, volume_path, capsys):
    link = tmp_path / "link.mrc"
    link.symlink_to(volume_path)
    before = volume_path.read_bytes()

    code, _, err = run_cli(capsys, "reconstruct", volume_path, "--out", link, "--overwrite", "--quiet")

    assert code == 2
    assert "input" in err
    assert volume_path.read_bytes() == before


def test_std_out_equal_out_rejected(tmp_path, volume_path, capsys):
    out = tmp_path / "mean.mrc"

    code, _, err = run_cli(
        capsys, "reconstruct", volume_path, "--out", out, "--std-out", out, "--method", "langevin", "--quiet"
    )

    assert code == 2
    assert "same file" in err
    assert not out.exists()


def test_trace_on_sidecar_path_rejected(tmp_path, volume_path, capsys):
    out = tmp_path / "map.mrc"

    code, _, err = run_cli(capsys, "reconstruct", volume_path, "--out", out, "--trace", f"{out}.json", "--quiet")

    assert code == 2
    assert "sidecar" in err
    assert not out.exists()


def test_missing_output_folder_exits_2(tmp_path, volume_path, capsys):
    out = tmp_path / "missing_folder" / "map.mrc"

    code, _, err = run_cli(capsys, "reconstruct", volume_path, "--out", out, "--quiet")

    assert code == 2
    assert "does not exist" in err
    assert str(out.parent) in err


def test_non_mrc_out_exits_2(tmp_path, volume_path, capsys):
    out = tmp_path / "map.tif"

    code, _, err = run_cli(capsys, "reconstruct", volume_path, "--out", out, "--quiet")

    assert code == 2
    assert "MRC" in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Failed and interrupted runs


def test_divergence_exits_1_without_output(tmp_path, volume_path, capsys):
    out = tmp_path / "map.mrc"
    trace = tmp_path / "trace.csv"

    code, _, err = run_cli(
        capsys, "reconstruct", volume_path, "--out", out, "--trace", trace,
        "--step-size", "1e6", "--operator", "denoise", "--prior", "l2",
    )

    assert code == 1
    assert re.search(r"at step \d+ with step size 1e\+06", err)
    assert "--step-size" in err
    assert "No output was written" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert not trace.exists()
    assert list(tmp_path.iterdir()) == [volume_path]


def test_interrupt_exits_130(tmp_path, volume_path, capsys, monkeypatch):
    original = Reconstruction.snapshots

    def interrupted_snapshots(self):
        snapshots = original(self)
        yield next(snapshots)
        raise KeyboardInterrupt

    monkeypatch.setattr(Reconstruction, "snapshots", interrupted_snapshots)
    out = tmp_path / "map.mrc"

    code, _, err = run_cli(capsys, "reconstruct", volume_path, "--out", out, "--steps", 5, "--quiet")

    assert code == 130
    assert "interrupted at step 2; no output written" in err
    assert not out.exists()


def test_unexpected_error_hides_traceback(tmp_path, volume_path, capsys, monkeypatch):
    def failing_snapshots(self):
        raise ZeroDivisionError("injected failure")
        yield

    monkeypatch.setattr(Reconstruction, "snapshots", failing_snapshots)

    code, _, err = run_cli(capsys, "reconstruct", volume_path, "--out", tmp_path / "map.mrc", "--quiet")

    assert code == 1
    assert "ZeroDivisionError: injected failure" in err
    assert "--debug" in err
    assert "Traceback" not in err


def test_debug_reraises_unexpected_error(tmp_path, volume_path, capsys, monkeypatch):
    def failing_snapshots(self):
        raise ZeroDivisionError("injected failure")
        yield

    monkeypatch.setattr(Reconstruction, "snapshots", failing_snapshots)

    with pytest.raises(ZeroDivisionError):
        main(["--debug", "reconstruct", str(volume_path), "--out", str(tmp_path / "map.mrc"), "--quiet"])


# ---------------------------------------------------------------------------------------------
# Real subprocesses: python -m napari_ebm


def run_module(*args):
    environment = dict(os.environ, PYTHONPATH=str(SOURCE))
    return subprocess.run(
        [sys.executable, "-m", "napari_ebm", *map(str, args)],
        capture_output=True, text=True, env=environment, timeout=300,
    )


def test_module_run_writes_output(tmp_path, volume_path):
    out = tmp_path / "map.mrc"

    result = run_module("reconstruct", volume_path, "--out", out, "--steps", 3)

    assert result.returncode == 0, result.stderr
    assert out.exists()
    assert Path(f"{out}.json").exists()
    assert "Traceback" not in result.stderr


def test_module_error_has_no_traceback(tmp_path):
    missing = tmp_path / "missing.mrc"

    result = run_module("reconstruct", missing, "--out", tmp_path / "map.mrc")

    assert result.returncode == 2
    assert result.stderr.startswith("napari-ebm: error:")
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name, content, phrase", [("fake.mrc", b"not a volume\n", "1024-byte header"), ("notes.txt", b"text\n", "suffix")])
def test_view_bad_input_exits_2(tmp_path, capsys, name, content, phrase):
    path = tmp_path / name
    path.write_bytes(content)

    code, _, err = run_cli(capsys, "view", str(path))

    assert code == 2
    assert name in err
    assert phrase in err
    assert "Traceback" not in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the display check applies to Linux only")
def test_view_without_display_exits_2(capsys, monkeypatch):
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)

    code, _, err = run_cli(capsys, "view")

    assert code == 2
    assert "no display to open napari on" in err
    assert "xvfb-run -a bash scripts/view.sh" in err


def test_view_missing_file_exits_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "view", str(tmp_path / "nope.mrc"))

    assert code == 2
    assert "nope.mrc" in err


def test_prior_voxel_mismatch_warns(tmp_path, capsys):
    path = write_input(tmp_path / "fine.mrc", voxel_size=(4.0, 4.0, 4.0))

    code, _, err = run_cli(capsys, "reconstruct", path, "--out", tmp_path / "out.mrc", "--prior", "phantom_dsm", "--steps", "2", "--quiet")

    assert code == 0
    assert "differs from the 10 A" in err


def test_resample_writes_prior_voxel_size(tmp_path, capsys):
    path = write_input(tmp_path / "fine.mrc", voxel_size=(4.0, 4.0, 4.0))
    out = tmp_path / "out.mrc"

    code, stdout, _ = run_cli(capsys, "reconstruct", path, "--out", out, "--prior", "phantom_dsm", "--steps", "2", "--resample", "--quiet")

    with mrcfile.open(out) as mrc:
        voxel_x = float(mrc.voxel_size.x)
        shape = list(mrc.data.shape)
    record = json.loads(Path(f"{out}.json").read_text())
    assert code == 0
    assert "resampled" in stdout
    assert voxel_x == pytest.approx(10.0, rel=0.15)
    assert record["input"]["voxel_size"] == [4.0, 4.0, 4.0]
    assert record["input"]["shape"] != shape
    assert record["resampled"]["from_shape"] == record["input"]["shape"]
    assert record["resampled"]["to_shape"] == shape
    assert record["resampled"]["to_voxel_size"][2] == pytest.approx(voxel_x, rel=1e-5)


@pytest.mark.parametrize(("method", "extra"), [("map", []), ("langevin", ["--burn-in", "1", "--std-out", "STD"])])
def test_shipped_prior_on_real_tomogram(tmp_path, capsys, method, extra):
    observed, voxel_size, origin = read_mrc(microtubule_path())
    out = tmp_path / f"{method}.mrc"
    std_out = tmp_path / "std.mrc"
    extra = [str(std_out) if argument == "STD" else argument for argument in extra]

    code = main([
        "reconstruct", str(microtubule_path()), "--out", str(out), "--prior", "phantom_dsm",
        "--method", method, "--steps", "3", "--seed", "0", "--quiet", *extra,
    ])
    _, err = capsys.readouterr()

    assert code == 0
    assert "differs from" not in err
    for path in [out, std_out] if method == "langevin" else [out]:
        data, out_voxel_size, out_origin = read_mrc(path)
        assert data.shape == (36, 206, 94)
        np.testing.assert_allclose(out_voxel_size, voxel_size, atol=1e-4)
        np.testing.assert_allclose(out_origin, origin)
        assert np.isfinite(data).all()
    estimate, _, _ = read_mrc(out)
    assert not np.allclose(estimate, observed.astype(np.float32))
    if method == "langevin":
        std, _, _ = read_mrc(std_out)
        assert float(std.max()) > 0.0


# ---------------------------------------------------------------------------------------------
# Odd shapes, divergence, memory, threads and replacing the input


def write_volume(path, data):
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = tuple(reversed(VOXEL_SIZE))
    return path


def noisy_box(shape):
    data = np.random.default_rng(2).normal(0.0, 0.5, size=shape).astype(np.float32)
    data[tuple(slice(n // 4, max(n // 4 + 1, 3 * n // 4)) for n in shape)] += 2.0
    return data


ODD_SHAPES = [
    pytest.param((31, 37, 41), id="31x37x41"),
    pytest.param((1, 64, 64), id="1x64x64"),
]


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("method", ["map", "langevin"])
def test_odd_shape_output_keeps_shape(tmp_path, capsys, shape, method):
    path = write_volume(tmp_path / "odd.mrc", noisy_box(shape))
    out = tmp_path / "out.mrc"

    code, _, err = run_cli(
        capsys, "reconstruct", path, "--out", out, "--method", method, "--operator", "wedge", "--steps", 2, "--quiet"
    )

    assert code == 0, err
    data, voxel_size, _ = read_mrc(out)
    assert data.shape == read_mrc(path)[0].shape
    assert np.isfinite(data).all()
    assert voxel_size == pytest.approx(VOXEL_SIZE, abs=1e-4)


def test_thin_volume_warning_precedes_progress(tmp_path, capsys):
    path = write_volume(tmp_path / "thin.mrc", noisy_box((8, 32, 32)))

    code, _, err = run_cli(capsys, "reconstruct", path, "--out", tmp_path / "out.mrc", "--steps", 2)

    assert code == 0
    warning = "napari-ebm: warning: the volume of shape (8, 32, 32) is thin along z (8 voxels)"
    assert warning in err
    assert err.index(warning) < err.index("map:")


class NaNFromCallSeven(CallCountingPrior):
    """The l2 energy, which is NaN from its seventh evaluation on."""

    def on_call(self, calls, x, energy):
        return energy * float("nan") if calls >= 7 else energy


class MemoryErrorAtCallThree(CallCountingPrior):
    """The l2 energy, which raises MemoryError on its third evaluation."""

    def on_call(self, calls, x, energy):
        if calls == 3:
            raise MemoryError("test allocation failure")
        return energy


def test_nan_energy_exits_1_naming_step(tmp_path, volume_path, capsys, register_prior):
    prior = register_prior("cli_test_prior", NaNFromCallSeven)
    out = tmp_path / "mean.mrc"

    code, _, err = run_cli(
        capsys, "reconstruct", volume_path, "--out", out, "--method", "langevin", "--prior", prior,
        "--step-size", "0.01", "--steps", 20, "--quiet",
    )

    assert code == 1
    assert "at step 7 with step size 0.01" in err
    assert "stopped after step 6" in err
    assert "Lower --step-size, or --temperature for Langevin" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [volume_path]


def test_memory_shortage_exits_2(tmp_path, volume_path, capsys, monkeypatch):
    monkeypatch.setattr("napari_ebm.run.available_memory", lambda device: 2048)

    code, _, err = run_cli(capsys, "reconstruct", volume_path, "--out", tmp_path / "map.mrc", "--quiet")

    assert code == 2
    assert re.search(r"needs about [0-9.]+ MiB on cpu", err)
    assert "only 2 KiB is free" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [volume_path]


def test_out_of_memory_exits_1(tmp_path, volume_path, capsys, register_prior):
    prior = register_prior("cli_test_prior", MemoryErrorAtCallThree)

    code, _, err = run_cli(
        capsys, "reconstruct", volume_path, "--out", tmp_path / "mean.mrc", "--method", "langevin",
        "--prior", prior, "--steps", 10, "--quiet",
    )

    assert code == 1
    assert "out of memory at step 3" in err
    assert "No output was written" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [volume_path]


def test_threads_recorded_in_sidecar(tmp_path, volume_path, capsys):
    out = tmp_path / "map.mrc"

    code, stdout, err = run_cli(capsys, "reconstruct", volume_path, "--out", out, "--steps", 2, "--threads", 1, "--quiet")
    parameters = read_sidecar(out)["parameters"]

    assert code == 0, err
    assert "1 CPU thread" in stdout
    assert parameters["threads"] == 1
    assert parameters["threads_used"] == 1


def test_overwrite_input_replaces_input(tmp_path, volume_path, capsys):
    copy = tmp_path / "copy.mrc"
    copy.write_bytes(volume_path.read_bytes())
    separate = tmp_path / "separate.mrc"
    options = ["--steps", 3, "--seed", 5, "--threads", 1, "--quiet"]
    code, _, err = run_cli(capsys, "reconstruct", copy, "--out", separate, *options)
    assert code == 0, err

    code, stdout, err = run_cli(capsys, "reconstruct", volume_path, "--out", volume_path, "--overwrite-input", *options)
    replaced, voxel_size, origin = read_mrc(volume_path)

    assert code == 0, err
    assert str(volume_path) in stdout
    np.testing.assert_array_equal(replaced, read_mrc(separate)[0])
    assert voxel_size == pytest.approx(VOXEL_SIZE, abs=1e-4)
    assert origin == pytest.approx(ORIGIN, abs=1e-4)
    assert read_sidecar(volume_path)["output"]["path"] == str(volume_path.resolve())
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def test_overwrite_input_follows_symlink(tmp_path, volume_path, capsys):
    link = tmp_path / "link.mrc"
    link.symlink_to(volume_path)
    before = read_mrc(volume_path)[0]

    code, _, err = run_cli(
        capsys, "reconstruct", link, "--out", link, "--overwrite-input", "--steps", 2, "--seed", 1, "--quiet"
    )

    assert code == 0, err
    assert link.is_symlink()
    assert not np.array_equal(read_mrc(volume_path)[0], before)
    assert Path(f"{volume_path}.json").exists()


def test_overwrite_input_kept_when_write_fails(tmp_path, volume_path, capsys, monkeypatch):
    before = volume_path.read_bytes()
    replace = os.replace

    def failing_replace(source, target):
        if Path(target).resolve() == volume_path.resolve():
            raise OSError(28, "No space left on device")
        return replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)

    code, _, err = run_cli(
        capsys, "reconstruct", volume_path, "--out", volume_path, "--overwrite-input", "--steps", 2, "--quiet"
    )

    assert code == 1
    assert "No space left on device" in err
    assert volume_path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [volume_path]


def test_overwrite_input_only_for_out(tmp_path, volume_path, capsys):
    before = volume_path.read_bytes()

    code, _, err = run_cli(
        capsys, "reconstruct", volume_path, "--out", tmp_path / "mean.mrc", "--std-out", volume_path,
        "--method", "langevin", "--overwrite-input", "--quiet",
    )

    assert code == 2
    assert "--std-out" in err
    assert "Only --out may replace the input" in err
    assert volume_path.read_bytes() == before


def test_sidecar_reruns_bit_identical(tmp_path, volume_path, capsys):
    mean_path = tmp_path / "mean.mrc"
    std_path = tmp_path / "std.mrc"
    code, _, err = run_cli(
        capsys, "reconstruct", volume_path, "--out", mean_path, "--std-out", std_path, "--method", "langevin",
        "--steps", 6, "--burn-in", 2, "--prior", "tv", "--quiet",
    )
    assert code == 0, err

    config = RunConfig.from_parameters(read_sidecar(mean_path)["parameters"])
    last, _ = reconstruct(read_volume(volume_path).data, config)

    np.testing.assert_array_equal(last.mean, read_mrc(mean_path)[0])
    np.testing.assert_array_equal(last.std, read_mrc(std_path)[0])


def test_sidecar_records_absolute_prior_file(tmp_path, capsys, monkeypatch):
    import shutil

    from napari_ebm.prior_files import resolve_prior

    shipped = Path(resolve_prior("phantom_dsm").metadata["file"])
    shutil.copy(shipped, tmp_path / "copy.safetensors")
    shutil.copy(shipped.with_suffix(".json"), tmp_path / "copy.json")
    path = write_input(tmp_path / "input.mrc", voxel_size=(10.0, 10.0, 10.0))
    monkeypatch.chdir(tmp_path)

    code, _, _ = run_cli(capsys, "reconstruct", path, "--out", "out.mrc", "--prior", "copy.safetensors", "--steps", "1", "--quiet")

    parameters = json.loads((tmp_path / "out.mrc.json").read_text())["parameters"]
    assert code == 0
    assert parameters["prior"] == "copy.safetensors"
    assert parameters["prior_file"] == str(tmp_path / "copy.safetensors")
