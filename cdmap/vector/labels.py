"""Reading reference polygons and burning them onto a raster grid (labels for evaluation and training).

:data:`VECTOR_SUFFIXES` are the file suffixes taken as polygon files (not rasters) where a label may be either.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from cdmap.errors import IncompatibleInputsError, InputError

VECTOR_SUFFIXES = (".gpkg", ".geojson", ".json", ".shp", ".fgb", ".parquet", ".gml", ".kml")


def read_polygons(path: str | os.PathLike, crs: Any) -> Any:
    """Non-empty polygons of an OGR vector file, reprojected to ``crs``."""
    import geopandas as gpd

    try:
        gdf = gpd.read_parquet(path) if str(path).lower().endswith(".parquet") else gpd.read_file(path)
    except Exception as exc:  # noqa: BLE001 - pyogrio raises several types
        raise InputError(f"cannot read polygons: {' '.join(str(exc).split())[:200]}", path) from exc
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    if len(gdf):
        if (gdf.crs is None) != (crs is None):
            raise IncompatibleInputsError("polygons and raster must both have a CRS (or both none)", path)
        if gdf.crs is not None and gdf.crs != crs:
            gdf = gdf.to_crs(crs)
    return gdf


def rasterize_polygons(gdf: Any, transform: Any, shape: tuple[int, int], value: int = 1) -> np.ndarray:
    """Burn the polygons of ``gdf`` (already in the grid's CRS) as ``value`` onto a (rows, cols) grid window."""
    from rasterio.features import rasterize
    from rasterio.transform import array_bounds
    from shapely.geometry import box

    if not len(gdf):
        return np.zeros(shape, dtype=np.uint8)
    west, south, east, north = array_bounds(shape[0], shape[1], transform)
    idx = gdf.sindex.query(box(min(west, east), min(south, north), max(west, east), max(south, north)))
    if len(idx) == 0:
        return np.zeros(shape, dtype=np.uint8)
    geoms = list(gdf.geometry.iloc[np.sort(idx)])
    return rasterize(((g, value) for g in geoms), out_shape=shape, transform=transform, fill=0, dtype="uint8")
