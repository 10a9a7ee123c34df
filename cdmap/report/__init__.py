"""Pictures of a run: ``preview.png`` and ``report.html`` for predict (evaluate adds its error map and metrics to
the same report) and ``training.png`` for train.

Drawn with matplotlib (a dependency; when it is missing the pictures are skipped with one log line, never an
error). :mod:`~cdmap.report.figures` draws, :mod:`~cdmap.report.page` writes the self-contained HTML.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cdmap.report.page import EVALUATION_MARK, size_classes

PREVIEW_NAME = "preview.png"
REPORT_NAME = "report.html"
TRAINING_PLOT_NAME = "training.png"

log = logging.getLogger("cdmap.report")
_said_missing = False

__all__ = ["available", "write_run_report", "add_evaluation", "write_training_plot", "size_classes",
           "PREVIEW_NAME", "REPORT_NAME", "TRAINING_PLOT_NAME"]


def available() -> bool:
    """True when matplotlib can be imported; otherwise logs (once per process) that pictures are skipped."""
    global _said_missing
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not _said_missing:
            log.info("no preview, report or training plot: matplotlib is not installed (pip install matplotlib)")
            _said_missing = True
        return False
    return True


def read_polygon_areas(path: str | os.PathLike, crs: Any) -> tuple[Any, Any]:
    """``(geometries in crs, area_m2 values)`` of a change-polygon file written by cdmap (any of its formats)."""
    import geopandas as gpd

    path = Path(path)
    gdf = gpd.read_parquet(path) if path.suffix.lower() == ".parquet" else gpd.read_file(path)
    if crs is not None and gdf.crs is not None and len(gdf):
        gdf = gdf.to_crs(crs.to_wkt())
    return gdf.geometry.values, gdf["area_m2"].to_numpy()


def write_run_report(folder: str | os.PathLike, summary: dict[str, Any], *, before: str | os.PathLike,
                     after: str | os.PathLike, bands: dict[str, list[int]], crs: Any, transform: Any, width: int,
                     height: int, mask: str | os.PathLike, vectors: str | os.PathLike | None = None,
                     ) -> list[Path]:
    """Write ``preview.png`` and ``report.html`` into ``folder`` for a predict run; returns the paths written
    (none without matplotlib). ``summary`` is run.json's content; the grid is the output grid."""
    if not available():
        return []
    from cdmap.report import figures, page

    folder = Path(folder)
    grid = figures.Grid(crs, transform, width, height)
    polygons = areas = None
    if vectors is not None:
        polygons, areas = read_polygon_areas(vectors, crs)
    preview = figures.preview_png(before, after, bands, grid, mask, polygons)
    hist = summary.get("probability_histogram")
    threshold = summary.get("threshold", 0.5)
    hist_png = figures.histogram_png(hist["counts"], threshold) if hist else None
    classes = size_classes(areas) if areas is not None else None
    classes_png = figures.size_classes_png(classes) if classes and any(c["polygons"] for c in classes) else None
    preview_path = figures.write_png(preview, folder / PREVIEW_NAME)
    report_path = folder / REPORT_NAME
    _write_text(report_path, page.page(summary, preview=preview, histogram=hist_png, classes=classes,
                                       classes_png=classes_png))
    return [preview_path, report_path]


def add_evaluation(report: str | os.PathLike, metrics: dict[str, Any], labels: str | os.PathLike,
                   error_map: str | os.PathLike | None = None) -> bool:
    """Insert the metrics (and the error map, drawn from its GeoTIFF) into an existing ``report.html``.

    Returns False (and changes nothing) when there is no report or no matplotlib."""
    report = Path(report)
    if not report.is_file() or not available():
        return False
    from cdmap.report import figures, page

    text = report.read_text()
    if EVALUATION_MARK not in text:
        return False
    png = figures.error_map_png(error_map) if error_map is not None else None
    section = page.evaluation_section(metrics, str(labels), png, Path(error_map).name if error_map else None)
    _write_text(report, text.replace(EVALUATION_MARK, section, 1))
    return True


def write_training_plot(history: Sequence[dict[str, float]], path: str | os.PathLike) -> Path | None:
    """Loss and F1 curves of ``history`` (metrics.csv rows) as ``path``; None without matplotlib or rows."""
    if not history or not available():
        return None
    from cdmap.report import figures

    return figures.write_png(figures.training_png(history), path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
