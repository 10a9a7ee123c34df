"""The two views of one window (spec sections 4 and 6): random resized crops, flips, the strong augmentation of
view B, the block masks and the source-pixel centres of every grid cell.

Everything is drawn from one ``numpy`` generator seeded by ``(seed, epoch, index)``, so a sample never depends
on workers or global RNG state. Pixels are the normalised bands; the colour operations are written for any band
count in normalised units (brightness multiplies the raw values, contrast and saturation blend towards the
image / band mean, hue rotates the chroma of 3-band images only, solarisation reflects values above a threshold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cdmap.inference import Normalisation
from cdmap.pretrain.config import MODEL_STRIDE, PretrainConfig
from cdmap.pretrain.sources import WindowSampler
from cdmap.train.data import sample_seed

NOISE_STD = (math.sqrt(10.0) / 35.0, math.sqrt(50.0) / 35.0)
"""Gaussian noise std range in normalised units: albumentations' variance 10-50 on 0-255 over a band std of
~35 grey levels (MillionAID's ~0.137)."""
SOLARISE_AT = 0.5
"""Solarisation threshold in normalised units (values above are reflected about it)."""


@dataclass(frozen=True)
class CropBox:
    """A crop of a window: top/left/height/width in window pixels and whether it was flipped horizontally."""

    top: float
    left: float
    height: float
    width: float
    flip: bool


def random_resized_box(gen: np.random.Generator, size: int, scale: tuple[float, float],
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameters on a ``size`` square: (top, left, height, width)."""
    area = size * size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * gen.uniform(*scale)
        aspect = math.exp(gen.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= size and 0 < h <= size:
            return int(gen.integers(0, size - h + 1)), int(gen.integers(0, size - w + 1)), h, w
    return 0, 0, size, size


def cell_centres(box: CropBox, grid: int, origin: tuple[int, int] = (0, 0), legacy: bool = False,
                 window: int = 0) -> np.ndarray:
    """Centres ``(grid*grid, 2)`` (y, x) of the cells of a crop in source-image pixels, row-major over the crop as
    the network sees it (a flipped crop's column l is the source's column grid-1-l). ``legacy``: the original
    code's bug (offsets taken as fractions of the window, spec 5.4), for comparisons only."""
    top, left = box.top, box.left
    if legacy:
        top, left = top / max(window, 1), left / max(window, 1)
    k = np.arange(grid) + 0.5
    ys = origin[0] + top + k * box.height / grid
    xs = origin[1] + left + k * box.width / grid
    if box.flip:
        xs = xs[::-1]
    return np.stack(np.broadcast_arrays(ys[:, None], xs[None, :]), axis=-1).reshape(-1, 2).astype(np.float32)


def block_mask(gen: np.random.Generator, grid: int, n_masked: int) -> np.ndarray:
    """``(grid, grid)`` uint8 with exactly ``n_masked`` ones at a uniform random permutation's first cells."""
    mask = np.zeros(grid * grid, dtype=np.uint8)
    mask[gen.permutation(grid * grid)[:n_masked]] = 1
    return mask.reshape(grid, grid)


def _crop_resize(x: torch.Tensor, box: tuple[int, int, int, int], size: int, mode: str) -> torch.Tensor:
    top, left, h, w = box
    part = x[None, :, top : top + h, left : left + w]
    kw: dict[str, Any] = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(part, size=(size, size), mode=mode, **kw)[0]
    return out


def _blur(x: torch.Tensor, gen: np.random.Generator) -> torch.Tensor:
    k = int(gen.choice([3, 5, 7]))
    sigma = float(gen.uniform(0.1, 2.0))
    r = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[0]
    y = F.pad(x[None], (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, g.view(1, 1, 1, k).expand(c, 1, 1, k).contiguous(), groups=c)
    y = F.conv2d(y, g.view(1, 1, k, 1).expand(c, 1, k, 1).contiguous(), groups=c)
    return y[0]


def _hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the chroma (YIQ I/Q plane) of a 3-band image by ``shift`` turns."""
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    a = 2 * math.pi * shift
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(a), -math.sin(a)], [0.0, math.sin(a), math.cos(a)]])
    m = torch.linalg.inv(yiq) @ rot @ yiq
    return torch.einsum("ij,jhw->ihw", m, x)


def strong_augment(x: torch.Tensor, gen: np.random.Generator, offset: torch.Tensor) -> torch.Tensor:
    """View B's colour jitter (p 0.8), blur (p 1), noise (p 0.6), solarise (p 0.2), grey (p 0.2) (spec 6).

    ``offset`` is mean/std per band: a raw-value factor b is ``b * z + (b - 1) * offset`` in normalised units.
    """
    if gen.random() < 0.8:
        b = float(gen.uniform(0.6, 1.4))
        x = b * x + (b - 1) * offset[:, None, None]
        c = float(gen.uniform(0.6, 1.4))
        x = c * x + (1 - c) * x.mean()
        s = float(gen.uniform(0.8, 1.2))
        x = s * x + (1 - s) * x.mean(0, keepdim=True)
        h = float(gen.uniform(-0.1, 0.1))
        if x.shape[0] == 3:
            x = _hue(x, h)
    x = _blur(x, gen)
    if gen.random() < 0.6:
        std = float(gen.uniform(*NOISE_STD))
        x = x + std * torch.from_numpy(gen.standard_normal(x.shape, dtype=np.float32))
    if gen.random() < 0.2:
        x = torch.where(x >= SOLARISE_AT, 2 * SOLARISE_AT - x, x)
    if gen.random() < 0.2:
        x = x.mean(0, keepdim=True).expand_as(x).contiguous()
    return x


class CMIDViews(Dataset):
    """Sample ``(epoch, index)`` -> a dict with the two views and what the losses need:

    ``a``, ``b`` (C, S, S): clean and strongly augmented crops (normalised); ``valid_a``, ``valid_b`` (S, S) bool;
    ``mask_a``, ``mask_b`` (N, N) uint8 block masks; ``loc_a``, ``loc_b`` (N*N, 2) cell centres in source pixels.
    """

    def __init__(self, sampler: WindowSampler, norm: Normalisation, cfg: PretrainConfig, length: int) -> None:
        self.sampler, self.norm, self.cfg, self.length = sampler, norm, cfg, length
        self.offset = torch.tensor([m / s for m, s in zip(norm.mean, norm.std, strict=True)], dtype=torch.float32)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: Any) -> dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        cfg = self.cfg
        gen = np.random.default_rng(sample_seed(cfg.seed, epoch, index))
        data, valid, origin = self.sampler.sample(index, gen)
        x = torch.from_numpy(self.norm.apply(data, valid))
        v = torch.from_numpy(valid.astype(np.float32))[None]
        size, grid = cfg.crop_size, cfg.grid
        h, w = x.shape[-2:]
        if h < cfg.window or w < cfg.window:  # an image narrower than the window: crop within what there is
            side = min(h, w)
            x, v = x[:, :side, :side], v[:, :side, :side]
        out: dict[str, torch.Tensor] = {}
        for name in ("a", "b"):
            top, left, bh, bw = random_resized_box(gen, x.shape[-1], cfg.crop_scale)
            flip = bool(gen.random() < 0.5)
            view = _crop_resize(x, (top, left, bh, bw), size, "bilinear")
            ok = _crop_resize(v, (top, left, bh, bw), size, "nearest")[0] > 0.5
            if flip:
                view, ok = view.flip(-1), ok.flip(-1)
            if name == "b":
                view = strong_augment(view, gen, self.offset)
            box = CropBox(top, left, bh, bw, flip)
            out[name] = view.contiguous()
            out[f"valid_{name}"] = ok.contiguous()
            out[f"loc_{name}"] = torch.from_numpy(cell_centres(box, grid, origin, cfg.legacy_location, cfg.window))
            out[f"mask_{name}"] = torch.from_numpy(block_mask(gen, grid, cfg.masked_blocks))
        return out


def mean_fill(x: torch.Tensor, block_masks: torch.Tensor) -> torch.Tensor:
    """Masked images (spec 4): pixels of masked ``MODEL_STRIDE`` blocks set to the crop's per-channel mean."""
    pixel = block_masks.to(x.dtype).repeat_interleave(MODEL_STRIDE, 1).repeat_interleave(MODEL_STRIDE, 2)[:, None]
    mean = x.mean(dim=(2, 3), keepdim=True)
    return x * (1 - pixel) + mean * pixel
