"""The plan of a run, resolved once from the options and the checkpoint: window size, overlap, threshold,
device, precision and (once the pair is open) the window grid; and the manifest a resume must match."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any

from cdmap._version import __version__
from cdmap.checkpoint import Checkpoint
from cdmap.errors import UsageError
from cdmap.predict.options import PredictOptions
from cdmap.raster.identity import display_path, input_identity
from cdmap.tiling import WindowGrid
from cdmap.tiling.stitch import SEAM_METRIC

DEFAULT_OVERLAP_FRACTION = 0.125  # chosen from benchmarks/seam_overlap.py (see benchmarks/RESULTS.md)


def default_overlap(tile: int) -> int:
    """Default overlap for a tile size, a multiple of 8."""
    return int(round(tile * DEFAULT_OVERLAP_FRACTION / 8.0)) * 8


@dataclass(frozen=True)
class PredictPlan:
    """``options`` with ``tile_size``, ``overlap`` and ``threshold`` resolved (never None), the checkpoint,
    the resolved device and precision, and the window grid (None until :meth:`on_grid`)."""

    options: PredictOptions
    checkpoint: Checkpoint
    device: Any  # torch.device
    precision: str
    grid: WindowGrid | None = None

    @property
    def tile(self) -> int:
        assert self.options.tile_size is not None
        return self.options.tile_size

    @property
    def overlap(self) -> int:
        assert self.options.overlap is not None
        return self.options.overlap

    @property
    def threshold(self) -> float:
        assert self.options.threshold is not None
        return self.options.threshold

    @property
    def margin(self) -> int | None:
        """The checkpoint's measured blend margin when the overlap is its measured one, else None (overlap/4)."""
        ck = self.checkpoint
        if ck.blend_margin is not None and self.overlap == ck.overlap and self.tile == ck.tile_size:
            return ck.blend_margin
        return None

    def on_grid(self, height: int, width: int) -> PredictPlan:
        """This plan with the window grid over a ``height`` x ``width`` scene."""
        return replace(self, grid=WindowGrid(height, width, self.tile, self.overlap, self.margin))

    def for_rank(self, local_rank: int, world: int) -> PredictPlan:
        """This plan on ``cuda:LOCAL_RANK`` for a rank of a torchrun job, unless the device names one GPU."""
        if world <= 1 or self.device.type != "cuda" or self.options.device not in ("auto", "cuda"):
            return self
        import torch

        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"torchrun started local rank {local_rank} but only {torch.cuda.device_count()} "
                             "GPU(s) are visible: use --nproc-per-node <= the number of GPUs, or --device cpu")
        return replace(self, device=torch.device("cuda", local_rank))

    def manifest(self, before: str | os.PathLike, after: str | os.PathLike,
                 identities: tuple[dict[str, Any], dict[str, Any]] | None = None) -> dict[str, Any]:
        """What an interrupted run and its resume must share: inputs, checkpoint, grid, version and options.

        Inputs are identified by :func:`cdmap.raster.identity.input_identity` (any GDAL path, local or not,
        with a sampled content hash of local files); ``identities`` are those of ``before`` and ``after`` when
        already known.
        """
        assert self.grid is not None
        if identities is None:
            identities = (input_identity(before), input_identity(after))
        return {
            "before": display_path(before),
            "after": display_path(after),
            "inputs": list(identities),
            "checkpoint_sha256": self.checkpoint.sha256,
            "grid": [self.grid.height, self.grid.width, self.tile, self.overlap, self.grid.blend_margin],
            "seam_metric": SEAM_METRIC,
            "cdmap_version": __version__,
        } | asdict(self.options)


def make_plan(options: PredictOptions, ckpt: Checkpoint) -> PredictPlan:
    """Resolve ``options`` against ``ckpt`` and validate the result (:class:`UsageError`)."""
    from cdmap.device import resolve_device, resolve_precision

    tile = ckpt.tile_size if options.tile_size is None else options.tile_size
    overlap = options.overlap
    if overlap is None:  # the checkpoint's measured overlap (cdmap calibrate) holds for its own tile size
        overlap = ckpt.overlap if ckpt.overlap is not None and tile == ckpt.tile_size else default_overlap(tile)
    _check_tile_options(tile, overlap)
    threshold = ckpt.threshold if options.threshold is None else options.threshold
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    resolved = replace(options, tile_size=tile, overlap=overlap, threshold=threshold)
    return PredictPlan(resolved, ckpt, device, precision)


def _check_tile_options(tile: int, overlap: int) -> None:
    if tile < 32:
        raise UsageError(f"--tile-size {tile} is too small (minimum 32)")
    if overlap < 0:
        raise UsageError(f"--overlap {overlap} must be >= 0")
    if overlap >= tile:
        raise UsageError(f"--overlap {overlap} must be smaller than the tile size {tile}")
