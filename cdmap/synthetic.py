"""Synthetic bi-temporal imagery with known change, for the demo and for tests.

The scenes are not real imagery: a smooth textured 'terrain', roads, and rectangular 'buildings'
that appear (or vanish) between the dates, with a global radiometric shift and sensor noise between
dates so that a model must tell structural change from illumination change.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    """Value noise: a coarse random grid, bilinearly upsampled (no external dependency)."""
    gh, gw = h // scale + 2, w // scale + 2
    grid = rng.random((gh, gw))
    ys = np.arange(h) / scale
    xs = np.arange(w) / scale
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = grid[y0][:, x0]
    b = grid[y0][:, x0 + 1]
    c = grid[y0 + 1][:, x0]
    d = grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def synthetic_change_pair(height: int, width: int, *, seed: int = 0, bands: int = 3,
                          density: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (before, after, label): uint8 (bands, H, W) images and a uint8 (H, W) 0/1 change label."""
    rng = np.random.default_rng(seed)
    terrain = 0.6 * _smooth_noise(rng, height, width, 48) + 0.4 * _smooth_noise(rng, height, width, 9)
    tint = rng.uniform(0.7, 1.1, size=(bands, 1, 1))
    base = 60 + 90 * terrain[None] * tint  # vegetation/soil-like background
    before = base.copy()
    # roads present on both dates
    for _ in range(max(1, int(density * height * width / 60000))):
        if rng.random() < 0.5:
            r = rng.integers(0, height)
            before[:, max(0, r - 2) : r + 3, :] = 150
        else:
            c = rng.integers(0, width)
            before[:, :, max(0, c - 2) : c + 3] = 150
    after = before.copy()
    label = np.zeros((height, width), dtype=np.uint8)
    n_old = int(density * height * width / 9000)
    n_new = int(density * height * width / 4000)
    for i in range(n_old + n_new):
        h, w = rng.integers(8, 28, size=2)
        if height <= h or width <= w:
            continue
        r, c = rng.integers(0, height - h), rng.integers(0, width - w)
        roof = rng.uniform(160, 240, size=(bands, 1, 1))
        if i < n_old:  # existing buildings on both dates
            before[:, r : r + h, c : c + w] = roof
            after[:, r : r + h, c : c + w] = roof
        else:  # new buildings: change
            after[:, r : r + h, c : c + w] = roof
            after[:, r + h : min(height, r + h + 2), c : c + w] *= 0.6  # shadow
            label[r : r + h, c : c + w] = 1
    # radiometric difference between dates (season/illumination) and sensor noise: not change
    gain = rng.uniform(0.85, 1.15, size=(bands, 1, 1))
    after = after * gain + rng.uniform(-12, 12)
    before = before + rng.normal(0, 4, size=before.shape)
    after = after + rng.normal(0, 4, size=after.shape)
    to_u8 = lambda x: np.clip(np.rint(x), 0, 255).astype(np.uint8)  # noqa: E731
    return to_u8(before), to_u8(after), label


def write_tile_set(root: str | Path, *, n_train: int = 48, n_val: int = 12, n_test: int = 12, size: int = 128,
                   seed: int = 0) -> Path:
    """A LEVIR-CD style ``root/{train,val,test}/{A,B,label}/*.png`` set of synthetic tiles."""
    import rasterio

    root = Path(root)
    k = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for sub in ("A", "B", "label"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a, b, lab = synthetic_change_pair(size, size, seed=seed * 100003 + k)
            k += 1
            name = f"{split}_{i:04d}.png"
            for sub, arr in (("A", a), ("B", b), ("label", lab[None] * 255)):
                with warnings.catch_warnings():  # PNG tiles have no georeferencing by design (LEVIR-CD layout)
                    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                    with rasterio.open(root / split / sub / name, "w", driver="PNG", width=size, height=size,
                                       count=arr.shape[0], dtype="uint8") as dst:
                        dst.write(arr)
    return root


def write_scene_pair(root: str | Path, *, height: int = 1024, width: int = 1280, seed: int = 7,
                     crs: str = "EPSG:32633", pixel_size: float = 0.5) -> tuple[Path, Path, Path]:
    """A georeferenced before/after GeoTIFF pair and its truth label raster; returns the three paths."""
    import rasterio
    from rasterio.transform import from_origin

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    a, b, lab = synthetic_change_pair(height, width, seed=seed)
    transform = from_origin(500000.0, 4100000.0, pixel_size, pixel_size)
    prof = dict(driver="GTiff", width=width, height=height, crs=crs, transform=transform, tiled=True,
                blockxsize=256, blockysize=256, compress="deflate")
    paths = (root / "before.tif", root / "after.tif", root / "truth.tif")
    for path, arr in zip(paths, (a, b, lab[None]), strict=True):
        with rasterio.open(path, "w", count=arr.shape[0], dtype="uint8", **prof) as dst:
            dst.write(arr)
    return paths
