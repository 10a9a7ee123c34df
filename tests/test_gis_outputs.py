"""Outputs as GIS users open them: GeoPackage 1.3, GeoParquet, the mask's colour table, the QGIS style, zones."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _gpkg_version(path: Path) -> tuple[bytes, int]:
    con = sqlite3.connect(path)
    try:
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
        version = con.execute("PRAGMA user_version").fetchone()[0]
    finally:
        con.close()
    return app_id.to_bytes(4, "big"), version


def _mask(tmp_path: Path, make_geotiff) -> Path:
    m = np.zeros((40, 60), np.uint8)
    m[5:15, 5:20] = 1
    m[20:30, 40:55] = 1
    m[0, :] = 255
    return make_geotiff(tmp_path / "mask.tif", m, nodata=255)


def test_geopackage_is_version_1_3(tmp_path, make_geotiff):
    from cdmap.vector import vectorize_raster

    vectorize_raster(_mask(tmp_path, make_geotiff), tmp_path / "c.gpkg")
    assert _gpkg_version(tmp_path / "c.gpkg") == (b"GPKG", 10300)  # GDAL 3.6 reads 1.3 without a warning


def test_geoparquet_output(tmp_path, make_geotiff):
    pytest.importorskip("pyarrow")
    import geopandas as gpd

    from cdmap.vector import vectorize_raster

    stats = vectorize_raster(_mask(tmp_path, make_geotiff), tmp_path / "c.parquet")
    gdf = gpd.read_parquet(tmp_path / "c.parquet")
    assert len(gdf) == stats.n_polygons == 2 and gdf.crs.to_epsg() == 32633
    assert gdf["area_m2"].sum() == pytest.approx(stats.changed_area_m2)


def test_zones_add_up_to_the_changed_area(tmp_path, make_geotiff):
    import geopandas as gpd
    import rasterio
    from shapely.geometry import box

    from cdmap.vector.zones import zonal_change

    mask = _mask(tmp_path, make_geotiff)
    with rasterio.open(mask) as src:
        west, south, east, north = src.bounds
        crs = src.crs
    mid = (west + east) / 2
    gpd.GeoDataFrame({"name": ["west", "east"]}, geometry=[box(west, south, mid, north), box(mid, south, east, north)],
                     crs=crs.to_wkt()).to_file(tmp_path / "zones.gpkg")
    z = zonal_change(mask, tmp_path / "zones.gpkg", tmp_path / "z.csv", tmp_path / "z.gpkg")
    rows = list(csv.DictReader(open(tmp_path / "z.csv")))
    assert [r["name"] for r in rows] == ["west", "east"] and z.zones == 2
    px = abs(src.transform.a * src.transform.e)
    assert float(rows[0]["changed_m2"]) == pytest.approx(150 * px) and int(rows[1]["changed_pixels"]) == 150
    assert float(rows[0]["valid_m2"]) == pytest.approx(39 * 30 * px)
    assert _gpkg_version(tmp_path / "z.gpkg")[1] == 10300


def test_predict_cli_json_zones_style_and_colour_table(tmp_path, make_pair):
    import geopandas as gpd
    import rasterio
    from shapely.geometry import box

    before, after, _ = make_pair(tmp_path, height=48, width=64)
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    with rasterio.open(before) as src:
        gpd.GeoDataFrame({"id": [7]}, geometry=[box(*src.bounds)], crs=src.crs.to_wkt()).to_file(tmp_path / "z.gpkg")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cdmap", "predict", str(before), str(after), "-o", str(tmp_path / "o"),
                           "-m", str(ckpt), "--device", "cpu", "--zones", str(tmp_path / "z.gpkg"), "--json",
                           "--no-report"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # stdout holds run.json and nothing else
    assert summary == json.loads((tmp_path / "o" / "run.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "o" / "change_by_zone.csv")))
    assert float(rows[0]["changed_m2"]) == pytest.approx(summary["changed_area_m2"], rel=1e-6)
    assert summary["zones"]["count"] == 1
    for words in ("m² =", " ha", "polygon", "seams", "outputs", "change_by_zone.csv"):
        assert words in proc.stderr, words  # the closing summary
    with rasterio.open(tmp_path / "o" / "change_mask.tif") as src:
        cmap = src.colormap(1)
    assert cmap[1] == (230, 25, 45, 255) and cmap[255][3] == 0  # change red, nodata transparent
    style = ET.parse(tmp_path / "o" / "change_probability.qml").getroot()
    renderer = style.find("./pipe/rasterrenderer")
    assert renderer.get("type") == "singlebandpseudocolor" and len(renderer.findall(".//item")) == 5
    assert "change_probability.qml" in summary["outputs"]["style"]
