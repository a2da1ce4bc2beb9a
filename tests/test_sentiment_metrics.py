"""The sentiment task's metrics against hand-worked cases of MMSA's ``metricsTop`` definitions.

Every figure below was worked out by hand (the working is in the comments), not by running the code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mmops_plugins.tasks.sentiment import SentimentTask, sentiment_metrics

from mmops.core.plugin_registry import get_task

# Eight rows; two have the label 0 (rows 2 and 3), which "has0" counts as positive and "non0" drops.
Y = np.array([-3.0, -1.5, 0.0, 0.0, 0.5, 2.5, 1.0, -0.4])
P = np.array([-2.0, 0.3, 0.0, -0.2, 1.6, 2.9, -0.6, -0.5])


def test_mae():
    # |errors| = 1.0, 1.8, 0, 0.2, 1.1, 0.4, 1.6, 0.1 -> 6.2 / 8
    assert sentiment_metrics(Y, P)["mae"] == pytest.approx(0.775)


def test_acc2_and_weighted_f1_with_zero_labels_kept():
    # has0: positive is >= 0. truth T = rows 2..6; predicted T = rows 1, 2, 4, 5.
    # right: rows 0, 2, 4, 5, 7 -> 5/8.
    # positive class (support 5): TP 3 (rows 2, 4, 5), FP 1 (row 1), FN 2 (rows 3, 6): F1 = 6/9
    # negative class (support 3): TP 2 (rows 0, 7), FP 2 (rows 3, 6), FN 1 (row 1): F1 = 4/7
    # weighted: (5 * 6/9 + 3 * 4/7) / 8 = 53/84
    m = sentiment_metrics(Y, P)
    assert m["acc2_has0"] == pytest.approx(5 / 8)
    assert m["f1_has0"] == pytest.approx(53 / 84)


def test_acc2_and_weighted_f1_without_zero_labels():
    # non0: rows 2 and 3 (label 0) dropped; positive is > 0. Six rows:
    # y -3 -1.5 0.5 2.5 1.0 -0.4 / p -2 0.3 1.6 2.9 -0.6 -0.5: right 4/6.
    # each class: TP 2, FP 1, FN 1 -> F1 2/3, supports 3 and 3 -> weighted 2/3.
    m = sentiment_metrics(Y, P)
    assert m["acc2_non0"] == pytest.approx(4 / 6)
    assert m["f1_non0"] == pytest.approx(2 / 3)
    assert m["n"] == 8 and m["n_non0"] == 6


def test_has0_and_non0_differ_exactly_on_the_zero_labels():
    # A row labelled 0 predicted -0.2 is wrong for has0 (0 >= 0 is positive) and absent from non0.
    m = sentiment_metrics(np.array([0.0, 1.0, -1.0]), np.array([-0.2, 2.0, -2.0]))
    assert m["acc2_has0"] == pytest.approx(2 / 3)
    assert m["acc2_non0"] == 1.0
    # ... and predicted 0.0 it is right for has0.
    assert sentiment_metrics(np.array([0.0]), np.array([0.0]))["acc2_has0"] == 1.0


def test_acc7_and_acc5_round_halves_to_even_after_clipping():
    # acc7, clip to [-3, 3] then round (halves to even, as numpy and MMSA do):
    #   y -> -3, -2, 0, 0, 0, 2, 1, -0      (-1.5 -> -2, 0.5 -> 0, 2.5 -> 2)
    #   p -> -2,  0, 0, -0, 2, 3, -1, -0    (-0.5 -> -0)
    #   equal: rows 2, 3, 7 -> 3/8
    # acc5, clip to [-2, 2] first:
    #   y -> -2, -2, 0, 0, 0, 2, 1, -0;  p -> -2, 0, 0, -0, 2, 2, -1, -0
    #   equal: rows 0, 2, 3, 5, 7 -> 5/8
    m = sentiment_metrics(Y, P)
    assert m["acc7"] == pytest.approx(3 / 8)
    assert m["acc5"] == pytest.approx(5 / 8)


def test_pearson_correlation():
    # y 1 2 3, p 1 3 2: deviations (-1, 0, 1) and (-1, 1, 0): covariance sum 1, variance sums 2 and 2 -> 1/2
    assert sentiment_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0]))["corr"] == pytest.approx(0.5)
    # constant predictions: undefined, reported as 0 (never NaN, which would poison selection)
    assert sentiment_metrics(np.array([1.0, 2.0, 3.0]), np.zeros(3))["corr"] == 0.0


def test_all_zero_labels_leave_non0_empty():
    m = sentiment_metrics(np.zeros(3), np.array([0.5, -0.5, 0.0]))
    assert m["n_non0"] == 0 and m["acc2_non0"] == 0.0 and m["f1_non0"] == 0.0
    assert m["acc2_has0"] == pytest.approx(2 / 3)


def test_the_task_selects_on_val_mae_clips_scores_and_refuses_labels_off_the_scale():
    task = get_task("sentiment")
    assert task is SentimentTask
    assert next(iter(task.metrics)) == "mae" and task.direction("val_mae") == "min"
    assert task.direction("acc2_non0") == "max"
    t = SentimentTask().fit(np.array([-2.0, 0.0, 2.0]))
    scores = t.scores(torch.tensor([[100.0], [-100.0], [0.0]]))
    assert scores[:, 0].tolist() == [3.0, -3.0, 0.0]
    answers = t.answers(scores, 3)
    assert [a["sentiment"] for a in answers] == ["positive", "negative", "neutral"]
    with pytest.raises(ValueError, match=r"outside \[-3, 3\]"):
        t.parse("3.5")
    assert t.parse("-2.8") == -2.8
    # the evaluated metrics are those of the scores' first column
    assert t.evaluate(Y, P[:, None])["mae"] == pytest.approx(0.775)
