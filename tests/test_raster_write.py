"""RasterWriter (tiled, compressed GeoTIFF written strip by strip), to_cog and validate_cog."""

from __future__ import annotations

import errno
import struct

import numpy as np
import pytest
import rasterio
from rasterio.errors import RasterioIOError
from rasterio.transform import from_origin

from cdmap.errors import InputError, OutputError, UsageError
from cdmap.raster.write import RasterWriter, overview_factors, to_cog, validate_cog

CRS = "EPSG:32633"
TRANSFORM = from_origin(500000.0, 4000000.0, 0.5, 0.5)


def _write(path, data, *, dtype=None, nodata=None, strip=512, overviews=None, **kw):
    count = 1 if data.ndim == 2 else data.shape[0]
    height, width = data.shape[-2:]
    with RasterWriter(path, width=width, height=height, crs=CRS, transform=TRANSFORM,
                      dtype=dtype or data.dtype, nodata=nodata, count=count, **kw) as w:
        for r in range(0, height, strip):
            w.write_rows(r, data[..., r:r + strip, :])
        if overviews:
            w.build_overviews(overviews)
    return path


def test_uint8_tiled_deflate_predictor(tmp_path):
    data = np.random.default_rng(0).integers(0, 3, size=(1100, 1000), dtype=np.uint8)
    path = _write(tmp_path / "mask.tif", data, nodata=255)
    with rasterio.open(path) as ds:
        assert ds.profile["tiled"] and ds.block_shapes[0] == (512, 512)
        assert ds.compression.name == "deflate"
        assert ds.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "2"
        assert ds.crs == CRS and ds.transform == TRANSFORM
        assert ds.nodata == 255 and ds.dtypes[0] == "uint8"
        np.testing.assert_array_equal(ds.read(1), data)


def test_float32_scale_tags_description(tmp_path):
    data = np.random.default_rng(1).random((600, 700)).astype(np.float32)
    data[:3] = np.nan
    path = _write(tmp_path / "prob.tif", data, nodata=float("nan"), scale=0.5, offset=1.0,
                  tags={"CDMAP_THRESHOLD": "0.5", "CDMAP_CONFIG": {"tile": 512}}, description="P(change)")
    with rasterio.open(path) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "3"
        assert ds.scales == (0.5,) and ds.offsets == (1.0,)
        tags = ds.tags()
        assert tags["CDMAP_THRESHOLD"] == "0.5" and tags["CDMAP_CONFIG"] == '{"tile": 512}'
        assert ds.descriptions == ("P(change)",)
        assert np.isnan(ds.nodata)
        np.testing.assert_array_equal(ds.read(1), data)


def test_multiband_and_small_raster_blocks(tmp_path):
    data = np.arange(2 * 40 * 70, dtype=np.int16).reshape(2, 40, 70)
    path = _write(tmp_path / "small.tif", data)
    with rasterio.open(path) as ds:
        assert ds.count == 2
        by, bx = ds.block_shapes[0]
        assert bx == by and bx % 16 == 0 and 70 <= bx < 512
        np.testing.assert_array_equal(ds.read(), data)


def test_overviews(tmp_path):
    data = np.random.default_rng(2).random((1100, 2100)).astype(np.float32)
    path = _write(tmp_path / "ovr.tif", data, overviews="average")
    assert overview_factors(2100, 1100) == [2, 4, 8]
    assert overview_factors(512, 512) == [] and overview_factors(513, 100) == [2]
    with rasterio.open(path) as ds:
        assert ds.overviews(1) == [2, 4, 8]
        assert ds.tags(ns="rio_overview")["resampling"] == "average"


def test_user_creation_options_override(tmp_path):
    data = np.zeros((100, 100), np.uint8)
    path = _write(tmp_path / "big.tif", data,
                  creation_options={"compress": "lzw", "BIGTIFF": "YES", "blockxsize": "32", "BLOCKYSIZE": "32"})
    with open(path, "rb") as f:
        assert struct.unpack("<H", f.read(4)[2:])[0] == 43  # BigTIFF magic
    with rasterio.open(path) as ds:
        assert ds.compression.name == "lzw"
        assert ds.block_shapes[0] == (32, 32)
    path = _write(tmp_path / "raw.tif", data, creation_options={"COMPRESS": "NONE"})
    with rasterio.open(path) as ds:
        assert ds.compression is None
        assert "PREDICTOR" not in ds.tags(ns="IMAGE_STRUCTURE")


@pytest.mark.parametrize("co", [{"FOO": "bar"}, {"COMPRESS": "NOPE"}, {"PREDICTOR": "7"}, {"BIGTIFF": "MAYBE"}])
def test_bad_creation_option(tmp_path, co):
    with pytest.raises(UsageError) as ei:
        RasterWriter(tmp_path / "x.tif", width=10, height=10, crs=CRS, transform=TRANSFORM, dtype="uint8",
                     nodata=None, creation_options=co)
    assert "x.tif" in str(ei.value) and ei.value.exit_code == 2


def test_unwritable_destination(tmp_path):
    with pytest.raises(OutputError, match="nodir"):
        RasterWriter(tmp_path / "nodir" / "x.tif", width=10, height=10, crs=CRS, transform=TRANSFORM,
                     dtype="uint8", nodata=None)


class _FullDisk:
    """Stands in for the open dataset: every write fails like a full disk."""

    def __init__(self, real, exc):
        self.real, self.exc = real, exc

    def write(self, *a, **k):
        raise self.exc

    def close(self):
        self.real.close()
        raise self.exc


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 RasterioIOError("Free disk space available is 0 bytes")])
def test_disk_full_becomes_output_error(tmp_path, exc):
    w = RasterWriter(tmp_path / "full.tif", width=64, height=64, crs=CRS, transform=TRANSFORM, dtype="uint8",
                     nodata=0)
    w._ds = _FullDisk(w._ds, exc)
    with pytest.raises(OutputError) as ei:
        w.write_rows(0, np.zeros((64, 64), np.uint8))
    assert "full.tif" in str(ei.value) and ei.value.exit_code == 6
    assert "rows 0-63" in str(ei.value)
    assert ("No space left" in str(ei.value)) or ("disk space" in str(ei.value))
    with pytest.raises(OutputError, match="full.tif"):
        w.close()
    assert w.closed


def test_write_rows_shape_checks(tmp_path):
    with RasterWriter(tmp_path / "s.tif", width=20, height=20, crs=CRS, transform=TRANSFORM, dtype="uint8",
                      nodata=None) as w:
        with pytest.raises(ValueError):
            w.write_rows(0, np.zeros((5, 19), np.uint8))
        with pytest.raises(ValueError):
            w.write_rows(18, np.zeros((5, 20), np.uint8))
        with pytest.raises(ValueError):
            w.write_mask_rows(0, np.ones((5, 20), bool))
        w.write_rows(0, np.ones((20, 20), np.uint8))


def test_mask_band(tmp_path):
    data = np.full((100, 80), 7, np.uint8)
    valid = np.ones((100, 80), bool)
    valid[:, :5] = False
    with RasterWriter(tmp_path / "m.tif", width=80, height=100, crs=CRS, transform=TRANSFORM, dtype="uint8",
                      nodata=None, mask_band=True) as w:
        w.write_rows(0, data)
        w.write_mask_rows(0, valid)
    with rasterio.open(tmp_path / "m.tif") as ds:
        np.testing.assert_array_equal(ds.dataset_mask() > 0, valid)


# ------------------------------------------------------------------------------------------------- COG


def test_to_cog_is_valid_and_keeps_structure(tmp_path):
    data = (np.random.default_rng(3).random((1100, 1300)) * 255).astype(np.uint8)
    valid = np.ones(data.shape, bool)
    valid[:20] = False
    src = tmp_path / "prob.tif"
    with RasterWriter(src, width=1300, height=1100, crs=CRS, transform=TRANSFORM, dtype="uint8", nodata=None,
                      scale=1 / 255, offset=0.0, tags={"CDMAP_VERSION": "x"}, mask_band=True) as w:
        for r in range(0, 1100, 512):
            w.write_rows(r, data[r:r + 512])
            w.write_mask_rows(r, valid[r:r + 512])
        w.build_overviews("average")
    problems = validate_cog(src)  # internal overviews appended after the data: not a COG
    assert any("smaller overviews must come first" in p for p in problems)
    assert any("start of the file" in p for p in problems)
    dst = tmp_path / "prob.cog.tif"
    to_cog(src, dst)
    assert validate_cog(dst) == []
    with rasterio.open(dst) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.compression.name == "deflate"
        assert ds.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "2"
        assert ds.block_shapes[0] == (512, 512)
        assert ds.overviews(1) == [2, 4]
        assert ds.crs == CRS and ds.transform == TRANSFORM
        assert ds.scales == (1 / 255,) and ds.tags()["CDMAP_VERSION"] == "x"
        np.testing.assert_array_equal(ds.read(1), data)
        np.testing.assert_array_equal(ds.dataset_mask() > 0, valid)


def test_cog_float_bigtiff_and_user_options(tmp_path):
    data = np.random.default_rng(4).random((700, 600)).astype(np.float32)
    src = _write(tmp_path / "f.tif", data, nodata=float("nan"), overviews="average",
                 creation_options={"BLOCKXSIZE": "256", "BLOCKYSIZE": "256", "TILED": "YES"})
    dst = tmp_path / "f.cog.tif"
    to_cog(src, dst, creation_options={"BIGTIFF": "YES", "PREDICTOR": "3", "TILED": "YES"})
    assert validate_cog(dst) == []
    with open(dst, "rb") as f:
        assert struct.unpack("<H", f.read(4)[2:])[0] == 43
    with rasterio.open(dst) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "3"
        np.testing.assert_array_equal(ds.read(1), data)
    with pytest.raises(UsageError, match="bad.cog.tif"):
        to_cog(src, tmp_path / "bad.cog.tif", creation_options={"COMPRESS": "NOPE"})


def test_validate_rejects_striped_and_non_tiff(tmp_path):
    striped = tmp_path / "striped.tif"
    with rasterio.open(striped, "w", driver="GTiff", width=700, height=600, count=1, dtype="uint8", crs=CRS,
                       transform=TRANSFORM) as ds:
        ds.write(np.zeros((1, 600, 700), np.uint8))
    problems = validate_cog(striped)
    assert any("not tiled" in p for p in problems)
    assert any("no overviews" in p for p in problems)
    txt = tmp_path / "x.tif"
    txt.write_text("hello")
    assert validate_cog(txt) == ["not a TIFF file"]
    with pytest.raises(InputError):
        validate_cog(tmp_path / "missing.tif")


def test_small_cog_without_overviews_is_valid(tmp_path):
    src = _write(tmp_path / "s.tif", np.ones((100, 120), np.uint8))
    to_cog(src, tmp_path / "s.cog.tif")
    assert validate_cog(tmp_path / "s.cog.tif") == []
