"""Change-class metrics against hand-computed confusion matrices, edge cases included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cdmap.metrics import ConfusionCounts, best_threshold


def test_from_arrays_counts_and_valid_mask():
    pred = np.array([[1, 1, 0, 0], [1, 0, 0, 1]], dtype=bool)
    truth = np.array([[1, 0, 1, 0], [1, 0, 0, 0]], dtype=np.uint8) * 255  # any non-zero is change
    c = ConfusionCounts.from_arrays(pred, truth)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 2, 1, 3)
    assert all(isinstance(v, int) for v in c.as_list())
    valid = np.ones_like(pred)
    valid[0, 1] = False  # drop one FP
    c2 = ConfusionCounts.from_arrays(pred, truth, valid)
    assert (c2.tp, c2.fp, c2.fn, c2.tn) == (2, 1, 1, 3)


def test_hand_computed_metrics():
    c = ConfusionCounts(tp=40, fp=10, fn=20, tn=930)
    m = c.metrics()
    assert m["precision"] == pytest.approx(0.8)
    assert m["recall"] == pytest.approx(40 / 60)
    p, r = 0.8, 40 / 60
    assert m["f1"] == pytest.approx(2 * p * r / (p + r))
    assert m["iou"] == pytest.approx(40 / 70)
    assert m["oa"] == pytest.approx(970 / 1000)
    po = 0.97
    pe = (50 / 1000) * (60 / 1000) + (950 / 1000) * (940 / 1000)
    assert m["kappa"] == pytest.approx((po - pe) / (1 - pe))
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (40, 10, 20, 930)


def test_add_accumulates():
    a = ConfusionCounts(1, 2, 3, 4)
    b = ConfusionCounts(10, 20, 30, 40)
    assert (a + b).as_list() == [11, 22, 33, 44]
    a.add(b)
    assert a.as_list() == [11, 22, 33, 44]


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        # no change in truth, none predicted: perfect
        ((0, 0, 0, 100), dict(precision=1.0, recall=1.0, f1=1.0, iou=1.0, oa=1.0, kappa=1.0)),
        # all change, all predicted: perfect
        ((100, 0, 0, 0), dict(precision=1.0, recall=1.0, f1=1.0, iou=1.0, oa=1.0, kappa=1.0)),
        # no true change but some predicted: recall undefined -> 0, precision 0
        ((0, 5, 0, 95), dict(precision=0.0, recall=0.0, f1=0.0, iou=0.0, oa=0.95, kappa=0.0)),
        # change missed entirely, nothing predicted: precision undefined -> 0
        ((0, 0, 5, 95), dict(precision=0.0, recall=0.0, f1=0.0, iou=0.0, oa=0.95, kappa=0.0)),
        # everything predicted as change, half is
        ((50, 50, 0, 0), dict(precision=0.5, recall=1.0, f1=2 / 3, iou=0.5, oa=0.5, kappa=0.0)),
        # empty matrix
        ((0, 0, 0, 0), dict(precision=1.0, recall=1.0, f1=1.0, iou=1.0, oa=1.0, kappa=1.0)),
    ],
)
def test_edge_cases_do_not_divide_by_zero(counts, expected):
    m = ConfusionCounts(*counts).metrics()
    for k, v in expected.items():
        assert m[k] == pytest.approx(v), k
        assert not math.isnan(m[k])


def test_kappa_matches_float_formula_on_random_matrices():
    rng = np.random.default_rng(1)
    for _ in range(50):
        tp, fp, fn, tn = (int(x) for x in rng.integers(1, 1000, 4))
        n = tp + fp + fn + tn
        po = (tp + tn) / n
        pe = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / n**2
        assert ConfusionCounts(tp, fp, fn, tn).kappa == pytest.approx((po - pe) / (1 - pe))


def test_negative_counts_rejected():
    with pytest.raises(ValueError):
        ConfusionCounts(-1, 0, 0, 0)


def test_histogram_counts_and_best_threshold():
    bins = 8
    # positives have p in bins 5..7, negatives in bins 0..4 except a few at 5
    pos = np.array([0, 0, 1, 0, 0, 10, 10, 10])
    neg = np.array([50, 20, 10, 5, 0, 3, 0, 0])
    c = ConfusionCounts.from_histograms(pos, neg, 4)  # threshold 0.5
    assert c.as_list() == [30, 3, 1, 85]
    thr, best = best_threshold(pos, neg)
    # k=5 (0.625): tp 30 fp 3 fn 1 -> F1 60/64; k=6: tp 20 fp 0 fn 11 -> 40/51; k=4 same as k=5 (bin 4 empty)
    assert best.f1 == pytest.approx(60 / 64)
    assert thr in (4 / bins, 5 / bins)
    assert thr == 4 / bins  # tie -> nearest 0.5
    thr0, _ = best_threshold(np.zeros(bins, int), neg)
    assert thr0 == 0.5


def test_histogram_threshold_is_exact_against_pixels():
    rng = np.random.default_rng(0)
    p = rng.random(5000).astype(np.float32)
    truth = rng.random(5000) < p  # calibrated-ish
    bins = 256
    k = np.clip(np.floor(p * bins), 0, bins - 1).astype(int)
    pos = np.bincount(k[truth], minlength=bins)
    neg = np.bincount(k[~truth], minlength=bins)
    thr, best = best_threshold(pos, neg)
    direct = ConfusionCounts.from_arrays(p >= thr, truth)
    assert direct.as_list() == best.as_list()
    for t in (0.25, 0.5, 0.75):
        assert ConfusionCounts.from_histograms(pos, neg, int(t * bins)).as_list() == \
            ConfusionCounts.from_arrays(p >= t, truth).as_list()
