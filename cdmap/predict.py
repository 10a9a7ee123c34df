"""Scene inference: windows of the pair -> FSG-Net in batches -> blended strips -> rasters, polygons, run.json.

Data flows one way. Reader threads read and normalise windows of both dates while the model runs the
current batch; the stitcher blends predictions in row strips and hands out finished rows, which are
persisted with a journal (so ``resume=True`` continues an interrupted run); finally the rasters are
assembled from the strips, vectorised, and everything is renamed into place at once.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cdmap._version import __version__
from cdmap.checkpoint import Checkpoint, file_sha256, load_checkpoint
from cdmap.device import autocast_dtype, resolve_device, resolve_precision
from cdmap.errors import Interrupted, OutputError, UsageError
from cdmap.journal import WORKDIR_NAME, Journal
from cdmap.tiling import StripStitcher, WindowGrid
from cdmap.tiling.stitch import BlendStats
from cdmap.vector import FORMATS as VECTOR_DRIVERS

PROB_NAME = "change_probability.tif"
MASK_NAME = "change_mask.tif"
RUN_NAME = "run.json"
VECTOR_NAME = "changes"
# format name -> suffix of the file predict writes; the formats themselves are cdmap.vectorize's
VECTOR_FORMATS = {name: suffixes[0] for name, (_driver, suffixes) in VECTOR_DRIVERS.items()} | {"none": None}
MASK_NODATA = 255
ROW_BLOCK = 512
DEFAULT_OVERLAP_FRACTION = 0.125  # chosen from benchmarks/seam_overlap.py (see benchmarks/RESULTS.md)


@dataclass
class PredictOptions:
    """Every knob of :func:`predict_scene`; ``None`` means "from the checkpoint" or a documented default."""

    tile_size: int | None = None
    overlap: int | None = None
    batch_size: int = 4
    device: str = "auto"
    precision: str = "auto"
    bands: list[int] | None = None
    threshold: float | None = None
    min_area: float = 0.0
    simplify: float = 0.0
    prob_dtype: str = "uint8"
    vector_format: str = "gpkg"
    creation_options: dict[str, str] = field(default_factory=dict)
    cog: bool = False
    overwrite: bool = False
    resume: bool = False
    align: str = "auto"
    resampling: str = "bilinear"
    allow_no_crs: bool = False
    workers: int = 2
    quiet: bool = False


@dataclass
class PredictResult:
    """Where the outputs are and the run summary (the content of ``run.json``)."""

    outdir: Path
    probability: Path
    mask: Path
    vectors: Path | None
    run_json: Path
    summary: dict[str, Any]


def default_overlap(tile: int) -> int:
    """Default overlap for a tile size, a multiple of 8."""
    return int(round(tile * DEFAULT_OVERLAP_FRACTION / 8.0)) * 8


def output_paths(outdir: Path, vector_format: str) -> dict[str, Path]:
    """The final output names for ``outdir`` (the shapefile's companion files included)."""
    paths = {"probability": outdir / PROB_NAME, "mask": outdir / MASK_NAME, "run": outdir / RUN_NAME}
    ext = VECTOR_FORMATS[vector_format]
    if ext:
        paths["vectors"] = outdir / f"{VECTOR_NAME}{ext}"
        if vector_format == "shp":
            for e in (".shx", ".dbf", ".prj", ".cpg"):
                paths[f"vectors{e}"] = outdir / f"{VECTOR_NAME}{e}"
    return paths


def _check_options(o: PredictOptions) -> None:
    if o.prob_dtype not in ("uint8", "float32"):
        raise UsageError(f"--prob-dtype must be uint8 or float32, not {o.prob_dtype!r}")
    if o.vector_format not in VECTOR_FORMATS:
        raise UsageError(f"--vector-format must be one of {', '.join(VECTOR_FORMATS)}, not {o.vector_format!r}")
    if o.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UsageError(f"--precision must be auto, fp32, bf16 or fp16, not {o.precision!r}")
    if o.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if o.workers < 1:
        raise UsageError("--workers must be >= 1")
    if o.threshold is not None and not 0.0 <= o.threshold <= 1.0:
        raise UsageError(f"--threshold must be between 0 and 1, not {o.threshold}")
    if o.min_area < 0 or o.simplify < 0:
        raise UsageError("--min-area and --simplify must be >= 0")
    if o.align not in ("auto", "strict"):
        raise UsageError(f"--align must be auto or strict, not {o.align!r}")


def _check_tile_options(tile: int, overlap: int) -> None:
    if tile < 32:
        raise UsageError(f"--tile-size {tile} is too small (minimum 32)")
    if overlap < 0:
        raise UsageError(f"--overlap {overlap} must be >= 0")
    if overlap >= tile:
        raise UsageError(f"--overlap {overlap} must be smaller than the tile size {tile}")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _pixel_area_m2_rows(crs, transform, row0: int, row1: int) -> np.ndarray:
    """Ground area of one pixel for each row in [row0, row1): exact on a sphere for geographic CRSs."""
    n = row1 - row0
    if crs is None:
        return np.full(n, abs(transform.a * transform.e - transform.b * transform.d))
    if crs.is_geographic:
        r = 6371008.8
        lat_top = transform.f + transform.e * np.arange(row0, row1)
        lat_bot = lat_top + transform.e
        dlon = math.radians(abs(transform.a))
        return r * r * dlon * np.abs(np.sin(np.radians(lat_top)) - np.sin(np.radians(lat_bot)))
    unit = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
    return np.full(n, abs(transform.a * transform.e - transform.b * transform.d) * unit * unit)


class _Fd2Capture:
    """Redirects file descriptor 2 to a temporary file (C libraries write there directly)."""

    def start(self) -> _Fd2Capture:
        import tempfile

        self._saved = None
        try:
            sys.stderr.flush()
            self._file = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._file.fileno(), 2)
        except (OSError, ValueError):
            self._saved = None
        return self

    def stop(self, replay: bool) -> str:
        """Restore fd 2; with ``replay`` the captured text is written to the real stderr. Idempotent."""
        if self._saved is None:
            return ""
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._saved = None
        self._file.seek(0)
        text = self._file.read().decode(errors="replace")
        self._file.close()
        if replay and text:
            sys.stderr.write(text)
            sys.stderr.flush()
        return text


class _SignalGuard:
    """Turns SIGINT/SIGTERM into :class:`Interrupted` in the main thread while a run is active."""

    def __enter__(self) -> _SignalGuard:
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    @staticmethod
    def _handle(signum, frame):  # noqa: ARG004
        raise Interrupted(signum)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @staticmethod
    def blocked():
        """Context in which SIGINT/SIGTERM wait (used while renaming outputs into place)."""
        return _Blocked()


class _Blocked:
    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        return self

    def __exit__(self, *exc):
        if threading.current_thread() is threading.main_thread():
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old)


_fault_lock = threading.Lock()
_fault_counts: dict[str, int] = {}


def _fault_point(phase: str) -> None:
    """Test hook: with ``CDMAP_FAULT_INJECT=phase:N`` the process SIGKILLs itself at the N-th ``phase`` point.

    Used by the resume tests to stop a run at exact places (read, strip, assemble, vectorize, commit).
    """
    spec = os.environ.get("CDMAP_FAULT_INJECT")
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want != phase:
        return
    with _fault_lock:
        _fault_counts[phase] = _fault_counts.get(phase, 0) + 1
        if _fault_counts[phase] >= int(n or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def _say(opts: PredictOptions, msg: str) -> None:
    if not opts.quiet:
        print(msg, file=sys.stderr, flush=True)


def predict_scene(
    before: str | os.PathLike,
    after: str | os.PathLike,
    outdir: str | os.PathLike,
    model: str | os.PathLike | Checkpoint,
    options: PredictOptions | None = None,
    **overrides: Any,
) -> PredictResult:
    """Map change between ``before`` and ``after`` into ``outdir``.

    Writes ``change_probability.tif``, ``change_mask.tif``, ``changes.<fmt>`` and ``run.json`` (see the
    README). ``model`` is a checkpoint path or a loaded :class:`Checkpoint`. Keyword overrides are
    :class:`PredictOptions` fields. Raises :class:`cdmap.errors.CdmapError` subclasses on bad input;
    nothing is ever left under a final output name unless the whole run succeeded.
    """
    from cdmap.raster.pair import open_pair

    opts = replace(options or PredictOptions(), **overrides)
    _check_options(opts)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    if isinstance(model, Checkpoint):
        ckpt, ckpt_path, ckpt_hash = model, None, None
    else:
        ckpt_path = Path(model)
        ckpt = load_checkpoint(ckpt_path)
        ckpt_hash = file_sha256(ckpt_path)
    if ckpt_hash is None:  # an in-memory checkpoint: hash the bytes of its tensors (any dtype)
        import hashlib

        import torch

        h = hashlib.sha256()
        for k in sorted(ckpt.state_dict):
            h.update(k.encode())
            h.update(ckpt.state_dict[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        ckpt_hash = h.hexdigest()
    tile = ckpt.tile_size if opts.tile_size is None else opts.tile_size
    overlap = default_overlap(tile) if opts.overlap is None else opts.overlap
    _check_tile_options(tile, overlap)
    threshold = ckpt.threshold if opts.threshold is None else opts.threshold
    outdir = Path(outdir)

    pair = open_pair(
        before, after, bands=opts.bands, expected_bands=ckpt.in_channels, align=opts.align,
        resampling=opts.resampling, allow_no_crs=opts.allow_no_crs,
    )
    try:
        for note in getattr(pair, "notes", []):
            _say(opts, f"cdmap: {note}")
        grid = WindowGrid(pair.height, pair.width, tile, overlap)
        finals = output_paths(outdir, opts.vector_format)
        workdir = outdir / WORKDIR_NAME
        _prepare_outdir(outdir, finals, opts, resuming=opts.resume and (workdir / "journal.jsonl").is_file())
        timings["preflight_s"] = time.perf_counter() - t_start

        manifest = {
            "before": str(Path(before).resolve()),
            "after": str(Path(after).resolve()),
            "inputs_stat": [_stat_key(before), _stat_key(after)],
            "checkpoint_sha256": ckpt_hash,
            "grid": [pair.height, pair.width, tile, overlap],
            "threshold": threshold,
            "cdmap_version": __version__,
        }
        manifest.update({k: v for k, v in asdict(opts).items() if k not in _NOT_IN_MANIFEST})
        _check_free_space(outdir, pair.height * pair.width, opts)
        journal = _open_journal(workdir, manifest, opts)
        t0 = time.perf_counter()
        import rasterio

        # rasterio hands an integer GDAL_CACHEMAX to GDALSetCacheMax64, i.e. in bytes, not MB
        with _SignalGuard(), rasterio.Env(GDAL_CACHEMAX=_gdal_cache_mb(pair, tile) * 2**20):
            compute = _compute(pair, grid, ckpt, journal, opts)
            timings["compute_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            summary = _assemble(pair, grid, journal, finals, opts, compute, threshold=threshold, tile=tile,
                                overlap=overlap, ckpt=ckpt, ckpt_path=ckpt_path, ckpt_hash=ckpt_hash,
                                before=before, after=after, timings=timings, t_start=t_start, t_assemble=t1)
    finally:
        pair.close()
    result = PredictResult(outdir, finals["probability"], finals["mask"], finals.get("vectors"), finals["run"],
                           summary)
    _say(opts, _summary_paragraph(result))
    return result


# options that do not change any output byte may differ between an interrupted run and its resume
_NOT_IN_MANIFEST = {"quiet", "overwrite", "resume", "workers", "tile_size", "overlap", "threshold"}


def _gdal_cache_mb(pair, tile: int) -> int:
    """GDAL block cache sized to the scene width (two rows of windows of both dates and the outputs).

    GDAL's default (5% of RAM) would let the cache, and so memory, grow with the scene area up to that cap.
    """
    block_h = max(pair.block_shape()[0], tile)
    itemsize = np.dtype(pair.dtype).itemsize if getattr(pair, "dtype", None) else 4
    per_row = pair.width * block_h * max(pair.count, 1) * itemsize * 2  # both dates
    return int(min(max(64, 2 * per_row / 2**20), 4096))


def _stat_key(path) -> list:
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def _prepare_outdir(outdir: Path, finals: dict[str, Path], opts: PredictOptions, resuming: bool = False) -> None:
    existing = [p for p in finals.values() if p.exists()]
    # a resumed run may replace outputs that its own interrupted final renaming left behind
    if existing and not opts.overwrite and not (resuming and not finals["run"].exists()):
        raise OutputError(f"output exists and won't be overwritten without --overwrite ({existing[0].name})",
                          outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OutputError("output path exists and is not a directory", outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        probe = outdir / f".cdmap-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"output directory is not writable ({exc.strerror or exc})", outdir) from exc


def _check_free_space(outdir: Path, pixels: int, opts: PredictOptions) -> None:
    """Refuse before any compute when the disk clearly cannot hold the journal strips and the outputs."""
    bytes_px = 1 if opts.prob_dtype == "uint8" else 4
    # strips are stored uncompressed (+1 bit validity); rasters and polygons compress, assume half
    need = pixels * (bytes_px + 0.125) + pixels * (bytes_px + 1) * 0.5
    try:
        free = shutil.disk_usage(outdir).free
    except OSError:
        return
    if free < need:
        raise OutputError(f"not enough free space: about {need / 2**20:.0f} MiB needed, "
                          f"{free / 2**20:.0f} MiB free (No space left on device)", outdir)


def _open_journal(workdir: Path, manifest: dict, opts: PredictOptions) -> Journal:
    existing = Journal.load(workdir) if workdir.exists() else None
    if opts.resume:
        if existing is not None:
            existing.check_matches(manifest)
            _say(opts, f"cdmap: resuming: {existing.finished_rows()} rows already finished")
            return existing
        _say(opts, "cdmap: --resume: no interrupted run found here, starting from the beginning")
    elif existing is not None or workdir.exists():
        _say(opts, "cdmap: discarding an unfinished earlier run in this directory (use --resume to continue one)")
    return Journal.create(workdir, manifest)


@dataclass
class _ComputeStats:
    windows_total: int = 0
    windows_computed: int = 0
    windows_skipped: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    blend: BlendStats = field(default_factory=BlendStats)
    model_s: float = 0.0
    peak_gpu_mib: float | None = None


def _compute(pair, grid: WindowGrid, ckpt: Checkpoint, journal: Journal, opts: PredictOptions) -> _ComputeStats:
    import torch

    device = resolve_device(opts.device)
    precision = resolve_precision(opts.precision, device)
    stats = _ComputeStats(windows_total=len(grid), device=str(device), precision=precision)
    for rec in journal.done.values():
        stats.blend.add(BlendStats(**rec["stats"]))
    start_row = journal.finished_rows()
    if start_row >= grid.height:
        return stats

    net = ckpt.build_model(str(device))
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = False
    dtype = autocast_dtype(precision)
    mean = np.asarray(ckpt.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(ckpt.std, dtype=np.float32)[:, None, None]
    tile = grid.tile
    pin = device.type == "cuda"

    # First grid row whose windows reach rows not yet finished; batches keep their global composition
    # (windows [j*B, (j+1)*B)), so a resumed run computes every window exactly as the first run did.
    k = next(r for r, p in enumerate(grid.row_positions) if p + tile > start_row)
    first = grid.first_window_of_grid_row(k)
    bsz = opts.batch_size
    windows = grid.windows((first // bsz) * bsz)
    ncols = len(grid.col_positions)
    stitcher = StripStitcher(grid, start_row=start_row)
    last_stats = BlendStats()

    def read_tile(w):
        _fault_point("read")
        r0, c0, r1, c1 = w.clip(grid.height, grid.width)
        a, b, valid = pair.read(r0, c0, r1 - r0, c1 - c0)
        if not valid.any():
            return None
        a = (a - mean) / std
        b = (b - mean) / std
        inv = ~valid
        a[:, inv] = 0.0
        b[:, inv] = 0.0
        pads = ((r0 - w.row, w.row + tile - r1), (c0 - w.col, w.col + tile - c1))
        if any(p for pp in pads for p in pp):
            a = np.pad(a, ((0, 0),) + pads, mode="reflect")
            b = np.pad(b, ((0, 0),) + pads, mode="reflect")
            valid = np.pad(valid, pads, mode="constant", constant_values=False)
        return a, b, valid

    def launch(tiles):
        idx = [i for i, t in enumerate(tiles) if t is not None]
        if not idx:
            return idx, None, None
        xa = torch.from_numpy(np.stack([tiles[i][0] for i in idx]))
        xb = torch.from_numpy(np.stack([tiles[i][1] for i in idx]))
        if pin:
            xa, xb = xa.pin_memory(), xb.pin_memory()
        xa = xa.to(device, non_blocking=True)
        xb = xb.to(device, non_blocking=True)
        if device.type == "cuda":
            xa = xa.contiguous(memory_format=torch.channels_last)
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            logits = net(xa, xb)
        prob = torch.softmax(logits.float(), dim=1)[:, 1]
        if device.type == "cuda":
            out = torch.empty(prob.shape, dtype=torch.float32, pin_memory=True)
            out.copy_(prob, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return idx, out, event
        return idx, prob, None

    def stitch(batch, tiles, launched) -> None:
        nonlocal last_stats
        idx, prob, event = launched
        if event is not None:
            event.synchronize()
        probs = {} if prob is None else dict(zip(idx, prob.numpy(), strict=True))
        for i, w in enumerate(batch):
            if tiles[i] is None:
                stats.windows_skipped += 1
            else:
                stats.windows_computed += 1
                stitcher.add(w, probs[i], tiles[i][2])
            if (w.index + 1) % ncols == 0:
                strip = stitcher.finish_grid_row(w.grid_row)
                if strip is not None:
                    delta = _stats_delta(stitcher.stats, last_stats)
                    last_stats = BlendStats(**stitcher.stats.to_dict())
                    data, valid = _quantise(strip.prob, opts.prob_dtype)
                    journal.record_strip(strip.grid_row, strip.row0, strip.row1, data, valid, delta.to_dict())
                    _fault_point("strip")

    from cdmap.progress import Progress

    progress = Progress(len(grid), "predict", pixels_per_unit=grid.stride ** 2, quiet=opts.quiet,
                        initial=windows[0].index if windows else len(grid))
    batches = [windows[i : i + bsz] for i in range(0, len(windows), bsz)]
    prefetch = 2
    pool = ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="cdmap-read")
    queue: deque = deque()
    try:
        for j in range(min(prefetch, len(batches))):
            queue.append([pool.submit(read_tile, w) for w in batches[j]])
        pending = None
        for j, batch in enumerate(batches):
            futs = queue.popleft()
            if j + prefetch < len(batches):
                queue.append([pool.submit(read_tile, w) for w in batches[j + prefetch]])
            tiles = [f.result() for f in futs]
            tm = time.perf_counter()
            launched = launch(tiles)
            if pending is not None:
                stitch(*pending)
                progress.update(len(pending[0]))
            stats.model_s += time.perf_counter() - tm
            pending = (batch, tiles, launched)
        if pending is not None:
            stitch(*pending)
            progress.update(len(pending[0]))
    finally:
        progress.close()
        pool.shutdown(wait=True, cancel_futures=True)
    if device.type == "cuda":
        stats.peak_gpu_mib = torch.cuda.max_memory_allocated(device) / 2**20
    stats.blend = BlendStats()
    for rec in journal.done.values():
        stats.blend.add(BlendStats(**rec["stats"]))
    return stats


def _stats_delta(now: BlendStats, before: BlendStats) -> BlendStats:
    return BlendStats(**{k: getattr(now, k) - getattr(before, k) for k in now.__dataclass_fields__})


def _quantise(prob: np.ndarray, prob_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    valid = ~np.isnan(prob)
    if prob_dtype == "uint8":
        q = np.zeros(prob.shape, dtype=np.uint8)
        np.rint(np.clip(prob, 0.0, 1.0) * 255.0, out=prob, where=valid)
        q[valid] = prob[valid].astype(np.uint8)
        return q, valid
    return prob.astype(np.float32), valid


def change_mask(data: np.ndarray, valid: np.ndarray, threshold: float, prob_dtype: str) -> np.ndarray:
    """The binary mask stored in ``change_mask.tif``: 1 change, 0 no change, 255 nodata.

    It is computed from the *stored* probability, so ``cdmap vectorize change_probability.tif
    --threshold T`` reproduces it exactly.
    """
    p = data.astype(np.float64) * (1.0 / 255.0) if prob_dtype == "uint8" else data.astype(np.float64)
    mask = (p >= threshold - 1e-9).astype(np.uint8)  # same tolerance as cdmap.vectorize for k/255 levels
    mask[~valid] = MASK_NODATA
    return mask


def _assemble(pair, grid, journal: Journal, finals, opts: PredictOptions, compute: _ComputeStats, *,
              threshold, tile, overlap, ckpt, ckpt_path, ckpt_hash, before, after, timings, t_start,
              t_assemble) -> dict[str, Any]:
    from cdmap.raster.write import RasterWriter, to_cog

    work = journal.workdir
    tmp = {"probability": work / PROB_NAME, "mask": work / MASK_NAME}
    tags = {
        "CDMAP_VERSION": __version__,
        "CDMAP_CHECKPOINT_SHA256": ckpt_hash,
        "CDMAP_TILE_SIZE": str(tile),
        "CDMAP_OVERLAP": str(overlap),
        "CDMAP_PRECISION": compute.precision,
        "CDMAP_THRESHOLD": f"{threshold:.6g}",
        "CDMAP_BEFORE": Path(before).name,
        "CDMAP_AFTER": Path(after).name,
        "CDMAP_ALIGNMENT": str(getattr(pair, "alignment", {}).get("mode", "same-grid")),
    }
    is_u8 = opts.prob_dtype == "uint8"
    common = dict(width=grid.width, height=grid.height, crs=pair.crs, transform=pair.transform,
                  creation_options=opts.creation_options)
    # GDAL/libtiff print some write errors (disk full) straight to fd 2; keep them out of the one-line error
    cap = _Fd2Capture().start()
    rasters_ok = False
    prob_w = RasterWriter(tmp["probability"], dtype=opts.prob_dtype, nodata=None if is_u8 else float("nan"),
                          scale=1.0 / 255.0 if is_u8 else None, offset=0.0 if is_u8 else None,
                          tags={**tags, "CDMAP_CONTENT": "probability of change"},
                          description="P(change)", mask_band=is_u8, **common)
    mask_w = RasterWriter(tmp["mask"], dtype="uint8", nodata=MASK_NODATA,
                          tags={**tags, "CDMAP_CONTENT": "change mask: 1 change, 0 no change, 255 nodata"},
                          description="change mask", **common)
    changed_px = 0
    valid_px = 0
    changed_area = 0.0
    try:
        with prob_w, mask_w:
            buf_d, buf_v, buf_row = [], [], 0
            rows_buffered = 0
            for gr in sorted(journal.done):
                data, valid = journal.read_strip(gr)
                buf_d.append(data)
                buf_v.append(valid)
                rows_buffered += data.shape[0]
                last = gr == max(journal.done)
                while rows_buffered >= ROW_BLOCK or (last and rows_buffered):
                    d = np.concatenate(buf_d)
                    v = np.concatenate(buf_v)
                    n = min(ROW_BLOCK, d.shape[0])
                    m = change_mask(d[:n], v[:n], threshold, opts.prob_dtype)
                    prob_w.write_rows(buf_row, d[:n])
                    if is_u8:
                        prob_w.write_mask_rows(buf_row, v[:n])
                    mask_w.write_rows(buf_row, m)
                    _fault_point("assemble")
                    is_change = m == 1
                    changed_px += int(is_change.sum())
                    valid_px += int(v[:n].sum())
                    changed_area += float(
                        (is_change.sum(axis=1) * _pixel_area_m2_rows(pair.crs, pair.transform, buf_row,
                                                                     buf_row + n)).sum())
                    buf_row += n
                    buf_d, buf_v = [d[n:]], [v[n:]]
                    rows_buffered = d.shape[0] - n
            if buf_row != grid.height:
                raise RuntimeError(f"assembled {buf_row} of {grid.height} rows")  # journal bug guard
            prob_w.build_overviews("average")
            mask_w.build_overviews("nearest")
        if opts.cog:
            for key in ("probability", "mask"):
                cog = tmp[key].with_name(tmp[key].stem + ".cog.tif")
                to_cog(tmp[key], cog, creation_options=opts.creation_options)
                os.replace(cog, tmp[key])
        timings["rasters_s"] = time.perf_counter() - t_assemble
        rasters_ok = True
        cap.stop(replay=True)

        vec_stats = None
        tmp_vec = None
        if opts.vector_format != "none":
            from cdmap.vector import vectorize_raster

            t_v = time.perf_counter()
            _fault_point("vectorize")
            vec_dir = work / "vector"
            shutil.rmtree(vec_dir, ignore_errors=True)  # leftovers of an interrupted run
            vec_dir.mkdir()
            tmp_vec = vec_dir / finals["vectors"].name
            vec_stats = vectorize_raster(tmp["mask"], tmp_vec, prob_raster=tmp["probability"],
                                         min_area=opts.min_area, simplify=opts.simplify,
                                         vector_format=opts.vector_format, overwrite=True)
            timings["vectorize_s"] = time.perf_counter() - t_v
        timings["total_s"] = time.perf_counter() - t_start
        total_px = grid.height * grid.width
        summary = {
            "cdmap_version": __version__,
            "inputs": {"before": str(before), "after": str(after),
                       "width": grid.width, "height": grid.height, "bands": pair.count,
                       "crs": pair.crs.to_string() if pair.crs else None,
                       "transform": list(pair.transform)[:6]},
            "alignment": getattr(pair, "alignment", {"mode": "same-grid"}),
            "options": {k: v for k, v in asdict(opts).items() if k not in ("quiet",)}
            | {"tile_size": tile, "overlap": overlap, "blend_margin": grid.blend_margin, "threshold": threshold},
            "model": {"checkpoint": str(ckpt_path) if ckpt_path else None, "sha256": ckpt_hash,
                      "config": ckpt.model_config.to_dict(), "trained_tile_size": ckpt.tile_size},
            "device": compute.device,
            "precision": compute.precision,
            "windows": {"total": compute.windows_total, "computed": compute.windows_computed,
                        "skipped_nodata": compute.windows_skipped},
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "mpix_per_s": round(total_px / 1e6 / timings["total_s"], 4) if timings["total_s"] else None,
            "peak_rss_mib": round(_peak_rss_mib(), 1),
            "peak_gpu_mib": compute.peak_gpu_mib,
            "valid_pixels": valid_px,
            "changed_pixels": changed_px,
            "changed_area_m2": round(changed_area, 3),
            "polygons": vec_stats.n_polygons if vec_stats else None,
            "seam_ratio": compute.blend.seam_ratio,
            "overlap_disagreement": compute.blend.overlap_disagreement,
            "outputs": {k: str(v) for k, v in finals.items() if not k.startswith("vectors.")},
        }
        tmp_run = work / RUN_NAME
        tmp_run.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        with _SignalGuard.blocked():
            moves = [(tmp["probability"], finals["probability"]), (tmp["mask"], finals["mask"])]
            if tmp_vec is not None:
                for f in sorted(tmp_vec.parent.iterdir()):
                    moves.append((f, finals["vectors"].with_name(f.name)))
            moves.append((tmp_run, finals["run"]))  # last: run.json marks a complete run
            for src, dst in moves:
                os.replace(src, dst)
                _fault_point("commit")
            journal.remove()
    except OSError as exc:
        raise OutputError(f"cannot write outputs: {exc.strerror or exc}", journal.workdir.parent) from exc
    finally:
        cap.stop(replay=rasters_ok)
    return summary


def _summary_paragraph(r: PredictResult) -> str:
    s = r.summary
    seam = s["seam_ratio"]
    lines = (
        f"cdmap: {s['inputs']['width']}x{s['inputs']['height']} px in {s['timings']['total_s']:.1f} s "
        f"({s['mpix_per_s']:.2f} MPix/s on {s['device']}, {s['precision']}); "
        f"{s['changed_pixels']} changed px ({s['changed_area_m2']:.1f} m2)"
        + (f" in {s['polygons']} polygons" if s["polygons"] is not None else "")
        + (f"; seam ratio {seam:.3f}" if seam is not None else "")
        + f". Outputs in {r.outdir}: {PROB_NAME}, {MASK_NAME}"
        + (f", {r.vectors.name}" if r.vectors else "")
        + f", {RUN_NAME}."
    )
    return lines
