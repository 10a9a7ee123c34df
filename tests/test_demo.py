"""The README's main job, scaled down: synthetic tiles -> training -> scene prediction -> evaluation."""

from __future__ import annotations

import json

import numpy as np
import rasterio

from cdmap.demo import run_demo
from cdmap.synthetic import synthetic_change_pair


def test_synthetic_pair_has_known_change_and_radiometric_shift():
    a, b, label = synthetic_change_pair(128, 160, seed=3)
    assert a.shape == b.shape == (3, 128, 160) and label.shape == (128, 160)
    assert 0.005 < label.mean() < 0.3
    changed = label == 1
    # change is where B differs structurally; elsewhere only a global gain/offset and noise
    assert np.abs(a[:, changed].astype(int) - b[:, changed]).mean() > np.abs(a[:, ~changed].astype(int)
                                                                            - b[:, ~changed]).mean()


def test_demo_end_to_end_small(tmp_path, capfd):
    res = run_demo(tmp_path / "demo", epochs=2, tiles=8, tile_size=64, scene_height=200, scene_width=260)
    err = capfd.readouterr().err
    for name in ("change_probability.tif", "change_mask.tif", "changes.gpkg", "run.json"):
        assert (res.prediction / name).exists()
        assert str(res.prediction / name) in err or name == "change_mask.tif" or name in err
    metrics = json.loads((tmp_path / "demo" / "scene_metrics.json").read_text())
    assert {"precision", "recall", "f1", "iou", "kappa"} <= set(metrics)
    with rasterio.open(res.prediction / "change_mask.tif") as m, \
            rasterio.open(tmp_path / "demo" / "scene" / "before.tif") as ref:
        assert m.crs == ref.crs and m.transform == ref.transform
    assert "synthetic" in err
    assert "cdmap predict BEFORE.tif AFTER.tif -o my_changes\n" in err  # what to run next: the packaged model
    assert "NotGeoreferencedWarning" not in err
