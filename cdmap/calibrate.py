"""Overlap and blend margin as a measured property of a checkpoint.

A model's output near a window edge differs from its output on the same pixels deep inside another window; how
much, and how far in, depends on the model (a weakly trained one shows the window grid where a well-trained one
does not). :func:`edge_profile` measures that difference by distance from the window edge, and its depth is one
more margin to try. :func:`calibrate` blends the model's windows over validation tiles (mirrored out to a few
windows a side) at candidate overlaps and margins, scores each result with the run's own seam ratio
(:class:`cdmap.tiling.stitch.BlendStats`) and keeps the cheapest candidate whose ratio is <= :data:`TARGET_RATIO`.
:func:`calibrate_checkpoint` stores it in the checkpoint, where ``predict`` picks it up.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cdmap.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cdmap.inference import Predictor
from cdmap.tiling import StripStitcher, WindowGrid
from cdmap.tiling.stitch import BlendStats

log = logging.getLogger("cdmap")

TARGET_RATIO = 1.1
SCENE_WINDOWS = 3  # a validation scene is at least this many windows a side: cheap on CPU, seams on both axes


@dataclass(frozen=True)
class SeamCalibration:
    """The chosen overlap and margin, the seam ratio they gave and every candidate's ratio."""

    tile: int
    overlap: int
    margin: int
    seam_ratio: float | None
    candidates: list[dict[str, Any]]
    scenes: int
    edge: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"tile": self.tile, "overlap": self.overlap, "margin": self.margin, "seam_ratio": self.seam_ratio,
                "target": TARGET_RATIO, "scenes": self.scenes, "edge": self.edge, "candidates": self.candidates}


def candidates(tile: int, edge_depth: int | None = None) -> list[tuple[int, int]]:
    """(overlap, margin) pairs in order of cost: overlaps tile/8 .. tile/2 (multiples of 8), each with a margin
    of overlap/4, then ``edge_depth`` (when it lies between), then overlap/2 (how much of the window edge is
    thrown away)."""
    out: list[tuple[int, int]] = []
    for frac in (0.125, 0.25, 0.375, 0.5):
        ov = max(8, int(round(tile * frac / 8.0)) * 8)
        if ov >= tile:
            continue
        margins = [ov // 4] + ([edge_depth] if edge_depth is not None and ov // 4 < edge_depth < ov // 2 else [])
        for m in margins + [ov // 2]:
            if (ov, m) not in out:
                out.append((ov, m))
    return out


def _window_probs(predictor: Predictor, scene: tuple[np.ndarray, np.ndarray, np.ndarray], grid: WindowGrid,
                  batch_size: int):
    """Yield (window, P(change) of the window, its validity) over ``grid``, reflection-padded as predict pads."""
    a, b, valid = scene
    tile = grid.tile
    pa, pb = predictor.prepare(a, b, valid)
    pad = ((0, 0), (tile, tile), (tile, tile))
    pa, pb = np.pad(pa, pad, mode="reflect"), np.pad(pb, pad, mode="reflect")
    pv = np.pad(valid, tile, mode="constant", constant_values=False)
    windows = list(grid)
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        cuts = [(slice(None), slice(x.row + tile, x.row + 2 * tile), slice(x.col + tile, x.col + 2 * tile))
                for x in batch]
        probs = predictor.probability(np.stack([pa[c] for c in cuts]), np.stack([pb[c] for c in cuts]))
        for x, c, p in zip(batch, cuts, probs.float().cpu().numpy(), strict=True):
            yield x, p, pv[c[1:]]


EDGE_STEP = 4  # pixels of window depth per bin of the edge profile


def edge_profile(predictor: Predictor, scenes_: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], tile: int,
                 batch_size: int = 4) -> dict[str, Any]:
    """How far from a window edge the model's output differs from its output on the same pixels deeper inside
    another window: windows at half-tile stride cover every pixel at complementary depths; for each pixel the
    deepest window's P(change) is the reference, and the others' mean |P - reference| is binned by their depth
    (pixels from the nearest window edge) up to tile/4. ``depth`` is the first depth from which the difference
    stays within 1.5x of the difference at tile/4 and within 0.01 above it: what a margin has to throw away."""
    half = tile // 2
    sums = np.zeros(half, dtype=np.float64)
    counts = np.zeros(half, dtype=np.int64)
    d1 = np.minimum(np.arange(tile), np.arange(tile)[::-1])
    depth_map = np.minimum.outer(d1, d1)
    for scene in scenes_:
        h, w = scene[2].shape
        grid = WindowGrid(h, w, tile, half, 0)
        seen = list(_window_probs(predictor, scene, grid, batch_size))
        best_d = np.full((h, w), -1, dtype=np.int64)
        best_p = np.zeros((h, w), dtype=np.float32)
        for x, p, v in seen:
            r0, c0, r1, c1 = x.clip(h, w)
            sl = (slice(r0 - x.row, r1 - x.row), slice(c0 - x.col, c1 - x.col))
            d, pp, vv = depth_map[sl], p[sl], v[sl]
            bd, bp = best_d[r0:r1, c0:c1], best_p[r0:r1, c0:c1]
            take = vv & (d > bd)
            bd[take], bp[take] = d[take], pp[take]
        for x, p, v in seen:
            r0, c0, r1, c1 = x.clip(h, w)
            sl = (slice(r0 - x.row, r1 - x.row), slice(c0 - x.col, c1 - x.col))
            d, pp, vv = depth_map[sl], p[sl], v[sl]
            other = vv & (d < best_d[r0:r1, c0:c1])
            np.add.at(sums, d[other], np.abs(pp[other] - best_p[r0:r1, c0:c1][other]))
            np.add.at(counts, d[other], 1)
    edges = list(range(0, tile // 4 + 1, EDGE_STEP))
    prof = [float(sums[lo:hi].sum() / counts[lo:hi].sum()) if counts[lo:hi].sum() else None
            for lo, hi in zip(edges[:-1], edges[1:], strict=False)]
    known = [(i, e) for i, e in enumerate(prof) if e is not None]
    depth = None
    if known:
        floor = known[-1][1]
        depth = 0
        for i, e in reversed(known):
            if e > 1.5 * floor and e > floor + 0.01:
                depth = (i + 1) * EDGE_STEP
                break
    return {"bin_px": EDGE_STEP, "mean_abs_diff": prof, "depth": depth}


def scenes(images: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], tile: int
           ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each validation pair ``(a, b, valid)`` mirrored out to at least :data:`SCENE_WINDOWS` windows a side, so
    it holds interior seams even when it is one tile (content stays continuous across the mirror lines)."""
    out = []
    for a, b, v in images:
        need = [max(0, SCENE_WINDOWS * tile - n) for n in v.shape]
        pad = ((0, need[0]), (0, need[1]))
        out.append((np.pad(a, ((0, 0), *pad), mode="symmetric"), np.pad(b, ((0, 0), *pad), mode="symmetric"),
                    np.pad(v, pad, mode="symmetric")))
    return out


def seam_stats(predictor: Predictor, scene: tuple[np.ndarray, np.ndarray, np.ndarray], tile: int, overlap: int,
               margin: int | None = None, batch_size: int = 4) -> BlendStats:
    """The blend statistics of ``scene`` (raw ``a``, ``b``, ``valid``) predicted with this grid, blended as
    predict blends (reflection padding at the scene edge, the same stitcher)."""
    h, w = scene[2].shape
    grid = WindowGrid(h, w, tile, overlap, margin)
    stitcher = StripStitcher(grid)
    ncols = len(grid.col_positions)
    for x, p, v in _window_probs(predictor, scene, grid, batch_size):
        stitcher.add(x, p, v)
        if (x.index + 1) % ncols == 0:
            stitcher.finish_grid_row(x.grid_row)
    return stitcher.stats


def seam_ratio(predictor: Predictor, scenes_: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], tile: int,
               overlap: int, margin: int | None = None, batch_size: int = 4) -> float | None:
    """The seam ratio of all ``scenes_`` together (their blend statistics summed)."""
    total = BlendStats()
    for scene in scenes_:
        total.add(seam_stats(predictor, scene, tile, overlap, margin, batch_size))
    return total.seam_ratio


def calibrate(ckpt: Checkpoint, images: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
              device: Any = "auto", precision: str = "auto", batch_size: int = 4) -> SeamCalibration:
    """:func:`choose` with the checkpoint's network at its tile size."""
    return choose(Predictor.from_checkpoint(ckpt, device, precision), ckpt.tile_size, images, batch_size)


def choose(predictor: Predictor, tile: int, images: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
           batch_size: int = 4) -> SeamCalibration:
    """Measure the :func:`edge_profile` (on the first scene), then the seam ratio at overlap 0 and at each of
    :func:`candidates` (in order, stopping at the first one <= :data:`TARGET_RATIO`) on :func:`scenes` of
    ``images``; the lowest ratio wins when none reaches it."""
    scene = scenes(images, tile)
    edge = edge_profile(predictor, scene[:1], tile, batch_size)
    rows: list[dict[str, Any]] = [{"overlap": 0, "margin": 0,
                                   "seam_ratio": seam_ratio(predictor, scene, tile, 0, 0, batch_size)}]
    chosen = None
    for ov, m in candidates(tile, edge["depth"]):
        ratio = seam_ratio(predictor, scene, tile, ov, m, batch_size)
        rows.append({"overlap": ov, "margin": m, "seam_ratio": ratio})
        log.debug("seam ratio at overlap %d, margin %d: %s", ov, m, ratio)
        if ratio is not None and ratio <= TARGET_RATIO:
            chosen = rows[-1]
            break
    if chosen is None:
        scored = [r for r in rows[1:] if r["seam_ratio"] is not None]
        chosen = min(scored, key=lambda r: r["seam_ratio"]) if scored else rows[1]
        log.warning("no overlap up to tile/2 brings the seam ratio to %.2f on the validation tiles; using "
                    "overlap %d, margin %d (seam ratio %s)", TARGET_RATIO, chosen["overlap"], chosen["margin"],
                    _fmt(chosen["seam_ratio"]))
    return SeamCalibration(tile, chosen["overlap"], chosen["margin"], chosen["seam_ratio"], rows, len(scene), edge)


def with_calibration(ckpt: Checkpoint, cal: SeamCalibration) -> Checkpoint:
    """A copy of ``ckpt`` carrying the calibrated overlap and margin (no file until saved)."""
    return replace(ckpt, overlap=cal.overlap, blend_margin=cal.margin, seam_calibration=cal.to_dict())


def validation_images(data_dir: str | Path, ckpt: Checkpoint, split: str | None = "val", limit: int = 8
                      ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Up to ``limit`` raw ``(a, b, valid)`` pairs of a data folder's split (a flat folder is used whole)."""
    from cdmap.data import layout_of, load_split

    split = split if layout_of(data_dir) == "split" else None
    return read_pairs(load_split(data_dir, split, expected_bands=ckpt.in_channels)[:limit], ckpt)


def read_pairs(pairs: Sequence[Any], ckpt: Checkpoint) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Raw ``(a, b, valid)`` of labelled pairs (:class:`cdmap.data.PairFiles`), valid where both dates are."""
    from cdmap.data import no_georef_warning, read_image

    out = []
    with no_georef_warning():  # labelled tiles are often PNGs: a pixel grid is what they are meant to be
        for p in pairs:
            a, a_bad = read_image(p.a, bands=ckpt.in_channels)
            b, b_bad = read_image(p.b, bands=ckpt.in_channels)
            out.append((a, b, ~(a_bad | b_bad)))
    return out


def calibrate_file(path: str | Path, pairs: Sequence[Any], device: Any = "auto", precision: str = "auto",
                   limit: int = 4) -> SeamCalibration:
    """Calibrate the checkpoint file at ``path`` in place on up to ``limit`` of ``pairs`` (training's last step)."""
    ckpt = load_checkpoint(path)
    cal = calibrate(ckpt, read_pairs(list(pairs)[:limit], ckpt), device, precision)
    save_checkpoint(with_calibration(ckpt, cal), path)
    log.info("seams: overlap %d, margin %d measured for %s (seam ratio %s, overlap 0: %s)", cal.overlap,
             cal.margin, Path(path).name, _fmt(cal.seam_ratio), _fmt(cal.candidates[0]["seam_ratio"]))
    return cal


def _fmt(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}"


def calibrate_checkpoint(model: str | Path, data_dir: str | Path, split: str | None = "val",
                         output: str | Path | None = None, device: str = "auto", precision: str = "auto",
                         batch_size: int = 4, limit: int = 8) -> tuple[Path, SeamCalibration]:
    """Calibrate the checkpoint ``model`` (a file, or a packaged name with ``output``) on up to ``limit`` pairs
    of ``data_dir``'s ``split`` and save it (to ``output``, default in place, atomically). Returns the written
    path and the calibration."""
    from cdmap.errors import UsageError
    from cdmap.weights import FOLDER, model_path

    path = model_path(model)
    if output is None and path.resolve().parent == FOLDER.resolve():
        raise UsageError(f"{model} is a packaged model: write the calibrated copy with --output FILE")
    if limit < 1:
        raise UsageError("--limit must be >= 1")
    ckpt = load_checkpoint(path)
    cal = calibrate(ckpt, validation_images(data_dir, ckpt, split, limit), device, precision, batch_size)
    written = save_checkpoint(with_calibration(ckpt, cal), output or path)
    return written, cal
