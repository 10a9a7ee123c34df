"""Sliding-window grid, blend weights and the row-strip stitcher."""

from cdmap.tiling.grid import GridWindow, WindowGrid, axis_positions, blend_weights_1d
from cdmap.tiling.stitch import Strip, StripStitcher

__all__ = ["GridWindow", "WindowGrid", "axis_positions", "blend_weights_1d", "Strip", "StripStitcher"]
