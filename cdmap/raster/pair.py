"""Open and check the before/after pair, decide how the two grids line up, and read windows of both dates.

Everything a user can get wrong is checked in :func:`open_pair`, before any compute, and reported as a
one-line :mod:`cdmap.errors` exception naming the file.

Alignment (``ScenePair.alignment.mode``, an :class:`Alignment`):

``same-grid``
    Equivalent CRS, same transform (within ``GRID_TOL`` of a pixel) and same size: both dates are read
    directly.
``window``
    Equivalent CRS, same pixel size, origins an integer number of pixels apart (or two rasters without CRS,
    see below): the output grid is the common part of both, a window of BEFORE; both dates are read directly
    from their own windows, with no resampling.
``warped``
    Anything else that overlaps (other CRS, resolution, rotation, sub-pixel offset): the output grid is
    BEFORE's grid restricted to the common extent (only BEFORE pixels lying wholly inside AFTER's footprint,
    with a 1e-3 px tolerance), and AFTER is read through a :class:`rasterio.vrt.WarpedVRT` onto exactly that
    grid with the chosen resampling.

``align="strict"`` refuses anything but ``same-grid``. CRSs are compared by equivalence: rasterio's ``==``
first, then numerically (points spread over BEFORE's extent transformed from one CRS to the other must not
move by more than 1e-3 pixel), so a WKT that only *spells* EPSG:32618 differently counts as the same CRS.

Rasters without a CRS on both sides are refused unless ``allow_no_crs``: then geotransforms are ignored and
the pixel grids are assumed to coincide at the top-left corner; if the sizes differ, the common top-left
part is used (mode ``window``) and a note says so.

Validity (the ``valid`` array of :meth:`ScenePair.read`) is True only where BOTH dates are valid. For one
date a pixel is invalid when:

* the selected bands are all masked by GDAL's rules: their nodata value (a pixel is nodata only when *every*
  selected band equals its nodata value, GDAL's dataset-mask convention, so a legitimate 0 in one band does
  not punch holes), an internal/per-dataset mask, or an alpha band;
* any selected band holds NaN or +/-inf (those values are replaced by 0 in the returned arrays);
* (warped AFTER) the warper reports no valid source under the pixel (outside AFTER's footprint, or only
  masked source pixels), through the VRT's alpha band.

When ``bands`` is None and a raster's colour interpretation marks a band as alpha, that band is left out of
the data bands (it still masks the data through GDAL's mask) -- except when ``expected_bands`` equals the
raster's full band count and not the count without alpha: GDAL tags the 4th band of any 4-band Byte GeoTIFF
as alpha by default, so an RGB+NIR file for a 4-band model keeps all four as data. Explicit ``bands`` are
used as given. Whenever a band tagged alpha is used as data it is not used as a mask.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine
from rasterio.windows import Window

from cdmap.errors import IncompatibleInputsError, InputError, UsageError
from cdmap.raster.gdal_errors import GDAL_ERRORS, gdal_message
from cdmap.raster.grid import (
    GRID_TOL,
    crs_equivalent,
    grid_bounds,
    near_int,
    pixel_size,
    same_grid,
    same_pixel_geometry,
)
from cdmap.raster.identity import is_local
from cdmap.raster.valid import alpha_bands, data_bands, mask_kinds, read_valid

__all__ = ["Alignment", "ScenePair", "open_pair", "crs_equivalent", "same_grid", "GRID_TOL", "WARP_RESAMPLINGS"]

log = logging.getLogger("cdmap.raster")

#: Tolerance, in pixels, when snapping the common extent onto BEFORE's pixel edges.
SNAP_TOL_PX = 1e-3

#: Resampling names accepted for ``resampling`` (those GDAL's warper implements).
WARP_RESAMPLINGS = (
    "nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average", "mode",
    "max", "min", "med", "q1", "q3", "sum", "rms",
)



# --------------------------------------------------------------------------------------------- helpers


def _crs_label(crs: CRS | None) -> str:
    """A short human name for a CRS (EPSG code when it is one, else the WKT's name)."""
    if crs is None:
        return "none"
    try:
        epsg = crs.to_epsg()
    except Exception:  # noqa: BLE001 - PROJ lookups can fail on odd CRSs
        epsg = None
    if epsg:
        return f"EPSG:{epsg}"
    wkt = crs.to_wkt()
    start = wkt.find('"')
    end = wkt.find('"', start + 1)
    return f'"{wkt[start + 1:end]}"' if 0 <= start < end else wkt[:60]


def _fmt(v: float) -> str:
    return f"{v:.10g}"


# ------------------------------------------------------------------------------------------- preflight


@dataclass
class _Side:
    """What preflight learnt about one date."""

    role: str  # "before" / "after"
    path: str
    bands: list[int]
    dtype: str
    crs: CRS | None
    transform: Affine
    width: int
    height: int
    nodata: float | None
    mask_kinds: list[str]  # per selected band: "all_valid" | "nodata" | "per_dataset" | "per_band"
    block_shape: tuple[int, int]
    notes: list[str] = field(default_factory=list)
    alpha_left_out: bool = False

    def describe_validity(self) -> list[str]:
        kinds = set(self.mask_kinds)
        out = []
        if "nodata" in kinds:
            out.append(f"nodata={_fmt(self.nodata) if self.nodata is not None else 'n/a'}")
        if "per_dataset" in kinds:
            out.append("mask/alpha")
        if "per_band" in kinds:
            out.append("per-band mask")
        if np.issubdtype(np.dtype(self.dtype), np.floating):
            out.append("non-finite values")
        return out


def _open_checked(path: str, role: str) -> rasterio.DatasetReader:
    if is_local(path):
        p = Path(path)
        if not p.exists():
            raise InputError(f"{role} raster not found", path)
        if p.is_dir():
            raise InputError(f"{role} raster is a directory, not a raster file", path)
        if not os.access(p, os.R_OK):
            raise InputError(f"{role} raster is not readable (permission denied)", path)
        if p.stat().st_size == 0:
            raise InputError(f"{role} raster is an empty file (0 bytes)", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path)
    except GDAL_ERRORS as exc:
        raise InputError(f"not a raster GDAL can read ({gdal_message(exc)})", path) from exc
    return ds


def _inspect(ds: rasterio.DatasetReader, path: str, role: str, bands: list[int] | None,
             expected_bands: int | None) -> _Side:
    """Per-file checks: size, dtype, band selection, decodable pixels."""
    if ds.width == 0 or ds.height == 0 or ds.count == 0:
        raise InputError(f"{role} raster is empty ({ds.width}x{ds.height} pixels, {ds.count} bands)", path)
    notes: list[str] = []
    alpha = alpha_bands(ds)
    if bands is None:
        sel, alpha_as_data = data_bands(ds, expected_bands)
        if alpha_as_data and len(sel) > len(alpha):
            notes.append(f"{role} ({Path(path).name}): band {alpha[0]} is tagged alpha but the model expects "
                         f"{expected_bands} bands: used as data, not as a mask")
        elif alpha and not alpha_as_data:
            notes.append(f"{role} ({Path(path).name}): alpha band {alpha[0]} used as a validity mask, "
                         f"not as data (select bands with --bands to change this)")
    else:
        bad = [b for b in bands if b < 1 or b > ds.count]
        if bad:
            raise UsageError(f"--bands {bad[0]} is out of range: the {role} raster has {ds.count} band"
                             f"{'s' if ds.count != 1 else ''} (numbered from 1)", path)
        sel = list(bands)
    dtypes = {ds.dtypes[b - 1] for b in sel}
    for dt in sorted(dtypes):
        if "complex" in dt:
            raise InputError(f"unsupported dtype {dt} (complex data; convert to real bands first)", path)
    dtype = ds.dtypes[sel[0] - 1]
    if len(dtypes) > 1:
        dtype = str(np.result_type(*[np.dtype(d) for d in dtypes]))
    if any(ds.colorinterp[b - 1] == ColorInterp.palette for b in sel):
        notes.append(f"{role} ({Path(path).name}): paletted band; its palette indices are used as values")
    alpha_is_data = any(b in alpha for b in sel)
    kinds = mask_kinds(ds, sel, alpha_is_data)
    nodatavals = [ds.nodatavals[b - 1] for b in sel]
    nodata = next((v for v in nodatavals if v is not None), None)
    return _Side(role=role, path=path, bands=sel, dtype=dtype, crs=ds.crs, transform=ds.transform,
                 width=ds.width, height=ds.height, nodata=nodata, mask_kinds=kinds,
                 block_shape=tuple(ds.block_shapes[sel[0] - 1]), notes=notes,
                 alpha_left_out=bands is None and bool(alpha) and len(sel) < ds.count)


# ----------------------------------------------------------------------------------------------- reads


def _read_direct(ds: Any, side: _Side, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """Read ``side.bands`` of ``window`` as float32 plus the validity of that date."""
    return read_valid(ds, side.bands, window, side.mask_kinds)


def _read_warped(vrt: Any, side: _Side, alpha_index: int, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """Read the warped AFTER: data bands plus the VRT's alpha band as validity."""
    data = vrt.read([*side.bands, alpha_index], window=window, out_dtype="float32")
    out = np.ascontiguousarray(data[:-1])
    valid = data[-1] > 0
    finite = np.isfinite(out)
    if not finite.all():
        valid &= finite.all(axis=0)
        out[~finite] = 0.0
    return out, valid


class _Handles:
    """One thread's open datasets."""

    def __init__(self, before: Any, after: Any, vrt: Any = None) -> None:
        self.before = before
        self.after = after
        self.vrt = vrt

    def close(self) -> None:
        for ds in (self.vrt, self.after, self.before):
            if ds is not None:
                try:
                    ds.close()
                except Exception:  # noqa: BLE001 - closing a read handle cannot lose data
                    pass


# ------------------------------------------------------------------------------------------- ScenePair


class ScenePair:
    """The before/after pair on one output grid; build it with :func:`open_pair`.

    Attributes: ``width``, ``height``, ``crs``, ``transform`` (the output grid), ``count`` (bands used),
    ``dtype`` (numpy dtype name of BEFORE's bands), ``dtypes`` (both dates), ``bands`` ({"before": [...],
    "after": [...]}, 1-based), ``before_path``, ``after_path``, ``alignment`` (:class:`Alignment`),
    ``notes`` (one-line messages for stderr), ``nodata`` ({"before": value|None, "after": value|None}) and
    ``validity`` ({"before": [...], "after": [...]}, what marks pixels invalid).

    :meth:`read` may be called from several threads at once: each thread lazily opens its own dataset
    handles. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, before: _Side, after: _Side, layout: _Layout, notes: list[str],
                 handles: _Handles | None = None) -> None:
        self._before = before
        self._after = after
        self.before_path = before.path
        self.after_path = after.path
        bw = layout.before_window
        self.width = int(bw.width)
        self.height = int(bw.height)
        self.crs = before.crs
        self.transform = before.transform @ Affine.translation(bw.col_off, bw.row_off)
        self.count = len(before.bands)
        self.dtype = before.dtype
        self.dtypes = {"before": before.dtype, "after": after.dtype}
        self.bands = {"before": list(before.bands), "after": list(after.bands)}
        self.alignment = layout.alignment
        self.notes = notes
        self.nodata = {"before": before.nodata, "after": after.nodata}
        self.validity = {"before": before.describe_validity(), "after": after.describe_validity()}
        if layout.warp is not None:
            self.validity["after"] = ["warped footprint/alpha", *self.validity["after"]]
        self._before_window = bw
        self._after_window = layout.after_window
        self._warp = layout.warp
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[_Handles] = []
        self._closed = False
        if handles is not None:
            self._local.handles = handles
            self._all.append(handles)

    # -- grid information

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the output grid."""
        return (self.height, self.width)

    @property
    def res(self) -> tuple[float, float]:
        """(x, y) pixel size of the output grid."""
        return (abs(self.transform.a), abs(self.transform.e))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) of the output grid."""
        from rasterio.transform import array_bounds

        west, south, east, north = array_bounds(self.height, self.width, self.transform)
        return (west, south, east, north)

    def block_shape(self) -> tuple[int, int]:
        """(rows, cols) of BEFORE's internal blocks, for information."""
        return self._before.block_shape

    # -- handles

    def _handles(self) -> _Handles:
        if self._closed:
            raise RuntimeError("ScenePair is closed")
        h = getattr(self._local, "handles", None)
        if h is not None:
            return h
        with self._lock:
            if self._closed:
                raise RuntimeError("ScenePair is closed")
        before = after = vrt = None
        try:
            before = rasterio.open(self.before_path)
            after = rasterio.open(self.after_path)
            if self._warp is not None:
                vrt = _make_vrt(after, self._warp)
        except GDAL_ERRORS as exc:
            for ds in (vrt, after, before):
                if ds is not None:
                    ds.close()
            raise InputError(f"cannot reopen raster ({gdal_message(exc)})",
                             self.after_path if before is not None else self.before_path) from exc
        h = _Handles(before, after, vrt)
        with self._lock:
            if self._closed:
                h.close()
                raise RuntimeError("ScenePair is closed")
            self._all.append(h)
        self._local.handles = h
        return h

    def close(self) -> None:
        """Close every handle opened by any thread. Idempotent."""
        with self._lock:
            self._closed = True
            handles, self._all = self._all, []
        for h in handles:
            h.close()

    def __enter__(self) -> ScenePair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ScenePair({self.before_path!r}, {self.after_path!r}, {self.width}x{self.height}, "
                f"{self.count} bands, {self.alignment.mode})")

    # -- reading

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read a :class:`rasterio.windows.Window` of the output grid from both dates.

        Returns ``(a, b, valid)``: ``a`` and ``b`` float32 ``(count, height, width)`` with raw values
        (non-finite values replaced by 0), ``valid`` bool ``(height, width)``, True where both dates are
        valid. The window must have whole-pixel offsets and sizes and lie inside the output grid. Thread-safe.
        """
        row_off, col_off, height, width = _window_ints(window)
        if (height <= 0 or width <= 0 or row_off < 0 or col_off < 0
                or row_off + height > self.height or col_off + width > self.width):
            raise ValueError(f"window rows {row_off}:{row_off + height}, cols {col_off}:{col_off + width} "
                             f"is not inside the {self.height}x{self.width} grid")
        h = self._handles()
        bw = self._before_window
        where = (row_off, col_off, height, width)
        win_b = Window(bw.col_off + col_off, bw.row_off + row_off, width, height)
        a, va = self._guarded(lambda: _read_direct(h.before, self._before, win_b), self.before_path, *where)
        if self._warp is not None:
            win = Window(col_off, row_off, width, height)
            b, vb = self._guarded(lambda: _read_warped(h.vrt, self._after, self._warp.alpha, win),
                                  self.after_path, *where)
        else:
            aw = self._after_window
            assert aw is not None
            win_a = Window(aw.col_off + col_off, aw.row_off + row_off, width, height)
            b, vb = self._guarded(lambda: _read_direct(h.after, self._after, win_a), self.after_path, *where)
        va &= vb
        return a, b, va

    @staticmethod
    def _guarded(fn: Any, path: str, row_off: int, col_off: int, height: int, width: int) -> Any:
        try:
            return fn()
        except GDAL_ERRORS as exc:
            raise InputError(
                f"failed to read window rows {row_off}-{row_off + height - 1}, "
                f"cols {col_off}-{col_off + width - 1}: {gdal_message(exc)}", path) from exc


def _window_ints(window: Window) -> tuple[int, int, int, int]:
    """(row_off, col_off, height, width) of a whole-pixel window."""
    vals = (window.row_off, window.col_off, window.height, window.width)
    if any(float(v) != int(v) for v in vals):
        raise ValueError(f"window {window} does not have whole-pixel offsets and sizes")
    row_off, col_off, height, width = (int(v) for v in vals)
    return row_off, col_off, height, width


def _make_vrt(src: Any, warp: _WarpSpec) -> Any:
    from rasterio.vrt import WarpedVRT

    return WarpedVRT(src, crs=warp.crs, transform=warp.transform, width=warp.width, height=warp.height,
                     resampling=Resampling[warp.resampling], add_alpha=warp.add_alpha, dtype="float32")


# ------------------------------------------------------------------------------------------- alignment


def _describe_difference(b: _Side, a: _Side, crs_same: bool) -> list[str]:
    diffs = []
    if not crs_same:
        diffs.append(f"CRS {_crs_label(b.crs)} vs {_crs_label(a.crs)}")
    tb, ta = b.transform, a.transform
    if not same_pixel_geometry(tb, ta):
        if tb.b == 0 and tb.d == 0 and ta.b == 0 and ta.d == 0:
            diffs.append(f"pixel size {_fmt(abs(tb.a))}x{_fmt(abs(tb.e))} vs {_fmt(abs(ta.a))}x{_fmt(abs(ta.e))}")
        else:
            diffs.append(f"pixel geometry {tuple(tb)[:6]} vs {tuple(ta)[:6]}")
    if abs(tb.c - ta.c) > GRID_TOL * pixel_size(tb) or abs(tb.f - ta.f) > GRID_TOL * pixel_size(tb):
        diffs.append(f"origin ({_fmt(tb.c)}, {_fmt(tb.f)}) vs ({_fmt(ta.c)}, {_fmt(ta.f)})")
    if (b.width, b.height) != (a.width, a.height):
        diffs.append(f"size {b.width}x{b.height} vs {a.width}x{a.height} pixels")
    return diffs


def _overlap_window(b: _Side, dc: float, dr: float, aw: int, ah: int) -> Window | None:
    c0, r0 = max(0, round(dc)), max(0, round(dr))
    c1, r1 = min(b.width, round(dc) + aw), min(b.height, round(dr) + ah)
    if c1 <= c0 or r1 <= r0:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)


def _after_footprint_in_before(b: _Side, a: _Side, a_crs: CRS | None) -> tuple[float, float, float, float]:
    """Bounding box (col0, row0, col1, row1) of AFTER's footprint in BEFORE's pixel coordinates."""
    from rasterio.warp import transform

    n = 21
    pts = []
    for i in range(n):
        f = i / (n - 1)
        pts += [(f * a.width, 0.0), (f * a.width, float(a.height)), (0.0, f * a.height),
                (float(a.width), f * a.height)]
    xs = [(a.transform @ p)[0] for p in pts]
    ys = [(a.transform @ p)[1] for p in pts]
    if a_crs is not None and b.crs is not None and a_crs != b.crs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xs, ys = transform(a_crs, b.crs, xs, ys)
    inv = ~b.transform
    px = [inv @ (x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    cols, rows = [c for c, _ in px], [r for _, r in px]
    return min(cols), min(rows), max(cols), max(rows)


@dataclass(frozen=True)
class Alignment:
    """How AFTER lines up with BEFORE (see the module doc); :meth:`to_dict` is run.json's ``alignment``.

    Windows are ``[col_off, row_off, width, height]``; ``window_of_after`` only in the modes that read AFTER
    directly from a window of its own (not ``same-grid``, not ``warped``).
    """

    mode: str  # "same-grid" | "window" | "warped"
    reason: str
    resampling: str | None
    window_of_before: tuple[int, int, int, int]
    window_of_after: tuple[int, int, int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists for windows; no ``window_of_after`` when there is none)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if d["window_of_after"] is None:
            del d["window_of_after"]
        return d


@dataclass(frozen=True)
class _WarpSpec:
    """The WarpedVRT that puts AFTER onto the output grid (``alpha``: the VRT's alpha band, once built)."""

    crs: CRS
    transform: Affine
    width: int
    height: int
    resampling: str
    add_alpha: bool
    alpha: int = 0


@dataclass(frozen=True)
class _Layout:
    """What :func:`_align` decides: the alignment, where each date is read, and the notes for the user."""

    alignment: Alignment
    before_window: Window
    after_window: Window | None  # None when AFTER is warped
    warp: _WarpSpec | None
    notes: tuple[str, ...] = ()


def _win_tuple(w: Window) -> tuple[int, int, int, int]:
    return (int(w.col_off), int(w.row_off), int(w.width), int(w.height))


def _align(b: _Side, a: _Side, *, align: str, resampling: str, allow_no_crs: bool, add_alpha: bool) -> _Layout:
    """Decide the output grid and how both dates are read onto it."""
    if b.crs is None and a.crs is None:
        return _align_no_crs(b, a, align=align, allow_no_crs=allow_no_crs)
    if b.crs is None or a.crs is None:
        which, other = (b, a) if b.crs is None else (a, b)
        raise IncompatibleInputsError(
            f"{which.role} raster has no CRS but {other.role} ({other.path}) has {_crs_label(other.crs)}; "
            f"assign the CRS first (e.g. gdal_edit.py -a_srs)", which.path)

    notes: list[str] = []
    crs_same = crs_equivalent(b.crs, a.crs, grid_bounds(b), pixel_size(b.transform))
    if crs_same and b.crs != a.crs:
        notes.append(f"CRS of {Path(a.path).name} ({_crs_label(a.crs)}) is written differently from "
                     f"{Path(b.path).name}'s ({_crs_label(b.crs)}) but equivalent: treated as the same CRS")
    diffs = _describe_difference(b, a, crs_same)
    if crs_same and same_grid(b, a):
        win = Window(0, 0, b.width, b.height)
        alignment = Alignment("same-grid", "same CRS, transform and size", None, _win_tuple(win))
        return _Layout(alignment, win, win, None, tuple(notes))
    if crs_same and same_pixel_geometry(b.transform, a.transform):
        dc, dr = ~b.transform @ (a.transform.c, a.transform.f)
        if near_int(dc) and near_int(dr):
            return _align_window(b, a, round(dc), round(dr), align=align, diffs=diffs, notes=notes)
    if align == "strict":
        raise IncompatibleInputsError(f"{b.path} and {a.path}: grids differ (--align strict): {'; '.join(diffs)}")
    return _align_warped(b, a, b.crs if crs_same else a.crs, resampling=resampling, add_alpha=add_alpha,
                         diffs=diffs, notes=notes)


def _align_no_crs(b: _Side, a: _Side, *, align: str, allow_no_crs: bool) -> _Layout:
    """Neither date has a CRS: with ``allow_no_crs`` the pixel grids coincide at the top-left corner."""
    names = f"{b.path} and {a.path}"
    if not allow_no_crs:
        raise IncompatibleInputsError(
            f"{names}: neither raster has a CRS; pass --allow-no-crs to assume the pixel grids coincide")
    win = Window(0, 0, min(b.width, a.width), min(b.height, a.height))
    if (b.width, b.height) == (a.width, a.height):
        alignment = Alignment("same-grid", "no CRS on either date: pixel grids assumed identical", None,
                              (0, 0, b.width, b.height))
    else:
        if align == "strict":
            raise IncompatibleInputsError(f"{names}: grids differ (--align strict): size {b.width}x"
                                          f"{b.height} vs {a.width}x{a.height} pixels")
        reason = (f"no CRS on either date and sizes differ ({b.width}x{b.height} vs "
                  f"{a.width}x{a.height}): common top-left {win.width}x{win.height} pixels")
        alignment = Alignment("window", reason, None, _win_tuple(win), _win_tuple(win))
    return _Layout(alignment, win, Window(0, 0, win.width, win.height), None, (f"no CRS: {alignment.reason}",))


def _align_window(b: _Side, a: _Side, dc: int, dr: int, *, align: str, diffs: list[str],
                  notes: list[str]) -> _Layout:
    """Same pixel grid, origins ``dc``, ``dr`` whole pixels apart: the common extent, read without resampling."""
    names = f"{b.path} and {a.path}"
    win = _overlap_window(b, dc, dr, a.width, a.height)
    if win is None:
        raise IncompatibleInputsError(f"{names}: the rasters do not overlap (after's origin is "
                                      f"{dc}, {dr} pixels from before's)")
    if align == "strict":
        raise IncompatibleInputsError(f"{names}: grids differ (--align strict): {'; '.join(diffs)}")
    a_win = Window(win.col_off - dc, win.row_off - dr, win.width, win.height)
    reason = f"same pixel grid, origins {dc}, {dr} pixels apart; output is the common extent, no resampling"
    notes = [*notes, f"{Path(b.path).name} and {Path(a.path).name} overlap partly: output covers "
                     f"{win.width}x{win.height} pixels of before's {b.width}x{b.height} grid "
                     f"(cols {win.col_off}-{win.col_off + win.width - 1}, "
                     f"rows {win.row_off}-{win.row_off + win.height - 1})"]
    return _Layout(Alignment("window", reason, None, _win_tuple(win), _win_tuple(a_win)), win, a_win, None,
                   tuple(notes))


def _align_warped(b: _Side, a: _Side, a_crs: CRS, *, resampling: str, add_alpha: bool, diffs: list[str],
                  notes: list[str]) -> _Layout:
    """Anything else: BEFORE's pixels wholly inside AFTER's footprint, AFTER warped onto them."""
    names = f"{b.path} and {a.path}"
    try:
        c0, r0, c1, r1 = _after_footprint_in_before(b, a, a_crs)
    except Exception as exc:  # noqa: BLE001 - PROJ failure or all points non-finite
        raise IncompatibleInputsError(f"{names}: cannot relate the two CRSs ({_crs_label(b.crs)} and "
                                      f"{_crs_label(a.crs)}): {exc}") from exc
    col0 = max(0, math.ceil(c0 - SNAP_TOL_PX))
    row0 = max(0, math.ceil(r0 - SNAP_TOL_PX))
    col1 = min(b.width, math.floor(c1 + SNAP_TOL_PX))
    row1 = min(b.height, math.floor(r1 + SNAP_TOL_PX))
    if col1 <= col0 or row1 <= row0:
        raise IncompatibleInputsError(f"{names}: the rasters do not overlap ({'; '.join(diffs)})")
    win = Window(col0, row0, col1 - col0, row1 - row0)
    reason = "; ".join(diffs)
    warp = _WarpSpec(b.crs, b.transform @ Affine.translation(col0, row0), win.width, win.height, resampling,
                     add_alpha)
    notes = [*notes, f"{Path(a.path).name} is resampled ({resampling}) onto {Path(b.path).name}'s grid: {reason}"]
    if (win.width, win.height) != (b.width, b.height):
        notes.append(f"output covers the common extent: {win.width}x{win.height} pixels of before's "
                     f"{b.width}x{b.height} grid (cols {col0}-{col1 - 1}, rows {row0}-{row1 - 1})")
    return _Layout(Alignment("warped", reason, resampling, _win_tuple(win)), win, None, warp, tuple(notes))


# ------------------------------------------------------------------------------------------- open_pair


def open_pair(
    before: str | os.PathLike,
    after: str | os.PathLike,
    *,
    bands: list[int] | None = None,
    expected_bands: int | None = None,
    align: str = "auto",
    resampling: str = "bilinear",
    allow_no_crs: bool = False,
) -> ScenePair:
    """Open BEFORE and AFTER, check them, and decide the output grid (see the module docstring).

    ``bands``: 1-based band numbers used from both dates (None: all bands but an alpha band).
    ``expected_bands``: the model's input band count. ``align``: ``"auto"`` (resample AFTER onto BEFORE's
    grid when needed) or ``"strict"`` (refuse any grid difference). ``resampling``: a GDAL warp resampling
    name. ``allow_no_crs``: accept two rasters without CRS, pixel grids assumed to coincide.

    Raises :class:`UsageError`, :class:`InputError` or :class:`IncompatibleInputsError` before any compute.
    """
    bands = _check_arguments(bands, expected_bands, align, resampling)
    before_s, after_s = os.fspath(before), os.fspath(after)

    ds_b = _open_checked(before_s, "before")
    ds_a: Any = None
    try:
        side_b = _inspect(ds_b, before_s, "before", bands, expected_bands)
        _check_decodes(ds_b, side_b)
        ds_a = _open_checked(after_s, "after")
        side_a = _inspect(ds_a, after_s, "after", bands, expected_bands)
        _check_decodes(ds_a, side_a)

        _check_band_counts(side_b, side_a, bands, expected_bands)
        add_alpha = ColorInterp.alpha not in ds_a.colorinterp
        layout = _align(side_b, side_a, align=align, resampling=resampling, allow_no_crs=allow_no_crs,
                        add_alpha=add_alpha)
        notes = side_b.notes + side_a.notes + list(layout.notes)
        if side_b.dtype != side_a.dtype:
            notes.append(f"the dates have different data types ({side_b.dtype} vs {side_a.dtype}); "
                         f"check that they hold comparable values")
        vrt = None
        if layout.warp is not None:
            try:
                vrt = _make_vrt(ds_a, layout.warp)
            except GDAL_ERRORS as exc:
                raise IncompatibleInputsError(f"cannot warp onto before's grid ({gdal_message(exc)})",
                                              after_s) from exc
            alpha = next(i + 1 for i, ci in enumerate(vrt.colorinterp) if ci == ColorInterp.alpha)
            layout = replace(layout, warp=replace(layout.warp, alpha=alpha))
        handles = _Handles(ds_b, ds_a, vrt)
    except BaseException:
        ds_b.close()
        if ds_a is not None:
            ds_a.close()
        raise

    pair = ScenePair(side_b, side_a, layout, notes, handles)
    for note in notes:
        log.info("%s", note)
    return pair


def _check_arguments(bands: list[int] | None, expected_bands: int | None, align: str, resampling: str
                     ) -> list[int] | None:
    """Validate :func:`open_pair`'s arguments (:class:`UsageError`); returns ``bands`` as a list of ints."""
    if align not in ("auto", "strict"):
        raise UsageError(f"--align must be 'auto' or 'strict', not {align!r}")
    if resampling not in WARP_RESAMPLINGS:
        raise UsageError(f"--resampling {resampling!r} is not one of {', '.join(WARP_RESAMPLINGS)}")
    if bands is not None:
        bands = list(bands)
        if not bands:
            raise UsageError("--bands is empty")
        if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in bands):
            raise UsageError(f"--bands must be whole band numbers, not {bands!r}")
        bands = [int(x) for x in bands]
    if expected_bands is not None and expected_bands < 1:
        raise UsageError(f"expected_bands must be >= 1, not {expected_bands}")
    return bands


def _check_band_counts(side_b: _Side, side_a: _Side, bands: list[int] | None, expected_bands: int | None) -> None:
    """Both dates use as many bands as each other and as the model expects."""
    with_bands = " (after --bands)" if bands is not None else ""
    if bands is None and (side_b.alpha_left_out or side_a.alpha_left_out):
        with_bands = " (alpha band left out)"
    if len(side_b.bands) != len(side_a.bands):
        raise IncompatibleInputsError(
            f"before ({side_b.path}) has {len(side_b.bands)} bands{with_bands} but after ({side_a.path}) has "
            f"{len(side_a.bands)}; choose the same bands with --bands")
    if expected_bands is not None and len(side_b.bands) != expected_bands:
        raise IncompatibleInputsError(
            f"has {len(side_b.bands)} bands{with_bands}, the model expects {expected_bands}; "
            f"choose bands with --bands{bands_hint(len(side_b.bands), expected_bands)}", side_b.path)


# band count -> (red,green,blue band numbers, what such a stack usually is), for the --bands hint
_RGB_OF_STACK = {
    13: ("4,3,2", "a 13-band Sentinel-2 L1C stack (B1..B12, B8A)"),
    12: ("4,3,2", "a 12-band Sentinel-2 L2A stack (B1..B12 without B10, B8A)"),
    6: ("3,2,1", "a 6-band Landsat TM/ETM+ stack (bands 1-5, 7)"),
    7: ("4,3,2", "a Landsat 8/9 OLI stack (bands 1-7)"),
    4: ("1,2,3", "an RGB + near-infrared stack"),
}


def bands_hint(count: int, expected: int) -> str:
    """``", e.g. --bands 4,3,2 for ..."`` when an RGB model gets a multispectral stack of a known kind."""
    if expected != 3 or count not in _RGB_OF_STACK:
        return ""
    rgb, what = _RGB_OF_STACK[count]
    return f", e.g. --bands {rgb} for {what}"


def _check_decodes(ds: Any, side: _Side) -> None:
    """Decode the first and the last block of the selected bands: catches truncated or corrupt files early."""
    corners = [Window(0, 0, 1, 1), Window(side.width - 1, side.height - 1, 1, 1)]
    for win in corners:
        try:
            _read_direct(ds, side, win)
        except GDAL_ERRORS as exc:
            raise InputError(f"{side.role} raster cannot be decoded (truncated or corrupt?): "
                             f"{gdal_message(exc)}", side.path) from exc
