"""Reliability, round two: no command destroys an input, mixes runs, swallows an error or ignores a signal.

Every case runs through the CLI (:func:`cdmap.cli.app.main` in-process, or ``python -m cdmap`` where a real
SIGKILL or a real signal from outside is needed) and checks the exit code, one ``cdmap: error:`` line, no
traceback, no final outputs and untouched inputs; the resume cases check pixel and polygon identity with an
uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from cdmap import process
from cdmap.errors import EXIT_CHECKPOINT, EXIT_INPUT, EXIT_OUTPUT, EXIT_RESUME, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE
from tests.conftest import REPO, synthetic_pair, write_geotiff
from tests.helpers import tiny_checkpoint
from tests.test_bad_input import PREDICT_FINALS, assert_error, cli

TRAIN_FINALS = ("best.pt", "last.pt", "metrics.csv", "config.json")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    from cdmap.cli.app import _state

    monkeypatch.delenv("CDMAP_VERBOSE", raising=False)
    monkeypatch.delenv(process.FAULT_ENV, raising=False)
    monkeypatch.setitem(_state, "verbose", False)
    process.reset_fault_counts()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 64x96 scene pair, its labels, a tiny checkpoint, a tile set and an uninterrupted predict run."""
    d = tmp_path_factory.mktemp("rel")
    before, after, truth = synthetic_pair(d, height=96, width=64, seed=3)
    labels = write_geotiff(d / "labels.tif", truth)
    ckpt = tiny_checkpoint(d / "tiny.pt", tile=32)
    from cdmap.predict import predict_scene
    from cdmap.train.tiles import make_tiles

    ref = predict_scene(before, after, d / "ref", ckpt, quiet=True, tile_size=32, overlap=8, batch_size=2)
    make_tiles(before, after, labels, d / "data", tile_size=32, split=(0.5, 0.25, 0.25))
    return {"d": d, "before": before, "after": after, "labels": labels, "ckpt": ckpt, "ref": ref.outdir,
            "data": d / "data"}


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        for f in sorted(Path(p).rglob("*")) if Path(p).is_dir() else [Path(p)]:
            if f.is_file():
                h.update(f.read_bytes())
    return h.hexdigest()


def _predict_args(w, out, *extra):
    return ["predict", w["before"], w["after"], "-o", out, "--model", w["ckpt"], "--tile-size", "32", "--overlap",
            "8", "--batch-size", "2", "-q", *extra]


def _subprocess(argv, env_extra=None, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("CDMAP_VERBOSE", None)
    return subprocess.run([sys.executable, "-m", "cdmap", *map(str, argv)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300, **kw)


def _same_outputs(got: Path, want: Path) -> None:
    import geopandas as gpd

    for name in ("change_probability.tif", "change_mask.tif"):
        with rasterio.open(got / name) as g, rasterio.open(want / name) as w:
            assert np.array_equal(g.read(), w.read()) and np.array_equal(g.read_masks(1), w.read_masks(1)), name
    gp, wp = gpd.read_file(got / "changes.gpkg"), gpd.read_file(want / "changes.gpkg")
    assert len(gp) == len(wp) and all(a.equals_exact(b, 0.0) for a, b in zip(gp.geometry, wp.geometry, strict=True))


# ------------------------------------------------------------------------------ inputs are never outputs


@pytest.mark.parametrize("how", ["same-name", "symlink", "hardlink"])
def test_predict_refuses_an_output_that_is_an_input(capfd, tmp_path, world, how):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "change_mask.tif"
    target.write_bytes(world["before"].read_bytes())
    before = {"same-name": target, "symlink": tmp_path / "link.tif", "hardlink": tmp_path / "hard.tif"}[how]
    if how == "symlink":
        before.symlink_to(target)
    elif how == "hardlink":
        os.link(target, before)
    digest = _digest(target)
    res = cli(capfd, "predict", before, world["after"], "-o", out, "--model", world["ckpt"], "--overwrite")
    assert_error(res, EXIT_OUTPUT, before)
    assert _digest(target) == digest and not (out / ".cdmap-partial").exists()


def test_vectorize_and_tiles_refuse_outputs_that_are_inputs(capfd, tmp_path, world):
    mask = tmp_path / "m.gpkg"
    mask.write_bytes((world["ref"] / "change_mask.tif").read_bytes())
    digest = _digest(mask)
    assert_error(cli(capfd, "vectorize", mask, "-o", mask, "--overwrite"), EXIT_OUTPUT, mask)
    assert _digest(mask) == digest
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    before = data / "train" / "before.tif"
    before.write_bytes(world["before"].read_bytes())
    res = cli(capfd, "tiles", before, world["after"], world["labels"], "-o", data, "--overwrite")
    assert_error(res, EXIT_OUTPUT, before)
    assert before.exists()


def test_train_refuses_backbone_weights_named_like_a_run_file(capfd, tmp_path, world):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"weights")
    res = cli(capfd, "train", world["data"], "-o", run, "--backbone-weights", run / "best.pt", "--overwrite",
              "--epochs", "1", "--workers", "0", "-q")
    assert_error(res, EXIT_OUTPUT, run / "best.pt")
    assert (run / "best.pt").read_bytes() == b"weights"


# ------------------------------------------------------------------------------------- one run, resumable


def test_overwrite_killed_during_commit_never_looks_finished(tmp_path, world):
    out = tmp_path / "out"
    assert _subprocess(_predict_args(world, out)).returncode == 0
    killed = _subprocess(_predict_args(world, out, "--overwrite", "--threshold", "0.3"),
                         {process.FAULT_ENV: "commit:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "run.json").exists()  # the old run.json went first: no folder looks finished with two runs
    resumed = _subprocess(_predict_args(world, out, "--threshold", "0.3", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "run.json").read_text())["options"]["threshold"] == 0.3


def test_resume_recognises_a_run_killed_after_its_last_rename(tmp_path, world):
    out = tmp_path / "out"
    killed = _subprocess(_predict_args(world, out), {process.FAULT_ENV: "committed:1"})
    assert killed.returncode == -signal.SIGKILL
    assert (out / "run.json").exists() and (out / ".cdmap-partial").exists()
    resumed = _subprocess(_predict_args(world, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert not (out / ".cdmap-partial").exists()
    _same_outputs(out, world["ref"])


def test_resume_refuses_an_input_rewritten_with_the_same_size_and_mtime(capfd, tmp_path, world):
    before = tmp_path / "before.tif"
    before.write_bytes(world["before"].read_bytes())
    out = tmp_path / "out"
    os.environ[process.FAULT_ENV] = "strip:1:SIGTERM"
    try:
        res = cli(capfd, *_predict_args(world, out)[:1], before, *_predict_args(world, out)[2:])
    finally:
        del os.environ[process.FAULT_ENV]
    assert res.code == EXIT_SIGTERM
    st = before.stat()
    raw = bytearray(before.read_bytes())
    raw[-100:] = bytes(255 - b for b in raw[-100:])  # same size, other content
    before.write_bytes(bytes(raw))
    os.utime(before, ns=(st.st_atime_ns, st.st_mtime_ns))
    res = cli(capfd, "predict", before, *_predict_args(world, out)[2:], "--resume")
    assert_error(res, EXIT_RESUME, "inputs[before].content", outdir=out)


@pytest.mark.parametrize("damage", ["line", "strip"])
def test_damaged_journal_is_reported_and_its_strips_recomputed(capfd, tmp_path, world, damage):
    out = tmp_path / "out"
    os.environ[process.FAULT_ENV] = "strip:3:SIGINT"
    try:
        assert cli(capfd, *_predict_args(world, out)).code == EXIT_SIGINT
    finally:
        del os.environ[process.FAULT_ENV]
    work = out / ".cdmap-partial"
    if damage == "line":
        lines = (work / "journal.jsonl").read_text().splitlines()
        lines[1] = lines[1].replace('"row0": 0', '"row0": "0"')
        (work / "journal.jsonl").write_text("\n".join(lines) + "\n")
    else:
        strip = sorted((work / "strips").glob("*.npz"))[1]
        strip.write_bytes(strip.read_bytes()[:50])
    res = cli(capfd, *_predict_args(world, out), "--resume")
    assert res.code == 0, res.err
    # one warning about the damage (the untrained model also draws the "mostly change" input-fit warning)
    warnings = [ln for ln in res.err.splitlines() if ln.startswith("cdmap: warning:") and "journal" in ln]
    assert len(warnings) == 1 and "computed again" in warnings[0] and "Traceback" not in res.err
    _same_outputs(out, world["ref"])


def test_tiles_checks_inputs_before_touching_the_old_set_and_leaves_nothing_on_failure(capfd, tmp_path, world):
    data = tmp_path / "data"
    assert cli(capfd, "tiles", world["before"], world["after"], world["labels"], "-o", data, "--tile-size",
               "32").code == 0
    digest = _digest(data)
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a raster")
    res = cli(capfd, "tiles", world["before"], world["after"], bad, "-o", data, "--overwrite")
    assert_error(res, EXIT_INPUT, bad)
    assert _digest(data) == digest  # the old set is intact
    fresh = tmp_path / "fresh"
    res = cli(capfd, "tiles", world["before"], world["after"], bad, "-o", fresh)
    assert_error(res, EXIT_INPUT)
    assert not fresh.exists() or not any(fresh.iterdir())
    res = cli(capfd, "tiles", world["before"], world["after"], world["labels"], "-o", data, "--overwrite",
              "--tile-size", "48")
    assert res.code == 0 and json.loads((data / "tiles.json").read_text())["tile_size"] == 48
    assert [p.name for p in data.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------------- errors: one clear line


@pytest.mark.parametrize("argv, named", [
    (["predict", "a.tif", "b.tif", "--model", "m.pt"], "--output"),
    (["predict", "a.tif", "b.tif", "-o", "x", "--model", "m.pt", "--bogus"], "--bogus"),
    (["predict", "a.tif", "b.tif", "-o", "x", "--model", "m.pt", "--batch-size", "x"], "--batch-size"),
    (["train", "d", "-o", "r", "--epochs", "many"], "--epochs"),
    (["vectorize", "a.tif"], "--output"),
    (["nosuchcommand"], "nosuchcommand"),
])
def test_usage_errors_are_one_line(capfd, argv, named):
    line = assert_error(cli(capfd, *argv), EXIT_USAGE, named)
    assert "--help" in line


@pytest.mark.parametrize("extra, named", [
    (["--co", "COMPRESS=BOGUS"], "BOGUS"), (["--co", "BLOCKXSIZE=7"], "--co"), (["--co", "NOSUCH=1"], "NOSUCH"),
    (["--min-area", "nan"], "--min-area"), (["--simplify", "inf"], "--simplify"), (["--device", "tpu"], "tpu"),
    (["--resampling", "fancy"], "fancy"),
])
def test_bad_option_values_are_refused_before_any_output(capfd, tmp_path, world, extra, named):
    out = tmp_path / "out"
    assert_error(cli(capfd, *_predict_args(world, out, *extra)), EXIT_USAGE, named)
    assert not out.exists()


def _bad_checkpoint(src: Path, dst: Path, change) -> Path:
    import torch

    payload = torch.load(src, weights_only=True)
    change(payload)
    torch.save(payload, dst)
    return dst


def _first_conv(payload):
    return next(k for k, v in payload["state_dict"].items() if v.dim() == 4)


@pytest.mark.parametrize("case, change, problem", [
    ("shape", lambda p: p["state_dict"].__setitem__(_first_conv(p), p["state_dict"][_first_conv(p)][:, :1]), "shape"),
    ("nan", lambda p: p["state_dict"][_first_conv(p)].view(-1).__setitem__(0, float("nan")), "non-finite"),
    ("type", lambda p: p.__setitem__("tile_size", "64"), "tile_size"),
    ("config", lambda p: p["model_config"].__setitem__("in_channels", 3.0), "in_channels"),
    ("missing", lambda p: p["state_dict"].pop(_first_conv(p)), "missing"),
])
def test_bad_checkpoints_are_refused_on_load(capfd, tmp_path, world, case, change, problem):
    ckpt = _bad_checkpoint(world["ckpt"], tmp_path / f"{case}.pt", change)
    out = tmp_path / "out"
    res = cli(capfd, "predict", world["before"], world["after"], "-o", out, "--model", ckpt)
    line = assert_error(res, EXIT_CHECKPOINT, ckpt)
    assert problem in line and not out.exists()


def test_a_model_with_non_finite_outputs_is_refused(capfd, tmp_path, world):
    def overflow(p):
        for k, v in p["state_dict"].items():
            if v.is_floating_point() and k.endswith("weight") and v.dim() == 4:
                v.fill_(1e30)

    ckpt = _bad_checkpoint(world["ckpt"], tmp_path / "huge.pt", overflow)
    out = tmp_path / "out"
    res = cli(capfd, "predict", world["before"], world["after"], "-o", out, "--model", ckpt, "-q")
    line = assert_error(res, EXIT_CHECKPOINT, ckpt, outdir=out)
    assert "non-finite outputs" in line


def test_truncated_png_tile_is_an_error_naming_it(capfd, tmp_path, world):
    data = tmp_path / "png"
    assert cli(capfd, "tiles", world["before"], world["after"], world["labels"], "-o", data, "--tile-size", "32",
               "--format", "png", "-q").code == 0
    victim = sorted((data / "train" / "A").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:-40])
    res = cli(capfd, "train", data, "-o", tmp_path / "run", "--epochs", "1", "--workers", "0", "--no-imagenet", "-q")
    line = assert_error(res, EXIT_INPUT, victim.name, outdir=tmp_path / "run", finals=TRAIN_FINALS)
    assert "truncated" in line


def test_data_loader_worker_errors_are_one_short_line(capfd, tmp_path, world, monkeypatch):
    import cdmap.data
    from cdmap.errors import InputError

    victim = sorted((world["data"] / "train" / "A").iterdir())[0]
    real = cdmap.data.read_image

    def failing(path, *a, **kw):
        if Path(path) == victim:
            raise InputError("cannot read image: simulated decode failure", path)
        return real(path, *a, **kw)

    monkeypatch.setattr(cdmap.data, "read_image", failing)  # the forked worker inherits it
    run = tmp_path / "run"
    res = cli(capfd, "train", world["data"], "-o", run, "--epochs", "1", "--workers", "1", "--batch-size", "2",
              "--crop-size", "32", "--no-imagenet", "-q")
    line = assert_error(res, EXIT_INPUT, victim.name, outdir=run, finals=TRAIN_FINALS)
    assert len(line) < 300 and "DataLoader" not in line


def test_python_warnings_become_one_cdmap_line(capfd, tmp_path, world):
    import warnings as pywarnings

    from cdmap.cli.logs import install

    install()
    pywarnings.warn("raster has no CRS", UserWarning, stacklevel=1)
    err = capfd.readouterr().err
    assert err.strip() == "cdmap: warning: raster has no CRS"


# ------------------------------------------------------------------------------------------- mask rules


def test_nodata_value_and_mask_band_both_count(tmp_path):
    from cdmap.raster.valid import read_valid

    data = np.full((1, 32, 32), 7, dtype=np.uint8)
    data[0, :, :4] = 0  # nodata value, but the mask band says valid
    path = write_geotiff(tmp_path / "both.tif", data, nodata=0)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as ds:
        mask = np.full((32, 32), 255, dtype=np.uint8)
        mask[:, -4:] = 0  # masked out, value is data
        ds.write_mask(mask)
    with rasterio.open(path) as ds:
        _, valid = read_valid(ds)
    assert not valid[:, :4].any() and not valid[:, -4:].any() and valid[:, 4:-4].all()


# ---------------------------------------------------------------------------------- signals, every command


def _commands(w, tmp: Path) -> dict[str, tuple[list, list[Path], tuple[str, ...]]]:
    """command -> (argv, output paths that must not exist afterwards, fault points to interrupt at)."""
    run, tiles, vec, csv = tmp / "run", tmp / "tiles", tmp / "v.gpkg", tmp / "e.csv"
    return {
        "predict": (_predict_args(w, tmp / "out"), [tmp / "out" / n for n in PREDICT_FINALS],
                    ("start", "load", "strip")),
        "vectorize": (["vectorize", w["ref"] / "change_mask.tif", "-o", vec, "--window-size", "16", "-q"], [vec],
                      ("start", "window")),
        "tiles": (["tiles", w["before"], w["after"], w["labels"], "-o", tiles, "--tile-size", "32", "-q"],
                  [tiles / "train", tiles / "tiles.json"], ("start", "tile")),
        "train": (["train", w["data"], "-o", run, "--epochs", "1", "--workers", "0", "--batch-size", "2",
                   "--crop-size", "32", "--no-imagenet", "-q"], [run / n for n in TRAIN_FINALS], ("start", "batch")),
        "evaluate": (["evaluate", w["data"], "--model", w["ckpt"], "--split", "train", "--csv", csv, "-q"], [csv],
                     ("start", "batch")),
    }


@pytest.mark.parametrize("sig, code", [("SIGINT", EXIT_SIGINT), ("SIGTERM", EXIT_SIGTERM)])
@pytest.mark.parametrize("command", ["predict", "vectorize", "tiles", "train", "evaluate"])
def test_every_command_stops_cleanly_on_signals(capfd, tmp_path, world, monkeypatch, command, sig, code):
    inputs = [world["before"], world["after"], world["labels"], world["ckpt"], world["data"], world["ref"]]
    digest = _digest(*inputs)
    for point in _commands(world, tmp_path)[command][2]:
        argv, finals, _ = _commands(world, tmp_path / point)[command]
        (tmp_path / point).mkdir()
        process.reset_fault_counts()
        monkeypatch.setenv(process.FAULT_ENV, f"{point}:1:{sig}")
        res = cli(capfd, *argv)
        line = assert_error(res, code, sig)
        assert not [p for p in finals if p.exists()], (point, line)
        assert not [p for p in (tmp_path / point).rglob("*") if "cdmap-tmp" in p.name or "cdmap-tiles" in p.name]
    assert _digest(*inputs) == digest


def _popen(argv, ignore_sigint=False):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen([sys.executable, "-m", "cdmap", *map(str, argv)], stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=env, preexec_fn=pre)


def _wait_for(path_glob, root: Path, timeout=120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not list(root.glob(path_glob)):
        time.sleep(0.05)


def test_ctrl_c_stops_a_background_train_with_130_and_keeps_last_pt(tmp_path, world):
    """Started from a non-interactive shell with ``&``, a command inherits SIGINT ignored; cdmap still stops."""
    run = tmp_path / "run"
    proc = _popen(["train", world["data"], "-o", run, "--epochs", "200", "--workers", "0", "--batch-size", "2",
                   "--crop-size", "32", "--no-imagenet", "-q"], ignore_sigint=True)
    _wait_for("last.pt", run)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SIGINT, err
    assert err.strip().splitlines()[-1].startswith("cdmap: error: interrupted by SIGINT") and "--resume" in err
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    assert _subprocess(["info", run / "last.pt"]).returncode == 0


def test_sigterm_stops_vectorize_and_removes_its_temporary_file(tmp_path, world):
    big = write_geotiff(tmp_path / "big.tif", (np.indices((1024, 1024)).sum(0) % 7 == 0).astype(np.uint8))
    out = tmp_path / "v.gpkg"
    proc = _popen(["vectorize", big, "-o", out, "--window-size", "64"])
    _wait_for(".v.gpkg.cdmap-tmp-*", tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SIGTERM, err
    assert [p.name for p in tmp_path.iterdir()] == ["big.tif"] or sorted(p.name for p in tmp_path.iterdir()) == [
        "big.tif"]
