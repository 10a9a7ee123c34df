"""``cdmap vectorize``: a thin layer over :func:`cdmap.vector.vectorize_raster`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from cdmap.cli.app import app


@app.command("vectorize")
def vectorize(
    raster: Path = typer.Argument(
        ...,
        help="Change mask (uint8: 1 change, 0 none, 255 nodata) or probability raster (uint8 with scale 1/255, "
        "or float 0..1).",
    ),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Vector file; the format follows the suffix (.gpkg, .geojson, .fgb, .shp)."
    ),
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        help="Treat RASTER as probabilities: change where value*scale+offset >= THRESHOLD "
        "(default: 0.5 for probability rasters; masks are used as they are).",
    ),
    prob: Path | None = typer.Option(
        None, "--prob", help="Probability raster on the same grid, for the mean_prob/max_prob attributes."
    ),
    min_area: float = typer.Option(0.0, "--min-area", help="Drop polygons smaller than this (m²)."),
    simplify: float = typer.Option(0.0, "--simplify", help="Topology-preserving simplification tolerance (m)."),
    vector_format: str | None = typer.Option(
        None, "--vector-format", help="gpkg, geojson (RFC 7946, WGS84), fgb or shp (default: from the suffix)."
    ),
    layer: str = typer.Option("changes", "--layer", help="Layer name (GeoPackage, FlatGeobuf, GeoJSON)."),
    window_size: int = typer.Option(2048, "--window-size", help="Processing window side in pixels (memory bound)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUTPUT."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line."),
) -> None:
    """Polygonize the change pixels of RASTER into OUTPUT (id, area_m2, perimeter_m, mean_prob, max_prob)."""
    from cdmap.vector import vectorize_raster

    with _warnings_to_stderr():
        stats = vectorize_raster(
            raster,
            output,
            threshold=threshold,
            prob_raster=prob,
            min_area=min_area,
            simplify=simplify,
            vector_format=vector_format,
            layer=layer,
            window_size=window_size,
            overwrite=overwrite,
        )
    if not quiet:
        typer.echo(
            f"{stats.n_polygons} polygon{'s' if stats.n_polygons != 1 else ''}, "
            f"{stats.changed_area_m2:,.1f} m² changed -> {stats.path}"
        )


class _StderrWarnings(logging.Handler):
    """Prints the library's warnings as ``cdmap: warning: ...`` lines on stderr."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"cdmap: warning: {record.getMessage()}", err=True)


@contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """While the command runs, warnings logged under ``cdmap`` reach the user (records still propagate)."""
    logger = logging.getLogger("cdmap")
    handler = _StderrWarnings()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
