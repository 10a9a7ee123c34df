"""Single-level 2-D Haar wavelet transform and its inverse, in plain torch.

Closed form on each 2x2 block ``[[a, b], [c, d]]`` (orthonormal Haar, the ``pywt``/``pytorch_wavelets``
convention)::

    LL = (a + b + c + d) / 2      LH = (a + b - c - d) / 2   (top minus bottom: horizontal edges)
    HL = (a - b + c - d) / 2      HH = (a - b - c + d) / 2

Only strided slicing, additions and a multiplication by 0.5 are used, so the transform is exact up to
rounding, runs in the input's dtype (autocast/bfloat16 safe in forward and backward, no fp32 filter buffers),
has no parameters or buffers, and traces/exports as ordinary tensor ops.

:func:`haar_dwt` returns the four subbands as a tuple ``(LL, LH, HL, HH)``, each ``(..., H/2, W/2)``;
they map to ``pytorch_wavelets.DWTForward(J=1, wave="haar")`` as ``LL = yl`` and
``LH, HL, HH = yh[0][:, :, 0], yh[0][:, :, 1], yh[0][:, :, 2]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def haar_dwt(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Haar DWT of ``x`` (..., H, W) with even H and W; returns ``(LL, LH, HL, HH)`` at half resolution."""
    h, w = x.shape[-2], x.shape[-1]
    if h % 2 or w % 2:
        raise ValueError(f"haar_dwt needs even height and width, got {h}x{w}")
    a = x[..., 0::2, 0::2]
    b = x[..., 0::2, 1::2]
    c = x[..., 1::2, 0::2]
    d = x[..., 1::2, 1::2]
    top, bottom = a + b, c + d
    left_minus_right_top, left_minus_right_bottom = a - b, c - d
    ll = (top + bottom) * 0.5
    lh = (top - bottom) * 0.5
    hl = (left_minus_right_top + left_minus_right_bottom) * 0.5
    hh = (left_minus_right_top - left_minus_right_bottom) * 0.5
    return ll, lh, hl, hh


def haar_idwt(ll: Tensor, lh: Tensor, hl: Tensor, hh: Tensor) -> Tensor:
    """Inverse of :func:`haar_dwt`: four (..., h, w) subbands to one (..., 2h, 2w) tensor."""
    p, q = ll + lh, ll - lh
    r, s = hl + hh, hl - hh
    a = (p + r) * 0.5
    b = (p - r) * 0.5
    c = (q + s) * 0.5
    d = (q - s) * 0.5
    h, w = ll.shape[-2], ll.shape[-1]
    lead = ll.shape[:-2]
    top = torch.stack((a, b), dim=-1).reshape(*lead, h, 2 * w)  # a b a b ... along W
    bottom = torch.stack((c, d), dim=-1).reshape(*lead, h, 2 * w)
    return torch.stack((top, bottom), dim=-2).reshape(*lead, 2 * h, 2 * w)


class HaarDWT(nn.Module):
    """Module wrapper of :func:`haar_dwt` (no parameters, no buffers)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return haar_dwt(x)


class HaarIDWT(nn.Module):
    """Module wrapper of :func:`haar_idwt` (no parameters, no buffers)."""

    def forward(self, ll: Tensor, lh: Tensor, hl: Tensor, hh: Tensor) -> Tensor:
        return haar_idwt(ll, lh, hl, hh)
