"""Evaluation on tiles (CLI and library, CSV, error maps, JSON) and on a whole scene through predict."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cdmap.checkpoint import Checkpoint, save_checkpoint
from cdmap.errors import IncompatibleInputsError, UsageError
from cdmap.evaluate import ERROR_CODES, evaluate_scene, evaluate_tiles, score_mask
from cdmap.metrics import ConfusionCounts
from cdmap.models import FSGNet, ModelConfig

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def _write(path: Path, arr: np.ndarray, driver: str = "PNG") -> Path:
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.ndim == 2:
        arr = arr[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", driver=driver, width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                           dtype=arr.dtype) as dst:
            dst.write(arr)
    return path


def _colours(path: Path) -> dict[int, tuple[int, ...]]:
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path) as src:
            return src.colormap(1)


def _read(path: Path) -> np.ndarray:
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path) as src:
            return src.read()


class DiffModel(torch.nn.Module):
    """Stand-in with a known output: logit of change = 4 * mean over bands of (b - a) (normalised units)."""

    def forward(self, a, b):
        d = 4 * (b - a).mean(1)
        return torch.stack([torch.zeros_like(d), d], 1)


def _checkpoint(path: Path, threshold: float = 0.5, mean=(10.0, 20.0, 30.0), std=(5.0, 5.0, 5.0)) -> Path:
    torch.manual_seed(0)
    model = FSGNet(ModelConfig())
    return save_checkpoint(Checkpoint(ModelConfig(), model.state_dict(), list(mean), list(std), tile_size=32,
                                      threshold=threshold), path)


def _tiles(root: Path, n: int = 3, size: int = 24, seed: int = 0) -> tuple[Path, list]:
    rng = np.random.default_rng(seed)
    truth = []
    for i in range(n):
        a = rng.integers(0, 100, (3, size, size + 4 * i)).astype(np.uint8)
        delta = rng.integers(-8, 9, (size, size + 4 * i))
        b = np.clip(a + delta[None], 0, 255).astype(np.uint8)
        lab = (rng.random((size, size + 4 * i)) < 0.3).astype(np.uint8) * 255
        lab[0, :5] = 9  # an ignore value
        for sub, arr in (("A", a), ("B", b), ("label", lab)):
            _write(root / "test" / sub / f"img{i}.png", arr)
        truth.append((a, b, lab))
    return root, truth


def _expected(truth, thr, std=5.0, ignore=9):
    total = ConfusionCounts()
    per = []
    for a, b, lab in truth:
        d = 4 * ((b.astype(np.float64) - a.astype(np.float64)) / std).mean(0)  # means cancel in b - a
        p = 1 / (1 + np.exp(-d))
        c = ConfusionCounts.from_arrays(p >= thr, lab == 255, lab != ignore)
        total.add(c)
        per.append(c)
    return total, per


def test_evaluate_tiles_counts_csv_and_error_maps(tmp_path, monkeypatch):
    monkeypatch.setattr(Checkpoint, "build_model", lambda self, device=None: DiffModel())
    data, truth = _tiles(tmp_path / "data")
    ckpt = _checkpoint(tmp_path / "m.pt", threshold=0.6)
    res = evaluate_tiles(data, ckpt, device="cpu", ignore_index=9, csv_path=tmp_path / "per.csv",
                         error_maps_dir=tmp_path / "maps")
    total, per = _expected(truth, 0.6)
    assert res.counts.as_list() == total.as_list()
    assert res.threshold == 0.6 and res.n_images == 3
    rows = list(csv.DictReader(open(tmp_path / "per.csv")))
    assert [r["name"] for r in rows] == ["img0", "img1", "img2"]
    for r, c in zip(rows, per, strict=True):
        assert [int(r[k]) for k in ("tp", "fp", "fn", "tn")] == c.as_list()
        assert float(r["f1"]) == pytest.approx(c.f1, abs=1e-6)
    # error map classes agree with prediction/truth; the GeoTIFF carries the TP/FP/FN colours
    a, b, lab = truth[1]
    classes = _read(tmp_path / "maps" / "img1.tif")[0]
    assert _colours(tmp_path / "maps" / "img1.tif")[ERROR_CODES["fp"]][:3] == (255, 0, 0)
    d = 4 * ((b.astype(np.float64) - a) / 5.0).mean(0)
    pred = 1 / (1 + np.exp(-d)) >= 0.6
    for name, mask in (("tp", pred & (lab == 255)), ("fp", pred & (lab == 0)), ("fn", ~pred & (lab == 255)),
                       ("tn", ~pred & (lab == 0)), ("ignored", lab == 9)):
        assert mask.any(), name
        assert (classes[mask] == ERROR_CODES[name]).all(), name
    # threshold override, and batching same-size tiles changes nothing
    res2 = evaluate_tiles(data, ckpt, device="cpu", ignore_index=9, threshold=0.3, batch_size=2)
    assert res2.counts.as_list() == _expected(truth, 0.3)[0].as_list()


def test_evaluate_errors(tmp_path):
    data, _ = _tiles(tmp_path / "data", n=1)
    ckpt4 = save_checkpoint(Checkpoint(ModelConfig(in_channels=4), FSGNet(ModelConfig(in_channels=4)).state_dict(),
                                       [0.0] * 4, [1.0] * 4), tmp_path / "m4.pt")
    with pytest.raises(IncompatibleInputsError, match="images have 3 bands but the model expects 4"):
        evaluate_tiles(data, ckpt4, device="cpu", ignore_index=9)
    with pytest.raises(UsageError, match="threshold"):
        evaluate_tiles(data, _checkpoint(tmp_path / "m.pt"), threshold=1.5, ignore_index=9)


def test_evaluate_cli_real_model_json(tmp_path, capsys):
    """End to end through ``cdmap evaluate`` with a real (random) FSG-Net: JSON equals a direct computation."""
    from cdmap.checkpoint import load_checkpoint
    from cdmap.cli.app import main

    data, truth = _tiles(tmp_path / "data", n=2, size=32)
    ckpt_path = _checkpoint(tmp_path / "m.pt", threshold=0.5)
    main(["evaluate", str(data), "--model", str(ckpt_path), "--json", "--ignore-index", "9", "--device", "cpu",
          "--csv", str(tmp_path / "per.csv"), "--error-maps", str(tmp_path / "maps")])
    out = json.loads(capsys.readouterr().out)
    ck = load_checkpoint(ckpt_path)
    model = ck.build_model("cpu")
    mean = torch.tensor(ck.mean).view(1, -1, 1, 1)
    std = torch.tensor(ck.std).view(1, -1, 1, 1)
    total = ConfusionCounts()
    with torch.no_grad():
        for a, b, lab in truth:
            ta = (torch.from_numpy(a[None].astype(np.float32)) - mean) / std
            tb = (torch.from_numpy(b[None].astype(np.float32)) - mean) / std
            p = torch.softmax(model(ta, tb), 1)[0, 1].numpy()
            total.add(ConfusionCounts.from_arrays(p >= 0.5, lab == 255, lab != 9))
    m = out["metrics"]
    assert [m["tp"], m["fp"], m["fn"], m["tn"]] == total.as_list()
    assert m["f1"] == pytest.approx(total.f1)
    assert out["threshold"] == 0.5 and out["n_images"] == 2
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["img0.tif", "img1.tif"]


# ----- scene ---------------------------------------------------------------------------------------------------
def _polygons_from_mask(mask: np.ndarray, transform, crs, path: Path) -> Path:
    import geopandas as gpd
    from rasterio.features import shapes
    from shapely.geometry import shape

    geoms = [shape(g) for g, v in shapes(mask.astype(np.uint8), mask=mask > 0, transform=transform) if v == 1]
    gpd.GeoDataFrame(geometry=geoms, crs=crs).to_file(path)
    return path


def test_score_mask_excludes_nodata_and_ignore(tmp_path, make_geotiff):
    pred = np.array([[1, 1, 0, 255], [0, 1, 0, 0]], np.uint8)
    lab = np.array([[1, 0, 0, 1], [1, 1, 7, 0]], np.uint8)
    m = make_geotiff(tmp_path / "mask.tif", pred, nodata=255)
    labp = make_geotiff(tmp_path / "lab.tif", lab)
    c = score_mask(m, labp, ignore_index=7, error_map=tmp_path / "e.tif")
    assert c.as_list() == [2, 1, 1, 2]  # (0,3) nodata and (1,2) ignored
    classes = _read(tmp_path / "e.tif")[0]
    assert classes[0, 0] == ERROR_CODES["tp"] and classes[0, 3] == ERROR_CODES["ignored"]
    import rasterio

    with rasterio.open(tmp_path / "e.tif") as ds, rasterio.open(m) as ref:
        assert ds.transform == ref.transform and ds.crs == ref.crs  # georeferenced like the mask
    assert _colours(tmp_path / "e.tif")[ERROR_CODES["tp"]][:3] == (255, 255, 255)
    other = make_geotiff(tmp_path / "lab2.tif", np.zeros((3, 4), np.uint8))
    with pytest.raises(IncompatibleInputsError, match="is not on the grid of"):
        score_mask(m, other)


def test_evaluate_scene_raster_and_polygon_labels(tmp_path, make_pair, make_geotiff):
    import rasterio

    before, after, truth = make_pair(tmp_path, height=96, width=128)
    with rasterio.open(before) as src:
        transform, crs = src.transform, src.crs
    lab_tif = make_geotiff(tmp_path / "truth.tif", truth.astype(np.uint8))
    lab_gpkg = _polygons_from_mask(truth, transform, crs, tmp_path / "truth.gpkg")
    ckpt = _checkpoint(tmp_path / "m.pt", threshold=0.5, mean=(100.0,) * 3, std=(50.0,) * 3)
    keep = tmp_path / "pred"
    r1 = evaluate_scene(before, after, lab_tif, ckpt, outdir=keep, device="cpu", tile_size=64,
                        error_map=tmp_path / "scene.tif")
    with rasterio.open(keep / "change_mask.tif") as src:
        mask = src.read(1)
    direct = ConfusionCounts.from_arrays(mask == 1, truth > 0, mask != 255)
    assert r1.counts.as_list() == direct.as_list()
    assert r1.counts.total == 96 * 128
    r2 = evaluate_scene(before, after, lab_gpkg, ckpt, device="cpu", tile_size=64)
    assert r2.counts.as_list() == r1.counts.as_list()
    r3 = evaluate_scene(before, after, lab_tif, ckpt, device="cpu", tile_size=64, threshold=0.0)
    assert r3.counts.fn == 0 and r3.counts.tn == 0  # everything predicted as change
    assert _read(tmp_path / "scene.tif").shape == (1, 96, 128)
    with rasterio.open(tmp_path / "scene.tif") as src:
        assert src.crs == crs and src.transform == transform


def test_scene_cli_never_names_the_temporary_prediction_folder(capfd, tmp_path):
    from cdmap.cli import main
    from tests.conftest import synthetic_pair, write_geotiff
    from tests.helpers import tiny_checkpoint

    before, after, truth = synthetic_pair(tmp_path, height=32, width=32)
    labels = write_geotiff(tmp_path / "labels.tif", truth)
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    capfd.readouterr()
    try:
        main(["evaluate", "--scene", str(before), str(after), str(labels), "-m", str(ckpt)])
    except SystemExit as exc:
        assert not exc.code
    captured = capfd.readouterr()
    assert "F1" in captured.out and "cdmap-eval-" not in captured.err + captured.out
