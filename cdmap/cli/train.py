"""``cdmap train``, ``cdmap evaluate`` and ``cdmap tiles``: thin layers over :mod:`cdmap.train` and
:mod:`cdmap.evaluate`. Heavy modules are imported inside the commands."""

from __future__ import annotations

from pathlib import Path

import typer

from cdmap.cli import options
from cdmap.cli.app import app
from cdmap.cli.options import BatchSize, Device, Overwrite, Precision, Quiet, Threshold, TileSize, Workers
from cdmap.models.config import BACKBONES, DEFAULT_BACKBONE, backbone_names


def parse_floats(value: str | None, option: str) -> list[float] | None:
    """``"0.1,0.2"`` -> ``[0.1, 0.2]``."""
    from cdmap.errors import UsageError

    if value is None:
        return None
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"{option} expects comma-separated numbers, got {value!r}") from exc
    if not out:
        raise UsageError(f"{option} expects comma-separated numbers, got {value!r}")
    return out


@app.command("train")
def train_cmd(
    data: list[Path] | None = typer.Argument(
        None, help="DATA/{train,val,test}/{A,B,label}/ or DATA/{A,B,label}/; several folders are trained on "
        "together."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Run folder (metrics.csv, best.pt, last.pt)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the run in this folder from last.pt."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (cosine schedule length) (default: 100)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate of the non-backbone parts (default: 1e-3)."),
    backbone_lr: float | None = typer.Option(None, "--backbone-lr", help="Backbone learning rate (default: 1e-4)."),
    min_lr: float | None = typer.Option(None, "--min-lr", help="Cosine floor (default: 1e-6)."),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="AdamW weight decay (default: 0.01)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Pairs per step and process (default: 32)."),
    effective_batch: int | None = typer.Option(
        None, "--effective-batch", help="Pairs per optimiser update; more than the batch size accumulates "
        "gradients (default: the batch size, no accumulation)."),
    crop_size: int | None = typer.Option(None, "--crop-size", help="Random crop size, never resized (default: 256)."),
    workers: Workers = None,
    seed: int | None = typer.Option(None, "--seed", help="Seed of weights, data order, augmentation (default: 2025)."),
    backbone: str | None = typer.Option(
        None, "--backbone", metavar="NAME",
        help=f"One of {backbone_names()} (default: {DEFAULT_BACKBONE})."),
    backbone_weights: Path | None = typer.Option(
        None, "--backbone-weights", help="Backbone weights: a torchvision-style state dict (ImageNet) or a "
        "`cdmap pretrain` backbone.pt, whose normalisation is used unless --mean/--std are given."),
    init_from: Path | None = typer.Option(
        None, "--init-from", metavar="PRETRAIN_RUN", help="Start from a `cdmap pretrain` run's backbone.pt (the "
        "same as --backbone-weights PRETRAIN_RUN/backbone.pt)."),
    no_imagenet: bool = typer.Option(
        False, "--no-imagenet", help="Do not load packaged ImageNet weights ("
        f"{', '.join(n for n, b in BACKBONES.items() if b.imagenet_loader) or 'none'})."),
    in_channels: int | None = typer.Option(None, "--in-channels", help="Band count (default: inferred from the data)."),
    device: Device = None,
    precision: Precision = None,
    no_augment: bool = typer.Option(False, "--no-augment", help="Random crops only, no augmentation."),
    photometric: float | None = typer.Option(
        None, "--photometric", metavar="P", help="Jitter each date's light and colour on its own with "
        "probability P (default: 0, as in the reference recipe)."),
    val_fraction: float | None = typer.Option(
        None, "--val-fraction", help="Hold out this fraction of the pairs for validation (flat layout: default 0.1)."),
    ignore_index: int | None = typer.Option(None, "--ignore-index", help="Label value meaning 'unlabelled'."),
    label_values: options.LabelValues = None,
    mean: str | None = typer.Option(None, "--mean", help="Per-band means, e.g. 110,112,98 (default: measured)."),
    std: str | None = typer.Option(None, "--std", help="Per-band standard deviations (default: measured on train)."),
    val_batch_size: int | None = typer.Option(None, "--val-batch-size", help="Val tiles per batch (default: 4)."),
    select_by: str | None = typer.Option(
        None, "--select-by", metavar="f1_calibrated|f1",
        help="best.pt by f1_calibrated (F1 at the calibrated threshold) or f1 (at 0.5) "
        "(default: f1_calibrated)."),
    stop_after: int | None = typer.Option(
        None, "--stop-after", help="Stop once this many epochs are done (resume later with --resume)."),
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Train FSG-Net on change-detection tiles (reference recipe by default); torchrun for several GPUs.

    Example: cdmap train LEVIR-CD/ -o runs/levir --epochs 100
    """
    # Long only because typer declares the options in the signature; the body maps them to TrainConfig
    # (the recipe) and TrainRuntime, then calls cdmap.train.train or cdmap.train.resume.
    from cdmap.errors import UsageError
    from cdmap.labels import parse_label_values
    from cdmap.train import TrainConfig, TrainRuntime, train
    from cdmap.train import resume as resume_run

    if init_from is not None:
        if backbone_weights is not None:
            raise UsageError("give --init-from or --backbone-weights, not both")
        backbone_weights = init_from / "backbone.pt" if init_from.is_dir() else init_from
    values = {
        "epochs": epochs, "lr": lr, "backbone_lr": backbone_lr, "min_lr": min_lr, "weight_decay": weight_decay,
        "batch_size": batch_size, "effective_batch": effective_batch, "crop_size": crop_size, "seed": seed,
        "backbone": backbone, "backbone_weights": str(backbone_weights) if backbone_weights else None,
        "in_channels": in_channels, "precision": precision, "val_fraction": val_fraction,
        "ignore_index": ignore_index, "label_values": parse_label_values(label_values),
        "mean": parse_floats(mean, "--mean"), "std": parse_floats(std, "--std"),
        "select_by": select_by, "photometric": photometric,
    }
    flags = {"augment": not no_augment, "imagenet": not no_imagenet}
    runtime = {"workers": workers, "device": device, "val_batch_size": val_batch_size,
               "stop_after_epoch": stop_after}
    runtime = {k: v for k, v in runtime.items() if v is not None}
    if resume is not None:
        fixed = [k for k, v in values.items() if v is not None] + [k for k, v in flags.items() if v is not True]
        if fixed or overwrite or output is not None:
            names = ", ".join("--" + k.replace("_", "-") for k in fixed) or "--output/--overwrite"
            raise UsageError(f"{names} cannot be changed when resuming; only --workers, --device, "
                             "--val-batch-size, --stop-after and --quiet can")
        result = resume_run(resume, data or None, quiet=quiet, **runtime)
    else:
        if not data:
            raise UsageError("missing DATA (or use --resume RUN)")
        if output is None:
            raise UsageError("missing -o/--output RUN folder")
        cfg = TrainConfig(**{k: v for k, v in values.items() if v is not None}, **flags)
        result = train(data, output, cfg, TrainRuntime(quiet=quiet, overwrite=overwrite, **runtime))
    if not quiet and result.run_dir is not None:
        import os

        if int(os.environ.get("RANK", "0")) == 0:
            state = "finished" if result.finished else f"stopped after epoch {result.epochs_completed}"
            typer.echo(f"{state}: best val F1 {result.best_f1:.4f} at epoch {result.best_epoch} "
                       f"(threshold {result.threshold:.3f}) -> {result.best_path}")


@app.command("evaluate")
def evaluate_cmd(
    data: Path | None = typer.Argument(None, help="Tile folder (LEVIR layout or flat A/B/label)."),
    model: options.OptionalModel = None,
    split: str | None = typer.Option(
        None, "--split", help="Sub-folder of DATA to evaluate (default: test; a flat DATA is scored whole, with a "
        "warning, and refuses --split)."),
    scene: tuple[options.RasterIn, options.RasterIn, options.RasterIn] | None = typer.Option(
        None, "--scene", metavar="BEFORE AFTER LABELS",
        help="BEFORE AFTER LABELS: evaluate a whole scene through the predict pipeline "
        "(LABELS: raster on the output grid, or polygons)."),
    mask: options.RasterIn | None = typer.Option(
        None, "--mask", help="--scene: score this existing change mask (1 change, 0 none) instead of predicting."),
    label_values: options.LabelValues = None,
    labels_pixel_grid: options.LabelsPixelGrid = False,
    threshold: Threshold = None,
    json_out: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    csv_file: Path | None = typer.Option(None, "--csv", help="Write per-image metrics to this CSV."),
    error_maps: Path | None = typer.Option(
        None, "--error-maps", help="Write error maps here: GeoTIFFs with a colour table (TP white, TN black, "
        "FP red, FN green, ignored grey); --scene also adds them to the report."),
    ignore_index: int | None = typer.Option(None, "--ignore-index", help="Label value meaning 'unlabelled'."),
    batch_size: BatchSize = 1,
    workers: Workers = 0,
    device: Device = "auto",
    precision: Precision = "auto",
    tile_size: TileSize = None,
    prediction_dir: Path | None = typer.Option(
        None, "--prediction-dir", help="--scene: keep the prediction outputs in this folder."),
    quiet: Quiet = False,
) -> None:
    """Precision, recall, F1, IoU (change class), OA and kappa of a checkpoint on labelled tiles or a scene.

    Without --model the packaged default model is scored.

    Example: cdmap evaluate LEVIR-CD/ -m runs/levir/best.pt --split test
    """
    from cdmap.errors import UsageError
    from cdmap.evaluate import evaluate_scene, evaluate_tiles, result_json
    from cdmap.labels import parse_label_values

    coding = parse_label_values(label_values)
    if mask is not None and scene is None:
        raise UsageError("--mask needs --scene BEFORE AFTER LABELS")
    if scene is not None and data is not None:
        raise UsageError("give either DATA or --scene BEFORE AFTER LABELS, not both")
    if scene is not None:
        if csv_file is not None:
            raise UsageError("--csv is for tiles; a scene has a single row")
        opts = {"batch_size": batch_size, "device": device, "precision": precision, "workers": max(1, workers),
                "quiet": quiet}
        if tile_size is not None:
            opts["tile_size"] = tile_size
        err = None if error_maps is None else error_maps / "scene_error_map.tif"
        result = evaluate_scene(*scene, model, threshold=threshold, outdir=prediction_dir,
                                ignore_index=ignore_index, error_map=err, mask=mask, label_values=coding,
                                labels_pixel_grid=labels_pixel_grid, **opts)
    else:
        if data is None:
            raise UsageError("missing DATA (or --scene BEFORE AFTER LABELS)")
        result = evaluate_tiles(data, model, split=split, threshold=threshold, device=device,
                                precision=precision, batch_size=batch_size, workers=workers,
                                ignore_index=ignore_index, csv_path=csv_file, error_maps_dir=error_maps,
                                progress=not quiet, label_values=coding)
    if json_out:
        typer.echo(result_json(result))
        return
    m = result.metrics
    thr = "of the mask" if result.threshold is None else f"{result.threshold:.3f}"
    split_used = f", split {result.extra['split']}" if "split" in result.extra else ""
    typer.echo(f"{result.source}: {result.n_images} image(s){split_used}, threshold {thr}")
    typer.echo(f"  precision {m['precision']:.4f}  recall {m['recall']:.4f}  F1 {m['f1']:.4f}  IoU {m['iou']:.4f}")
    typer.echo(f"  OA {m['oa']:.4f}  kappa {m['kappa']:.4f}  (TP {m['tp']}, FP {m['fp']}, FN {m['fn']}, TN {m['tn']})")


@app.command("tiles")
def tiles_cmd(
    before: options.RasterIn = typer.Argument(..., help="The earlier scene (georeferenced raster, any GDAL path)."),
    after: options.RasterIn = typer.Argument(..., help="The later scene, on BEFORE's grid."),
    labels: options.RasterIn = typer.Argument(
        ..., help="Change labels: raster on BEFORE's grid, or polygons (gpkg/geojson/shp)."),
    output: Path = typer.Option(..., "-o", "--output", help="DATA folder to write {train,val,test}/{A,B,label}/."),
    tile_size: int = typer.Option(256, "--tile-size", help="Tile size in pixels (edge tiles are smaller)."),
    split: str = typer.Option("0.7,0.15,0.15", "--split", metavar="TRAIN,VAL,TEST",
                              help="Train,val,test fractions of the tiles."),
    seed: int = typer.Option(0, "--seed", help="Seed of the tile shuffle that assigns splits."),
    fmt: str = typer.Option("tif", "--format", metavar="tif|png", help="tif (GeoTIFF, keeps georeferencing) or png."),
    label_values: options.LabelValues = None,
    labels_pixel_grid: options.LabelsPixelGrid = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Cut a scene pair and its labels into LEVIR-layout training tiles with train/val/test splits.

    Example: cdmap tiles before.tif after.tif labels.gpkg -o DATA/
    """
    from cdmap.labels import parse_label_values
    from cdmap.train.tiles import make_tiles

    result = make_tiles(before, after, labels, output, tile_size=tile_size, split=split, seed=seed, fmt=fmt,
                        overwrite=overwrite, label_values=parse_label_values(label_values),
                        pixel_grid=labels_pixel_grid)
    if not quiet:
        c = result.counts
        msg = (f"{output}: {c['train']} train, {c['val']} val, {c['test']} test tiles of {tile_size} px "
               f"({result.skipped_nodata} all-nodata skipped)")
        if result.ignore_index is not None:
            msg += f"; label nodata written as {result.ignore_index}: train with --ignore-index {result.ignore_index}"
        typer.echo(msg)
