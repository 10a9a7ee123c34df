"""Raster I/O: open and align the before/after pair, write tiled GeoTIFFs and Cloud Optimized GeoTIFFs."""

from __future__ import annotations

from cdmap.raster.cog import to_cog, validate_cog
from cdmap.raster.pair import ScenePair, open_pair
from cdmap.raster.write import RasterWriter

__all__ = ["RasterWriter", "ScenePair", "open_pair", "to_cog", "validate_cog"]
