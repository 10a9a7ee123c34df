"""Joint geometric augmentations of (A, B, label) with torch ops only (design notes §10).

Every transform is applied identically to both dates and the label, in the reference order:

1. horizontal flip (p=0.3), 2. vertical flip (p=0.3), 3. rotation by 90/180/270 degrees (p=0.3),
4. rotation by a uniform angle in +-15 degrees (p=0.3): images bilinear, label nearest; pixels that come from
   outside the tile are filled with 0 in the images (the band mean, since images are already normalised here)
   and marked ``IGNORE_INDEX`` in the label,
5. scale-crop (always, as in the reference): resize by a random factor in [0.5, 1.5] (images bilinear with
   antialiasing, label nearest), pad right/bottom to the crop size if smaller (images 0, label ignore), then a
   random crop back to the input size,
6. swap of the two dates (p=0.3),
7. photometric jitter of each date on its own (off in the reference recipe; ``photometric`` is its probability
   per date): a contrast gain, a brightness offset and a per-band colour offset, in normalised units, so the
   model learns that a change of light or season between the dates is not a change on the ground.

Images are float tensors (C, H, W), the label a uint8 tensor (H, W) holding 0, 1 and ``IGNORE_INDEX``. All
randomness comes from the ``torch.Generator`` passed in, so a sample's augmentation depends only on its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cdmap.train.losses import IGNORE_INDEX


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the training augmentations (reference defaults)."""

    hflip: float = 0.3
    vflip: float = 0.3
    rot90: float = 0.3
    rotate: float = 0.3
    rotate_max_deg: float = 15.0
    scale: float = 1.0
    scale_min: float = 0.5
    scale_max: float = 1.5
    swap: float = 0.3
    photometric: float = 0.0
    contrast: float = 0.2
    brightness: float = 0.2
    colour: float = 0.1


Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _rand(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


def hflip(a: torch.Tensor, b: torch.Tensor, label: torch.Tensor) -> Sample:
    return a.flip(-1), b.flip(-1), label.flip(-1)


def vflip(a: torch.Tensor, b: torch.Tensor, label: torch.Tensor) -> Sample:
    return a.flip(-2), b.flip(-2), label.flip(-2)


def rot90(a: torch.Tensor, b: torch.Tensor, label: torch.Tensor, k: int) -> Sample:
    """Rotate by ``k`` quarter turns counter-clockwise (in the row/column plane)."""
    return a.rot90(k, (-2, -1)), b.rot90(k, (-2, -1)), label.rot90(k, (-2, -1))


def rotate(a: torch.Tensor, b: torch.Tensor, label: torch.Tensor, degrees: float) -> Sample:
    """Rotate about the tile centre by ``degrees``; outside pixels: images 0, label ignore."""
    _, h, w = a.shape
    t = math.radians(degrees)
    cos, sin = math.cos(t), math.sin(t)
    # Pixel-space rotation about the centre expressed in align_corners=False normalised coordinates.
    theta = torch.tensor(
        [[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=torch.float32
    ).unsqueeze(0)
    grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
    images = torch.cat([a, b], 0).unsqueeze(0).float()
    images = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    lab = torch.stack([label.float(), torch.ones_like(label, dtype=torch.float32)]).unsqueeze(0)
    lab = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    out_label = torch.where(lab[1] > 0.5, lab[0], torch.full_like(lab[0], IGNORE_INDEX)).round().to(torch.uint8)
    c = a.shape[0]
    return images[0, :c].to(a.dtype), images[0, c:].to(b.dtype), out_label


def scale_crop(
    a: torch.Tensor, b: torch.Tensor, label: torch.Tensor, scale: float, gen: torch.Generator
) -> Sample:
    """Resize by ``scale``, pad right/bottom if smaller (images 0, label ignore), random-crop back."""
    _, h, w = a.shape
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    images = torch.cat([a, b], 0).unsqueeze(0).float()
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h)
        lab = F.interpolate(label[None, None].float(), size=(nh, nw), mode="nearest-exact")[0, 0]
    else:
        lab = label.float()
    ph, pw = max(0, h - nh), max(0, w - nw)
    if ph or pw:
        images = F.pad(images, (0, pw, 0, ph), value=0.0)
        lab = F.pad(lab, (0, pw, 0, ph), value=float(IGNORE_INDEX))
    H, W = images.shape[-2:]
    top = int(torch.randint(0, H - h + 1, (), generator=gen))
    left = int(torch.randint(0, W - w + 1, (), generator=gen))
    images = images[0, :, top : top + h, left : left + w]
    lab = lab[top : top + h, left : left + w]
    c = a.shape[0]
    return images[:c].to(a.dtype), images[c:].to(b.dtype), lab.round().to(torch.uint8)


def photometric(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """One date's light: ``x * gain + offset + offset_per_band`` (images are normalised, so the offsets are in
    band standard deviations)."""
    gain = 1.0 + (2 * _rand(gen) - 1) * cfg.contrast
    offset = (2 * _rand(gen) - 1) * cfg.brightness
    per_band = (2 * torch.rand(x.shape[0], 1, 1, generator=gen) - 1) * cfg.colour
    return x * gain + (offset + per_band).to(x.dtype)


def augment(
    a: torch.Tensor, b: torch.Tensor, label: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig | None = None
) -> Sample:
    """Apply the reference augmentation chain jointly to ``a``, ``b`` and ``label``."""
    cfg = cfg or AugmentConfig()
    if _rand(gen) < cfg.hflip:
        a, b, label = hflip(a, b, label)
    if _rand(gen) < cfg.vflip:
        a, b, label = vflip(a, b, label)
    if _rand(gen) < cfg.rot90:
        k = int(torch.randint(1, 4, (), generator=gen))
        a, b, label = rot90(a, b, label, k)
    if _rand(gen) < cfg.rotate:
        angle = (2 * _rand(gen) - 1) * cfg.rotate_max_deg
        a, b, label = rotate(a, b, label, angle)
    if _rand(gen) < cfg.scale:
        s = cfg.scale_min + (cfg.scale_max - cfg.scale_min) * _rand(gen)
        a, b, label = scale_crop(a, b, label, s, gen)
    if _rand(gen) < cfg.swap:
        a, b = b, a
    if cfg.photometric > 0:  # no generator draws when off: reference-recipe runs stay bit-identical
        if _rand(gen) < cfg.photometric:
            a = photometric(a, gen, cfg)
        if _rand(gen) < cfg.photometric:
            b = photometric(b, gen, cfg)
    return a.contiguous(), b.contiguous(), label.contiguous()
