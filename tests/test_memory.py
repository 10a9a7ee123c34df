"""Peak memory is bounded by the scene width, not its area."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from tests.helpers import tiny_checkpoint


def _tall_scene(path, height: int, width: int, seed: int) -> None:
    prof = dict(driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs="EPSG:32633",
                transform=from_origin(500000, 4000000, 0.5, 0.5), tiled=True, blockxsize=256, blockysize=256,
                compress="deflate")
    rng = np.random.default_rng(seed)
    with rasterio.open(path, "w", **prof) as dst:
        for r in range(0, height, 256):
            h = min(256, height - r)
            dst.write(rng.integers(0, 255, size=(3, h, width), dtype=np.uint8), window=Window(0, r, width, h))


def _peak_rss(tmp_path, name, height, width, ckpt, tuned: bool = False) -> float:
    a, b = tmp_path / f"{name}_a.tif", tmp_path / f"{name}_b.tif"
    _tall_scene(a, height, width, 1)
    _tall_scene(b, height, width, 2)
    out = tmp_path / f"{name}_out"
    code = (
        ("from cdmap.allocator import tune_allocator; assert tune_allocator();" if tuned else "")
        + "import sys; from cdmap.predict import predict_scene;"
        f"predict_scene({str(a)!r}, {str(b)!r}, {str(out)!r}, {str(ckpt)!r}, quiet=True, batch_size=16,"
        " overlap=0, tile_size=128, threshold=0.5, vector_format='none')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    return json.loads((out / "run.json").read_text())["peak_rss_mib"]


@pytest.mark.parametrize("tuned", [False, pytest.param(True, marks=pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc allocator settings: Linux only"))])
def test_peak_rss_does_not_grow_with_scene_height(tmp_path, tuned):
    """Also with the CLI's allocator settings (cdmap/allocator.py), which keep freed memory in the process."""
    ckpt = tiny_checkpoint(tmp_path / "t.pt")
    width = 4096
    short = _peak_rss(tmp_path, "short", 768, width, ckpt, tuned)
    tall = _peak_rss(tmp_path, "tall", 4 * 768, width, ckpt, tuned)
    print(f"peak RSS: {short:.0f} MiB at 768 rows, {tall:.0f} MiB at 3072 rows (width {width}, tuned {tuned})")
    # Discriminating: a whole-scene float32 sum + weight accumulator alone would add
    # (3072 - 768) * 4096 * 8 B = 72 MiB (~17% of the ~420 MiB torch baseline); reading the inputs whole, 4x that.
    assert tall < short * 1.15, (short, tall)
