"""The predict pipeline end to end on small synthetic georeferenced scenes."""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import rasterio

from cdmap.errors import IncompatibleInputsError, OutputError, UsageError
from cdmap.predict import predict_scene
from tests.conftest import synthetic_pair, write_geotiff
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    d = tmp_path_factory.mktemp("scene")
    return synthetic_pair(d, height=150, width=170)


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.read_masks(1), ds.profile, ds.tags(), ds.scales


def test_outputs_georeferenced_and_complete(tmp_path, ckpt, scene):
    before, after, _ = scene
    res = predict_scene(before, after, tmp_path / "out", ckpt, batch_size=3, quiet=True)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    report = ["preview.png", "report.html"] if importlib.util.find_spec("matplotlib") else []
    assert names == sorted(["change_mask.tif", "change_probability.qml", "change_probability.tif", "changes.gpkg",
                            "run.json", *report])
    with rasterio.open(before) as ref, rasterio.open(res.probability) as p, rasterio.open(res.mask) as m:
        for ds in (p, m):
            assert ds.crs == ref.crs and ds.transform == ref.transform and ds.shape == ref.shape
            assert ds.profile["tiled"] and ds.overviews(1) == [] or ds.overviews(1)
        assert p.dtypes[0] == "uint8" and p.scales[0] == pytest.approx(1 / 255)
        assert m.nodata == 255
        tags = p.tags()
        assert tags["CDMAP_TILE_SIZE"] == "64" and len(tags["CDMAP_CHECKPOINT_SHA256"]) == 64
        assert tags["CDMAP_BEFORE"] == "before.tif"
        mask = m.read(1)
    assert set(np.unique(mask)) <= {0, 1}
    summary = json.loads(res.run_json.read_text())
    for key in ("inputs", "options", "model", "alignment", "timings", "mpix_per_s", "peak_rss_mib",
                "changed_area_m2", "polygons", "seam_ratio", "overlap_disagreement"):
        assert key in summary
    assert summary["changed_pixels"] == int((mask == 1).sum())
    assert summary["changed_area_m2"] == pytest.approx((mask == 1).sum() * 0.25)
    import geopandas as gpd

    gdf = gpd.read_file(res.vectors, layer="changes")
    assert len(gdf) == summary["polygons"]
    assert gdf.crs == rasterio.open(before).crs
    assert not (tmp_path / "out" / ".cdmap-partial").exists()


def test_independent_of_batch_size_and_workers_and_repeatable(tmp_path, ckpt, scene):
    before, after, _ = scene
    r1 = predict_scene(before, after, tmp_path / "a", ckpt, batch_size=1, workers=1, quiet=True,
                       prob_dtype="float32", vector_format="none")
    r2 = predict_scene(before, after, tmp_path / "b", ckpt, batch_size=5, workers=3, quiet=True,
                       prob_dtype="float32", vector_format="none")
    r3 = predict_scene(before, after, tmp_path / "c", ckpt, batch_size=5, workers=3, quiet=True,
                       prob_dtype="float32", vector_format="none")
    p1, p2, p3 = (_read(r.probability)[0] for r in (r1, r2, r3))
    np.testing.assert_allclose(p1, p2, atol=2e-5)
    assert (tmp_path / "b" / "change_probability.tif").read_bytes() == \
        (tmp_path / "c" / "change_probability.tif").read_bytes()
    assert (tmp_path / "b" / "change_mask.tif").read_bytes() == (tmp_path / "c" / "change_mask.tif").read_bytes()


def test_nodata_union_is_nodata_everywhere(tmp_path, ckpt):
    rng = np.random.default_rng(1)
    a = rng.integers(1, 200, size=(3, 140, 150), dtype=np.uint8)
    b = a.copy()
    b[:, 60:90, 60:90] = 250
    a[:, :, :40] = 0  # nodata collar on BEFORE
    b[:, 120:, :] = 0  # nodata on AFTER
    pa = write_geotiff(tmp_path / "a.tif", a, nodata=0)
    pb = write_geotiff(tmp_path / "b.tif", b, nodata=0)
    res = predict_scene(pa, pb, tmp_path / "out", ckpt, quiet=True, threshold=0.0)
    prob, pmask, *_ = _read(res.probability)
    mask = _read(res.mask)[0]
    invalid = np.zeros((140, 150), bool)
    invalid[:, :40] = True
    invalid[120:, :] = True
    assert (pmask[invalid] == 0).all() and (pmask[~invalid] == 255).all()
    assert (mask[invalid] == 255).all() and (mask[~invalid] == 1).all()  # threshold 0: all valid is change
    import geopandas as gpd
    from shapely.geometry import box

    gdf = gpd.read_file(res.vectors)
    with rasterio.open(pa) as ds:
        t = ds.transform
    collar = box(t.c, t.f - 140 * 0.5, t.c + 40 * 0.5, t.f)
    assert all(g.intersection(collar).area < 1e-6 for g in gdf.geometry)


def test_all_nodata_windows_are_skipped(tmp_path, ckpt):
    a = np.full((3, 100, 300), 120, np.uint8)
    a[:, :, 150:] = 0
    pa = write_geotiff(tmp_path / "a.tif", a, nodata=0)
    pb = write_geotiff(tmp_path / "b.tif", a.copy(), nodata=0)
    res = predict_scene(pa, pb, tmp_path / "out", ckpt, quiet=True, vector_format="none")
    w = res.summary["windows"]
    assert w["skipped_nodata"] > 0 and w["computed"] + w["skipped_nodata"] == w["total"]


@pytest.mark.parametrize("shape", [(20, 30), (1, 77), (65, 64), (129, 1)])
def test_scenes_smaller_than_a_tile_and_odd_sizes(tmp_path, ckpt, shape):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 255, size=(3, *shape), dtype=np.uint8)
    pa = write_geotiff(tmp_path / "a.tif", a)
    pb = write_geotiff(tmp_path / "b.tif", a[:, ::-1].copy())
    res = predict_scene(pa, pb, tmp_path / "out", ckpt, quiet=True, vector_format="none")
    prob, valid, *_ = _read(res.probability)
    assert prob.shape == shape and (valid == 255).all()


def test_existing_output_refused_without_overwrite(tmp_path, ckpt, scene):
    before, after, _ = scene
    out = tmp_path / "out"
    out.mkdir()
    (out / "change_mask.tif").write_bytes(b"keep me")
    with pytest.raises(OutputError, match="--overwrite"):
        predict_scene(before, after, out, ckpt, quiet=True)
    assert (out / "change_mask.tif").read_bytes() == b"keep me"
    assert sorted(p.name for p in out.iterdir()) == ["change_mask.tif"]
    predict_scene(before, after, out, ckpt, quiet=True, overwrite=True, vector_format="none")
    with rasterio.open(out / "change_mask.tif") as ds:
        assert ds.count == 1


def test_float32_probabilities_and_bf16(tmp_path, ckpt, scene):
    before, after, _ = scene
    r32 = predict_scene(before, after, tmp_path / "a", ckpt, quiet=True, prob_dtype="float32",
                        vector_format="none")
    rbf = predict_scene(before, after, tmp_path / "b", ckpt, quiet=True, prob_dtype="float32",
                        precision="bf16", vector_format="none")
    p32, pbf = _read(r32.probability)[0], _read(rbf.probability)[0]
    assert p32.dtype == np.float32 and np.nanmin(p32) >= 0 and np.nanmax(p32) <= 1
    assert np.abs(p32 - pbf).mean() < 0.05
    assert rbf.summary["precision"] == "bf16"


def test_uint8_probability_matches_float(tmp_path, ckpt, scene):
    before, after, _ = scene
    r8 = predict_scene(before, after, tmp_path / "a", ckpt, quiet=True, vector_format="none")
    r32 = predict_scene(before, after, tmp_path / "b", ckpt, quiet=True, prob_dtype="float32",
                        vector_format="none")
    p8 = _read(r8.probability)[0].astype(np.float64) / 255
    p32 = _read(r32.probability)[0]
    assert np.abs(p8 - p32).max() <= 0.5 / 255 + 1e-6


def test_mismatched_grid_is_warped_and_reported(tmp_path, ckpt):
    from rasterio.transform import from_origin

    rng = np.random.default_rng(4)
    a = rng.integers(0, 255, size=(3, 120, 130), dtype=np.uint8)
    pa = write_geotiff(tmp_path / "a.tif", a)
    pb = write_geotiff(tmp_path / "b.tif", a[:, 10:, 10:].copy(),
                       transform=from_origin(500000.0 + 5.0, 4000000.0 - 5.0, 0.5, 0.5))
    res = predict_scene(pa, pb, tmp_path / "out", ckpt, quiet=True, vector_format="none")
    assert res.summary["alignment"]["mode"] != "same-grid"
    with rasterio.open(res.probability) as ds:
        assert ds.shape == (110, 120)
        assert ds.transform.c == pytest.approx(500005.0) and ds.transform.f == pytest.approx(3999995.0)
    with pytest.raises(IncompatibleInputsError):
        predict_scene(pa, pb, tmp_path / "strict", ckpt, quiet=True, align="strict")
    assert not (tmp_path / "strict" / "change_mask.tif").exists()


def test_band_count_mismatch_with_checkpoint_writes_nothing(tmp_path, ckpt):
    a = np.zeros((5, 50, 50), np.uint16)
    pa = write_geotiff(tmp_path / "a.tif", a)
    pb = write_geotiff(tmp_path / "b.tif", a)
    with pytest.raises(IncompatibleInputsError, match="band"):
        predict_scene(pa, pb, tmp_path / "out", ckpt, quiet=True)
    assert not (tmp_path / "out").exists()
    res = predict_scene(pa, pb, tmp_path / "out", ckpt, quiet=True, bands=[1, 2, 3], vector_format="none")
    assert res.mask.exists()


def test_bad_options_are_usage_errors(tmp_path, ckpt, scene):
    before, after, _ = scene
    with pytest.raises(UsageError):
        predict_scene(before, after, tmp_path / "o", ckpt, overlap=64, quiet=True)
    with pytest.raises(UsageError):
        predict_scene(before, after, tmp_path / "o", ckpt, prob_dtype="int16", quiet=True)
    with pytest.raises(UsageError):
        predict_scene(before, after, tmp_path / "o", ckpt, device="cuda", quiet=True)


def test_cog_outputs_validate(tmp_path, ckpt):
    from cdmap.raster.write import validate_cog

    before, after, _ = synthetic_pair(tmp_path, height=700, width=600)
    res = predict_scene(before, after, tmp_path / "out", ckpt, quiet=True, cog=True, vector_format="none",
                        batch_size=8, overlap=0)
    for p in (res.probability, res.mask):
        assert validate_cog(p) == []
        with rasterio.open(p) as ds:
            assert ds.overviews(1)


@pytest.mark.skipif(shutil.which("gdalinfo") is None, reason="gdal-bin not installed")
def test_outputs_open_in_gdal_command_line_tools(tmp_path, ckpt, scene):
    before, after, _ = scene
    res = predict_scene(before, after, tmp_path / "out", ckpt, quiet=True, threshold=0.3)
    for p in (res.probability, res.mask):
        out = subprocess.run(["gdalinfo", "-stats", str(p)], capture_output=True, text=True, check=True).stdout
        assert "STATISTICS_MEAN" in out and "PROJCRS" in out
    out = subprocess.run(["ogrinfo", "-al", "-so", str(res.vectors)], capture_output=True, text=True,
                         check=True).stdout
    assert "Layer name: changes" in out and "area_m2" in out


def test_cli_predict_and_info(tmp_path, ckpt, scene):
    before, after, _ = scene
    cmd = [sys.executable, "-m", "cdmap", "predict", str(before), str(after), "-o", str(tmp_path / "o"),
           "--model", str(ckpt), "--vector-format", "geojson", "--co", "COMPRESS=ZSTD"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "changed " in proc.stderr and " ha" in proc.stderr
    with rasterio.open(tmp_path / "o" / "change_mask.tif") as ds:
        assert ds.compression.name.upper() == "ZSTD"
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 6 and again.stderr.count("\n") == 1 and "--overwrite" in again.stderr
    info = subprocess.run([sys.executable, "-m", "cdmap", "info", str(ckpt), "--json"], capture_output=True,
                          text=True, check=True)
    assert json.loads(info.stdout)["tile_size"] == 64


def test_sigint_exits_130_and_leaves_no_final_file(tmp_path, ckpt):
    before, after, _ = synthetic_pair(tmp_path, height=900, width=900)
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdmap", "predict", str(before), str(after), "-o", str(out), "--model", str(ckpt),
         "--batch-size", "1"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / ".cdmap-partial" / "strips").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    finals = {"change_probability.tif", "change_mask.tif", "changes.gpkg", "run.json"}
    assert not finals & {p.name for p in out.iterdir()}
    assert (out / ".cdmap-partial" / "journal.jsonl").exists()


def test_property_results_do_not_depend_on_batch_size_or_workers(tmp_path_factory, ckpt):
    """Hypothesis: random scene sizes, overlaps, batch sizes and worker counts give the same probabilities."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    root = tmp_path_factory.mktemp("prop")
    ref_cache: dict = {}

    @settings(max_examples=6, deadline=None)
    @given(h=st.integers(20, 140), w=st.integers(20, 140), overlap=st.sampled_from([0, 8, 16, 24]),
           batch=st.integers(1, 7), workers=st.integers(1, 3))
    def check(h, w, overlap, batch, workers):
        key = (h, w, overlap)
        d = root / f"{h}_{w}_{overlap}"
        if key not in ref_cache:
            d.mkdir(exist_ok=True)
            a, b, _ = synthetic_pair(d, height=h, width=w, seed=h * 1000 + w)
            ref = predict_scene(a, b, d / "ref", ckpt, overlap=overlap, batch_size=1, workers=1, quiet=True,
                                prob_dtype="float32", vector_format="none")
            ref_cache[key] = (a, b, _read(ref.probability)[0])
        a, b, want = ref_cache[key]
        out = d / f"b{batch}w{workers}"
        got = predict_scene(a, b, out, ckpt, overlap=overlap, batch_size=batch, workers=workers, quiet=True,
                            prob_dtype="float32", vector_format="none", overwrite=True)
        np.testing.assert_allclose(_read(got.probability)[0], want, atol=2e-5)

    check()


def test_checkpoint_hash_is_the_same_for_a_path_and_a_loaded_checkpoint(tmp_path, ckpt):
    from cdmap.checkpoint import file_sha256, load_checkpoint

    before, after, _ = synthetic_pair(tmp_path, height=40, width=40)
    by_path = predict_scene(before, after, tmp_path / "a", ckpt, quiet=True, vector_format="none")
    loaded = predict_scene(before, after, tmp_path / "b", load_checkpoint(ckpt), quiet=True, vector_format="none")
    assert by_path.summary["model"]["sha256"] == loaded.summary["model"]["sha256"] == file_sha256(ckpt)
    assert by_path.summary["model"]["checkpoint"] == loaded.summary["model"]["checkpoint"] == str(ckpt)
    assert _read(by_path.probability)[3]["CDMAP_CHECKPOINT_SHA256"] == \
        _read(loaded.probability)[3]["CDMAP_CHECKPOINT_SHA256"] == file_sha256(ckpt)


def test_keyword_overrides_go_to_the_options_class_that_has_them(tmp_path, ckpt):
    from cdmap.predict import PredictOptions, RunOptions
    from cdmap.predict.options import split_overrides

    opts, run = split_overrides(PredictOptions(min_area=2.0), RunOptions(workers=3),
                                {"threshold": 0.3, "quiet": True, "overwrite": True})
    assert opts == PredictOptions(min_area=2.0, threshold=0.3)
    assert run == RunOptions(workers=3, quiet=True, overwrite=True)
    with pytest.raises(TypeError, match="no_such_option"):
        predict_scene("a.tif", "b.tif", tmp_path / "o", ckpt, no_such_option=1)
