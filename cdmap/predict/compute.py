"""The compute stage: windows of the pair -> :class:`~cdmap.inference.Predictor` in batches -> blended row
strips, each persisted in the journal as soon as it is final.

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
    blend: BlendStats = field(default_factory=BlendStats)
    model_s: float = 0.0
    peak_gpu_mib: float | None = None


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


def _journal_blend(journal: Journal) -> BlendStats:
    total = BlendStats()
    for rec in journal.done.values():
        total.add(BlendStats(**rec["stats"]))
    return total


def _stats_delta(now: BlendStats, before: BlendStats) -> BlendStats:
    return BlendStats(**{k: getattr(now, k) - getattr(before, k) for k in now.__dataclass_fields__})


class _StripComputer:
    """One compute stage over the grid rows not yet in the journal."""

    def __init__(self, pair: ScenePair, plan: PredictPlan, journal: Journal, stats: ComputeStats) -> None:
        assert plan.grid is not None
        self.pair, self.plan, self.journal, self.stats = pair, plan, journal, stats
        self.grid: WindowGrid = plan.grid
        self.predictor = Predictor.from_checkpoint(plan.checkpoint, plan.device, plan.precision)
        self.stitcher = StripStitcher(self.grid, start_row=journal.finished_rows())
        self._last_blend = BlendStats()

    def windows(self) -> list[GridWindow]:
        """Windows still to compute, from the start of a global batch.

        First grid row whose windows reach rows not yet finished; batches keep their global composition
        (windows [j*B, (j+1)*B)), so a resumed run computes every window exactly as the first run did.
        """
        start_row, tile, bsz = self.journal.finished_rows(), self.grid.tile, self.plan.options.batch_size
        k = next(r for r, p in enumerate(self.grid.row_positions) if p + tile > start_row)
        first = self.grid.first_window_of_grid_row(k)
        return self.grid.windows((first // bsz) * bsz)

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
        """Blend a finished batch; every grid row it completes goes to the journal as a strip."""
        idx, pending = launched
        probs = {} if pending is None else dict(zip(idx, pending.numpy(), strict=True))
        ncols = len(self.grid.col_positions)
        for i, w in enumerate(batch):
            tile = tiles[i]
            if tile is None:
                self.stats.windows_skipped += 1
            else:
                self.stats.windows_computed += 1
                self.stitcher.add(w, probs[i], tile[2])
            if (w.index + 1) % ncols == 0:
                self._record(w.grid_row)

    def _record(self, grid_row: int) -> None:
        strip = self.stitcher.finish_grid_row(grid_row)
        if strip is None:
            return
        delta = _stats_delta(self.stitcher.stats, self._last_blend)
        self._last_blend = BlendStats(**self.stitcher.stats.to_dict())
        data, valid = quantise(strip.prob, self.plan.options.prob_dtype)
        self.journal.record_strip(strip.grid_row, strip.row0, strip.row1, data, valid, delta.to_dict())
        process.fault_point("strip")


def compute_strips(pair: ScenePair, plan: PredictPlan, journal: Journal, run: RunOptions) -> ComputeStats:
    """Compute and journal every strip not yet finished; returns the statistics of the whole run."""
    from cdmap.progress import Progress

    assert plan.grid is not None
    grid = plan.grid
    stats = ComputeStats(windows_total=len(grid), device=str(plan.device), precision=plan.precision,
                         blend=_journal_blend(journal))
    if journal.finished_rows() >= grid.height:
        return stats
    if plan.device.type == "cuda":  # deterministic kernels: a resumed run must match the first bit for bit
        import torch

        torch.backends.cudnn.benchmark = False
    comp = _StripComputer(pair, plan, journal, stats)
    windows = comp.windows()
    bsz = plan.options.batch_size
    batches = [windows[i : i + bsz] for i in range(0, len(windows), bsz)]
    progress = Progress(len(grid), "predict", pixels_per_unit=grid.stride ** 2, quiet=run.quiet,
                        initial=windows[0].index if windows else len(grid))
    pool = ThreadPoolExecutor(max_workers=run.workers, thread_name_prefix="cdmap-read")
    queue: deque[list[Future[Tile]]] = deque()
    try:
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
            stats.model_s += time.perf_counter() - tm
            pending = (batch, tiles, launched)
        if pending is not None:
            comp.stitch(*pending)
            progress.update(len(pending[0]))
    finally:
        progress.close()
        pool.shutdown(wait=True, cancel_futures=True)
    stats.peak_gpu_mib = comp.predictor.peak_memory_mib()
    stats.blend = _journal_blend(journal)
    return stats
