"""Labelled tile folders: discovery and checks, reading images and labels, whole-tile evaluation datasets.

Below both :mod:`cdmap.train` and :mod:`cdmap.evaluate`.

Layouts
-------
- split: ``DATA/{train,val,test}/{A,B,label}/`` (the LEVIR-CD layout);
- flat: ``DATA/{A,B,label}/``, split into train/val by ``val_fraction`` with a fixed seed.

Files are matched by name stem, so ``A/x.tif`` pairs with ``B/x.tif`` and ``label/x.png``. Images may be PNG,
JPEG or GeoTIFF with any band count and dtype; all images of a data set must have the same band count.

Bands and validity: an image's data bands are all its bands but an alpha band, which is a validity mask, not
data, exactly as predict treats a scene without ``--bands`` (:func:`cdmap.raster.pair.open_pair`). The one
exception is the same as predict's: when the model expects exactly as many bands as the file has (``--in-channels``
in training, the checkpoint's band count in evaluation) the alpha-tagged band is read as data (GDAL tags the 4th
band of a 4-band Byte GeoTIFF as alpha by default, and RGB+NIR is more likely than RGBA). Validity follows the
project's one rule, :func:`cdmap.raster.valid.read_valid` (nodata value, internal mask band, alpha band, per-band
masks, non-finite values), so a tile pixel is invalid exactly where predict would treat it as nodata.

Labels: band 1 is read (a 3-channel label uses channel 0) and decoded by the project's one label rule,
:mod:`cdmap.labels`: 0/1 or 0/255, or the two values of ``label_values`` (``--label-values 1,2`` for OSCD's
1 = no change, 2 = change); anything else is refused, per file, and a data set whose labels hold nothing but 1
is refused as ambiguous. ``ignore_index`` marks pixels that count in no loss or metric; pixels where either
image is invalid are ignored as well.

Internally a label is uint8: 0 no change, 1 change, :data:`IGNORE_INDEX` (255) ignored.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdmap.errors import InputError, UsageError
from cdmap.inference import Normalisation
from cdmap.labels import IGNORE_INDEX, distinct_values, label_problem, read_labels
from cdmap.raster.valid import data_bands, mask_kinds, read_valid

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
SUBDIRS = ("A", "B", "label")
MAX_LISTED = 5


@dataclass(frozen=True)
class PairFiles:
    """One (A, B, label) triplet and its raster size and data band count (filled in by validation)."""

    name: str
    a: Path
    b: Path
    label: Path
    height: int = 0
    width: int = 0
    bands: int = 0


@dataclass
class DataSplits:
    """Validated training and validation pairs."""

    layout: str
    train: list[PairFiles]
    val: list[PairFiles]
    bands: int
    gsd_m: list[float] | None = None
    """[min, max] pixel size (m) of the georeferenced training images (a sample of them), None without CRS."""


# ----- reading ---------------------------------------------------------------------------------------------------
def _open(path: Path) -> Any:
    import rasterio

    return rasterio.open(path)


@contextlib.contextmanager
def no_georef_warning() -> Iterator[None]:
    """Silence rasterio's NotGeoreferencedWarning (PNG/JPEG tiles). Enter it from the main thread only:
    ``warnings.catch_warnings`` is process-global, so thread pools run inside one such block."""
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=rasterio.errors.NotGeoreferencedWarning)
        yield


def read_dataset(src: Any, window: Any = None, bands: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read the data bands of an open image (window) as float32 ``(C, h, w)`` and its validity ``(h, w)``.

    ``bands``: the expected data band count (see :func:`cdmap.raster.valid.data_bands`); validity is
    :func:`read_valid`'s.
    """
    sel, alpha_is_data = data_bands(src, bands)
    return read_valid(src, sel, window, mask_kinds(src, sel, alpha_is_data))


def read_image(path: Path, window: Any = None, bands: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read an image (window) as float32 (C, h, w) and its *invalid* mask (h, w) (see :func:`read_dataset`)."""
    import rasterio

    try:
        with rasterio.open(path) as src:
            data, valid = read_dataset(src, window, bands)
    except rasterio.errors.RasterioError as exc:
        raise InputError(f"cannot read image: {exc}", path) from exc
    return data, ~valid


def read_label(path: Path, window: Any = None, ignore_index: int | None = None,
               label_values: tuple[int, int] | None = None) -> np.ndarray:
    """Read band 1 of a label (window) as internal uint8: 0, 1 or IGNORE_INDEX (:func:`cdmap.labels.read_labels`)."""
    import rasterio

    try:
        with rasterio.open(path) as src:
            raw = src.read(1, window=window)
    except rasterio.errors.RasterioError as exc:
        raise InputError(f"cannot read label: {exc}", path) from exc
    return read_labels(raw, path, label_values, ignore_index)


def read_sample(pair: PairFiles, window: Any, norm: Normalisation,
                ignore_index: int | None,
                label_values: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both dates of ``pair`` (window) normalised, and the label with IGNORE_INDEX where either date is invalid."""
    with no_georef_warning():
        a, bad_a = read_image(pair.a, window, pair.bands)
        b, bad_b = read_image(pair.b, window, pair.bands)
        label = read_label(pair.label, window, ignore_index, label_values)
    label[bad_a | bad_b] = IGNORE_INDEX
    return norm.apply(a, ~bad_a), norm.apply(b, ~bad_b), label


# ----- discovery and validation -------------------------------------------------------------------------------
def _raise_problems(what: str, problems: Sequence[str], where: Path) -> None:
    if not problems:
        return
    shown = "; ".join(problems[:MAX_LISTED])
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise InputError(f"{len(problems)} {what}: {shown}{more}", where)


def _list_images(folder: Path) -> tuple[dict[str, Path], list[str]]:
    files: dict[str, Path] = {}
    problems: list[str] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.stem in files:
            problems.append(f"{folder.name}/{p.stem}: two files with this name ({files[p.stem].name}, {p.name})")
            continue
        files[p.stem] = p
    return files, problems


def find_pairs(folder: str | Path) -> list[PairFiles]:
    """Match ``folder/{A,B,label}`` files by stem; missing partners raise one :class:`InputError`."""
    folder = Path(folder)
    missing_dirs = [d for d in SUBDIRS if not (folder / d).is_dir()]
    if missing_dirs:
        raise InputError(f"missing folder(s) {', '.join(d + '/' for d in missing_dirs)} (expected A/, B/, label/)",
                         folder)
    listing = {}
    problems: list[str] = []
    for d in SUBDIRS:
        listing[d], dup = _list_images(folder / d)
        problems += dup
    names = sorted(set().union(*(set(v) for v in listing.values())))
    pairs = []
    for name in names:
        absent = [d for d in SUBDIRS if name not in listing[d]]
        if absent:
            present = [d for d in SUBDIRS if d not in absent]
            problems.append(f"{name}: in {'/'.join(present)}/ but missing in {'/'.join(absent)}/")
            continue
        pairs.append(PairFiles(name, listing["A"][name], listing["B"][name], listing["label"][name]))
    _raise_problems("missing or ambiguous file(s)", problems, folder)
    return pairs


# suffix -> (signature at the start, end marker near the end)
_END_MARKERS = {".png": (b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"), ".jpg": (b"\xff\xd8", b"\xff\xd9"),
                ".jpeg": (b"\xff\xd8", b"\xff\xd9")}


def incomplete_image(path: Path) -> str | None:
    """Why a PNG or JPEG file cannot be decoded completely (truncated: no end marker), or None.

    GDAL's PNG and JPEG drivers return the decoded part of a truncated file and fill the rest silently, so a cut
    download would otherwise be trained on as real pixels.
    """
    markers = _END_MARKERS.get(path.suffix.lower())
    if markers is None:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(len(markers[0]))
            f.seek(max(0, path.stat().st_size - 64))
            tail = f.read()
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if head == markers[0] and markers[1] not in tail:  # not a PNG/JPEG at all: GDAL says why when opening it
        return f"truncated {path.suffix.lower().lstrip('.').upper()} (no end marker): cannot be decoded completely"
    return None


def _check_one(pair: PairFiles, ignore_index: int | None, expected_bands: int | None,
               label_values: tuple[int, int] | None = None) -> tuple[PairFiles | None, list[str], set[float]]:
    shapes = {}
    values: set[float] = set()
    problems: list[str] = []
    for key in ("a", "b", "label"):
        path = getattr(pair, key)
        why = incomplete_image(path)
        if why:
            problems.append(f"{path.parent.name}/{path.name}: {why}")
            continue
        try:
            with _open(path) as src:
                shapes[key] = (len(data_bands(src, expected_bands)[0]), src.height, src.width)
                if key == "label":
                    raw = src.read(1)
        except Exception as exc:  # noqa: BLE001 - any failure to open or decode is "unreadable"
            problems.append(f"{path.parent.name}/{path.name}: unreadable ({' '.join(str(exc).split())[:120]})")
    if problems:
        return None, problems, values
    (ca, ha, wa), (cb, hb, wb), (_, hl, wl) = shapes["a"], shapes["b"], shapes["label"]
    if (ha, wa) != (hb, wb) or (ha, wa) != (hl, wl):
        problems.append(f"{pair.name}: sizes differ (A {wa}x{ha}, B {wb}x{hb}, label {wl}x{hl}; width x height)")
    if ca != cb:
        problems.append(f"{pair.name}: band counts differ (A {ca}, B {cb})")
    if np.issubdtype(raw.dtype, np.floating) and not np.all(np.isnan(raw) | (raw == np.round(raw))):
        why: str | None = "label holds non-integer values"
    else:
        values = distinct_values(raw, ignore_index)
        why = label_problem(values, label_values)
    if why:
        problems.append(f"{pair.label.parent.name}/{pair.label.name}: {why}")
    if problems:
        return None, problems, values
    return PairFiles(pair.name, pair.a, pair.b, pair.label, ha, wa, ca), [], values


def check_pairs(
    pairs: Sequence[PairFiles], where: Path, ignore_index: int | None = None, workers: int = 1,
    expected_bands: int | None = None, label_values: tuple[int, int] | None = None,
) -> list[PairFiles]:
    """Open every file, check sizes, data band counts and label values; one :class:`InputError` lists problems.

    ``expected_bands``: the band count of the model, if known (decides whether an alpha band is data).
    ``label_values``: (no change, change) label values (default: 0/1 or 0/255, see :mod:`cdmap.labels`); labels
    that hold nothing but 1 are ambiguous without it.
    """
    with no_georef_warning(), ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(lambda p: _check_one(p, ignore_index, expected_bands, label_values), pairs))
    problems = [msg for _, probs, _ in results for msg in probs]
    _raise_problems("problem(s) in the data", problems, where)
    if label_values is None and set().union(*(v for _, _, v in results)) == {1}:
        raise InputError("every label pixel is 1: all change in 0/1 coding, all no change in 1/2 coding; pass "
                         "--label-values 0,1 or --label-values 1,2", where)
    checked = [p for p, _, _ in results if p is not None]
    bands = [p.bands for p in checked]
    if bands and len(set(bands)) > 1:
        common = max(set(bands), key=bands.count)
        odd = [f"{p.name}: {p.bands} bands (most images have {common})" for p in checked if p.bands != common]
        _raise_problems("image(s) with a different band count", odd, where)
    return checked


def _split_dir(data_dir: Path, split: str) -> Path | None:
    d = data_dir / split
    return d if (d / "A").is_dir() else None


def layout_of(data_dir: str | Path) -> str:
    """``"split"`` (DATA/train/A...), ``"flat"`` (DATA/A...), or raise :class:`InputError`."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError("data folder not found", data_dir)
    if any((data_dir / s / "A").is_dir() for s in ("train", "val", "test")):
        return "split"
    if (data_dir / "A").is_dir():
        return "flat"
    raise InputError("not a change-detection data folder (expected {train,val,test}/{A,B,label}/ or {A,B,label}/)",
                     data_dir)


def split_names(names: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/val split of ``names`` (sorted first) with ``seed``."""
    names = sorted(names)
    if not 0 < val_fraction < 1:
        raise UsageError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    n_val = max(1, round(len(names) * val_fraction))
    perm = np.random.default_rng(seed).permutation(len(names))
    val = sorted(names[i] for i in perm[:n_val])
    train = sorted(names[i] for i in perm[n_val:])
    return train, val


def discover(
    data_dir: str | Path,
    *,
    val_fraction: float | None = None,
    seed: int = 0,
    ignore_index: int | None = None,
    workers: int = 1,
    expected_bands: int | None = None,
    label_values: tuple[int, int] | None = None,
) -> DataSplits:
    """Find, validate and split the training and validation pairs of ``data_dir`` (``expected_bands``: see
    :func:`check_pairs`)."""
    data_dir = Path(data_dir)
    layout = layout_of(data_dir)
    if layout == "flat":
        pairs = find_pairs(data_dir)
        if len(pairs) < 2:
            raise InputError(f"{len(pairs)} pair(s) found; need at least 2 to split into train and val", data_dir)
        train_names, val_names = split_names([p.name for p in pairs], 0.1 if val_fraction is None else val_fraction,
                                             seed)
        by_name = {p.name: p for p in pairs}
        train, val = [by_name[n] for n in train_names], [by_name[n] for n in val_names]
        where_train = where_val = data_dir
    else:
        tdir = _split_dir(data_dir, "train")
        if tdir is None:
            raise InputError("no train split (expected train/A, train/B, train/label)", data_dir)
        train = find_pairs(tdir)
        vdir = _split_dir(data_dir, "val")
        where_train = tdir
        if vdir is not None and val_fraction is None:
            val = find_pairs(vdir)
            where_val = vdir
        elif val_fraction is not None:
            train_names, val_names = split_names([p.name for p in train], val_fraction, seed)
            by_name = {p.name: p for p in train}
            train, val = [by_name[n] for n in train_names], [by_name[n] for n in val_names]
            where_val = tdir
        else:
            raise InputError("no val split (expected val/A, val/B, val/label); or pass --val-fraction to "
                             "hold out part of train", data_dir)
    if not train:
        raise InputError("the train split is empty (no A/B/label triplets)", where_train)
    if not val:
        raise InputError("the val split is empty (no A/B/label triplets)", where_val)
    train = check_pairs(train, where_train, ignore_index, workers, expected_bands, label_values)
    val = check_pairs(val, where_val, ignore_index, workers, expected_bands, label_values)
    if train[0].bands != val[0].bands:
        raise InputError(f"train images have {train[0].bands} bands but val images have {val[0].bands}", data_dir)
    return DataSplits(layout, train, val, train[0].bands, gsd_range(train))


def gsd_range(pairs: Sequence[PairFiles], sample: int = 32) -> list[float] | None:
    """[min, max] ground pixel size (m, by the one area rule) over up to ``sample`` georeferenced A images."""
    import rasterio

    from cdmap.vector.measure import pixel_area_m2_rows

    sizes = []
    step = max(1, len(pairs) // sample)
    with no_georef_warning():
        for p in list(pairs)[::step][:sample]:
            try:
                with rasterio.open(p.a) as src:
                    if src.crs is None:
                        continue
                    area = pixel_area_m2_rows(src.crs, src.transform, src.height // 2, src.height // 2 + 1,
                                              src.width, height=src.height)[0]
            except rasterio.errors.RasterioError:
                continue
            sizes.append(float(np.sqrt(area)))
    return [min(sizes), max(sizes)] if sizes else None


def resolve_split(data_dir: str | Path, split: str | None = None) -> tuple[Path, str]:
    """The folder of ``split`` in ``data_dir`` and the name of what is scored, recorded in evaluation outputs.

    Split layout: ``split`` (default ``test``). A flat folder is used whole: its name when it is itself a split
    folder (``DATA/test``), else ``"all (flat folder)"``; an explicit ``split`` on a flat folder that is not that
    split is refused rather than ignored.
    """
    data_dir = Path(data_dir)
    if layout_of(data_dir) == "split":
        split = split or "test"
        folder = _split_dir(data_dir, split)
        if folder is None:
            raise InputError(f"no {split} split (expected {split}/A, {split}/B, {split}/label)", data_dir)
        return folder, split
    name = data_dir.resolve().name
    if split is not None and split != name:
        raise UsageError(f"--split {split}: {data_dir} has no split folders (it holds A/, B/, label/ directly); "
                         f"omit --split to score all of its pairs")
    return data_dir, name if name in ("train", "val", "test") else "all (flat folder)"


def load_split(data_dir: str | Path, split: str | None = None, ignore_index: int | None = None,
               workers: int = 1, expected_bands: int | None = None,
               label_values: tuple[int, int] | None = None) -> list[PairFiles]:
    """The validated pairs of one split (see :func:`resolve_split`)."""
    folder, name = resolve_split(data_dir, split)
    pairs = find_pairs(folder)
    if not pairs:
        raise InputError(f"the {name} split is empty (no A/B/label triplets)", folder)
    return check_pairs(pairs, folder, ignore_index, workers, expected_bands, label_values)


# ----- whole tiles for evaluation -----------------------------------------------------------------------------
class EvalTiles:
    """Whole tiles at native resolution, normalised; returns ``(a, b, label, index)`` (a map-style dataset)."""

    def __init__(self, pairs: Sequence[PairFiles], mean: Sequence[float], std: Sequence[float],
                 ignore_index: int | None = None, label_values: tuple[int, int] | None = None) -> None:
        self.pairs = list(pairs)
        self.norm = Normalisation.of(mean, std)
        self.ignore_index = ignore_index
        self.label_values = label_values

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Any, Any, Any, int]:
        import torch

        a, b, label = read_sample(self.pairs[index], None, self.norm, self.ignore_index, self.label_values)
        return torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(label), index


def size_grouped_batches(pairs: Sequence[PairFiles], batch_size: int, rank: int = 0,
                         world_size: int = 1) -> list[list[int]]:
    """Batches of same-size tiles (order: sizes, then index), dealt round-robin to ``rank`` of ``world_size``."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault((p.height, p.width), []).append(i)
    batches = [idx[i : i + batch_size] for _, idx in sorted(groups.items()) for i in range(0, len(idx), batch_size)]
    return batches[rank::world_size]
