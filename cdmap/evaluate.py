"""Evaluation of a checkpoint on labelled tiles or on a whole scene.

Confusion counts are accumulated over the whole split at native resolution (no resizing, no per-image
averaging); prediction is ``P(change) >= threshold`` with the checkpoint's calibrated threshold unless one is
given. Inputs are normalised with the checkpoint's per-band mean/std, exactly as in training. Pixels whose label
is the ignore index, or where either image is nodata, are excluded. Metric conventions: :mod:`cdmap.metrics`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cdmap import process
from cdmap.errors import IncompatibleInputsError, InputError, OutputError, UsageError
from cdmap.files import replaced_atomically
from cdmap.labels import IGNORE_INDEX
from cdmap.metrics import ConfusionCounts
from cdmap.raster.identity import is_local
from cdmap.vector.labels import VECTOR_SUFFIXES, rasterize_polygons, read_polygons

if TYPE_CHECKING:
    import torch

log = logging.getLogger("cdmap.evaluate")

PER_IMAGE_FIELDS = ("name", "tp", "fp", "fn", "tn", "precision", "recall", "f1", "iou", "oa", "kappa")
ERROR_CODES = {"tn": 0, "tp": 1, "fp": 2, "fn": 3, "ignored": 4}
"""Values of the error-map GeoTIFFs; their colour table (TP white, TN black, FP red, FN green, ignored grey) is
:data:`cdmap.report.figures.ERROR_CLASSES`."""


# ----- results -------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Metrics of one evaluation. ``per_image`` holds one dict per tile (``PER_IMAGE_FIELDS``)."""

    counts: ConfusionCounts
    threshold: float | None  # None: an existing mask was scored
    source: str
    n_images: int = 0
    per_image: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float | int]:
        return self.counts.metrics()

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "threshold": self.threshold, "n_images": self.n_images,
                "metrics": self.metrics, **self.extra}


def _load_ckpt(checkpoint):
    """A loaded checkpoint, a packaged model name, a checkpoint file, or None (the packaged default model)."""
    from cdmap.checkpoint import Checkpoint
    from cdmap.weights import load_model

    return checkpoint if isinstance(checkpoint, Checkpoint) else load_model(checkpoint)


def _check_threshold(threshold: float | None, default: float) -> float:
    t = default if threshold is None else float(threshold)
    if not 0.0 <= t <= 1.0:
        raise UsageError(f"--threshold must be between 0 and 1, got {t}")
    return t


def _write_error_map(path: Path, pred: np.ndarray, label: np.ndarray, georef: Path) -> None:
    """One tile's error map as a paletted GeoTIFF, georeferenced like ``georef`` (the tile's A image)."""
    import rasterio

    from cdmap.data import no_georef_warning

    with no_georef_warning():  # PNG tiles: the error map has no georeferencing either, and that is expected
        with rasterio.open(georef) as src:
            crs, transform = src.crs, src.transform
        with _error_map_writer(path, label.shape[1], label.shape[0], crs, transform) as w:
            w.write_rows(0, _error_classes(pred, label))


def write_per_image_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Write per-image rows (``PER_IMAGE_FIELDS``) to ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=PER_IMAGE_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    except OSError as exc:
        raise OutputError(f"cannot write CSV: {exc.strerror or exc}", path) from exc
    return path


# ----- tiles ---------------------------------------------------------------------------------------------------
def evaluate_tiles(
    data_dir: str | os.PathLike,
    checkpoint: Any,
    *,
    split: str | None = None,
    threshold: float | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 1,
    workers: int = 0,
    ignore_index: int | None = None,
    csv_path: str | os.PathLike | None = None,
    error_maps_dir: str | os.PathLike | None = None,
    progress: bool = False,
    label_values: tuple[int, int] | None = None,
) -> EvalResult:
    """Evaluate ``checkpoint`` (path or :class:`~cdmap.checkpoint.Checkpoint`) on ``data_dir/split``.

    ``data_dir`` is a LEVIR-layout folder (``split`` picks the sub-folder, default ``test``) or a flat
    ``{A,B,label}`` folder, used whole with a warning (it may hold the training pairs) and refused with a
    ``split`` it is not (:func:`cdmap.data.resolve_split`); the result records the split (``extra["split"]``).
    ``label_values``: see :mod:`cdmap.labels`. Tiles are run whole at native resolution, ``batch_size``
    same-size tiles at a time. Writes a per-image CSV to ``csv_path`` and error maps (GeoTIFFs with a colour
    table: TP white, TN black, FP red, FN green, ignored grey; georeferenced like the tile) as ``<name>.tif``
    into ``error_maps_dir`` when given.
    """
    from torch.utils.data import DataLoader

    from cdmap.data import EvalTiles, load_split, resolve_split, size_grouped_batches
    from cdmap.inference import Predictor

    ckpt = _load_ckpt(checkpoint)
    thr = _check_threshold(threshold, ckpt.threshold)
    folder, split_name = resolve_split(data_dir, split)
    pairs = load_split(data_dir, split, ignore_index, workers=max(1, workers), expected_bands=ckpt.in_channels,
                       label_values=label_values)
    if split_name == "all (flat folder)":
        log.warning("%s has no train/val/test folders: scoring all %d pairs; if the model was trained on this "
                    "folder these include its training pairs (the scores are then optimistic)", data_dir, len(pairs))
    if pairs[0].bands != ckpt.in_channels:
        raise IncompatibleInputsError(
            f"images have {pairs[0].bands} bands but the model expects {ckpt.in_channels}", Path(data_dir))
    _check_outputs(pairs, ckpt, csv_path, error_maps_dir)
    predictor = Predictor.from_checkpoint(ckpt, device, precision)
    maps_dir = _make_dir(error_maps_dir)
    ds = EvalTiles(pairs, ckpt.mean, ckpt.std, ignore_index, label_values)
    loader = DataLoader(ds, batch_sampler=size_grouped_batches(pairs, max(1, batch_size)), num_workers=workers,
                        pin_memory=predictor.device.type == "cuda")
    total = ConfusionCounts()
    bar = _progress(len(loader), "evaluate", progress)
    with process.worker_errors():
        rows = _score_batches(loader, predictor, thr, pairs, total, maps_dir, bar)
    if bar is not None:
        bar.close()
    rows.sort(key=lambda r: r["name"])
    if csv_path is not None:
        write_per_image_csv(csv_path, rows)
    return EvalResult(counts=total, threshold=thr, source=str(folder), n_images=len(rows), per_image=rows,
                      extra={"split": split_name})


def _check_outputs(pairs: list[Any], checkpoint: Any, csv_path: Any, maps_dir: Any) -> None:
    """No output (CSV, error maps) may be one of the tiles or the checkpoint (:mod:`cdmap.files`)."""
    from cdmap.files import check_outputs_spare_inputs

    inputs = [f for p in pairs for f in (p.a, p.b, p.label)]
    inputs += [checkpoint.source] if checkpoint.source is not None else []  # the file it was loaded from
    outputs = [csv_path] if csv_path is not None else []
    outputs += [Path(maps_dir) / f"{p.name}.png" for p in pairs] if maps_dir is not None else []
    check_outputs_spare_inputs(inputs, outputs)


def _score_batches(loader: Any, predictor: Any, thr: float, pairs: list[Any], total: ConfusionCounts,
                   maps_dir: Path | None, bar: Any) -> list[dict[str, Any]]:
    """Counts of every tile added to ``total``; the per-image rows."""
    from cdmap.inference import check_finite_output

    rows: list[dict[str, Any]] = []
    for a, b, label, idx in loader:
        process.fault_point("batch")
        label = label.to(predictor.device, non_blocking=True)
        prob = predictor.probability(a, b)
        check_finite_output(prob.detach().cpu().numpy(), predictor.source)
        pred = prob >= thr
        for j, c in enumerate(_tile_counts(pred, label)):
            total.add(c)
            name = pairs[int(idx[j])].name
            rows.append({"name": name, **c.metrics()})
            if maps_dir is not None:
                _write_error_map(maps_dir / f"{name}.tif", pred[j].cpu().numpy(), label[j].cpu().numpy(),
                                 pairs[int(idx[j])].a)
        if bar is not None:
            bar.update(1)
    return rows


def _make_dir(path: str | os.PathLike | None) -> Path | None:
    if path is None:
        return None
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder: {exc.strerror or exc}", Path(path)) from exc
    return Path(path)


def _tile_counts(pred: torch.Tensor, label: torch.Tensor) -> list[ConfusionCounts]:
    """Confusion counts of each tile of a batch (pixels labelled neither 0 nor 1 excluded)."""
    import torch

    valid = (label == 0) | (label == 1)
    truth = label == 1
    tp = (pred & truth).sum((1, 2))
    fp = (pred & ~truth & valid).sum((1, 2))
    fn = (~pred & truth).sum((1, 2))
    nvalid = valid.sum((1, 2))
    stats = torch.stack([tp, fp, fn, nvalid], 1).cpu().tolist()
    return [ConfusionCounts(tp_i, fp_i, fn_i, n_i - tp_i - fp_i - fn_i) for tp_i, fp_i, fn_i, n_i in stats]


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, unit="batch", leave=False)


# ----- scene ---------------------------------------------------------------------------------------------------
ROW_STRIP = 512


def evaluate_scene(
    before: str | os.PathLike,
    after: str | os.PathLike,
    labels: str | os.PathLike,
    checkpoint: Any,
    *,
    threshold: float | None = None,
    outdir: str | os.PathLike | None = None,
    ignore_index: int | None = None,
    error_map: str | os.PathLike | None = None,
    mask: str | os.PathLike | None = None,
    label_values: tuple[int, int] | None = None,
    labels_pixel_grid: bool = False,
    **predict_options: Any,
) -> EvalResult:
    """Predict a whole scene pair with :func:`cdmap.predict.predict_scene` and score it against ``labels``.

    ``labels`` is a raster on the output grid (band 1, decoded by :mod:`cdmap.labels` with ``label_values``; its
    nodata and ``ignore_index`` excluded; without georeferencing only with ``labels_pixel_grid``) or a polygon
    file rasterised onto the output grid. Pixels where the prediction is nodata (either date nodata) are
    excluded. The prediction is the predicted mask at ``threshold`` (default: the checkpoint's); ``mask``
    scores an existing change mask instead of predicting (``checkpoint`` may then be None).
    ``predict_options`` go to ``predict_scene`` (``tile_size``, ``overlap``, ``device``, ``batch_size``...).
    ``outdir`` keeps the prediction; otherwise a temporary folder is used and removed. ``error_map`` writes a
    GeoTIFF on the prediction grid with a colour table (TP white, TN black, FP red, FN green, excluded grey).
    The metrics and the error map are added to the prediction's ``report.html`` (copied, with ``preview.png``,
    beside the error map when the prediction is temporary).
    """
    import shutil
    import tempfile

    from cdmap.predict import predict_scene

    label_opts: dict[str, Any] = {"ignore_index": ignore_index, "label_values": label_values,
                                  "pixel_grid": labels_pixel_grid}
    check_labels(labels, **label_opts)
    extra: dict[str, Any] = {"labels": str(labels)}
    if mask is not None:
        counts = score_mask(mask, labels, error_map=error_map, **label_opts)
        extra["mask"] = str(mask)
        return EvalResult(counts=counts, threshold=None if threshold is None else float(threshold),
                          source=f"{before} -> {after}", n_images=1, extra=extra)
    ckpt = _load_ckpt(checkpoint)
    thr = _check_threshold(threshold, ckpt.threshold)
    tmp = None
    if outdir is None:
        tmp = tempfile.mkdtemp(prefix="cdmap-eval-")
        outdir = Path(tmp) / "prediction"
    opts: dict[str, Any] = {"vector_format": "none", "quiet": True}
    opts.update(predict_options)
    opts["threshold"] = thr
    hide = _HideText(tmp) if tmp is not None else None  # predict's summary names a folder removed below
    # a logger's filters see only the records logged on it, not its children's: filter where predict logs
    predict_log = logging.getLogger("cdmap.predict")
    if hide is not None:
        predict_log.addFilter(hide)
    try:
        result = predict_scene(before, after, outdir, ckpt, **opts)
        counts = score_mask(result.mask, labels, error_map=error_map, **label_opts)
        # the report stays with the prediction, or beside the error map when the prediction is temporary
        report_dir = Path(error_map).parent if tmp is not None and error_map is not None else None
        _report_evaluation(result.outdir, counts, labels, error_map, report_dir)
    finally:
        if hide is not None:
            predict_log.removeFilter(hide)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if tmp is None:
        extra["prediction"] = str(outdir)
    return EvalResult(counts=counts, threshold=thr, source=f"{before} -> {after}", n_images=1, extra=extra)


class _HideText(logging.Filter):
    """Drops log records whose message mentions ``text`` (a temporary folder the user never sees)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def check_labels(labels: str | os.PathLike, *, ignore_index: int | None = None,
                 label_values: tuple[int, int] | None = None, pixel_grid: bool = False) -> None:
    """Refuse a label raster whose values :mod:`cdmap.labels` cannot decode (polygon files pass), before any
    compute; reads band 1 in row strips."""
    import rasterio
    from rasterio.windows import Window

    from cdmap.labels import distinct_values, label_problem

    labels = os.fspath(labels)
    if is_local(labels) and not Path(labels).exists():
        raise InputError("label file not found", labels)
    if Path(labels).suffix.lower() in VECTOR_SUFFIXES:
        return
    values: set[float] = set()
    try:
        with rasterio.open(labels) as lab:
            for row in range(0, lab.height, ROW_STRIP):
                raw = lab.read(1, window=Window(0, row, lab.width, min(ROW_STRIP, lab.height - row)))
                values |= distinct_values(raw, ignore_index, lab.nodata)
    except rasterio.errors.RasterioError as exc:
        raise InputError(f"cannot read label raster: {exc}", labels) from exc
    why = label_problem(values, label_values)
    if why:
        raise InputError(why, labels)


def score_mask(
    mask: str | os.PathLike,
    labels: str | os.PathLike,
    *,
    ignore_index: int | None = None,
    error_map: str | os.PathLike | None = None,
    label_values: tuple[int, int] | None = None,
    pixel_grid: bool = False,
) -> ConfusionCounts:
    """Confusion counts of a predicted mask raster (1 change, 0 none, 255/nodata excluded) against ``labels``.

    ``labels``: a raster on the mask's grid (decoded as :func:`check_labels` checks it; without georeferencing
    only with ``pixel_grid``) or a polygon file (rasterised onto it). Read in row strips.
    """
    import rasterio
    from rasterio.windows import Window

    from cdmap.labels import check_label_grid, decode_labels

    mask, labels = os.fspath(mask), os.fspath(labels)
    check_labels(labels, ignore_index=ignore_index, label_values=label_values, pixel_grid=pixel_grid)
    is_vector = Path(labels).suffix.lower() in VECTOR_SUFFIXES
    total = ConfusionCounts()
    try:
        src = rasterio.open(mask)
    except rasterio.errors.RasterioError as exc:
        raise InputError(f"cannot open change mask: {exc}", mask) from exc
    with src:
        height, width = src.height, src.width
        gdf = read_polygons(labels, src.crs) if is_vector else None
        lab = None if is_vector else rasterio.open(labels)
        em = None
        try:
            if lab is not None:
                check_label_grid(lab, src, labels, pixel_grid)
            em = None if error_map is None else _error_map_writer(Path(error_map), width, height, src.crs,
                                                                  src.transform)
            for row in range(0, height, ROW_STRIP):
                win = Window(0, row, width, min(ROW_STRIP, height - row))
                pred_raw = src.read(1, window=win)
                valid = (pred_raw == 0) | (pred_raw == 1)
                if src.nodata is not None:
                    valid &= pred_raw != src.nodata
                pred = pred_raw == 1
                if gdf is not None:
                    truth = rasterize_polygons(gdf, src.window_transform(win), pred.shape) != 0
                else:
                    raw = lab.read(1, window=win, masked=True)
                    decoded = decode_labels(np.ma.getdata(raw), label_values, ignore_index, lab.nodata)
                    valid &= ~np.ma.getmaskarray(raw) & (decoded != IGNORE_INDEX)
                    truth = decoded == 1
                total.add(ConfusionCounts.from_arrays(pred, truth, valid))
                if em is not None:
                    lab8 = np.where(valid, truth.astype(np.uint8), 255).astype(np.uint8)
                    em.write_rows(row, _error_classes(pred, lab8))
            if em is not None:
                em.build_overviews("nearest")
                em.close()
        finally:
            if lab is not None:
                lab.close()
            if em is not None and not em.closed:  # failed: no half-written error map is left
                em._abort()
                Path(error_map).unlink(missing_ok=True)
    return total


def _error_classes(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Error-map values (:data:`ERROR_CODES`) of a prediction against labels (0, 1; anything else ignored)."""
    out = np.full(label.shape, ERROR_CODES["tn"], dtype=np.uint8)
    out[pred & (label == 1)] = ERROR_CODES["tp"]
    out[pred & (label == 0)] = ERROR_CODES["fp"]
    out[~pred & (label == 1)] = ERROR_CODES["fn"]
    out[(label != 0) & (label != 1)] = ERROR_CODES["ignored"]
    return out


def _error_map_writer(path: Path, width: int, height: int, crs: Any, transform: Any) -> Any:
    """A paletted uint8 GeoTIFF for an error map (the colour table of :data:`ERROR_CODES`)."""
    from cdmap.raster.write import RasterWriter
    from cdmap.report.figures import ERROR_CLASSES

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder: {exc.strerror or exc}", path.parent) from exc
    colours = {k: (*rgb, 255) for k, (_name, rgb) in ERROR_CLASSES.items()}
    return RasterWriter(path, width=width, height=height, crs=crs, transform=transform, dtype="uint8",
                        nodata=None, colormap=colours, description="error map: 0 TN, 1 TP, 2 FP, 3 FN, 4 ignored",
                        tags={"CDMAP_CONTENT": "error map: 0 TN, 1 TP, 2 FP, 3 FN, 4 ignored"})


def _report_evaluation(pred_dir: Path, counts: ConfusionCounts, labels: Any, error_map: Any,
                       copy_to: Path | None) -> None:
    """Add the metrics and error map to ``pred_dir/report.html``; with ``copy_to``, into a copy there."""
    import shutil

    from cdmap import report

    src = pred_dir / report.REPORT_NAME
    if not src.is_file():
        return
    target = src
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
        for name in (report.REPORT_NAME, report.PREVIEW_NAME):
            if (pred_dir / name).is_file():
                shutil.copyfile(pred_dir / name, copy_to / name)
        target = copy_to / report.REPORT_NAME
    report.add_evaluation(target, counts.metrics(), labels, error_map)


def result_json(result: EvalResult) -> str:
    """The evaluation as a JSON document (metrics, counts, threshold, source)."""
    return json.dumps(result.to_dict(), indent=2)
