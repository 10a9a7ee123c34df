"""Shared fixtures: the real-data folder (skipped when absent) and small synthetic GeoTIFF makers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CDMAP_SHARED_DATA", REPO.parent / "shared" / "data"))

# Keep torch from oversubscribing the 2 CI cores when several things run.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one thread is as fast, and immune to OpenMP stalls when the CI cores are busy."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests using it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


def write_geotiff(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = "EPSG:32633",
    transform=None,
    nodata: float | None = None,
    tiled: bool = True,
    **profile,
) -> Path:
    """Write ``data`` (bands, rows, cols) as a GeoTIFF; default grid is 0.5 m pixels in UTM 33N."""
    import rasterio
    from rasterio.transform import from_origin

    if data.ndim == 2:
        data = data[None]
    count, height, width = data.shape
    if transform is None:
        transform = from_origin(500000.0, 4000000.0, 0.5, 0.5)
    prof = dict(
        driver="GTiff", width=width, height=height, count=count, dtype=data.dtype, transform=transform,
        nodata=nodata,
    )
    if crs is not None:
        prof["crs"] = crs
    if tiled and width >= 16 and height >= 16:
        prof.update(tiled=True, blockxsize=16 * max(1, min(width, 256) // 16),
                    blockysize=16 * max(1, min(height, 256) // 16))
    prof.update(profile)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)
    return path


def synthetic_pair(
    tmp_path: Path, height: int = 200, width: int = 300, bands: int = 3, seed: int = 0, **kw
) -> tuple[Path, Path, np.ndarray]:
    """A before/after uint8 pair with rectangles 'built' in the after image; returns paths and truth mask."""
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 120, size=(bands, height, width), dtype=np.uint8)
    after = base.copy()
    truth = np.zeros((height, width), dtype=np.uint8)
    for _ in range(max(1, height * width // 8000)):
        h, w = rng.integers(6, 24, size=2)
        h, w = min(h, height - 1), min(w, width - 1)  # small scenes (hypothesis draws 20 px sides)
        r, c = rng.integers(0, height - h), rng.integers(0, width - w)
        after[:, r : r + h, c : c + w] = 230
        truth[r : r + h, c : c + w] = 1
    a = write_geotiff(tmp_path / "before.tif", base, **kw)
    b = write_geotiff(tmp_path / "after.tif", after, **kw)
    return a, b, truth


@pytest.fixture
def make_geotiff():
    return write_geotiff


@pytest.fixture
def make_pair():
    return synthetic_pair
