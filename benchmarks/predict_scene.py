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

Backends (``--backends``): every backend x precision of :class:`cdmap.inference.Predictor` end to end, in one
run, configurations interleaved round by round, each in a fresh process, against today's unchanged ``cdmap
predict`` (torch fp32, the network as built from the checkpoint: NCHW, BatchNorm unfolded). To time each
backend in the same warm process, the driver runs the real ``cdmap.predict.predict_scene`` (reads, blending,
rasters, polygons, run.json) with the network replaced by a shim that calls ``Predictor.probability`` of the
chosen backend/precision (returning log-probabilities, so predict's softmax gives back the same P(change)).
Printed per configuration: end-to-end speed-up, setup (export/compile/check, cold cache), end-to-end /
model-only in the same process, and max P(change) difference and change-mask agreement with the torch fp32 run
(float32 probability output). All configurations run in one process, whole runs interleaved round by round, so
a shared machine's load drifts hit them alike::

    python benchmarks/predict_scene.py --size 1024 --backends --model best.pt --threads 1 --rounds 5
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
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
cfg = json.loads(sys.argv[2])
os.environ["CDMAP_CACHE_DIR"] = cfg["cache"]
if cfg["tune_malloc"]:
    from cdmap.allocator import tune_allocator
    assert tune_allocator()
import numpy as np, torch
torch.set_num_threads(cfg["threads"])
from cdmap.checkpoint import Checkpoint, load_checkpoint
from cdmap.backends import torch_backend
from cdmap.inference import Predictor
from cdmap.predict import predict_scene
ckpt = load_checkpoint(cfg["model"])
tile, bsz = cfg["tile"], cfg["batch"]
z = np.zeros((bsz, ckpt.in_channels, tile, tile), np.float32)
rng = np.random.default_rng(0)
xa = rng.standard_normal(z.shape, dtype=np.float32)
xb = rng.standard_normal(z.shape, dtype=np.float32)
original_build = Checkpoint.build_model
current = {}

class Shim(torch.nn.Module):
    def forward(self, a, b):
        p = current["pred"].probability(a, b).clamp(1e-7, 1 - 1e-7)
        return torch.stack((torch.log1p(-p), torch.log(p)), dim=1)

preds, setup = [], []
for c in cfg["configs"]:
    if c["backend"] == "unchanged":
        preds.append(None)
        setup.append(0.0)
        continue
    t0 = time.perf_counter()
    torch_backend.FOLD_BATCHNORM = not c.get("unfolded")
    pred = Predictor.from_checkpoint(ckpt, "cpu", c["precision"], backend=c["backend"])
    torch_backend.FOLD_BATCHNORM = True
    pred.probability(z, z)  # export / compile / check for the tile shape (cold cache: this run pays it)
    setup.append(time.perf_counter() - t0)
    preds.append(pred)

def unchanged_model(a, b, net=[]):
    if not net:
        net.append(original_build(ckpt, "cpu"))
    with torch.inference_mode():
        return torch.softmax(net[0](torch.from_numpy(a), torch.from_numpy(b)), 1)[:, 1]

e2e = [[] for _ in preds]
model = [[] for _ in preds]
for rnd in range(cfg["rounds"]):
    for i, (c, pred) in enumerate(zip(cfg["configs"], preds)):
        # predict_scene's own predictor runs plain torch: the shim (or the reference network) is what it runs
        kw = dict(tile_size=tile, overlap=cfg["overlap"], batch_size=bsz, device="cpu", overwrite=True, quiet=True,
                  prob_dtype="float32", workers=cfg["workers"], backend="torch")
        torch_backend.FOLD_BATCHNORM = torch_backend.CPU_CHANNELS_LAST = pred is not None
        if pred is None:  # the reference: the network as built from the checkpoint (NCHW, BatchNorm unfolded)
            Checkpoint.build_model = original_build
            kw["precision"] = c["precision"]
            run = unchanged_model
        else:
            current["pred"] = pred
            Checkpoint.build_model = lambda self, device=None: Shim()
            kw["precision"] = "fp32"  # the predictor applies its precision itself
            run = pred.probability
        t = time.perf_counter()
        predict_scene(cfg["before"], cfg["after"], os.path.join(cfg["work"], f"out{i}"), cfg["model"], **kw)
        e2e[i].append(time.perf_counter() - t)
        run(xa, xb)
        t = time.perf_counter()
        for _ in range(max(1, cfg["sample"] // bsz)):
            run(xa, xb)
        model[i].append((time.perf_counter() - t) / (max(1, cfg["sample"] // bsz) * bsz) * cfg["windows"])
        print(f"  round {rnd + 1}: {c['label']}: e2e {e2e[i][-1]:.1f} s, model-only {model[i][-1]:.1f} s",
              file=sys.stderr, flush=True)
print(json.dumps({"e2e_s": e2e, "model_scene_s": model, "setup_s": setup}))
"""

BACKEND_CONFIGS = [
    ("cdmap predict unchanged (torch fp32, today)", "unchanged", "fp32"),
    ("Predictor torch fp32 (channels_last), BatchNorm unfolded (the default before BN folding)", "torch", "fp32",
     "unfolded"),
    ("Predictor torch fp32 (channels_last, BatchNorm folded)", "torch", "fp32"),
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
    configs = [dict(label=label, backend=be, precision=prec, unfolded="unfolded" in rest)
               for n, (label, be, prec, *rest) in enumerate(BACKEND_CONFIGS)
               if (be in ("unchanged", "torch", "auto") or backends.installed(be))
               and (n == 0 or not args.only or any(key in label for key in args.only))]
    cfg = dict(configs=configs, model=str(args.model), tile=args.tile, overlap=overlap, batch=args.batch_size,
               threads=args.threads, workers=args.workers, cache=str(work / "cache"), before=str(before),
               after=str(after), work=str(work), sample=args.sample, windows=len(grid), rounds=args.rounds,
               tune_malloc=args.tune_malloc)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(HERE.parent), json.dumps(cfg)], stdout=subprocess.PIPE,
                          text=True, env=env, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])

    def read(i: int, name: str) -> np.ndarray:
        with rasterio.open(work / f"out{i}" / name) as src:
            return src.read(1)

    ref_i = 0  # today's unchanged torch fp32 run
    ref_p, ref_m = read(ref_i, "change_probability.tif"), read(ref_i, "change_mask.tif")
    base = res["e2e_s"][0]
    print(f"\nscene {args.size}x{args.size} ({source}), tile {args.tile}, overlap {overlap}, batch {args.batch_size}, "
          f"{len(grid)} windows, {args.threads} torch/backend thread(s), {args.workers} reader thread(s), "
          f"{os.cpu_count()} CPU cores; malloc {'tuned' if args.tune_malloc else 'glibc default'}; "
          f"all configurations in ONE process (warm), whole predict_scene runs "
          f"interleaved A B C ... for {args.rounds} rounds; speed-up = median over rounds of (unchanged e2e time "
          f"/ this e2e time) in the same round; e2e / model-only = median over rounds of (model-only scene "
          f"time, {args.sample} windows timed right after that run and scaled / e2e time)")
    print("| configuration | e2e speed-up vs today | e2e s (median) | setup s (cold cache) | e2e / model-only | "
          "max prob diff vs torch fp32 | mask agreement % |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, c in enumerate(configs):
        e2e, model = res["e2e_s"][i], res["model_scene_s"][i]
        ratios = sorted(b / t for b, t in zip(base, e2e, strict=True))
        eff = sorted(m / t for m, t in zip(model, e2e, strict=True))
        prob, mask = read(i, "change_probability.tif"), read(i, "change_mask.tif")
        diff = float(np.nanmax(np.abs(prob.astype(np.float64) - ref_p)))
        agree = float(np.mean(mask == ref_m)) * 100
        print(f"| {c['label']} | {ratios[len(ratios) // 2]:.2f} | {sorted(e2e)[len(e2e) // 2]:.1f} | "
              f"{res['setup_s'][i]:.1f} | {eff[len(eff) // 2]:.3f} | {diff:.1e} | {agree:.4f} |")


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
    ap.add_argument("--tune-malloc", action="store_true",
                    help="--backends: the driver process runs with cdmap.tune_allocator() (as the cdmap command)")
    ap.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                    help="--backends: only the configurations whose label contains one of these (plus the baseline)")
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
