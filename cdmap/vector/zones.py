"""Changed area per zone: a polygon layer (districts, parcels) against a change mask, as CSV and GeoPackage.

A pixel belongs to the zone that contains its centre (where zones overlap, the later feature wins). Areas go
through the one area rule (:func:`cdmap.vector.measure.pixel_area_m2_rows`), so the zones' ``changed_m2`` add up
to the run's ``changed_area_m2`` when the zones cover the scene.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdmap.errors import InputError, OutputError
from cdmap.vector.labels import read_polygons
from cdmap.vector.measure import pixel_area_m2_rows

ROW_STRIP = 512
COLUMNS = ("zone", "valid_m2", "changed_m2", "changed_ha", "changed_share", "changed_pixels")


@dataclass
class ZoneStats:
    """What :func:`zonal_change` wrote: the zone count and the files."""

    zones: int
    csv: Path
    gpkg: Path | None
    changed_m2: float


def zonal_change(mask: str | os.PathLike, zones: str | os.PathLike, csv_path: str | os.PathLike,
                 gpkg_path: str | os.PathLike | None = None, *, change_value: int = 1,
                 nodata: int = 255) -> ZoneStats:
    """Changed and valid ground area of ``mask`` (1 change, 0 none, ``nodata``) per polygon of ``zones``.

    Writes one CSV row per zone (its attributes, then :data:`COLUMNS`; ``zone`` is the 1-based feature number)
    and, with ``gpkg_path``, the zones with those columns as a GeoPackage layer ``zones``.
    """
    import rasterio
    from rasterio.features import rasterize
    from rasterio.windows import Window

    with rasterio.open(mask) as src:
        gdf = read_polygons(zones, src.crs).reset_index(drop=True)
        if not len(gdf):
            raise InputError("the zones layer holds no polygons", Path(zones))
        n = len(gdf)
        valid_m2, changed_m2 = np.zeros(n + 1), np.zeros(n + 1)
        changed_px = np.zeros(n + 1, dtype=np.int64)
        dtype = "uint16" if n < 65535 else "uint32"
        shapes = list(zip(gdf.geometry, range(1, n + 1), strict=True))
        for row in range(0, src.height, ROW_STRIP):
            win = Window(0, row, src.width, min(ROW_STRIP, src.height - row))
            m = src.read(1, window=win)
            ids = rasterize(shapes, out_shape=m.shape, transform=src.window_transform(win), fill=0, dtype=dtype)
            per_px = pixel_area_m2_rows(src.crs, src.transform, row, row + m.shape[0], src.width, height=src.height)
            area = np.broadcast_to(per_px[:, None], m.shape)
            valid = m != nodata
            change = m == change_value
            valid_m2 += np.bincount(ids[valid], weights=area[valid], minlength=n + 1)
            changed_m2 += np.bincount(ids[change], weights=area[change], minlength=n + 1)
            changed_px += np.bincount(ids[change], minlength=n + 1)
    table = gdf.drop(columns=gdf.geometry.name)
    table["zone"] = np.arange(1, n + 1)
    table["valid_m2"] = valid_m2[1:].round(3)
    table["changed_m2"] = changed_m2[1:].round(3)
    table["changed_ha"] = (changed_m2[1:] / 1e4).round(6)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["changed_share"] = np.where(valid_m2[1:] > 0, changed_m2[1:] / valid_m2[1:], np.nan).round(6)
    table["changed_pixels"] = changed_px[1:]
    csv_path = Path(csv_path)
    try:
        _write_csv(table, csv_path)
        if gpkg_path is not None:
            out = gdf.copy()
            for c in COLUMNS:
                out[c] = table[c].to_numpy()
            out.to_file(gpkg_path, layer="zones", driver="GPKG", layer_options={}, **_gpkg_version())
    except OSError as exc:
        raise OutputError(f"cannot write the zone table: {exc.strerror or exc}", csv_path) from exc
    return ZoneStats(n, csv_path, Path(gpkg_path) if gpkg_path else None, float(changed_m2[1:].sum()))


def _write_csv(table: Any, path: Path) -> None:
    cols = [c for c in table.columns if c not in COLUMNS] + list(COLUMNS)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for rec in table[cols].itertuples(index=False):
            w.writerow(["" if (isinstance(v, float) and np.isnan(v)) else v for v in rec])


def _gpkg_version() -> dict[str, Any]:
    from cdmap.vector.write import GPKG_OPTIONS

    return {"dataset_options": dict(GPKG_OPTIONS)}
