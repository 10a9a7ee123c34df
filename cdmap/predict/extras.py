"""The last stage before the commit: outputs made from the finished rasters and polygons, in the journal's
folder so they are renamed into place with the rest: the QGIS style of the probability raster, the per-zone
change table (``--zones``) and the pictures (``preview.png``, ``report.html``; skipped with ``--no-report``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdmap import process
from cdmap.errors import Interrupted
from cdmap.predict.outputs import EXTRA_NAMES

if TYPE_CHECKING:
    from cdmap.predict.assemble import AssemblyContext

log = logging.getLogger("cdmap.predict")


def write_extras(ctx: AssemblyContext, summary: dict[str, Any], vectors: Path | None) -> None:
    """Write the optional outputs into the journal's folder; records them (and their time) in ``summary``."""
    from cdmap.raster.write import write_qgis_style

    t0 = time.perf_counter()
    work, finals = ctx.work, ctx.finals
    write_qgis_style(ctx.prob_path)
    if ctx.run.zones is not None:
        from cdmap.vector.zones import zonal_change

        z = zonal_change(ctx.mask_path, ctx.run.zones, work / EXTRA_NAMES["zones_csv"],
                         work / EXTRA_NAMES["zones_gpkg"])
        summary["zones"] = {"file": str(ctx.run.zones), "count": z.zones, "changed_m2": round(z.changed_m2, 3)}
    if ctx.run.report:
        from cdmap import report

        pair = ctx.pair
        try:
            # matplotlib's own `except Exception` would swallow a Ctrl-C raised inside it: hold signals until done
            with process.signals_blocked():
                written = report.write_run_report(work, summary, before=ctx.before, after=ctx.after,
                                                  bands=pair.bands, crs=pair.crs, transform=pair.transform,
                                                  width=pair.width, height=pair.height, mask=ctx.mask_path,
                                                  vectors=vectors)
        except Interrupted:
            raise
        except Exception as exc:  # noqa: BLE001 - a picture must never cost the user the finished rasters
            log.warning("no preview or report: %s: %s", type(exc).__name__, " ".join(str(exc).split())[:200])
            log.debug("report failure", exc_info=True)
            written = []
        if not written:  # no matplotlib (or it failed): the report's names are not outputs of this run
            for key in ("preview", "report"):
                finals.pop(key, None)
                summary["outputs"].pop(key, None)
    summary["timings"]["extras_s"] = round(time.perf_counter() - t0, 3)
