"""End-to-end scene throughput of ``cdmap predict`` against model-only throughput and a naive baseline.

    python benchmarks/predict_scene.py --size 8192            # the recorded benchmark
    python benchmarks/predict_scene.py --size 2048 --quick    # a smoke run

Three figures, measured in one run on the same machine:
  * end-to-end: ``predict_scene`` in a fresh subprocess (reads, model, blending, GeoTIFFs, overviews,
    polygons, run.json); MPix/s = scene pixels / wall time; peak RSS of that process;
  * model-only: the network alone on already-normalised in-memory tiles of the same size and batch,
    timed on a sample of windows and scaled to the scene's window count;
  * naive baseline: the whole scene read into memory, one window at a time, plain averaging of the
    overlapping predictions (what most peers do); MPix/s and peak RSS in a fresh subprocess.
Ratios printed: end-to-end / model-only (goal >= 0.9 on CPU) and end-to-end / naive.

Backends (``--backends``): every backend x precision of :class:`cdmap.inference.Predictor` end to end, in
one run, configurations interleaved round by round, each in a fresh process, against today's unchanged
``cdmap predict`` (torch fp32). ``predict_scene`` has no backend option yet, so the driver runs the real
``cdmap.predict.predict_scene`` (reads, blending, rasters, polygons, run.json) with the network replaced by a
shim that calls ``Predictor.probability`` of the chosen backend/precision (returning log-probabilities, so
predict's softmax gives back the same P(change)). Printed per configuration: end-to-end speed-up, setup
(export/compile/check, cold cache in round 1), end-to-end / model-only in the same process, peak RSS, and
max P(change) difference and change-mask agreement with the torch fp32 run (float32 probability output)::

    python benchmarks/predict_scene.py --size 2048 --backends --model best.pt --threads 1 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def make_checkpoint(path: Path, tile: int) -> Path:
    import torch

    from cdmap.checkpoint import Checkpoint, save_checkpoint
    from cdmap.models import FSGNet, ModelConfig

    torch.manual_seed(0)
    model = FSGNet(ModelConfig())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    ckpt = Checkpoint(ModelConfig(), model.state_dict(), [110.0] * 3, [50.0] * 3, tile_size=tile)
    return save_checkpoint(ckpt, path)


def model_only(ckpt_path: Path, tile: int, batch: int, n_windows: int, sample: int, device: str,
               precision: str) -> dict:
    import torch

    from cdmap.checkpoint import load_checkpoint
    from cdmap.device import autocast_dtype, resolve_device, resolve_precision

    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    net = load_checkpoint(ckpt_path).build_model(str(dev))
    dtype = autocast_dtype(prec)
    xa = torch.randn(batch, 3, tile, tile, device=dev)
    xb = torch.randn(batch, 3, tile, tile, device=dev)

    def step():
        amp = torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None)
        with torch.inference_mode(), amp:
            out = torch.softmax(net(xa, xb).float(), 1)[:, 1].cpu()
        return out

    step()
    n_batches = max(1, sample // batch)
    t = time.perf_counter()
    for _ in range(n_batches):
        step()
    per_window = (time.perf_counter() - t) / (n_batches * batch)
    return {"seconds_per_window": per_window, "scene_seconds": per_window * n_windows}


NAIVE = r"""
import sys, time, json, resource
import numpy as np, rasterio, torch
sys.path.insert(0, sys.argv[1])
from cdmap.checkpoint import load_checkpoint
ckpt = load_checkpoint(sys.argv[2]); tile = int(sys.argv[5]); stride = tile - int(sys.argv[6])
t = time.perf_counter()
with rasterio.open(sys.argv[3]) as a, rasterio.open(sys.argv[4]) as b:
    A = a.read().astype(np.float32); B = b.read().astype(np.float32)
m = np.asarray(ckpt.mean, np.float32)[:, None, None]; s = np.asarray(ckpt.std, np.float32)[:, None, None]
A = (A - m) / s; B = (B - m) / s
H, W = A.shape[1:]
acc = np.zeros((H, W), np.float32); cnt = np.zeros((H, W), np.float32)
net = ckpt.build_model("cpu")
rows = list(range(0, max(H - tile, 0) + 1, stride)); cols = list(range(0, max(W - tile, 0) + 1, stride))
if rows[-1] + tile < H: rows.append(H - tile)
if cols[-1] + tile < W: cols.append(W - tile)
with torch.inference_mode():
    for r in rows:
        for c in cols:
            xa = torch.from_numpy(A[None, :, r:r+tile, c:c+tile].copy())
            xb = torch.from_numpy(B[None, :, r:r+tile, c:c+tile].copy())
            p = torch.softmax(net(xa, xb), 1)[0, 1].numpy()
            acc[r:r+tile, c:c+tile] += p; cnt[r:r+tile, c:c+tile] += 1
prob = acc / cnt
with rasterio.open(sys.argv[3]) as ref:
    prof = ref.profile | dict(count=1, dtype="uint8", nodata=None)
with rasterio.open(sys.argv[7], "w", **prof) as dst:
    dst.write(np.rint(prob * 255).astype(np.uint8), 1)
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "windows": len(rows) * len(cols)}))
"""


DRIVER = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
cfg = json.loads(sys.argv[2])
os.environ["CDMAP_CACHE_DIR"] = cfg["cache"]
import numpy as np, torch
torch.set_num_threads(cfg["threads"])
from cdmap.checkpoint import Checkpoint, load_checkpoint
from cdmap.predict import predict_scene
ckpt = load_checkpoint(cfg["model"])
tile, bsz = cfg["tile"], cfg["batch"]
setup = 0.0
kw = dict(tile_size=tile, overlap=cfg["overlap"], batch_size=bsz, device="cpu", overwrite=True, quiet=True,
          prob_dtype="float32", workers=cfg["workers"])
if cfg["backend"] != "unchanged":
    from cdmap.inference import Predictor
    t0 = time.perf_counter()
    pred = Predictor.from_checkpoint(ckpt, "cpu", cfg["precision"], backend=cfg["backend"])
    z = np.zeros((bsz, ckpt.in_channels, tile, tile), np.float32)
    pred.probability(z, z)  # export / compile / check for the tile shape (cached after the first run)
    setup = time.perf_counter() - t0

    class Shim(torch.nn.Module):
        def forward(self, a, b):
            p = pred.probability(a, b).clamp(1e-7, 1 - 1e-7)
            return torch.stack((torch.log1p(-p), torch.log(p)), dim=1)

    Checkpoint.build_model = lambda self, device=None: Shim()
    kw["precision"] = "fp32"  # the predictor applies the precision itself
    run = pred.probability
else:
    kw["precision"] = cfg["precision"]
    net = ckpt.build_model("cpu")
    def run(a, b):
        with torch.inference_mode():
            return torch.softmax(net(torch.from_numpy(a), torch.from_numpy(b)), 1)[:, 1]
t = time.perf_counter()
res = predict_scene(cfg["before"], cfg["after"], cfg["out"], cfg["model"], **kw)
e2e = time.perf_counter() - t
rng = np.random.default_rng(0)
xa = rng.standard_normal((bsz, ckpt.in_channels, tile, tile), dtype=np.float32)
xb = rng.standard_normal(xa.shape, dtype=np.float32)
run(xa, xb)
n = max(1, cfg["sample"] // bsz)
t = time.perf_counter()
for _ in range(n):
    run(xa, xb)
per_window = (time.perf_counter() - t) / (n * bsz)
summary = json.loads((__import__("pathlib").Path(cfg["out"]) / "run.json").read_text())
print(json.dumps({"e2e_s": e2e, "setup_s": setup, "model_scene_s": per_window * cfg["windows"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "run_peak_rss_mib": summary.get("peak_rss_mib")}))
"""

BACKEND_CONFIGS = [
    ("cdmap predict unchanged (torch fp32, today)", "unchanged", "fp32"),
    ("Predictor torch fp32", "torch", "fp32"),
    ("Predictor torch bf16", "torch", "bf16"),
    ("Predictor onnxruntime fp32", "onnxruntime", "fp32"),
    ("Predictor openvino fp32", "openvino", "fp32"),
    ("Predictor openvino bf16", "openvino", "bf16"),
    ("Predictor auto fp32", "auto", "fp32"),
]


def backends_main(args, before: Path, after: Path, work: Path, source: str, overlap: int) -> None:
    import numpy as np
    import rasterio

    from cdmap import backends
    from cdmap.tiling import WindowGrid

    if args.model is None:
        raise SystemExit("--backends needs --model (a trained checkpoint: the masks are compared)")
    grid = WindowGrid(args.size, args.size, args.tile, overlap)
    cache = work / "cache"
    configs = [c for c in BACKEND_CONFIGS if c[1] in ("unchanged", "torch", "auto") or backends.installed(c[1])]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS=str(args.threads))
    runs: list[list[dict]] = [[] for _ in configs]
    for rnd in range(args.rounds):
        for i, (label, be, prec) in enumerate(configs):
            cfg = dict(backend=be, precision=prec, model=str(args.model), tile=args.tile, overlap=overlap,
                       batch=args.batch_size, threads=args.threads, workers=args.workers, cache=str(cache),
                       before=str(before), after=str(after), out=str(work / f"out{i}"), sample=args.sample,
                       windows=len(grid))
            proc = subprocess.run([sys.executable, "-c", DRIVER, str(HERE.parent), json.dumps(cfg)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                runs[i].append({"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]})
            else:
                runs[i].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = runs[i][-1]
            print(f"  round {rnd + 1}: {label}: " + (r.get("error") or
                  f"e2e {r['e2e_s']:.1f} s, setup {r['setup_s']:.1f} s, model-only {r['model_scene_s']:.1f} s"),
                  file=sys.stderr, flush=True)

    def read(i: int, name: str) -> np.ndarray:
        with rasterio.open(work / f"out{i}" / name) as src:
            return src.read(1)

    ref_i = next(i for i, c in enumerate(configs) if c[1] == "torch" and c[2] == "fp32")
    ref_p, ref_m = read(ref_i, "change_probability.tif"), read(ref_i, "change_mask.tif")
    base = [r.get("e2e_s") for r in runs[0]]
    print(f"\nscene {args.size}x{args.size} ({source}), tile {args.tile}, overlap {overlap}, batch {args.batch_size}, "
          f"{len(grid)} windows, {args.threads} torch/backend thread(s), {args.workers} reader thread(s), "
          f"{args.rounds} round(s), {os.cpu_count()} CPU cores; speed-up = median over rounds of "
          f"(unchanged e2e time / this e2e time) in the same round")
    print("| configuration | e2e speed-up vs today | e2e s (best) | setup s (round 1 / later) | "
          "e2e / model-only | peak RSS MiB | max prob diff vs torch fp32 | mask agreement % |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, ((label, _be, _prec), cruns) in enumerate(zip(configs, runs, strict=True)):
        ok = [r for r in cruns if "error" not in r]
        if not ok:
            print(f"| {label} | error: {cruns[-1]['error']} | | | | | | |")
            continue
        ratios = sorted(b / r["e2e_s"] for b, r in zip(base, cruns, strict=True) if b and "error" not in r)
        best = min(r["e2e_s"] for r in ok)
        model_ratio = min(r["model_scene_s"] / r["e2e_s"] for r in ok[-1:])  # the warm round
        prob, mask = read(i, "change_probability.tif"), read(i, "change_mask.tif")
        diff = float(np.nanmax(np.abs(prob.astype(np.float64) - ref_p)))
        agree = float(np.mean(mask == ref_m)) * 100
        setups = " / ".join(f"{r['setup_s']:.1f}" for r in ok[:2])
        print(f"| {label} | {ratios[len(ratios) // 2]:.2f} | {best:.1f} | {setups} | {model_ratio:.3f} | "
              f"{max(r['peak_rss_mib'] for r in ok):.0f} | {diff:.1e} | {agree:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192, help="scene side in pixels (>= 8192 for the record)")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=None, help="default: cdmap's default for the tile")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: random weights; speed only)")
    ap.add_argument("--sample", type=int, default=48, help="windows timed for the model-only figure")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="small sample for a smoke run")
    ap.add_argument("--backends", action="store_true",
                    help="every backend x precision end to end through Predictor (needs --model)")
    ap.add_argument("--threads", type=int, default=1, help="--backends: torch/backend threads")
    ap.add_argument("--workers", type=int, default=2, help="--backends: reader threads")
    ap.add_argument("--rounds", type=int, default=2, help="--backends: interleaved rounds")
    args = ap.parse_args()

    from cdmap.predict import default_overlap
    from cdmap.tiling import WindowGrid

    overlap = default_overlap(args.tile) if args.overlap is None else args.overlap
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cdmap-bench-"))
    t = time.perf_counter()
    before, after, source = __import__("_scenes").build_scene(work / "scene", args.size)
    print(f"scene {args.size}x{args.size} from {source} built in {time.perf_counter() - t:.1f} s", flush=True)
    if args.backends:
        backends_main(args, before, after, work, source, overlap)
        return
    ckpt = args.model or make_checkpoint(work / "bench.pt", args.tile)
    grid = WindowGrid(args.size, args.size, args.tile, overlap)
    mpix = args.size * args.size / 1e6

    mo = model_only(ckpt, args.tile, args.batch_size, len(grid), 8 if args.quick else args.sample, args.device,
                    args.precision)
    print(f"model-only: {mo['seconds_per_window'] * 1000:.1f} ms/window, {len(grid)} windows", flush=True)

    out = work / "out"
    cmd = [sys.executable, "-m", "cdmap", "predict", str(before), str(after), "-o", str(out), "--model", str(ckpt),
           "--tile-size", str(args.tile), "--overlap", str(overlap), "--batch-size", str(args.batch_size),
           "--device", args.device, "--precision", args.precision, "--overwrite", "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    e2e_s = time.perf_counter() - t
    summary = json.loads((out / "run.json").read_text())

    naive = None
    if not args.no_naive and summary["device"] == "cpu":
        proc = subprocess.run([sys.executable, "-c", NAIVE, str(HERE.parent), str(ckpt), str(before), str(after),
                               str(args.tile), str(overlap), str(work / "naive.tif")],
                              check=True, capture_output=True, text=True, env=env)
        naive = json.loads(proc.stdout.strip().splitlines()[-1])

    e2e = mpix / e2e_s
    model = mpix / mo["scene_seconds"]
    rows = [
        ("end-to-end cdmap predict", f"{e2e:.3f}", f"{summary['peak_rss_mib']:.0f}", f"{e2e_s:.1f}"),
        ("model only (same tiles, batch)", f"{model:.3f}", "-", f"{mo['scene_seconds']:.1f}"),
    ]
    if naive:
        rows.append(("naive: whole scene in RAM, 1 tile at a time, plain mean", f"{mpix / naive['seconds']:.3f}",
                     f"{naive['peak_rss_mib']:.0f}", f"{naive['seconds']:.1f}"))
    print(f"\nscene {args.size}x{args.size} ({source}), tile {args.tile}, overlap {overlap}, batch {args.batch_size},"
          f" device {summary['device']}, precision {summary['precision']}, {os.cpu_count()} CPU cores")
    print(f"{'pipeline':58s} {'MPix/s':>8s} {'peak RSS MiB':>13s} {'seconds':>8s}")
    for r in rows:
        print(f"{r[0]:58s} {r[1]:>8s} {r[2]:>13s} {r[3]:>8s}")
    print(f"ratio end-to-end / model-only: {e2e / model:.3f}")
    if naive:
        print(f"ratio end-to-end / naive: {e2e / (mpix / naive['seconds']):.3f} (speed), "
              f"peak RSS naive / cdmap: {naive['peak_rss_mib'] / summary['peak_rss_mib']:.2f}")
    print(f"seam ratio {summary['seam_ratio']}, timings {summary['timings']}")
    print(f"peak RSS of this driver process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
