"""Seam ratio, overlap disagreement and speed against the window overlap: the table the default comes from.

    python benchmarks/seam_overlap.py --model RUN/best.pt            # a trained checkpoint (recommended)
    python benchmarks/seam_overlap.py --model RUN/best.pt --size 1024 --overlaps 0,32,64

The scene is a mosaic of real LEVIR-CD 1024 px tiles from ../shared/data (synthetic when absent).
Seam ratio = mean |P step| between neighbouring pixels across window boundaries / mean step elsewhere
(1.0 = no seam). Speed is relative to overlap 0, measured in the same run.
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
    ap.add_argument("--model", type=Path, required=True, help="a trained cdmap checkpoint")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlaps", default="0,16,32,64,96,128")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()
