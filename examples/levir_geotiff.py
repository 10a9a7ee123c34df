"""Make a georeferenced GeoTIFF pair (and its label) from a LEVIR-CD full tile in ../shared/data.

LEVIR-CD ships PNGs without georeferencing; ``levircd_spatial_info`` gives each tile's lon/lat bounds, so the
tile becomes an EPSG:4326 GeoTIFF pair (about 0.5 m pixels) that ``cdmap predict`` reads like any scene.
The README's picture was made from tile ``test_7`` (held out from the packaged model's training)::

    python examples/levir_geotiff.py test_7 levir_test_7/
    cdmap predict levir_test_7/before.tif levir_test_7/after.tif -o levir_test_7/out
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_levir_pair(tile: str, out_dir: str | Path, data_root: str | Path = DATA) -> tuple[Path, Path, Path]:
    """Write ``before.tif``, ``after.tif`` and ``label.tif`` (0/1) of LEVIR-CD tile ``tile`` into ``out_dir``."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_bounds

    from cdmap.data import no_georef_warning  # the PNGs have no georeferencing: that is why we are here

    root = Path(data_root)
    folder = next(f for f in (root / "levircd_fulltile_ucdscm", root / "levircd_iaug_train14")
                  if (f / "A" / f"{tile}.png").exists())
    west, north, east, south = json.loads(
        (root / "levircd_spatial_info" / "LEVIR_CD_name_coords.json").read_text())[f"{tile}.png"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for sub, name in (("A", "before"), ("B", "after"), ("label", "label")):
        with no_georef_warning(), rasterio.open(folder / sub / f"{tile}.png") as src:
            data = src.read()
        data = (data[:1] > 127).astype(np.uint8) if sub == "label" else data[:3]
        profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
                   "dtype": "uint8", "crs": "EPSG:4326", "compress": "deflate", "tiled": True,
                   "transform": from_bounds(west, south, east, north, data.shape[2], data.shape[1])}
        if sub != "label":
            profile["photometric"] = "RGB"
        path = out / f"{name}.tif"
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
        paths.append(path)
    return paths[0], paths[1], paths[2]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tile", help="LEVIR-CD full tile name, e.g. test_7, test_12, test_102, train_14")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--data-root", type=Path, default=DATA)
    args = ap.parse_args()
    for p in write_levir_pair(args.tile, args.out_dir, args.data_root):
        print(p)
