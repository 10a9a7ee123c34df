"""Reading the raster to vectorise: what is change, and which probabilities go with it.

Validity is the project's one rule, :func:`cdmap.raster.valid.read_valid` (GDAL mask flags, non-finite
values invalid); nodata pixels are never change. It is imported when a raster is opened, so that importing
:mod:`cdmap.vector` does not load rasterio.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from cdmap.errors import InputError


class Source:
    """An open single-band raster and how to turn a window of it into values and validity."""

    def __init__(self, path: str | Path, role: str) -> None:
        import rasterio
        from rasterio.errors import RasterioIOError

        from cdmap.raster.identity import is_local
        from cdmap.raster.valid import mask_kinds

        if is_local(path) and not Path(path).exists():
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
        self.kinds = mask_kinds(self.ds, [1])
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
        """Values (float32, 0 where not finite) and validity (:func:`read_valid`) of band 1 in ``window``."""
        from rasterio.errors import RasterioIOError

        from cdmap.raster.valid import read_valid

        try:
            data, valid = read_valid(self.ds, [1], window, self.kinds)
        except (RasterioIOError, OSError) as exc:
            raise InputError(f"read failed at {window} ({exc})", path=self.path) from None
        return data[0], valid

    def probability(self, data: np.ndarray) -> np.ndarray:
        """``value * scale + offset`` as float64."""
        prob = data.astype(np.float64)
        if self.has_scale:
            prob *= self.scale
            prob += self.offset
        return prob

    def value_text(self, value: Any) -> str:
        """A pixel value as the raster stores it (integers without the float32 read type)."""
        return repr(int(value)) if self.dtype.kind in "iub" else repr(float(value))


class Classifier:
    """Turns a window into change pixels and the probabilities (and their validity) at those pixels."""

    def __init__(self, src: Source, mode: str, threshold: float, probs: Source | None) -> None:
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
                    f"is not a 0/1 change mask: pixel value {src.value_text(value)} is neither 0, 1 nor the "
                    "declared nodata; for a probability raster (or a 0/255 mask) give --threshold",
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
        return change, np.zeros(n, dtype=np.float64), np.zeros(n, dtype=bool)
