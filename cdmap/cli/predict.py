"""``cdmap predict``: a thin layer over :func:`cdmap.predict.predict_scene`."""

from __future__ import annotations

from pathlib import Path

import typer

from cdmap.cli.app import app


def parse_creation_options(values: list[str]) -> dict[str, str]:
    """``["COMPRESS=ZSTD", ...]`` -> ``{"COMPRESS": "ZSTD"}``; rejects entries without ``=``."""
    from cdmap.errors import UsageError

    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--co expects NAME=VALUE, got {item!r}")
        out[name.strip().upper()] = value.strip()
    return out


def parse_bands(value: str | None) -> list[int] | None:
    """``"3,2,1"`` -> ``[3, 2, 1]`` (1-based band numbers, as in GDAL and rasterio)."""
    from cdmap.errors import UsageError

    if not value:
        return None
    try:
        bands = [int(b) for b in value.split(",") if b.strip()]
    except ValueError as exc:
        raise UsageError(f"--bands expects comma-separated band numbers like 3,2,1, got {value!r}") from exc
    if not bands or any(b < 1 for b in bands):
        raise UsageError(f"--bands numbers start at 1, got {value!r}")
    return bands


@app.command("predict")
def predict(
    before: Path = typer.Argument(..., help="The earlier scene (GeoTIFF or any GDAL raster)."),
    after: Path = typer.Argument(..., help="The later scene; warped onto BEFORE's grid if grids differ."),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory."),
    model: Path = typer.Option(..., "--model", "-m", help="cdmap checkpoint (.pt)."),
    tile_size: int | None = typer.Option(None, "--tile-size", help="Window size (default: the checkpoint's)."),
    overlap: int | None = typer.Option(None, "--overlap", help="Window overlap in pixels (default: tile/8)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per model call."),
    workers: int = typer.Option(2, "--workers", help="Reader threads."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16."),
    bands: str | None = typer.Option(None, "--bands", help="Bands to use, 1-based, e.g. 3,2,1."),
    threshold: float | None = typer.Option(None, "--threshold", help="P(change) threshold (default: checkpoint's)."),
    min_area: float = typer.Option(0.0, "--min-area", help="Drop polygons smaller than this (m²)."),
    simplify: float = typer.Option(0.0, "--simplify", help="Simplification tolerance (m)."),
    prob_dtype: str = typer.Option("uint8", "--prob-dtype", help="uint8 (0-255, scale 1/255) or float32."),
    vector_format: str = typer.Option("gpkg", "--vector-format", help="gpkg, geojson, fgb, shp or none."),
    co: list[str] = typer.Option([], "--co", help="GDAL creation option NAME=VALUE (repeatable)."),
    cog: bool = typer.Option(False, "--cog", help="Write Cloud Optimized GeoTIFFs."),
    align: str = typer.Option("auto", "--align", help="auto: warp AFTER onto BEFORE's grid if needed; strict: refuse."),
    resampling: str = typer.Option("bilinear", "--resampling", help="Resampling when warping AFTER."),
    allow_no_crs: bool = typer.Option(False, "--allow-no-crs", help="Accept two rasters without CRS (pixel grid)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in the same OUTPUT."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Map change between BEFORE and AFTER: probability, mask, polygons and run.json in OUTPUT."""
    from cdmap.predict import PredictOptions, RunOptions, predict_scene

    opts = PredictOptions(
        tile_size=tile_size, overlap=overlap, batch_size=batch_size, device=device, precision=precision,
        bands=parse_bands(bands), threshold=threshold, min_area=min_area, simplify=simplify,
        prob_dtype=prob_dtype, vector_format=vector_format, creation_options=parse_creation_options(co),
        cog=cog, align=align, resampling=resampling, allow_no_crs=allow_no_crs,
    )
    run = RunOptions(workers=workers, quiet=quiet, overwrite=overwrite, resume=resume)
    predict_scene(before, after, output, model, opts, run)
