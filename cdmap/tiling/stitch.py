"""Row-strip stitcher: blends window predictions and hands out finished rows, top to bottom.

Memory is bounded by the scene width: the accumulator covers only the rows that can still receive
contributions (at most one tile height), never the whole scene.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cdmap.tiling.grid import GridWindow, WindowGrid


@dataclass
class Strip:
    """Finished rows ``[row0, row1)``: blended P(change), NaN where nodata."""

    grid_row: int
    row0: int
    row1: int
    prob: np.ndarray


@dataclass
class BlendStats:
    """Running sums for the seam ratio and the overlap disagreement."""

    seam_sum: float = 0.0
    seam_n: int = 0
    other_sum: float = 0.0
    other_n: int = 0
    disagree_sum: float = 0.0
    disagree_n: int = 0

    def add(self, other: BlendStats) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def to_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @property
    def seam_ratio(self) -> float | None:
        """Mean |step| across window boundaries over the mean |step| elsewhere (1.0 = seamless)."""
        if not self.seam_n or not self.other_n or self.other_sum == 0:
            return None
        return (self.seam_sum / self.seam_n) / (self.other_sum / self.other_n)

    @property
    def overlap_disagreement(self) -> float | None:
        """Mean |P_window - P_blended so far| where windows overlap with positive weights."""
        return self.disagree_sum / self.disagree_n if self.disagree_n else None


@dataclass
class StripStitcher:
    """Accumulates weighted window predictions; ``finish_grid_row`` returns the rows that are final.

    ``start_row`` > 0 resumes below rows already finished in an earlier run; contributions above it
    are ignored, so the remaining rows are blended exactly as in an uninterrupted run.
    """

    grid: WindowGrid
    start_row: int = 0
    stats: BlendStats = field(default_factory=BlendStats)

    def __post_init__(self) -> None:
        w = self.grid.width
        self._top = self.start_row  # first unflushed scene row
        self._cap = self.grid.tile + 1
        self._sum = np.zeros((self._cap, w), dtype=np.float32)
        self._wsum = np.zeros((self._cap, w), dtype=np.float32)
        self._valid = np.zeros((self._cap, w), dtype=bool)
        self._prev_row: np.ndarray | None = None  # last finished row, for vertical steps across strips
        self._seam_cols = grid_cols = self.grid.seam_lines(self.grid.col_positions, w)
        self._col_is_seam = np.zeros(max(w - 1, 0), dtype=bool)
        if len(grid_cols):
            self._col_is_seam[grid_cols - 1] = True
        rows = self.grid.seam_lines(self.grid.row_positions, self.grid.height)
        self._row_is_seam = np.zeros(self.grid.height + 1, dtype=bool)
        self._row_is_seam[rows] = True

    @property
    def next_row(self) -> int:
        return self._top

    def add(self, window: GridWindow, prob: np.ndarray, valid: np.ndarray) -> None:
        """Add one window's P(change) (tile x tile) and its validity (same shape, False outside the scene)."""
        g = self.grid
        r0, c0, r1, c1 = window.clip(g.height, g.width)
        r0 = max(r0, self._top)
        if r0 >= r1:
            return
        if r1 - self._top > self._cap:
            raise RuntimeError("window added before earlier rows were finished")  # pipeline bug guard
        wr, wc = r0 - window.row, c0 - window.col
        h, w = r1 - r0, c1 - c0
        p = prob[wr : wr + h, wc : wc + w]
        wt = g.weights[wr : wr + h, wc : wc + w]
        br = r0 - self._top
        acc = self._sum[br : br + h, c0:c1]
        accw = self._wsum[br : br + h, c0:c1]
        both = (accw > 0) & (wt > 0)
        n_both = int(np.count_nonzero(both))
        if n_both:
            # masked arithmetic without gathers: this runs once per window on the main thread
            with np.errstate(invalid="ignore", divide="ignore"):
                diff = np.abs(p - acc / accw)
            self.stats.disagree_sum += float(np.where(both, diff, 0.0).sum(dtype=np.float64))
            self.stats.disagree_n += n_both
        acc += wt * p
        accw += wt
        self._valid[br : br + h, c0:c1] |= valid[wr : wr + h, wc : wc + w]

    def finish_grid_row(self, grid_row: int) -> Strip | None:
        """Call after the last window of ``grid_row``; returns the newly final rows, if any."""
        end = self.grid.rows_final_after(grid_row)
        n = end - self._top
        if n <= 0:
            return None
        wsum = self._wsum[:n]
        valid = self._valid[:n] & (wsum > 0)
        prob = np.full((n, self.grid.width), np.nan, dtype=np.float32)
        np.divide(self._sum[:n], wsum, out=prob, where=valid)
        self._seam_stats(prob, self._top)
        strip = Strip(grid_row, self._top, end, prob)
        # shift the remaining rows up
        for buf in (self._sum, self._wsum, self._valid):
            buf[: self._cap - n] = buf[n:].copy()
            buf[self._cap - n :] = 0
        self._top = end
        return strip

    def _seam_stats(self, prob: np.ndarray, row0: int) -> None:
        s = self.stats
        if prob.shape[1] > 1:
            dx = np.abs(np.diff(prob, axis=1))
            ok = ~np.isnan(dx)
            seam = ok & self._col_is_seam[None, :]
            s.seam_sum += float(dx[seam].sum(dtype=np.float64))
            s.seam_n += int(seam.sum())
            other = ok & ~self._col_is_seam[None, :]
            s.other_sum += float(dx[other].sum(dtype=np.float64))
            s.other_n += int(other.sum())
        rows = prob if self._prev_row is None else np.vstack([self._prev_row[None], prob])
        first = row0 if self._prev_row is None else row0 - 1
        if rows.shape[0] > 1:
            dy = np.abs(np.diff(rows, axis=0))
            ok = ~np.isnan(dy)
            is_seam = self._row_is_seam[first + 1 : first + rows.shape[0]][:, None]
            seam = ok & is_seam
            s.seam_sum += float(dy[seam].sum(dtype=np.float64))
            s.seam_n += int(seam.sum())
            other = ok & ~is_seam
            s.other_sum += float(dy[other].sum(dtype=np.float64))
            s.other_n += int(other.sum())
        self._prev_row = prob[-1].copy()
