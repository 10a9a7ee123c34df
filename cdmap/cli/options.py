"""Options shared by several commands, defined once (name, help, parsing); commands give the default.

Use them as annotations: ``device: Device = "auto"``. Parsing callbacks turn text into the values the
library takes, so every command accepts and refuses the same spellings.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cdmap.cli.logs import set_quiet
from cdmap.vector import FORMATS  # light: cdmap.vector imports no rasterio/geopandas until used


def parse_creation_options(values: list[str] | None) -> dict[str, str]:
    """``["COMPRESS=ZSTD", ...]`` -> ``{"COMPRESS": "ZSTD"}``; rejects entries without ``=``."""
    from cdmap.errors import UsageError

    out = {}
    for item in values or []:
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


def _quiet_callback(value: bool) -> bool:
    if value:
        set_quiet()
    return value


#: GDAL warper resampling names (cdmap.raster.pair.WARP_RESAMPLINGS; tests/test_cli_help.py checks they agree)
RESAMPLINGS = ("nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average", "mode", "max", "min", "med",
               "q1", "q3", "sum", "rms")

Device = Annotated[str, typer.Option(
    "--device", metavar="auto|cpu|cuda[:N]",
    help="auto (CUDA when available, else CPU; the default), cpu or cuda[:N].")]
Precision = Annotated[str, typer.Option(
    "--precision", metavar="auto|fp32|bf16|fp16",
    help="auto (the default: bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (fp16 on CUDA only).")]
Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", callback=_quiet_callback, help="No progress bar, summary or notes; warnings and errors only.")]
Threshold = Annotated[float | None, typer.Option(
    "--threshold", help="P(change) threshold, 0..1 (default: the checkpoint's calibrated threshold).")]
Workers = Annotated[int, typer.Option(
    "--workers", help="Parallel readers: threads for scenes, DataLoader processes for tiles (train: one per CPU "
    "core but one, at most 8).")]
Bands = Annotated[str | None, typer.Option(
    "--bands", help="Bands to use, 1-based and in the model's order, e.g. 3,2,1 (default: all but alpha).")]
CreationOptions = Annotated[list[str], typer.Option(
    "--co", help="GDAL creation option NAME=VALUE for the rasters (repeatable).")]
VectorFormat = Annotated[str, typer.Option(
    "--vector-format", metavar="|".join(FORMATS),
    help=f"Polygon format: {', '.join(FORMATS)} (GeoJSON is RFC 7946, WGS84); predict also "
    "takes none (no polygons), vectorize defaults to the one the output suffix names.")]
Backend = Annotated[str, typer.Option(
    "--backend", help="Execution backend: auto (the fastest installed one that matches torch fp32 on this device), "
    "torch, compile (torch.compile: 20-50 s of compiling first, for large scenes), onnxruntime (pip install "
    "'cdmap[onnx]') or openvino ('cdmap[openvino]'); a backend that fails falls back to torch with one warning.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for scripts).")]
Resampling = Annotated[str, typer.Option(
    "--resampling", metavar="|".join(RESAMPLINGS[:6]) + "|...",
    help=f"Resampling when AFTER is warped onto BEFORE's grid: {', '.join(RESAMPLINGS)}.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Windows or tiles per model call.")]
TileSize = Annotated[int | None, typer.Option(
    "--tile-size", help="Window size in pixels (default: the checkpoint's training tile size).")]
Model = Annotated[str | None, typer.Option(
    "--model", "-m", metavar="NAME|PATH",
    help="A packaged model (see `cdmap models`) or a checkpoint file (default: the packaged default model).")]
OptionalModel = Annotated[str | None, typer.Option(
    "--model", "-m", metavar="NAME|PATH", help="A packaged model (see `cdmap models`) or a checkpoint file "
    "(default: the packaged default model; not used with --mask).")]
LabelValues = Annotated[str | None, typer.Option(
    "--label-values", help="Label coding NO_CHANGE,CHANGE, e.g. 1,2 for OSCD (default: 0/1 or 0/255).")]
LabelsPixelGrid = Annotated[bool, typer.Option(
    "--labels-pixel-grid", help="Accept a label raster without georeferencing whose pixels are BEFORE's (same size).")]
# raster inputs are str, not Path: Path turns /vsicurl/https://host/x.tif into /vsicurl/https:/host/x.tif
RasterIn = str
