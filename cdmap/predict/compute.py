"""The compute stage: windows of the pair -> :class:`~cdmap.inference.Predictor` in batches -> blended row
strips, each persisted in the journal as soon as it is final. A process computes its share of the strips
(all of them, or one rank's, :mod:`cdmap.predict.ranks`) band by band.

Reader threads read and prepare the windows of the next batches while the network runs the current one.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from rasterio.windows import Window

from cdmap import process
from cdmap.inference import PendingProbability, Predictor
from cdmap.predict.journal import Journal
from cdmap.predict.ranks import StripSpan, bands, strip_spans
from cdmap.tiling import GridWindow, StripStitcher, WindowGrid
from cdmap.tiling.stitch import BlendStats

if TYPE_CHECKING:
    from cdmap.predict.options import RunOptions
    from cdmap.predict.plan import PredictPlan
    from cdmap.raster.pair import ScenePair

PREFETCH = 2  # batches read ahead of the one on the device

# a prepared window: (before, after, valid), padded to the tile; None when it holds no valid pixel
Tile = tuple[np.ndarray, np.ndarray, np.ndarray] | None


@dataclass
class ComputeStats:
    """What the compute stage did (run.json's ``windows``, ``device``, ``precision``, blend statistics)."""

    windows_total: int = 0
    windows_computed: int = 0
    windows_skipped: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    backend: str = "torch"
    backend_setup_s: float = 0.0  # export, compile and checks of a non-torch backend
    blend: BlendStats = field(default_factory=BlendStats)
    model_s: float = 0.0
    peak_gpu_mib: float | None = None
    strips: int = 0  # strips (and their rows) this process computed
    rows: int = 0


def gdal_cache_bytes(pair: ScenePair, tile: int) -> int:
    """GDAL block cache sized to the scene width (two rows of windows of both dates and the outputs).

    GDAL's default (5% of RAM) would let the cache, and so memory, grow with the scene area up to that cap.
    Bytes, as rasterio hands an integer GDAL_CACHEMAX to GDALSetCacheMax64.
    """
    block_h = max(pair.block_shape()[0], tile)
    itemsize = np.dtype(pair.dtype).itemsize if getattr(pair, "dtype", None) else 4
    per_row = pair.width * block_h * max(pair.count, 1) * itemsize * 2  # both dates
    return int(min(max(64, 2 * per_row / 2**20), 4096)) * 2**20


def quantise(prob: np.ndarray, prob_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """A strip's P(change) in the stored dtype (uint8: round(p * 255)) and its validity (not NaN)."""
    valid = ~np.isnan(prob)
    if prob_dtype == "uint8":
        q = np.zeros(prob.shape, dtype=np.uint8)
        np.rint(np.clip(prob, 0.0, 1.0) * 255.0, out=prob, where=valid)
        q[valid] = prob[valid].astype(np.uint8)
        return q, valid
    return prob.astype(np.float32), valid


def journal_blend(journal: Journal) -> BlendStats:
    """The blend statistics of every journaled strip, summed top down (the same order whoever computed them)."""
    total = BlendStats()
    for gr in sorted(journal.done):
        total.add(BlendStats(**journal.done[gr]["stats"]))
    return total


class _BandComputer:
    """One compute stage over a band of adjacent strips (all of them in a fresh single-process run).

    The stitcher starts one row above the band (the last row of the strip before it), so the first strip's
    vertical seam steps and the statistics recorded per strip are those of a single-process run; windows are
    taken from the start of the global batch holding the first window that reaches that row, up to the end
    of the batch holding the band's last window.
    """

    def __init__(self, pair: ScenePair, plan: PredictPlan, journal: Journal, stats: ComputeStats,
                 predictor: Predictor, band: list[StripSpan]) -> None:
        assert plan.grid is not None
        self.pair, self.plan, self.journal, self.stats = pair, plan, journal, stats
        self.grid: WindowGrid = plan.grid
        self.predictor = predictor
        self.first, self.last = band[0].grid_row, band[-1].grid_row
        self.start_row = max(band[0].row0 - 1, 0)
        self.stitcher = StripStitcher(self.grid, start_row=self.start_row)

    def windows(self) -> list[GridWindow]:
        """The band's windows, whole global batches (windows [j*B, (j+1)*B)).

        Batches keep their global composition, so every window is computed exactly as in any other run.
        """
        grid, bsz = self.grid, self.plan.options.batch_size
        k = next(r for r, p in enumerate(grid.row_positions) if p + grid.tile > self.start_row)
        first = (grid.first_window_of_grid_row(k) // bsz) * bsz
        end = grid.first_window_of_grid_row(self.last + 1)
        return grid.windows(first)[: -(-end // bsz) * bsz - first]

    def read_tile(self, w: GridWindow) -> Tile:
        """Read and prepare one window (reflection-padded to the tile where it leaves the scene)."""
        process.fault_point("read")
        grid, tile = self.grid, self.grid.tile
        r0, c0, r1, c1 = w.clip(grid.height, grid.width)
        a, b, valid = self.pair.read(Window(c0, r0, c1 - c0, r1 - r0))
        if not valid.any():
            return None
        a, b = self.predictor.prepare(a, b, valid)
        pads = ((r0 - w.row, w.row + tile - r1), (c0 - w.col, w.col + tile - c1))
        if any(p for pp in pads for p in pp):
            a = np.pad(a, ((0, 0),) + pads, mode="reflect")
            b = np.pad(b, ((0, 0),) + pads, mode="reflect")
            valid = np.pad(valid, pads, mode="constant", constant_values=False)
        return a, b, valid

    def launch(self, tiles: list[Tile]) -> tuple[list[int], PendingProbability | None]:
        """Start the network on the tiles that hold data; returns their indices and the pending result."""
        idx = [i for i, t in enumerate(tiles) if t is not None]
        if not idx:
            return idx, None
        xa = np.stack([tiles[i][0] for i in idx])  # type: ignore[index]
        xb = np.stack([tiles[i][1] for i in idx])  # type: ignore[index]
        return idx, self.predictor.launch(xa, xb)

    def stitch(self, batch: list[GridWindow], tiles: list[Tile], launched: tuple[list[int], Any]) -> None:
        """Blend a finished batch; every grid row it completes in the band goes to the journal as a strip."""
        idx, pending = launched
        probs = {} if pending is None else dict(zip(idx, pending.numpy(), strict=True))
        ncols = len(self.grid.col_positions)
        for i, w in enumerate(batch):
            tile = tiles[i]
            if tile is None:
                self.stats.windows_skipped += 1
            else:
                self.stats.windows_computed += 1
                if w.grid_row <= self.last:  # later windows only complete the batch
                    self.stitcher.add(w, probs[i], tile[2])
            if (w.index + 1) % ncols == 0 and w.grid_row <= self.last:
                self._record(w.grid_row)

    def _record(self, grid_row: int) -> None:
        strip = self.stitcher.finish_grid_row(grid_row)
        if strip is None:
            return
        if grid_row < self.first:  # the context row above the band: another band's strip
            return
        data, valid = quantise(strip.prob, self.plan.options.prob_dtype)
        self.journal.record_strip(strip.grid_row, strip.row0, strip.row1, data, valid, strip.stats.to_dict())
        self.stats.strips += 1
        self.stats.rows += strip.row1 - strip.row0
        process.fault_point("strip")


def compute_strips(pair: ScenePair, plan: PredictPlan, journal: Journal, run: RunOptions,
                   share: list[StripSpan] | None = None) -> ComputeStats:
    """Compute and journal the strips of ``share`` (default: every strip not yet in the journal).

    Returns this process's statistics; ``blend`` covers every strip in the journal.
    """
    from cdmap.progress import Progress

    assert plan.grid is not None
    grid = plan.grid
    stats = ComputeStats(windows_total=len(grid), device=str(plan.device), precision=plan.precision)
    if share is None:
        share = [s for s in strip_spans(grid) if s.grid_row not in journal.done]
    if share:
        if plan.device.type == "cuda":  # deterministic kernels: a resumed run must match the first bit for bit
            import torch

            torch.backends.cudnn.benchmark = False
        predictor = Predictor.from_checkpoint(plan.checkpoint, plan.device, plan.precision,
                                              backend=plan.options.backend)
        comps = [_BandComputer(pair, plan, journal, stats, predictor, band) for band in bands(share)]
        todo = [(c, c.windows()) for c in comps]
        progress = Progress(sum(len(w) for _, w in todo), "predict", pixels_per_unit=grid.stride ** 2,
                            quiet=run.quiet)
        pool = ThreadPoolExecutor(max_workers=run.workers, thread_name_prefix="cdmap-read")
        try:
            for comp, windows in todo:
                _run_band(comp, windows, pool, progress)
        finally:
            progress.close()
            pool.shutdown(wait=True, cancel_futures=True)
        stats.peak_gpu_mib = predictor.peak_memory_mib()
        stats.backend = predictor.backend
        stats.backend_setup_s = predictor.setup_s
    stats.blend = journal_blend(journal)
    return stats


def _run_band(comp: _BandComputer, windows: list[GridWindow], pool: ThreadPoolExecutor, progress: Any) -> None:
    """The pipeline of one band: reads run ``PREFETCH`` batches ahead; batch j is stitched while j+1 computes."""
    bsz = comp.plan.options.batch_size
    batches = [windows[i : i + bsz] for i in range(0, len(windows), bsz)]
    queue: deque[list[Future[Tile]]] = deque()
    for j in range(min(PREFETCH, len(batches))):
        queue.append([pool.submit(comp.read_tile, w) for w in batches[j]])
    pending = None
    for j, batch in enumerate(batches):
        futs = queue.popleft()
        if j + PREFETCH < len(batches):
            queue.append([pool.submit(comp.read_tile, w) for w in batches[j + PREFETCH]])
        tiles = [f.result() for f in futs]
        tm = time.perf_counter()
        launched = comp.launch(tiles)
        if pending is not None:  # the previous batch finishes while this one runs on the device
            comp.stitch(*pending)
            progress.update(len(pending[0]))
        comp.stats.model_s += time.perf_counter() - tm
        pending = (batch, tiles, launched)
    if pending is not None:
        comp.stitch(*pending)
        progress.update(len(pending[0]))


def merge_reports(mine: ComputeStats, reports: list[Any], blend: BlendStats) -> ComputeStats:
    """Rank 0's statistics with every rank's window counts summed and the blend of the whole journal."""
    mine.windows_computed = sum(r.windows_computed for r in reports)
    mine.windows_skipped = sum(r.windows_skipped for r in reports)
    gpu = [r.peak_gpu_mib for r in reports if r.peak_gpu_mib is not None]
    mine.peak_gpu_mib = max(gpu) if gpu else None
    mine.blend = blend
    return mine
