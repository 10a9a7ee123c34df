"""Pictures of a run: preview.png and report.html from predict, the evaluation section, training.png, progress."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, ckpt):
    """One scene predicted through ``evaluate_scene`` with the prediction kept and an error map."""
    pytest.importorskip("matplotlib")
    from tests.conftest import synthetic_pair, write_geotiff

    root = tmp_path_factory.mktemp("rep")
    before, after, truth = synthetic_pair(root, height=80, width=112)
    labels = write_geotiff(root / "truth.tif", truth.astype(np.uint8))
    from cdmap.evaluate import evaluate_scene

    res = evaluate_scene(before, after, labels, ckpt, outdir=root / "pred", device="cpu", tile_size=64,
                         error_map=root / "maps" / "error.tif", vector_format="gpkg")
    return root, res


def test_predict_report_is_self_contained_and_complete(evaluated):
    root, _res = evaluated
    out = root / "pred"
    summary = json.loads((out / "run.json").read_text())
    assert {"preview", "report", "style"} <= set(summary["outputs"])
    width, height = _png_size(out / "preview.png")
    assert 800 <= width <= 1100 and 150 <= height <= 900  # a few hundred pixels a panel, three panels
    html = (out / "report.html").read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html  # no network, no code
    assert html.count('src="data:image/png;base64,') >= 4  # preview, histogram, size classes, error map
    for text in ("Changed area by polygon size", "seam ratio", "overlap disagreement", "Probability of change",
                 f"{summary['polygons']:,}", "ha)"):
        assert text in html, text
    # the histogram in run.json counts every valid pixel once
    assert sum(summary["probability_histogram"]["counts"]) == summary["valid_pixels"]
    assert summary["changed_area_ha"] == pytest.approx(summary["changed_area_m2"] / 1e4, abs=1e-4)
    assert summary["changed_share"] == pytest.approx(summary["changed_pixels"] / summary["valid_pixels"], abs=1e-6)


def test_evaluate_scene_adds_metrics_and_error_map_to_the_report(evaluated):
    root, res = evaluated
    html = (root / "pred" / "report.html").read_text()
    assert "Evaluation against truth.tif" in html and "error.tif" in html
    assert f"{res.metrics['tp']:,}" in html
    assert html.index("Evaluation against") < html.index("<h2>Run</h2>")  # the scores come first


def test_no_report_and_missing_matplotlib(tmp_path, ckpt, monkeypatch, caplog):
    from cdmap import report
    from cdmap.predict import predict_scene
    from tests.conftest import synthetic_pair

    before, after, _ = synthetic_pair(tmp_path, height=48, width=64)
    r = predict_scene(before, after, tmp_path / "a", ckpt, device="cpu", vector_format="none", report=False,
                      quiet=True)
    assert not (tmp_path / "a" / "preview.png").exists() and "report" not in r.summary["outputs"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as when it is not installed
    monkeypatch.setattr(report, "_said_missing", False)
    with caplog.at_level("INFO", logger="cdmap"):
        r = predict_scene(before, after, tmp_path / "b", ckpt, device="cpu", vector_format="none", quiet=True)
    assert not (tmp_path / "b" / "report.html").exists() and "report" not in r.summary["outputs"]
    assert [m for m in caplog.messages if "matplotlib is not installed" in m] != []
    assert (tmp_path / "b" / "change_probability.qml").exists()  # the rest of the run is untouched


def test_training_plot_and_size_classes(tmp_path):
    pytest.importorskip("matplotlib")
    from cdmap.report import size_classes, write_training_plot

    hist = [{"epoch": e, "train_loss": 1 / e, "val_f1": 0.1 * e, "val_f1_calibrated": 0.12 * e} for e in (1, 2, 3)]
    path = write_training_plot(hist, tmp_path / "training.png")
    assert path is not None and _png_size(path)[0] == 800
    assert write_training_plot([], tmp_path / "none.png") is None
    classes = size_classes([5.0, 50.0, 60.0, 20_000.0])
    assert [c["polygons"] for c in classes] == [1, 2, 0, 0, 1]
    assert classes[1]["area_m2"] == 110.0 and classes[-1]["max_m2"] is None


def test_scale_bar_lengths():
    from cdmap.report.figures import nice_length

    assert [nice_length(s) for s in (40.0, 200.0, 1234.0, 9.0)] == [10.0, 50.0, 200.0, 2.0]


def test_progress_rates_and_plain_lines(monkeypatch, capsys):
    from cdmap import progress
    from cdmap.progress import Progress, format_duration, format_rate

    assert format_rate(4321.0, "Pix") == "4.32 kPix/s" and format_rate(0.42, "win") == "0.42 win/s"
    assert format_rate(2.5e6, "Pix") == "2.5 MPix/s" and format_duration(3723) == "1:02:03"
    clock = iter([0.0, 2.0, 3.0, 4.0, 10.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    p = Progress(4, "predict", pixels_per_unit=1000.0, plain_interval=5.0)
    for _ in range(4):
        p.update(1)
    lines = capsys.readouterr().err.strip().splitlines()
    # the first batch prints (with an ETA), the next ones within 5 s do not, the last one does
    assert len(lines) == 2 and lines[0].startswith("predict: 1/4 (25%), 500 Pix/s, 0.5 win/s, ETA 0:06")
    assert lines[1].startswith("predict: 4/4 (100%)") and "kPix/s" not in lines[0]


@pytest.mark.slow
def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    """Look at the report as a browser does (needs Debian's chromium; the screenshot is kept for a person)."""
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed")
    root, _ = evaluated
    shot = tmp_path / "report.png"
    proc = subprocess.run(["bash", str(REPO / "examples" / "render_report.sh"), str(root / "pred" / "report.html"),
                           str(shot)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert _png_size(shot) == (1100, 3000)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_train_on_two_folders_resumes_from_anywhere_with_a_plot(tmp_path, monkeypatch):
    import importlib.util

    from cdmap.checkpoint import load_checkpoint
    from cdmap.train import TrainConfig, resume, train
    from tests.test_train_loop import make_change_set

    make_change_set(tmp_path / "d1", n=2, size=32)
    make_change_set(tmp_path / "d2", n=2, size=32, seed=1)
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(epochs=2, batch_size=2, crop_size=32, seed=3)
    assert cfg.effective_batch == 2  # no hidden accumulation when only the batch size is chosen
    train([Path("d1"), Path("d2")], Path("run"), cfg, workers=0, quiet=True, stop_after_epoch=1)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["data_dirs"] == [str(tmp_path / "d1"), str(tmp_path / "d2")]
    monkeypatch.chdir(tmp_path / "d1")  # a relative DATA would no longer be found from here
    result = resume(tmp_path / "run", quiet=True)
    assert result.finished and result.epochs_completed == 2
    prov = load_checkpoint(tmp_path / "run" / "last.pt").provenance
    assert prov["train_pairs"] == 4  # both folders' train pairs
    if importlib.util.find_spec("matplotlib"):
        assert _png_size(tmp_path / "run" / "training.png")[0] == 800


def test_preview_reads_a_scene_in_another_crs(tmp_path):
    pytest.importorskip("matplotlib")
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import from_origin
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    from cdmap.report.figures import Grid, read_scaled

    crs = CRS.from_epsg(32633)
    t = from_origin(500_000, 5_000_000, 1.0, 1.0)
    data = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))[None]
    dst_crs = CRS.from_epsg(3857)
    dt, w, h = calculate_default_transform(crs, dst_crs, 64, 64, *rasterio.transform.array_bounds(64, 64, t))
    out = np.zeros((1, h, w), np.uint8)
    reproject(data, out, src_transform=t, src_crs=crs, dst_transform=dt, dst_crs=dst_crs,
              resampling=Resampling.bilinear)
    path = tmp_path / "m.tif"
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=1, dtype="uint8", crs=dst_crs,
                       transform=dt, nodata=0) as ds:
        ds.write(out)
    arr = read_scaled(path, Grid(crs, t, 64, 64), (16, 16), [1])
    assert arr.shape == (1, 16, 16)
    inner = arr[0, 2:-2, 2:-2]
    cols = np.ma.mean(inner, axis=0)
    assert np.all(np.diff(cols) > 0)  # the west-east gradient survives the warp onto BEFORE's grid


def test_preview_of_a_pair_without_crs(tmp_path, ckpt, caplog):
    """Pixel-grid rasters (no CRS, y axis down) get a preview too (it once failed: bounds and transform
    inconsistent)."""
    pytest.importorskip("matplotlib")
    from cdmap.predict import predict_scene
    from tests.conftest import synthetic_pair

    before, after, _ = synthetic_pair(tmp_path, height=80, width=112, crs=None,
                                      transform=__import__("rasterio").Affine.identity())
    with caplog.at_level("INFO", logger="cdmap"):
        r = predict_scene(before, after, tmp_path / "out", ckpt, device="cpu", vector_format="none",
                          allow_no_crs=True, quiet=True)
    assert not [m for m in caplog.messages if "no preview" in m]
    assert _png_size(tmp_path / "out" / "preview.png")[0] > 112 and "report" in r.summary["outputs"]


def test_ctrl_c_while_the_report_is_drawn_still_stops_predict(tmp_path, ckpt, monkeypatch):
    """The report's `except Exception` (a picture never costs the rasters) must not swallow an interruption,
    nor may matplotlib's own handlers: signals are held while it draws, then delivered."""
    import signal

    from cdmap import process, report
    from cdmap.errors import Interrupted
    from cdmap.predict import predict_scene
    from tests.conftest import synthetic_pair

    def drawing(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # as if Ctrl-C came mid-drawing
        raise RuntimeError("a library caught and replaced it")

    monkeypatch.setattr(report, "write_run_report", drawing)
    before, after, _ = synthetic_pair(tmp_path, height=48, width=64)
    with pytest.raises(Interrupted), process.SignalGuard():
        predict_scene(before, after, tmp_path / "out", ckpt, device="cpu", vector_format="none", quiet=True)
    assert not (tmp_path / "out" / "run.json").exists()
