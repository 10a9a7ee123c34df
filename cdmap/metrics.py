"""Change-detection metrics of the *change* class from a binary confusion matrix.

Counts are accumulated over a whole split (or scene) at native resolution, never averaged per image
(design notes §11). Conventions when a denominator is zero, chosen so that no metric divides by zero and a
perfect prediction always scores 1:

- precision ``tp/(tp+fp)``: with no predicted change it is 1.0 when there was no change to find (fn == 0),
  else 0.0;
- recall ``tp/(tp+fn)``: with no true change it is 1.0 when nothing was predicted (fp == 0), else 0.0;
- F1 ``2tp/(2tp+fp+fn)`` (equal to 2PR/(P+R) when defined) and IoU ``tp/(tp+fp+fn)``: 1.0 when
  tp = fp = fn = 0 (no change in truth, none predicted), else the formula (0.0 when tp == 0);
- overall accuracy: 1.0 for an empty matrix;
- Cohen's kappa ``(po-pe)/(1-pe)``: its denominator is zero only when truth and prediction are both entirely
  one class (or the matrix is empty), i.e. perfect agreement, and kappa is then 1.0.

Kappa is computed exactly from integers as ``2(tp*tn - fn*fp) / ((tp+fp)(fp+tn) + (tp+fn)(fn+tn))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

METRIC_NAMES = ("precision", "recall", "f1", "iou", "oa", "kappa")


@dataclass
class ConfusionCounts:
    """Binary confusion counts (change = positive) as Python ints."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __post_init__(self) -> None:
        for name in ("tp", "fp", "fn", "tn"):
            value = int(getattr(self, name))
            if value < 0:
                raise ValueError(f"confusion count {name} must be >= 0, got {value}")
            setattr(self, name, value)

    @classmethod
    def from_arrays(cls, pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> ConfusionCounts:
        """Count from boolean-like arrays of the same shape (non-zero = change); ``valid`` masks pixels in."""
        pred = np.asarray(pred).astype(bool, copy=False)
        truth = np.asarray(truth).astype(bool, copy=False)
        if pred.shape != truth.shape:
            raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
        if valid is not None:
            valid = np.asarray(valid).astype(bool, copy=False)
            if valid.shape != pred.shape:
                raise ValueError(f"valid mask shape {valid.shape} != prediction shape {pred.shape}")
            pred = pred[valid]
            truth = truth[valid]
        n = int(pred.size)
        tp = int(np.count_nonzero(pred & truth))
        n_pred = int(np.count_nonzero(pred))
        n_true = int(np.count_nonzero(truth))
        fp = n_pred - tp
        fn = n_true - tp
        return cls(tp=tp, fp=fp, fn=fn, tn=n - tp - fp - fn)

    @classmethod
    def from_histograms(cls, pos_hist: np.ndarray, neg_hist: np.ndarray, threshold_bin: int) -> ConfusionCounts:
        """Counts for "change if bin >= threshold_bin" from per-class probability histograms."""
        pos = np.asarray(pos_hist, dtype=np.int64)
        neg = np.asarray(neg_hist, dtype=np.int64)
        tp = int(pos[threshold_bin:].sum())
        fp = int(neg[threshold_bin:].sum())
        return cls(tp=tp, fp=fp, fn=int(pos.sum()) - tp, tn=int(neg.sum()) - fp)

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def add(self, other: ConfusionCounts) -> ConfusionCounts:
        """Add ``other`` into this one (in place) and return self."""
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.tn += other.tn
        return self

    def __add__(self, other: ConfusionCounts) -> ConfusionCounts:
        return ConfusionCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def as_list(self) -> list[int]:
        return [self.tp, self.fp, self.fn, self.tn]

    # ----- metrics -------------------------------------------------------------------------------------------
    @property
    def precision(self) -> float:
        if self.tp + self.fp == 0:
            return 1.0 if self.fn == 0 else 0.0
        return self.tp / (self.tp + self.fp)

    @property
    def recall(self) -> float:
        if self.tp + self.fn == 0:
            return 1.0 if self.fp == 0 else 0.0
        return self.tp / (self.tp + self.fn)

    @property
    def f1(self) -> float:
        den = 2 * self.tp + self.fp + self.fn
        return 1.0 if den == 0 else 2 * self.tp / den

    @property
    def iou(self) -> float:
        den = self.tp + self.fp + self.fn
        return 1.0 if den == 0 else self.tp / den

    @property
    def oa(self) -> float:
        return 1.0 if self.total == 0 else (self.tp + self.tn) / self.total

    @property
    def kappa(self) -> float:
        tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
        den = (tp + fp) * (fp + tn) + (tp + fn) * (fn + tn)
        return 1.0 if den == 0 else 2 * (tp * tn - fn * fp) / den

    def metrics(self) -> dict[str, float | int]:
        """``{precision, recall, f1, iou, oa, kappa, tp, fp, fn, tn}``."""
        out: dict[str, float | int] = {name: float(getattr(self, name)) for name in METRIC_NAMES}
        out.update(tp=self.tp, fp=self.fp, fn=self.fn, tn=self.tn)
        return out


def metrics_dict(counts: ConfusionCounts) -> dict[str, float | int]:
    """The metrics of ``counts`` as a plain dict (see :meth:`ConfusionCounts.metrics`)."""
    return counts.metrics()


def best_threshold(pos_hist: np.ndarray, neg_hist: np.ndarray) -> tuple[float, ConfusionCounts]:
    """The threshold on P(change) maximising F1, from per-class probability histograms over [0, 1].

    Bin ``k`` of ``n`` holds probabilities in ``[k/n, (k+1)/n)``; candidate thresholds are ``k/n`` for
    ``k = 1..n-1`` (prediction: change if p >= k/n), so the result is exact, not a bin-centre approximation.
    Ties go to the candidate nearest 0.5. With no change in the histograms 0.5 is returned.
    """
    pos = np.asarray(pos_hist, dtype=np.int64)
    neg = np.asarray(neg_hist, dtype=np.int64)
    n = pos.shape[0]
    if neg.shape != pos.shape:
        raise ValueError("histograms must have the same number of bins")
    half = n // 2
    if pos.sum() == 0:
        return half / n, ConfusionCounts.from_histograms(pos, neg, half)
    tp = np.cumsum(pos[::-1])[::-1]  # tp[k] = predicted change among positives for threshold bin k
    fp = np.cumsum(neg[::-1])[::-1]
    fn = pos.sum() - tp
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    ks = np.arange(1, n)
    scores = f1[1:]
    best = scores.max()
    candidates = ks[scores >= best - 1e-12]
    k = int(candidates[np.argmin(np.abs(candidates - half))])
    return k / n, ConfusionCounts.from_histograms(pos, neg, k)


def accumulate_histograms(prob: torch.Tensor, label: torch.Tensor, pos_hist: torch.Tensor,
                          neg_hist: torch.Tensor) -> None:
    """Add per-class histograms of ``prob`` (bin k holds [k/n, (k+1)/n)) over valid pixels of ``label``."""
    import torch

    bins = pos_hist.shape[0]
    k = (prob * bins).floor_().clamp_(0, bins - 1).long()
    pos_hist += torch.bincount(k[label == 1], minlength=bins)
    neg_hist += torch.bincount(k[label == 0], minlength=bins)
