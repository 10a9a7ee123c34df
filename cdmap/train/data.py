"""Training datasets: normalisation statistics, random training crops and the epoch sampler.

Discovery, checks and reading of the tile folders live in :mod:`cdmap.data`; normalisation is
:class:`cdmap.inference.Normalisation`, as in predict and evaluate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from cdmap.data import PairFiles, no_georef_warning, read_image, read_sample
from cdmap.errors import InputError
from cdmap.inference import Normalisation
from cdmap.train.augment import AugmentConfig, augment


# ----- normalisation statistics --------------------------------------------------------------------------------
def _image_moments(path_bands: tuple[Path, int | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path, bands = path_bands
    data, invalid = read_image(path, bands=bands)
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
    number of threads. Invalid pixels (:func:`cdmap.data.read_image`) are excluded; a constant (or empty) band
    gets std 1.0.
    """
    paths = [(p, pair.bands or None) for pair in pairs for p in (pair.a, pair.b)]
    total_n = total_mean = total_m2 = None
    with no_georef_warning(), ThreadPoolExecutor(max(1, workers)) as pool:
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
        label_values: tuple[int, int] | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.label_values = label_values
        self.norm = Normalisation.of(mean, std)
        self.crop_size = int(crop_size)
        self.seed = int(seed)
        self.augment = augment
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        from rasterio.windows import Window

        gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        pair = self.pairs[index]
        c = self.crop_size
        top = int(torch.randint(0, max(pair.height - c, 0) + 1, (), generator=gen))
        left = int(torch.randint(0, max(pair.width - c, 0) + 1, (), generator=gen))
        window = Window(left, top, min(c, pair.width), min(c, pair.height))
        a, b, label = read_sample(pair, window, self.norm, self.ignore_index, self.label_values)
        ta, tb, tl = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(label)
        ph, pw = c - ta.shape[-2], c - ta.shape[-1]
        if ph > 0 or pw > 0:
            ta, tb, tl = _reflect_pad(ta, ph, pw), _reflect_pad(tb, ph, pw), _reflect_pad(tl, ph, pw)
        if self.augment is not None:
            ta, tb, tl = augment(ta, tb, tl, gen, self.augment)
        return ta, tb, tl


class EpochSampler(DistributedSampler):
    """A :class:`DistributedSampler` (shuffled by ``seed + epoch``) that yields ``(epoch, index)`` keys.

    Works without an initialised process group when ``num_replicas`` and ``rank`` are given (1 and 0 for a
    single process). Call :meth:`set_epoch` before every epoch, as with the parent class.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in super().__iter__():
            yield (epoch, index)
