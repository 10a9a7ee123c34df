"""The assembly stage: the journal's strips -> ``change_probability.tif`` and ``change_mask.tif`` (then COGs
and polygons) in the journal's folder, ready to be renamed into place."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cdmap import process
from cdmap._version import __version__
from cdmap.predict.outputs import MASK_NAME, MASK_NODATA, PROB_NAME

if TYPE_CHECKING:
    from cdmap.predict.compute import ComputeStats
    from cdmap.predict.journal import Journal
    from cdmap.predict.options import RunOptions
    from cdmap.predict.plan import PredictPlan
    from cdmap.raster.pair import ScenePair

ROW_BLOCK = 512  # rows per write: whole rows of 512-pixel GeoTIFF tiles
#: the mask's colour table: change red, no change transparent white, nodata transparent black
MASK_COLOURS = {1: (230, 25, 45, 255), 0: (255, 255, 255, 0), MASK_NODATA: (0, 0, 0, 0)}
HIST_BINS = 50  # bins of the P(change) histogram in run.json and the report


@dataclass(frozen=True)
class AssemblyContext:
    """Everything the finishing stages need about one run."""

    before: str | os.PathLike
    after: str | os.PathLike
    pair: ScenePair
    plan: PredictPlan
    run: RunOptions
    journal: Journal
    finals: dict[str, Path]
    compute: ComputeStats

    @property
    def work(self) -> Path:
        return self.journal.workdir

    @property
    def prob_path(self) -> Path:
        return self.work / PROB_NAME

    @property
    def mask_path(self) -> Path:
        return self.work / MASK_NAME


@dataclass
class RasterStats:
    """Pixel counts and changed area of the assembled mask."""

    valid_pixels: int = 0
    changed_pixels: int = 0
    changed_area_m2: float = 0.0
    prob_histogram: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, dtype=np.int64))
    """Valid pixels per P(change) bin of width 1/HIST_BINS (the last bin includes 1.0)."""


def change_mask(data: np.ndarray, valid: np.ndarray, threshold: float, prob_dtype: str) -> np.ndarray:
    """The binary mask stored in ``change_mask.tif``: 1 change, 0 no change, 255 nodata.

    It is computed from the *stored* probability, so ``cdmap vectorize change_probability.tif
    --threshold T`` reproduces it exactly.
    """
    p = data.astype(np.float64) * (1.0 / 255.0) if prob_dtype == "uint8" else data.astype(np.float64)
    mask = (p >= threshold - 1e-9).astype(np.uint8)  # same tolerance as cdmap.vector for k/255 levels
    mask[~valid] = MASK_NODATA
    return mask


def _changed_area_m2(pair: ScenePair, is_change: np.ndarray, row0: int) -> float:
    """Ground area of the changed pixels of full-width rows from ``row0`` (the one area rule's only call)."""
    rows = is_change.shape[0]
    from cdmap.vector import pixel_area_m2_rows

    per_px = pixel_area_m2_rows(pair.crs, pair.transform, row0, row0 + rows, pair.width, height=pair.height)
    return float((is_change.sum(axis=1) * per_px).sum())


def _histogram(values: np.ndarray, is_u8: bool) -> np.ndarray:
    """Counts of ``values`` (stored probabilities) per bin of width 1/HIST_BINS."""
    p = values * (1.0 / 255.0) if is_u8 else values.astype(np.float64)
    idx = np.clip((p * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
    return np.bincount(idx, minlength=HIST_BINS)


def raster_tags(ctx: AssemblyContext) -> dict[str, str]:
    """Metadata written into both rasters."""
    plan = ctx.plan
    return {
        "CDMAP_VERSION": __version__,
        "CDMAP_CHECKPOINT_SHA256": plan.checkpoint.sha256,
        "CDMAP_TILE_SIZE": str(plan.tile),
        "CDMAP_OVERLAP": str(plan.overlap),
        "CDMAP_PRECISION": ctx.compute.precision,
        "CDMAP_THRESHOLD": f"{plan.threshold:.6g}",
        "CDMAP_BEFORE": Path(ctx.before).name,
        "CDMAP_AFTER": Path(ctx.after).name,
        "CDMAP_ALIGNMENT": ctx.pair.alignment.mode,
    }


def row_blocks(journal: Journal) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(row0, data, valid)`` blocks of ``ROW_BLOCK`` full-width rows (the last may be shorter), top down."""
    buf_d: list[np.ndarray] = []
    buf_v: list[np.ndarray] = []
    buffered = row = 0
    for gr in sorted(journal.done):
        data, valid = journal.read_strip(gr)
        buf_d.append(data)
        buf_v.append(valid)
        buffered += data.shape[0]
        while buffered >= ROW_BLOCK:
            d, v = np.concatenate(buf_d), np.concatenate(buf_v)
            yield row, d[:ROW_BLOCK], v[:ROW_BLOCK]
            row += ROW_BLOCK
            buf_d, buf_v = [d[ROW_BLOCK:]], [v[ROW_BLOCK:]]
            buffered -= ROW_BLOCK
    if buffered:
        yield row, np.concatenate(buf_d), np.concatenate(buf_v)


def write_rasters(ctx: AssemblyContext) -> RasterStats:
    """Write both rasters (and convert them to COGs with ``cog``) in the journal's folder.

    GDAL/libtiff print some write errors (disk full) straight to fd 2: that text is held back while writing
    and shown only when the rasters succeed, so a failure stays a one-line error.
    """
    cap = process.Fd2Capture().start()
    ok = False
    try:
        stats = _write_tiffs(ctx)
        if ctx.plan.options.cog:
            _convert_to_cogs(ctx)
        ok = True
    finally:
        cap.stop(replay=ok)
    return stats


def _write_tiffs(ctx: AssemblyContext) -> RasterStats:
    from cdmap.raster.write import RasterWriter

    opts, grid, pair = ctx.plan.options, ctx.plan.grid, ctx.pair
    assert grid is not None
    tags = raster_tags(ctx)
    is_u8 = opts.prob_dtype == "uint8"
    common = dict(width=grid.width, height=grid.height, crs=pair.crs, transform=pair.transform,
                  creation_options=opts.creation_options)
    prob_w = RasterWriter(ctx.prob_path, dtype=opts.prob_dtype, nodata=None if is_u8 else float("nan"),
                          scale=1.0 / 255.0 if is_u8 else None, offset=0.0 if is_u8 else None,
                          tags={**tags, "CDMAP_CONTENT": "probability of change"},
                          description="P(change)", mask_band=is_u8, **common)
    mask_w = RasterWriter(ctx.mask_path, dtype="uint8", nodata=MASK_NODATA,
                          tags={**tags, "CDMAP_CONTENT": "change mask: 1 change, 0 no change, 255 nodata"},
                          description="change mask", colormap=MASK_COLOURS, **common)
    stats = RasterStats()
    rows = 0
    with prob_w, mask_w:
        for row0, d, v in row_blocks(ctx.journal):
            m = change_mask(d, v, ctx.plan.threshold, opts.prob_dtype)
            prob_w.write_rows(row0, d)
            if is_u8:
                prob_w.write_mask_rows(row0, v)
            mask_w.write_rows(row0, m)
            process.fault_point("assemble")
            is_change = m == 1
            stats.changed_pixels += int(is_change.sum())
            stats.valid_pixels += int(v.sum())
            stats.changed_area_m2 += _changed_area_m2(pair, is_change, row0)
            stats.prob_histogram += _histogram(d[v], is_u8)
            rows = row0 + d.shape[0]
        if rows != grid.height:
            raise RuntimeError(f"assembled {rows} of {grid.height} rows")  # journal bug guard
        prob_w.build_overviews("average")
        mask_w.build_overviews("nearest")
    return stats


def _convert_to_cogs(ctx: AssemblyContext) -> None:
    from cdmap.raster.write import to_cog

    for path in (ctx.prob_path, ctx.mask_path):
        cog = path.with_name(path.stem + ".cog.tif")
        to_cog(path, cog, creation_options=ctx.plan.options.creation_options)
        os.replace(cog, path)


def write_vectors(ctx: AssemblyContext, timings: dict[str, float]) -> tuple[Any, Path | None]:
    """Polygons of the mask in the journal's folder: ``(VectorizeStats, path)``, or ``(None, None)`` without
    a vector format."""
    opts = ctx.plan.options
    if opts.vector_format == "none":
        return None, None
    from cdmap.vector import vectorize_raster

    t_v = time.perf_counter()
    process.fault_point("vectorize")
    vec_dir = ctx.work / "vector"
    shutil.rmtree(vec_dir, ignore_errors=True)  # leftovers of an interrupted run
    vec_dir.mkdir()
    path = vec_dir / ctx.finals["vectors"].name
    stats = vectorize_raster(ctx.mask_path, path, prob_raster=ctx.prob_path, min_area=opts.min_area,
                             simplify=opts.simplify, vector_format=opts.vector_format, overwrite=True)
    timings["vectorize_s"] = time.perf_counter() - t_v
    return stats, path
