"""Short training run on the real LEVIR-CD and DSIFN-CD samples in ../shared/data (a pipeline benchmark).

Builds a temporary LEVIR-layout folder of symlinks, split per image:

- train: the 3 LEVIR-CD 1024x1024 tiles (random 256 crops), 5 of the LEVIR-CD 256 crops, 6 DSIFN-CD pairs;
- val: the other 4 LEVIR-CD 256 crops and 4 DSIFN-CD pairs (whole tiles, native resolution).

The two LEVIR crops cut from the 1024 tiles used for training (``test_102_0512_0000``, ``test_7_0256_0512``) are
left out, so nothing in val is seen in training. Trains with ``cdmap.train.train`` and reports validation
P/R/F1/IoU (overall and per data set, via ``cdmap.evaluate.evaluate_tiles``) and training throughput.

This is a smoke-scale benchmark (about 20 tiles, a few CPU minutes): its F1 says nothing about LEVIR-CD results.

    python benchmarks/train_real.py --epochs 8 --backbone resnet18
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LEAKED_CROPS = {"test_102_0512_0000", "test_7_0256_0512"}  # crops of the 1024 tiles used in train


def build_layout(data_root: Path, out: Path, seed: int) -> dict[str, list[str]]:
    import numpy as np

    levir = sorted(p.stem for p in (data_root / "levircd_bitcd_samples" / "label").glob("*.png"))
    levir = [n for n in levir if n not in LEAKED_CROPS]
    dsifn = sorted(p.stem for p in (data_root / "dsifn_changeformer_samples" / "label").glob("*.png"))
    full = sorted(p.stem for p in (data_root / "levircd_fulltile_ucdscm" / "label").glob("*.png"))
    rng = np.random.default_rng(seed)
    lv = [levir[i] for i in rng.permutation(len(levir))]
    ds = [dsifn[i] for i in rng.permutation(len(dsifn))]
    plan = {
        "train": [("levircd_fulltile_ucdscm", n, f"levirfull_{n}") for n in full]
        + [("levircd_bitcd_samples", n, f"levir_{n}") for n in lv[4:]]
        + [("dsifn_changeformer_samples", n, f"dsifn_{n}") for n in ds[4:]],
        "val": [("levircd_bitcd_samples", n, f"levir_{n}") for n in lv[:4]]
        + [("dsifn_changeformer_samples", n, f"dsifn_{n}") for n in ds[:4]],
    }
    names: dict[str, list[str]] = {}
    for split, items in plan.items():
        names[split] = []
        for folder, stem, name in items:
            for sub in ("A", "B", "label"):
                dst = out / split / sub / f"{name}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(data_root / folder / sub / f"{stem}.png", dst)
            names[split].append(name)
    # per-data-set val folders for separate scores
    for prefix in ("levir", "dsifn"):
        for name in names["val"]:
            if name.startswith(prefix + "_"):
                for sub in ("A", "B", "label"):
                    dst = out / f"val_{prefix}" / sub / f"{name}.png"
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink((out / "val" / sub / f"{name}.png").resolve(), dst)
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=None, help="Keep the data and run here (default: a temp dir).")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop-size", type=int, default=256)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--backbone-lr", type=float, default=1e-4)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = ap.parse_args(argv)

    import torch

    from cdmap.evaluate import evaluate_tiles
    from cdmap.train import TrainConfig, train

    if not (args.data_root / "levircd_bitcd_samples").is_dir():
        print(f"real data not found under {args.data_root}", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="cdmap-train-bench-"))
    if (work / "data").exists():
        shutil.rmtree(work / "data")
    if (work / "run").exists():
        shutil.rmtree(work / "run")
    names = build_layout(args.data_root, work / "data", args.seed)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, effective_batch=args.batch_size,
                      crop_size=args.crop_size, backbone=args.backbone, lr=args.lr, backbone_lr=args.backbone_lr,
                      seed=args.seed)
    t0 = time.perf_counter()
    result = train(work / "data", work / "run", cfg, workers=args.workers, device="cpu", val_batch_size=4)
    wall = time.perf_counter() - t0
    evals = {}
    for key, folder in (("val", "val"), ("val_levir", "val_levir"), ("val_dsifn", "val_dsifn")):
        for thr_name, thr in (("calibrated", None), ("0.5", 0.5)):
            r = evaluate_tiles(work / "data" / folder, result.best_path, device="cpu", threshold=thr)
            evals[f"{key}@{thr_name}"] = {k: round(v, 4) if isinstance(v, float) else v
                                          for k, v in r.metrics.items()} | {"threshold": round(r.threshold, 4)}
    rates = [row["pairs_per_s"] for row in result.history]
    out = {
        "command": "python benchmarks/train_real.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "train_pairs": len(names["train"]), "val_pairs": len(names["val"]),
        "epochs": args.epochs, "best_epoch": result.best_epoch, "threshold": round(result.threshold, 4),
        "wall_s": round(wall, 1),
        "pairs_per_s_mean": round(sum(rates) / len(rates), 3),
        "pairs_per_s_after_first": round(sum(rates[1:]) / max(1, len(rates) - 1), 3),
        "history": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                    for row in result.history],
        "eval": evals,
        "names": names,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
