"""Change raster -> change polygons, streamed in square windows with an exact merge across window lines.

The raster is read one ``window_size`` x ``window_size`` window at a time, so memory is bounded by one window
plus one row of window-edge labels and the regions still open across the current window row, whatever the
scene size. Each window is polygonized with :func:`rasterio.features.shapes` (4-connectivity) in *global pixel
coordinates*, where every vertex is an exact integer. Pieces that touch an internal window line are joined by
a union-find over the label pairs of 4-adjacent change pixels on both sides of the line (so corner-only
contact never merges) and unioned once their whole region is closed. Only then are polygons taken to the
raster CRS, measured in metres and simplified.

Measurement frame (``area_m2``, ``perimeter_m``, ``min_area``, ``simplify``):

* projected CRS: the CRS's own linear unit converted to metres (``US survey foot`` etc.), unless its areal
  scale at the scene centre is more than 1 % off true (Web Mercator): then as for geographic CRSs;
* geographic CRS: a Lambert azimuthal equal-area projection centred on the scene (exact areas; distance
  error below 0.1 % within ~500 km of the centre), geometries are brought back to the raster CRS;
* no CRS: map units are taken as metres, with a warning.

Ids follow the region's top-left corner (min row, then min col of its pixel bounds), so they do not depend on
the window size. A region is numbered and written as soon as no region still open can precede it: GeoPackage
and Shapefile layers are appended in batches, so the output is not held in memory; FlatGeobuf (its spatial
index needs every feature, and reorders them on disk) and GeoJSON are written in one go at the end.

Writing: GeoPackage, FlatGeobuf and Shapefile keep the raster CRS; GeoJSON follows RFC 7946 (WGS84 lon/lat,
7 decimals). Output is written under a temporary name in the target directory and renamed on success.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdmap.errors import IncompatibleInputsError, InputError, OutputError, UsageError

__all__ = [
    "FORMATS",
    "VectorStats",
    "format_from_path",
    "vectorize_raster",
]

#: format name -> (OGR driver, file suffixes recognised for it)
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gpkg": ("GPKG", (".gpkg",)),
    "geojson": ("GeoJSON", (".geojson", ".json")),
    "fgb": ("FlatGeobuf", (".fgb",)),
    "shp": ("ESRI Shapefile", (".shp",)),
}

DEFAULT_THRESHOLD = 0.5
# Shapefile (DBF) field names are limited to 10 characters.
_SHP_RENAME = {"perimeter_m": "perim_m"}
_SHP_COMPANIONS = (".shp", ".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx", ".qpj", ".shp.xml")
_WRITE_BATCH = 65536  # features numbered and appended per write (GeoPackage, Shapefile)
_COLUMNS = ("id", "n_pixels", "area_m2", "perimeter_m", "mean_prob", "max_prob")


@dataclass(frozen=True)
class VectorStats:
    """What :func:`vectorize_raster` wrote.

    ``changed_area_m2`` and ``changed_pixels`` sum the *written* polygons (after ``min_area``).
    ``crs`` is an authority string (``EPSG:32633``) when one exists, else WKT; ``None`` without a CRS.
    """

    n_polygons: int
    changed_area_m2: float
    changed_pixels: int
    path: Path
    format: str
    crs: str | None


def format_from_path(output: str | Path, vector_format: str | None = None) -> str:
    """The format name (``gpkg``/``geojson``/``fgb``/``shp``) given explicitly or implied by the suffix."""
    output = Path(output)
    if vector_format is not None:
        name = vector_format.lower().lstrip(".")
        name = {"json": "geojson", "shapefile": "shp", "flatgeobuf": "fgb", "geopackage": "gpkg"}.get(name, name)
        if name not in FORMATS:
            raise UsageError(f"unknown vector format {vector_format!r}; choose one of {', '.join(FORMATS)}")
        if name == "shp" and output.suffix.lower() != ".shp":
            raise UsageError("a Shapefile output must end in .shp", path=output)
        return name
    suffix = output.suffix.lower()
    for name, (_driver, suffixes) in FORMATS.items():
        if suffix in suffixes:
            return name
    raise UsageError(
        f"cannot tell the vector format from the suffix {suffix or '(none)'!r}; use .gpkg, .geojson, .fgb or "
        "a .shp name, or give --vector-format",
        path=output,
    )


# --------------------------------------------------------------------------------------------------------------
# Reading: what is change, and which probabilities go with it
# --------------------------------------------------------------------------------------------------------------


class _Source:
    """An open single-band raster and how to turn a window of it into change pixels and probabilities."""

    def __init__(self, path: Path, role: str) -> None:
        import rasterio
        from rasterio.errors import RasterioIOError

        if not path.exists():
            raise InputError("no such file", path=path)
        try:
            self.ds = rasterio.open(path)
        except (RasterioIOError, OSError) as exc:
            raise InputError(f"cannot open as a raster ({exc})", path=path) from None
        self.path = path
        if self.ds.count != 1:
            n = self.ds.count
            self.ds.close()
            raise InputError(f"has {n} bands; a {role} must have exactly one", path=path)
        self.dtype = np.dtype(self.ds.dtypes[0])
        self.is_float = self.dtype.kind == "f"
        scale = self.ds.scales[0] if self.ds.scales else 1.0
        offset = self.ds.offsets[0] if self.ds.offsets else 0.0
        self.scale = 1.0 if scale is None else float(scale)
        self.offset = 0.0 if offset is None else float(offset)
        if not math.isfinite(self.scale) or self.scale <= 0:
            self.ds.close()
            raise InputError(f"band scale {self.scale} is not a positive number", path=path)
        self.has_scale = self.scale != 1.0 or self.offset != 0.0

    def close(self) -> None:
        self.ds.close()

    def read(self, window: Any) -> tuple[np.ndarray, np.ndarray]:
        """Raw values and a validity mask (dataset mask, and not NaN) for ``window``."""
        from rasterio.errors import RasterioIOError

        try:
            data = self.ds.read(1, window=window)
            valid = self.ds.read_masks(1, window=window) > 0
        except (RasterioIOError, OSError) as exc:
            raise InputError(f"read failed at {window} ({exc})", path=self.path) from None
        if self.is_float:
            valid &= ~np.isnan(data)
        return data, valid

    def probability(self, data: np.ndarray) -> np.ndarray:
        """``value * scale + offset`` as float64."""
        prob = data.astype(np.float64)
        if self.has_scale:
            prob *= self.scale
            prob += self.offset
        return prob


# --------------------------------------------------------------------------------------------------------------
# Measuring in metres
# --------------------------------------------------------------------------------------------------------------


class _MetricFrame:
    """Where areas, lengths and simplification are computed, in metres.

    Either the raster CRS scaled by ``unit`` metres per CRS unit (``transformer`` is None), or a local
    equal-area projection reached through ``transformer`` (geographic or strongly distorted CRSs).
    """

    def __init__(self, unit: float = 1.0, transformer: Any = None, description: str = "") -> None:
        self.unit = unit
        self.transformer = transformer
        self.description = description

    def to_metric(self, geoms: np.ndarray) -> np.ndarray:
        if self.transformer is None:
            return geoms
        import shapely

        tr = self.transformer

        def fwd(xy: np.ndarray) -> np.ndarray:
            x, y = tr.transform(xy[:, 0], xy[:, 1])
            return np.column_stack([x, y])

        return shapely.transform(geoms, fwd)

    def from_metric(self, geoms: np.ndarray) -> np.ndarray:
        if self.transformer is None:
            return geoms
        import shapely
        from pyproj.enums import TransformDirection

        tr = self.transformer

        def inv(xy: np.ndarray) -> np.ndarray:
            x, y = tr.transform(xy[:, 0], xy[:, 1], direction=TransformDirection.INVERSE)
            return np.column_stack([x, y])

        return shapely.transform(geoms, inv)


def _metric_frame(crs: Any, transform: Any, width: int, height: int, path: Path) -> _MetricFrame:
    """Choose the frame for a raster (see the module docstring)."""
    if crs is None:
        warnings.warn(
            f"{path}: raster has no CRS; areas and lengths are in map units taken as metres",
            UserWarning,
            stacklevel=3,
        )
        return _MetricFrame(1.0, None, "map units (no CRS)")
    import pyproj
    from pyproj.crs import ProjectedCRS
    from pyproj.crs.coordinate_operation import LambertAzimuthalEqualAreaConversion

    pcrs = pyproj.CRS.from_user_input(crs.to_wkt())
    t = transform
    cx = t.a * width / 2.0 + t.b * height / 2.0 + t.c
    cy = t.d * width / 2.0 + t.e * height / 2.0 + t.f
    geodetic = pcrs.geodetic_crs
    if pcrs.is_projected or not pcrs.is_geographic:
        unit = 1.0
        try:
            unit = float(pcrs.axis_info[0].unit_conversion_factor)
        except (IndexError, AttributeError, TypeError):
            warnings.warn(f"{path}: unknown CRS unit; taken as metres", UserWarning, stacklevel=3)
        areal = 1.0
        if pcrs.is_projected and geodetic is not None:
            try:
                lon, lat = pyproj.Transformer.from_crs(pcrs, geodetic, always_xy=True).transform(cx, cy)
                areal = float(pyproj.Proj(pcrs).get_factors(lon, lat).areal_scale)
            except Exception:  # noqa: BLE001 - factors unavailable: keep the CRS's own units
                areal = 1.0
        if geodetic is None or not math.isfinite(areal) or abs(areal - 1.0) <= 0.01:
            return _MetricFrame(unit, None, f"{pcrs.name} ({unit:g} m per unit)")
    else:
        lon, lat = pyproj.Transformer.from_crs(pcrs, geodetic, always_xy=True).transform(cx, cy)
    laea = ProjectedCRS(
        conversion=LambertAzimuthalEqualAreaConversion(latitude_natural_origin=lat, longitude_natural_origin=lon),
        geodetic_crs=geodetic,
    )
    tr = pyproj.Transformer.from_crs(pcrs, laea, always_xy=True)
    return _MetricFrame(1.0, tr, f"local equal-area projection at {lat:.4f}, {lon:.4f}")


# --------------------------------------------------------------------------------------------------------------
# Streaming polygonization with exact cross-window merge
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Piece:
    geom: Any  # shapely polygon, global pixel coordinates
    n: int
    pn: int
    psum: float
    pmax: float
    first: int  # raster-order index (row * width + col) of the region's first pixel


def _valid_polygonal(geoms: np.ndarray) -> np.ndarray:
    """Make every geometry valid and keep only its polygonal part (empty when none)."""
    import shapely

    bad = ~shapely.is_valid(geoms)
    if not bad.any():
        return geoms
    out = geoms.copy()
    fixed = shapely.make_valid(geoms[bad])
    polys = []
    for g in fixed:
        if g.geom_type in ("Polygon", "MultiPolygon"):
            polys.append(g)
            continue
        parts = [p for p in getattr(g, "geoms", []) if p.geom_type in ("Polygon", "MultiPolygon") and not p.is_empty]
        polys.append(shapely.union_all(parts) if parts else shapely.Polygon())
    out[bad] = np.array(polys, dtype=object)
    return out


def _windows(height: int, width: int, size: int) -> Iterator[tuple[int, list[tuple[int, int, int, int]]]]:
    """Rows of ``(row0, col0, rows, cols)`` windows, top to bottom, left to right."""
    for r0 in range(0, height, size):
        h = min(size, height - r0)
        yield r0, [(r0, c0, h, min(size, width - c0)) for c0 in range(0, width, size)]


def _label_window(change: np.ndarray, r0: int, c0: int) -> tuple[np.ndarray, list[Any]]:
    """Label the 4-connected change regions of one window; polygons in global pixel coordinates.

    Returns ``labels`` (int32, 0 = no change, i = ``polys[i-1]``) and an object array of shapely polygons.
    """
    import shapely
    from affine import Affine
    from rasterio import features

    tr = Affine.translation(c0, r0)
    src = change.view(np.uint8)
    dicts = [g for g, _ in features.shapes(src, mask=change, connectivity=4, transform=tr)]
    if not dicts:
        return np.zeros(change.shape, dtype=np.int32), np.empty(0, dtype=object)
    labels = features.rasterize(
        ((g, i) for i, g in enumerate(dicts, start=1)),
        out_shape=change.shape,
        transform=tr,
        fill=0,
        dtype="int32",
        all_touched=False,
    )
    if np.count_nonzero(labels) != np.count_nonzero(change) or np.any(labels[~change]):
        raise RuntimeError(f"labelling mismatch in the window at row {r0}, column {c0}")
    # build all polygons at once from their rings (much faster than one shapely constructor per polygon)
    coords: list[tuple[float, float]] = []
    ring_ends = [0]
    poly_ends = [0]
    for g in dicts:
        for ring in g["coordinates"]:
            coords.extend(ring)
            ring_ends.append(len(coords))
        poly_ends.append(len(ring_ends) - 1)
    polys = shapely.from_ragged_array(
        shapely.GeometryType.POLYGON,
        np.asarray(coords, dtype=np.float64),
        (np.asarray(ring_ends, dtype=np.int64), np.asarray(poly_ends, dtype=np.int64)),
    )
    # GDAL may trace a ring that touches itself (a hole meeting the outline at a corner): make it valid
    return labels, _valid_polygonal(polys)


class _Output:
    """Finished regions: measured, filtered, numbered in key order and handed to the writer in batches.

    A region's id follows its sort key ``(min row, min col, first pixel)``. After each window row, every
    finished region whose min row is above ``limit`` (the smallest min row still open or yet unread) can no
    longer be preceded by another, so it is numbered and written; only the rest stays in memory.
    """

    def __init__(self, frame: _MetricFrame, affine: Any, min_area: float, simplify: float, writer: _Writer) -> None:
        self.frame = frame
        self.affine = affine
        self.min_area = min_area
        self.simplify = simplify
        self.writer = writer
        self.batch = _WRITE_BATCH
        self.pending: list[dict[str, np.ndarray]] = []
        self.n_written = 0
        self.area_written = 0.0
        self.pixels_written = 0

    def add(
        self,
        geoms: Any,
        n: np.ndarray,
        pn: np.ndarray,
        psum: np.ndarray,
        pmax: np.ndarray,
        first: np.ndarray,
        width: int,
    ) -> None:
        """Finish a batch of whole regions given in global pixel coordinates."""
        import shapely

        if len(geoms) == 0:
            return
        pix = np.empty(len(geoms), dtype=object)
        pix[:] = list(geoms)
        a = self.affine
        coeffs = np.array([[a.a, a.d], [a.b, a.e]])
        offs = np.array([a.c, a.f])
        crs_geoms = shapely.transform(pix, lambda xy: xy @ coeffs + offs)
        metric = self.frame.to_metric(crs_geoms)
        out = crs_geoms
        if self.simplify > 0:
            simple = shapely.simplify(metric, self.simplify / self.frame.unit, preserve_topology=True)
            simple_out = self.frame.from_metric(simple)
            # keep a region unsimplified where simplifying would not leave one valid polygon
            ok = (
                (shapely.get_type_id(simple) == 3)
                & shapely.is_valid(simple)
                & shapely.is_valid(simple_out)
                & ~shapely.is_empty(simple_out)
            )
            metric = np.where(ok, simple, metric)
            out = np.where(ok, simple_out, out)
        area = shapely.area(metric) * self.frame.unit**2
        keep = ~shapely.is_empty(out) & (area > 0) & (area >= self.min_area)
        idx = np.flatnonzero(keep)
        if idx.size == 0:
            return
        perim = shapely.length(metric[idx]) * self.frame.unit
        pn, psum, pmax = pn[idx], psum[idx], pmax[idx]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(pn > 0, psum / np.maximum(pn, 1), np.nan)
        first = first[idx].astype(np.int64)
        mincol = np.rint(shapely.bounds(pix[idx])[:, 0]).astype(np.int64)
        self.pending.append(
            {
                # sort key: (min row, min col) of the region's bounds, then its first pixel in raster order
                "key": np.column_stack([first // width, mincol, first]),
                "wkb": shapely.to_wkb(out[idx]),
                "n_pixels": n[idx].astype(np.int64),
                "area_m2": area[idx].astype(np.float64),
                "perimeter_m": perim.astype(np.float64),
                "mean_prob": mean.astype(np.float64),
                "max_prob": np.where(pn > 0, pmax, np.nan).astype(np.float64),
            }
        )

    def flush(self, limit: float, force: bool = False) -> None:
        """Number and write the regions whose min row is < ``limit`` (all with ``limit=inf``)."""
        if not self.pending:
            return
        merged = {k: np.concatenate([p[k] for p in self.pending]) for k in self.pending[0]}
        ready = merged["key"][:, 0] < limit
        n_ready = int(ready.sum())
        if n_ready == 0 or (n_ready < self.batch and not force):
            self.pending = [merged]
            return
        rest = {k: v[~ready] for k, v in merged.items()}
        now = {k: v[ready] for k, v in merged.items()}
        order = np.lexsort(now["key"].T[::-1])
        now = {k: v[order] for k, v in now.items()}
        now["id"] = np.arange(self.n_written + 1, self.n_written + n_ready + 1, dtype=np.int64)
        self.writer.write(now)
        self.n_written += n_ready
        self.area_written += math.fsum(now["area_m2"])
        self.pixels_written += int(now["n_pixels"].sum())
        self.pending = [rest] if len(rest["key"]) else []


class _Merger:
    """Union-find over pieces that touch internal window lines, closed one window row at a time."""

    def __init__(self, output: _Output, width: int) -> None:
        self.output = output
        self.width = width
        self.parent: dict[int, int] = {}
        self.pieces: dict[int, _Piece] = {}

    def min_row(self) -> float:
        """The smallest min row among the regions still open (inf when none)."""
        if not self.pieces:
            return math.inf
        return min(p.first for p in self.pieces.values()) // self.width

    def find(self, p: int) -> int:
        parent = self.parent
        root = p
        while parent[root] != root:
            root = parent[root]
        while parent[p] != root:
            parent[p], p = root, parent[p]
        return root

    def union_pairs(self, a: np.ndarray, b: np.ndarray) -> None:
        """Join the regions of 4-adjacent pixel pairs ``a[i]``/``b[i]`` across a window line."""
        m = (a > 0) & (b > 0)
        if not m.any():
            return
        pairs = np.unique(np.stack([a[m], b[m]], axis=1), axis=0)
        for x, y in pairs:
            rx, ry = self.find(int(x)), self.find(int(y))
            if rx != ry:
                if rx < ry:
                    self.parent[ry] = rx
                else:
                    self.parent[rx] = ry

    def add(self, pid: int, piece: _Piece) -> None:
        self.parent[pid] = pid
        self.pieces[pid] = piece

    def close(self, open_pids: np.ndarray) -> None:
        """Finish every group with no piece among ``open_pids`` (labels on the next, unread window line)."""
        import shapely

        if not self.pieces:
            return
        open_roots = {self.find(int(p)) for p in open_pids}
        groups: dict[int, list[int]] = {}
        for pid in self.pieces:
            root = self.find(pid)
            if root not in open_roots:
                groups.setdefault(root, []).append(pid)
        if not groups:
            return
        geoms, n, pn, psum, pmax, first = [], [], [], [], [], []
        for members in groups.values():
            ps = [self.pieces[p] for p in members]
            geoms.append(ps[0].geom if len(ps) == 1 else shapely.union_all([p.geom for p in ps]))
            n.append(sum(p.n for p in ps))
            pn.append(sum(p.pn for p in ps))
            psum.append(math.fsum(p.psum for p in ps))
            pmax.append(max(p.pmax for p in ps))
            first.append(min(p.first for p in ps))
            for p in members:
                del self.pieces[p]
                del self.parent[p]
        self.output.add(
            geoms,
            np.array(n),
            np.array(pn),
            np.array(psum, dtype=np.float64),
            np.array(pmax),
            np.array(first),
            self.width,
        )


class _Classifier:
    """Turns a window into change pixels and the probabilities (and their validity) at those pixels."""

    def __init__(self, src: _Source, mode: str, threshold: float, probs: _Source | None) -> None:
        self.src = src
        self.mode = mode
        self.threshold = threshold
        self.probs = probs

    def __call__(self, window: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = self.src
        data, valid = src.read(window)
        prob = None
        if self.mode == "mask":
            bad = valid & (data != 0) & (data != 1)
            if bad.any():
                value = data[bad].flat[0]
                raise InputError(
                    f"is not a 0/1 change mask: pixel value {value!r} is neither 0, 1 nor the declared "
                    "nodata; for a probability raster (or a 0/255 mask) give --threshold",
                    path=src.path,
                )
            change = valid & (data == 1)
        else:
            prob = src.probability(data)
            # the tolerance keeps e.g. 51 * (1/255) >= 0.2 despite rounding
            change = valid & (prob >= self.threshold - 1e-9)
        if self.probs is not None:
            pdata, pvalid = self.probs.read(window)
            return change, self.probs.probability(pdata[change]), pvalid[change]
        if prob is not None:
            return change, prob[change], valid[change]
        n = int(np.count_nonzero(change))
        return change, np.zeros(n), np.zeros(n, dtype=bool)


def _global_ids(base: int, labels: np.ndarray) -> np.ndarray:
    """Window labels (0 = none) as global piece ids."""
    return np.where(labels > 0, labels.astype(np.int64) + base, 0)


def _polygonize(classify: _Classifier, window_size: int, output: _Output) -> None:
    """Stream the raster window by window, handing finished regions to ``output``."""
    from rasterio.windows import Window

    height, width = classify.src.ds.height, classify.src.ds.width
    merger = _Merger(output, width)
    next_pid = 1  # global piece ids: window label i is piece next_pid + i - 1
    above = np.zeros(width, dtype=np.int64)  # piece ids on the last pixel row of the previous window row
    for r0, row in _windows(height, width, window_size):
        below = np.zeros(width, dtype=np.int64)
        left: np.ndarray | None = None  # piece ids on the last pixel column of the previous window
        h = row[0][2]
        for _, c0, _, w in row:
            change, pval, pv = classify(Window(c0, r0, w, h))
            if change.any():
                labels, polys = _label_window(change, r0, c0)
            else:
                labels, polys = np.zeros(change.shape, dtype=np.int32), np.empty(0, dtype=object)
            k = len(polys)
            base = next_pid - 1
            if k:
                lab = labels[change]
                n = np.bincount(lab, minlength=k + 1)
                # change pixels come in raster order, so a label's first occurrence is its first pixel
                uniq, first_at = np.unique(lab, return_index=True)
                flat = np.flatnonzero(change)[first_at]
                first = np.zeros(k + 1, dtype=np.int64)
                first[uniq] = (r0 + flat // w) * width + (c0 + flat % w)
                pl, pval = lab[pv], pval[pv]
                pn = np.bincount(pl, minlength=k + 1)
                psum = np.bincount(pl, weights=pval, minlength=k + 1)
                pmax = np.full(k + 1, -np.inf)
                np.maximum.at(pmax, pl, pval)
                edges = []
                if r0 > 0:
                    edges.append(labels[0])
                if r0 + h < height:
                    edges.append(labels[-1])
                if c0 > 0:
                    edges.append(labels[:, 0])
                if c0 + w < width:
                    edges.append(labels[:, -1])
                on_edge = np.zeros(k + 1, dtype=bool)
                if edges:
                    on_edge[np.concatenate(edges)] = True
                done = np.flatnonzero(~on_edge[1:]) + 1
                output.add(polys[done - 1], n[done], pn[done], psum[done], pmax[done], first[done], width)
                for i in np.flatnonzero(on_edge[1:]) + 1:
                    merger.add(
                        next_pid + int(i) - 1,
                        _Piece(polys[i - 1], int(n[i]), int(pn[i]), float(psum[i]), float(pmax[i]), int(first[i])),
                    )
                if r0 > 0:
                    merger.union_pairs(above[c0 : c0 + w], _global_ids(base, labels[0]))
                if left is not None:
                    merger.union_pairs(left, _global_ids(base, labels[:, 0]))
                left = _global_ids(base, labels[:, -1])
                below[c0 : c0 + w] = _global_ids(base, labels[-1])
            else:
                left = None
            next_pid += k
        if r0 + h >= height:
            merger.close(np.empty(0, dtype=np.int64))
        else:
            merger.close(np.unique(below[below > 0]))
        output.flush(min(merger.min_row(), r0 + h))
        above = below
    if merger.pieces:  # pragma: no cover - every group closes on the last row
        raise RuntimeError("unmerged pieces left after the last window row")
    output.flush(math.inf, force=True)


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


class _Writer:
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
            _write_dataframe(gdf, self.target, {**self.kwargs, "append": self.created})
        except (OSError, pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
            raise OutputError(f"cannot write ({_short_error(exc)})", path=self.output) from None
        self.created = True

    def _frame(self, records: dict[str, np.ndarray]) -> Any:
        import geopandas as gpd
        import shapely

        geoms = shapely.from_wkb(records["wkb"]) if len(records["wkb"]) else np.empty(0, dtype=object)
        columns = {name: records[name] for name in _COLUMNS}
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
        _check_target(output, self.overwrite)
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


def _empty_records() -> dict[str, np.ndarray]:
    out = {name: np.empty(0, dtype=np.int64 if name in ("id", "n_pixels") else np.float64) for name in _COLUMNS}
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


def _check_target(output: Path, overwrite: bool) -> None:
    if output.is_dir():
        raise OutputError("is a directory", path=output)
    if output.exists() and not overwrite:
        raise OutputError("exists; give --overwrite to replace it", path=output)
    if not output.parent.is_dir():
        raise OutputError("directory does not exist", path=output.parent)


# --------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------


def vectorize_raster(
    raster: str | Path,
    output: str | Path,
    *,
    threshold: float | None = None,
    prob_raster: str | Path | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    vector_format: str | None = None,
    layer: str = "changes",
    window_size: int = 2048,
    overwrite: bool = False,
) -> VectorStats:
    """Polygonize the change pixels of ``raster`` into ``output``, streaming in square windows.

    ``raster`` is a change mask or a probability raster:

    * ``threshold`` given: a probability raster; change is ``value * scale + offset >= threshold`` (scale and
      offset from the band metadata, e.g. 1/255 for uint8 probabilities);
    * no ``threshold``, float band or a band with scale/offset metadata: a probability raster at 0.5;
    * no ``threshold``, integer band without scale: a mask, 1 = change, 0 = no change, the declared nodata
      (255 for cdmap masks) excluded; any other value is an :class:`InputError`.

    Nodata pixels (dataset mask, NaN) are never change. Polygons are 4-connected regions with their holes,
    identical to polygonizing the whole raster at once. ``mean_prob``/``max_prob`` come from ``prob_raster``
    when given (it must share the grid), else from ``raster`` itself when it is a probability raster, else are
    null. ``min_area`` (m²) drops polygons whose final area is smaller; ``simplify`` (m) is a topology-preserving
    Douglas-Peucker tolerance (a region that would not stay one valid polygon is kept unsimplified).

    Attributes: ``id`` (1..n by the region's top row, then its left column), ``n_pixels``, ``area_m2``,
    ``perimeter_m`` (holes included; ``perim_m`` in Shapefiles), ``mean_prob``, ``max_prob``. An existing
    ``output`` is replaced only with ``overwrite`` (the whole file, all layers). Areas are measured as the
    module docstring says. Returns what was written.
    """
    raster = Path(raster)
    output = Path(output)
    fmt = format_from_path(output, vector_format)
    if window_size < 1:
        raise UsageError(f"window size must be at least 1 pixel, got {window_size}")
    for name, value in (("min area", min_area), ("simplify tolerance", simplify)):
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"{name} must be a finite number >= 0, got {value}")
    if threshold is not None and not math.isfinite(threshold):
        raise UsageError(f"threshold must be a finite number, got {threshold}")
    if not layer:
        raise UsageError("layer name must not be empty")
    try:
        same = output.exists() and raster.exists() and output.resolve() == raster.resolve()
    except OSError:
        same = False
    if same:
        raise UsageError("output would overwrite the input raster", path=output)
    _check_target(output, overwrite)

    src = _Source(raster, "change mask or probability raster")
    probs: _Source | None = None
    try:
        if threshold is not None or src.is_float or src.has_scale:
            mode, thr = "prob", (DEFAULT_THRESHOLD if threshold is None else float(threshold))
        else:
            mode, thr = "mask", math.nan
        if prob_raster is not None:
            probs = _Source(Path(prob_raster), "probability raster")
            _check_same_grid(src, probs)
            if not probs.is_float and not probs.has_scale:
                warnings.warn(
                    f"{probs.path}: integer probability raster without scale metadata; mean_prob/max_prob are "
                    "raw pixel values",
                    UserWarning,
                    stacklevel=2,
                )
        elif mode == "prob" and not src.is_float and not src.has_scale:
            warnings.warn(
                f"{raster}: integer raster without scale metadata; the threshold and mean_prob/max_prob use raw "
                "pixel values",
                UserWarning,
                stacklevel=2,
            )
        ds = src.ds
        crs = ds.crs if ds.crs else None
        if fmt == "geojson" and crs is None:
            raise UsageError("GeoJSON (RFC 7946) needs a CRS to reproject to WGS84; the raster has none", path=raster)
        frame = _metric_frame(crs, ds.transform, ds.width, ds.height, raster)
        writer = _Writer(output, fmt, layer, crs, overwrite)
        try:
            out = _Output(frame, ds.transform, float(min_area), float(simplify), writer)
            _polygonize(_Classifier(src, mode, thr, probs), window_size, out)
            writer.commit()
        finally:
            writer.cleanup()
    finally:
        src.close()
        if probs is not None:
            probs.close()
    out_crs: str | None = None
    if fmt == "geojson":
        out_crs = "EPSG:4326"
    elif crs is not None:
        out_crs = crs.to_string()
    return VectorStats(
        n_polygons=out.n_written,
        changed_area_m2=out.area_written,
        changed_pixels=out.pixels_written,
        path=output,
        format=fmt,
        crs=out_crs,
    )


def _check_same_grid(src: _Source, probs: _Source) -> None:
    a, b = src.ds, probs.ds
    if (a.width, a.height) != (b.width, b.height):
        raise IncompatibleInputsError(
            f"probability raster is {b.width}x{b.height} pixels but {src.path} is {a.width}x{a.height}",
            path=probs.path,
        )
    if not a.transform.almost_equals(b.transform) or (a.crs or None) != (b.crs or None):
        raise IncompatibleInputsError(
            f"probability raster is not on the same grid (CRS/transform) as {src.path}", path=probs.path
        )


def _short_error(exc: BaseException, limit: int = 300) -> str:
    """The useful end of a driver error (GPKG errors embed whole SQL statements)."""
    text = " ".join(str(exc).split())
    low = text.lower()
    if "disk is full" in low or "no space left" in low or getattr(exc, "errno", None) == 28:
        return "No space left on device"
    return text if len(text) <= limit else "..." + text[-limit:]
