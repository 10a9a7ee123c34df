"""End to end on the CPU: the issue's torch path against what ``cdmap predict`` runs now, fresh processes.

Issue 12's baseline is "today's torch fp32 path" when it was filed: the network as built from the checkpoint
(eager, NCHW, BatchNorm as its own op, EfficientNet "same" convolutions on padded copies) under glibc's default
allocator. It is rebuilt here by switching those parts back (``CDMAP_TUNE_MALLOC=0``,
``torch_backend.FOLD_BATCHNORM`` and ``CPU_CHANNELS_LAST`` off, the padded-copy convolution) around the real
``predict_scene``. Against it, the ``cdmap`` command as a user runs it: ``--backend torch``, ``onnxruntime`` and
``openvino`` (when installed) and the default ``auto``. Every run is a fresh process, configurations alternate
round by round; printed per configuration: the median of (baseline time / this time) per round for total and
compute seconds of run.json, peak RSS, and the mask agreement and max P(change) difference with the baseline::

    python benchmarks/cpu_path.py --size 2048 --rounds 3
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

BASELINE = r"""
import sys, types
sys.path.insert(0, sys.argv[4])
from cdmap.backends import torch_backend
from cdmap.models.backbones import _SameConv2d
from model_speed import _padcopy_forward
torch_backend.FOLD_BATCHNORM = False
torch_backend.CPU_CHANNELS_LAST = False
_SameConv2d.forward = _padcopy_forward
from cdmap.predict import predict_scene
predict_scene(sys.argv[1], sys.argv[2], sys.argv[3], None, backend="torch", overwrite=True, quiet=True,
              report=False, prob_dtype="float32")
"""


def main() -> None:
    import numpy as np
    import rasterio

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from _scenes import build_scene

    from cdmap import backends

    work = args.workdir or Path(tempfile.mkdtemp(prefix="cdmap-cpu-path-"))
    before, after, source = build_scene(work / "scene", args.size)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(HERE.parent),
               CDMAP_CACHE_DIR=str(work / "cache"))
    cli = [sys.executable, "-m", "cdmap", "predict", str(before), str(after), "--no-report", "--overwrite", "-q",
           "--prob-dtype", "float32"]
    configs = {"issue baseline (torch as built, glibc malloc)": None, "cdmap predict --backend torch": "torch"}
    for name in ("onnxruntime", "openvino"):
        if backends.installed(name):
            configs[f"cdmap predict --backend {name}"] = name
    configs["cdmap predict (auto)"] = "auto"
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    for rnd in range(args.rounds + 1):  # round 0 fills the export cache and is not counted
        for i, (label, backend) in enumerate(configs.items()):
            out = work / f"out{i}"
            if backend is None:
                cmd = [sys.executable, "-c", BASELINE, str(before), str(after), str(out), str(HERE)]
                extra = {"CDMAP_TUNE_MALLOC": "0"}
            else:
                cmd, extra = [*cli, "-o", str(out), "--backend", backend], {}
            subprocess.run(cmd, check=True, capture_output=True, env={**env, **extra})
            run = json.loads((out / "run.json").read_text())
            if rnd:
                runs[label].append({**run["timings"], "peak": run["peak_rss_mib"], "backend": run.get("backend")})
            print(f"  round {rnd}: {label}: total {run['timings']['total_s']:.1f} s, ran {run.get('backend')}",
                  file=sys.stderr, flush=True)

    def read(i: int, name: str) -> np.ndarray:
        with rasterio.open(work / f"out{i}" / name) as src:
            return src.read(1)

    ref_p, ref_m = read(0, "change_probability.tif"), read(0, "change_mask.tif")
    base = runs[next(iter(configs))]
    print(f"\n{source}, {args.size} x {args.size}, {args.threads} threads, {args.rounds} rounds (after one that "
          f"fills the export cache), fresh processes alternating; speed-up = median over rounds of baseline / this")
    print("| configuration | ran | total s | speed-up (total) | compute s | speed-up (compute) | peak RSS MiB | "
          "max prob diff | mask agreement % |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, (label, rs) in enumerate(runs.items()):
        tot = [b["total_s"] / r["total_s"] for b, r in zip(base, rs, strict=True)]
        comp = [b["compute_s"] / r["compute_s"] for b, r in zip(base, rs, strict=True)]
        prob, mask = read(i, "change_probability.tif"), read(i, "change_mask.tif")
        diff = float(np.nanmax(np.abs(prob.astype(np.float64) - ref_p)))
        print(f"| {label} | {rs[-1]['backend']} | {median([r['total_s'] for r in rs]):.1f} | {median(tot):.2f} "
              f"({', '.join(f'{x:.2f}' for x in tot)}) | {median([r['compute_s'] for r in rs]):.1f} | "
              f"{median(comp):.2f} | {max(r['peak'] for r in rs):.0f} | {diff:.1e} | "
              f"{float(np.mean(mask == ref_m)) * 100:.4f} |")


if __name__ == "__main__":
    main()
