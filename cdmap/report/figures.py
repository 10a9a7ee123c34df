"""The report's pictures, drawn with matplotlib's object API (no pyplot: no global state, no display needed).

Every function returns PNG bytes; :func:`preview_png` reads the rasters at preview size, which GDAL serves from
their overviews.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CHANGE_RGBA = (0.90, 0.10, 0.18, 0.55)
OUTLINE = "#ffe600"
NODATA_RGBA = (0.5, 0.5, 0.5, 0.75)
#: error-map classes: value -> (name, RGB); the GeoTIFF error maps carry these as their colour table
ERROR_CLASSES = {0: ("TN", (0, 0, 0)), 1: ("TP", (255, 255, 255)), 2: ("FP", (255, 0, 0)), 3: ("FN", (0, 255, 0)),
                 4: ("ignored", (128, 128, 128))}
PANEL_PX = 320  # width of one preview panel (the preview is three panels wide)


@dataclass(frozen=True)
class Grid:
    """The output grid: CRS (rasterio, may be None), affine transform, width and height in pixels."""

    crs: Any
    transform: Any
    width: int
    height: int

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """(left, right, bottom, top) for matplotlib's ``imshow``."""
        t = self.transform
        x0, y0 = t.c, t.f
        x1, y1 = t.c + t.a * self.width, t.f + t.e * self.height
        return (min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1))


def _figure(width_in: float, height_in: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def preview_shape(width: int, height: int, panel_px: int = PANEL_PX) -> tuple[int, int]:
    """(rows, cols) of a panel: at most ``panel_px`` wide and 1.25 x ``panel_px`` high, never enlarged."""
    f = max(width / panel_px, height / (1.25 * panel_px), 1.0)
    return max(1, round(height / f)), max(1, round(width / f))


def read_scaled(path: str | os.PathLike, grid: Grid, shape: tuple[int, int], bands: Sequence[int],
                resampling: str = "average") -> np.ma.MaskedArray:
    """``bands`` of ``path`` on ``grid`` at ``shape`` (rows, cols): a decimated read (overviews) when the file
    is on the grid's pixel lattice, else warped onto it."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import Affine
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import Window

    rows, cols = shape
    method = Resampling[resampling]
    with rasterio.open(path) as src:
        same_lattice = (grid.crs is None or src.crs is None or src.crs == grid.crs) and np.allclose(
            (src.transform.a, src.transform.e), (grid.transform.a, grid.transform.e), rtol=1e-9)
        if same_lattice:
            # the grid's corner in the file's pixels (not from_bounds: a pixel-grid raster without CRS has its
            # y axis pointing down, which bounds cannot express)
            col0, row0 = ~src.transform * (grid.transform.c, grid.transform.f)
            win = Window(col0, row0, grid.width * grid.transform.a / src.transform.a,
                         grid.height * grid.transform.e / src.transform.e).round_offsets().round_lengths()
            return src.read(list(bands), window=win, out_shape=(len(bands), rows, cols), resampling=method,
                            masked=True, boundless=True)
        t = grid.transform * Affine.scale(grid.width / cols, grid.height / rows)
        with WarpedVRT(src, crs=grid.crs, transform=t, width=cols, height=rows, resampling=method) as vrt:
            return vrt.read(list(bands), masked=True)


def _stretch(arr: np.ma.MaskedArray, lo_hi: list[tuple[float, float]]) -> np.ndarray:
    """Bands-first masked array -> (rows, cols, 3) float RGB in 0..1 with per-band (low, high) limits."""
    out = np.empty(arr.shape[1:] + (3,), dtype=np.float32)
    for i in range(3):
        b = arr[min(i, arr.shape[0] - 1)].astype(np.float64)
        lo, hi = lo_hi[min(i, len(lo_hi) - 1)]
        out[..., i] = np.clip((np.ma.filled(b, lo) - lo) / max(hi - lo, 1e-12), 0, 1)
    return out


def _limits(arr: np.ma.MaskedArray) -> list[tuple[float, float]]:
    limits = []
    for b in arr:
        v = np.ma.compressed(b).astype(np.float64)
        v = v[np.isfinite(v)]
        limits.append((float(np.percentile(v, 2)), float(np.percentile(v, 98))) if v.size else (0.0, 1.0))
    return limits


def _metres_per_unit(grid: Grid) -> tuple[float, str]:
    """Ground metres per CRS unit across the scene (geographic: at its centre latitude), or (1, 'px')."""
    if grid.crs is None:
        return 1.0, "px"
    if grid.crs.is_geographic:
        left, right, bottom, top = grid.extent
        return 111_320.0 * math.cos(math.radians((bottom + top) / 2)), "m"
    try:
        return float(grid.crs.linear_units_factor[1]), "m"
    except Exception:  # noqa: BLE001 - a CRS without linear units: show CRS units
        return 1.0, "units"


def nice_length(span: float) -> float:
    """A 1, 2 or 5 x 10^k length close to a quarter of ``span`` (scale bars)."""
    target = max(span / 4.0, 1e-9)
    k = 10 ** math.floor(math.log10(target))
    return max((m * k for m in (1, 2, 5) if m * k <= target), default=k)


def _length_label(metres: float, unit: str) -> str:
    if unit != "m":
        return f"{metres:g} {unit}"
    return f"{metres / 1000:g} km" if metres >= 1000 else f"{metres:g} m"


def _scale_bar(ax: Any, grid: Grid) -> None:
    from matplotlib.patches import Rectangle

    left, right, bottom, top = grid.extent
    per_unit, unit = _metres_per_unit(grid)
    span_m = (right - left) * per_unit
    length_m = nice_length(span_m)
    length = length_m / per_unit
    x, y, h = left + 0.05 * (right - left), bottom + 0.05 * (top - bottom), 0.018 * (top - bottom)
    ax.add_patch(Rectangle((x - 0.01 * (right - left), y - h), length + 0.02 * (right - left), 5 * h,
                           facecolor="white", alpha=0.75, edgecolor="none"))
    ax.add_patch(Rectangle((x, y), length, h, facecolor="black", edgecolor="black"))
    ax.text(x + length / 2, y + 1.4 * h, _length_label(length_m, unit), ha="center", va="bottom", fontsize=8)


def _outlines(ax: Any, polygons: Any) -> None:
    """Exterior and hole rings of ``polygons`` (shapely array, in the grid's CRS) as thin lines."""
    import shapely
    from matplotlib.collections import LineCollection

    if polygons is None or len(polygons) == 0:
        return
    rings = shapely.get_rings(shapely.get_parts(np.asarray(polygons)))
    coords = [shapely.get_coordinates(r) for r in rings]
    ax.add_collection(LineCollection(coords, colors=OUTLINE, linewidths=0.6))


def preview_png(before: str | os.PathLike, after: str | os.PathLike, bands: dict[str, list[int]], grid: Grid,
                mask_path: str | os.PathLike, polygons: Any = None, titles: Sequence[str] = ()) -> bytes:
    """before | after | change overlay on after (polygons outlined), a scale bar and a legend, as PNG."""
    from matplotlib.patches import Patch

    shape = preview_shape(grid.width, grid.height)
    rgb_bands = {k: v[:3] for k, v in bands.items()}
    a = read_scaled(before, grid, shape, rgb_bands["before"])
    b = read_scaled(after, grid, shape, rgb_bands["after"])
    mask = read_scaled(mask_path, grid, shape, [1], resampling="nearest")[0].filled(255)
    limits = _limits(a)
    panel_h = 3.2 * shape[0] / shape[1]
    fig = _figure(9.9, panel_h + 0.9)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.3 / (panel_h + 0.9), bottom=0.55 / (panel_h + 0.9),
                        wspace=0.03)
    axes = fig.subplots(1, 3)
    names = list(titles) + ["before", "after", "change on after"][len(titles):]
    overlay = np.zeros(mask.shape + (4,), dtype=np.float32)
    overlay[mask == 1] = CHANGE_RGBA
    overlay[mask == 255] = NODATA_RGBA
    for ax, img, name in zip(axes, (a, b, b), names, strict=True):
        ax.imshow(_stretch(img, limits), extent=grid.extent, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[2].imshow(overlay, extent=grid.extent, interpolation="nearest")
    _outlines(axes[2], polygons)
    left, right, bottom, top = grid.extent
    for ax in axes:
        ax.set_xlim(left, right)
        ax.set_ylim(bottom, top)
    _scale_bar(axes[0], grid)
    handles = [Patch(facecolor=CHANGE_RGBA, label="change"), Patch(facecolor="none", edgecolor=OUTLINE,
               label="polygon outline"), Patch(facecolor=NODATA_RGBA, label="nodata")]
    factor = grid.width / shape[1]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False,
               title=f"preview at 1:{factor:.3g} of {grid.width} x {grid.height} px", title_fontsize=8)
    return _png(fig)


def histogram_png(counts: Sequence[int], threshold: float) -> bytes:
    """Bars of valid pixels per P(change) bin (log scale), with the threshold marked."""
    counts = np.asarray(counts, dtype=np.int64)
    edges = np.linspace(0, 1, len(counts) + 1)
    fig = _figure(6.0, 2.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(edges[:-1], np.maximum(counts, 0), width=1 / len(counts), align="edge", color="#51127c")
    if counts.any():
        ax.set_yscale("log")
    ax.axvline(threshold, color=CHANGE_RGBA[:3], linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("P(change)")
    ax.set_ylabel("pixels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def size_classes_png(classes: list[dict[str, Any]]) -> bytes:
    """Changed area (ha) per polygon size class, with the polygon count on each bar."""
    fig = _figure(6.0, 2.8)
    ax = fig.add_subplot(1, 1, 1)
    labels = [c["label"] for c in classes]
    ha = [c["area_m2"] / 1e4 for c in classes]
    bars = ax.bar(labels, ha, color=CHANGE_RGBA[:3])
    for bar, c in zip(bars, classes, strict=True):
        ax.annotate(f"{c['polygons']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.set_ylabel("changed area (ha)")
    ax.set_xlabel("polygon size (m², number of polygons on the bars)")
    fig.tight_layout()
    return _png(fig)


def training_png(history: Sequence[dict[str, float]]) -> bytes:
    """Training loss and validation F1 (at 0.5 and at the calibrated threshold) per epoch."""
    epochs = [r["epoch"] for r in history]
    fig = _figure(8.0, 3.0)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [r["train_loss"] for r in history], marker="o", ms=3, color="#51127c")
    ax1.set_title("training loss", fontsize=10)
    ax1.set_xlabel("epoch")
    ax2.plot(epochs, [r["val_f1"] for r in history], marker="o", ms=3, label="val F1 at 0.5", color="#b73779")
    ax2.plot(epochs, [r["val_f1_calibrated"] for r in history], marker="s", ms=3,
             label="val F1 at calibrated threshold", color="#fc8961")
    ax2.set_ylim(0, 1)
    ax2.set_title("validation F1", fontsize=10)
    ax2.set_xlabel("epoch")
    ax2.legend(fontsize=8, loc="lower right")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _png(fig)


def error_map_png(path: str | os.PathLike) -> bytes:
    """An error-map GeoTIFF (classes :data:`ERROR_CLASSES`) at preview size with its legend."""
    import rasterio
    from matplotlib.patches import Patch

    with rasterio.open(path) as src:
        grid = Grid(src.crs, src.transform, src.width, src.height)
    shape = preview_shape(grid.width, grid.height, panel_px=640)
    classes = read_scaled(path, grid, shape, [1], resampling="nearest")[0].filled(4)
    palette = np.array([ERROR_CLASSES[k][1] for k in sorted(ERROR_CLASSES)], dtype=np.float32) / 255.0
    rgb = palette[np.clip(classes, 0, len(palette) - 1)]
    ratio = shape[0] / shape[1]
    img_w = min(6.6, 5.4 / ratio)  # at most 660 px wide and 540 px high
    fig_w, fig_h = max(img_w + 0.2, 4.4), img_w * ratio + 0.6  # wide enough for the legend
    fig = _figure(fig_w, fig_h)
    ax = fig.add_axes(((fig_w - img_w) / 2 / fig_w, 0.5 / fig_h, img_w / fig_w, img_w * ratio / fig_h))
    ax.imshow(rgb, extent=grid.extent, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    _scale_bar(ax, grid)
    handles = [Patch(facecolor=np.array(c) / 255.0, edgecolor="#444", label=n) for n, c in ERROR_CLASSES.values()]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False, handlelength=1.2,
               columnspacing=1.0)
    return _png(fig)


def write_png(data: bytes, path: str | os.PathLike) -> Path:
    """Write PNG bytes to ``path`` (via a temporary name) and return the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
