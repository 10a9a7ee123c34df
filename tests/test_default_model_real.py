"""The packaged default model on a real LEVIR-CD tile it never saw: its polygons land on the new buildings."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("levir_geotiff", REPO / "examples" / "levir_geotiff.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_model_finds_the_new_buildings_of_a_held_out_levir_tile(tmp_path, shared_data):
    import geopandas as gpd
    import rasterio
    from rasterio import features

    before, after, label_path = _example().write_levir_pair("test_7", tmp_path / "pair", shared_data)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "cdmap", "predict", str(before), str(after), "-o", str(out),
                          "--json", "-q"], capture_output=True, text=True, timeout=900)  # no --model
    assert res.returncode == 0, res.stderr
    run = json.loads(res.stdout)
    assert run["model"]["name"] == "fsgnet-rgb-v1" and not any("pixel size" in w for w in run["warnings"])

    with rasterio.open(label_path) as src:
        truth, transform, shape = src.read(1), src.transform, src.shape
    polygons = gpd.read_file(out / "changes.gpkg")
    assert len(polygons) > 0
    predicted = features.rasterize(((g, 1) for g in polygons.to_crs("EPSG:4326").geometry), out_shape=shape,
                                   transform=transform, dtype="uint8")
    # the new buildings: connected label components of at least 100 px (25 m^2)
    comps = [g for g, _ in features.shapes(truth, mask=truth == 1, transform=transform, connectivity=8)]
    ids = features.rasterize(((g, i + 1) for i, g in enumerate(comps)), out_shape=shape, transform=transform,
                             dtype="int32")
    sizes = np.bincount(ids.ravel())
    big = [k for k in range(1, len(sizes)) if sizes[k] >= 100]
    assert len(big) >= 20  # test_7 has dozens of new houses
    covered = [predicted[ids == k].mean() for k in big]
    found = np.mean([c >= 0.3 for c in covered])
    on_buildings = predicted[truth == 1].sum() / max(predicted.sum(), 1)  # share of polygon area on new buildings
    tp = int((predicted & truth).sum())
    f1 = 2 * tp / (predicted.sum() + truth.sum())
    print(f"buildings found {found:.3f} of {len(big)}, polygon area on buildings {on_buildings:.3f}, F1 {f1:.3f}")
    assert found >= FOUND_MIN and on_buildings >= PRECISION_MIN and f1 >= F1_MIN


# measured with fsgnet-rgb-v1: 0.955 of 132 buildings found, 0.660 of the polygon area on them, F1 0.763
FOUND_MIN, PRECISION_MIN, F1_MIN = 0.85, 0.55, 0.65
