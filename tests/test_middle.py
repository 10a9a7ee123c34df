"""End-to-end regressions of the shared middle: one area rule, one format vocabulary, one log path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("geopandas")
rasterio = pytest.importorskip("rasterio")

from rasterio.transform import from_origin  # noqa: E402

from cdmap.cli import main as cli_main  # noqa: E402
from tests.conftest import synthetic_pair, write_geotiff  # noqa: E402
from tests.helpers import tiny_checkpoint  # noqa: E402

Y50 = 6378137.0 * math.log(math.tan(math.pi / 4 + math.radians(50.0) / 2))
GRIDS = {
    "EPSG:3857": from_origin(1_500_000.0, Y50, 10.0, 10.0),
    "EPSG:32633": from_origin(500_000.0, 5_540_000.0, 10.0, 10.0),
    "EPSG:4326": from_origin(15.0, 50.0, 1e-4, 1e-4),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _run(capfd, *argv) -> tuple[int, str]:
    capfd.readouterr()
    try:
        cli_main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capfd.readouterr().err


@pytest.mark.parametrize("crs", sorted(GRIDS))
def test_run_json_area_equals_the_polygons_area(tmp_path, ckpt, crs, one_torch_thread):
    """run.json's changed_area_m2 and the sum of the polygons' area_m2 agree within 0.5 % in any CRS."""
    import geopandas as gpd

    from cdmap.predict import predict_scene

    before, after, _ = synthetic_pair(tmp_path, height=64, width=96, crs=crs, transform=GRIDS[crs])
    # the untrained model's probabilities straddle its median: a threshold there gives many regions
    probe = predict_scene(before, after, tmp_path / "probe", ckpt, vector_format="none", quiet=True,
                          prob_dtype="float32")
    with rasterio.open(probe.probability) as src:
        median = float(np.nanmedian(src.read(1)))
    res = predict_scene(before, after, tmp_path / "out", ckpt, threshold=median, quiet=True)
    polygons = gpd.read_file(res.vectors)
    assert len(polygons) > 3
    raster_area = json.loads(res.run_json.read_text())["changed_area_m2"]
    assert polygons["area_m2"].sum() == pytest.approx(raster_area, rel=5e-3)
    if crs == "EPSG:3857":  # ground area, not the inflated map area (1/cos^2(50°) ≈ 2.42x)
        nominal = res.summary["changed_pixels"] * 100.0
        assert raster_area == pytest.approx(nominal * math.cos(math.radians(50.0)) ** 2, rel=2e-2)


def test_one_vector_format_vocabulary(capfd, tmp_path, ckpt):
    before, after, _ = synthetic_pair(tmp_path, height=32, width=32)
    mask = write_geotiff(tmp_path / "mask.tif", np.zeros((32, 32), np.uint8))
    code_p, err_p = _run(capfd, "predict", before, after, "-o", tmp_path / "p", "-m", ckpt, "--vector-format",
                         "json")
    code_v, err_v = _run(capfd, "vectorize", mask, "-o", tmp_path / "v.json", "--vector-format", "json")
    assert code_p == code_v == 2
    assert "--vector-format must be one of gpkg, geojson, fgb, shp" in err_p
    assert "--vector-format must be one of gpkg, geojson, fgb, shp" in err_v


def test_library_warnings_reach_the_cli_as_log_lines(capfd, tmp_path):
    # an integer raster without scale metadata read with --threshold: the library warns through logging
    raster = write_geotiff(tmp_path / "counts.tif", np.full((32, 32), 7, np.uint8))
    code, err = _run(capfd, "vectorize", raster, "-o", tmp_path / "out.gpkg", "--threshold", "5")
    assert code == 0, err
    assert "cdmap: warning: " in err and "without scale metadata" in err
    assert "UserWarning" not in err


def test_quiet_keeps_warnings_and_drops_notes(capfd, tmp_path, ckpt, one_torch_thread):
    before, after, _ = synthetic_pair(tmp_path, height=32, width=32)
    code, err = _run(capfd, "predict", before, after, "-o", tmp_path / "a", "-m", ckpt, "--vector-format", "none")
    assert code == 0 and "cdmap: done: 32 x 32 px in" in err  # the summary is an INFO record
    code, err = _run(capfd, "predict", before, after, "-o", tmp_path / "b", "-m", ckpt, "--vector-format", "none",
                     "-q", "--threshold", "0.999")  # not mostly "change": no warning expected
    assert code == 0 and err == ""
