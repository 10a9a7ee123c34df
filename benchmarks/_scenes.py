"""Benchmark scenes: mosaics of real LEVIR-CD tiles from ../shared/data, synthetic when absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LEVIR_FULL = REPO.parent / "shared" / "data" / "levircd_fulltile_ucdscm"


def _levir_tiles() -> list[tuple[np.ndarray, np.ndarray]]:
    import rasterio

    out = []
    if not LEVIR_FULL.is_dir():
        return out
    for a_path in sorted((LEVIR_FULL / "A").glob("*.png")):
        b_path = LEVIR_FULL / "B" / a_path.name
        with rasterio.open(a_path) as a, rasterio.open(b_path) as b:
            out.append((a.read()[:3], b.read()[:3]))
    return out


def build_scene(root: Path, size: int, *, block: int = 1024) -> tuple[Path, Path, str]:
    """Write a ``size`` x ``size`` before/after GeoTIFF pair in ``root``; returns paths and the source used.

    Real LEVIR-CD 1024 px tiles are laid out in a grid (flipped/rotated variants so neighbours differ);
    the scene is written block row by block row, so building it never holds the whole scene.
    """
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from cdmap.synthetic import synthetic_change_pair

    tiles = _levir_tiles()
    source = "LEVIR-CD (levircd_fulltile_ucdscm mosaic)" if tiles else "synthetic"
    root.mkdir(parents=True, exist_ok=True)
    prof = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32615",
                transform=from_origin(600000.0, 3400000.0, 0.5, 0.5), tiled=True, blockxsize=512,
                blockysize=512, compress="deflate")
    pa, pb = root / "before.tif", root / "after.tif"
    with rasterio.open(pa, "w", **prof) as da, rasterio.open(pb, "w", **prof) as db:
        k = 0
        for r in range(0, size, block):
            for c in range(0, size, block):
                h, w = min(block, size - r), min(block, size - c)
                if tiles:
                    a, b = tiles[k % len(tiles)]
                    rot, flip = (k // len(tiles)) % 4, (k // (4 * len(tiles))) % 2
                    a, b = np.rot90(a, rot, axes=(1, 2)), np.rot90(b, rot, axes=(1, 2))
                    if flip:
                        a, b = a[:, :, ::-1], b[:, :, ::-1]
                    a, b = a[:, :h, :w], b[:, :h, :w]
                else:
                    a, b, _ = synthetic_change_pair(h, w, seed=k)
                da.write(np.ascontiguousarray(a), window=Window(c, r, w, h))
                db.write(np.ascontiguousarray(b), window=Window(c, r, w, h))
                k += 1
    return pa, pb, source
