"""Measuring in metres: the one rule for ground areas, lengths and simplification tolerances.

The frame is chosen per raster (by the CRS and the scene centre):

* projected CRS: the CRS's own linear unit converted to metres (``US survey foot`` etc.), unless its areal
  scale at the scene centre is more than 1 % off true (Web Mercator): then as for geographic CRSs;
* geographic CRS: a Lambert azimuthal equal-area projection centred on the scene (exact areas; distance
  error below 0.1 % within ~500 km of the centre), geometries are brought back to the raster CRS;
* no CRS: map units are taken as metres.

Polygon ``area_m2`` (:mod:`cdmap.vector.polygonize`) and the per-pixel area of :func:`pixel_area_m2_rows`
(a run's ``changed_area_m2``) both go through :meth:`MetricFrame.area_m2`, so they agree.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("cdmap.vector")

#: columns sampled per row by :func:`pixel_area_m2_rows` (a row's pixels differ only by projection curvature)
_AREA_SAMPLE_COLUMNS = 9


class MetricFrame:
    """Where areas, lengths and simplification are computed, in metres.

    Either the raster CRS scaled by ``unit`` metres per CRS unit (``transformer`` is None), or a local
    equal-area projection reached through ``transformer`` (geographic or strongly distorted CRSs).
    """

    def __init__(self, unit: float = 1.0, transformer: Any = None, description: str = "") -> None:
        self.unit = unit
        self.transformer = transformer
        self.description = description

    def to_metric(self, geoms: np.ndarray) -> np.ndarray:
        """Geometries in the raster CRS -> the metric frame (in units of ``unit`` metres)."""
        return self._transform(geoms, inverse=False)

    def from_metric(self, geoms: np.ndarray) -> np.ndarray:
        """Geometries in the metric frame -> the raster CRS."""
        return self._transform(geoms, inverse=True)

    def _transform(self, geoms: np.ndarray, inverse: bool) -> np.ndarray:
        if self.transformer is None:
            return geoms
        import shapely
        from pyproj.enums import TransformDirection

        tr = self.transformer
        direction = TransformDirection.INVERSE if inverse else TransformDirection.FORWARD

        def apply(xy: np.ndarray) -> np.ndarray:
            x, y = tr.transform(xy[:, 0], xy[:, 1], direction=direction)
            return np.column_stack([x, y])

        return shapely.transform(geoms, apply)

    def area_m2(self, metric_geoms: np.ndarray) -> np.ndarray:
        """Ground area (m²) of geometries already in the frame: the one area rule."""
        import shapely

        return shapely.area(metric_geoms) * self.unit**2

    def length_m(self, metric_geoms: np.ndarray) -> np.ndarray:
        """Length (m) of the boundaries (polygons: outline and holes) of geometries already in the frame."""
        import shapely

        return shapely.length(metric_geoms) * self.unit


def metric_frame(crs: Any, transform: Any, width: int, height: int, path: Path | None = None) -> MetricFrame:
    """Choose the frame for a ``width`` x ``height`` raster (see the module docstring).

    With ``path`` the choices a user should know about (no CRS, unknown unit) are logged, naming it.
    """
    return _frame_at(crs, transform, width / 2.0, height / 2.0, path)


def _frame_at(crs: Any, transform: Any, col: float, row: float, path: Path | None) -> MetricFrame:
    """The frame of a raster whose centre is at pixel position (``col``, ``row``)."""
    if crs is None:
        if path is not None:
            log.warning("%s: raster has no CRS; areas and lengths are in map units taken as metres", path)
        return MetricFrame(1.0, None, "map units (no CRS)")
    import pyproj
    from pyproj.crs import ProjectedCRS
    from pyproj.crs.coordinate_operation import LambertAzimuthalEqualAreaConversion

    pcrs = pyproj.CRS.from_user_input(crs.to_wkt())
    t = transform
    cx = t.a * col + t.b * row + t.c
    cy = t.d * col + t.e * row + t.f
    geodetic = pcrs.geodetic_crs
    if pcrs.is_projected or not pcrs.is_geographic:
        unit = 1.0
        try:
            unit = float(pcrs.axis_info[0].unit_conversion_factor)
        except (IndexError, AttributeError, TypeError):
            if path is not None:
                log.warning("%s: unknown CRS unit; taken as metres", path)
        areal = 1.0
        if pcrs.is_projected and geodetic is not None:
            try:
                lon, lat = pyproj.Transformer.from_crs(pcrs, geodetic, always_xy=True).transform(cx, cy)
                areal = float(pyproj.Proj(pcrs).get_factors(lon, lat).areal_scale)
            except Exception:  # noqa: BLE001 - factors unavailable: keep the CRS's own units
                areal = 1.0
        if geodetic is None or not math.isfinite(areal) or abs(areal - 1.0) <= 0.01:
            return MetricFrame(unit, None, f"{pcrs.name} ({unit:g} m per unit)")
    else:
        lon, lat = pyproj.Transformer.from_crs(pcrs, geodetic, always_xy=True).transform(cx, cy)
    laea = ProjectedCRS(
        conversion=LambertAzimuthalEqualAreaConversion(latitude_natural_origin=lat, longitude_natural_origin=lon),
        geodetic_crs=geodetic,
    )
    tr = pyproj.Transformer.from_crs(pcrs, laea, always_xy=True)
    return MetricFrame(1.0, tr, f"local equal-area projection at {lat:.4f}, {lon:.4f}")


@functools.lru_cache(maxsize=8)
def _cached_frame(wkt: str, coeffs: tuple[float, ...], col: float, row: float) -> MetricFrame:
    from affine import Affine
    from rasterio.crs import CRS

    return _frame_at(CRS.from_wkt(wkt), Affine(*coeffs), col, row, None)


def pixel_area_m2_rows(
    crs: Any, transform: Any, row0: int, row1: int, width: int, *, height: int | None = None
) -> np.ndarray:
    """Ground area (m²) of one pixel for each row in [``row0``, ``row1``), measured like polygon ``area_m2``.

    Pixel boxes at a few columns of each row are taken through the raster's :class:`MetricFrame` and measured
    with :meth:`MetricFrame.area_m2`; the row's value is their mean. Without a CRS it is ``|det(transform)|``
    (map units taken as metres). ``height`` (the raster's) centres the frame exactly as
    :func:`cdmap.vector.vectorize_raster` does; without it the frame is centred on the rows asked for, which
    only matters for a projected CRS whose areal scale is close to the 1 % limit.
    """
    import shapely

    n = max(0, int(row1) - int(row0))
    if n == 0 or width < 1:
        return np.zeros(n, dtype=np.float64)
    centre_row = height / 2.0 if height is not None else (row0 + row1) / 2.0
    if crs is None:
        frame = _frame_at(None, transform, 0.0, 0.0, None)
    else:
        t = transform
        frame = _cached_frame(crs.to_wkt(), (t.a, t.b, t.c, t.d, t.e, t.f), width / 2.0, centre_row)
    cols = np.unique(np.linspace(0, width - 1, min(width, _AREA_SAMPLE_COLUMNS)).round().astype(np.int64))
    rr, cc = np.meshgrid(np.arange(row0, row1, dtype=np.float64), cols.astype(np.float64), indexing="ij")
    boxes = pixel_to_crs(shapely.box(cc.ravel(), rr.ravel(), cc.ravel() + 1.0, rr.ravel() + 1.0), transform)
    areas = frame.area_m2(frame.to_metric(boxes)).reshape(n, len(cols))
    return areas.mean(axis=1)


def pixel_to_crs(geoms: np.ndarray, transform: Any) -> np.ndarray:
    """Geometries in (column, row) pixel coordinates -> the raster CRS through the affine ``transform``."""
    import shapely

    a = transform
    coeffs = np.array([[a.a, a.d], [a.b, a.e]])
    offs = np.array([a.c, a.f])
    return shapely.transform(geoms, lambda xy: xy @ coeffs + offs)
