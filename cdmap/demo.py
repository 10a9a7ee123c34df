"""The end-to-end demo: synthetic tiles -> training -> scene prediction -> evaluation against known truth.

Runs on a CPU with no data and no downloads (about 1,700 CPU-seconds: ~15 min on 2 free cores). The model it
trains has only seen synthetic scenes (see :mod:`cdmap.synthetic`); it demonstrates the pipeline, not real-world
skill.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class DemoResult:
    """Paths written by the demo and its scores."""

    outdir: Path
    checkpoint: Path
    prediction: Path
    metrics: dict[str, Any]
    seconds: float


def run_demo(outdir: str | Path, *, epochs: int = 25, tiles: int = 48, tile_size: int = 128,
             scene_height: int = 1024, scene_width: int = 1280, seed: int = 0, device: str = "auto",
             overwrite: bool = False, quiet: bool = False) -> DemoResult:
    """Make synthetic data in ``outdir``, train FSG-Net, map the synthetic scene and score it."""
    from cdmap.errors import OutputError
    from cdmap.evaluate import evaluate_scene
    from cdmap.synthetic import write_scene_pair, write_tile_set
    from cdmap.train import TrainConfig, train

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    outdir = Path(outdir)
    if outdir.exists() and any(outdir.iterdir()) and not overwrite:
        raise OutputError("demo output folder is not empty; use --overwrite or another folder", outdir)
    if overwrite and outdir.exists():
        import shutil

        shutil.rmtree(outdir)
    say(f"cdmap demo: writing {tiles} synthetic training tiles and a {scene_width}x{scene_height} scene pair")
    data = write_tile_set(outdir / "tiles", n_train=tiles, n_val=max(4, tiles // 4), n_test=max(4, tiles // 4),
                          size=tile_size, seed=seed)
    before, after, truth = write_scene_pair(outdir / "scene", height=scene_height, width=scene_width, seed=seed + 7)
    say(f"cdmap demo: training FSG-Net (ResNet-18, from scratch) for {epochs} epochs on {data}")
    cfg = TrainConfig(epochs=epochs, batch_size=8, effective_batch=8, crop_size=tile_size, lr=1e-3,
                      backbone_lr=1e-3, seed=seed, dropblock_end_epoch=max(2, epochs))
    result = train(data, outdir / "run", cfg, workers=0, device=device, quiet=quiet)
    ckpt = result.best_path or result.last_path
    say(f"cdmap demo: best validation F1 {result.best_f1:.3f} at epoch {result.best_epoch}; mapping the scene")
    ev = evaluate_scene(before, after, truth, ckpt, outdir=outdir / "prediction", tile_size=tile_size,
                        overlap=tile_size // 4, vector_format="gpkg", quiet=quiet, device=device)
    metrics = dict(ev.metrics)
    (outdir / "scene_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    pred = outdir / "prediction"
    seconds = time.perf_counter() - t0
    say(
        f"cdmap demo: done in {seconds:.0f} s. Scene scores against the known truth: "
        + ", ".join(f"{k} {metrics[k]:.3f}" for k in ("precision", "recall", "f1", "iou") if k in metrics)
        + f".\n  checkpoint  {ckpt}\n  rasters     {pred / 'change_probability.tif'}, {pred / 'change_mask.tif'}"
        + f"\n  polygons    {pred / 'changes.gpkg'} (layer 'changes')\n  run summary {pred / 'run.json'}"
        + (f"\n  report      {pred / 'report.html'} (open it in a browser)" if (pred / "report.html").exists()
           else "")
        + "\n  (the demo model knows only synthetic scenes)"
        + "\nNext, on your own RGB scenes (same grid, or AFTER is warped onto BEFORE's), with the packaged model "
        + "(see cdmap models):"
        + "\n  cdmap predict BEFORE.tif AFTER.tif -o my_changes"
        + "\nand to train a model for them: cdmap tiles BEFORE.tif AFTER.tif LABELS.gpkg -o my_tiles, then "
        + "cdmap train my_tiles -o my_run"
    )
    return DemoResult(outdir, ckpt, pred, metrics, seconds)
