"""Writing change polygons: the vector formats, the writer and the checks on the target path.

GeoPackage, FlatGeobuf, Shapefile and GeoParquet keep the raster CRS; GeoJSON follows RFC 7946 (WGS84 lon/lat,
7 decimals). GeoPackages are written as version 1.3 (:data:`GPKG_OPTIONS`), which GDAL 3.6 readers (QGIS LTR on
Debian/Ubuntu) open without a version warning. GeoParquet needs the ``pyarrow`` package (``cdmap[parquet]``).
Output is written under a temporary name in the target directory and renamed on success.
GeoPackage and Shapefile layers are appended in batches, so the output is not held in memory; FlatGeobuf (its
spatial index needs every feature, and reorders them on disk) and GeoJSON are written in one go at the end.
"""

from __future__ import annotations

import os
import secrets
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cdmap.errors import OutputError, UsageError

#: format name -> (OGR driver, file suffixes recognised for it). The keys are the one vocabulary of
#: ``--vector-format`` values; a suffix (``.json``) is only recognised on a file name.
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gpkg": ("GPKG", (".gpkg",)),
    "geojson": ("GeoJSON", (".geojson", ".json")),
    "fgb": ("FlatGeobuf", (".fgb",)),
    "shp": ("ESRI Shapefile", (".shp",)),
    "parquet": ("GeoParquet", (".parquet",)),
}
#: GeoPackage creation options: 1.3, not GDAL >= 3.7's default 1.4, which GDAL 3.6 reads with a warning
GPKG_OPTIONS = {"VERSION": "1.3"}

# Shapefile (DBF) field names are limited to 10 characters.
_SHP_RENAME = {"perimeter_m": "perim_m"}
_SHP_COMPANIONS = (".shp", ".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx", ".qpj", ".shp.xml")
COLUMNS = ("id", "n_pixels", "area_m2", "perimeter_m", "mean_prob", "max_prob")


def check_format_name(name: str, extra: Sequence[str] = ()) -> str:
    """``name`` when it is one of :data:`FORMATS` (or of ``extra``, e.g. predict's ``none``), else a UsageError."""
    choices = [*FORMATS, *extra]
    if name not in choices:
        raise UsageError(f"--vector-format must be one of {', '.join(choices)}, not {name!r}")
    return name


def format_from_path(output: str | Path, vector_format: str | None = None) -> str:
    """The format name (``gpkg``/``geojson``/``fgb``/``shp``) given explicitly or implied by the suffix."""
    output = Path(output)
    if vector_format is not None:
        name = check_format_name(vector_format)
        if name == "shp" and output.suffix.lower() != ".shp":
            raise UsageError("a Shapefile output must end in .shp", path=output)
        return name
    suffix = output.suffix.lower()
    for name, (_driver, suffixes) in FORMATS.items():
        if suffix in suffixes:
            return name
    raise UsageError(
        f"cannot tell the vector format from the suffix {suffix or '(none)'!r}; use .gpkg, .geojson, .fgb, .parquet or "
        "a .shp name, or give --vector-format",
        path=output,
    )


def output_files(output: Path, fmt: str) -> list[Path]:
    """Every file writing ``output`` in ``fmt`` may create or replace (a Shapefile's companions included)."""
    if fmt != "shp":
        return [output]
    return [output.with_name(output.stem + ext) for ext in _SHP_COMPANIONS]


def check_target(output: Path, overwrite: bool) -> None:
    """An OutputError unless ``output`` can be (re)placed: not a directory, absent or ``overwrite``, parent exists."""
    if output.is_dir():
        raise OutputError("is a directory", path=output)
    if output.exists() and not overwrite:
        raise OutputError("exists; give --overwrite to replace it", path=output)
    if not output.parent.is_dir():
        raise OutputError("directory does not exist", path=output.parent)


class Writer:
    """Writes record batches under a temporary name beside ``output``; :meth:`commit` renames it into place.

    GeoPackage and Shapefile layers are appended batch by batch (memory stays bounded); FlatGeobuf (its
    spatial index needs every feature) and GeoJSON are written in one go at :meth:`commit`.
    """

    def __init__(self, output: Path, fmt: str, layer: str, crs: Any, overwrite: bool) -> None:
        self.output = output
        self.fmt = fmt
        self.overwrite = overwrite
        self.crs = _pyproj_crs(crs)
        self.streaming = fmt in ("gpkg", "shp")
        if fmt == "parquet":
            _need_pyarrow()
        self.kwargs: dict[str, Any] = {"driver": FORMATS[fmt][0], "geometry_type": "Polygon"}
        if fmt != "shp":
            self.kwargs["layer"] = layer
        if fmt == "geojson":
            self.kwargs["layer_options"] = {"RFC7946": "YES"}
        token = secrets.token_hex(4)
        if fmt == "shp":
            self.tmp = output.parent / f".{output.stem}.cdmap-tmp-{token}"
            self.target = self.tmp / output.name
        else:
            self.tmp = output.parent / f".{output.name}.cdmap-tmp-{token}{output.suffix}"
            self.target = self.tmp
        self.created = False
        self.buffered: list[dict[str, np.ndarray]] = []

    def write(self, records: dict[str, np.ndarray]) -> None:
        if not self.streaming:
            self.buffered.append(records)
            return
        self._write(records)

    def _write(self, records: dict[str, np.ndarray]) -> None:
        import pyogrio

        gdf = self._frame(records)
        try:
            if self.fmt == "shp" and not self.created:
                self.tmp.mkdir()
            if self.fmt == "parquet":
                gdf.to_parquet(self.target, index=False)
            else:
                options = {"dataset_options": GPKG_OPTIONS} if self.fmt == "gpkg" and not self.created else {}
                _write_dataframe(gdf, self.target, {**self.kwargs, **options, "append": self.created})
        except (OSError, pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
            raise OutputError(f"cannot write ({_short_error(exc)})", path=self.output) from None
        self.created = True

    def _frame(self, records: dict[str, np.ndarray]) -> Any:
        import geopandas as gpd
        import shapely

        geoms = shapely.from_wkb(records["wkb"]) if len(records["wkb"]) else np.empty(0, dtype=object)
        columns = {name: records[name] for name in COLUMNS}
        gdf = gpd.GeoDataFrame(columns, geometry=gpd.GeoSeries(geoms, crs=self.crs), crs=self.crs)
        if self.fmt == "geojson":
            gdf = gdf.to_crs("EPSG:4326")
        if self.fmt == "shp":
            gdf = gdf.rename(columns=_SHP_RENAME)
        return gdf

    def commit(self) -> None:
        """Write what is buffered (or an empty layer), then move the result onto ``output``."""
        import pyogrio

        if self.buffered:
            merged = {k: np.concatenate([b[k] for b in self.buffered]) for k in self.buffered[0]}
            self.buffered = []
            self._write(merged)
        elif not self.created:
            self._write(_empty_records())
        output, parent = self.output, self.output.parent
        check_target(output, self.overwrite)
        try:
            if self.fmt == "shp":
                written = sorted(self.tmp.iterdir(), key=lambda p: p.suffix.lower() == ".shp")  # .shp last
                names = {p.name.lower() for p in written}
                for ext in _SHP_COMPANIONS:  # stale companions of a replaced Shapefile
                    old = output.with_name(output.stem + ext)
                    if old.name.lower() not in names and old.exists():
                        old.unlink()
                for p in written:
                    os.replace(p, parent / p.name)
                self.tmp.rmdir()
            else:
                os.replace(self.tmp, output)
        except (OSError, pyogrio.errors.DataSourceError) as exc:
            raise OutputError(f"cannot write ({_short_error(exc)})", path=output) from None

    def cleanup(self) -> None:
        """Remove the temporary file or folder if it is still there (failure or interruption)."""
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self.tmp.exists():
            self.tmp.unlink()


def _need_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UsageError("--vector-format parquet needs the pyarrow package: pip install pyarrow "
                         "(or cdmap[parquet])") from None


def _empty_records() -> dict[str, np.ndarray]:
    out = {name: np.empty(0, dtype=np.int64 if name in ("id", "n_pixels") else np.float64) for name in COLUMNS}
    out["wkb"] = np.empty(0, dtype=object)
    return out


def _pyproj_crs(crs: Any) -> Any:
    """A rasterio CRS as pyproj (by EPSG code when it has one, so files carry the code); None stays None."""
    if crs is None:
        return None
    import pyproj

    epsg = crs.to_epsg()
    return pyproj.CRS.from_epsg(epsg) if epsg is not None else pyproj.CRS.from_user_input(crs.to_wkt())


def _write_dataframe(gdf: Any, path: Path, kwargs: dict[str, Any]) -> None:
    import pyogrio

    with warnings.catch_warnings():
        # a missing CRS has been reported once already, by the choice of the measurement frame
        warnings.filterwarnings("ignore", message="'crs' was not provided", category=UserWarning)
        pyogrio.write_dataframe(gdf, path, **kwargs)


def _short_error(exc: BaseException, limit: int = 300) -> str:
    """The useful end of a driver error (GPKG errors embed whole SQL statements)."""
    text = " ".join(str(exc).split())
    low = text.lower()
    if "disk is full" in low or "no space left" in low or getattr(exc, "errno", None) == 28:
        return "No space left on device"
    return text if len(text) <= limit else "..." + text[-limit:]
