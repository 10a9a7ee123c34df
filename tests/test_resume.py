"""Resumable predict: SIGKILL at several points, resume, and get exactly the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from cdmap.errors import ResumeError
from cdmap.predict import predict_scene
from tests.conftest import synthetic_pair
from tests.helpers import tiny_checkpoint

FINALS = {"change_probability.tif", "change_mask.tif", "changes.gpkg", "run.json"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    before, after, _ = synthetic_pair(d, height=600, width=260, seed=5)
    ckpt = tiny_checkpoint(d / "tiny.pt")
    ref = predict_scene(before, after, d / "ref", ckpt, quiet=True, batch_size=3, threshold=0.45)
    return before, after, ckpt, ref


def _cmd(before, after, out, ckpt, *extra):
    return [sys.executable, "-m", "cdmap", "predict", str(before), str(after), "-o", str(out), "--model",
            str(ckpt), "--batch-size", "3", "--threshold", "0.45", "--quiet", *extra]


def _arrays(outdir):
    out = {}
    for name in ("change_probability.tif", "change_mask.tif"):
        with rasterio.open(outdir / name) as ds:
            out[name] = (ds.read(), ds.read_masks(1), ds.crs, ds.transform)
    return out


def _polygons(outdir):
    import geopandas as gpd

    gdf = gpd.read_file(outdir / "changes.gpkg", layer="changes")
    return gdf


@pytest.mark.parametrize("point", ["read:20", "strip:3", "assemble:1", "vectorize:1", "commit:2"])
def test_sigkill_then_resume_gives_identical_outputs(tmp_path, setup, point):
    before, after, ckpt, ref = setup
    out = tmp_path / "out"
    env = dict(os.environ, CDMAP_FAULT_INJECT=point)
    killed = subprocess.run(_cmd(before, after, out, ckpt), env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "run.json").exists()  # never mistaken for a finished run
    if point != "commit:2":
        assert not FINALS & {p.name for p in out.iterdir()}

    # without --resume a leftover partial run is neither finished nor reused silently
    resumed = subprocess.run(_cmd(before, after, out, ckpt, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    got, want = _arrays(out), _arrays(ref.outdir)
    for name in want:
        for g, w in zip(got[name], want[name], strict=True):
            if isinstance(g, np.ndarray):
                assert np.array_equal(g, w), name
            else:
                assert g == w
    gp, wp = _polygons(out), _polygons(ref.outdir)
    assert len(gp) == len(wp)
    assert list(gp["n_pixels"]) == list(wp["n_pixels"])
    assert all(a.equals_exact(b, 0.0) for a, b in zip(gp.geometry, wp.geometry, strict=True))
    assert not (out / ".cdmap-partial").exists()


def test_resume_with_different_options_is_refused(tmp_path, setup):
    before, after, ckpt, _ = setup
    out = tmp_path / "out"
    env = dict(os.environ, CDMAP_FAULT_INJECT="strip:2")
    subprocess.run(_cmd(before, after, out, ckpt), env=env, capture_output=True)
    proc = subprocess.run(_cmd(before, after, out, ckpt, "--resume", "--min-area", "5"), capture_output=True,
                          text=True)
    assert proc.returncode == 7
    assert proc.stderr.count("\n") == 1 and "min_area" in proc.stderr
    with pytest.raises(ResumeError):
        predict_scene(before, after, out, ckpt, resume=True, quiet=True, prob_dtype="float32")


def test_run_without_resume_discards_the_partial_run(tmp_path, setup):
    before, after, ckpt, ref = setup
    out = tmp_path / "out"
    env = dict(os.environ, CDMAP_FAULT_INJECT="strip:2")
    subprocess.run(_cmd(before, after, out, ckpt), env=env, capture_output=True)
    proc = subprocess.run(_cmd(before, after, out, ckpt)[:-1], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "discarding an unfinished earlier run" in proc.stderr
    got, want = _arrays(out), _arrays(ref.outdir)
    assert np.array_equal(got["change_mask.tif"][0], want["change_mask.tif"][0])


def test_sigterm_exits_143_and_keeps_journal(tmp_path, setup):
    before, after, ckpt, _ = setup
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(before, after, out, ckpt)[:-1] + ["--batch-size", "1"], stderr=subprocess.PIPE,
                            text=True)
    import time

    strips = out / ".cdmap-partial" / "strips"
    deadline = time.time() + 120
    while time.time() < deadline and not (strips.exists() and list(strips.glob("*.npz"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("cdmap: error: interrupted by SIGTERM") and "--resume" in last
    assert (out / ".cdmap-partial" / "journal.jsonl").exists()
    assert not FINALS & {p.name for p in out.iterdir()}


class _Stop(Exception):
    pass


def test_resume_accepts_explicit_options_equal_to_the_checkpoint_defaults(tmp_path, setup, monkeypatch):
    """The manifest holds resolved values: --tile-size/--overlap/--threshold spelled out match the defaults."""
    import cdmap.process as process_mod
    from cdmap.checkpoint import load_checkpoint
    from cdmap.predict import default_overlap

    before, after, ckpt, ref = setup
    out = tmp_path / "out"
    real = process_mod.fault_point
    strips = []

    def stop_after_two_strips(phase):
        if phase == "strip":
            strips.append(1)
            if len(strips) == 2:
                raise _Stop
        real(phase)

    monkeypatch.setattr(process_mod, "fault_point", stop_after_two_strips)
    with pytest.raises(_Stop):
        predict_scene(before, after, out, ckpt, quiet=True, batch_size=3, threshold=0.45)
    monkeypatch.setattr(process_mod, "fault_point", real)
    tile = load_checkpoint(ckpt).tile_size
    predict_scene(before, after, out, ckpt, quiet=True, batch_size=3, threshold=0.45, resume=True,
                  tile_size=tile, overlap=default_overlap(tile))
    got, want = _arrays(out), _arrays(ref.outdir)
    assert np.array_equal(got["change_probability.tif"][0], want["change_probability.tif"][0])
