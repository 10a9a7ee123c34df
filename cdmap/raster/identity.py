"""What identifies an input raster, for any string GDAL opens: a local file, ``/vsizip/...``, ``/vsicurl/...``
or a plain ``http(s)://`` URL.

:func:`input_identity` is what a resume compares (the predict manifest) and what tells two dates apart: GDAL's
view of the raster (driver, size, bands, data types, grid, CRS) and a SHA-256 of a content sample (3 x 3 small
windows spread over the raster, every band, raw values), plus the byte size, modification time and sampled
content hash (:func:`cdmap.files.content_hash`) for a local file. It never calls ``stat`` on a path that is not
a local file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_GRID = 3
SAMPLE_SIZE = 64


def is_local(path: str | os.PathLike) -> bool:
    """True for a plain filesystem path (not a URL, not a GDAL ``/vsi...`` path)."""
    s = os.fspath(path)
    return "://" not in s and not s.startswith("/vsi")


def display_path(path: str | os.PathLike) -> str:
    """The absolute path of a local file; any other GDAL path as given."""
    s = os.fspath(path)
    return str(Path(s).resolve()) if is_local(s) else s


def content_sample_sha256(ds: Any) -> str:
    """SHA-256 of the raw values of every band in a 3 x 3 grid of small windows (the whole raster if small)."""
    from rasterio.windows import Window

    h = hashlib.sha256()
    size_r, size_c = min(SAMPLE_SIZE, ds.height), min(SAMPLE_SIZE, ds.width)
    rows = np.linspace(0, ds.height - size_r, SAMPLE_GRID).round().astype(int)
    cols = np.linspace(0, ds.width - size_c, SAMPLE_GRID).round().astype(int)
    from cdmap.raster.gdal_errors import GDAL_ERRORS

    for r in sorted(set(rows.tolist())):
        for c in sorted(set(cols.tolist())):
            try:
                h.update(np.ascontiguousarray(ds.read(window=Window(c, r, size_c, size_r))).tobytes())
            except GDAL_ERRORS:  # a corrupt block: predict names it when it reaches it
                h.update(f"unreadable {r} {c}".encode())
    return h.hexdigest()


def input_identity(path: str | os.PathLike, ds: Any = None) -> dict[str, Any]:
    """The identity of the raster at ``path`` (see the module doc); ``ds``: the raster already open there."""
    import rasterio

    s = os.fspath(path)
    if ds is None:
        with rasterio.open(s) as opened:
            return input_identity(s, opened)
    ident: dict[str, Any] = {
        "path": display_path(s),
        "driver": ds.driver,
        "size": [ds.width, ds.height, ds.count],
        "dtypes": list(ds.dtypes),
        "transform": [float(v) for v in tuple(ds.transform)[:6]],
        "crs": ds.crs.to_wkt() if ds.crs else None,
        "sample_sha256": content_sample_sha256(ds),
    }
    if is_local(s):
        from cdmap.files import content_hash

        st = Path(s).stat()
        ident["bytes"] = st.st_size
        ident["mtime_ns"] = st.st_mtime_ns
        ident["content"] = content_hash(s)  # the file's bytes: a same-size rewrite in place is noticed too
    return ident


def same_content(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two identities of the same raster content (same path, or same size, grid and content sample)."""
    if a["path"] == b["path"]:
        return True
    keys = ("size", "dtypes", "transform", "crs", "sample_sha256")
    return all(a[k] == b[k] for k in keys)
