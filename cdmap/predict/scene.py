"""One scene pair through the stages: plan, compute (this rank's share of the strips), assemble, commit."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdmap import process
from cdmap.checkpoint import Checkpoint, load_checkpoint
from cdmap.errors import CdmapError, Interrupted, RankError
from cdmap.files import check_outputs_spare_inputs, with_sidecars
from cdmap.predict.assemble import AssemblyContext, write_rasters, write_vectors
from cdmap.predict.compute import ComputeStats, compute_strips, gdal_cache_bytes, journal_blend, merge_reports
from cdmap.predict.extras import write_extras
from cdmap.predict.journal import WORKDIR_NAME, Journal, open_journal
from cdmap.predict.options import PredictOptions, RunOptions, split_overrides
from cdmap.predict.outputs import (
    PredictResult,
    check_free_space,
    commit_outputs,
    extra_output_paths,
    finished_run,
    manifest_key,
    output_errors,
    output_paths,
    peak_rss_mib,
    prepare_outdir,
    run_summary,
    summary_paragraph,
)
from cdmap.predict.plan import PredictPlan, make_plan
from cdmap.predict.ranks import RankReport, rank_share, strip_spans
from cdmap.weights import model_path

if TYPE_CHECKING:
    from cdmap.distributed import Dist

log = logging.getLogger("cdmap.predict")


def predict_scene(
    before: str | os.PathLike,
    after: str | os.PathLike,
    outdir: str | os.PathLike,
    model: str | os.PathLike | Checkpoint | None = None,
    options: PredictOptions | None = None,
    run: RunOptions | None = None,
    **overrides: Any,
) -> PredictResult:
    """Map change between ``before`` and ``after`` into ``outdir``.

    Writes ``change_probability.tif``, ``change_mask.tif``, ``changes.<fmt>`` and ``run.json`` (see the
    README). ``model`` is a packaged model name (:mod:`cdmap.weights`), a checkpoint path or a loaded
    :class:`Checkpoint`; None: the packaged default model. Keyword overrides are fields of
    :class:`PredictOptions` or :class:`RunOptions`. Raises :class:`cdmap.errors.CdmapError` subclasses on bad
    input; nothing is ever left under a final output name unless the whole run succeeded.

    Under ``torchrun`` every rank computes a share of the strips and rank 0 writes the outputs; on the other
    ranks the result's ``summary`` is only that rank's report (``{"rank": ...}``).
    """
    from cdmap.distributed import init_distributed

    opts, run = split_overrides(options, run, overrides)
    opts.check()
    run.check()
    if not isinstance(model, Checkpoint):
        model = model_path(model)
    check_outputs_spare_inputs(
        [*with_sidecars(before), *with_sidecars(after), *([] if isinstance(model, Checkpoint) else [model])],
        output_paths(Path(outdir), opts.vector_format).values(), [Path(outdir) / WORKDIR_NAME])
    dist = init_distributed(opts.device, backend="gloo", timeout_s=run.rank_timeout)
    try:
        return predict_one(before, after, outdir, model, opts, run, dist)
    except Interrupted as exc:
        raise exc.with_hint("partial work kept, rerun with --resume to continue") from None
    finally:
        dist.close()


def predict_one(before: str | os.PathLike, after: str | os.PathLike, outdir: str | os.PathLike,
                model: str | os.PathLike | Checkpoint, opts: PredictOptions, run: RunOptions,
                dist: Dist | None = None) -> PredictResult:
    """:func:`predict_scene` with checked options, on the ranks of ``dist`` (default: this process alone).

    Rank 0 prepares the output folder and the journal and hands the journal to every rank; each computes its
    share; after a gather of the ranks' reports rank 0 assembles, vectorises and commits.
    """
    from cdmap.distributed import Dist
    from cdmap.predict.fit import input_warnings
    from cdmap.raster.identity import input_identity
    from cdmap.raster.pair import open_pair

    dist = dist or Dist()
    t_start = time.perf_counter()
    ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(Path(model))
    process.fault_point("load")
    plan = make_plan(opts, ckpt).for_rank(dist.local_rank, dist.world)
    pair = open_pair(before, after, bands=opts.bands, expected_bands=ckpt.in_channels, align=opts.align,
                     resampling=opts.resampling, allow_no_crs=opts.allow_no_crs)
    try:
        plan = plan.on_grid(pair.height, pair.width)
        outdir = Path(outdir)
        finals = output_paths(outdir, opts.vector_format) | extra_output_paths(outdir, run.report, bool(run.zones))
        workdir = outdir / WORKDIR_NAME
        identities = (input_identity(before), input_identity(after))
        manifest = plan.manifest(before, after, identities)
        finished = finished_run(outdir, finals, manifest) if run.resume else None
        if finished is not None:  # killed after the last rename: the run is complete, only its journal is left
            dist.barrier("the check for a finished run")
            if dist.main:
                log.info("--resume: this run had already finished; its outputs are complete")
                shutil.rmtree(workdir, ignore_errors=True)
            return finished

        def prepare() -> Journal:
            resuming = run.resume and (workdir / "journal.jsonl").is_file()
            prepare_outdir(outdir, finals, run.overwrite, resuming=resuming)
            check_free_space(outdir, pair.height * pair.width, opts.prob_dtype)
            return open_journal(workdir, manifest, run.resume)

        journal = dist.main_first(prepare, "the preparation of the outputs").for_rank(dist.rank)
        warnings = input_warnings(pair, ckpt, identities) if dist.main else []
        timings = {"preflight_s": time.perf_counter() - t_start}
        t0 = time.perf_counter()
        import rasterio

        with process.SignalGuard(), rasterio.Env(GDAL_CACHEMAX=gdal_cache_bytes(pair, plan.tile)):
            compute, reports = _compute_share(pair, plan, journal, run, dist)
            if not dist.main:
                return PredictResult(outdir, finals["probability"], finals["mask"], finals.get("vectors"),
                                     finals["run"], reports[dist.rank].to_dict())
            timings["compute_s"] = time.perf_counter() - t0
            for r in reports:  # every rank's strips, from the gather rather than from the other ranks' files
                journal.done.update((rec["grid_row"], rec) for rec in r.records)
            compute = merge_reports(compute, reports, journal_blend(journal))
            ctx = AssemblyContext(before, after, pair, plan, run, journal, finals, compute)
            summary = _finish(ctx, timings, t_start, reports, warnings)
    finally:
        pair.close()
    result = PredictResult(outdir, finals["probability"], finals["mask"], finals.get("vectors"), finals["run"],
                           summary)
    log.info("%s", summary_paragraph(result))
    return result


def _compute_share(pair: Any, plan: PredictPlan, journal: Journal, run: RunOptions, dist: Dist
                   ) -> tuple[ComputeStats, list[RankReport]]:
    """This rank's share of the strips, then every rank's report (a failed rank's error stops them all)."""
    assert plan.grid is not None
    todo = [s for s in strip_spans(plan.grid) if s.grid_row not in journal.done]
    share = rank_share(todo, dist.rank, dist.world)
    report = RankReport.empty(dist.rank, str(plan.device))
    compute = ComputeStats()
    known = set(journal.done)
    t0 = time.perf_counter()
    try:
        compute = compute_strips(pair, plan, journal, replace(run, quiet=run.quiet or not dist.main), share)
    except Interrupted:
        raise
    except CdmapError as exc:
        if dist.world <= 1:
            raise
        report.error = (str(exc), exc.exit_code)
    report.strips, report.rows = compute.strips, compute.rows
    report.windows_computed, report.windows_skipped = compute.windows_computed, compute.windows_skipped
    report.compute_s, report.model_s = time.perf_counter() - t0, compute.model_s
    report.peak_rss_mib, report.peak_gpu_mib = peak_rss_mib(), compute.peak_gpu_mib
    report.records = [rec for gr, rec in journal.done.items() if gr not in known]
    if dist.world > 1:
        log.debug("rank %d: %d strips (%d rows) in %.1f s", dist.rank, report.strips, report.rows,
                  report.compute_s)
    try:
        reports = dist.gather(report, "the end of the compute stage")
    except RankError as exc:
        raise RankError(f"{exc}; the finished strips are kept: rerun with --resume, with any number of "
                        "processes", journal.workdir.parent) from exc
    failed = [r for r in reports if r.error is not None]
    if failed:
        msg, code = failed[0].error  # type: ignore[misc]
        err = RankError(f"rank {failed[0].rank} of {dist.world} failed: {msg}; the finished strips are kept, "
                        "rerun with --resume")
        err.exit_code = code
        raise err
    return compute, reports


def _finish(ctx: AssemblyContext, timings: dict[str, float], t_start: float, reports: list[RankReport],
            warnings: list[str]) -> dict[str, Any]:
    """Rasters, polygons, run.json (with ``warnings`` and the changed-share check), the extras (style, zones,
    report), then everything renamed into place; returns the summary."""
    from cdmap.predict.fit import changed_share_warning

    with output_errors(ctx.journal.workdir.parent):
        t1 = time.perf_counter()
        rasters = write_rasters(ctx)
        timings["rasters_s"] = time.perf_counter() - t1
        vectors, vec_path = write_vectors(ctx, timings)
        timings["total_s"] = time.perf_counter() - t_start
        summary = run_summary(ctx, rasters, vectors, timings) | {"run_key": manifest_key(ctx.journal.manifest)}
        summary["ranks"] = {"world_size": len(reports), "per_rank": [r.to_dict() for r in reports]}
        share = changed_share_warning(summary["changed_pixels"], summary["valid_pixels"])
        if share:
            log.warning("%s", share)
        summary["warnings"] = [*warnings, *([share] if share else [])]
        write_extras(ctx, summary, vec_path)
        commit_outputs(ctx.journal, ctx.finals, summary, vec_path)
    return summary
