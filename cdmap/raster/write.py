"""GeoTIFF writing for the predict pipeline: tiled, compressed, strip by strip, with overviews.

Rows arrive top to bottom in full-width strips (heights multiples of 512 but the last), so with 512-pixel
tiles every strip completes whole rows of tiles and GDAL writes each tile once.

Defaults (each can be overridden by ``creation_options``, GDAL's ``--co NAME=VALUE``): ``TILED=YES``,
``BLOCKXSIZE=BLOCKYSIZE=512`` (the raster's size rounded up to 16 when it is smaller than 512 both ways),
``COMPRESS=DEFLATE`` with ``PREDICTOR=2`` for integers and ``3`` for floats, ``BIGTIFF=IF_SAFER`` and
``NUM_THREADS=ALL_CPUS``. A creation option GDAL rejects or ignores raises :class:`UsageError`; any
failure while writing (disk full, permissions) raises :class:`OutputError` naming the file.

:func:`to_cog` and :func:`validate_cog` live in :mod:`cdmap.raster.cog` and are re-exported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
import rasterio.transform
from rasterio.enums import Resampling
from rasterio.windows import Window

from cdmap.errors import OutputError, UsageError
from cdmap.raster.cog import to_cog, validate_cog
from cdmap.raster.gdal_errors import GDAL_ERRORS, capture_option_warnings, gdal_message, option_error

__all__ = ["RasterWriter", "to_cog", "validate_cog", "default_creation_options", "overview_factors",
           "BLOCK_SIZE", "qgis_probability_style", "write_qgis_style"]

BLOCK_SIZE = 512


def _free_space_note(path: Path) -> str:
    import shutil

    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        return ""
    return " (No space left on device)" if free < 1 << 20 else ""


def _is_float(dtype: Any) -> bool:
    return np.dtype(dtype).kind == "f"


def default_creation_options(width: int, height: int, dtype: Any) -> dict[str, str]:
    """cdmap's default GTiff creation options for a raster of this size and dtype."""
    if width >= BLOCK_SIZE or height >= BLOCK_SIZE:
        bx = by = BLOCK_SIZE
    else:
        bx = by = max(16, -(-max(width, height) // 16) * 16)
    return {
        "TILED": "YES",
        "BLOCKXSIZE": str(bx),
        "BLOCKYSIZE": str(by),
        "COMPRESS": "DEFLATE",
        "PREDICTOR": "3" if _is_float(dtype) else "2",
        "BIGTIFF": "IF_SAFER",
        "NUM_THREADS": "ALL_CPUS",
    }


def merge_creation_options(defaults: dict[str, str], user: dict[str, str] | None) -> dict[str, str]:
    """Defaults overridden by the user's options (names case-insensitive).

    A user compression without a predictor (NONE, JPEG, WEBP, LERC...) drops the default predictor.
    """
    opts = {k.upper(): str(v) for k, v in defaults.items()}
    user_opts = {str(k).upper(): str(v) for k, v in (user or {}).items()}
    opts.update(user_opts)
    if "PREDICTOR" not in user_opts and opts.get("COMPRESS", "").upper() not in ("DEFLATE", "LZW", "ZSTD"):
        opts.pop("PREDICTOR", None)
    return opts


def check_creation_options(user: dict[str, str] | None) -> None:
    """Raise :class:`UsageError` naming ``--co`` when GDAL rejects or ignores one of ``user``'s creation options.

    Tried on a small raster in memory (``/vsimem``) with the defaults merged in, so a run is refused before it
    touches any output.
    """
    if not user:
        return
    import uuid

    opts = merge_creation_options(default_creation_options(BLOCK_SIZE, BLOCK_SIZE, "uint8"), user)
    path = f"/vsimem/cdmap-co-check-{uuid.uuid4().hex}.tif"
    profile = dict(driver="GTiff", width=BLOCK_SIZE, height=BLOCK_SIZE, count=1, dtype="uint8",
                   transform=rasterio.transform.from_origin(0.0, float(BLOCK_SIZE), 1.0, 1.0))
    try:
        with capture_option_warnings() as complaints, rasterio.open(path, "w", **profile, **opts):
            pass
    except GDAL_ERRORS as exc:
        raise UsageError(f"--co: bad creation option: {gdal_message(exc).replace(path, 'GTiff')}") from exc
    finally:
        try:
            rasterio.shutil.delete(path)
        except GDAL_ERRORS:
            pass
    if complaints:
        raise UsageError(f"--co: bad creation option: {complaints[0]}")


def overview_factors(width: int, height: int, block: int = BLOCK_SIZE) -> list[int]:
    """Overview factors 2, 4, 8... until the overview fits in one block (GDAL COG driver's rule)."""
    factors: list[int] = []
    f = 2
    while max(width, height) / (f // 2) > block and min(width, height) // f >= 1:
        factors.append(f)
        f *= 2
    return factors


class RasterWriter:
    """A tiled GeoTIFF written strip by strip; use as a context manager.

    ``scale``/``offset`` are stored as GDAL band scale/offset (value = raw * scale + offset), ``tags`` as
    dataset metadata (non-string values JSON-encoded), ``description`` as the band description(s).
    ``mask_band=True`` adds an internal per-dataset mask written with :meth:`write_mask_rows` (for
    outputs without a nodata value). ``colormap`` (value -> RGBA) makes band 1 a paletted band, so GIS
    viewers show the classes in those colours.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        width: int,
        height: int,
        crs: Any,
        transform: Any,
        dtype: Any,
        nodata: float | None,
        count: int = 1,
        creation_options: dict[str, str] | None = None,
        tags: dict | None = None,
        scale: float | None = None,
        offset: float | None = None,
        description: str | None = None,
        mask_band: bool = False,
        colormap: dict[int, tuple[int, int, int, int]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.width, self.height, self.count = int(width), int(height), int(count)
        self.dtype = np.dtype(dtype)
        self.mask_band = mask_band
        self.creation_options = merge_creation_options(
            default_creation_options(self.width, self.height, self.dtype), creation_options)
        self._rows_written = 0
        parent = self.path.parent
        if not parent.is_dir():
            raise OutputError("cannot create raster: its folder does not exist", self.path)
        profile = dict(driver="GTiff", width=self.width, height=self.height, count=self.count,
                       dtype=self.dtype.name, crs=crs, transform=transform, nodata=nodata)
        try:
            with capture_option_warnings() as complaints:
                self._ds = rasterio.open(self.path, "w", **profile, **self.creation_options)
        except GDAL_ERRORS as exc:
            if option_error(exc, self.creation_options):
                raise UsageError(f"bad creation option: {gdal_message(exc)}", self.path) from exc
            raise OutputError(f"cannot create raster: {gdal_message(exc)}", self.path) from exc
        if complaints:
            self._ds.close()
            self._remove()
            raise UsageError(f"bad creation option: {complaints[0]}", self.path)
        try:
            if scale is not None or offset is not None:
                self._ds.scales = [1.0 if scale is None else float(scale)] * self.count
                self._ds.offsets = [0.0 if offset is None else float(offset)] * self.count
            if tags:
                self._ds.update_tags(**{str(k): v if isinstance(v, str) else json.dumps(v, default=str)
                                        for k, v in tags.items()})
            if description:
                for i in range(1, self.count + 1):
                    self._ds.set_band_description(i, description)
            if colormap:
                self._ds.write_colormap(1, colormap)
        except GDAL_ERRORS as exc:
            self._abort()
            raise OutputError(f"cannot write raster metadata: {gdal_message(exc)}{_free_space_note(self.path)}",
                              self.path) from exc

    # -- writing

    def _window(self, row_off: int, rows: int) -> Window:
        if row_off < 0 or rows < 1 or row_off + rows > self.height:
            raise ValueError(f"rows {row_off}:{row_off + rows} outside a raster of {self.height} rows")
        return Window(0, row_off, self.width, rows)

    def write_rows(self, row_off: int, array: np.ndarray) -> None:
        """Write full-width rows starting at ``row_off``: 2-D for one band, else (count, rows, width)."""
        array = np.asarray(array)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3 or array.shape[0] != self.count or array.shape[2] != self.width:
            raise ValueError(f"expected ({self.count}, rows, {self.width}) rows, got {array.shape}")
        window = self._window(row_off, array.shape[1])
        try:
            self._ds.write(array.astype(self.dtype, copy=False), window=window)
        except GDAL_ERRORS as exc:
            raise OutputError(f"cannot write rows {row_off}-{row_off + array.shape[1] - 1}: "
                              f"{gdal_message(exc)}{_free_space_note(self.path)}", self.path) from exc
        self._rows_written = max(self._rows_written, row_off + array.shape[1])

    def write_mask_rows(self, row_off: int, valid: np.ndarray) -> None:
        """Write the internal mask (True/nonzero = valid) for full-width rows; needs ``mask_band=True``."""
        if not self.mask_band:
            raise ValueError("this RasterWriter was created without mask_band=True")
        valid = np.asarray(valid)
        if valid.ndim != 2 or valid.shape[1] != self.width:
            raise ValueError(f"expected (rows, {self.width}) mask rows, got {valid.shape}")
        window = self._window(row_off, valid.shape[0])
        try:
            self._ds.write_mask(np.where(valid, 255, 0).astype(np.uint8), window=window)
        except GDAL_ERRORS as exc:
            raise OutputError(f"cannot write mask rows {row_off}-{row_off + valid.shape[0] - 1}: "
                              f"{gdal_message(exc)}{_free_space_note(self.path)}", self.path) from exc

    def build_overviews(self, resampling: str = "nearest") -> list[int]:
        """Add internal overviews (factors 2, 4, ... until one block); ``nearest`` for masks, ``average`` for
        probabilities. Call after all rows are written. Returns the factors."""
        try:
            method = Resampling[resampling]
        except KeyError:
            raise UsageError(f"unknown overview resampling {resampling!r}") from None
        factors = overview_factors(self.width, self.height, BLOCK_SIZE)
        if not factors:
            return []
        block = self.creation_options.get("BLOCKXSIZE", str(BLOCK_SIZE))
        try:
            with rasterio.Env(GDAL_TIFF_OVR_BLOCKSIZE=block):
                self._ds.build_overviews(factors, method)
                self._ds.update_tags(ns="rio_overview", resampling=resampling)
        except GDAL_ERRORS as exc:
            raise OutputError(f"cannot build overviews: {gdal_message(exc)}", self.path) from exc
        return factors

    # -- closing

    def close(self) -> None:
        """Flush and close; write errors surface here as :class:`OutputError`. Idempotent."""
        ds, self._ds = getattr(self, "_ds", None), None
        if ds is None:
            return
        try:
            ds.close()
        except GDAL_ERRORS as exc:
            raise OutputError(f"cannot finish writing raster: {gdal_message(exc)}", self.path) from exc
        self._verify()

    def _verify(self) -> None:
        """Reopen and read the last block: rasterio does not report a failed GDALClose (e.g. disk full)."""
        try:
            with rasterio.open(self.path) as ds:
                bh, bw = ds.block_shapes[0]
                row = max(0, ds.height - bh)
                col = max(0, ds.width - bw)
                ds.read(1, window=Window(col, row, min(bw, ds.width), min(bh, ds.height)))
        except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
            free = _free_space_note(self.path)
            raise OutputError(f"cannot finish writing raster, the file is unreadable{free}", self.path) from exc

    def _abort(self) -> None:
        try:
            self.close()
        except OutputError:
            pass

    def _remove(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return getattr(self, "_ds", None) is None

    def __enter__(self) -> RasterWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def __repr__(self) -> str:
        return f"RasterWriter({str(self.path)!r}, {self.width}x{self.height}x{self.count} {self.dtype.name})"


#: (value, colour) stops of the probability colour ramp (matplotlib's magma; low = dark, high = bright).
PROBABILITY_RAMP = ((0.0, "#000004"), (0.25, "#51127c"), (0.5, "#b73779"), (0.75, "#fc8961"), (1.0, "#fcfdbf"))


def qgis_probability_style() -> str:
    """A QGIS layer style (``.qml``) showing P(change) 0..1 with :data:`PROBABILITY_RAMP`.

    QGIS applies the band scale/offset, so one style serves the uint8 (scale 1/255) and float32 rasters.
    """
    items = "\n".join(f'          <item alpha="255" value="{v:g}" label="{v:.2f}" color="{c}"/>'
                      for v, c in PROBABILITY_RAMP)
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.28.0" styleCategories="Symbology">
  <pipe>
    <rasterrenderer type="singlebandpseudocolor" band="1" opacity="1" alphaBand="-1"
                    classificationMin="0" classificationMax="1" nodataColor="">
      <rasterTransparency/>
      <minMaxOrigin>
        <limits>None</limits>
        <extent>WholeRaster</extent>
        <statAccuracy>Estimated</statAccuracy>
        <cumulativeCutLower>0.02</cumulativeCutLower>
        <cumulativeCutUpper>0.98</cumulativeCutUpper>
        <stdDevFactor>2</stdDevFactor>
      </minMaxOrigin>
      <rastershader>
        <colorrampshader colorRampType="INTERPOLATED" classificationMode="1" clip="0"
                         minimumValue="0" maximumValue="1" labelPrecision="2">
{items}
        </colorrampshader>
      </rastershader>
    </rasterrenderer>
    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>
    <huesaturation saturation="0" colorizeOn="0" grayscaleMode="0" invertColors="0"/>
    <rasterresampler maxOversampling="2"/>
  </pipe>
  <blendMode>0</blendMode>
</qgis>
"""


def write_qgis_style(raster: str | os.PathLike) -> Path:
    """Write :func:`qgis_probability_style` as ``<raster stem>.qml`` beside ``raster`` (QGIS loads it with
    the layer); returns its path."""
    path = Path(raster).with_suffix(".qml")
    try:
        path.write_text(qgis_probability_style())
    except OSError as exc:
        raise OutputError(f"cannot write QGIS style: {exc.strerror or exc}", path) from exc
    return path
