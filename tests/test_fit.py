"""Numbers that cannot lie: predict warns (log + run.json ``warnings``) when the input does not fit the model,
labels without georeferencing need --labels-pixel-grid, and vectorize and predict report one area."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from rasterio.transform import from_origin

from tests.conftest import synthetic_pair, write_geotiff
from tests.helpers import tiny_checkpoint
from tests.test_inputs import _cli


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "m.pt", tile=32)


def _predict(tmp_path, before, after, model, **kw):
    from cdmap.predict import predict_scene

    return predict_scene(before, after, tmp_path / "out", model, tile_size=32, vector_format="none", quiet=True,
                         **kw).summary


def test_a_fitting_input_has_no_warnings(tmp_path, ckpt):
    before, after, _ = synthetic_pair(tmp_path, 64, 64)
    assert _predict(tmp_path, before, after, ckpt, threshold=0.99)["warnings"] == []


def test_uint16_into_a_uint8_model_warns(tmp_path, ckpt, caplog):
    before, after, _ = synthetic_pair(tmp_path, 64, 64)
    import rasterio

    for p in (before, after):
        with rasterio.open(p) as src:
            data, transform = src.read().astype(np.uint16) * 40, src.transform
        write_geotiff(p, data, transform=transform)
    with caplog.at_level("WARNING", logger="cdmap"):
        w = _predict(tmp_path, before, after, ckpt, threshold=0.99)["warnings"]
    assert any("another scale" in x and x.startswith("before: band 1") for x in w), w
    assert any("another scale" in r.getMessage() for r in caplog.records)


def test_same_file_and_same_content_warn(tmp_path, ckpt):
    before, after, _ = synthetic_pair(tmp_path, 64, 64)
    w = _predict(tmp_path, before, before, ckpt, threshold=0.99)["warnings"]
    assert any("same file" in x for x in w)
    import shutil

    shutil.copy(before, tmp_path / "copy.tif")
    w = _predict(tmp_path, before, tmp_path / "copy.tif", ckpt, threshold=0.99, overwrite=True)["warnings"]
    assert any("same pixels" in x for x in w)


def test_mostly_change_and_pixel_size_warn(tmp_path, ckpt):
    from cdmap.checkpoint import load_checkpoint

    model = load_checkpoint(ckpt)
    model.provenance["gsd_m"] = [0.5, 0.5]
    t300 = from_origin(500000.0, 4000000.0, 300.0, 300.0)
    before, after, _ = synthetic_pair(tmp_path, 64, 64, transform=t300)
    w = _predict(tmp_path, before, after, model, threshold=0.0)["warnings"]
    assert any("of the valid scene is marked as change" in x for x in w), w
    assert any("pixel size 300 m is far from the training pixel size (0.5 m)" in x for x in w), w


def test_training_records_the_pixel_size_range(tmp_path):
    from cdmap.data import gsd_range, load_split

    root = tmp_path / "d"
    for sub in ("A", "B", "label"):
        (root / sub).mkdir(parents=True)
        for i, res in enumerate((0.5, 2.0)):
            arr = np.zeros((1 if sub == "label" else 3, 32, 32), np.uint8)
            write_geotiff(root / sub / f"t{i}.tif", arr, transform=from_origin(500000.0, 4000000.0, res, res))
    pairs = load_split(root)
    assert gsd_range(pairs) == pytest.approx([0.5, 2.0], rel=1e-3)


def test_label_raster_without_georeferencing_needs_the_flag(tmp_path):
    from cdmap.errors import IncompatibleInputsError
    from cdmap.evaluate import score_mask

    before, after, truth = synthetic_pair(tmp_path, 64, 64)
    import rasterio

    with rasterio.open(before) as src:
        write_geotiff(tmp_path / "mask.tif", truth, transform=src.transform)
    write_geotiff(tmp_path / "lab.tif", truth * 255, crs=None, transform=from_origin(0, 0, 1, 1))
    with pytest.raises(IncompatibleInputsError, match="--labels-pixel-grid"):
        score_mask(tmp_path / "mask.tif", tmp_path / "lab.tif")
    assert score_mask(tmp_path / "mask.tif", tmp_path / "lab.tif", pixel_grid=True).metrics()["f1"] == 1.0
    write_geotiff(tmp_path / "small.tif", (truth * 255)[:60], crs=None, transform=from_origin(0, 0, 1, 1))
    with pytest.raises(IncompatibleInputsError, match="same size"):
        score_mask(tmp_path / "mask.tif", tmp_path / "small.tif", pixel_grid=True)
    oscd = np.where(truth == 1, 2, 1).astype(np.uint8)
    with rasterio.open(before) as src:
        write_geotiff(tmp_path / "oscd.tif", oscd, transform=src.transform)
    from cdmap.errors import InputError

    with pytest.raises(InputError, match="pass --label-values 1,2"):
        score_mask(tmp_path / "mask.tif", tmp_path / "oscd.tif")
    assert score_mask(tmp_path / "mask.tif", tmp_path / "oscd.tif", label_values=(1, 2)).metrics()["f1"] == 1.0


def test_vectorize_and_predict_report_one_area(tmp_path, ckpt):
    """The same mask: `cdmap vectorize`'s summary area equals predict's run.json changed_area_m2 (4326 grid)."""
    t = from_origin(-73.99, 40.75, 5e-6, 5e-6)  # geographic: areas need the one area rule
    before, after, _ = synthetic_pair(tmp_path, 64, 64, crs="EPSG:4326", transform=t)
    out = tmp_path / "out"
    _cli("predict", before, after, "-o", out, "-m", ckpt, "--tile-size", "32", "--threshold", "0.5", "-q")
    run = json.loads((out / "run.json").read_text())
    assert run["changed_pixels"] > 0
    text = _cli("vectorize", out / "change_mask.tif", "-o", tmp_path / "v.gpkg")
    area = float(re.search(r"([\d,]+\.\d) m² changed", text).group(1).replace(",", ""))
    assert area == pytest.approx(run["changed_area_m2"], abs=0.051)
