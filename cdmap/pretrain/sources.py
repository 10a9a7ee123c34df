"""Unlabelled images for pretraining: discovery, normalisation statistics and random valid windows.

Each DATA argument is an image file (any GDAL raster: GeoTIFF, PNG, JPEG, BMP, ENVI ...), or a folder searched
recursively for images (``.tif .tiff .png .jpg .jpeg .bmp``, any case). In a labelled change-detection set
(LEVIR layout, :func:`cdmap.data.layout_of`) the ``A`` and ``B`` images are used, each as a separate image, and
the labels are not; folders named like label folders (``label``, ``labels``, ``gt``, ``cm``, ``mask``, ``masks``)
are skipped anywhere. Data bands and validity are those of the rest of cdmap (:func:`cdmap.data.read_dataset`:
alpha is a mask, nodata/masks/non-finite values are invalid).

Scenes are never read whole: a training sample is a random ``window x window`` read, redrawn until at least
``min_valid`` of it is valid (falling back to a window the statistics pass found valid).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cdmap.data import IMAGE_SUFFIXES, SUBDIRS, no_georef_warning, read_dataset
from cdmap.errors import IncompatibleInputsError, InputError
from cdmap.raster.valid import data_bands

log = logging.getLogger("cdmap")

SUFFIXES = (*IMAGE_SUFFIXES, ".bmp")
LABEL_DIRS = frozenset({"label", "labels", "gt", "cm", "mask", "masks"})


@dataclass
class ImageSource:
    """One unlabelled image: its path, size, data band count and window origins known to be valid."""

    path: str
    height: int
    width: int
    bands: int
    valid_origins: list[tuple[int, int]] = field(default_factory=list)

    def windows(self, size: int) -> int:
        """How many non-overlapping ``size`` windows the image holds (at least 1): its weight in an epoch."""
        return max(1, (self.height // size) * (self.width // size))


# ----- discovery ---------------------------------------------------------------------------------------------
def _walk(folder: Path) -> list[Path]:
    from cdmap.data import layout_of

    try:
        layout = layout_of(folder)
    except InputError:
        layout = None
    if layout is not None:  # a labelled set: its A and B images, both dates
        roots = [folder / s / d for s in ("train", "val", "test") for d in SUBDIRS[:2]] if layout == "split" \
            else [folder / d for d in SUBDIRS[:2]]
        return [p for r in roots if r.is_dir() for p in _walk(r)]
    out: list[Path] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if p.name.lower() not in LABEL_DIRS:
                out += _walk(p)
        elif p.suffix.lower() in SUFFIXES:
            out.append(p)
    return out


def find_images(data: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``data`` (files and folders, see the module doc), in order, without repeats."""
    if not data:
        raise InputError("no DATA given (image files or folders)")
    found: list[Path] = []
    for item in data:
        path = Path(item)
        if path.is_dir():
            images = _walk(path)
            if not images:
                raise InputError(f"no images found (looked for {' '.join(SUFFIXES)} files, labels excluded)", path)
            found += images
        elif path.is_file():
            found.append(path)
        else:
            raise InputError("not found", path)
    seen: set[Path] = set()
    return [p for p in found if not (p.resolve() in seen or seen.add(p.resolve()))]


def open_sources(paths: Sequence[Path], crop: int) -> list[ImageSource]:
    """Open every image once for its size and data bands; refuse images smaller than one crop, mixed bands."""
    import rasterio

    sources, small, bad = [], [], []
    with no_georef_warning():
        for path in paths:
            try:
                with rasterio.open(path) as src:
                    bands = len(data_bands(src)[0])
                    sources.append(ImageSource(str(path), src.height, src.width, bands))
            except rasterio.errors.RasterioError as exc:
                bad.append(f"{path}: unreadable ({' '.join(str(exc).split())[:100]})")
                continue
            if min(src.height, src.width) < crop:
                small.append(f"{path} ({src.width}x{src.height})")
    if bad:
        raise InputError(f"{len(bad)} unreadable image(s), e.g. {bad[0]}")
    if small:
        raise InputError(f"{len(small)} image(s) smaller than one {crop} px crop: {', '.join(small[:3])}"
                         + (" ..." if len(small) > 3 else "") + "; use a smaller --crop-size or leave them out")
    counts = sorted({s.bands for s in sources})
    if len(counts) > 1:
        odd = [f"{s.path} ({s.bands})" for s in sources if s.bands != sources[0].bands][:3]
        raise IncompatibleInputsError(f"images have different band counts {counts}: {sources[0].path} has "
                                      f"{sources[0].bands}, but {', '.join(odd)}")
    return sources


# ----- windows -----------------------------------------------------------------------------------------------
def read_window(src: Any, top: int, left: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Data ``(C, h, w)`` float32 and validity ``(h, w)`` of a window of an open dataset (clipped to it)."""
    from rasterio.windows import Window

    h, w = min(size, src.height - top), min(size, src.width - left)
    return read_dataset(src, Window(left, top, w, h))


def random_origin(gen: np.random.Generator, source: ImageSource, size: int) -> tuple[int, int]:
    return (int(gen.integers(0, max(source.height - size, 0) + 1)),
            int(gen.integers(0, max(source.width - size, 0) + 1)))


def measure(sources: list[ImageSource], window: int, n_windows: int, min_valid: float,
            seed: int) -> tuple[list[float], list[float]]:
    """Per-band mean/std over the valid pixels of ``n_windows`` random windows (spread over the images by area,
    at least one per image); records the valid window origins in each source. Drops images where no sampled
    window holds a valid pixel (logged); raises :class:`InputError` when that leaves none."""
    import rasterio

    gen = np.random.default_rng([seed, 7])
    weights = np.array([s.windows(window) for s in sources], dtype=np.float64)
    per_image = np.maximum(1, np.round(n_windows * weights / weights.sum())).astype(int)
    total = np.zeros(3 * sources[0].bands).reshape(3, -1)  # count, sum, sum of squares per band
    empty = []
    with no_georef_warning():
        for source, k in zip(sources, per_image, strict=True):
            any_valid = False
            with rasterio.open(source.path) as src:
                for _ in range(int(k)):
                    top, left = random_origin(gen, source, window)
                    data, valid = read_window(src, top, left, window)
                    if not valid.any():
                        continue
                    any_valid = True
                    v = data[:, valid].astype(np.float64)
                    total += [np.full(v.shape[0], v.shape[1]), v.sum(1), np.square(v).sum(1)]
                    if valid.mean() >= min_valid:
                        source.valid_origins.append((top, left))
            if not any_valid:
                empty.append(source)
    for source in empty:
        log.warning("%s: no valid pixel in %d sampled windows (all nodata?); left out", source.path,
                    per_image[sources.index(source)])
    kept = [s for s in sources if s not in empty]
    if not kept:
        raise InputError(f"all {len(sources)} input image(s) are nodata (no valid pixel in any sampled window)")
    sources[:] = kept
    n, s1, s2 = total
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    std = np.where(std > 1e-6 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return [float(m) for m in mean], [float(s) for s in std]


class WindowSampler:
    """Random valid windows: sample ``index`` of an epoch belongs to an image chosen by area (a fixed table), and
    the window position comes from the caller's generator. Files are opened lazily, once per worker process."""

    def __init__(self, sources: Sequence[ImageSource], window: int, min_valid: float, tries: int) -> None:
        self.sources = list(sources)
        self.window, self.min_valid, self.tries = window, min_valid, tries
        self._cum = np.cumsum([s.windows(window) for s in self.sources]).tolist()
        self._open: dict[int, Any] = {}

    @property
    def natural_length(self) -> int:
        """The inputs' area in windows."""
        return int(self._cum[-1])

    def image_of(self, index: int) -> int:
        return bisect.bisect_right(self._cum, index % self._cum[-1])

    def _dataset(self, i: int) -> Any:
        if i not in self._open:
            import rasterio

            self._open[i] = rasterio.open(self.sources[i].path)
        return self._open[i]

    def sample(self, index: int, gen: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """``(data, valid, (top, left))`` of a valid window of image ``image_of(index)``."""
        i = self.image_of(index)
        best: tuple[float, np.ndarray, np.ndarray, tuple[int, int]] | None = None
        with no_georef_warning():
            source, src = self.sources[i], self._dataset(i)
            for _ in range(self.tries):
                origin = random_origin(gen, source, self.window)
                data, valid = read_window(src, *origin, self.window)
                frac = float(valid.mean())
                if frac >= self.min_valid:
                    return data, valid, origin
                if best is None or frac > best[0]:
                    best = (frac, data, valid, origin)
            if source.valid_origins:
                origin = source.valid_origins[int(gen.integers(len(source.valid_origins)))]
                data, valid = read_window(src, *origin, self.window)
                return data, valid, origin
        assert best is not None
        return best[1], best[2], best[3]

    def __getstate__(self) -> dict[str, Any]:  # open datasets do not travel to worker processes
        return {**self.__dict__, "_open": {}}
