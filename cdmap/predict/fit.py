"""Does the input fit the model? Checks made before and after a run; each finding is one warning line, logged
and listed in run.json ``warnings``. None of them stops a run: the user may know better.

- statistics: per band, the mean of a sample of valid pixels (both dates) against the checkpoint's
  normalisation; a mean more than :data:`MAX_Z` training standard deviations away, or a spread
  :data:`MAX_SPREAD` times wider or narrower, means another scale (uint16 Sentinel-2 into a uint8 model);
- pixel size: against the training range the checkpoint records (``provenance["gsd_m"]``), with a factor
  :data:`GSD_FACTOR` of slack either way;
- identical dates: the same file, or the same content (:func:`cdmap.raster.identity.same_content`);
- the result: more than :data:`MAX_CHANGED_SHARE` of the valid scene marked as change.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cdmap.checkpoint import Checkpoint
from cdmap.raster.identity import same_content

MAX_Z = 4.0
MAX_SPREAD = 5.0
GSD_FACTOR = 2.0
MAX_CHANGED_SHARE = 0.5
SAMPLE_WINDOWS = 4  # per axis
SAMPLE_SIZE = 128


def sample_band_stats(pair: Any) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    """Per date, (mean, std) per band over the valid pixels of a grid of small windows (None: none valid)."""
    from rasterio.windows import Window

    h, w = min(SAMPLE_SIZE, pair.height), min(SAMPLE_SIZE, pair.width)
    rows = sorted(set(np.linspace(0, pair.height - h, SAMPLE_WINDOWS).round().astype(int).tolist()))
    cols = sorted(set(np.linspace(0, pair.width - w, SAMPLE_WINDOWS).round().astype(int).tolist()))
    samples: dict[str, list[np.ndarray]] = {"before": [], "after": []}
    from cdmap.errors import InputError
    from cdmap.raster.gdal_errors import GDAL_ERRORS

    for r in rows:
        for c in cols:
            try:
                before, after, valid = pair.read(Window(c, r, w, h))
            except (InputError, *GDAL_ERRORS):  # a corrupt block: compute names the window when it gets there
                continue
            samples["before"].append(before[:, valid])
            samples["after"].append(after[:, valid])
    out: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
    for date, parts in samples.items():
        values = np.concatenate(parts, axis=1).astype(np.float64) if parts else np.zeros((pair.count, 0))
        out[date] = (values.mean(axis=1), values.std(axis=1)) if values.shape[1] else None
    return out


def statistics_warnings(stats: dict[str, tuple[np.ndarray, np.ndarray] | None], ckpt: Checkpoint) -> list[str]:
    """Bands whose sampled mean or spread is far from the checkpoint's normalisation."""
    out = []
    mean, std = np.asarray(ckpt.mean), np.asarray(ckpt.std)
    for date, ms in stats.items():
        if ms is None:
            continue
        m, s = ms
        z = np.abs(m - mean) / std
        spread = np.maximum(s, 1e-12) / std
        bad = np.flatnonzero((z > MAX_Z) | (spread > MAX_SPREAD) | (spread < 1 / MAX_SPREAD))
        if bad.size:
            b = int(bad[0])
            out.append(f"{date}: band {b + 1} has mean {m[b]:.4g} and spread {s[b]:.4g}, but the model was trained "
                       f"on mean {mean[b]:.4g} and spread {std[b]:.4g}"
                       + (f" ({bad.size} of {len(m)} bands differ so)" if bad.size > 1 else "")
                       + "; the input may be on another scale (e.g. uint16 into a uint8 model)")
    return out


def gsd_warning(pixel_m: float | None, ckpt: Checkpoint) -> str | None:
    """The scene's pixel size against the training range, when both are known."""
    rng = ckpt.provenance.get("gsd_m")
    if pixel_m is None or not rng:
        return None
    lo, hi = float(rng[0]), float(rng[1])
    if lo / GSD_FACTOR <= pixel_m <= hi * GSD_FACTOR:
        return None
    trained = f"{lo:.3g} m" if math.isclose(lo, hi) else f"{lo:.3g}-{hi:.3g} m"
    return f"pixel size {pixel_m:.3g} m is far from the training pixel size ({trained}); results may be meaningless"


def identical_dates_warning(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """BEFORE and AFTER are one file or hold the same content (identities of :func:`input_identity`)."""
    if before["path"] == after["path"]:
        return f"BEFORE and AFTER are the same file ({before['path']}): there is no change to find"
    if same_content(before, after):
        return "BEFORE and AFTER hold the same pixels (same size, grid and content sample): they are one scene"
    return None


def changed_share_warning(changed: int, valid: int) -> str | None:
    """More than half of the valid scene marked as change: the input most likely does not fit the model."""
    if valid and changed / valid > MAX_CHANGED_SHARE:
        return (f"{100 * changed / valid:.0f} % of the valid scene is marked as change; check that the input fits "
                f"the model (scale, pixel size, bands) and the threshold")
    return None


def scene_pixel_m(pair: Any) -> float | None:
    """The ground pixel size (m) at the scene's centre row, by the one area rule (None without CRS)."""
    from cdmap.vector.measure import pixel_area_m2_rows

    if pair.crs is None:
        return None
    mid = pair.height // 2
    return float(math.sqrt(pixel_area_m2_rows(pair.crs, pair.transform, mid, mid + 1, pair.width,
                                              height=pair.height)[0]))


def input_warnings(pair: Any, ckpt: Checkpoint, identities: tuple[dict[str, Any], dict[str, Any]]) -> list[str]:
    """Every pre-run finding (statistics, pixel size, identical dates), each logged as a warning."""
    import logging

    found = [*statistics_warnings(sample_band_stats(pair), ckpt),
             gsd_warning(scene_pixel_m(pair), ckpt), identical_dates_warning(*identities)]
    found = [w for w in found if w]
    for w in found:
        logging.getLogger("cdmap.predict").warning("%s", w)
    return found
