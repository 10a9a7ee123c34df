"""``cdmap predict``: a thin layer over :func:`cdmap.predict.predict_scene`."""

from __future__ import annotations

from pathlib import Path

import typer

from cdmap.cli.app import app
from cdmap.cli.options import (
    Backend,
    Bands,
    BatchSize,
    CreationOptions,
    Device,
    JsonOut,
    Model,
    Overwrite,
    Precision,
    Quiet,
    RasterIn,
    Resampling,
    Threshold,
    TileSize,
    VectorFormat,
    Workers,
    parse_bands,
    parse_creation_options,
)


@app.command("predict")
def predict(
    before: RasterIn = typer.Argument(
        None, help="The earlier scene: a GeoTIFF or anything GDAL opens (/vsizip/..., /vsicurl/..., https://...)."),
    after: RasterIn = typer.Argument(None, help="The later scene; warped onto BEFORE's grid if grids differ."),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory (with --pairs: the campaign's root)."),
    pairs: Path | None = typer.Option(
        None, "--pairs", help="CSV of scene pairs (columns before, after, optional name; paths relative to the "
        "CSV): one folder per pair in OUTPUT plus OUTPUT/index.gpkg. Replaces BEFORE and AFTER."),
    model: Model = None,
    tile_size: TileSize = None,
    overlap: int | None = typer.Option(
        None, "--overlap", help="Window overlap in pixels (default: the checkpoint's measured one, else tile/8)."),
    batch_size: BatchSize = 4,
    workers: Workers = 2,
    device: Device = "auto",
    precision: Precision = "auto",
    backend: Backend = "auto",
    bands: Bands = None,
    threshold: Threshold = None,
    min_area: float = typer.Option(0.0, "--min-area", help="Drop polygons smaller than this (m²)."),
    simplify: float = typer.Option(0.0, "--simplify", help="Simplification tolerance (m)."),
    prob_dtype: str = typer.Option("uint8", "--prob-dtype", metavar="uint8|float32",
                                   help="uint8 (0-255, scale 1/255) or float32 (0..1, NaN nodata)."),
    vector_format: VectorFormat = "gpkg",
    co: CreationOptions = [],  # noqa: B006 - typer reads the default, never mutates it
    cog: bool = typer.Option(False, "--cog", help="Write Cloud Optimized GeoTIFFs."),
    align: str = typer.Option("auto", "--align", metavar="auto|strict",
                              help="auto: warp AFTER onto BEFORE's grid if needed; strict: refuse."),
    resampling: Resampling = "bilinear",
    allow_no_crs: bool = typer.Option(False, "--allow-no-crs", help="Accept two rasters without CRS (pixel grid)."),
    overwrite: Overwrite = False,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in the same OUTPUT."),
    rank_timeout: float = typer.Option(
        7200.0, "--rank-timeout", help="Under torchrun: seconds a rank waits for the others before failing."),
    no_report: bool = typer.Option(False, "--no-report", help="Do not write preview.png and report.html."),
    zones: Path | None = typer.Option(
        None, "--zones", help="Polygon file (districts, parcels): changed area per zone to change_by_zone.csv "
        "and .gpkg."),
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Map change between BEFORE and AFTER: probability, mask, polygons, run.json and a report in OUTPUT.

    Under torchrun the ranks share the scene's strips (or the --pairs); OUTPUT must be on a file system all see.

    Example: cdmap predict before.tif after.tif -o out/            (the packaged default model)
             cdmap predict before.tif after.tif -o out/ -m runs/levir/best.pt
    """
    from cdmap.errors import UsageError
    from cdmap.predict import PredictOptions, RunOptions, predict_pairs, predict_scene

    opts = PredictOptions(
        tile_size=tile_size, overlap=overlap, batch_size=batch_size, device=device, precision=precision,
        backend=backend, bands=parse_bands(bands), threshold=threshold, min_area=min_area, simplify=simplify,
        prob_dtype=prob_dtype, vector_format=vector_format, creation_options=parse_creation_options(co),
        cog=cog, align=align, resampling=resampling, allow_no_crs=allow_no_crs,
    )
    run = RunOptions(workers=workers, quiet=quiet, overwrite=overwrite, resume=resume, rank_timeout=rank_timeout,
                     report=not no_report, zones=str(zones) if zones else None)
    if pairs is not None:
        if before is not None or after is not None:
            raise UsageError("give either BEFORE AFTER or --pairs, not both")
        predict_pairs(pairs, output, model, opts, run).check()
    elif before is None or after is None:
        raise UsageError("missing BEFORE and AFTER (or --pairs PAIRS.csv)")
    else:
        result = predict_scene(before, after, output, model, opts, run)
        if json_out and result.run_json.exists():
            typer.echo(result.run_json.read_text(), nl=False)
