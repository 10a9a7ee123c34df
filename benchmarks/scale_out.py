"""Scale-out of one scene over the ranks of a torchrun job: wall time, MPix/s and parallel efficiency.

    python benchmarks/scale_out.py --size 3072                 # CPU: world sizes 1 and 2, 1 thread per rank
    python benchmarks/scale_out.py --size 16384 --worlds 1,8   # a node with 8 GPUs (cuda:LOCAL_RANK each)

Each world size runs ``cdmap predict`` on the same scene in fresh processes: world 1 is a plain single process,
world N is ``torchrun --standalone --nproc-per-node N -m cdmap predict``. Wall time is the whole command (start
of the processes to exit, torch import and the rank-0 assembly included); MPix/s = scene pixels / wall time;
speed-up = wall(1) / wall(N); parallel efficiency = speed-up / N. The compute stage alone (run.json's
``timings.compute_s``: start of compute to the last rank's gather) is reported too. Every world size's mask
and probability raster are checked to be identical to world 1's. Without ``--worlds``: 1 and 2 on CPU, 1 and
every visible GPU on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def run_world(world: int, before: Path, after: Path, out: Path, ckpt: Path, args: argparse.Namespace) -> dict:
    """One ``cdmap predict`` over ``world`` processes; returns wall time and run.json's figures."""
    cdmap_args = ["predict", str(before), str(after), "-o", str(out), "--model", str(ckpt), "--tile-size",
                  str(args.tile), "--batch-size", str(args.batch_size), "--device", args.device, "--quiet",
                  "--overwrite"]
    if world == 1:
        cmd = [sys.executable, "-m", "cdmap", *cdmap_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               "-m", "cdmap", *cdmap_args]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"world {world} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "run.json").read_text())
    return {"world": world, "wall_s": wall, "compute_s": summary["timings"]["compute_s"],
            "total_s": summary["timings"]["total_s"], "device": summary["device"],
            "per_rank_compute_s": [r["compute_s"] for r in summary["ranks"]["per_rank"]],
            "windows_computed": summary["windows"]["computed"], "windows_total": summary["windows"]["total"]}


def same_rasters(a: Path, b: Path) -> bool:
    import numpy as np
    import rasterio

    for name in ("change_probability.tif", "change_mask.tif"):
        with rasterio.open(a / name) as x, rasterio.open(b / name) as y:
            if not (np.array_equal(x.read(), y.read()) and np.array_equal(x.read_masks(1), y.read_masks(1))):
                return False
    return True


def main() -> None:
    import torch
    from _scenes import build_scene
    from predict_scene import make_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=3072, help="scene side in pixels")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every rank")
    ap.add_argument("--worlds", default=None, help="comma-separated world sizes (default: 1,2 on CPU, 1,#GPUs)")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: random weights; speed only)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    worlds = [int(w) for w in args.worlds.split(",")] if args.worlds else [1, gpus or 2]
    worlds = sorted(set([1] + worlds))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cdmap_scale_"))
    before, after, source = build_scene(work / "scene", args.size)
    ckpt = args.model or make_checkpoint(work / "random.pt", args.tile)
    mpix = args.size * args.size / 1e6
    print(f"scene {args.size}x{args.size} ({mpix:.1f} MPix, {source}); tile {args.tile}, batch {args.batch_size}, "
          f"{args.threads} thread(s) per rank; torch {torch.__version__}; {gpus} GPU(s) visible")
    rows = []
    for world in worlds:
        r = run_world(world, before, after, work / f"out_w{world}", ckpt, args)
        r["identical_to_world_1"] = world == 1 or same_rasters(work / f"out_w{world}", work / "out_w1")
        rows.append(r)
        print(json.dumps(r))
    base = rows[0]
    print("\n| world size | device | wall s | MPix/s | speed-up | efficiency | compute s | compute speed-up "
          "| windows computed | identical |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        sp, csp = base["wall_s"] / r["wall_s"], base["compute_s"] / r["compute_s"]
        print(f"| {r['world']} | {r['device']} | {r['wall_s']:.1f} | {mpix / r['wall_s']:.3f} | {sp:.2f} | "
              f"{sp / r['world']:.2f} | {r['compute_s']:.1f} | {csp:.2f} | {r['windows_computed']}/"
              f"{r['windows_total']} | {'yes' if r['identical_to_world_1'] else 'NO'} |")


if __name__ == "__main__":
    main()
