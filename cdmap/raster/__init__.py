"""Raster I/O: open and align the before/after pair, write tiled GeoTIFFs and Cloud Optimized GeoTIFFs."""

from __future__ import annotations

from cdmap.raster.cog import to_cog, validate_cog
from cdmap.raster.grid import same_grid
from cdmap.raster.pair import Alignment, ScenePair, open_pair
from cdmap.raster.write import RasterWriter

__all__ = ["Alignment", "RasterWriter", "ScenePair", "open_pair", "same_grid", "to_cog", "validate_cog"]
