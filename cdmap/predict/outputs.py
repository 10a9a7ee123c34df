"""Predict's outputs: their names, the output folder's checks, the free-space preflight, run.json and the
final renaming into place (run.json last: its presence marks a complete run)."""

from __future__ import annotations

import json
import os
import resource
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdmap import process
from cdmap._version import __version__
from cdmap.errors import OutputError
from cdmap.files import fsync_dir
from cdmap.vector import FORMATS as VECTOR_DRIVERS

if TYPE_CHECKING:
    from cdmap.predict.assemble import AssemblyContext, RasterStats
    from cdmap.predict.journal import Journal

PROB_NAME = "change_probability.tif"
MASK_NAME = "change_mask.tif"
RUN_NAME = "run.json"
VECTOR_NAME = "changes"
# format name -> suffix of the file predict writes; the formats themselves are cdmap.vector's
VECTOR_FORMATS = {name: suffixes[0] for name, (_driver, suffixes) in VECTOR_DRIVERS.items()} | {"none": None}
MASK_NODATA = 255
STYLE_NAME = "change_probability.qml"
ZONES_NAME = "change_by_zone"  # .csv and .gpkg
#: outputs written beside the rasters when asked for (key -> file name); renamed into place with the others
EXTRA_NAMES = {"style": STYLE_NAME, "preview": "preview.png", "report": "report.html",
               "zones_csv": f"{ZONES_NAME}.csv", "zones_gpkg": f"{ZONES_NAME}.gpkg"}


@dataclass
class PredictResult:
    """Where the outputs are and the run summary (the content of ``run.json``)."""

    outdir: Path
    probability: Path
    mask: Path
    vectors: Path | None
    run_json: Path
    summary: dict[str, Any]


def output_paths(outdir: Path, vector_format: str) -> dict[str, Path]:
    """The final output names for ``outdir`` (the shapefile's companion files included)."""
    paths = {"probability": outdir / PROB_NAME, "mask": outdir / MASK_NAME, "run": outdir / RUN_NAME}
    ext = VECTOR_FORMATS[vector_format]
    if ext:
        paths["vectors"] = outdir / f"{VECTOR_NAME}{ext}"
        if vector_format == "shp":
            for e in (".shx", ".dbf", ".prj", ".cpg"):
                paths[f"vectors{e}"] = outdir / f"{VECTOR_NAME}{e}"
    return paths


def extra_output_paths(outdir: Path, report: bool, zones: bool) -> dict[str, Path]:
    """The final names of the optional outputs: the QGIS style always, the report and zone tables when asked."""
    keys = ["style"] + (["preview", "report"] if report else []) + (["zones_csv", "zones_gpkg"] if zones else [])
    return {k: outdir / EXTRA_NAMES[k] for k in keys}


def prepare_outdir(outdir: Path, finals: dict[str, Path], overwrite: bool, resuming: bool = False) -> None:
    """Refuse to replace outputs without ``overwrite``; create ``outdir`` and check it is writable."""
    existing = [p for p in finals.values() if p.exists()]
    # a resumed run may replace outputs that its own interrupted final renaming left behind
    if existing and not overwrite and not (resuming and not finals["run"].exists()):
        raise OutputError(f"output exists and won't be overwritten without --overwrite ({existing[0].name})",
                          outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OutputError("output path exists and is not a directory", outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        probe = outdir / f".cdmap-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"output directory is not writable ({exc.strerror or exc})", outdir) from exc


def manifest_key(manifest: dict[str, Any]) -> str:
    """The identity of a run (its resume manifest), recorded in run.json as ``run_key``."""
    from cdmap.files import text_digest

    return text_digest(json.dumps(manifest, sort_keys=True, default=str))


def finished_run(outdir: Path, finals: dict[str, Path], manifest: dict[str, Any]) -> PredictResult | None:
    """The result of the run described by ``manifest`` when ``outdir`` already holds it complete (run.json with
    its ``run_key`` and every output), else None."""
    try:
        summary = json.loads(finals["run"].read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("run_key") != manifest_key(manifest):
        return None
    if not all(p.exists() for p in finals.values()):
        return None
    return PredictResult(outdir, finals["probability"], finals["mask"], finals.get("vectors"), finals["run"],
                         summary)


def check_free_space(outdir: Path, pixels: int, prob_dtype: str) -> None:
    """Refuse before any compute when the disk clearly cannot hold the journal strips and the outputs."""
    bytes_px = 1 if prob_dtype == "uint8" else 4
    # strips are stored uncompressed (+1 bit validity); rasters and polygons compress, assume half
    need = pixels * (bytes_px + 0.125) + pixels * (bytes_px + 1) * 0.5
    try:
        free = shutil.disk_usage(outdir).free
    except OSError:
        return
    if free < need:
        raise OutputError(f"not enough free space: about {need / 2**20:.0f} MiB needed, "
                          f"{free / 2**20:.0f} MiB free (No space left on device)", outdir)


@contextmanager
def output_errors(outdir: Path) -> Iterator[None]:
    """An OSError while finishing the outputs becomes a one-line :class:`OutputError` naming ``outdir``."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write outputs: {exc.strerror or exc}", outdir) from exc


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_summary(ctx: AssemblyContext, rasters: RasterStats, vectors: Any, timings: dict[str, float]
                ) -> dict[str, Any]:
    """The content of run.json (see the README)."""
    pair, plan, compute, grid = ctx.pair, ctx.plan, ctx.compute, ctx.plan.grid
    assert grid is not None
    ckpt = plan.checkpoint
    total_px = grid.height * grid.width
    run_opts = {k: v for k, v in asdict(ctx.run).items() if k not in ("quiet", "json")}
    hist = rasters.prob_histogram
    return {
        "cdmap_version": __version__,
        "inputs": {"before": str(ctx.before), "after": str(ctx.after),
                   "width": grid.width, "height": grid.height, "bands": pair.count,
                   "crs": pair.crs.to_string() if pair.crs else None,
                   "transform": list(pair.transform)[:6]},
        "alignment": pair.alignment.to_dict(),
        "options": asdict(plan.options) | run_opts | {"blend_margin": grid.blend_margin},
        "window": {"tile": plan.tile, "overlap": plan.overlap, "margin": grid.blend_margin},
        "model": {"checkpoint": str(ckpt.source) if ckpt.source else None, "sha256": ckpt.sha256,
                  "name": ckpt.card.get("name"), "licence": ckpt.card.get("licence"),
                  "config": ckpt.model_config.to_dict(), "trained_tile_size": ckpt.tile_size},
        "device": compute.device,
        "precision": compute.precision,
        "backend": compute.backend,
        "backend_setup_s": round(compute.backend_setup_s, 3),
        "windows": {"total": compute.windows_total, "computed": compute.windows_computed,
                    "skipped_nodata": compute.windows_skipped},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "mpix_per_s": round(total_px / 1e6 / timings["total_s"], 4) if timings["total_s"] else None,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_gpu_mib": compute.peak_gpu_mib,
        "valid_pixels": rasters.valid_pixels,
        "changed_pixels": rasters.changed_pixels,
        "changed_area_m2": round(rasters.changed_area_m2, 3),
        "changed_area_ha": round(rasters.changed_area_m2 / 1e4, 5),
        "changed_share": round(rasters.changed_pixels / rasters.valid_pixels, 6) if rasters.valid_pixels else None,
        "threshold": plan.threshold,
        "probability_histogram": {"bin_width": 1 / len(hist), "counts": [int(c) for c in hist]},
        "polygons": vectors.n_polygons if vectors else None,
        "seam_ratio": compute.blend.seam_ratio,
        "overlap_disagreement": compute.blend.overlap_disagreement,
        "outputs": {k: str(v) for k, v in ctx.finals.items() if not k.startswith("vectors.")},
    }


def commit_outputs(journal: Journal, finals: dict[str, Path], summary: dict[str, Any],
                   vectors: Path | None) -> None:
    """Write run.json in the journal's folder, rename every output into place with SIGINT/SIGTERM held, then
    remove the journal.

    A replaced run's run.json is removed first and the new one renamed last, so a folder holding a run.json
    always holds one run's outputs, even after a kill (SIGKILL, power loss) in the middle of the renames.
    """
    workdir = journal.workdir
    tmp_run = workdir / RUN_NAME
    tmp_run.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    with process.signals_blocked():
        if finals["run"].exists():
            finals["run"].unlink()
            fsync_dir(finals["run"].parent)
        moves = [(workdir / PROB_NAME, finals["probability"]), (workdir / MASK_NAME, finals["mask"])]
        if vectors is not None:
            moves += [(f, finals["vectors"].with_name(f.name)) for f in sorted(vectors.parent.iterdir())]
        moves += [(workdir / finals[k].name, finals[k]) for k in EXTRA_NAMES if k in finals]
        moves.append((tmp_run, finals["run"]))  # last: run.json marks a complete run
        for src, dst in moves:
            os.replace(src, dst)
            process.fault_point("commit")
        fsync_dir(finals["run"].parent)
        process.fault_point("committed")
        journal.remove()



def summary_paragraph(r: PredictResult) -> str:
    """The closing lines printed after a run: size, wall time, changed area, polygons, seams, outputs."""
    s = r.summary
    seam = s["seam_ratio"]
    share = s.get("changed_share")
    kpix = (s["mpix_per_s"] or 0.0) * 1000
    names = [Path(p).name for p in s["outputs"].values()]
    return (
        f"done: {s['inputs']['width']:,} x {s['inputs']['height']:,} px in {s['timings']['total_s']:.1f} s "
        f"({kpix:,.3g} kPix/s on {s['device']}, {s['precision']})\n"
        f"  changed   {s['changed_area_m2']:,.1f} m² = {s['changed_area_m2'] / 1e4:,.4g} ha"
        + (f" ({100 * share:.2f} % of the valid scene)" if share is not None else "")
        + (f", {s['polygons']:,} polygon{'s' if s['polygons'] != 1 else ''}" if s["polygons"] is not None else "")
        + (f"\n  seams     ratio {seam:.3f} (1.0 = none)" if seam is not None else "")
        + f"\n  outputs   {r.outdir}/: {', '.join(names)}"
    )
