"""Windowed polygonization: exact merge across window lines, attributes, measurement in metres, formats."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

geopandas = pytest.importorskip("geopandas")
rasterio = pytest.importorskip("rasterio")
shapely = pytest.importorskip("shapely")

from rasterio import features  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402

from cdmap.errors import IncompatibleInputsError, InputError, OutputError, UsageError  # noqa: E402
from cdmap.vector import vectorize_raster  # noqa: E402

UTM_TRANSFORM = from_origin(500000.0, 4000000.0, 0.5, 0.5)  # the conftest default grid (EPSG:32633)


def set_scale(path: Path, scale: float, offset: float = 0.0) -> Path:
    with rasterio.open(path, "r+") as ds:
        ds.scales = (scale,)
        ds.offsets = (offset,)
    return path


def shapes_blob_mask() -> np.ndarray:
    """100x100: a ring with a hole, an L, a snake, all crossing the 32-px window lines, plus a few specks."""
    m = np.zeros((100, 100), dtype=np.uint8)
    m[20:50, 20:50] = 1
    m[28:42, 28:42] = 0  # hole, itself crossing the line at 32
    m[60:95, 5:12] = 1  # L: vertical bar ...
    m[88:95, 5:70] = 1  # ... and foot across two vertical window lines
    for i, r in enumerate(range(55, 85, 6)):  # snake: zig-zag crossing lines 64 and 96
        m[r : r + 2, 40:99] = 1
        c = 97 if i % 2 == 0 else 40
        m[r : r + 8, c : c + 2] = 1
    m[0:3, 30:35] = 1  # touches the image border and line 32
    m[63, 63] = 1  # single pixel at a window corner
    m[64, 64] = 1  # diagonal neighbour across both lines: must stay separate
    return m


def reference_polygons(mask: np.ndarray, transform=UTM_TRANSFORM) -> list:
    """Whole-raster polygonization: the ground truth the streamed result must equal."""
    out = []
    for geom, _ in features.shapes(mask.astype(np.uint8), mask=mask == 1, connectivity=4, transform=transform):
        out.append(shapely.make_valid(shapely.geometry.shape(geom)))
    return out


def assert_same_polygons(got: list, ref: list, tol: float = 1e-6) -> None:
    assert len(got) == len(ref)
    tree = shapely.STRtree(ref)
    used = set()
    for g in got:
        p = g.representative_point()
        hits = [i for i in tree.query(p, predicate="intersects")]
        assert len(hits) == 1, "an output polygon overlaps several reference polygons"
        i = hits[0]
        assert i not in used
        used.add(i)
        assert g.symmetric_difference(ref[i]).area < tol


def read(path: Path, **kw):
    return geopandas.read_file(path, engine="pyogrio", **kw)


@pytest.fixture
def blob(tmp_path, make_geotiff):
    mask = shapes_blob_mask()
    return make_geotiff(tmp_path / "mask.tif", mask, nodata=255), mask


def test_streamed_equals_whole_raster_and_nothing_split_on_window_lines(blob, tmp_path):
    path, mask = blob
    stats = vectorize_raster(path, tmp_path / "out.gpkg", window_size=32)
    gdf = read(tmp_path / "out.gpkg")
    ref = reference_polygons(mask)
    assert_same_polygons(list(gdf.geometry), ref)
    assert stats.n_polygons == len(ref) and stats.changed_pixels == int(mask.sum())
    assert gdf.is_valid.all()
    assert (gdf.geom_type == "Polygon").all()
    # no two output polygons share a boundary segment of positive length (what a window split would leave)
    geoms = list(gdf.geometry)
    for i in range(len(geoms)):
        for j in range(i + 1, len(geoms)):
            assert geoms[i].boundary.intersection(geoms[j].boundary).length == 0
    # the ring, the L and the snake each came out whole
    assert gdf.n_pixels.max() >= 30 * 30 - 14 * 14


@pytest.mark.parametrize("seed,window", [(0, 7), (1, 13), (2, 32), (3, 5)])
def test_random_masks_match_whole_raster(tmp_path, make_geotiff, seed, window):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(30, 70, size=2)
    mask = (rng.random((h, w)) < 0.45).astype(np.uint8)
    mask[rng.random((h, w)) < 0.05] = 255
    path = make_geotiff(tmp_path / "m.tif", mask, nodata=255)
    vectorize_raster(path, tmp_path / "o.fgb", window_size=window)
    gdf = read(tmp_path / "o.fgb")
    assert_same_polygons(list(gdf.geometry), reference_polygons(mask))
    assert gdf.n_pixels.sum() == int((mask == 1).sum())


def test_corner_contact_across_windows_is_not_connected(tmp_path, make_geotiff):
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[30:32, 30:32] = 1  # window (0, 0)
    mask[32:34, 32:34] = 1  # window (1, 1): touches the first only at the corner (32, 32)
    mask[10:12, 31] = 1  # these two share an edge across the vertical line at 32 -> one region
    mask[10:12, 32] = 1
    path = make_geotiff(tmp_path / "m.tif", mask, nodata=255)
    vectorize_raster(path, tmp_path / "o.gpkg", window_size=32)
    gdf = read(tmp_path / "o.gpkg")
    assert sorted(gdf.n_pixels.tolist()) == [4, 4, 4]
    assert len(gdf) == 3


def test_holes_kept_and_nodata_excluded(tmp_path, make_geotiff):
    mask = np.zeros((60, 60), dtype=np.uint8)
    mask[5:55, 5:55] = 1
    mask[20:40, 20:40] = 0  # a hole spanning the window lines at 32
    mask[8:12, 8:50] = 255  # nodata strip inside the change block: a second hole
    path = make_geotiff(tmp_path / "m.tif", mask, nodata=255)
    vectorize_raster(path, tmp_path / "o.gpkg", window_size=32)
    gdf = read(tmp_path / "o.gpkg")
    assert len(gdf) == 1
    poly = gdf.geometry.iloc[0]
    assert len(poly.interiors) == 2
    n = int((mask == 1).sum())
    assert gdf.n_pixels.iloc[0] == n
    assert poly.area == pytest.approx(n * 0.25)
    nodata_px = shapely.box(500000 + 8 * 0.5, 4000000 - 12 * 0.5, 500000 + 50 * 0.5, 4000000 - 8 * 0.5)
    assert poly.intersection(nodata_px).area == pytest.approx(0.0)


def test_nodata_never_change_in_probability_rasters(tmp_path, make_geotiff):
    dn = np.full((40, 40), 200, dtype=np.uint8)
    dn[10:30, 10:30] = 255  # nodata, although 255/255 = 1.0 would pass any threshold
    path = set_scale(make_geotiff(tmp_path / "p.tif", dn, nodata=255), 1 / 255)
    vectorize_raster(path, tmp_path / "o.gpkg", threshold=0.5, window_size=16)
    gdf = read(tmp_path / "o.gpkg")
    assert gdf.n_pixels.tolist() == [40 * 40 - 20 * 20]
    assert len(gdf.geometry.iloc[0].interiors) == 1
    assert gdf.max_prob.iloc[0] == pytest.approx(200 / 255)


def test_min_area_in_square_metres_on_projected_crs(tmp_path, make_geotiff):
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[2:12, 2:12] = 1  # 10x10 px of 0.5 m = 25 m², perimeter 20 m
    mask[20:29, 20:29] = 1  # 9x9 px = 20.25 m²
    path = make_geotiff(tmp_path / "m.tif", mask, nodata=255)
    vectorize_raster(path, tmp_path / "all.gpkg", window_size=16)
    gdf = read(tmp_path / "all.gpkg")
    assert sorted(gdf.area_m2.tolist()) == pytest.approx([20.25, 25.0])
    assert sorted(gdf.perimeter_m.tolist()) == pytest.approx([18.0, 20.0])
    stats = vectorize_raster(path, tmp_path / "big.gpkg", min_area=22.0, window_size=16)
    kept = read(tmp_path / "big.gpkg")
    assert kept.area_m2.tolist() == pytest.approx([25.0]) and kept.n_pixels.tolist() == [100]
    assert stats.n_polygons == 1 and stats.changed_area_m2 == pytest.approx(25.0)


def test_projected_crs_in_feet_reports_metres(tmp_path, make_geotiff):
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[0:10, 0:10] = 1  # 10x10 px of 1 US ft
    path = make_geotiff(tmp_path / "m.tif", mask, crs="EPSG:2263", transform=from_origin(1e6, 2e5, 1.0, 1.0))
    vectorize_raster(path, tmp_path / "o.gpkg")
    ft = 1200 / 3937
    gdf = read(tmp_path / "o.gpkg")
    assert gdf.area_m2.iloc[0] == pytest.approx(100 * ft * ft, rel=1e-6)
    assert gdf.perimeter_m.iloc[0] == pytest.approx(40 * ft, rel=1e-6)


def test_web_mercator_areas_are_ground_areas(tmp_path, make_geotiff):
    mask = np.zeros((30, 30), dtype=np.uint8)
    mask[5:25, 5:25] = 1
    transform = from_origin(1113194.9, 8399737.9, 10.0, 10.0)  # ~10°E, 60°N: areal scale ~4
    path = make_geotiff(tmp_path / "m.tif", mask, crs="EPSG:3857", transform=transform)
    vectorize_raster(path, tmp_path / "o.gpkg")
    gdf = read(tmp_path / "o.gpkg")
    assert gdf.crs.to_epsg() == 3857
    assert gdf.area.iloc[0] == pytest.approx(40_000.0)  # planar Mercator area: 4x too big
    np.testing.assert_allclose(gdf.area_m2.to_numpy(), _true_area_utm(gdf), rtol=0.01)


def _true_area_utm(gdf) -> np.ndarray:
    return gdf.to_crs(gdf.estimate_utm_crs()).area.to_numpy()


def test_area_and_min_area_on_geographic_crs(tmp_path, make_geotiff):
    mask = np.zeros((60, 60), dtype=np.uint8)
    mask[5:25, 5:25] = 1  # 20x20 px
    mask[35:50, 35:50] = 1  # 15x15 px
    transform = from_origin(10.0, 60.01, 1e-4, 1e-4)  # ~5.6 m x 11.1 m pixels at 60°N
    path = make_geotiff(tmp_path / "g.tif", mask, crs="EPSG:4326", transform=transform)
    vectorize_raster(path, tmp_path / "g.gpkg", window_size=16)
    gdf = read(tmp_path / "g.gpkg").sort_values("n_pixels")
    assert gdf.crs.to_epsg() == 4326
    true = _true_area_utm(gdf)
    np.testing.assert_allclose(gdf.area_m2.to_numpy(), true, rtol=0.01)
    assert gdf.area_m2.iloc[1] > 20_000  # metres, not square degrees
    cut = float(true.mean())
    vectorize_raster(path, tmp_path / "g2.gpkg", min_area=cut)
    assert read(tmp_path / "g2.gpkg").n_pixels.tolist() == [400]


def _disk(n: int, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n]
    return (((yy - n / 2 + 0.5) ** 2 + (xx - n / 2 + 0.5) ** 2) <= r * r).astype(np.uint8)


@pytest.mark.parametrize("geographic", [False, True])
def test_simplify_reduces_vertices_and_stays_valid(tmp_path, make_geotiff, geographic):
    mask = _disk(80, 30)
    mask[38:42, 20:60] = 0  # a long thin hole
    mask[20:23, 40:43] = 0  # a small hole ...
    mask[30, 30:50] = 0  # ... and a one-pixel-thin one: topology-preserving simplification keeps both
    kw = {"crs": "EPSG:4326", "transform": from_origin(10.0, 45.0, 1e-5, 1e-5)} if geographic else {}
    path = make_geotiff(tmp_path / "d.tif", mask, nodata=255, **kw)
    vectorize_raster(path, tmp_path / "raw.gpkg", window_size=32)
    vectorize_raster(path, tmp_path / "simple.gpkg", window_size=32, simplify=0.75)
    raw, simple = read(tmp_path / "raw.gpkg"), read(tmp_path / "simple.gpkg")
    assert len(simple) == len(raw)
    assert simple.is_valid.all() and not simple.is_empty.any()
    assert simple.geom_type.isin(["Polygon", "MultiPolygon"]).all()
    nv = shapely.get_num_coordinates(simple.geometry.values).sum()
    assert nv < 0.5 * shapely.get_num_coordinates(raw.geometry.values).sum()
    np.testing.assert_allclose(simple.area_m2, raw.area_m2, rtol=0.05)
    assert (simple.perimeter_m < raw.perimeter_m).all()
    assert [len(g.interiors) for g in simple.geometry] == [len(g.interiors) for g in raw.geometry] == [3]


def test_probability_attributes_exact(tmp_path, make_geotiff):
    mask = shapes_blob_mask()
    rng = np.random.default_rng(5)
    prob_dn = rng.integers(0, 256, size=mask.shape, dtype=np.uint8)
    mpath = make_geotiff(tmp_path / "mask.tif", mask, nodata=255)
    ppath = set_scale(make_geotiff(tmp_path / "prob.tif", prob_dn), 1 / 255)
    vectorize_raster(mpath, tmp_path / "o.gpkg", prob_raster=ppath, window_size=32)
    gdf = read(tmp_path / "o.gpkg")
    # regions by full-raster 4-connected labelling, via rasterizing each output polygon
    for _, row in gdf.iterrows():
        inside = features.rasterize([(row.geometry, 1)], out_shape=mask.shape, transform=UTM_TRANSFORM) == 1
        assert int(inside.sum()) == row.n_pixels and (mask[inside] == 1).all()
        probs = prob_dn[inside].astype(np.float64) / 255
        assert row.mean_prob == pytest.approx(probs.mean(), abs=1e-12)
        assert row.max_prob == pytest.approx(probs.max(), abs=1e-12)
    # a mask alone has no probabilities: null attributes
    vectorize_raster(mpath, tmp_path / "noprob.gpkg", window_size=32)
    noprob = read(tmp_path / "noprob.gpkg")
    assert noprob.mean_prob.isna().all() and noprob.max_prob.isna().all()


def test_predict_style_inputs(tmp_path, make_geotiff):
    """What ``cdmap predict`` hands over: a tiled 0/1/255 mask and a uint8 P(change) with scale 1/255 whose
    nodata is an internal mask band."""
    rng = np.random.default_rng(11)
    prob = rng.integers(0, 256, size=(96, 80), dtype=np.uint8)
    valid = np.ones(prob.shape, dtype=bool)
    valid[:, :9] = False  # a nodata border
    mask = np.where(valid, (prob >= 128).astype(np.uint8), 255).astype(np.uint8)
    mpath = make_geotiff(tmp_path / "mask.tif", mask, nodata=255)
    ppath = tmp_path / "prob.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        make_geotiff(ppath, np.where(valid, prob, 0).astype(np.uint8))
        with rasterio.open(ppath, "r+") as ds:
            ds.scales = (1 / 255,)
            ds.write_mask(valid.astype(np.uint8) * 255)
    stats = vectorize_raster(mpath, tmp_path / "v.gpkg", prob_raster=ppath, window_size=32, overwrite=True)
    gdf = read(tmp_path / "v.gpkg")
    change = mask == 1
    assert stats.changed_pixels == gdf.n_pixels.sum() == change.sum()
    assert_same_polygons(list(gdf.geometry), reference_polygons(mask))
    assert gdf.max_prob.max() == pytest.approx(prob[change].max() / 255)
    assert (gdf.mean_prob >= 128 / 255 - 1e-12).all()
    minx = gdf.total_bounds[0]
    assert minx >= 500000 + 9 * 0.5  # nothing in the nodata border


def test_threshold_on_uint8_scaled_and_float32(tmp_path, make_geotiff):
    rng = np.random.default_rng(7)
    dn = rng.integers(0, 256, size=(50, 70), dtype=np.uint8)
    u8 = set_scale(make_geotiff(tmp_path / "u8.tif", dn), 1 / 255)
    f32 = (dn.astype(np.float32) + 0.5) / 256
    f32[:5, :5] = np.nan  # NaN is nodata for float rasters
    fpath = make_geotiff(tmp_path / "f.tif", f32, nodata=float("nan"))
    for path, probs, thr in ((u8, dn / 255.0, 0.7), (fpath, f32.astype(np.float64), 0.3)):
        change = np.nan_to_num(probs, nan=-1) >= thr
        out = tmp_path / f"{path.stem}.gpkg"
        vectorize_raster(path, out, threshold=thr, window_size=16)
        gdf = read(out)
        assert gdf.n_pixels.sum() == change.sum()
        assert_same_polygons(list(gdf.geometry), reference_polygons(change.astype(np.uint8)))
        assert gdf.max_prob.max() == pytest.approx(probs[change].max())
        assert (gdf.mean_prob >= thr).all()
    # no threshold on a probability raster: 0.5; an edge value equal to the threshold counts as change
    vectorize_raster(u8, tmp_path / "default.gpkg", window_size=16)
    assert read(tmp_path / "default.gpkg").n_pixels.sum() == (dn >= 128).sum()
    assert 33 * (1 / 255) < 33 / 255  # rounding: the comparison needs its tolerance
    vectorize_raster(u8, tmp_path / "edge.gpkg", threshold=33 / 255)
    assert read(tmp_path / "edge.gpkg").n_pixels.sum() == (dn >= 33).sum()


def test_mask_with_unexpected_values_is_refused(tmp_path, make_geotiff):
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[3:6, 3:6] = 255  # 255 not declared nodata: a 0/255 mask is ambiguous
    path = make_geotiff(tmp_path / "m.tif", mask)
    with pytest.raises(InputError, match="--threshold"):
        vectorize_raster(path, tmp_path / "o.gpkg")
    assert not (tmp_path / "o.gpkg").exists()
    vectorize_raster(path, tmp_path / "o.gpkg", threshold=128)
    assert read(tmp_path / "o.gpkg").n_pixels.tolist() == [9]


@pytest.mark.parametrize("fmt,suffix", [("gpkg", ".gpkg"), ("geojson", ".geojson"), ("fgb", ".fgb"), ("shp", ".shp")])
def test_formats_round_trip(tmp_path, make_geotiff, fmt, suffix):
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[2:12, 2:12] = 1
    mask[20:30, 5:35] = 1
    mpath = make_geotiff(tmp_path / "m.tif", mask, nodata=255)
    ppath = set_scale(make_geotiff(tmp_path / "p.tif", np.full((40, 40), 204, dtype=np.uint8)), 1 / 255)
    out = tmp_path / f"changes{suffix}"
    stats = vectorize_raster(mpath, out, prob_raster=ppath, vector_format=fmt if fmt != "gpkg" else None)
    assert stats.format == fmt and stats.n_polygons == 2
    gdf = read(out).sort_values("id", ignore_index=True)  # FlatGeobuf's spatial index reorders features
    perim = "perim_m" if fmt == "shp" else "perimeter_m"
    assert set(gdf.columns) == {"id", "n_pixels", "area_m2", perim, "mean_prob", "max_prob", "geometry"}
    assert gdf.id.tolist() == [1, 2]
    assert gdf.area_m2.tolist() == pytest.approx([25.0, 75.0])
    assert gdf[perim].tolist() == pytest.approx([20.0, 40.0])
    assert gdf.mean_prob.tolist() == pytest.approx([0.8, 0.8])
    if fmt == "geojson":
        assert gdf.crs.to_epsg() == 4326 and stats.crs == "EPSG:4326"
        doc = json.loads(out.read_text())
        assert "crs" not in doc  # RFC 7946: WGS84 implied
        x, y = doc["features"][0]["geometry"]["coordinates"][0][0]
        assert 14.9 < x < 15.1 and 36.0 < y < 36.3  # lon, lat order (UTM 33N, x=500 km -> 15°E)
        utm = gdf.to_crs("EPSG:32633")
        assert utm.area.tolist() == pytest.approx([25.0, 75.0], rel=1e-2)  # 7 decimals of a degree: ~1 cm
    else:
        assert gdf.crs.to_epsg() == 32633 and stats.crs == "EPSG:32633"
        assert gdf.area.tolist() == pytest.approx([25.0, 75.0])
    if fmt == "gpkg":
        import pyogrio

        assert pyogrio.list_layers(out)[0][0] == "changes"
    assert sorted(p.name for p in tmp_path.iterdir() if "cdmap-tmp" in p.name) == []


@pytest.mark.parametrize("suffix", [".gpkg", ".fgb", ".shp", ".geojson"])
def test_empty_result_is_an_openable_layer(tmp_path, make_geotiff, suffix):
    path = make_geotiff(tmp_path / "m.tif", np.zeros((30, 30), dtype=np.uint8), nodata=255)
    out = tmp_path / f"empty{suffix}"
    stats = vectorize_raster(path, out)
    assert stats.n_polygons == 0 and stats.changed_area_m2 == 0.0
    gdf = read(out)
    assert len(gdf) == 0
    assert gdf.crs.to_epsg() == (4326 if suffix == ".geojson" else 32633)
    if suffix != ".geojson":  # GeoJSON has no schema without features
        assert {"id", "area_m2", "mean_prob", "n_pixels"} <= set(gdf.columns)


def test_existing_output_refused_without_overwrite(tmp_path, blob):
    path, _ = blob
    out = tmp_path / "o.shp"
    vectorize_raster(path, out)
    before = out.read_bytes()
    with pytest.raises(OutputError, match="--overwrite"):
        vectorize_raster(path, out, min_area=1e9)
    assert out.read_bytes() == before
    stats = vectorize_raster(path, out, min_area=1e9, overwrite=True)
    assert stats.n_polygons == 0 and len(read(out)) == 0
    assert sorted(p.suffix for p in tmp_path.iterdir() if p.stem == "o") == [".cpg", ".dbf", ".prj", ".shp", ".shx"]
    assert not [p for p in tmp_path.iterdir() if "cdmap-tmp" in p.name]


def test_ids_deterministic_and_ordered_by_top_left(tmp_path, blob):
    path, mask = blob
    vectorize_raster(path, tmp_path / "a.gpkg", window_size=32)
    vectorize_raster(path, tmp_path / "b.gpkg", window_size=32)
    vectorize_raster(path, tmp_path / "c.gpkg", window_size=4096)
    a, b, c = (read(tmp_path / f"{n}.gpkg") for n in "abc")
    assert a.id.tolist() == list(range(1, len(a) + 1))
    for other in (b, c):
        assert other.id.tolist() == a.id.tolist() and other.n_pixels.tolist() == a.n_pixels.tolist()
        assert all(g1.equals(g2) for g1, g2 in zip(a.geometry, other.geometry, strict=True))
    b = a.geometry.bounds  # (minx, miny, maxx, maxy); rows grow downwards so the top is maxy
    keys = list(zip(-b.maxy.round(6), b.minx.round(6), strict=True))
    assert keys == sorted(keys)


@pytest.mark.parametrize("suffix", [".gpkg", ".shp"])
def test_batched_appends_equal_one_write(tmp_path, make_geotiff, monkeypatch, suffix):
    import cdmap.vector.polygonize as vec

    mask = shapes_blob_mask()
    mask[np.random.default_rng(3).random(mask.shape) < 0.1] = 1  # specks: many small regions
    path = make_geotiff(tmp_path / "m.tif", mask, nodata=255)
    one = vectorize_raster(path, tmp_path / f"one{suffix}", window_size=4096)
    monkeypatch.setattr(vec, "_WRITE_BATCH", 2)
    many = vectorize_raster(path, tmp_path / f"many{suffix}", window_size=16)
    a, b = read(tmp_path / f"one{suffix}"), read(tmp_path / f"many{suffix}")
    assert one.n_polygons == many.n_polygons == len(a) == len(b) > 100
    assert b.id.tolist() == a.id.tolist() == list(range(1, len(a) + 1))
    assert all(g1.equals(g2) for g1, g2 in zip(a.geometry, b.geometry, strict=True))
    assert many.changed_area_m2 == pytest.approx(one.changed_area_m2)


def test_ids_follow_bounds_top_left_not_first_pixel(tmp_path, make_geotiff):
    mask = np.zeros((30, 30), dtype=np.uint8)
    mask[10:21, 20:23] = 1  # A: top row 10 at column 20 ...
    mask[18:21, 2:23] = 1  # ... but its bounds start at column 2
    mask[10:13, 10:13] = 1  # B: top row 10 at column 10, bounds start at column 10
    path = make_geotiff(tmp_path / "m.tif", mask, nodata=255)
    vectorize_raster(path, tmp_path / "o.gpkg", window_size=16)
    gdf = read(tmp_path / "o.gpkg")
    assert gdf.sort_values("id").n_pixels.tolist() == [int(mask.sum()) - 9, 9]


def test_usage_and_input_errors(tmp_path, make_geotiff, blob):
    path, _ = blob
    with pytest.raises(UsageError):
        vectorize_raster(path, tmp_path / "o.xyz")
    with pytest.raises(UsageError):
        vectorize_raster(path, tmp_path / "o.gpkg", vector_format="kml")
    with pytest.raises(UsageError):
        vectorize_raster(path, tmp_path / "o.gpkg", window_size=0)
    with pytest.raises(UsageError):
        vectorize_raster(path, tmp_path / "o.gpkg", min_area=-1)
    with pytest.raises(InputError, match="no such file"):
        vectorize_raster(tmp_path / "missing.tif", tmp_path / "o.gpkg")
    rgb = make_geotiff(tmp_path / "rgb.tif", np.zeros((3, 20, 20), dtype=np.uint8))
    with pytest.raises(InputError, match="3 bands"):
        vectorize_raster(rgb, tmp_path / "o.gpkg")
    other = make_geotiff(tmp_path / "p.tif", np.zeros((50, 50), dtype=np.float32))
    with pytest.raises(IncompatibleInputsError):
        vectorize_raster(path, tmp_path / "o.gpkg", prob_raster=other)
    with pytest.raises(OutputError):
        vectorize_raster(path, tmp_path / "no" / "dir" / "o.gpkg")
    assert not (tmp_path / "o.gpkg").exists()


def test_no_crs_warns_and_uses_map_units(tmp_path, make_geotiff, caplog):
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[:4, :5] = 1
    path = make_geotiff(tmp_path / "m.tif", mask, crs=None, transform=from_origin(0, 20, 2.0, 2.0), nodata=255)
    with caplog.at_level(logging.WARNING, logger="cdmap"):
        stats = vectorize_raster(path, tmp_path / "o.gpkg")
    assert any(r.levelno == logging.WARNING and "no CRS" in r.getMessage() for r in caplog.records)
    assert stats.crs is None and stats.changed_area_m2 == pytest.approx(80.0)
    with pytest.raises(UsageError, match="GeoJSON"):
        vectorize_raster(path, tmp_path / "o.geojson")


def test_cli_main_and_subprocess(tmp_path, blob):
    from cdmap.cli.app import main

    path, mask = blob
    out = tmp_path / "cli.geojson"
    proc = subprocess.run(
        [sys.executable, "-m", "cdmap", "vectorize", str(path), "-o", str(out), "--window-size", "32",
         "--min-area", "1"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(f"-> {out}") and "polygons" in proc.stdout
    assert len(read(out)) > 0

    def code(args: list[str]) -> int:
        try:
            main(args)
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0

    assert code(["vectorize", str(path), "-o", str(out)]) == OutputError.exit_code  # exists, no --overwrite
    assert code(["vectorize", str(path), "-o", str(out), "--overwrite", "-q", "--vector-format", "geojson"]) == 0
    assert code(["vectorize", str(path), "-o", str(tmp_path / "x.gpkg"), "--vector-format", "kml"]) == 2
