"""The one validity rule: which pixels of a raster window hold data.

GDAL's mask flags decide per band: all valid, a nodata value, a per-dataset mask (an internal mask band
or an alpha band) or a per-band mask. A band's pixel is invalid when ANY source the file declares says so:
the mask (or alpha) band and, when the band also declares a nodata value, that value too (GDAL itself lets a
mask band hide the nodata value; cdmap does not). A pixel is valid where at least one selected band is valid
(nodata in *every* band means nodata) and no selected band holds a non-finite value. Predict, training, tiling and
vectorising all read through :func:`read_valid`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

MASK_KINDS = ("all_valid", "nodata", "per_dataset", "per_band")


def mask_kind(flags: Sequence[Any], alpha_is_data: bool = False, nodata: float | None = None) -> str:
    """How GDAL says a band's validity is known (one of :data:`MASK_KINDS`)."""
    from rasterio.enums import MaskFlags

    if MaskFlags.all_valid in flags:
        return "all_valid"
    if MaskFlags.alpha in flags and alpha_is_data:  # the "alpha" band is read as data: not a mask
        return "all_valid" if nodata is None else "nodata"
    if MaskFlags.per_dataset in flags:  # internal mask or alpha band
        return "per_dataset"
    if MaskFlags.nodata in flags:
        return "nodata"
    return "per_band"


def alpha_bands(dataset: Any) -> list[int]:
    """The bands (1-based) GDAL tags as alpha."""
    from rasterio.enums import ColorInterp

    return [i + 1 for i, ci in enumerate(dataset.colorinterp) if ci == ColorInterp.alpha]


def data_bands(dataset: Any, expected: int | None = None) -> tuple[list[int], bool]:
    """The default data bands (1-based) of an open raster and whether an alpha band among them is read as data.

    An alpha band is a validity mask, not data, unless the file has exactly ``expected`` bands (GDAL tags the
    4th band of any 4-band Byte GeoTIFF as alpha, and an RGB+NIR file for a 4-band model is far more likely
    than an RGBA one) or no other band.
    """
    every = list(range(1, dataset.count + 1))
    alpha = alpha_bands(dataset)
    data = [b for b in every if b not in alpha]
    if not alpha or expected == dataset.count or not data:
        return every, bool(alpha)
    return data, False


def mask_kinds(dataset: Any, bands: Sequence[int], alpha_is_data: bool = False) -> list[str]:
    """:func:`mask_kind` for each of ``bands`` (1-based) of an open rasterio dataset."""
    return [mask_kind(dataset.mask_flag_enums[b - 1], alpha_is_data, dataset.nodatavals[b - 1]) for b in bands]


def nodata_valid(band: np.ndarray, nodata: float | None) -> np.ndarray:
    """True where ``band`` is not equal to ``nodata`` (NaN nodata matches NaN)."""
    if nodata is None:
        return np.ones(band.shape, dtype=bool)
    if isinstance(nodata, float) and math.isnan(nodata):
        return ~np.isnan(band) if band.dtype.kind == "f" else np.ones(band.shape, dtype=bool)
    if band.dtype.kind in "iu":
        info = np.iinfo(band.dtype)
        if nodata != int(nodata) or not info.min <= nodata <= info.max:
            return np.ones(band.shape, dtype=bool)  # a nodata value this dtype cannot hold never matches
    return band != np.asarray(nodata).astype(band.dtype)


def read_valid(dataset: Any, bands: Sequence[int] | None = None, window: Any = None,
               kinds: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``bands`` (1-based; default all) of ``window`` as float32 ``(C, h, w)`` plus validity ``(h, w)``.

    Non-finite values are replaced by 0 and are invalid. ``kinds`` (from :func:`mask_kinds`) may be passed
    to skip looking the flags up again on every read.
    """
    bands = list(range(1, dataset.count + 1)) if bands is None else list(bands)
    if kinds is None:
        kinds = mask_kinds(dataset, bands)
    data = dataset.read(bands, window=window)
    h, w = data.shape[1:]
    per_dataset: np.ndarray | None = None
    valid: np.ndarray | None = None
    for i, (band, kind) in enumerate(zip(bands, kinds, strict=True)):
        if kind == "all_valid":
            band_valid = np.ones((h, w), dtype=bool)
        elif kind == "nodata":
            band_valid = nodata_valid(data[i], dataset.nodatavals[band - 1])
        elif kind == "per_dataset":
            if per_dataset is None:
                per_dataset = dataset.read_masks(band, window=window) > 0
            band_valid = per_dataset
        else:
            band_valid = dataset.read_masks(band, window=window) > 0
        if kind in ("per_dataset", "per_band"):  # a mask band AND a nodata value: both count
            band_valid = band_valid & nodata_valid(data[i], dataset.nodatavals[band - 1])
        valid = band_valid.copy() if valid is None else (valid | band_valid)
    assert valid is not None
    out = data.astype(np.float32, copy=data.dtype != np.float32)
    if data.dtype.kind == "f":  # integers (even int64/uint64) cannot become non-finite in float32
        finite = np.isfinite(out)
        if not finite.all():
            valid &= finite.all(axis=0)
            out[~finite] = 0.0
    return out, valid
