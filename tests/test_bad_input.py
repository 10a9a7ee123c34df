"""The bad-input matrix: every user mistake ends in one clean error line and a documented exit code.

For each case: the documented exit code (see :mod:`cdmap.errors`), stderr is exactly one line starting
``cdmap: error:`` that names the offending file (or the option, for usage errors), no traceback (unless
``--verbose``), and nothing under a final output name. Cases run in-process through
:func:`cdmap.cli.app.main` (fast); a few run as ``python -m cdmap`` subprocesses to check the same end to end.
Output is captured at the file-descriptor level (``capfd``) so that GDAL messages printed by C code count too.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from cdmap.cli.app import _state as cli_state
from cdmap.cli.app import main as cli_main
from cdmap.errors import (
    EXIT_CHECKPOINT,
    EXIT_INCOMPATIBLE,
    EXIT_INPUT,
    EXIT_OUTPUT,
    EXIT_USAGE,
)
from tests.conftest import REPO, synthetic_pair, write_geotiff
from tests.helpers import tiny_checkpoint

PREDICT_FINALS = ("change_probability.tif", "change_mask.tif", "changes.gpkg", "run.json")
TRAIN_FINALS = ("best.pt", "last.pt", "metrics.csv", "config.json")
MAX_LINE = 600  # a readable line: two long pytest paths plus the problem fit easily


# --------------------------------------------------------------------------------------------- helpers


@dataclass
class Result:
    code: int | None
    out: str
    err: str


@pytest.fixture(autouse=True)
def _not_verbose(monkeypatch):
    """``cdmap.cli.app`` keeps --verbose in module state; every test starts quiet and without injected faults."""
    monkeypatch.delenv("CDMAP_VERBOSE", raising=False)
    monkeypatch.delenv("CDMAP_FAULT_INJECT", raising=False)
    monkeypatch.setitem(cli_state, "verbose", False)


def cli(capfd, *argv) -> Result:
    """Run ``cdmap ARGV`` in-process; the exit code is 0 when main returns normally."""
    capfd.readouterr()
    try:
        cli_main([str(a) for a in argv])
        code: int | None = 0
    except SystemExit as exc:
        code = exc.code
    captured = capfd.readouterr()
    return Result(code, captured.out, captured.err)


def cli_subprocess(*argv, timeout: float = 180) -> Result:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    env.pop("CDMAP_VERBOSE", None)
    env.pop("CDMAP_FAULT_INJECT", None)
    proc = subprocess.run([sys.executable, "-m", "cdmap", *map(str, argv)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def no_finals(outdir: Path, names=PREDICT_FINALS) -> None:
    present = [n for n in names if (Path(outdir) / n).exists()]
    assert not present, f"final output name(s) written despite the error: {present}"


def assert_error(res: Result, code: int, *names, outdir: Path | None = None, finals=PREDICT_FINALS) -> str:
    """The common contract of every case; returns the error line."""
    assert "Traceback" not in res.err + res.out, f"traceback printed:\n{res.err}"
    lines = res.err.splitlines()
    assert len(lines) == 1, f"stderr is not exactly one line:\n{res.err}"
    line = lines[0]
    assert line.startswith("cdmap: error: "), line
    assert res.code == code, f"exit code {res.code}, expected {code}: {line}"
    for name in names:
        assert str(name) in line, f"{name!s} not named in: {line}"
    assert len(line) <= MAX_LINE, f"error line of {len(line)} characters: {line[:300]}..."
    if outdir is not None:
        no_finals(outdir, finals)
    return line


# -------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _corrupt_middle_tile(path: Path, row: int, col: int) -> None:
    """Overwrite the compressed bytes of one internal tile with bytes that are not a DEFLATE stream."""
    with rasterio.open(path) as ds:
        offset = int(ds.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1))
        size = int(ds.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1))
    raw = bytearray(path.read_bytes())
    raw[offset:offset + size] = b"\xff" * size
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every input of the matrix, written once (64x64 unless the case needs otherwise)."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(7)
    f: dict[str, Path] = {}
    f["before"], f["after"], _ = synthetic_pair(d, height=64, width=64)
    base = rng.integers(60, 120, size=(3, 64, 64), dtype=np.uint8)

    f["missing"] = d / "does_not_exist.tif"
    f["directory"] = d / "a_folder.tif"
    f["directory"].mkdir()
    f["text"] = d / "notes.tif"
    f["text"].write_text("this is not a GeoTIFF\n")
    f["empty_file"] = d / "empty.tif"
    f["empty_file"].write_bytes(b"")
    f["truncated"] = write_geotiff(d / "truncated.tif", base)
    raw = f["truncated"].read_bytes()
    f["truncated"].write_bytes(raw[: len(raw) // 2])
    # GDAL cannot create a 0-pixel GTiff; a VRT can declare one
    f["zero_size"] = d / "zero_size.vrt"
    f["zero_size"].write_text('<VRTDataset rasterXSize="0" rasterYSize="64">'
                              '<VRTRasterBand dataType="Byte" band="1"/></VRTDataset>')
    f["complex"] = write_geotiff(d / "complex.tif", (base + 1j * base).astype(np.complex64))

    nocrs = d / "nocrs"
    nocrs.mkdir()
    f["nocrs_before"], f["nocrs_after"], _ = synthetic_pair(nocrs, height=56, width=56, crs=None)
    f["far_after"] = write_geotiff(d / "far_away.tif", base, transform=from_origin(600000.0, 4100000.0, 0.5, 0.5))
    f["two_bands_before"] = write_geotiff(d / "two_bands_before.tif", base[:2])
    f["two_bands_after"] = write_geotiff(d / "two_bands_after.tif", base[:2])

    # a scene whose middle tile does not decode (corners fine, so preflight passes)
    big = rng.integers(0, 255, size=(3, 128, 128), dtype=np.uint8)
    f["mid_ok"] = write_geotiff(d / "mid_ok.tif", big, blockxsize=16, blockysize=16, compress="deflate")
    f["mid_corrupt"] = write_geotiff(d / "mid_corrupt.tif", big, blockxsize=16, blockysize=16,
                                     compress="deflate")
    _corrupt_middle_tile(f["mid_corrupt"], 3, 3)  # pixels 48-63: inside the first window, so no compute is wasted

    f["all_nodata"] = write_geotiff(d / "all_nodata.tif", np.zeros((3, 64, 64), np.uint8), nodata=0)
    fl = rng.uniform(60, 120, size=(3, 56, 56)).astype(np.float32)  # 56x56: one 64-px window, cheap
    fl_after = fl.copy()
    fl_after[:, 40:56, 8:30] = 230.0
    fl[:, 10:20, 10:30] = np.nan  # NaN in all bands of BEFORE
    fl_after[1, 30:34, 36:52] = np.nan  # NaN in one band of AFTER
    f["nan_before"] = write_geotiff(d / "nan_before.tif", fl)
    f["nan_after"] = write_geotiff(d / "nan_after.tif", fl_after)

    small = d / "small"
    small.mkdir()
    f["small_before"], f["small_after"], _ = synthetic_pair(small, height=40, width=40)
    return f


# ------------------------------------------------------------------------------------ predict: preflight

# (id, before, after, extra args, exit code, what the line must name: file keys or literal text)
PREFLIGHT = [
    ("missing-file", "missing", "after", [], EXIT_INPUT, ["missing", "not found"]),
    ("missing-after", "before", "missing", [], EXIT_INPUT, ["missing", "not found"]),
    ("directory", "directory", "after", [], EXIT_INPUT, ["directory", "a directory"]),
    ("text-named-tif", "text", "after", [], EXIT_INPUT, ["text", "not a raster"]),
    ("empty-file", "before", "empty_file", [], EXIT_INPUT, ["empty_file", "empty"]),
    ("truncated", "truncated", "after", [], EXIT_INPUT, ["truncated", "truncated or corrupt"]),
    ("zero-size", "zero_size", "after", [], EXIT_INPUT, ["zero_size", "dimensions"]),
    ("complex-dtype", "before", "complex", [], EXIT_INPUT, ["complex", "complex64"]),
    ("before-without-crs", "nocrs_before", "after", [], EXIT_INCOMPATIBLE, ["nocrs_before", "no CRS"]),
    ("after-without-crs", "before", "nocrs_after", [], EXIT_INCOMPATIBLE, ["nocrs_after", "no CRS"]),
    ("one-without-crs-even-with-flag", "nocrs_before", "after", ["--allow-no-crs"], EXIT_INCOMPATIBLE,
     ["nocrs_before", "no CRS"]),
    ("both-without-crs", "nocrs_before", "nocrs_after", [], EXIT_INCOMPATIBLE,
     ["nocrs_before", "nocrs_after", "--allow-no-crs"]),
    ("no-overlap", "before", "far_after", [], EXIT_INCOMPATIBLE, ["before", "far_after", "do not overlap"]),
    ("band-counts-differ", "before", "two_bands_after", [], EXIT_INCOMPATIBLE,
     ["before", "two_bands_after", "bands"]),
    ("bands-vs-checkpoint", "two_bands_before", "two_bands_after", [], EXIT_INCOMPATIBLE,
     ["two_bands_before", "model expects 3"]),
    ("bands-out-of-range", "before", "after", ["--bands", "1,2,5"], EXIT_USAGE, ["before", "--bands"]),
    ("bands-zero", "before", "after", ["--bands", "0,1,2"], EXIT_USAGE, ["--bands"]),
    ("bands-not-numbers", "before", "after", ["--bands", "red"], EXIT_USAGE, ["--bands"]),
    ("bands-vs-checkpoint-after-selection", "before", "after", ["--bands", "1,2"], EXIT_INCOMPATIBLE,
     ["before", "--bands", "model expects 3"]),
]


@pytest.mark.parametrize(("before", "after", "extra", "code", "names"),
                         [pytest.param(*c[1:], id=c[0]) for c in PREFLIGHT])
def test_predict_preflight_errors(capfd, tmp_path, ckpt, files, before, after, extra, code, names):
    out = tmp_path / "out"
    res = cli(capfd, "predict", files[before], files[after], "-o", out, "-m", ckpt, *extra)
    assert_error(res, code, *[files.get(n, n) for n in names], outdir=out)
    assert not out.exists(), "preflight errors must come before anything is created"


def test_corrupt_tile_in_the_middle_fails_during_predict_naming_the_window(capfd, tmp_path, ckpt, files):
    out = tmp_path / "out"
    res = cli(capfd, "predict", files["mid_corrupt"], files["mid_ok"], "-o", out, "-m", ckpt, "-q")
    line = assert_error(res, EXIT_INPUT, files["mid_corrupt"], "window rows", outdir=out)
    assert "cols" in line
    # preflight passed (corners decode): the run had started, its temporary work is kept aside
    assert (out / ".cdmap-partial").is_dir()


# -------------------------------------------------------------------------------- predict: tile options

TILE_OPTIONS = [
    pytest.param(["--tile-size", "16"], "--tile-size", id="tile-below-32"),
    pytest.param(["--tile-size", "-64"], "--tile-size", id="tile-negative"),
    pytest.param(["--overlap", "64"], "overlap", id="overlap-equals-tile"),
    pytest.param(["--overlap", "100"], "overlap", id="overlap-above-tile"),
    pytest.param(["--overlap", "-8"], "overlap", id="overlap-negative"),
    pytest.param(["--tile-size", "0"], "--tile-size", id="tile-zero"),
]


@pytest.mark.parametrize(("extra", "problem"), TILE_OPTIONS)
def test_tile_options_that_make_no_sense(capfd, tmp_path, ckpt, files, extra, problem):
    out = tmp_path / "out"
    res = cli(capfd, "predict", files["small_before"], files["small_after"], "-o", out, "-m", ckpt, "-q", *extra)
    assert_error(res, EXIT_USAGE, problem, extra[1], outdir=out)


def test_tile_option_errors_name_the_option(capfd, tmp_path, ckpt, files):
    for extra in (["--tile-size", "16"], ["--overlap", "64"], ["--overlap", "-8"]):
        res = cli(capfd, "predict", files["before"], files["after"], "-o", tmp_path / "out", "-m", ckpt, "-q",
                  *extra)
        assert_error(res, EXIT_USAGE, extra[0])


# ----------------------------------------------------------------------------- predict: succeeding cases


def _read_band(path: Path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.read_masks(1), ds.crs, ds.shape


def test_both_without_crs_allowed_with_flag(capfd, tmp_path, ckpt, files):
    out = tmp_path / "out"
    res = cli(capfd, "predict", files["nocrs_before"], files["nocrs_after"], "-o", out, "-m", ckpt, "-q",
              "--allow-no-crs")
    assert res.code == 0, res.err
    assert "Traceback" not in res.err
    for name in PREDICT_FINALS:
        assert (out / name).exists()
    _, _, crs, shape = _read_band(out / "change_mask.tif")
    assert crs is None and shape == (56, 56)
    run = json.loads((out / "run.json").read_text())
    assert run["inputs"]["crs"] is None and run["alignment"]["mode"] == "same-grid"


def test_scene_smaller_than_one_tile_succeeds(capfd, tmp_path, ckpt, files):
    out = tmp_path / "out"
    res = cli(capfd, "predict", files["small_before"], files["small_after"], "-o", out, "-m", ckpt, "-q")
    assert res.code == 0, res.err
    mask, _, _, shape = _read_band(out / "change_mask.tif")
    assert shape == (40, 40) and set(np.unique(mask)) <= {0, 1}
    assert json.loads((out / "run.json").read_text())["windows"]["total"] == 1


def test_nan_pixels_become_nodata(capfd, tmp_path, ckpt, files):
    out = tmp_path / "out"
    res = cli(capfd, "predict", files["nan_before"], files["nan_after"], "-o", out, "-m", ckpt, "-q")
    assert res.code == 0, res.err
    mask, _, _, _ = _read_band(out / "change_mask.tif")
    prob, prob_valid, _, _ = _read_band(out / "change_probability.tif")
    nan = np.zeros((56, 56), bool)
    nan[10:20, 10:30] = True
    nan[30:34, 36:52] = True
    assert (mask[nan] == 255).all() and (prob_valid[nan] == 0).all()
    assert set(np.unique(mask[~nan])) <= {0, 1} and (prob_valid[~nan] == 255).all()
    run = json.loads((out / "run.json").read_text())
    assert run["valid_pixels"] == int((~nan).sum())


def test_all_nodata_scene_gives_all_nodata_outputs(capfd, tmp_path, ckpt, files):
    """Current behaviour: success, every output pixel nodata, no polygons, no window computed."""
    import pyogrio

    out = tmp_path / "out"
    res = cli(capfd, "predict", files["all_nodata"], files["all_nodata"], "-o", out, "-m", ckpt, "-q")
    assert res.code == 0, res.err
    mask, _, _, _ = _read_band(out / "change_mask.tif")
    _, prob_valid, _, _ = _read_band(out / "change_probability.tif")
    assert (mask == 255).all() and (prob_valid == 0).all()
    run = json.loads((out / "run.json").read_text())
    assert run["valid_pixels"] == 0 and run["changed_pixels"] == 0 and run["polygons"] == 0
    assert run["windows"]["computed"] == 0
    assert pyogrio.read_info(out / "changes.gpkg")["features"] == 0


# ----------------------------------------------------------------------------------- predict: outputs


def test_output_parent_is_a_regular_file(capfd, tmp_path, ckpt, files):
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("x")
    out = blocker / "out"
    res = cli(capfd, "predict", files["before"], files["after"], "-o", out, "-m", ckpt, "-q")
    assert_error(res, EXIT_OUTPUT, out, "not writable")
    assert blocker.read_text() == "x"


def test_output_is_a_regular_file(capfd, tmp_path, ckpt, files):
    out = tmp_path / "out.tif"
    out.write_text("x")
    res = cli(capfd, "predict", files["before"], files["after"], "-o", out, "-m", ckpt, "-q")
    assert_error(res, EXIT_OUTPUT, out)
    assert out.read_text() == "x"


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def test_output_on_read_only_mount(capfd, tmp_path, ckpt, files):
    ro = tmp_path / "ro"
    ro.mkdir()
    try:
        _mount("--bind", str(ro), str(ro))
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot bind-mount here (not root or no mount permission)")
    try:
        try:
            _mount("-o", "remount,bind,ro", str(ro))
        except subprocess.CalledProcessError:
            pytest.skip("cannot remount read-only here")
        out = ro / "out"
        res = cli(capfd, "predict", files["before"], files["after"], "-o", out, "-m", ckpt, "-q")
        assert_error(res, EXIT_OUTPUT, out, "not writable")
        assert not out.exists()
    finally:
        _umount(ro)


def test_output_exists_without_overwrite(capfd, tmp_path, ckpt, files):
    out = tmp_path / "out"
    out.mkdir()
    (out / "change_mask.tif").write_bytes(b"earlier result")
    res = cli(capfd, "predict", files["before"], files["after"], "-o", out, "-m", ckpt, "-q")
    assert_error(res, EXIT_OUTPUT, out, "--overwrite", "change_mask.tif")
    assert (out / "change_mask.tif").read_bytes() == b"earlier result"
    no_finals(out, [n for n in PREDICT_FINALS if n != "change_mask.tif"])


# -------------------------------------------------------------------------------- predict: disk full


def _fill(mount: Path, leave: int = 0) -> None:
    """Take the free space of the tmpfs at ``mount``, all of it or all but ``leave`` bytes (a page multiple)."""
    with open(mount / "filler", "ab", buffering=0) as f:
        if leave:
            st = os.statvfs(mount)
            f.write(b"\0" * (st.f_bavail * st.f_frsize - leave))
            return
        for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt))
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot mount a tmpfs here (not root or no mount permission)")
    try:
        yield mnt
    finally:
        _umount(mnt)


# (stage, bytes left): the disk fills at a fault_point phase of cdmap.process ("strip": after the 40x40 scene's
# only strip, i.e. just before the rasters are created), or before the run ("start"), or after the polygons
# ("run.json")
DISK_FULL = [
    pytest.param("start", 0, id="before-journal"),
    pytest.param("read", 0, id="while-computing-strips"),
    pytest.param("strip", 0, id="before-rasters"),
    pytest.param("strip", 4096, id="before-rasters-one-page-left"),
    pytest.param("vectorize", 0, id="while-writing-vectors"),
    pytest.param("run.json", 0, id="while-writing-run-json"),
]


@pytest.mark.parametrize(("stage", "leave"), DISK_FULL)
def test_disk_full(capfd, monkeypatch, tmpfs, ckpt, files, stage, leave):
    import cdmap.process as process_mod
    import cdmap.vector as vectorize_mod

    filled = []

    def fill_once():
        if not filled:
            filled.append(True)
            _fill(tmpfs, leave)

    real_fault_point = process_mod.fault_point

    def fault_point(phase):
        if phase == stage:
            fill_once()
        real_fault_point(phase)

    monkeypatch.setattr(process_mod, "fault_point", fault_point)
    if stage == "run.json":
        real_vectorize = vectorize_mod.vectorize_raster

        def vectorize_then_fill(*a, **k):
            result = real_vectorize(*a, **k)
            fill_once()
            return result

        monkeypatch.setattr(vectorize_mod, "vectorize_raster", vectorize_then_fill)
    out = tmpfs / "out"
    if stage == "start":
        out.mkdir()
        fill_once()

    # a high threshold: the random model's "mostly change" warning is not the line under test
    res = cli(capfd, "predict", files["small_before"], files["small_after"], "-o", out, "-m", ckpt, "-q",
              "--threshold", "0.999")
    assert filled, "the disk was never filled: the stage hook did not run"
    line = assert_error(res, EXIT_OUTPUT, out, outdir=out)
    assert "No space left on device" in line or "disk is full" in line, line


@pytest.mark.parametrize("target", ["rasterio-write", "numpy-savez"])
def test_disk_full_simulated(capfd, monkeypatch, tmp_path, ckpt, files, target):
    """The same without a mount: writes raise ENOSPC (rasterio rows, or the journal's numpy strips)."""
    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if target == "rasterio-write":
        monkeypatch.setattr(rasterio.io.DatasetWriter, "write", enospc)
    else:
        monkeypatch.setattr(np, "savez", enospc)
    out = tmp_path / "out"
    res = cli(capfd, "predict", files["small_before"], files["small_after"], "-o", out, "-m", ckpt, "-q")
    assert_error(res, EXIT_OUTPUT, out, "No space left on device", outdir=out)


# --------------------------------------------------------------------------------------- checkpoints


class _NotPlainData:
    """Any non-allowlisted class makes a checkpoint a pickle payload that weights_only refuses."""

    def __init__(self) -> None:
        self.command = "echo pwned"


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory, ckpt) -> dict[str, Path]:
    import torch

    d = tmp_path_factory.mktemp("bad_ckpt")
    out: dict[str, Path] = {}
    out["random-bytes"] = d / "random.pt"
    out["random-bytes"].write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    out["zip-not-torch"] = d / "notes.pt"
    with zipfile.ZipFile(out["zip-not-torch"], "w") as zf:
        zf.writestr("notes.txt", "a zip archive, but not a PyTorch one")
    raw = ckpt.read_bytes()
    out["truncated"] = d / "truncated.pt"
    out["truncated"].write_bytes(raw[: len(raw) // 2])
    payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    payload["format_version"] = 99
    out["newer-format"] = d / "newer.pt"
    torch.save(payload, out["newer-format"])
    small = {k: v for k, v in payload.items() if k != "state_dict"}
    small["format_version"] = 1
    small["extra"] = _NotPlainData()
    out["pickle-payload"] = d / "pickled.pt"
    torch.save(small, out["pickle-payload"])
    out["missing"] = d / "missing.pt"
    out["directory"] = d / "folder.pt"
    out["directory"].mkdir()
    return out


CHECKPOINT_CASES = {
    "random-bytes": "not a cdmap checkpoint",
    "zip-not-torch": "corrupt",
    "truncated": "truncated",
    "newer-format": "newer",
    "pickle-payload": "pickled",
    "missing": "not found",
    "directory": "directory",
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint_predict(capfd, tmp_path, files, bad_checkpoints, case):
    out = tmp_path / "out"
    res = cli(capfd, "predict", files["before"], files["after"], "-o", out, "-m", bad_checkpoints[case], "-q")
    assert_error(res, EXIT_CHECKPOINT, bad_checkpoints[case], CHECKPOINT_CASES[case], outdir=out)
    assert not out.exists()


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint_info(capfd, bad_checkpoints, case):
    res = cli(capfd, "info", bad_checkpoints[case])
    assert_error(res, EXIT_CHECKPOINT, bad_checkpoints[case], CHECKPOINT_CASES[case])
    assert res.out == ""


# ------------------------------------------------------------------------------------------- vectorize


def test_vectorize_missing_raster(capfd, tmp_path):
    missing = tmp_path / "no_such_mask.tif"
    target = tmp_path / "polys.gpkg"
    res = cli(capfd, "vectorize", missing, "-o", target)
    assert_error(res, EXIT_INPUT, missing)
    assert not target.exists()


# ----------------------------------------------------------------------------------------------- train


def _png(path: Path, data: np.ndarray) -> None:
    if data.ndim == 2:
        data = data[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        _write_png(path, data)


def _write_png(path: Path, data: np.ndarray) -> None:
    with rasterio.open(path, "w", driver="PNG", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype="uint8") as dst:
        dst.write(data)


def _tiles(folder: Path, names=("t1", "t2", "t3"), size: int = 32) -> None:
    rng = np.random.default_rng(11)
    for n in names:
        _png(folder / "A" / f"{n}.png", rng.integers(0, 255, (3, size, size), dtype=np.uint8))
        _png(folder / "B" / f"{n}.png", rng.integers(0, 255, (3, size, size), dtype=np.uint8))
        label = np.zeros((size, size), np.uint8)
        label[4:12, 4:12] = 255
        _png(folder / "label" / f"{n}.png", label)


def _missing_partner(d: Path) -> tuple[Path, list[str]]:
    _tiles(d)
    (d / "B" / "t3.png").unlink()
    return d, ["t3", "missing in B/"]


def _size_mismatch(d: Path) -> tuple[Path, list[str]]:
    _tiles(d)
    _png(d / "B" / "t2.png", np.zeros((3, 24, 24), np.uint8))
    return d, ["t2", "sizes differ"]


def _label_values(d: Path) -> tuple[Path, list[str]]:
    _tiles(d)
    label = np.zeros((32, 32), np.uint8)
    label[0:4] = 1
    label[8:12] = 2
    _png(d / "label" / "t1.png", label)
    return d, ["t1.png", "label has values"]


def _empty_split(d: Path) -> tuple[Path, list[str]]:
    _tiles(d / "train")
    for sub in ("A", "B", "label"):
        (d / "val" / sub).mkdir(parents=True)
    return d, [d / "val", "empty"]


def _not_a_dataset(d: Path) -> tuple[Path, list[str]]:
    (d / "photos").mkdir(parents=True)
    return d, ["not a change-detection data folder"]


@pytest.mark.parametrize("make", [_missing_partner, _size_mismatch, _label_values, _empty_split, _not_a_dataset],
                         ids=["missing-partner", "size-mismatch", "label-values", "empty-split", "not-a-dataset"])
def test_train_bad_data(capfd, tmp_path, make):
    data, names = make(tmp_path / "data")
    run = tmp_path / "run"
    res = cli(capfd, "train", data, "-o", run, "--epochs", "1", "--crop-size", "32", "--batch-size", "2",
              "--effective-batch", "2", "--workers", "0", "--device", "cpu", "-q")
    assert_error(res, EXIT_INPUT, data, *names, outdir=run, finals=TRAIN_FINALS)


def test_train_missing_data_folder(capfd, tmp_path):
    data = tmp_path / "nowhere"
    run = tmp_path / "run"
    res = cli(capfd, "train", data, "-o", run, "--epochs", "1", "--device", "cpu", "-q")
    assert_error(res, EXIT_INPUT, data, "not found", outdir=run, finals=TRAIN_FINALS)


# -------------------------------------------------------------------------------------------- verbose


def test_verbose_prints_a_traceback(capfd, tmp_path, ckpt, files):
    res = cli(capfd, "--verbose", "predict", files["missing"], files["after"], "-o", tmp_path / "out", "-m", ckpt)
    assert res.code == EXIT_INPUT
    assert "Traceback (most recent call last)" in res.err
    assert "InputError" in res.err
    assert res.err.splitlines()[-1].startswith("cdmap: error: ")
    assert str(files["missing"]) in res.err.splitlines()[-1]


# --------------------------------------------------------------------------------- end to end (python -m)


def test_end_to_end_missing_input(tmp_path, ckpt, files):
    out = tmp_path / "out"
    res = cli_subprocess("predict", files["missing"], files["after"], "-o", out, "-m", ckpt)
    assert_error(res, EXIT_INPUT, files["missing"], outdir=out)


def test_end_to_end_corrupt_tile_in_reader_thread(tmp_path, ckpt, files):
    out = tmp_path / "out"
    res = cli_subprocess("predict", files["mid_corrupt"], files["mid_ok"], "-o", out, "-m", ckpt, "-q")
    assert_error(res, EXIT_INPUT, files["mid_corrupt"], "window rows", outdir=out)


def test_end_to_end_pickle_checkpoint_info(bad_checkpoints):
    res = cli_subprocess("info", bad_checkpoints["pickle-payload"])
    assert_error(res, EXIT_CHECKPOINT, bad_checkpoints["pickle-payload"], "pickled")
    assert res.out == ""

