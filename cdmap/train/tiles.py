"""``cdmap tiles``: cut a georeferenced scene pair and its labels into LEVIR-layout training tiles.

The scene is cut into a grid of non-overlapping ``tile_size`` windows (edge tiles are smaller, so the whole scene is
covered and nothing is resized or overlapped); windows where either date holds no valid pixel (nodata value,
mask or alpha band, NaN: the rule of :func:`cdmap.raster.valid.read_valid`) are skipped. Tiles are
shuffled with ``seed`` and dealt to train/val/test by the ``split`` fractions (split by tile, deterministic). Every
read is windowed, so scenes of any size fit in memory.

Labels are a raster on BEFORE's grid (band 1, decoded by the one label rule of :mod:`cdmap.labels`: 0/1, 0/255,
or ``label_values`` such as OSCD's 1/2; a label raster without georeferencing only with ``pixel_grid`` and
BEFORE's size) or a polygon file (GeoPackage, GeoJSON,
Shapefile, FlatGeobuf...) read with geopandas, reprojected to BEFORE's CRS and burnt onto each tile
(pixel centre inside a polygon = change). Label tiles hold 0 and 255; pixels where a label raster is nodata
(a nodata value other than 0) are written as :data:`LABEL_IGNORE` and training then needs
``--ignore-index 127`` (``tiles.json`` and the command say so).

Output: ``DATA/{train,val,test}/{A,B,label}/<stem>_<row>_<col>.<tif|png>`` plus ``DATA/tiles.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cdmap.errors import IncompatibleInputsError, InputError, OutputError, UsageError
from cdmap.files import check_outputs_spare_inputs, with_sidecars
from cdmap.labels import check_label_grid
from cdmap.raster.grid import same_grid
from cdmap.raster.identity import is_local
from cdmap.vector.labels import VECTOR_SUFFIXES

SPLITS = ("train", "val", "test")
LABEL_IGNORE = 127


@dataclass
class TilesResult:
    """What :func:`make_tiles` wrote."""

    out_dir: Path
    tile_size: int
    counts: dict[str, int]
    skipped_nodata: int
    names: dict[str, list[str]] = field(default_factory=dict)
    ignore_index: int | None = None


def parse_split(text: str | tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` -> fractions for train/val/test (non-negative, summing to 1)."""
    try:
        parts = [float(x) for x in (text.split(",") if isinstance(text, str) else text)]
    except ValueError as exc:
        raise UsageError(f"--split must be three numbers like 0.7,0.15,0.15, got {text!r}") from exc
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise UsageError(f"--split must be three non-negative fractions summing to 1, got {text!r}")
    return parts[0], parts[1], parts[2]


def split_counts(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """Tiles per split: rounded fractions, each non-zero fraction getting at least one tile when possible."""
    counts = [int(round(n * f)) for f in fractions]
    counts[0] = n - counts[1] - counts[2]
    for i in range(3):
        if fractions[i] > 0 and counts[i] == 0:
            donor = int(np.argmax(counts))
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    if counts[0] < 0:
        counts = [max(0, c) for c in counts]
        counts[0] = n - counts[1] - counts[2]
    return counts


def _windows(height: int, width: int, size: int):
    from rasterio.windows import Window

    for row in range(0, height, size):
        for col in range(0, width, size):
            yield Window(col, row, min(size, width - col), min(size, height - row))


def _all_nodata(src: Any, window: Any) -> bool:
    """True when no pixel of ``window`` is valid under the project's one rule (:func:`cdmap.data.read_dataset`)."""
    from cdmap.data import read_dataset

    return not read_dataset(src, window)[1].any()


def make_tiles(
    before: str | os.PathLike,
    after: str | os.PathLike,
    labels: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tile_size: int = 256,
    split: str | tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    fmt: str = "tif",
    overwrite: bool = False,
    label_values: tuple[int, int] | None = None,
    pixel_grid: bool = False,
) -> TilesResult:
    """Cut ``before``/``after``/``labels`` into ``out_dir/{train,val,test}/{A,B,label}`` tiles (see module doc).

    Inputs are any paths GDAL opens (local files, ``/vsizip/``, ``/vsicurl/``, URLs)."""
    fractions = parse_split(split)
    if tile_size < 16:
        raise UsageError(f"--tile-size must be >= 16, got {tile_size}")
    fmt = fmt.lower().lstrip(".")
    if fmt not in ("tif", "png"):
        raise UsageError(f"--format must be tif or png, got {fmt!r}")
    before, after, labels, out_dir = os.fspath(before), os.fspath(after), os.fspath(labels), Path(out_dir)
    for p in (before, after, labels):
        if is_local(p) and not Path(p).exists():
            raise InputError("file not found", p)
    check_outputs_spare_inputs([*with_sidecars(before), *with_sidecars(after), *with_sidecars(labels)],
                               [out_dir / "tiles.json"], [out_dir / s for s in SPLITS])
    _check_out(out_dir, overwrite)
    src = _open_sources(before, after, labels, fmt, pixel_grid)
    try:  # everything is checked before the output folder is touched; tiles are built beside it
        src.label_values = label_values
        _check_label_values(src, labels)
        windows, skipped = _valid_windows(src, tile_size, before)
        assignment = _assign(len(windows), fractions, seed)
        with _building(out_dir) as build:
            names, used_ignore = _write_tiles(src, windows, assignment, build, Path(before).stem, fmt)
            result = TilesResult(out_dir=out_dir, tile_size=tile_size, counts={s: len(v) for s, v in names.items()},
                                 skipped_nodata=skipped, names={s: sorted(v) for s, v in names.items()},
                                 ignore_index=LABEL_IGNORE if used_ignore else None)
            manifest: dict[str, Any] = {
                "before": str(before), "after": str(after), "labels": str(labels), "tile_size": tile_size,
                "label_values": list(label_values) if label_values else None,
                "split": list(fractions), "seed": seed, "format": fmt, "counts": result.counts,
                "skipped_nodata": skipped, "ignore_index": result.ignore_index, "tiles": result.names,
            }
            (build / "tiles.json").write_text(json.dumps(manifest, indent=2))
            _swap_in(build, out_dir)
    finally:
        src.close()
    return result


@dataclass
class _Sources:
    """The open scene pair and its labels: a label raster (``lab``) or polygons (``gdf``)."""

    a: Any
    b: Any
    lab: Any = None
    gdf: Any = None
    label_values: tuple[int, int] | None = None

    def close(self) -> None:
        for s in (self.a, self.b, self.lab):
            if s is not None:
                s.close()


def _open_sources(before: str, after: str, labels: str, fmt: str, pixel_grid: bool) -> _Sources:
    """Open and check the scene pair (same grid and bands, PNG-compatible) and the labels."""
    import rasterio

    from cdmap.vector.labels import read_polygons

    try:
        src = _Sources(rasterio.open(before), None)
    except rasterio.errors.RasterioError as exc:
        raise InputError(f"cannot open raster: {exc}", before) from exc
    try:
        src.b = rasterio.open(after)
    except rasterio.errors.RasterioError as exc:
        src.close()
        raise InputError(f"cannot open raster: {exc}", after) from exc
    try:
        a, b = src.a, src.b
        if not same_grid(a, b):
            raise IncompatibleInputsError(
                f"BEFORE ({a.width}x{a.height}, {a.crs}) and AFTER ({b.width}x{b.height}, "
                f"{b.crs}) are not on the same grid; align them first (e.g. gdalwarp -te/-tr)", after)
        if a.count != b.count:
            raise IncompatibleInputsError(f"BEFORE has {a.count} bands, AFTER {b.count}", after)
        if fmt == "png" and (a.dtypes[0] not in ("uint8", "uint16") or a.count > 4):
            raise UsageError(f"PNG tiles need uint8/uint16 images with at most 4 bands ({a.count} x "
                             f"{a.dtypes[0]} here); use --format tif")
        if Path(labels).suffix.lower() in VECTOR_SUFFIXES:
            src.gdf = read_polygons(labels, a.crs)
            return src
        try:
            src.lab = rasterio.open(labels)
        except rasterio.errors.RasterioError as exc:
            raise InputError(f"cannot open label raster (or unknown polygon format): {exc}", labels) from exc
        check_label_grid(src.lab, a, labels, pixel_grid)
        return src
    except BaseException:
        src.close()
        raise


def _check_label_values(src: _Sources, labels: str) -> None:
    """Refuse a label raster whose values the label rule cannot decode, before any tile is written."""
    from cdmap.labels import distinct_values, label_problem

    if src.lab is None:
        return
    values: set[float] = set()
    for w in _windows(src.lab.height, src.lab.width, 1024):
        values |= distinct_values(src.lab.read(1, window=w), nodata=_label_nodata(src.lab))
    why = label_problem(values, src.label_values)
    if why:
        raise InputError(why, labels)


def _label_nodata(lab: Any) -> float | None:
    """A label raster's nodata value, unless it is 0 (0 is "no change", whatever the file says)."""
    nd = lab.nodata
    return None if nd is None or nd == 0 or (isinstance(nd, float) and np.isnan(nd)) else nd


def _valid_windows(src: _Sources, tile_size: int, before: str) -> tuple[list[Any], int]:
    """The grid windows where both dates hold a valid pixel, and how many were skipped."""
    windows = []
    skipped = 0
    for w in _windows(src.a.height, src.a.width, tile_size):
        if _all_nodata(src.a, w) or _all_nodata(src.b, w):
            skipped += 1
        else:
            windows.append(w)
    if not windows:
        raise InputError("every tile is nodata in one of the dates; nothing to write", before)
    return windows, skipped


def _assign(n: int, fractions: tuple[float, float, float], seed: int) -> dict[int, str]:
    """Window index -> split name: shuffled with ``seed``, dealt by :func:`split_counts`."""
    order = np.random.default_rng(seed).permutation(n)
    assignment: dict[int, str] = {}
    start = 0
    for name, count in zip(SPLITS, split_counts(n, fractions), strict=True):
        for i in order[start : start + count]:
            assignment[int(i)] = name
        start += count
    return assignment


def _label_tile(src: _Sources, window: Any, transform: Any, shape: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """The 0/255 label of a window (:data:`LABEL_IGNORE` where a label raster is nodata) and whether any is."""
    from cdmap.vector.labels import rasterize_polygons

    if src.gdf is not None:
        return rasterize_polygons(src.gdf, transform, shape, value=255), False
    from cdmap.labels import IGNORE_INDEX, decode_labels

    decoded = decode_labels(src.lab.read(1, window=window), src.label_values, nodata=_label_nodata(src.lab))
    label = np.where(decoded == 1, 255, 0).astype(np.uint8)
    bad = decoded == IGNORE_INDEX
    if bad.any():
        label[bad] = LABEL_IGNORE
        return label, True
    return label, False


def _write_tiles(src: _Sources, windows: list[Any], assignment: dict[int, str], out_dir: Path, stem: str,
                 fmt: str) -> tuple[dict[str, list[str]], bool]:
    """Write the A, B and label tiles of every window; the names per split and whether LABEL_IGNORE was used."""
    names: dict[str, list[str]] = {s: [] for s in SPLITS}
    used_ignore = False
    img_profile = {"driver": "GTiff" if fmt == "tif" else "PNG", "count": src.a.count, "dtype": src.a.dtypes[0],
                   "nodata": src.a.nodata, "crs": src.a.crs}
    if fmt == "tif":
        img_profile.update(compress="deflate")
    from cdmap import process

    for i, w in enumerate(windows):
        process.fault_point("tile")
        split_name = assignment[i]
        name = f"{stem}_{int(w.row_off):05d}_{int(w.col_off):05d}"
        transform = src.a.window_transform(w)
        shape = (int(w.height), int(w.width))
        label, ignored = _label_tile(src, w, transform, shape)
        used_ignore |= ignored
        for sub, ds in (("A", src.a), ("B", src.b)):
            prof = dict(img_profile, width=shape[1], height=shape[0], transform=transform)
            _write(out_dir / split_name / sub / f"{name}.{fmt}", ds.read(window=w), prof)
        lprof = dict(img_profile, count=1, dtype="uint8", nodata=None, width=shape[1], height=shape[0],
                     transform=transform)
        _write(out_dir / split_name / "label" / f"{name}.{fmt}", label[None], lprof)
        names[split_name].append(name)
    return names, used_ignore


def _check_out(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output folder that holds a tile set (unless ``overwrite``) or cannot be one; touches nothing."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError("exists and is not a folder", out_dir)
    existing = [out_dir / s for s in SPLITS if (out_dir / s).exists()]
    if existing and not overwrite:
        raise OutputError(f"already holds {', '.join(p.name + '/' for p in existing)}; pass --overwrite to "
                          "replace them", out_dir)


@contextlib.contextmanager
def _building(out_dir: Path) -> Iterator[Path]:
    """A temporary folder inside ``out_dir`` with the empty split folders; removed on any error or signal."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=".cdmap-tiles-", dir=out_dir))
        for s in SPLITS:
            for sub in ("A", "B", "label"):
                (build / s / sub).mkdir(parents=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder: {exc.strerror or exc}", out_dir) from exc
    try:
        yield build
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _swap_in(build: Path, out_dir: Path) -> None:
    """Replace the old tile set by the new one, signals held: old tiles.json out first, the new one in last."""
    from cdmap import process

    with process.signals_blocked():
        (out_dir / "tiles.json").unlink(missing_ok=True)
        for s in SPLITS:
            old = out_dir / s
            if old.exists():
                trash = build / f"old-{s}"
                os.replace(old, trash)  # a rename, so the folder is never half-deleted under its name
            os.replace(build / s, old)
            process.fault_point("tiles-swap")
        os.replace(build / "tiles.json", out_dir / "tiles.json")


def _write(path: Path, data: np.ndarray, profile: dict[str, Any]) -> None:
    import rasterio

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(data)
    except (OSError, rasterio.errors.RasterioError) as exc:
        raise OutputError(f"cannot write tile: {exc}", path) from exc
