"""One area rule: polygon ``area_m2`` and the per-pixel area a run's ``changed_area_m2`` uses agree, in any CRS."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

pytest.importorskip("geopandas")
rasterio = pytest.importorskip("rasterio")

from rasterio.crs import CRS  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402

from cdmap.errors import UsageError  # noqa: E402
from cdmap.vector import FORMATS, format_from_path, pixel_area_m2_rows, vectorize_raster  # noqa: E402
from tests.conftest import write_geotiff  # noqa: E402

LAT = 50.0
# Web Mercator y of 50°N on the sphere of radius 6378137 m
Y50 = 6378137.0 * math.log(math.tan(math.pi / 4 + math.radians(LAT) / 2))

GRIDS = {
    # 10 m nominal pixels: true ground size ~6.4 m at 50°N
    "EPSG:3857": from_origin(1_500_000.0, Y50 + 1000.0, 10.0, 10.0),
    "EPSG:32633": from_origin(500_000.0, 5_540_000.0, 10.0, 10.0),
    "EPSG:4326": from_origin(15.0, LAT + 0.01, 1e-4, 1e-4),
}


def _mask(h: int = 200, w: int = 240) -> np.ndarray:
    """Blobs of different sizes spread over the scene, one touching the top and one the bottom edge."""
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[0:30, 10:200] = 1
    mask[50:120, 60:90] = 1
    mask[70:80, 150:230] = 1
    mask[150:200, 5:235] = 1
    mask[100:110, 100:110] = 0
    rng = np.random.default_rng(7)
    mask[rng.random((h, w)) < 0.02] = 1
    return mask


def _run_area(mask: np.ndarray, crs: CRS | None, transform, row_block: int = 64) -> float:
    """Σ over rows of (changed pixels in the row × pixel area), in row blocks as predict does."""
    h, w = mask.shape
    total = 0.0
    for r0 in range(0, h, row_block):
        r1 = min(h, r0 + row_block)
        total += float((mask[r0:r1].sum(axis=1) * pixel_area_m2_rows(crs, transform, r0, r1, w, height=h)).sum())
    return total


@pytest.mark.parametrize("crs", list(GRIDS))
def test_polygon_areas_match_pixel_areas(tmp_path, crs):
    mask = _mask()
    transform = GRIDS[crs]
    path = write_geotiff(tmp_path / "m.tif", mask, crs=crs, transform=transform, nodata=255)
    stats = vectorize_raster(path, tmp_path / "o.gpkg", window_size=64)
    assert stats.changed_pixels == int(mask.sum())
    run_area = _run_area(mask, CRS.from_string(crs), transform)
    assert stats.changed_area_m2 == pytest.approx(run_area, rel=0.005)
    # without the raster height the frame centres on the rows asked for: same areas here
    h, w = mask.shape
    no_height = float((mask.sum(axis=1) * pixel_area_m2_rows(CRS.from_string(crs), transform, 0, h, w)).sum())
    assert no_height == pytest.approx(run_area, rel=0.005)


def test_web_mercator_area_is_ground_area(tmp_path):
    mask = _mask()
    transform = GRIDS["EPSG:3857"]
    path = write_geotiff(tmp_path / "m.tif", mask, crs="EPSG:3857", transform=transform, nodata=255)
    stats = vectorize_raster(path, tmp_path / "o.gpkg")
    nominal = int(mask.sum()) * 100.0
    # the scene spans 50.000..50.013°N: ground area ~ nominal x cos²(lat) (within the ellipsoid's ~0.2 %)
    lat = math.radians(LAT + 0.006)
    assert stats.changed_area_m2 == pytest.approx(nominal * math.cos(lat) ** 2, rel=0.005)
    assert stats.changed_area_m2 < 0.45 * nominal  # not Web Mercator's nominal 10 m x 10 m pixels


def test_utm_pixel_area_is_nominal_and_no_crs_is_map_units():
    crs = CRS.from_string("EPSG:32633")
    assert pixel_area_m2_rows(crs, GRIDS["EPSG:32633"], 0, 3, 100) == pytest.approx([100.0] * 3)
    t = from_origin(0, 20, 2.0, 3.0)
    assert pixel_area_m2_rows(None, t, 5, 9, 10) == pytest.approx([6.0] * 4)
    assert pixel_area_m2_rows(None, t, 5, 5, 10).shape == (0,)


def test_geographic_pixel_area_shrinks_towards_the_pole():
    t = from_origin(15.0, 60.0, 0.01, 1.0)  # rows at 59.5°, 58.5°, ... N
    rows = pixel_area_m2_rows(CRS.from_epsg(4326), t, 0, 20, 50, height=20)
    assert np.all(np.diff(rows) > 0)
    r = 6371008.8  # spherical row area, within the ellipsoid's ~0.5 % and the chord error
    lat0 = np.radians(60.0 - np.arange(20))
    sphere = r * r * math.radians(0.01) * np.abs(np.sin(lat0) - np.sin(lat0 - math.radians(1.0)))
    assert rows == pytest.approx(sphere, rel=0.01)


def test_warnings_are_logged_not_warned(tmp_path, caplog, recwarn):
    prob = np.zeros((20, 20), dtype=np.uint8)
    prob[2:6, 2:6] = 200
    path = write_geotiff(tmp_path / "p.tif", prob, crs=None, transform=from_origin(0, 20, 1.0, 1.0))
    with caplog.at_level(logging.WARNING, logger="cdmap"):
        vectorize_raster(path, tmp_path / "o.gpkg", threshold=100)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("cdmap")]
    assert any("no CRS" in m for m in messages)
    assert any("integer raster without scale metadata" in m for m in messages)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning) and "cdmap" in str(w.filename)]


def test_json_is_a_suffix_not_a_format_name(tmp_path):
    assert "json" not in FORMATS
    assert format_from_path(tmp_path / "o.json") == "geojson"
    assert format_from_path(tmp_path / "o.json", "geojson") == "geojson"
    for name in ("json", "shapefile", "GPKG", ".gpkg"):
        with pytest.raises(UsageError, match=r"--vector-format must be one of gpkg, geojson, fgb, shp, parquet, not"):
            format_from_path(tmp_path / "o.gpkg", name)


def test_cli_refuses_json_and_prints_logged_warnings(tmp_path, capfd):
    from cdmap.cli.app import main

    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[:4, :5] = 1
    path = write_geotiff(tmp_path / "m.tif", mask, crs=None, transform=from_origin(0, 20, 1.0, 1.0), nodata=255)

    with pytest.raises(SystemExit) as refused:
        main(["vectorize", str(path), "-o", str(tmp_path / "o.geojson"), "--vector-format", "json"])
    assert refused.value.code == 2
    assert "--vector-format must be one of" in capfd.readouterr().err
    main(["vectorize", str(path), "-o", str(tmp_path / "o.gpkg"), "-q"])
    err = capfd.readouterr().err
    assert "cdmap: warning:" in err and "no CRS" in err
