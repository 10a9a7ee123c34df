"""The window grid over a scene and the blend weights of one window.

Windows of ``tile`` pixels advance by ``stride = tile - overlap``. The first window starts ``overlap // 2``
pixels before the scene (reflection-padded), so scene-border pixels sit as deep inside a window as the
pixels at an interior seam, and the last window reaches at least ``overlap // 2`` past the far edge.
Each window's weight is a raised-cosine (Hann) ramp over the overlap with a discarded margin of
``margin`` pixels at every edge, flat 1 in the centre. Overlapping predictions are averaged with these
weights, so no window edge shows in the mosaic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from cdmap.errors import UsageError


def axis_positions(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets (may be negative or run past ``length``) of the windows along one axis."""
    if length < 1:
        raise UsageError(f"scene axis of length {length} cannot be tiled")
    stride = tile - overlap
    half = overlap // 2
    span = length + 2 * half  # the padded extent windows must cover
    n = 1 if span <= tile else math.ceil((span - tile) / stride) + 1
    return [-half + k * stride for k in range(n)]


def default_margin(overlap: int) -> int:
    """Pixels discarded at each window edge: a quarter of the overlap (0 without overlap)."""
    return overlap // 4


def blend_weights_1d(tile: int, overlap: int, margin: int | None = None) -> np.ndarray:
    """Weights along one window axis: 0 in the margin, a Hann ramp over the rest of the overlap, then 1."""
    if margin is None:
        margin = default_margin(overlap)
    w = np.ones(tile, dtype=np.float64)
    if overlap <= 0:
        return w.astype(np.float32)
    ramp = overlap - margin  # pixels from the margin to the flat centre
    d = np.minimum(np.arange(tile), np.arange(tile)[::-1]).astype(np.float64)  # distance to nearest edge
    w[d < margin] = 0.0
    inside = (d >= margin) & (d < overlap)
    w[inside] = np.sin(0.5 * math.pi * (d[inside] - margin + 0.5) / ramp) ** 2
    return w.astype(np.float32)


@dataclass(frozen=True)
class GridWindow:
    """One window: its index in grid order and its (possibly out-of-scene) pixel extent."""

    index: int
    grid_row: int
    row: int
    col: int
    size: int

    def clip(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The in-scene part as (row0, col0, row1, col1), end-exclusive."""
        return max(self.row, 0), max(self.col, 0), min(self.row + self.size, height), min(self.col + self.size, width)


@dataclass(frozen=True)
class WindowGrid:
    """All windows covering a ``height`` x ``width`` scene, in row-major order."""

    height: int
    width: int
    tile: int
    overlap: int
    margin: int | None = None

    def __post_init__(self) -> None:
        if self.tile < 32:
            raise UsageError(f"tile size {self.tile} is too small (minimum 32)")
        if self.overlap < 0 or self.overlap >= self.tile:
            raise UsageError(f"overlap {self.overlap} must be >= 0 and smaller than the tile size {self.tile}")
        if self.margin is not None and not (0 <= self.margin and 2 * self.margin <= self.overlap):
            raise UsageError(f"margin {self.margin} must be between 0 and half the overlap ({self.overlap // 2})")

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def blend_margin(self) -> int:
        return default_margin(self.overlap) if self.margin is None else self.margin

    @cached_property
    def row_positions(self) -> list[int]:
        return axis_positions(self.height, self.tile, self.overlap)

    @cached_property
    def col_positions(self) -> list[int]:
        return axis_positions(self.width, self.tile, self.overlap)

    def __len__(self) -> int:
        return len(self.row_positions) * len(self.col_positions)

    def __iter__(self):
        return iter(self.windows(0))

    def windows(self, start: int = 0) -> list[GridWindow]:
        """Windows from grid index ``start`` on."""
        ncols = len(self.col_positions)
        out = []
        for idx in range(start, len(self)):
            gr, gc = divmod(idx, ncols)
            out.append(GridWindow(idx, gr, self.row_positions[gr], self.col_positions[gc], self.tile))
        return out

    @cached_property
    def weights(self) -> np.ndarray:
        """The 2-D blend weight of one window (tile x tile, float32)."""
        w = blend_weights_1d(self.tile, self.overlap, self.blend_margin)
        return np.outer(w, w)

    def first_window_of_grid_row(self, grid_row: int) -> int:
        return grid_row * len(self.col_positions)

    def rows_final_after(self, grid_row: int) -> int:
        """Scene rows [0, n) receive no contribution from grid rows after ``grid_row``."""
        if grid_row + 1 >= len(self.row_positions):
            return self.height
        return min(self.height, max(0, self.row_positions[grid_row + 1] + self.blend_margin))

    def seam_lines(self, axis_positions_: list[int], length: int) -> np.ndarray:
        """Scene positions where some window's weighted support starts or ends (seam candidates).

        A position ``p`` in the result means the step between pixels ``p - 1`` and ``p``.
        """
        m = self.blend_margin
        lines = set()
        for p in axis_positions_:
            for q in (p + m, p + self.tile - m):
                if 0 < q < length:
                    lines.add(q)
        return np.array(sorted(lines), dtype=np.int64)
