"""How the row strips of one scene are shared between the ranks of a ``torchrun`` job.

The unit of work is a strip: the rows that become final once a grid row of windows is blended (a journal line).
Each rank takes one contiguous share of the strips still to compute, about the same number of rows each. A share
that has holes (a resume after a lost rank) is computed as separate bands; every band starts one row above its
first strip and at the start of a global batch, so each pixel is blended from exactly the windows, in exactly the
batches and order, of a single-process run (see :mod:`cdmap.predict.compute`).
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from cdmap.tiling import WindowGrid


@dataclass(frozen=True)
class StripSpan:
    """Scene rows ``[row0, row1)`` that become final after grid row ``grid_row``."""

    grid_row: int
    row0: int
    row1: int

    @property
    def rows(self) -> int:
        return self.row1 - self.row0


def strip_spans(grid: WindowGrid) -> list[StripSpan]:
    """Every non-empty strip of ``grid``, top down (a grid row that finishes no new row has none)."""
    out: list[StripSpan] = []
    top = 0
    for gr in range(len(grid.row_positions)):
        end = grid.rows_final_after(gr)
        if end > top:
            out.append(StripSpan(gr, top, end))
            top = end
    return out


def rank_share(todo: list[StripSpan], rank: int, world: int) -> list[StripSpan]:
    """The contiguous part of ``todo`` (in order) for ``rank``: a strip goes to the rank whose 1/world of the rows
    holds the rows before it, so each share is within one strip's rows of 1/world of the rows."""
    total = sum(s.rows for s in todo)
    if world <= 1 or total == 0:
        return list(todo)
    out, before = [], 0
    for s in todo:
        if before * world // total == rank:
            out.append(s)
        before += s.rows
    return out


def bands(share: list[StripSpan]) -> list[list[StripSpan]]:
    """``share`` cut where it skips strips: runs of adjacent strips."""
    out: list[list[StripSpan]] = []
    for s in share:
        if out and out[-1][-1].row1 == s.row0:
            out[-1].append(s)
        else:
            out.append([s])
    return out


@dataclass
class RankReport:
    """What one rank did (run.json's ``ranks.per_rank``); ``error`` is its one-line failure and exit code."""

    rank: int
    host: str
    device: str
    strips: int
    rows: int
    windows_computed: int
    windows_skipped: int
    compute_s: float
    model_s: float
    peak_rss_mib: float
    peak_gpu_mib: float | None = None
    error: tuple[str, int] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)  # the journal lines it appended


    @classmethod
    def empty(cls, rank: int, device: str) -> RankReport:
        return cls(rank, socket.gethostname(), device, 0, 0, 0, 0, 0.0, 0.0, 0.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("error")
        d.pop("records")
        d["compute_s"], d["model_s"] = round(self.compute_s, 3), round(self.model_s, 3)
        d["peak_rss_mib"] = round(self.peak_rss_mib, 1)
        return d
