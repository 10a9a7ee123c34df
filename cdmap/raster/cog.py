"""Cloud Optimized GeoTIFF: conversion with GDAL's COG driver and a structural validator.

:func:`to_cog` copies a finished tiled GeoTIFF with ``driver="COG"`` (GDAL's CreateCopy, which streams; a
COG dataset is never opened for writing, that would hold the raster in memory).

:func:`validate_cog` re-implements, in its own code, the checks of GDAL's
``validate_cloud_optimized_geotiff.py`` by reading the TIFF/BigTIFF header and IFDs with :mod:`struct`:

* the main image is tiled (required when it is larger than 512 pixels in either direction);
* overviews exist when the image is larger than 512 pixels in either direction, and are tiled;
* the main IFD comes first (offset < 300, i.e. right after the header and GDAL's ghost area) and every
  following IFD lies after the previous one;
* every IFD lies before the first byte of image data (all metadata at the start of the file);
* image data is ordered smallest overview first and full resolution last.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from cdmap.errors import InputError, OutputError, UsageError
from cdmap.raster.gdal_errors import GDAL_ERRORS, capture_option_warnings, gdal_message, option_error

__all__ = ["to_cog", "validate_cog", "cog_creation_options"]

_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
               16: 8, 17: 8, 18: 8}
_TYPE_FMT = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}
_WANTED = {254, 256, 257, 273, 279, 322, 323, 324, 325}
_PREDICTOR_NAMES = {"1": "NO", "2": "STANDARD", "3": "FLOATING_POINT"}
_GTIFF_ONLY = {"TILED", "BLOCKXSIZE", "BLOCKYSIZE", "PHOTOMETRIC", "PROFILE", "COPY_SRC_OVERVIEWS"}


def cog_creation_options(src: Any, user: dict[str, str] | None) -> dict[str, str]:
    """COG driver options: keep ``src``'s compression and predictor, 512 blocks, existing overviews.

    The user's GTiff-style options are translated: ``BLOCKXSIZE`` -> ``BLOCKSIZE``, ``PREDICTOR=1/2/3`` ->
    ``NO/STANDARD/FLOATING_POINT``, and ``TILED``/``BLOCKYSIZE``/``PHOTOMETRIC``/``PROFILE`` are dropped.
    """
    struct_md = src.tags(ns="IMAGE_STRUCTURE")
    compress = struct_md.get("COMPRESSION", "DEFLATE").upper()
    if compress in ("NONE", ""):
        compress = "NONE"
    opts = {"COMPRESS": compress, "BLOCKSIZE": "512", "BIGTIFF": "IF_SAFER", "NUM_THREADS": "ALL_CPUS",
            "OVERVIEWS": "AUTO"}
    if compress in ("DEFLATE", "LZW", "ZSTD"):
        opts["PREDICTOR"] = _PREDICTOR_NAMES.get(struct_md.get("PREDICTOR", ""), "YES")
    resampling = src.tags(ns="rio_overview").get("resampling")
    if resampling:
        opts["RESAMPLING"] = resampling.upper()
    for key, value in (user or {}).items():
        k, v = str(key).upper(), str(value)
        if k == "BLOCKXSIZE":
            opts["BLOCKSIZE"] = v
        elif k == "PREDICTOR":
            opts["PREDICTOR"] = _PREDICTOR_NAMES.get(v, v)
        elif k not in _GTIFF_ONLY:
            opts[k] = v
    if opts.get("COMPRESS") not in ("DEFLATE", "LZW", "ZSTD") and not any(
            str(k).upper() == "PREDICTOR" for k in (user or {})):
        opts.pop("PREDICTOR", None)
    return opts


def to_cog(src_path: str | os.PathLike, dst_path: str | os.PathLike, *,
           creation_options: dict[str, str] | None = None) -> None:
    """Copy the tiled GeoTIFF ``src_path`` to a Cloud Optimized GeoTIFF ``dst_path``.

    Compression, predictor, 512-pixel blocks and the source's internal overviews are kept (see
    :func:`cog_creation_options`). A rejected option raises :class:`UsageError`, a write failure
    :class:`OutputError` naming ``dst_path``.
    """
    import rasterio
    import rasterio.shutil

    dst = Path(dst_path)
    try:
        with rasterio.open(src_path) as src:
            opts = cog_creation_options(src, creation_options)
    except GDAL_ERRORS as exc:
        raise InputError(f"cannot open raster to convert to COG: {gdal_message(exc)}", src_path) from exc
    try:
        with capture_option_warnings() as complaints:
            rasterio.shutil.copy(src_path, dst, driver="COG", **opts)
    except GDAL_ERRORS as exc:
        if option_error(exc, opts):
            raise UsageError(f"bad COG creation option: {gdal_message(exc)}", dst) from exc
        raise OutputError(f"cannot write COG: {gdal_message(exc)}", dst) from exc
    if complaints:
        try:
            dst.unlink()
        except OSError:
            pass
        raise UsageError(f"bad COG creation option: {complaints[0]}", dst)


# ---------------------------------------------------------------------------------------- TIFF parsing


class _Ifd:
    def __init__(self, offset: int, tags: dict[int, list[int]]) -> None:
        self.offset = offset
        self.tags = tags

    def get(self, tag: int, default: int = 0) -> int:
        v = self.tags.get(tag)
        return v[0] if v else default

    @property
    def width(self) -> int:
        return self.get(256)

    @property
    def height(self) -> int:
        return self.get(257)

    @property
    def tiled(self) -> bool:
        return 322 in self.tags

    @property
    def is_mask(self) -> bool:
        return bool(self.get(254) & 4)

    @property
    def data_offsets(self) -> list[int]:
        return self.tags.get(324) or self.tags.get(273) or []

    @property
    def first_data_offset(self) -> int | None:
        nonzero = [o for o in self.data_offsets if o]
        return nonzero[0] if nonzero else None

    @property
    def min_data_offset(self) -> int | None:
        nonzero = [o for o in self.data_offsets if o]
        return min(nonzero) if nonzero else None


def _read_ifds(f: Any) -> list[_Ifd]:
    """Parse the IFD chain of a TIFF or BigTIFF; raises ValueError when it is not one."""
    head = f.read(16)
    if len(head) < 8 or head[:2] not in (b"II", b"MM"):
        raise ValueError("not a TIFF file")
    bo = "<" if head[:2] == b"II" else ">"
    (magic,) = struct.unpack(bo + "H", head[2:4])
    if magic == 42:
        big, (offset,) = False, struct.unpack(bo + "I", head[4:8])
    elif magic == 43:
        big, (offset,) = True, struct.unpack(bo + "Q", head[8:16])
    else:
        raise ValueError("not a TIFF file")
    f.seek(0, os.SEEK_END)
    size = f.tell()
    count_fmt, entry_len, next_fmt, inline = ("Q", 20, "Q", 8) if big else ("H", 12, "I", 4)
    ifds: list[_Ifd] = []
    seen: set[int] = set()
    while offset and offset not in seen:
        if offset >= size:
            raise ValueError(f"IFD offset {offset} beyond the end of the file ({size} bytes)")
        seen.add(offset)
        f.seek(offset)
        n_bytes = struct.calcsize(count_fmt)
        (n,) = struct.unpack(bo + count_fmt, f.read(n_bytes))
        raw = f.read(n * entry_len + struct.calcsize(next_fmt))
        if len(raw) < n * entry_len + struct.calcsize(next_fmt):
            raise ValueError("truncated IFD")
        tags: dict[int, list[int]] = {}
        for i in range(n):
            e = raw[i * entry_len:(i + 1) * entry_len]
            if big:
                tag, typ, cnt = struct.unpack(bo + "HHQ", e[:12])
                val = e[12:20]
            else:
                tag, typ, cnt = struct.unpack(bo + "HHI", e[:8])
                val = e[8:12]
            if tag not in _WANTED or typ not in _TYPE_FMT:
                continue
            nbytes = _TYPE_SIZES[typ] * cnt
            if nbytes <= inline:
                data = val[:nbytes]
            else:
                (ptr,) = struct.unpack(bo + ("Q" if big else "I"), val)
                pos = f.tell()
                f.seek(ptr)
                data = f.read(nbytes)
                f.seek(pos)
                if len(data) < nbytes:
                    raise ValueError(f"tag {tag} points beyond the end of the file")
            tags[tag] = list(struct.unpack(f"{bo}{cnt}{_TYPE_FMT[typ]}", data))
        ifds.append(_Ifd(offset, tags))
        (offset,) = struct.unpack(bo + next_fmt, raw[n * entry_len:])
    if not ifds:
        raise ValueError("TIFF without any image directory")
    return ifds


def validate_cog(path: str | os.PathLike) -> list[str]:
    """Problems that keep ``path`` from being a Cloud Optimized GeoTIFF; an empty list means valid."""
    p = Path(path)
    if not p.is_file():
        raise InputError("file not found", path)
    try:
        with open(p, "rb") as f:
            ifds = _read_ifds(f)
    except ValueError as exc:
        return [f"{exc}"]
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path) from exc

    problems: list[str] = []
    main = ifds[0]
    images = [d for d in ifds if not d.is_mask]
    overviews = images[1:]
    big = main.width > 512 or main.height > 512
    if not main.tiled and big:
        problems.append(f"the main image ({main.width}x{main.height}) is not tiled")
    if big and not overviews:
        problems.append(f"the main image is larger than 512x512 ({main.width}x{main.height}) "
                        f"but has no overviews")
    for i, ovr in enumerate(overviews):
        if not ovr.tiled and (ovr.width > 512 or ovr.height > 512):
            problems.append(f"overview {i} ({ovr.width}x{ovr.height}) is not tiled")
    if main.offset > 300:
        problems.append(f"the main IFD is at offset {main.offset}; it should be < 300 (first in the file)")
    for i in range(1, len(ifds)):
        if ifds[i].offset < ifds[i - 1].offset:
            problems.append(f"IFD {i} is at offset {ifds[i].offset}, before IFD {i - 1} "
                            f"(at {ifds[i - 1].offset}); IFDs must follow each other")
    data_starts = [d.min_data_offset for d in ifds if d.min_data_offset is not None]
    if data_starts:
        first_data = min(data_starts)
        late = [i for i, d in enumerate(ifds) if d.offset > first_data]
        if late:
            problems.append(f"IFD {late[0]} (offset {ifds[late[0]].offset}) comes after image data (first "
                            f"at offset {first_data}); all IFDs must be at the start of the file")
    firsts = [d.first_data_offset for d in images]
    for i in range(len(images) - 1):
        hi, lo = firsts[i], firsts[i + 1]
        if hi is not None and lo is not None and hi < lo:
            what = "the full-resolution image" if i == 0 else f"overview {i - 1}"
            problems.append(f"data of {what} (offset {hi}) comes before data of overview {i} (offset {lo}); "
                            f"smaller overviews must come first")
    return problems
