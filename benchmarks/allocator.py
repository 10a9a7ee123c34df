"""glibc's default allocator settings against :func:`cdmap.allocator.tune_allocator`, in fresh processes.

Two measurements, each configuration in its own fresh process (the allocator is process-wide), alternating
default / tuned for ``--rounds`` rounds on the same machine:

* model: the packaged model's forward through ``Predictor.probability`` (tile 256, batch 4, torch fp32), median
  of ``--repeats`` calls after 2 warm-up calls, and the process's peak resident set;
* end to end: ``cdmap predict --backend BACKEND --no-report`` (default torch) on a LEVIR-CD mosaic
  (``_scenes.build_scene``): ``compute_s``, ``total_s`` and ``peak_rss_mib`` of run.json
  (``CDMAP_TUNE_MALLOC=0`` for the default).

    python benchmarks/allocator.py --size 2048 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent

MODEL = r"""
import json, sys, time
from cdmap.allocator import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tuned" else False
import numpy as np, torch
from cdmap.checkpoint import load_checkpoint
from cdmap.inference import Predictor
from cdmap.weights import model_path
torch.set_num_threads(int(sys.argv[2]))
p = Predictor.from_checkpoint(load_checkpoint(model_path(None)), device="cpu", precision="fp32", backend="torch")
a = np.random.default_rng(0).standard_normal((4, 3, 256, 256), dtype=np.float32)
for _ in range(2):
    p.probability(a, a)
t = []
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter()
    p.probability(a, a)
    t.append(time.perf_counter() - t0)
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
print(json.dumps({"tuned": tuned, "median_s": sorted(t)[len(t) // 2], "peak_mib": hwm}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048, help="scene side in pixels for the end-to-end runs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=6, help="timed forward calls per model process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--backend", default="torch", help="backend of the end-to-end runs (the model rows: torch)")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from _scenes import build_scene

    work = args.workdir or Path(tempfile.mkdtemp(prefix="cdmap-alloc-"))
    before, after, source = build_scene(work / "scene", args.size)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(HERE.parent))
    modes = {"default": {"CDMAP_TUNE_MALLOC": "0"}, "tuned": {"CDMAP_TUNE_MALLOC": "1"}}
    model: dict[str, list[dict]] = {m: [] for m in modes}
    e2e: dict[str, list[dict]] = {m: [] for m in modes}
    cdmap = [sys.executable, "-m", "cdmap"]
    for rnd in range(args.rounds):
        for mode, extra in modes.items():
            out = subprocess.run([sys.executable, "-c", MODEL, mode, str(args.threads), str(args.repeats)],
                                 capture_output=True, text=True, check=True, env={**env, **extra}).stdout
            model[mode].append(json.loads(out.strip().splitlines()[-1]))
            outdir = work / f"out_{mode}"
            subprocess.run([*cdmap, "predict", str(before), str(after), "-o", str(outdir), "--backend", args.backend,
                            "--no-report", "--overwrite", "-q"], check=True, env={**env, **extra},
                           capture_output=True)
            run = json.loads((outdir / "run.json").read_text())
            e2e[mode].append({**run["timings"], "peak_rss_mib": run["peak_rss_mib"]})
            print(f"  round {rnd + 1} {mode}: model {model[mode][-1]['median_s'] * 1e3:.0f} ms, "
                  f"e2e compute {e2e[mode][-1]['compute_s']:.1f} s", file=sys.stderr, flush=True)
    assert all(r["tuned"] for r in model["tuned"]), "tune_allocator() did not apply on this machine"
    print(f"\n{source}, {args.size} x {args.size}; {args.threads} threads; {args.rounds} rounds, default and tuned "
          f"alternating, each a fresh process; ratio = default time / tuned time per round (median)")
    print("| measurement | default (median) | tuned (median) | speed-up per round | median | "
          "peak MiB default / tuned |")
    print("|---|---:|---:|---|---:|---:|")
    rows = [("model forward, batch 4, ms", [r["median_s"] * 1e3 for r in model["default"]],
             [r["median_s"] * 1e3 for r in model["tuned"]], "peak_mib", model),
            ("cdmap predict compute_s", [r["compute_s"] for r in e2e["default"]],
             [r["compute_s"] for r in e2e["tuned"]], "peak_rss_mib", e2e),
            ("cdmap predict total_s", [r["total_s"] for r in e2e["default"]],
             [r["total_s"] for r in e2e["tuned"]], "peak_rss_mib", e2e)]
    for label, d, t, peak_key, src in rows:
        ratios = [a / b for a, b in zip(d, t, strict=True)]
        peaks = [max(r[peak_key] for r in src[m]) for m in modes]
        print(f"| {label} | {median(d):.1f} | {median(t):.1f} | {', '.join(f'{r:.2f}' for r in ratios)} | "
              f"{median(ratios):.2f} | {peaks[0]:.0f} / {peaks[1]:.0f} |")


if __name__ == "__main__":
    main()
