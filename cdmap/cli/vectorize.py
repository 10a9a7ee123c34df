"""``cdmap vectorize``: a thin layer over :func:`cdmap.vector.vectorize_raster`."""

from __future__ import annotations

from pathlib import Path

import typer

from cdmap.cli.app import app
from cdmap.cli.options import Overwrite, Quiet, RasterIn, VectorFormat


@app.command("vectorize")
def vectorize(
    raster: RasterIn = typer.Argument(
        ...,
        help="Change mask (uint8: 1 change, 0 none, 255 nodata) or probability raster (uint8 with scale 1/255, "
        "or float 0..1).",
    ),
    output: Path = typer.Option(
        ..., "-o", "--output",
        help="Vector file; the format follows the suffix (.gpkg, .geojson, .fgb, .shp, .parquet)."
    ),
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        help="Treat RASTER as probabilities: change where value*scale+offset >= THRESHOLD "
        "(default: 0.5 for probability rasters; masks are used as they are).",
    ),
    prob: RasterIn | None = typer.Option(
        None, "--prob", help="Probability raster on the same grid, for the mean_prob/max_prob attributes."
    ),
    min_area: float = typer.Option(0.0, "--min-area", help="Drop polygons smaller than this (m²)."),
    simplify: float = typer.Option(0.0, "--simplify", help="Topology-preserving simplification tolerance (m)."),
    vector_format: VectorFormat = None,
    layer: str = typer.Option("changes", "--layer", help="Layer name (GeoPackage, FlatGeobuf, GeoJSON)."),
    window_size: int = typer.Option(2048, "--window-size", help="Processing window side in pixels (memory bound)."),
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Polygonize the change pixels of RASTER into OUTPUT (id, area_m2, perimeter_m, mean_prob, max_prob).

    Example: cdmap vectorize out/change_probability.tif --threshold 0.6 -o changes_06.gpkg
    """
    from cdmap.vector import vectorize_raster

    stats = vectorize_raster(raster, output, threshold=threshold, prob_raster=prob, min_area=min_area,
                             simplify=simplify, vector_format=vector_format, layer=layer, window_size=window_size,
                             overwrite=overwrite)
    if not quiet:
        typer.echo(
            f"{stats.n_polygons} polygon{'s' if stats.n_polygons != 1 else ''}, "
            f"{stats.changed_area_m2:,.1f} m² changed -> {stats.path}"
        )
