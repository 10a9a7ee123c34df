"""Predict on real georeferenced data from ../shared/data (skipped when absent)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from cdmap.predict import predict_scene
from tests.helpers import tiny_checkpoint

pytestmark = pytest.mark.realdata


def _stack(folder, out_path):
    """B04, B03, B02 (the 10 m bands) of one OSCD date as a 3-band GeoTIFF."""
    paths = [next(folder.glob(f"*_{b}.tif")) for b in ("B04", "B03", "B02")]
    arrays = []
    for p in paths:
        with rasterio.open(p) as src:
            arrays.append(src.read(1))
            prof = src.profile
    prof.update(count=3, driver="GTiff", tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(out_path, "w", **prof) as dst:
        dst.write(np.stack(arrays))
    return out_path


def test_oscd_hongkong_mismatched_pair_is_aligned(tmp_path, shared_data, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="cdmap")
    city = shared_data / "oscd_sentinel2" / "hongkong"
    before = _stack(city / "imgs_1", tmp_path / "hk_1.tif")
    after = _stack(city / "imgs_2", tmp_path / "hk_2.tif")
    with rasterio.open(before) as b, rasterio.open(after) as a:
        assert b.shape != a.shape  # the trap: date 2 is 2 px smaller
        ref_crs, ref_shape = b.crs, b.shape
    ckpt = tiny_checkpoint(tmp_path / "s2.pt", mean=1200.0, std=600.0)
    res = predict_scene(before, after, tmp_path / "out", ckpt, batch_size=4, min_area=200.0)
    err = caplog.text  # the library reports through logging; the CLI prints these records
    summary = json.loads(res.run_json.read_text())
    assert summary["alignment"]["mode"] == "warped"
    assert "warp" in err.lower() or "resampl" in err.lower()
    with rasterio.open(res.probability) as p, rasterio.open(res.mask) as m:
        assert p.crs == ref_crs and m.crs == ref_crs
        assert p.shape[0] <= ref_shape[0] and p.shape[1] <= ref_shape[1]
        assert p.transform.a == pytest.approx(abs(rasterio.open(before).transform.a))
        mask = m.read(1)
    assert set(np.unique(mask)) <= {0, 1, 255}
    import geopandas as gpd

    gdf = gpd.read_file(res.vectors)
    # EPSG:4326 input: areas are square metres (a 10 m pixel is ~100 m^2); min-area 200 m^2 drops 1-px specks
    if len(gdf):
        assert gdf["area_m2"].min() >= 200.0
        assert (gdf["area_m2"] / gdf["n_pixels"]).between(60, 140).all()
        assert gdf.geometry.is_valid.all()


def test_rasterio_landsat_nodata_collar(tmp_path, shared_data):
    src = shared_data / "geotiff_reference_rasterio" / "RGB.byte.tif"
    with rasterio.open(src) as ds:
        data = ds.read()
        prof = ds.profile
    after_data = data.copy()
    inside = (data != 0).any(axis=0)
    # a bright 'new structure' block in the valid area
    r, c = 350, 400
    assert inside[r : r + 30, c : c + 30].all()
    after_data[:, r : r + 30, c : c + 30] = 250
    after = tmp_path / "after.tif"
    with rasterio.open(after, "w", **prof) as dst:
        dst.write(after_data)
    ckpt = tiny_checkpoint(tmp_path / "rgb.pt", mean=60.0, std=40.0)
    res = predict_scene(src, after, tmp_path / "out", ckpt, quiet=True, threshold=0.0)
    collar = (data == 0).all(axis=0)  # GDAL's rule: nodata where every band is nodata
    with rasterio.open(res.mask) as m, rasterio.open(res.probability) as p:
        mask = m.read(1)
        pmask = p.read_masks(1)
        assert m.crs == rasterio.open(src).crs and m.transform == rasterio.open(src).transform
    assert (mask[collar] == 255).all() and (pmask[collar] == 0).all()
    assert (mask[~collar] != 255).all()
    import geopandas as gpd
    from rasterio.features import shapes
    from shapely.geometry import shape
    from shapely.ops import unary_union

    collar_geom = unary_union([shape(g) for g, v in shapes(collar.astype(np.uint8), mask=collar,
                                                           transform=prof["transform"])])
    gdf = gpd.read_file(res.vectors)
    assert len(gdf) >= 1
    assert max(g.intersection(collar_geom).area for g in gdf.geometry) < 1e-6
