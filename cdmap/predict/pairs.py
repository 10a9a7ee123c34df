"""Campaigns: many scene pairs in one run, one output folder each, and ``OUTROOT/index.gpkg`` with a row per
pair (footprint, changed area, polygon count, status, output folder) so the whole campaign is one map layer.

Under ``torchrun`` the pairs are spread over the ranks (largest first, each to the least loaded rank, the same
on every rank); each rank runs its pairs alone and rank 0 writes the index after a gather. A failed pair is a
row with its error and does not stop the others.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cdmap.checkpoint import Checkpoint
from cdmap.errors import CdmapError, InputError, Interrupted, OutputError
from cdmap.predict.options import PredictOptions, RunOptions, split_overrides
from cdmap.predict.outputs import RUN_NAME
from cdmap.weights import load_model

log = logging.getLogger("cdmap.predict")

INDEX_NAME = "index.gpkg"
INDEX_LAYER = "pairs"
FOOTPRINT_POINTS = 16  # points per scene edge: the footprint stays close to the scene's curved outline in 4326


@dataclass(frozen=True)
class PairSpec:
    """One row of the pairs CSV: output folder name and the two scenes (resolved against the CSV's folder)."""

    name: str
    before: Path
    after: Path


@dataclass
class PairOutcome:
    """One row of ``index.gpkg`` (``footprint`` is WKT in EPSG:4326, None when the scene has no CRS)."""

    name: str
    before: str
    after: str
    output: str
    status: str  # done | failed
    error: str | None = None
    exit_code: int = 0
    changed_area_m2: float | None = None
    changed_pixels: int | None = None
    polygons: int | None = None
    width: int | None = None
    height: int | None = None
    total_s: float | None = None
    rank: int = 0
    footprint: str | None = None


@dataclass
class CampaignResult:
    """Where the index is and every pair's outcome, in CSV order."""

    outroot: Path
    index: Path
    pairs: list[PairOutcome]

    @property
    def failed(self) -> list[PairOutcome]:
        return [p for p in self.pairs if p.status != "done"]

    def check(self) -> None:
        """Raise a :class:`CdmapError` with the first failed pair's error and exit code when any pair failed."""
        if self.failed:
            first = self.failed[0]
            err = CdmapError(f"{len(self.failed)} of {len(self.pairs)} pairs failed (see {self.index}); first, "
                             f"{first.name}: {first.error}")
            err.exit_code = first.exit_code
            raise err


def read_pairs(csv_path: str | os.PathLike) -> list[PairSpec]:
    """The pairs of ``csv_path``: columns ``before``, ``after`` and optionally ``name`` (default: the row number
    and BEFORE's stem). Relative paths are relative to the CSV's folder. Raises :class:`InputError`."""
    path = Path(csv_path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
            columns = {c.strip().lower() for c in (rows[0].keys() if rows else [])}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the pairs CSV ({getattr(exc, 'strerror', None) or exc})", path) from exc
    if not rows:
        raise InputError("the pairs CSV has no rows (expected columns before, after and optionally name)", path)
    if not {"before", "after"} <= columns:
        raise InputError(f"the pairs CSV needs columns before and after (found: {', '.join(sorted(columns))})", path)
    specs, seen = [], set()
    for i, raw in enumerate(rows, start=1):
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not row["before"] or not row["after"]:
            raise InputError(f"row {i}: before and after must both be given", path)
        before, after = path.parent.absolute() / row["before"], path.parent.absolute() / row["after"]
        name = row.get("name") or f"{i:04d}_{Path(row['before']).stem}"
        if name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
            raise InputError(f"row {i}: name {name!r} is not a plain folder name", path)
        if name in seen:
            raise InputError(f"row {i}: name {name!r} is used by an earlier row", path)
        seen.add(name)
        specs.append(PairSpec(name, before, after))
    return specs


def assign_pairs(sizes: list[int], world: int) -> list[int]:
    """The rank of each pair: largest first, each to the least loaded rank (ties: lowest rank, CSV order)."""
    load = [0] * world
    ranks = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        ranks[i] = r
        load[r] += max(sizes[i], 1)
    return ranks


def _pixels(path: Path) -> int:
    import rasterio

    try:
        with rasterio.open(path) as ds:
            return ds.width * ds.height
    except Exception:  # noqa: BLE001 - an unreadable scene fails in its own turn, with its own message
        return 0


def footprint_wkt(path: Path) -> str | None:
    """The scene's outline in EPSG:4326 as WKT (edges densified), or None without a CRS or a readable file."""
    import numpy as np
    import rasterio
    import shapely
    from rasterio.warp import transform

    try:
        with rasterio.open(path) as ds:
            if ds.crs is None:
                return None
            crs, t, w, h = ds.crs, ds.transform, ds.width, ds.height
        s = np.linspace(0.0, 1.0, FOOTPRINT_POINTS + 1)[:-1]
        cols = np.concatenate([s * w, np.full_like(s, w), (1 - s) * w, np.zeros_like(s)])
        rows = np.concatenate([np.zeros_like(s), s * h, np.full_like(s, h), (1 - s) * h])
        xs, ys = t * (cols, rows)
        lon, lat = transform(crs, "EPSG:4326", list(xs), list(ys))
        return shapely.Polygon(list(zip(lon, lat, strict=True))).wkt
    except Exception:  # noqa: BLE001 - the footprint is a convenience; the pair's own run reports bad files
        return None


def predict_pairs(
    pairs_csv: str | os.PathLike,
    outroot: str | os.PathLike,
    model: str | os.PathLike | Checkpoint | None = None,
    options: PredictOptions | None = None,
    run: RunOptions | None = None,
    **overrides: Any,
) -> CampaignResult:
    """Run :func:`~cdmap.predict.predict_scene` for every pair of ``pairs_csv`` into ``outroot/<name>/`` and
    write ``outroot/index.gpkg``. With ``resume`` finished pairs are kept and unfinished ones continued.

    Failed pairs are rows of the index (status ``failed`` and the error line), never an exception: check
    :attr:`CampaignResult.failed`. Raises :class:`~cdmap.errors.CdmapError` only for the campaign as a whole
    (unreadable CSV, unusable checkpoint, an index that exists without ``overwrite`` or ``resume``).
    """
    from cdmap.distributed import init_distributed

    opts, run = split_overrides(options, run, overrides)
    opts.check()
    run.check()
    specs = read_pairs(pairs_csv)
    outroot = Path(outroot)
    index = outroot / INDEX_NAME
    dist = init_distributed(opts.device, backend="gloo", timeout_s=run.rank_timeout)
    try:
        dist.main_first(lambda: _prepare_root(outroot, index, run), "the preparation of the output root")
        ckpt = model if isinstance(model, Checkpoint) else load_model(model)
        ranks = assign_pairs([_pixels(s.before) for s in specs], dist.world)
        pair_run = replace(run, quiet=run.quiet or not dist.main)
        mine = [_one_pair(s, outroot, ckpt, opts, pair_run, dist.rank) for s, r in zip(specs, ranks, strict=True)
                if r == dist.rank]
        outcomes = {o.name: o for part in dist.gather(mine, "the end of the pairs") for o in part}
        result = CampaignResult(outroot, index, [outcomes[s.name] for s in specs])
        if dist.main:
            write_index(result)
            done = len(result.pairs) - len(result.failed)
            log.info("%d of %d pairs done; index: %s", done, len(result.pairs), index)
        return result
    finally:
        dist.close()


def _prepare_root(outroot: Path, index: Path, run: RunOptions) -> None:
    if index.exists() and not (run.overwrite or run.resume):
        raise OutputError("output exists and won't be overwritten without --overwrite or --resume", index)
    try:
        outroot.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder ({exc.strerror or exc})", outroot) from exc


def _one_pair(spec: PairSpec, outroot: Path, ckpt: Checkpoint, opts: PredictOptions, run: RunOptions,
              rank: int) -> PairOutcome:
    """Run (or, resuming, keep) one pair; any error but an interruption becomes a failed outcome."""
    from cdmap.predict.scene import predict_one

    out = outroot / spec.name
    outcome = PairOutcome(spec.name, str(spec.before), str(spec.after), spec.name, "done", rank=rank,
                          footprint=footprint_wkt(spec.before))
    t0 = time.perf_counter()
    try:
        if run.resume and (out / RUN_NAME).is_file():
            summary = _finished_summary(out, spec, ckpt)
            log.info("pair %s: already finished, kept", spec.name)
        else:
            summary = predict_one(spec.before, spec.after, out, ckpt, opts, run).summary
    except Interrupted:
        raise
    except CdmapError as exc:
        outcome.status, outcome.error, outcome.exit_code = "failed", str(exc), exc.exit_code
    except Exception as exc:  # noqa: BLE001 - a bug on one pair must not lose the rest of a campaign
        outcome.status, outcome.exit_code = "failed", 1
        outcome.error = f"internal error: {type(exc).__name__}: {exc}"
    if outcome.status == "failed":
        log.warning("pair %s failed: %s", spec.name, outcome.error)
        outcome.total_s = round(time.perf_counter() - t0, 3)
        return outcome
    outcome.changed_area_m2, outcome.changed_pixels = summary["changed_area_m2"], summary["changed_pixels"]
    outcome.polygons, outcome.total_s = summary["polygons"], summary["timings"]["total_s"]
    outcome.width, outcome.height = summary["inputs"]["width"], summary["inputs"]["height"]
    return outcome


def _finished_summary(out: Path, spec: PairSpec, ckpt: Checkpoint) -> dict[str, Any]:
    """run.json of a finished pair, refused (:class:`OutputError`) when it is another run's."""
    try:
        summary = json.loads((out / RUN_NAME).read_text())
        same_inputs = [Path(summary["inputs"][k]).resolve() for k in ("before", "after")] == [
            spec.before.resolve(), spec.after.resolve()]
        same_model = summary["model"]["sha256"] == ckpt.sha256
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(f"unreadable {RUN_NAME} of a finished pair ({exc})", out) from exc
    if not same_inputs or not same_model:
        raise OutputError("finished outputs of other inputs or another checkpoint are here (use --overwrite)",
                          out)
    return summary


def write_index(result: CampaignResult) -> None:
    """``index.gpkg`` (layer ``pairs``, EPSG:4326), written beside and renamed into place."""
    import geopandas as gpd
    import shapely

    rows = [asdict(p) for p in result.pairs]
    wkts = [r.pop("footprint") for r in rows]
    geoms = [shapely.from_wkt(w) if w else None for w in wkts]
    gdf = gpd.GeoDataFrame(rows, geometry=gpd.GeoSeries(geoms, crs="EPSG:4326"), crs="EPSG:4326")
    tmp = result.index.with_name(f".{INDEX_NAME}.tmp.gpkg")
    try:
        tmp.unlink(missing_ok=True)
        gdf.to_file(tmp, driver="GPKG", layer=INDEX_LAYER)
        os.replace(tmp, result.index)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write the index ({exc.strerror or exc})", result.index) from exc
