"""open_pair: preflight errors, alignment decisions, validity and thread-safe reads."""

from __future__ import annotations

import glob
import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from cdmap.errors import IncompatibleInputsError, InputError, UsageError
from cdmap.raster.pair import ScenePair, crs_equivalent, open_pair

ORIGIN = (500000.0, 4000000.0)


def _win(rc_hw: tuple[int, int, int, int]) -> Window:
    """A rasterio Window from (row, col, height, width)."""
    row, col, h, w = rc_hw
    return Window(col, row, w, h)


def _grid(h: int, w: int, bands: int = 3, seed: int = 0, dtype: str = "uint8") -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 200, size=(bands, h, w)).astype(dtype)


def _read_direct(path: Path, window=None, bands=None) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(bands, window=window).astype(np.float32)


# ------------------------------------------------------------------------------------- preflight errors


def test_missing_file(tmp_path, make_geotiff):
    b = make_geotiff(tmp_path / "b.tif", _grid(20, 20))
    with pytest.raises(InputError, match="not found") as ei:
        open_pair(tmp_path / "nope.tif", b)
    assert "nope.tif" in str(ei.value)
    with pytest.raises(InputError, match="not found") as ei:
        open_pair(b, tmp_path / "gone.tif")
    assert "gone.tif" in str(ei.value)


def test_directory(tmp_path, make_geotiff):
    b = make_geotiff(tmp_path / "b.tif", _grid(20, 20))
    (tmp_path / "dir.tif").mkdir()
    with pytest.raises(InputError, match="directory") as ei:
        open_pair(b, tmp_path / "dir.tif")
    assert "dir.tif" in str(ei.value)


def test_text_file_named_tif(tmp_path, make_geotiff):
    b = make_geotiff(tmp_path / "b.tif", _grid(20, 20))
    txt = tmp_path / "notes.tif"
    txt.write_text("this is not a raster\n")
    with pytest.raises(InputError, match="not a raster") as ei:
        open_pair(txt, b)
    assert "notes.tif" in str(ei.value)
    assert "\n" not in str(ei.value)
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty.tif"):
        open_pair(b, empty)


def test_truncated_file(tmp_path, make_geotiff):
    b = make_geotiff(tmp_path / "b.tif", _grid(64, 64), compress="deflate")
    data = b.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError) as ei:
        open_pair(b, cut)
    assert "cut.tif" in str(ei.value)
    assert ei.value.exit_code == 3


def test_zero_size_and_bandless(tmp_path, make_geotiff):
    b = make_geotiff(tmp_path / "b.tif", _grid(20, 20))
    z = tmp_path / "zero.vrt"
    z.write_text('<VRTDataset rasterXSize="0" rasterYSize="10">'
                 '<VRTRasterBand dataType="Byte" band="1"/></VRTDataset>')
    with pytest.raises(InputError, match="zero.vrt"):
        open_pair(b, z)
    nb = tmp_path / "nobands.vrt"
    nb.write_text('<VRTDataset rasterXSize="10" rasterYSize="10"></VRTDataset>')
    with pytest.raises(InputError, match="nobands.vrt"):
        open_pair(nb, b)


def test_complex_dtype(tmp_path, make_geotiff):
    b = make_geotiff(tmp_path / "b.tif", _grid(20, 20, bands=1))
    c = make_geotiff(tmp_path / "c.tif", (np.ones((1, 20, 20)) * (1 + 2j)).astype("complex64"))
    with pytest.raises(InputError, match="unsupported dtype complex64") as ei:
        open_pair(b, c)
    assert "c.tif" in str(ei.value)


def test_bands_out_of_range(tmp_path, make_geotiff):
    a = make_geotiff(tmp_path / "a.tif", _grid(20, 20, bands=4))
    b = make_geotiff(tmp_path / "b.tif", _grid(20, 20, bands=3))
    with pytest.raises(UsageError, match="--bands 4 is out of range") as ei:
        open_pair(a, b, bands=[1, 2, 4])
    assert "b.tif" in str(ei.value)
    assert ei.value.exit_code == 2
    with pytest.raises(UsageError, match="--bands 0"):
        open_pair(a, b, bands=[0])
    with pytest.raises(UsageError):
        open_pair(a, b, bands=[])


def test_band_count_mismatch(tmp_path, make_geotiff):
    a = make_geotiff(tmp_path / "a.tif", _grid(20, 20, bands=4), photometric="MINISBLACK")
    b = make_geotiff(tmp_path / "b.tif", _grid(20, 20, bands=3))
    with pytest.raises(IncompatibleInputsError, match="has 4 bands") as ei:
        open_pair(a, b)
    assert "a.tif" in str(ei.value) and "b.tif" in str(ei.value)
    assert ei.value.exit_code == 4
    with open_pair(a, b, bands=[1, 2, 3]) as pair:  # selecting bands fixes it
        assert pair.count == 3


def test_expected_bands(tmp_path, make_geotiff):
    a = make_geotiff(tmp_path / "a.tif", _grid(20, 20, bands=4))
    b = make_geotiff(tmp_path / "b.tif", _grid(20, 20, bands=4, seed=1))
    with pytest.raises(IncompatibleInputsError) as ei:
        open_pair(a, b, bands=[1, 2, 3, 4], expected_bands=3)
    msg = str(ei.value)
    assert "has 4 bands (after --bands), the model expects 3; choose bands with --bands" in msg
    assert "a.tif" in msg
    with open_pair(a, b, bands=[3, 2, 1], expected_bands=3) as pair:
        x, _, _ = pair.read(Window(0, 0, 5, 5))
        np.testing.assert_array_equal(x, _read_direct(a, ((0, 5), (0, 5)), [3, 2, 1]))


def test_four_band_byte_tagged_alpha(tmp_path, make_geotiff):
    """GDAL tags band 4 of a 4-band Byte GeoTIFF as alpha; a 4-band model keeps it as data, unmasked."""
    rgbn = _grid(20, 20, bands=4)
    rgbn[3, :5] = 0  # dark NIR: must not become invalid
    a = make_geotiff(tmp_path / "a.tif", rgbn)
    b = make_geotiff(tmp_path / "b.tif", _grid(20, 20, bands=4, seed=1))
    with rasterio.open(a) as ds:
        assert ds.colorinterp[3] == rasterio.enums.ColorInterp.alpha
    with open_pair(a, b) as pair:  # no model constraint: the alpha band is a mask
        assert pair.count == 3
        _, _, v = pair.read(Window(0, 0, 20, 20))
        assert not v[:5].any() and v[5:].all()
    with open_pair(a, b, expected_bands=4) as pair:
        assert pair.count == 4
        assert any("tagged alpha" in n for n in pair.notes)
        x, _, v = pair.read(Window(0, 0, 20, 20))
    np.testing.assert_array_equal(x, rgbn.astype(np.float32))
    assert v.all()


def test_crs_on_one_side_only(tmp_path, make_geotiff):
    a = make_geotiff(tmp_path / "a.tif", _grid(20, 20))
    b = make_geotiff(tmp_path / "nocrs.tif", _grid(20, 20), crs=None)
    with pytest.raises(IncompatibleInputsError, match="no CRS") as ei:
        open_pair(a, b)
    assert "nocrs.tif" in str(ei.value)
    with pytest.raises(IncompatibleInputsError, match="nocrs.tif"):
        open_pair(b, a, allow_no_crs=True)  # allow_no_crs is for both sides only


def test_no_crs_both_sides(tmp_path, make_geotiff):
    a = make_geotiff(tmp_path / "a.tif", _grid(30, 40), crs=None)
    b = make_geotiff(tmp_path / "b.tif", _grid(28, 40, seed=2), crs=None)
    with pytest.raises(IncompatibleInputsError, match="--allow-no-crs"):
        open_pair(a, b)
    with open_pair(a, b, allow_no_crs=True) as pair:
        assert (pair.height, pair.width) == (28, 40)
        assert pair.crs is None
        assert pair.alignment.mode == "window"
        assert pair.notes
        x, y, v = pair.read(Window(0, 0, 40, 28))
        np.testing.assert_array_equal(y, _read_direct(b))
        np.testing.assert_array_equal(x, _read_direct(a, ((0, 28), (0, 40))))
        assert v.all()
    with pytest.raises(IncompatibleInputsError, match="strict"):
        open_pair(a, b, allow_no_crs=True, align="strict")


def test_no_overlap(tmp_path, make_geotiff):
    a = make_geotiff(tmp_path / "a.tif", _grid(20, 20))
    far = from_origin(ORIGIN[0] + 100.0, ORIGIN[1], 0.5, 0.5)  # 200 px east, same grid
    b = make_geotiff(tmp_path / "b.tif", _grid(20, 20), transform=far)
    with pytest.raises(IncompatibleInputsError, match="do not overlap"):
        open_pair(a, b)
    far_coarse = from_origin(ORIGIN[0] + 100.0, ORIGIN[1], 1.0, 1.0)  # would need warping
    c = make_geotiff(tmp_path / "c.tif", _grid(20, 20), transform=far_coarse)
    with pytest.raises(IncompatibleInputsError, match="do not overlap") as ei:
        open_pair(a, c)
    assert "c.tif" in str(ei.value)


def test_bad_align_and_resampling(tmp_path, make_pair):
    a, b, _ = make_pair(tmp_path, 20, 20)
    with pytest.raises(UsageError, match="align"):
        open_pair(a, b, align="fuzzy")
    with pytest.raises(UsageError, match="resampling"):
        open_pair(a, b, resampling="gauss")


def test_corrupt_tile_mid_scene(tmp_path, make_geotiff):
    path = make_geotiff(tmp_path / "bad.tif", _grid(64, 64, bands=1), blockxsize=16, blockysize=16,
                        compress="deflate")
    with rasterio.open(path) as ds:
        off = int(ds.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
        size = int(ds.get_tag_item("BLOCK_SIZE_1_1", "TIFF", bidx=1))
    raw = bytearray(path.read_bytes())
    raw[off:off + size] = b"\xff" * size
    path.write_bytes(bytes(raw))
    good = make_geotiff(tmp_path / "good.tif", _grid(64, 64, bands=1))
    with open_pair(good, path) as pair:  # corners decode fine
        pair.read(Window(0, 0, 16, 16))
        with pytest.raises(InputError, match="failed to read window rows 0-31, cols 0-31") as ei:
            pair.read(Window(0, 0, 32, 32))
    assert "bad.tif" in str(ei.value)


# ------------------------------------------------------------------------------------- reads, validity


def test_same_grid_read_equals_rasterio(tmp_path, make_pair):
    a, b, _ = make_pair(tmp_path, 70, 90)
    with open_pair(a, b) as pair:
        assert pair.alignment.mode == "same-grid"
        assert (pair.height, pair.width, pair.count, pair.dtype) == (70, 90, 3, "uint8")
        with rasterio.open(a) as ds:
            assert pair.crs == ds.crs and pair.transform == ds.transform
            assert pair.block_shape() == tuple(ds.block_shapes[0])
        x, y, v = pair.read(Window(20, 10, 40, 30))
        assert x.dtype == y.dtype == np.float32 and v.dtype == bool
        assert x.shape == (3, 30, 40) and v.shape == (30, 40)
        np.testing.assert_array_equal(x, _read_direct(a, ((10, 40), (20, 60))))
        np.testing.assert_array_equal(y, _read_direct(b, ((10, 40), (20, 60))))
        assert v.all()
        with pytest.raises(ValueError):
            pair.read(Window(0, 60, 10, 20))
    with pytest.raises(RuntimeError):
        pair.read(Window(0, 0, 5, 5))


def test_nan_is_invalid_and_zeroed(tmp_path, make_geotiff):
    data = np.random.default_rng(0).random((2, 20, 20)).astype("float32")
    data[0, 3, 4] = np.nan
    data[1, 5, 6] = np.inf
    a = make_geotiff(tmp_path / "a.tif", data)
    b = make_geotiff(tmp_path / "b.tif", np.ones((2, 20, 20), "float32"))
    with open_pair(a, b) as pair:
        x, _, v = pair.read(Window(0, 0, 20, 20))
    assert not v[3, 4] and not v[5, 6]
    assert v.sum() == 400 - 2
    assert np.isfinite(x).all()
    assert x[0, 3, 4] == 0 and x[1, 5, 6] == 0


def test_nodata_all_bands(tmp_path, make_geotiff):
    data = _grid(20, 20)
    data[:, :2, :] = 0  # collar: every band is nodata
    data[0, 10, 10] = 0  # only one band at the nodata value: still a valid pixel (GDAL's rule)
    a = make_geotiff(tmp_path / "a.tif", data, nodata=0)
    b = make_geotiff(tmp_path / "b.tif", _grid(20, 20, seed=3))
    with open_pair(a, b) as pair:
        assert pair.nodata["before"] == 0
        _, _, v = pair.read(Window(0, 0, 20, 20))
    assert not v[:2].any()
    assert v[2:].all()


def test_internal_mask(tmp_path, make_geotiff):
    a = make_geotiff(tmp_path / "a.tif", _grid(20, 20))
    b = tmp_path / "b.tif"
    make_geotiff(b, _grid(20, 20, seed=1))
    mask = np.full((20, 20), 255, np.uint8)
    mask[5:8, 5:9] = 0
    with rasterio.open(b, "r+") as ds:
        ds.write_mask(mask)
    with open_pair(a, b) as pair:
        _, _, v = pair.read(Window(0, 0, 20, 20))
    np.testing.assert_array_equal(v, mask > 0)


def test_alpha_band_excluded_and_masks(tmp_path, make_geotiff):
    rgba = _grid(20, 20, bands=4)
    rgba[3] = 255
    rgba[3, 10:, :5] = 0
    a = make_geotiff(tmp_path / "a.tif", rgba, photometric="RGB", alpha="YES")
    b = make_geotiff(tmp_path / "b.tif", _grid(20, 20, seed=1))
    with open_pair(a, b, expected_bands=3) as pair:
        assert pair.bands == {"before": [1, 2, 3], "after": [1, 2, 3]}
        assert any("alpha" in n for n in pair.notes)
        x, _, v = pair.read(Window(0, 0, 20, 20))
    np.testing.assert_array_equal(x, rgba[:3].astype(np.float32))
    np.testing.assert_array_equal(v, rgba[3] > 0)


def test_validity_is_union_of_both_dates(tmp_path, make_geotiff):
    da, db = _grid(20, 20), _grid(20, 20, seed=1)
    da[:, 0:3, :] = 0
    db[:, :, 0:4] = 0
    a = make_geotiff(tmp_path / "a.tif", da, nodata=0)
    b = make_geotiff(tmp_path / "b.tif", db, nodata=0)
    with open_pair(a, b) as pair:
        _, _, v = pair.read(Window(0, 0, 20, 20))
    expected = np.ones((20, 20), bool)
    expected[0:3, :] = False
    expected[:, 0:4] = False
    np.testing.assert_array_equal(v, expected)


# ------------------------------------------------------------------------------------------ alignment


def test_integer_offset_uses_window_without_resampling(tmp_path, make_geotiff):
    da, db = _grid(40, 50), _grid(40, 50, seed=1)
    a = make_geotiff(tmp_path / "a.tif", da)
    shifted = from_origin(ORIGIN[0] + 10 * 0.5, ORIGIN[1] - 4 * 0.5, 0.5, 0.5)
    b = make_geotiff(tmp_path / "b.tif", db, transform=shifted)
    with open_pair(a, b) as pair:
        assert pair.alignment.mode == "window"
        assert pair.alignment.to_dict()["window_of_before"] == [10, 4, 40, 36]
        assert (pair.height, pair.width) == (36, 40)
        assert pair.transform == shifted
        x, y, v = pair.read(Window(0, 0, 40, 36))
    np.testing.assert_array_equal(x, da[:, 4:, 10:].astype(np.float32))
    np.testing.assert_array_equal(y, db[:, :36, :40].astype(np.float32))
    assert v.all()
    with pytest.raises(IncompatibleInputsError, match="strict.*origin"):
        open_pair(a, b, align="strict")


def test_warped_shift_and_resolution_nearest(tmp_path, make_geotiff):
    h = w = 100
    da = _grid(h, w, bands=1, dtype="uint16")
    a = make_geotiff(tmp_path / "a.tif", da)
    # AFTER: 1 m pixels (BEFORE has 0.5 m), origin 10 BEFORE pixels east and 4 south
    db = (np.arange(60 * 60, dtype="uint16").reshape(1, 60, 60))
    tb = from_origin(ORIGIN[0] + 10 * 0.5, ORIGIN[1] - 4 * 0.5, 1.0, 1.0)
    b = make_geotiff(tmp_path / "b.tif", db, transform=tb)
    with open_pair(a, b, resampling="nearest") as pair:
        al = pair.alignment
        assert al.mode == "warped" and al.resampling == "nearest"
        assert "pixel size" in al.reason
        assert al.to_dict()["window_of_before"] == [10, 4, 90, 96]
        assert (pair.height, pair.width) == (96, 90)
        with rasterio.open(a) as ds:
            assert pair.transform == ds.transform @ rasterio.Affine.translation(10, 4)
            assert pair.crs == ds.crs
        x, y, v = pair.read(Window(0, 0, 90, 96))
        assert any("resampled" in n for n in pair.notes)
    np.testing.assert_array_equal(x[0], da[0, 4:, 10:].astype(np.float32))
    rows, cols = np.mgrid[0:96, 0:90]
    np.testing.assert_array_equal(y[0], db[0][rows // 2, cols // 2].astype(np.float32))
    assert v.all()
    with pytest.raises(IncompatibleInputsError, match="pixel size 0.5x0.5 vs 1x1"):
        open_pair(a, b, align="strict")


def test_warped_bilinear_nodata_footprint(tmp_path, make_geotiff):
    """A fractional shift warps; AFTER's nodata collar and the area outside it are invalid."""
    da = _grid(40, 40, bands=1)
    a = make_geotiff(tmp_path / "a.tif", da)
    db = np.full((1, 40, 40), 100, np.uint8)
    db[:, :, 30:] = 0  # nodata on the right
    tb = from_origin(ORIGIN[0] + 0.25, ORIGIN[1], 0.5, 0.5)  # half-pixel east
    b = make_geotiff(tmp_path / "b.tif", db, transform=tb, nodata=0)
    with open_pair(a, b) as pair:
        assert pair.alignment.mode == "warped"
        assert pair.alignment.to_dict()["window_of_before"] == [1, 0, 39, 40]  # pixels fully inside AFTER
        _, y, v = pair.read(Window(0, 0, 39, 40))
    assert v[:, :28].all()
    assert not v[:, 31:].any()
    np.testing.assert_allclose(y[0][:, :28], 100.0)


def test_different_crs_is_aligned(tmp_path, make_geotiff):
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    h, w = 60, 80
    rows, cols = np.mgrid[0:h, 0:w]
    smooth = (1000 + 5 * rows + 3 * cols).astype("float32")[None]
    t_utm = from_origin(ORIGIN[0], ORIGIN[1], 10.0, 10.0)
    a = make_geotiff(tmp_path / "a.tif", smooth, transform=t_utm)
    with rasterio.open(a) as src:
        t_geo, gw, gh = calculate_default_transform(src.crs, "EPSG:4326", w, h, *src.bounds)
    geo = np.zeros((1, gh, gw), "float32")
    reproject(smooth, geo, src_transform=t_utm, src_crs="EPSG:32633", dst_transform=t_geo,
              dst_crs="EPSG:4326", resampling=Resampling.bilinear, dst_nodata=np.nan)
    b = make_geotiff(tmp_path / "b.tif", geo, crs="EPSG:4326", transform=t_geo, nodata=float("nan"))
    with open_pair(a, b) as pair:
        assert pair.alignment.mode == "warped"
        assert "CRS EPSG:32633 vs EPSG:4326" in pair.alignment.reason
        assert pair.crs == "EPSG:32633"
        c0, r0, ww, hh = pair.alignment.window_of_before
        assert ww >= w - 2 and hh >= h - 2
        x, y, v = pair.read(Window(0, 0, pair.width, pair.height))
    assert v.mean() > 0.9
    assert np.isfinite(y).all()
    inner = v.copy()
    inner[:3], inner[-3:], inner[:, :3], inner[:, -3:] = False, False, False, False
    assert np.abs(x[0][inner] - y[0][inner]).max() < 2.0  # smooth field survives the round trip
    with pytest.raises(IncompatibleInputsError, match="CRS"):
        open_pair(a, b, align="strict")


def test_crs_equivalence_numerical():
    from rasterio.crs import CRS

    utm = CRS.from_epsg(32633)
    wkt_alike = CRS.from_proj4("+proj=utm +zone=33 +ellps=WGS84 +towgs84=0,0,0 +units=m +no_defs")
    bounds = (500000.0, 3990000.0, 510000.0, 4000000.0)
    assert crs_equivalent(utm, wkt_alike, bounds, 0.5)
    assert not crs_equivalent(utm, CRS.from_epsg(32634), bounds, 0.5)
    assert not crs_equivalent(utm, CRS.from_epsg(4326), bounds, 0.5)


def test_concurrent_reads_match_sequential(tmp_path, make_geotiff):
    da = _grid(128, 128, seed=5)
    a = make_geotiff(tmp_path / "a.tif", da, compress="deflate")
    tb = from_origin(ORIGIN[0] + 0.3, ORIGIN[1] - 0.2, 0.7, 0.7)  # forces the WarpedVRT path
    b = make_geotiff(tmp_path / "b.tif", _grid(100, 100, seed=6), transform=tb, compress="deflate")
    with open_pair(a, b) as pair:
        rng = np.random.default_rng(0)
        wins = []
        for _ in range(24):
            hh, ww = rng.integers(8, 40, size=2)
            r = int(rng.integers(0, pair.height - hh + 1))
            c = int(rng.integers(0, pair.width - ww + 1))
            wins.append((r, c, int(hh), int(ww)))
        expected = [pair.read(_win(win)) for win in wins]
        results: dict[int, tuple] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)

        def worker(k: int) -> None:
            try:
                barrier.wait()
                for i in range(k, len(wins), 4):
                    results[i] = pair.read(_win(wins[i]))
                for i in range(len(wins)):  # and every window again, overlapping the others
                    got = pair.read(_win(wins[i]))
                    for g, e in zip(got, expected[i], strict=True):
                        np.testing.assert_array_equal(g, e)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        for i, exp in enumerate(expected):
            for g, e in zip(results[i], exp, strict=True):
                np.testing.assert_array_equal(g, e)
        assert len(pair._all) == 5  # the opening thread's handles plus one set per worker
    assert pair._all == []


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_real_wkt_crs_equals_epsg(shared_data):
    ref = shared_data / "geotiff_reference_rasterio"
    full, tile = ref / "RGB.byte.tif", ref / "rgb4.tif"
    with rasterio.open(full) as f, rasterio.open(tile) as t:
        assert f.crs.to_epsg() == 32618 and t.crs.to_epsg() is None
        assert f.crs != t.crs  # rasterio alone does not see it
    with open_pair(full, tile) as pair:
        assert pair.alignment.mode == "window"  # same CRS and grid, no resampling
        assert any("equivalent" in n for n in pair.notes)
        c0, r0, ww, hh = pair.alignment.window_of_before
        assert (c0, r0, ww, hh) == (399, 399, 392, 319)
        x, y, _ = pair.read(Window(0, 0, ww, hh))
    np.testing.assert_array_equal(x, y)  # the tile is an exact copy of that part
    with pytest.raises(IncompatibleInputsError, match="size 400x400 vs 791x718"):
        open_pair(ref / "rgb1.tif", full, align="strict")  # strict refuses the size, not the CRS


@pytest.mark.realdata
def test_real_wkt_crs_same_grid_under_strict(shared_data, tmp_path):
    """rgb1.tif (WKT CRS) against the same 400x400 pixels written with CRS EPSG:32618: one grid."""
    ref = shared_data / "geotiff_reference_rasterio"
    with rasterio.open(ref / "RGB.byte.tif") as src:
        data = src.read(window=((0, 400), (0, 400)))
        crop = tmp_path / "crop_epsg.tif"
        with rasterio.open(crop, "w", driver="GTiff", width=400, height=400, count=3, dtype="uint8",
                           crs="EPSG:32618", transform=src.transform, nodata=0) as dst:
            dst.write(data)
    with open_pair(ref / "rgb1.tif", crop, align="strict") as pair:
        assert pair.alignment.mode == "same-grid"
        assert any("equivalent" in n for n in pair.notes)
        x, y, v = pair.read(Window(0, 0, 400, 400))
    np.testing.assert_array_equal(x, y)
    assert 0 < v.sum() < 400 * 400  # the collar is nodata in both


@pytest.mark.realdata
def test_real_nodata_collar(shared_data):
    full = shared_data / "geotiff_reference_rasterio" / "RGB.byte.tif"
    with open_pair(full, full) as pair:
        x, _, v = pair.read(Window(0, 0, pair.width, pair.height))
    all_zero = (x == 0).all(axis=0)
    assert all_zero.sum() > 100_000
    np.testing.assert_array_equal(v, ~all_zero)


@pytest.mark.realdata
def test_real_oscd_hongkong_size_mismatch(shared_data, tmp_path):
    city = shared_data / "oscd_sentinel2" / "hongkong"

    def stack(folder: str, out: Path) -> Path:
        files = [glob.glob(str(city / folder / f"*_{b}.tif"))[0] for b in ("B04", "B03", "B02")]
        arrays = []
        for f in files:
            with rasterio.open(f) as ds:
                arrays.append(ds.read(1))
                crs, transform = ds.crs, ds.transform
        with rasterio.open(out, "w", driver="GTiff", width=arrays[0].shape[1], height=arrays[0].shape[0],
                           count=3, dtype=arrays[0].dtype, crs=crs, transform=transform) as dst:
            dst.write(np.stack(arrays))
        return out

    before = stack("imgs_1", tmp_path / "hk1.tif")
    after = stack("imgs_2", tmp_path / "hk2.tif")
    with rasterio.open(before) as ds_b, rasterio.open(after) as ds_a:
        assert (ds_b.width, ds_b.height) == (540, 695)
        assert (ds_a.width, ds_a.height) == (538, 693)
        b_transform, b_crs = ds_b.transform, ds_b.crs
    with open_pair(before, after, expected_bands=3) as pair:
        assert pair.alignment.mode in ("warped", "window")
        assert isinstance(pair, ScenePair)
        assert pair.crs == b_crs
        # both dates cover the same bounds: the common extent is BEFORE's whole grid
        assert (pair.width, pair.height) == (540, 695)
        assert pair.transform.almost_equals(b_transform)
        x, y, v = pair.read(Window(200, 300, 128, 128))
    assert v.all()
    assert x.mean() > 0 and y.mean() > 0
    assert np.corrcoef(x[0].ravel(), y[0].ravel())[0, 1] > 0.3  # same place, two dates


# ------------------------------------------------------------------------------------------ same_grid


def test_same_grid_rule(tmp_path, make_geotiff):
    from rasterio.crs import CRS

    from cdmap.raster.pair import same_grid

    a = make_geotiff(tmp_path / "a.tif", _grid(20, 30))
    one_px_east = from_origin(ORIGIN[0] + 0.5, ORIGIN[1], 0.5, 0.5)
    shifted = make_geotiff(tmp_path / "s.tif", _grid(20, 30), transform=one_px_east)
    smaller = make_geotiff(tmp_path / "m.tif", _grid(19, 30))
    with rasterio.open(a) as da, rasterio.open(shifted) as ds, rasterio.open(smaller) as dm:
        assert same_grid(da, da)
        assert not same_grid(da, ds) and not same_grid(da, dm)

        class G:
            width, height, transform = da.width, da.height, da.transform
            crs = CRS.from_wkt(da.crs.to_wkt())  # spelled differently, the same CRS

        assert same_grid(da, G)
        G.crs = None
        assert not same_grid(da, G) and same_grid(da, G, allow_missing_crs=True)


def test_alignment_record_and_json(tmp_path, make_pair):
    a, b, _ = make_pair(tmp_path, 20, 20)
    with open_pair(a, b) as pair:
        assert pair.alignment.mode == "same-grid" and pair.alignment.window_of_after is None
        assert pair.alignment.to_dict() == {"mode": "same-grid", "reason": "same CRS, transform and size",
                                            "resampling": None, "window_of_before": [0, 0, pair.width, pair.height]}
        with pytest.raises(ValueError):
            pair.read(Window(0.5, 0, 4, 4))
