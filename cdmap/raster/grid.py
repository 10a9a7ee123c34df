"""Pixel grids: when two rasters (or a raster and an output) share one grid, and CRS equivalence.

:func:`same_grid` is the one rule for "same grid" in cdmap: same size, same transform within ``GRID_TOL``
of a pixel, and equivalent CRSs (:func:`crs_equivalent`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Protocol

from rasterio.crs import CRS
from rasterio.transform import Affine

__all__ = ["GRID_TOL", "CRS_TOL_PX", "GridLike", "crs_equivalent", "same_grid", "pixel_size",
           "same_pixel_geometry", "near_int"]

#: Tolerance, in pixels, when comparing transforms (pixel size, rotation, origin offsets).
GRID_TOL = 1e-6
#: Tolerance, in pixels, for the numerical CRS-equivalence test.
CRS_TOL_PX = 1e-3


class GridLike(Protocol):
    """Anything with a pixel grid: an open rasterio dataset, a :class:`~cdmap.raster.pair.ScenePair`..."""

    width: int
    height: int
    crs: Any
    transform: Affine


def pixel_size(t: Affine) -> float:
    """The side of a square of the pixel's area (map units)."""
    return math.sqrt(abs(t.a * t.e - t.b * t.d))


def same_pixel_geometry(t1: Affine, t2: Affine) -> bool:
    """Same pixel size and rotation within ``GRID_TOL`` of a pixel."""
    tol = GRID_TOL * pixel_size(t1)
    return all(abs(p - q) <= tol for p, q in zip((t1.a, t1.b, t1.d, t1.e), (t2.a, t2.b, t2.d, t2.e), strict=True))


def near_int(v: float) -> bool:
    """``v`` is a whole number within ``GRID_TOL``."""
    return abs(v - round(v)) <= GRID_TOL


def crs_equivalent(a: CRS, b: CRS, bounds: tuple[float, float, float, float], pixel: float) -> bool:
    """True if CRS ``a`` and ``b`` are the same CRS, possibly written differently.

    ``bounds`` (left, bottom, right, top) in ``a`` and ``pixel`` (a pixel size in ``a``'s units) define the
    area and the tolerance of the numerical test: 25 points spread over ``bounds`` transformed from ``a``
    to ``b`` must stay within ``CRS_TOL_PX`` pixel of where they were.
    """
    if a == b:
        return True
    from rasterio.warp import transform

    left, bottom, right, top = bounds
    xs = [left + (right - left) * i / 4 for i in range(5) for _ in range(5)]
    ys = [bottom + (top - bottom) * j / 4 for _ in range(5) for j in range(5)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tx, ty = transform(a, b, xs, ys)
    except Exception:  # noqa: BLE001 - no transformation between the two: not equivalent
        return False
    tol = CRS_TOL_PX * abs(pixel)
    return all(
        math.isfinite(x2) and math.isfinite(y2) and abs(x2 - x1) <= tol and abs(y2 - y1) <= tol
        for x1, y1, x2, y2 in zip(xs, ys, tx, ty, strict=True)
    )


def grid_bounds(g: GridLike) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a grid."""
    from rasterio.transform import array_bounds

    west, south, east, north = array_bounds(g.height, g.width, g.transform)
    return (west, south, east, north)


def same_grid(a: GridLike, b: GridLike, *, allow_missing_crs: bool = False) -> bool:
    """True when ``a`` and ``b`` are one pixel grid: same size, same transform (pixel size, rotation and origin
    within ``GRID_TOL`` of a pixel) and equivalent CRSs (both None counts as equal).

    With ``allow_missing_crs`` a grid without CRS matches any grid of the same size (pixel grids assumed to
    coincide, as ``--allow-no-crs`` does), whatever the transforms.
    """
    if (a.width, a.height) != (b.width, b.height):
        return False
    if a.crs is None or b.crs is None:
        if allow_missing_crs:
            return True
        if (a.crs is None) != (b.crs is None):
            return False
    elif not crs_equivalent(a.crs, b.crs, grid_bounds(a), pixel_size(a.transform)):
        return False
    ta, tb = a.transform, b.transform
    if not same_pixel_geometry(ta, tb):
        return False
    dc, dr = ~ta @ (tb.c, tb.f)
    return abs(dc) <= GRID_TOL and abs(dr) <= GRID_TOL
