"""The CMID losses (spec section 5), always computed in float32 (also under bf16 autocast).

- :func:`focal_l1`: MIM spatial loss on masked pixels (focal L1, alpha 0.2, gamma 1);
- :func:`focal_frequency`: the focal frequency loss on the batch-averaged orthonormal 2-D spectra;
- :func:`info_nce`: MoCo-v2 InfoNCE against a queue snapshot;
- :func:`dino`: cross-entropy of student logits to the centred, sharpened teacher softmax, and
  :func:`update_center` (EMA of the teacher logits' mean, averaged over processes).
- :func:`match_cells`: geometric cell matching (A -> B) by the cell centres in source pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_NO_AUTOCAST = {"enabled": False}


def _fp32(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run ``fn`` with autocast off on its float tensors cast to float32."""

    def wrapped(*args: object, **kwargs: object) -> Tensor:
        args = tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device, **_NO_AUTOCAST):
            return fn(*args, **kwargs)

    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


@_fp32
def focal_l1(pred: Tensor, target: Tensor, mask: Tensor, alpha: float = 0.2, gamma: float = 1.0) -> Tensor:
    """``sum(l * M) / (sum(M) + 1e-5) / C`` with ``l = d * (2 sigmoid(alpha d) - 1)^gamma``, ``d = |pred - target|``;
    ``mask`` (B, 1, H, W) is 1 on the pixels that count (masked and valid)."""
    d = (pred - target).abs()
    loss = d * (2 * torch.sigmoid(alpha * d) - 1) ** gamma
    return (loss * mask).sum() / (mask.sum() + 1e-5) / pred.shape[1]


@_fp32
def focal_frequency(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Focal frequency loss of the blended reconstruction (unmasked pixels keep a 0.001 gradient share)."""
    mf = mask + 0.001 * (1 - mask)
    rest = 0.5 * pred.detach() + 0.5 * target
    blended = pred * mf + rest * (1 - mf)
    p = torch.fft.fft2(blended, norm="ortho").mean(0)
    q = torch.fft.fft2(target, norm="ortho").mean(0)
    diff = p - q
    dist = diff.real**2 + diff.imag**2
    with torch.no_grad():
        w = torch.log1p(dist.sqrt())
        w = torch.nan_to_num(w / w.max().clamp_min(1e-12), nan=0.0).clamp(0, 1)
    return (w * dist).mean()


@_fp32
def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """CE over ``[q.k, q.Q_1 .. q.Q_K] / T`` with label 0; ``queue`` (D, K) is the snapshot before enqueueing."""
    pos = (q * k.detach()).sum(1, keepdim=True)
    neg = q @ queue.detach()
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@_fp32
def dino(student: Tensor, teacher: Tensor, center: Tensor, t_student: float, t_teacher: float) -> Tensor:
    """mean over (b, m) of ``-sum_k softmax((t - c)/T_t) log_softmax(s/T_s)``; logits (B, K, M), centre (1, K, 1)."""
    p_t = torch.softmax((teacher.detach() - center) / t_teacher, dim=1)
    return -(p_t * torch.log_softmax(student / t_student, dim=1)).sum(1).mean()


@torch.no_grad()
def update_center(center: Tensor, teacher: Tensor, momentum: float, all_mean: Callable[[Tensor], Tensor]) -> None:
    """``c <- m c + (1 - m) mean_{b,m}(t)`` in place; ``all_mean`` averages a tensor over processes."""
    batch = all_mean(teacher.float().mean(dim=(0, 2), keepdim=True))
    center.mul_(momentum).add_(batch, alpha=1 - momentum)


def match_cells(loc_a: Tensor, loc_b: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """For every A cell the nearest B cell; keep the ``n`` A cells with the smallest distance (ascending cell
    order). ``loc_*`` (B, N, 2) -> ``(keep_a, pick_b, distance)``, each (B, n); no distance threshold."""
    d = torch.cdist(loc_a.float(), loc_b.float())
    dist, nearest = d.min(dim=2)
    keep = dist.argsort(dim=1, stable=True)[:, :n].sort(dim=1).values  # ties: lower cell index first
    return keep, torch.gather(nearest, 1, keep), torch.gather(dist, 1, keep)
