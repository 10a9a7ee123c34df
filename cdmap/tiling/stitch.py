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
    stats: BlendStats | None = None  # what this strip adds to the stitcher's statistics


SEGMENT = 32  # pixels of a seam line averaged into one band-vs-flank difference
EDGE = 6  # band half-width beyond the blend zone (the whole band at overlap 0)


@dataclass
class BlendStats:
    """Running sums for the seam ratio and the overlap disagreement (sums of per-strip scalars)."""

    seam_line_sq: float = 0.0
    seam_step_sq: float = 0.0
    seam_n: int = 0
    control_line_sq: float = 0.0
    control_step_sq: float = 0.0
    control_n: int = 0
    disagree_sum: float = 0.0
    disagree_n: int = 0

    def add(self, other: BlendStats) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def to_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @property
    def seam_ratio(self) -> float | None:
        """How much more window seams stand out than lines midway between them: sqrt(L + S - 1), where L is the
        mean squared line term (band across a seam minus the flanks beside it) at seams over the same at the
        midway lines, and S the same for the step term (one side minus the other).

        Each term is taken over a :data:`SEGMENT`-pixel piece of a seam, so an edge effect or an offset between
        windows adds up along the seam while image content averages out. 1.0 = no seam; a visible grid reads
        well above 1.1.
        """
        if not self.seam_n or not self.control_n or not self.control_line_sq or not self.control_step_sq:
            return None
        line = (self.seam_line_sq / self.seam_n) / (self.control_line_sq / self.control_n)
        step = (self.seam_step_sq / self.seam_n) / (self.control_step_sq / self.control_n)
        return float(np.sqrt(max(line + step - 1.0, 0.0)))

    @property
    def overlap_disagreement(self) -> float | None:
        """Mean |P_window - P_blended so far| where windows overlap with positive weights."""
        return self.disagree_sum / self.disagree_n if self.disagree_n else None


def _templates(grid: WindowGrid, positions: list[int], length: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Half-width ``h`` and the centres of seam and control templates along one axis.

    A seam's centre is the middle of the blend zone of the window starting there; its band is ``[c-h, c+h)``
    and its flanks ``[c-2h, c-h)`` and ``[c+h, c+2h)``. Controls are the same template between seams.
    Only templates wholly inside the scene are kept.
    """
    h = seam_half_width(grid)
    seams = np.array([p + grid.overlap // 2 for p in positions[1:]], dtype=np.int64)
    # controls at a quarter, half and three quarters of the way between seams (and beyond the last one)
    offsets = [grid.stride * q // 4 for q in (1, 2, 3)] if grid.stride >= 16 * h else [grid.stride // 2]
    controls = np.unique(np.concatenate([seams - o for o in offsets] + [seams[-1:] + o for o in offsets]))

    def inside(c: np.ndarray) -> np.ndarray:
        return c[(c - 2 * h >= 0) & (c + 2 * h <= length)]

    return h, inside(seams), inside(controls)


def seam_half_width(grid: WindowGrid) -> int:
    """The band half-width: the blend zone's half-width plus :data:`EDGE`, at most a sixteenth of the stride
    (so controls fit a quarter of the stride away from a seam)."""
    return max(1, min(max(grid.overlap // 2 - grid.blend_margin, 0) + EDGE, grid.stride // 16))


def seam_context_rows(grid: WindowGrid) -> int:
    """Rows above a strip the stitcher needs to score the row seams that end in it."""
    return 4 * seam_half_width(grid)


def _band_flank(prob: np.ndarray, centres: np.ndarray, h: int, axis: int) -> tuple[float, float, int]:
    """Sums over :data:`SEGMENT`-long pieces of seams of (band mean - flank mean)^2 and (right - left)^2, and the
    number of pieces: the first sees a line along the seam, the second a step across it.

    ``axis`` is the axis across the seam (1: seams are columns, 0: seams are rows).
    """
    if not len(centres):
        return 0.0, 0.0, 0
    p = prob if axis == 1 else prob.T
    valid = ~np.isnan(p)
    filled = np.where(valid, p, 0.0)
    starts = [0, *range(SEGMENT, p.shape[0], SEGMENT)]
    line_sq, step_sq, n = 0.0, 0.0, 0
    for c in centres:
        # quarter sums over [c-2h, c-h), [c-h, c), [c, c+h), [c+h, c+2h), per segment
        qs = [np.add.reduceat(filled[:, lo : lo + h].sum(1), starts) for lo in range(c - 2 * h, c + 2 * h, h)]
        qn = [np.add.reduceat(valid[:, lo : lo + h].sum(1), starts) for lo in range(c - 2 * h, c + 2 * h, h)]
        ok = np.logical_and.reduce([q > 0 for q in qn])
        mean = [s_[ok] / n_[ok] for s_, n_ in zip(qs, qn, strict=True)]
        line = (mean[1] + mean[2] - mean[0] - mean[3]) / 2
        step = (mean[2] + mean[3] - mean[0] - mean[1]) / 2
        line_sq += float(np.square(line, dtype=np.float64).sum())
        step_sq += float(np.square(step, dtype=np.float64).sum())
        n += int(ok.sum())
    return line_sq, step_sq, n


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
        # row seams reach above the strip that finishes them: keep that many finished rows
        self._pending = BlendStats()  # statistics since the last finished strip (per-strip sums, not differences)
        self._ctx = seam_context_rows(self.grid)
        self._prev_rows = np.zeros((0, w), dtype=np.float32)
        self._h, self._col_seams, self._col_controls = _templates(self.grid, self.grid.col_positions, w)
        _, self._row_seams, self._row_controls = _templates(self.grid, self.grid.row_positions, self.grid.height)

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
        """Score the column seams over this strip's rows and the row seams whose template ends in it."""
        h = self._h
        for centres, kind in ((self._col_seams, "seam"), (self._col_controls, "control")):
            self._score(kind, *_band_flank(prob, centres, h, axis=1))
        rows = np.vstack([self._prev_rows, prob])
        first = row0 - len(self._prev_rows)
        for centres, kind in ((self._row_seams, "seam"), (self._row_controls, "control")):
            ends = centres + 2 * h - 1
            mine = centres[(ends >= row0) & (ends < row0 + len(prob)) & (centres - 2 * h >= first)]
            self._score(kind, *_band_flank(rows, mine - first, h, axis=0))
        self._prev_rows = rows[-self._ctx :].copy()

    def _score(self, kind: str, line_sq: float, step_sq: float, n: int) -> None:
        s = self._pending
        setattr(s, f"{kind}_line_sq", getattr(s, f"{kind}_line_sq") + line_sq)
        setattr(s, f"{kind}_step_sq", getattr(s, f"{kind}_step_sq") + step_sq)
        setattr(s, f"{kind}_n", getattr(s, f"{kind}_n") + n)
