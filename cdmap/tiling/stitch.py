"""Row-strip stitcher: blends window predictions and hands out finished rows, top to bottom.

Memory is bounded by the scene width: the accumulator covers only the rows that can still receive
contributions (at most one tile height), never the whole scene.

The stitcher also measures the seams of what it hands out (:class:`BlendStats`). Every step between two
neighbouring pixels is averaged over a :data:`SEGMENT`-pixel piece along the window grid line it would lie on,
so an offset or edge effect that runs along a seam adds up while image content averages out. Seam steps are the
steps of the blend zones, where the output passes from one window to the next (at overlap 0: the step across
the cut), and the steps within :data:`EDGE` pixels of a zone, where a model's own edge effect shows. The median
of each kind over the median step elsewhere, or its inverse when seams are flatter than the rest (a model that
blanks its window border), is a seam ratio; the larger one is the run's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cdmap.tiling.grid import GridWindow, WindowGrid

SEAM_METRIC = 2
"""Version of the seam statistics kept per strip (a journal of another version cannot be resumed)."""
SEGMENT = 32
"""Pixels of a grid line averaged into one step sample."""
EDGE = 8
"""Pixels either side of a blend zone where a model's edge effect is looked for (fewer on a dense grid)."""
GAP = 16
"""Steps this close to a blend zone are not control steps (fewer on a dense grid: see :func:`seam_widths`)."""
FLAT = 1 / 255
"""A step this small does not show: one grey level of the 8-bit probability raster. It is added to both
medians, so the ratio of a model whose output is nearly flat is not a ratio of invisible noise."""
HIST_LO, HIST_PER_DECADE, HIST_DECADES = 1e-6, 40, 6
HIST_BINS = 1 + HIST_PER_DECADE * HIST_DECADES  # bin 0: steps below HIST_LO


@dataclass
class Strip:
    """Finished rows ``[row0, row1)``: blended P(change), NaN where nodata."""

    grid_row: int
    row0: int
    row1: int
    prob: np.ndarray
    stats: BlendStats | None = None  # what this strip adds to the stitcher's statistics


def _hist() -> list[int]:
    return [0] * HIST_BINS


def _bin_of(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        b = np.floor(np.log10(np.maximum(values, 1e-30) / HIST_LO) * HIST_PER_DECADE).astype(np.int64) + 1
    return np.clip(b, 0, HIST_BINS - 1)


def _median(hist: list[int]) -> float | None:
    """The median of the values counted in a step histogram (geometric interpolation inside the bin)."""
    n = sum(hist)
    if not n:
        return None
    half, seen = n / 2.0, 0
    for i, c in enumerate(hist):
        if c and seen + c >= half:
            if i == 0:
                return 0.0
            frac = (half - seen) / c
            return HIST_LO * 10 ** ((i - 1 + frac) / HIST_PER_DECADE)
        seen += c
    return None  # pragma: no cover - the loop always returns


@dataclass
class BlendStats:
    """Additive sums behind the seam ratio and the overlap disagreement (per strip, per run, per rank)."""

    zone_hist: list[int] = field(default_factory=_hist)
    edge_hist: list[int] = field(default_factory=_hist)
    control_hist: list[int] = field(default_factory=_hist)
    disagree_sum: float = 0.0
    disagree_n: int = 0

    def add(self, other: BlendStats) -> None:
        for name in ("zone_hist", "edge_hist", "control_hist"):
            setattr(self, name, [a + b for a, b in zip(getattr(self, name), getattr(other, name), strict=True)])
        self.disagree_sum += other.disagree_sum
        self.disagree_n += other.disagree_n

    def to_dict(self) -> dict[str, float | int | list[int]]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @property
    def seam_ratio(self) -> float | None:
        """How much window seams stand out; 1.0 = not at all, and a window grid a person sees reads above 1.1.

        A step sample is one step between neighbouring pixels averaged over :data:`SEGMENT` pixels along the
        window grid line. For the steps in and into the blend zones of two windows, and for those within
        :data:`EDGE` pixels of a zone: r = (their median + :data:`FLAT`) / (median of the steps at least
        :data:`GAP` pixels from any zone + :data:`FLAT`), both widths from :func:`seam_widths`. The seam ratio
        is the larger of max(r, 1/r).
        """
        other = _median(self.control_hist)
        ratios = []
        for hist in (self.zone_hist, self.edge_hist):
            seam = _median(hist)
            if seam is not None and other is not None:
                r = (seam + FLAT) / (other + FLAT)
                ratios.append(max(r, 1.0 / r))
        return max(ratios) if ratios else None

    @property
    def overlap_disagreement(self) -> float | None:
        """Mean |P_window - P_blended so far| where windows overlap with positive weights."""
        return self.disagree_sum / self.disagree_n if self.disagree_n else None


def seam_widths(grid: WindowGrid) -> tuple[int, int]:
    """(edge, gap) in pixels for this grid: :data:`EDGE` and :data:`GAP`, scaled down when the blend zones fill
    so much of the stride that controls would not fit (at least a quarter of what a zone leaves is control)."""
    zone = max(grid.overlap - 2 * grid.blend_margin, 0) + 1
    gap = max(2, min(GAP, (grid.stride - zone) // 4))
    return max(1, min(EDGE, gap // 2)), gap


def seam_classes(grid: WindowGrid, positions: list[int], length: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the ``length - 1`` steps along one axis (step ``j`` lies between pixels ``j`` and ``j + 1``): which are
    blend-zone steps, edge steps beside a zone, and control steps."""
    n = max(length - 1, 0)
    seam, edge, near = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    m = grid.blend_margin
    edge_px, gap = seam_widths(grid)
    for p in positions[1:]:
        # the blend zone of the window starting at p and the one before it: pixels [p + m, p + overlap - m),
        # the steps from pixel p + m - 1 to p + overlap - m (at overlap 0: the one step across the cut)
        lo, hi = p + m - 1, p + grid.overlap - m
        seam[max(lo, 0) : max(min(hi, n), 0)] = True
        edge[max(lo - edge_px, 0) : max(min(hi + edge_px, n), 0)] = True
        near[max(lo - gap, 0) : max(min(hi + gap, n), 0)] = True
    return seam, edge & ~seam, ~near


def _piece_steps(prob: np.ndarray) -> np.ndarray:
    """|step| along axis 1 averaged over :data:`SEGMENT`-row pieces of the strip (NaN where under half valid)."""
    d = np.diff(prob, axis=1)
    ok = ~np.isnan(d)
    filled = np.where(ok, d, 0.0).astype(np.float64)
    starts = np.arange(0, d.shape[0], SEGMENT)
    s = np.add.reduceat(filled, starts, axis=0)
    n = np.add.reduceat(ok.astype(np.int64), starts, axis=0)
    full = np.minimum(np.diff(np.append(starts, d.shape[0])), SEGMENT)[:, None]
    out = np.full(s.shape, np.nan)
    keep = n * 2 >= full
    out[keep] = np.abs(s[keep] / n[keep])
    return out


def _count(hist: list[int], values: np.ndarray) -> None:
    v = values[~np.isnan(values)]
    if v.size:
        for b, c in zip(*np.unique(_bin_of(v), return_counts=True), strict=True):
            hist[int(b)] += int(c)


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
        self._prev_row: np.ndarray | None = None  # last finished row, for the row steps across strips
        self._pending = BlendStats()  # statistics since the last finished strip
        self._cols = seam_classes(self.grid, self.grid.col_positions, w)
        self._rows = seam_classes(self.grid, self.grid.row_positions, self.grid.height)

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
            self._pending.disagree_sum += float(np.where(both, diff, 0.0).sum(dtype=np.float64))
            self._pending.disagree_n += n_both
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
        strip = Strip(grid_row, self._top, end, prob, self._pending)
        self.stats.add(self._pending)
        self._pending = BlendStats()
        # shift the remaining rows up
        for buf in (self._sum, self._wsum, self._valid):
            buf[: self._cap - n] = buf[n:].copy()
            buf[self._cap - n :] = 0
        self._top = end
        return strip

    def _seam_stats(self, prob: np.ndarray, row0: int) -> None:
        """Count this strip's column steps, and its row steps (from the last row of the strip above)."""
        if prob.shape[1] > 1:
            steps = _piece_steps(prob)
            for hist, cls in zip(self._hists(), self._cols, strict=True):
                _count(hist, steps[:, cls])
        rows = prob if self._prev_row is None else np.vstack([self._prev_row[None], prob])
        first = row0 if self._prev_row is None else row0 - 1  # scene row of rows[0]
        if rows.shape[0] > 1:
            steps = _piece_steps(np.ascontiguousarray(rows.T)).T  # (row steps, pieces along the row)
            j = np.arange(first, first + rows.shape[0] - 1)
            for hist, cls in zip(self._hists(), self._rows, strict=True):
                _count(hist, steps[cls[j]])
        self._prev_row = prob[-1].copy()

    def _hists(self) -> tuple[list[int], list[int], list[int]]:
        s = self._pending
        return s.zone_hist, s.edge_hist, s.control_hist



