"""Training data: discovery and validation of LEVIR-CD-style folders, normalisation statistics, datasets.

Layouts
-------
- split: ``DATA/{train,val,test}/{A,B,label}/`` (the LEVIR-CD layout);
- flat: ``DATA/{A,B,label}/``, split into train/val by ``val_fraction`` with a fixed seed.

Files are matched by name stem, so ``A/x.tif`` pairs with ``B/x.tif`` and ``label/x.png``. Images may be PNG,
JPEG or GeoTIFF with any band count and dtype; all images of a data set must have the same band count.

Labels: band 1 is read (a 3-channel label uses channel 0); any non-zero value is change. A label is
*unexpected* if it holds non-integer values, negative values, or more than one distinct non-zero value (the
ignore index excluded): labels must be 0 plus one change value (1, 255, ...). This catches JPEG-compressed
masks and 1/2-coded labels such as OSCD's (1 = no change, 2 = change), which would otherwise train silently on
wrong targets. ``ignore_index`` marks pixels that count in no loss or metric; pixels where either image is
nodata (the file's nodata value in every band) or NaN are ignored as well.

Internally a label is uint8: 0 no change, 1 change, :data:`IGNORE_INDEX` (255) ignored.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from cdmap.errors import InputError, UsageError
from cdmap.train.augment import AugmentConfig, augment
from cdmap.train.losses import IGNORE_INDEX

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
SUBDIRS = ("A", "B", "label")
MAX_LISTED = 5


@dataclass(frozen=True)
class PairFiles:
    """One (A, B, label) triplet and its raster size (filled in by validation)."""

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


# ----- reading ---------------------------------------------------------------------------------------------------
def _open(path: Path):
    import rasterio

    return rasterio.open(path)


@contextlib.contextmanager
def _no_georef_warning():
    """Silence rasterio's NotGeoreferencedWarning (PNG/JPEG tiles). Enter it from the main thread only:
    ``warnings.catch_warnings`` is process-global, so thread pools run inside one such block."""
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=rasterio.errors.NotGeoreferencedWarning)
        yield


def read_image(path: Path, window=None) -> tuple[np.ndarray, np.ndarray]:
    """Read an image (window) as float32 (C, h, w) and its invalid mask (h, w): nodata in all bands or NaN."""
    import rasterio

    try:
        with rasterio.open(path) as src:
            data = src.read(window=window)
            nodata = src.nodata
    except rasterio.errors.RasterioError as exc:
        raise InputError(f"cannot read image: {exc}", path) from exc
    invalid = np.zeros(data.shape[1:], dtype=bool)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        invalid |= np.all(data == nodata, axis=0)
    out = data.astype(np.float32, copy=False)
    if np.issubdtype(data.dtype, np.floating):
        nan = np.isnan(out)
        if nan.any():
            invalid |= nan.any(axis=0)
            out = np.where(nan, 0.0, out).astype(np.float32)
    return out, invalid


def read_label(path: Path, window=None, ignore_index: int | None = None) -> np.ndarray:
    """Read band 1 of a label (window) as internal uint8: 0, 1 (any non-zero) or IGNORE_INDEX."""
    import rasterio

    try:
        with rasterio.open(path) as src:
            raw = src.read(1, window=window)
    except rasterio.errors.RasterioError as exc:
        raise InputError(f"cannot read label: {exc}", path) from exc
    out = (raw != 0).astype(np.uint8)
    if ignore_index is not None:
        out[raw == ignore_index] = IGNORE_INDEX
    if np.issubdtype(raw.dtype, np.floating):
        out[np.isnan(raw)] = IGNORE_INDEX
    return out


def label_problem(raw: np.ndarray, ignore_index: int | None) -> str | None:
    """Why a label's values are unexpected (see module doc), or None when they are fine."""
    if np.issubdtype(raw.dtype, np.floating):
        if np.isnan(raw).any():
            return "label holds NaN values"
        if not np.all(raw == np.round(raw)):
            return "label holds non-integer values"
    if raw.dtype == np.uint8:
        values = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
    else:
        values = np.unique(raw)
    if ignore_index is not None:
        values = values[values != ignore_index]
    positive = values[values > 0]
    if (values < 0).any() or positive.size > 1:
        shown = ", ".join(str(v) for v in values[:8].tolist()) + (", ..." if values.size > 8 else "")
        hint = f" plus the ignore index {ignore_index}" if ignore_index is not None else ""
        return f"label has unexpected values {{{shown}}} (expected 0 and one change value such as 1 or 255{hint})"
    return None


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


def _check_one(pair: PairFiles, ignore_index: int | None) -> tuple[PairFiles | None, list[str]]:
    shapes = {}
    problems: list[str] = []
    for key in ("a", "b", "label"):
        path = getattr(pair, key)
        try:
            with _open(path) as src:
                shapes[key] = (src.count, src.height, src.width)
                if key == "label":
                    raw = src.read(1)
        except Exception as exc:  # noqa: BLE001 - any failure to open or decode is "unreadable"
            problems.append(f"{path.parent.name}/{path.name}: unreadable ({' '.join(str(exc).split())[:120]})")
    if problems:
        return None, problems
    (ca, ha, wa), (cb, hb, wb), (_, hl, wl) = shapes["a"], shapes["b"], shapes["label"]
    if (ha, wa) != (hb, wb) or (ha, wa) != (hl, wl):
        problems.append(f"{pair.name}: sizes differ (A {wa}x{ha}, B {wb}x{hb}, label {wl}x{hl}; width x height)")
    if ca != cb:
        problems.append(f"{pair.name}: band counts differ (A {ca}, B {cb})")
    why = label_problem(raw, ignore_index)
    if why:
        problems.append(f"{pair.label.parent.name}/{pair.label.name}: {why}")
    if problems:
        return None, problems
    return PairFiles(pair.name, pair.a, pair.b, pair.label, ha, wa, ca), []


def check_pairs(
    pairs: Sequence[PairFiles], where: Path, ignore_index: int | None = None, workers: int = 1
) -> list[PairFiles]:
    """Open every file, check sizes, band counts and label values; one :class:`InputError` lists problems."""
    with _no_georef_warning(), ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(lambda p: _check_one(p, ignore_index), pairs))
    problems = [msg for _, probs in results for msg in probs]
    _raise_problems("problem(s) in the data", problems, where)
    checked = [p for p, _ in results if p is not None]
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
) -> DataSplits:
    """Find, validate and split the training and validation pairs of ``data_dir``."""
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
    train = check_pairs(train, where_train, ignore_index, workers)
    val = check_pairs(val, where_val, ignore_index, workers)
    if train[0].bands != val[0].bands:
        raise InputError(f"train images have {train[0].bands} bands but val images have {val[0].bands}", data_dir)
    return DataSplits(layout, train, val, train[0].bands)


def load_split(data_dir: str | Path, split: str = "test", ignore_index: int | None = None,
               workers: int = 1) -> list[PairFiles]:
    """The validated pairs of one split; a flat ``DATA/{A,B,label}`` (or a split folder itself) is used whole."""
    data_dir = Path(data_dir)
    layout = layout_of(data_dir)
    if layout == "split":
        folder = _split_dir(data_dir, split)
        if folder is None:
            raise InputError(f"no {split} split (expected {split}/A, {split}/B, {split}/label)", data_dir)
    else:
        folder = data_dir
    pairs = find_pairs(folder)
    if not pairs:
        raise InputError(f"the {split} split is empty (no A/B/label triplets)", folder)
    return check_pairs(pairs, folder, ignore_index, workers)


# ----- normalisation statistics --------------------------------------------------------------------------------
def _image_moments(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data, invalid = read_image(path)
    valid = ~invalid
    bands = data.shape[0]
    count = np.zeros(bands)
    mean = np.zeros(bands)
    m2 = np.zeros(bands)
    for i in range(bands):
        v = data[i][valid].astype(np.float64)
        count[i] = v.size
        if v.size:
            mean[i] = v.mean()
            m2[i] = np.square(v - mean[i]).sum()
    return count, mean, m2


def compute_stats(pairs: Iterable[PairFiles], workers: int = 1) -> tuple[list[float], list[float]]:
    """Per-band mean and (population) std over both dates of ``pairs``, streamed one image at a time.

    Moments are merged with Chan's parallel formula in a fixed order, so the result does not depend on the
    number of threads. Nodata/NaN pixels are excluded; a constant (or empty) band gets std 1.0.
    """
    paths = [p for pair in pairs for p in (pair.a, pair.b)]
    total_n = total_mean = total_m2 = None
    with _no_georef_warning(), ThreadPoolExecutor(max(1, workers)) as pool:
        for n_b, mean_b, m2_b in pool.map(_image_moments, paths):
            if total_n is None:
                total_n, total_mean, total_m2 = n_b.copy(), mean_b.copy(), m2_b.copy()
                continue
            n = total_n + n_b
            safe = np.maximum(n, 1)
            delta = mean_b - total_mean
            total_mean = total_mean + delta * n_b / safe
            total_m2 = total_m2 + m2_b + delta**2 * total_n * n_b / safe
            total_n = n
    if total_n is None:
        raise InputError("no images to compute normalisation statistics from")
    std = np.sqrt(total_m2 / np.maximum(total_n, 1))
    std = np.where((std > 1e-6 * np.maximum(1.0, np.abs(total_mean))) & (total_n > 0), std, 1.0)
    return [float(m) for m in total_mean], [float(s) for s in std]


# ----- datasets ------------------------------------------------------------------------------------------------
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch: the data depend only on (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


def _reflect_pad(t: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Pad the last two dims at bottom/right by reflection (repeated when the pad exceeds the size)."""
    import torch.nn.functional as F

    while ph > 0 or pw > 0:
        h, w = t.shape[-2:]
        sh, sw = min(ph, h - 1), min(pw, w - 1)
        mode = "reflect" if (sh > 0 or ph == 0) and (sw > 0 or pw == 0) else "replicate"
        if mode == "replicate":
            sh, sw = ph, pw
        x = t.float()[None] if t.dim() == 3 else t.float()[None, None]
        x = F.pad(x, (0, sw, 0, sh), mode=mode)
        t = (x[0] if t.dim() == 3 else x[0, 0]).to(t.dtype)
        ph, pw = ph - sh, pw - sw
    return t


def _normalise(data: np.ndarray, invalid: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    out = (data - mean[:, None, None]) / std[:, None, None]
    if invalid.any():
        out[:, invalid] = 0.0
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


class TrainTiles(Dataset):
    """Random ``crop_size`` crops (reflect-padded when a tile is smaller), normalised, optionally augmented.

    Indexed by ``(epoch, index)`` (see :class:`EpochSampler`): crop position and augmentation come from a
    generator seeded by ``sample_seed(seed, epoch, index)``, so the data never depend on workers or global RNGs.
    Crops are read with windowed reads. Returns ``(a, b, label)``.
    """

    def __init__(
        self,
        pairs: Sequence[PairFiles],
        mean: Sequence[float],
        std: Sequence[float],
        crop_size: int = 256,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        ignore_index: int | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.crop_size = int(crop_size)
        self.seed = int(seed)
        self.augment = augment
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        from rasterio.windows import Window

        gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        pair = self.pairs[index]
        c = self.crop_size
        top = int(torch.randint(0, max(pair.height - c, 0) + 1, (), generator=gen))
        left = int(torch.randint(0, max(pair.width - c, 0) + 1, (), generator=gen))
        window = Window(left, top, min(c, pair.width), min(c, pair.height))
        with _no_georef_warning():
            a, bad_a = read_image(pair.a, window)
            b, bad_b = read_image(pair.b, window)
            label = read_label(pair.label, window, self.ignore_index)
        label[bad_a | bad_b] = IGNORE_INDEX
        ta = _normalise(a, bad_a, self.mean, self.std)
        tb = _normalise(b, bad_b, self.mean, self.std)
        tl = torch.from_numpy(label)
        ph, pw = c - ta.shape[-2], c - ta.shape[-1]
        if ph > 0 or pw > 0:
            ta, tb, tl = _reflect_pad(ta, ph, pw), _reflect_pad(tb, ph, pw), _reflect_pad(tl, ph, pw)
        if self.augment is not None:
            ta, tb, tl = augment(ta, tb, tl, gen, self.augment)
        return ta, tb, tl


class EvalTiles(Dataset):
    """Whole tiles at native resolution, normalised; returns ``(a, b, label, index)``."""

    def __init__(self, pairs: Sequence[PairFiles], mean: Sequence[float], std: Sequence[float],
                 ignore_index: int | None = None) -> None:
        self.pairs = list(pairs)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        pair = self.pairs[index]
        with _no_georef_warning():
            a, bad_a = read_image(pair.a)
            b, bad_b = read_image(pair.b)
            label = read_label(pair.label, None, self.ignore_index)
        label[bad_a | bad_b] = IGNORE_INDEX
        return (_normalise(a, bad_a, self.mean, self.std), _normalise(b, bad_b, self.mean, self.std),
                torch.from_numpy(label), index)


class EpochSampler(DistributedSampler):
    """A :class:`DistributedSampler` (shuffled by ``seed + epoch``) that yields ``(epoch, index)`` keys.

    Works without an initialised process group when ``num_replicas`` and ``rank`` are given (1 and 0 for a
    single process). Call :meth:`set_epoch` before every epoch, as with the parent class.
    """

    def __iter__(self):
        epoch = self.epoch
        for index in super().__iter__():
            yield (epoch, index)


def size_grouped_batches(pairs: Sequence[PairFiles], batch_size: int, rank: int = 0,
                         world_size: int = 1) -> list[list[int]]:
    """Batches of same-size tiles (order: sizes, then index), dealt round-robin to ``rank`` of ``world_size``."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault((p.height, p.width), []).append(i)
    batches = [idx[i : i + batch_size] for _, idx in sorted(groups.items()) for i in range(0, len(idx), batch_size)]
    return batches[rank::world_size]
