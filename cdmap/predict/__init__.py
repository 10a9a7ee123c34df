"""Scene inference: windows of the pair -> FSG-Net in batches -> blended strips -> rasters, polygons, run.json.

Data flows one way through stages, one module each: :mod:`~cdmap.predict.options` (what the caller chose),
:mod:`~cdmap.predict.plan` (resolved once against the checkpoint), :mod:`~cdmap.predict.compute` (windows
through the network into journaled row strips, :mod:`~cdmap.predict.journal`, so ``resume=True`` continues
an interrupted run), :mod:`~cdmap.predict.assemble` (rasters and polygons from the strips) and
:mod:`~cdmap.predict.outputs` (names, checks, run.json, everything renamed into place at once).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from cdmap import process
from cdmap.checkpoint import Checkpoint, load_checkpoint
from cdmap.predict.assemble import AssemblyContext, change_mask, write_rasters, write_vectors
from cdmap.predict.compute import compute_strips, gdal_cache_bytes
from cdmap.predict.extras import write_extras
from cdmap.predict.journal import WORKDIR_NAME, open_journal
from cdmap.predict.options import PredictOptions, RunOptions, split_overrides
from cdmap.predict.outputs import (
    MASK_NAME,
    MASK_NODATA,
    PROB_NAME,
    RUN_NAME,
    VECTOR_FORMATS,
    VECTOR_NAME,
    PredictResult,
    check_free_space,
    commit_outputs,
    extra_output_paths,
    output_errors,
    output_paths,
    prepare_outdir,
    run_summary,
    summary_paragraph,
)
from cdmap.predict.plan import PredictPlan, default_overlap, make_plan

log = logging.getLogger("cdmap.predict")

__all__ = ["predict_scene", "PredictOptions", "RunOptions", "PredictResult", "PredictPlan", "default_overlap",
           "output_paths", "change_mask", "PROB_NAME", "MASK_NAME", "RUN_NAME", "VECTOR_NAME", "VECTOR_FORMATS",
           "MASK_NODATA"]


def predict_scene(
    before: str | os.PathLike,
    after: str | os.PathLike,
    outdir: str | os.PathLike,
    model: str | os.PathLike | Checkpoint,
    options: PredictOptions | None = None,
    run: RunOptions | None = None,
    **overrides: Any,
) -> PredictResult:
    """Map change between ``before`` and ``after`` into ``outdir``.

    Writes ``change_probability.tif``, ``change_mask.tif``, ``changes.<fmt>`` and ``run.json`` (see the
    README). ``model`` is a checkpoint path or a loaded :class:`Checkpoint`. Keyword overrides are fields of
    :class:`PredictOptions` or :class:`RunOptions`. Raises :class:`cdmap.errors.CdmapError` subclasses on bad
    input; nothing is ever left under a final output name unless the whole run succeeded.
    """
    from cdmap.raster.pair import open_pair

    opts, run = split_overrides(options, run, overrides)
    opts.check()
    run.check()
    t_start = time.perf_counter()
    ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(Path(model))
    plan = make_plan(opts, ckpt)
    pair = open_pair(before, after, bands=opts.bands, expected_bands=ckpt.in_channels, align=opts.align,
                     resampling=opts.resampling, allow_no_crs=opts.allow_no_crs)
    try:
        plan = plan.on_grid(pair.height, pair.width)
        outdir = Path(outdir)
        finals = output_paths(outdir, opts.vector_format) | extra_output_paths(outdir, run.report, bool(run.zones))
        workdir = outdir / WORKDIR_NAME
        prepare_outdir(outdir, finals, run.overwrite, resuming=run.resume and (workdir / "journal.jsonl").is_file())
        timings = {"preflight_s": time.perf_counter() - t_start}
        manifest = plan.manifest(before, after)
        check_free_space(outdir, pair.height * pair.width, opts.prob_dtype)
        journal = open_journal(workdir, manifest, run.resume)
        t0 = time.perf_counter()
        import rasterio

        with process.SignalGuard(), rasterio.Env(GDAL_CACHEMAX=gdal_cache_bytes(pair, plan.tile)):
            compute = compute_strips(pair, plan, journal, run)
            timings["compute_s"] = time.perf_counter() - t0
            ctx = AssemblyContext(before, after, pair, plan, run, journal, finals, compute)
            summary = _finish(ctx, timings, t_start)
    finally:
        pair.close()
    result = PredictResult(outdir, finals["probability"], finals["mask"], finals.get("vectors"), finals["run"],
                           summary)
    log.info("%s", summary_paragraph(result))
    return result


def _finish(ctx: AssemblyContext, timings: dict[str, float], t_start: float) -> dict[str, Any]:
    """Rasters, polygons, run.json, the extras (style, zones, report), then everything renamed into place;
    returns the summary."""
    with output_errors(ctx.journal.workdir.parent):
        t1 = time.perf_counter()
        rasters = write_rasters(ctx)
        timings["rasters_s"] = time.perf_counter() - t1
        vectors, vec_path = write_vectors(ctx, timings)
        timings["total_s"] = time.perf_counter() - t_start
        summary = run_summary(ctx, rasters, vectors, timings)
        write_extras(ctx, summary, vec_path)
        commit_outputs(ctx.journal, ctx.finals, summary, vec_path)
    return summary

