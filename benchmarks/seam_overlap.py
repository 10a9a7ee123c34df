"""Seam ratio, overlap disagreement and speed against the window overlap: the table the default comes from.

    python benchmarks/seam_overlap.py --model RUN/best.pt            # a trained checkpoint (recommended)
    python benchmarks/seam_overlap.py --model RUN/best.pt --size 1024 --overlaps 0,32,64
    python benchmarks/seam_overlap.py --model E1/best.pt --model E12/best.pt --margins   # per checkpoint

``--margins``: for each checkpoint, the seam ratio on the real LEVIR-CD 1024 px tiles at each (overlap,
margin) candidate of cdmap.calibrate and at overlap 0, and the choice ``cdmap calibrate`` makes on
``--calib-data`` (default: the LEVIR-CD 256 px samples), with its ratio on the 1024 px tiles.

The scene is a mosaic of real LEVIR-CD 1024 px tiles from ../shared/data (synthetic when absent).
Seam ratio: the run's own (cdmap.tiling.stitch.BlendStats: median piece step in and beside the blend zones
against the median elsewhere; 1.0 = no seam, a visible grid reads above 1.1). Speed is relative to overlap 0,
measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, action="append", help="a cdmap checkpoint (repeatable)")
    ap.add_argument("--margins", action="store_true", help="seam ratio per overlap/margin and the calibrated choice")
    ap.add_argument("--calib-data", type=Path, default=HERE.parent.parent / "shared" / "data" / "levircd_bitcd_samples")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlaps", default="0,16,32,64,96,128")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    if args.margins:
        for model in args.model:
            margin_table(model, args.calib_data, args.batch_size, args.device)
        return
    args.model = args.model[0]

    from _scenes import build_scene

    from cdmap.predict import predict_scene

    work = Path(tempfile.mkdtemp(prefix="cdmap-seam-"))
    before, after, source = build_scene(work / "scene", args.size)
    rows = []
    for ov in [int(v) for v in args.overlaps.split(",")]:
        t = time.perf_counter()
        res = predict_scene(before, after, work / f"o{ov}", args.model, tile_size=args.tile, overlap=ov,
                            batch_size=args.batch_size, device=args.device, prob_dtype="float32",
                            vector_format="none", quiet=True)
        dt = time.perf_counter() - t
        s = res.summary
        rows.append((ov, s["seam_ratio"], s["overlap_disagreement"], s["windows"]["total"], dt))
        print(f"overlap {ov}: seam ratio {s['seam_ratio']:.3f}, {dt:.1f} s", flush=True)
    base = rows[0][4]
    print(f"\nscene {args.size}x{args.size} ({source}), tile {args.tile}, model {args.model.name}, "
          f"device {res.summary['device']}")
    print(f"{'overlap':>7s} {'seam ratio':>10s} {'disagreement':>12s} {'windows':>8s} {'seconds':>8s} "
          f"{'time vs overlap 0':>17s}")
    for ov, seam, dis, n, dt in rows:
        dis_s = f"{dis:.4f}" if dis is not None else "-"
        print(f"{ov:7d} {seam:10.3f} {dis_s:>12s} {n:8d} {dt:8.1f} {dt / base:17.2f}")


def margin_table(model: Path, calib_data: Path, batch_size: int, device: str) -> None:
    """Seam ratio on the LEVIR-CD full tiles per (overlap, margin), and what calibration picks."""
    import numpy as np
    from _scenes import _levir_tiles

    from cdmap.calibrate import calibrate, candidates, seam_ratio, validation_images
    from cdmap.checkpoint import load_checkpoint
    from cdmap.inference import Predictor

    ckpt = load_checkpoint(model)
    tile = ckpt.tile_size
    predictor = Predictor.from_checkpoint(ckpt, device)
    scenes = [(a.astype(np.float32), b.astype(np.float32), np.ones(a.shape[1:], bool)) for a, b in _levir_tiles()]
    t = time.perf_counter()
    cal = calibrate(ckpt, validation_images(calib_data, ckpt), device, batch_size=batch_size)
    cal_s = time.perf_counter() - t
    print(f"\nmodel {model} (epoch {ckpt.provenance.get('epoch')}, tile {tile}); seam ratio on {len(scenes)} "
          f"LEVIR-CD 1024 px tiles")
    print(f"{'overlap':>7s} {'margin':>6s} {'seam ratio':>10s}")
    for ov, m in [(0, 0), *candidates(tile)]:
        r = seam_ratio(predictor, scenes, tile, ov, m, batch_size)
        mark = "  <- calibrated" if (ov, m) == (cal.overlap, cal.margin) else ""
        print(f"{ov:7d} {m:6d} {r:10.3f}{mark}", flush=True)
    print(f"calibrated on {calib_data.name} ({cal.scenes} tiles, {cal_s:.0f} s): overlap {cal.overlap}, margin "
          f"{cal.margin}, seam ratio there {cal.seam_ratio:.3f}; edge profile {cal.edge}")


if __name__ == "__main__":
    main()
