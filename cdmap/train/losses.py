"""The reference loss: 2-class softmax cross-entropy + soft Dice (design notes §9), with an ignore index.

``loss = ce_weight * CE + dice_weight * (1 - mean_c dice_c)`` where, over every valid pixel of the whole batch
(batch-global), ``dice_c = 2 * sum(p_c * y_c) / (sum(p_c + y_c) + eps)`` for both classes (background included),
``p`` the softmax probabilities and ``y`` the one-hot target. Pixels whose label equals ``ignore_index`` count in
neither term. Computed in float32 whatever the autocast dtype of the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cdmap.data import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "CEDiceLoss", "cross_entropy_loss", "dice_loss"]


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX, eps: float = 1e-7
) -> torch.Tensor:
    """``1 - mean_c dice_c`` over all valid pixels of the batch; ``logits`` (B,C,H,W), ``target`` (B,H,W)."""
    num_classes = logits.shape[1]
    prob = torch.softmax(logits.float(), dim=1)
    valid = target != ignore_index
    tgt = torch.where(valid, target, torch.zeros_like(target)).long()
    onehot = F.one_hot(tgt, num_classes).permute(0, 3, 1, 2).to(prob.dtype)
    mask = valid.unsqueeze(1).to(prob.dtype)
    prob = prob * mask
    onehot = onehot * mask
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)
    denom = (prob + onehot).sum(dims)
    dice = 2 * inter / (denom + eps)
    return 1 - dice.mean()


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean softmax cross-entropy over valid pixels; 0 (with a gradient path) when none is valid."""
    target = target.long()
    if not bool((target != ignore_index).any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)


class CEDiceLoss(nn.Module):
    """Cross-entropy + Dice, weights 1:1 by default (the reference "bce+dice")."""

    def __init__(
        self, ignore_index: int = IGNORE_INDEX, ce_weight: float = 1.0, dice_weight: float = 1.0, eps: float = 1e-7
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.eps = eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = cross_entropy_loss(logits, target, self.ignore_index)
        dice = dice_loss(logits, target, self.ignore_index, self.eps)
        return self.ce_weight * ce + self.dice_weight * dice
