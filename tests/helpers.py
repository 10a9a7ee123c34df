"""Test helpers shared by several test modules (not fixtures)."""

from __future__ import annotations

from pathlib import Path


def tiny_checkpoint(path: Path, *, in_channels: int = 3, tile: int = 64, seed: int = 0, gamma: float = 0.5,
                    threshold: float = 0.5, mean: float = 100.0, std: float = 50.0) -> Path:
    """A randomly initialised FSG-Net checkpoint with the cross-attention switched on (gamma != 0)."""
    import torch

    from cdmap.checkpoint import Checkpoint, save_checkpoint
    from cdmap.models import FSGNet, ModelConfig

    torch.manual_seed(seed)
    model = FSGNet(ModelConfig(in_channels=in_channels))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(gamma)
    ckpt = Checkpoint(ModelConfig(in_channels=in_channels), model.state_dict(), [mean] * in_channels,
                      [std] * in_channels, tile_size=tile, threshold=threshold)
    return save_checkpoint(ckpt, path)


REPO = Path(__file__).resolve().parents[1]


def cdmap_env(**extra: str) -> dict[str, str]:
    """The environment of a ``python -m cdmap`` subprocess: this checkout first, one thread, no leftovers."""
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name in ("CDMAP_VERBOSE", "CDMAP_FAULT_INJECT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                 "MASTER_PORT"):
        env.pop(name, None)
    return env | extra


def torchrun_cmd(nproc: int, *cdmap_args: object) -> list[str]:
    """``torchrun --standalone --nproc-per-node N -m cdmap ARGS`` through this interpreter."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
            "cdmap", *map(str, cdmap_args)]


def assert_same_outputs(got: Path, want: Path) -> None:
    """Both rasters' pixels, masks, CRS and transform, and every polygon, are equal in the two output folders."""
    import geopandas as gpd
    import numpy as np
    import rasterio

    for name in ("change_probability.tif", "change_mask.tif"):
        with rasterio.open(got / name) as g, rasterio.open(want / name) as w:
            assert np.array_equal(g.read(), w.read()), name
            assert np.array_equal(g.read_masks(1), w.read_masks(1)), name
            assert g.crs == w.crs and g.transform == w.transform, name
    gp = gpd.read_file(got / "changes.gpkg", layer="changes")
    wp = gpd.read_file(want / "changes.gpkg", layer="changes")
    assert len(gp) == len(wp)
    assert list(gp["n_pixels"]) == list(wp["n_pixels"])
    assert all(a.equals_exact(b, 0.0) for a, b in zip(gp.geometry, wp.geometry, strict=True))
