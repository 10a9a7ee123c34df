"""The demo through the Python API: every CLI command is a thin layer over these functions.

    python examples/python_api.py [WORKDIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from cdmap import evaluate_scene, predict_scene, vectorize_raster
from cdmap.synthetic import write_scene_pair, write_tile_set
from cdmap.train import TrainConfig, train


def main(work: Path) -> None:
    tiles = write_tile_set(work / "tiles", n_train=48, n_val=12, n_test=12, size=128)
    before, after, truth = write_scene_pair(work / "scene", height=1024, width=1280)

    cfg = TrainConfig(epochs=25, batch_size=8, effective_batch=8, crop_size=128, backbone_lr=1e-3)
    run = train(tiles, work / "run", cfg, workers=0)
    print(f"best validation F1 {run.best_f1:.3f}, threshold {run.threshold:.3f} -> {run.best_path}")

    result = predict_scene(before, after, work / "prediction", run.best_path, tile_size=128, overwrite=True)
    print(f"{result.summary['polygons']} polygons, {result.summary['changed_area_m2']:.0f} m² changed")

    stats = vectorize_raster(result.probability, work / "changes_0.7.fgb", threshold=0.7, overwrite=True)
    print(f"{stats.n_polygons} polygons at threshold 0.7 -> {stats.path}")

    scores = evaluate_scene(before, after, truth, run.best_path, tile_size=128)
    print({k: round(v, 3) for k, v in scores.metrics.items() if isinstance(v, float)})


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "api_out"))
