"""Is CMID pretraining worth it here? One fixed fine-tuning protocol from four starting points.

Variants (FSG-Net fine-tuned identically: same labelled train/val split, epochs, seed, normalisation, threshold
calibration on val, then scored on held-out labelled pairs):

  (a) random   ResNet-18, random initialisation
  (b) cmid     ResNet-18, CMID-pretrained here on the unlabelled imagery
  (c) imagenet EfficientNet-Lite0, packaged ImageNet weights
  (d) imagenet+cmid  EfficientNet-Lite0, ImageNet weights then CMID continued on the same imagery

Data (all from ``../shared/data``):

- held out (seen by neither pretraining nor fine-tuning): the 3 LEVIR-CD 1024x1024 full tiles (and the two 256
  crops cut from them are left out everywhere) and two SZTAKI pairs (``Szada/2``, ``Tiszadob/1``);
- fine-tuning: the other LEVIR-CD crops, DSIFN-CD, the other SZTAKI pairs and LEVIR ``train_14`` (SZTAKI BMPs are
  converted to GeoTIFF, labels thresholded at > 127), split into train and val per image;
- pretraining (unlabelled, both dates as separate images): every image of every set except the held-out ones -
  LEVIR crops and the odd RGBA pair, DSIFN, SZTAKI, LEVIR ``train_14``, the rasterio Landsat-7 scene (nodata
  collar), and the OSCD and Landsat Taizhou scenes as their RGB quick-looks (``pair/img*.png``, ``*.jpg``: one
  model takes one band count, and the 13-band OSCD bands come at three resolutions).

Every variant is fine-tuned with the normalisation measured by the pretraining run (the same for all four).
Runs unchanged on CUDA (``--device auto`` picks it; ``--preset gpu`` for the GPU-sized CMID configuration).

    python benchmarks/pretrain_value.py --work /tmp/pv           # small CPU version (see RESULTS.md)
    python benchmarks/pretrain_value.py --preset gpu --pretrain-epochs 100 --finetune-epochs 100  # on a GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LEAKED_CROPS = {"test_102_0512_0000", "test_7_0256_0512"}  # LEVIR crops cut from the held-out full tiles
HELD_OUT_SZTAKI = ("Szada/2", "Tiszadob/1")
VARIANTS = {
    "random": ("resnet18", None),
    "cmid": ("resnet18", "cmid"),
    "imagenet": ("efficientnet_lite0", None),
    "imagenet+cmid": ("efficientnet_lite0", "cmid"),
}


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


def _to_tif(src: Path, dst: Path, label: bool = False) -> None:
    import numpy as np
    import rasterio

    from cdmap.data import no_georef_warning

    dst.parent.mkdir(parents=True, exist_ok=True)
    with no_georef_warning(), rasterio.open(src) as s:
        data = s.read()[:1] if label else s.read()
    if label:
        data = (data > 127).astype(np.uint8)
    with no_georef_warning(), rasterio.open(dst, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                                            count=data.shape[0], dtype=data.dtype) as d:
        d.write(data)


def build_sets(root: Path, work: Path, seed: int = 0) -> tuple[list[Path], dict[str, int]]:
    """Write ``work/test`` (held out), ``work/finetune/{train,val}``; return the pretraining images and counts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lv_dir, ds_dir = root / "levircd_bitcd_samples", root / "dsifn_changeformer_samples"
    full_dir, sz_dir = root / "levircd_fulltile_ucdscm", root / "sztaki_airchange"
    levir = sorted(p.stem for p in (lv_dir / "label").glob("*.png") if p.stem not in LEAKED_CROPS)
    dsifn = sorted(p.stem for p in (ds_dir / "label").glob("*.png"))
    sztaki = sorted(str(p.parent.relative_to(sz_dir)) for p in sz_dir.glob("**/im1.*"))
    sz_train = [s for s in sztaki if s not in HELD_OUT_SZTAKI]
    lv = [levir[i] for i in rng.permutation(len(levir))]
    ds = [dsifn[i] for i in rng.permutation(len(dsifn))]
    sz = [sz_train[i] for i in rng.permutation(len(sz_train))]

    def sztaki_pair(name: str, split_dir: Path) -> None:
        folder = sz_dir / name
        files = {p.stem.lower(): p for p in folder.iterdir()}
        stem = "sztaki_" + name.replace("/", "_")
        _to_tif(files["im1"], split_dir / "A" / f"{stem}.tif")
        _to_tif(files["im2"], split_dir / "B" / f"{stem}.tif")
        _to_tif(files["gt"], split_dir / "label" / f"{stem}.tif", label=True)

    def png_pair(folder: Path, stem: str, split_dir: Path, prefix: str) -> None:
        for sub in ("A", "B", "label"):
            _link(folder / sub / f"{stem}.png", split_dir / sub / f"{prefix}_{stem}.png")

    test, train, val = work / "test", work / "finetune" / "train", work / "finetune" / "val"
    for stem in sorted(p.stem for p in (full_dir / "label").glob("*.png")):
        png_pair(full_dir, stem, test, "levirfull")
    for name in HELD_OUT_SZTAKI:
        sztaki_pair(name, test)
    for i, stem in enumerate(lv):
        png_pair(lv_dir, stem, val if i < 4 else train, "levir")
    for i, stem in enumerate(ds):
        png_pair(ds_dir, stem, val if i < 4 else train, "dsifn")
    for i, name in enumerate(sz):
        sztaki_pair(name, val if i < 2 else train)
    png_pair(root / "levircd_iaug_train14", "train_14", train, "levir")

    unlabelled = [lv_dir / d / f"{s}.png" for s in levir for d in ("A", "B")]
    unlabelled += sorted((lv_dir / "extras_unlabeled").glob("*/*.png"))
    unlabelled += [ds_dir / d / f"{s}.png" for s in dsifn for d in ("A", "B")]
    unlabelled += [p for s in sz_train for p in sorted((sz_dir / s).iterdir()) if p.stem.lower() in ("im1", "im2")]
    unlabelled += [root / "levircd_iaug_train14" / d / "train_14.png" for d in ("A", "B")]
    unlabelled += [root / "geotiff_reference_rasterio" / "RGB.byte.tif"]
    unlabelled += sorted((root / "oscd_sentinel2").glob("*/pair/img*.png"))
    unlabelled += sorted((root / "landsat_taizhou").glob("*/*.jpg"))
    counts = {"pretrain_images": len(unlabelled), "finetune_train": len(list((train / "A").iterdir())),
              "finetune_val": len(list((val / "A").iterdir())), "test": len(list((test / "A").iterdir()))}
    return unlabelled, counts


def _summary(history: list[dict], backbone_pt: Path, wall: float) -> dict:
    first, last = history[0], history[-1]
    return {"backbone_pt": str(backbone_pt), "wall_s": wall, "epochs": len(history),
            "images_seen": int(sum(r["images_per_s"] * r["seconds"] for r in history)),
            "loss_first": first["loss"], "loss_last": last["loss"], "mim_first": first["mim_spatial"],
            "mim_last": last["mim_spatial"], "feature_std_last": last["feature_std"],
            "images_per_s": sum(r["images_per_s"] for r in history) / len(history)}


def run_pretraining(images: list[Path], out: Path, backbone: str, init: str | None, args) -> dict:
    from cdmap.pretrain import PretrainConfig, PretrainRuntime, pretrain

    if args.reuse and (out / "last.pt").exists():  # a finished earlier run: its history and wall time
        import torch

        state = torch.load(out / "last.pt", weights_only=True)
        if state["epoch"] == state["config"]["epochs"]:
            history = state["history"]
            return _summary(history, out / "backbone.pt", sum(r["seconds"] for r in history))

    overrides = {"backbone": backbone, "init": init, "epochs": args.pretrain_epochs, "seed": args.seed}
    if args.samples_per_epoch:
        overrides["samples_per_epoch"] = args.samples_per_epoch
    if args.pretrain_batch:
        overrides["batch_size"] = args.pretrain_batch
    cfg = PretrainConfig.preset(args.preset, **overrides)
    t0 = time.perf_counter()
    result = pretrain(images, out, cfg, PretrainRuntime(workers=args.workers, device=args.device, quiet=True,
                                                        overwrite=True))
    return _summary(result.history, result.backbone_path, time.perf_counter() - t0)


def finetune_and_score(work: Path, name: str, backbone: str, weights: str | None, mean, std, args) -> dict:
    from cdmap.evaluate import evaluate_tiles
    from cdmap.train import TrainConfig, TrainRuntime, train

    cfg = TrainConfig(epochs=args.finetune_epochs, batch_size=args.batch_size, effective_batch=args.batch_size,
                      crop_size=args.crop_size, seed=args.seed, backbone=backbone, backbone_weights=weights,
                      imagenet=backbone == "efficientnet_lite0", mean=list(mean), std=list(std))
    run = work / "runs" / name.replace("+", "_")
    t0 = time.perf_counter()
    result = train(work / "finetune", run, cfg, TrainRuntime(workers=args.workers, device=args.device, quiet=True,
                                                             overwrite=True))
    wall = time.perf_counter() - t0
    scores, counts = {}, {"tp": 0, "fp": 0, "fn": 0}
    for subset in ("test_levir", "test_sztaki"):  # every held-out pair once; the total from the summed counts
        m = evaluate_tiles(work / subset, result.best_path, device=args.device, workers=0, progress=False).metrics
        scores[subset] = {k: float(m[k]) for k in ("precision", "recall", "f1", "iou")}
        counts = {k: counts[k] + int(m[k]) for k in counts}
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    scores["test"] = {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
                      "f1": 2 * tp / max(2 * tp + fp + fn, 1), "iou": tp / max(tp + fp + fn, 1)}
    return {"variant": name, "backbone": backbone, "finetune_wall_s": wall, "best_epoch": result.best_epoch,
            "val_f1_calibrated": result.best_f1, "threshold": result.threshold, **scores}


def _subsets(work: Path) -> None:
    for prefix, sub in (("levirfull_", "test_levir"), ("sztaki_", "test_sztaki")):
        for p in sorted((work / "test" / "A").iterdir()):
            if p.name.startswith(prefix):
                for d in ("A", "B", "label"):
                    _link((work / "test" / d / p.name).resolve(), work / sub / d / p.name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=None, help="Keep data and runs here (default: a temp dir).")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated subset of {list(VARIANTS)}.")
    ap.add_argument("--preset", default="cpu", help="CMID configuration: cpu or gpu.")
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--samples-per-epoch", type=int, default=384, help="CMID windows per epoch (0: all).")
    ap.add_argument("--pretrain-batch", type=int, default=0, help="CMID batch (0: the preset's).")
    ap.add_argument("--finetune-epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=2025)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reuse", action="store_true", help="Reuse finished CMID runs in WORK/cmid (their wall time).")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variant(s) {sorted(unknown)}")
    if not args.data_root.is_dir():
        print(f"no data at {args.data_root}", file=sys.stderr)
        return 2
    tmp = None
    work = args.work or Path(tmp := tempfile.mkdtemp(prefix="cdmap_pv_"))
    for sub in ("test", "test_levir", "test_sztaki", "finetune"):
        shutil.rmtree(work / sub, ignore_errors=True)
    t_all = time.perf_counter()
    try:
        images, counts = build_sets(args.data_root, work, args.seed)
        _subsets(work)
        pre: dict[str, dict] = {}
        for backbone in dict.fromkeys(b for v, (b, how) in VARIANTS.items() if v in variants and how == "cmid"):
            init = "imagenet" if backbone == "efficientnet_lite0" else None
            pre[backbone] = run_pretraining(images, work / "cmid" / backbone, backbone, init, args)
            logging.info("CMID %s: %s", backbone, json.dumps(pre[backbone]))
        from cdmap.pretrain import PretrainConfig, load_pretrained

        if pre:
            norm = load_pretrained(next(iter(pre.values()))["backbone_pt"])["normalization"]
        else:  # no pretraining asked: measure the statistics the same way, without training
            from cdmap.pretrain.sources import find_images, measure, open_sources

            cfg = PretrainConfig.preset(args.preset, seed=args.seed)
            sources = open_sources(find_images(images), cfg.crop_size)
            norm = dict(zip(("mean", "std"), measure(sources, cfg.window, cfg.stats_windows, cfg.min_valid,
                                                     cfg.seed), strict=True))
        rows = []
        for v in variants:
            backbone, how = VARIANTS[v]
            weights = pre[backbone]["backbone_pt"] if how == "cmid" else None
            rows.append(finetune_and_score(work, v, backbone, weights, norm["mean"], norm["std"], args))
            logging.info("%s: %s", v, json.dumps(rows[-1]))
        report = {"counts": counts, "pretraining": pre, "variants": rows, "args": {k: str(a) for k, a in
                                                                                  vars(args).items()},
                  "total_wall_s": time.perf_counter() - t_all}
        print(json.dumps(report, indent=2))
        print("\n| variant | backbone | pretrain s | fine-tune s | val F1 | test P | test R | test F1 | test IoU "
              "| LEVIR F1 | SZTAKI F1 |\n|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            p = pre.get(r["backbone"]) if VARIANTS[r["variant"]][1] == "cmid" else None
            t = r["test"]
            print(f"| {r['variant']} | {r['backbone']} | {p['wall_s']:.0f} |" if p else
                  f"| {r['variant']} | {r['backbone']} | - |", end="")
            print(f" {r['finetune_wall_s']:.0f} | {r['val_f1_calibrated']:.3f} | {t['precision']:.3f} | "
                  f"{t['recall']:.3f} | {t['f1']:.3f} | {t['iou']:.3f} | {r['test_levir']['f1']:.3f} | "
                  f"{r['test_sztaki']['f1']:.3f} |")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
