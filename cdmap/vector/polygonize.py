"""Change raster -> change polygons, streamed in square windows with an exact merge across window lines.

The raster is read one ``window_size`` x ``window_size`` window at a time, so memory is bounded by one window
plus one row of window-edge labels and the regions still open across the current window row, whatever the
scene size. Each window is polygonized with :func:`rasterio.features.shapes` (4-connectivity) in *global pixel
coordinates*, where every vertex is an exact integer. Pieces that touch an internal window line are joined by
a union-find over the label pairs of 4-adjacent change pixels on both sides of the line (so corner-only
contact never merges) and unioned once their whole region is closed. Only then are polygons taken to the
raster CRS, measured in metres (:mod:`cdmap.vector.measure`) and simplified.

Ids follow the region's top-left corner (min row, then min col of its pixel bounds), so they do not depend on
the window size. A region is numbered and handed to the writer (:mod:`cdmap.vector.write`) as soon as no
region still open can precede it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdmap import process
from cdmap.errors import IncompatibleInputsError, UsageError
from cdmap.files import check_outputs_spare_inputs, with_sidecars
from cdmap.vector.measure import MetricFrame, metric_frame, pixel_to_crs
from cdmap.vector.source import Classifier, Source
from cdmap.vector.write import Writer, check_target, format_from_path, output_files

log = logging.getLogger("cdmap.vector")

DEFAULT_THRESHOLD = 0.5
_WRITE_BATCH = 65536  # features numbered and appended per write (GeoPackage, Shapefile)


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

    def __init__(self, frame: MetricFrame, affine: Any, min_area: float, simplify: float, writer: Writer) -> None:
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
        crs_geoms = pixel_to_crs(pix, self.affine)
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
        area = self.frame.area_m2(metric)
        keep = ~shapely.is_empty(out) & (area > 0) & (area >= self.min_area)
        idx = np.flatnonzero(keep)
        if idx.size == 0:
            return
        perim = self.frame.length_m(metric[idx])
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


def _global_ids(base: int, labels: np.ndarray) -> np.ndarray:
    """Window labels (0 = none) as global piece ids."""
    return np.where(labels > 0, labels.astype(np.int64) + base, 0)


def _region_stats(
    change: np.ndarray, labels: np.ndarray, k: int, pval: np.ndarray, pv: np.ndarray, r0: int, c0: int, width: int
) -> tuple[np.ndarray, ...]:
    """Per window label 0..k: pixel count, first pixel (raster order), probability count, sum and max."""
    w = change.shape[1]
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
    return n, first, pn, psum, pmax


def _on_internal_edge(labels: np.ndarray, k: int, r0: int, c0: int, height: int, width: int) -> np.ndarray:
    """For window labels 0..k: does the piece touch a window side that is not the raster's border?"""
    h, w = labels.shape
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
    return on_edge


def _polygonize(classify: Classifier, window_size: int, output: _Output) -> None:
    """Stream the raster window by window, handing finished regions to ``output``.

    Regions inside one window go to ``output`` at once; pieces on an internal window line go to the merger,
    which unions them across the lines (``above``: piece ids on the last pixel row of the previous window row;
    ``left``: on the last pixel column of the previous window) and closes a group once no piece of it reaches
    the next, unread window row.
    """
    from rasterio.windows import Window

    height, width = classify.src.ds.height, classify.src.ds.width
    merger = _Merger(output, width)
    next_pid = 1  # global piece ids: window label i is piece next_pid + i - 1
    above = np.zeros(width, dtype=np.int64)
    for r0, row in _windows(height, width, window_size):
        below = np.zeros(width, dtype=np.int64)
        left: np.ndarray | None = None
        h = row[0][2]
        for _, c0, _, w in row:
            process.fault_point("window")
            change, pval, pv = classify(Window(c0, r0, w, h))
            if not change.any():
                left = None
                continue
            labels, polys = _label_window(change, r0, c0)
            k, base = len(polys), next_pid - 1
            next_pid += k
            n, first, pn, psum, pmax = _region_stats(change, labels, k, pval, pv, r0, c0, width)
            on_edge = _on_internal_edge(labels, k, r0, c0, height, width)
            done = np.flatnonzero(~on_edge[1:]) + 1
            output.add(polys[done - 1], n[done], pn[done], psum[done], pmax[done], first[done], width)
            for i in np.flatnonzero(on_edge[1:]) + 1:
                piece = _Piece(polys[i - 1], int(n[i]), int(pn[i]), float(psum[i]), float(pmax[i]), int(first[i]))
                merger.add(base + int(i), piece)
            if r0 > 0:
                merger.union_pairs(above[c0 : c0 + w], _global_ids(base, labels[0]))
            if left is not None:
                merger.union_pairs(left, _global_ids(base, labels[:, 0]))
            left = _global_ids(base, labels[:, -1])
            below[c0 : c0 + w] = _global_ids(base, labels[-1])
        merger.close(np.unique(below[below > 0]) if r0 + h < height else np.empty(0, dtype=np.int64))
        output.flush(min(merger.min_row(), r0 + h))
        above = below
    if merger.pieces:  # pragma: no cover - every group closes on the last row
        raise RuntimeError("unmerged pieces left after the last window row")
    output.flush(math.inf, force=True)


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

    Nodata pixels (:func:`cdmap.raster.valid.read_valid`: GDAL mask, non-finite values) are never change.
    Polygons are 4-connected regions with their holes, identical to polygonizing the whole raster at once.
    ``mean_prob``/``max_prob`` come from ``prob_raster`` when given (it must share the grid), else from
    ``raster`` itself when it is a probability raster, else are null. ``min_area`` (m²) drops polygons whose
    final area is smaller; ``simplify`` (m) is a topology-preserving Douglas-Peucker tolerance (a region that
    would not stay one valid polygon is kept unsimplified).

    Attributes: ``id`` (1..n by the region's top row, then its left column), ``n_pixels``, ``area_m2``,
    ``perimeter_m`` (holes included; ``perim_m`` in Shapefiles), ``mean_prob``, ``max_prob``. An existing
    ``output`` is replaced only with ``overwrite`` (the whole file, all layers). Areas are measured as
    :mod:`cdmap.vector.measure` says. Returns what was written.
    """
    # over 60 lines only by the docstring above (the public contract); the body is open, stream, commit
    raster = os.fspath(raster)  # a str: Path would turn /vsicurl/http://... into http:/...
    output = Path(output)
    fmt = format_from_path(output, vector_format)
    _check_arguments(raster, output, threshold, min_area, simplify, layer, window_size, overwrite)
    check_outputs_spare_inputs([*with_sidecars(raster), *(with_sidecars(prob_raster) if prob_raster else [])],
                               output_files(output, fmt))
    src = Source(raster, "change mask or probability raster")
    probs: Source | None = None
    try:
        if threshold is not None or src.is_float or src.has_scale:
            mode, thr = "prob", (DEFAULT_THRESHOLD if threshold is None else float(threshold))
        else:
            mode, thr = "mask", math.nan
        if prob_raster is not None:
            probs = Source(os.fspath(prob_raster), "probability raster")
            _check_same_grid(src, probs)
        _log_raw_probabilities(src, mode, probs)
        ds = src.ds
        crs = ds.crs if ds.crs else None
        if fmt == "geojson" and crs is None:
            raise UsageError("GeoJSON (RFC 7946) needs a CRS to reproject to WGS84; the raster has none", path=raster)
        frame = metric_frame(crs, ds.transform, ds.width, ds.height, raster)
        writer = Writer(output, fmt, layer, crs, overwrite)
        try:
            out = _Output(frame, ds.transform, float(min_area), float(simplify), writer)
            _polygonize(Classifier(src, mode, thr, probs), window_size, out)
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


def _check_arguments(
    raster: str,
    output: Path,
    threshold: float | None,
    min_area: float,
    simplify: float,
    layer: str,
    window_size: int,
    overwrite: bool,
) -> None:
    """UsageError/OutputError for options out of range and for a target that cannot be written."""
    if window_size < 1:
        raise UsageError(f"window size must be at least 1 pixel, got {window_size}")
    for name, value in (("min area", min_area), ("simplify tolerance", simplify)):
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"{name} must be a finite number >= 0, got {value}")
    if threshold is not None and not math.isfinite(threshold):
        raise UsageError(f"threshold must be a finite number, got {threshold}")
    if not layer:
        raise UsageError("layer name must not be empty")
    check_target(output, overwrite)


def _log_raw_probabilities(src: Source, mode: str, probs: Source | None) -> None:
    """Warn (log) when probabilities are integer pixel values without scale metadata."""
    if probs is not None:
        if not probs.is_float and not probs.has_scale:
            log.warning(
                "%s: integer probability raster without scale metadata; mean_prob/max_prob are raw pixel values",
                probs.path,
            )
    elif mode == "prob" and not src.is_float and not src.has_scale:
        log.warning(
            "%s: integer raster without scale metadata; the threshold and mean_prob/max_prob use raw pixel values",
            src.path,
        )


def _check_same_grid(src: Source, probs: Source) -> None:
    from cdmap.raster.grid import same_grid

    a, b = src.ds, probs.ds
    if (a.width, a.height) != (b.width, b.height):
        raise IncompatibleInputsError(
            f"probability raster is {b.width}x{b.height} pixels but {src.path} is {a.width}x{a.height}",
            path=probs.path,
        )
    if not same_grid(a, b):
        raise IncompatibleInputsError(
            f"probability raster is not on the same grid (CRS/transform) as {src.path}", path=probs.path
        )
