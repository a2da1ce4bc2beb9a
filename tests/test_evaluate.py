"""Metrics by task: the fast confusion-matrix path agrees with scikit-learn; calibration is sound."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from mmops.core.metrics import calibration, classification_metrics, multilabel_metrics, regression_metrics


def test_classification_metrics_match_scikit_learn_including_unknown_predictions() -> None:
    rng = np.random.default_rng(0)
    warnings.simplefilter("ignore")
    for _ in range(200):
        n, k = int(rng.integers(1, 60)), int(rng.integers(1, 8))
        y, p = rng.integers(0, k, n), rng.integers(-1, k, n)  # -1: a label the model never knew
        m = classification_metrics(y, p, k, names=[str(i) for i in range(k)])
        classes = np.arange(k)
        present = sorted(set(y) | set(p[p >= 0]))  # y_true ∪ y_pred; -1 is a miss, not a class
        assert np.isclose(m["macro_f1"], f1_score(y, p, labels=present, average="macro", zero_division=0))
        assert m["confusion"] == confusion_matrix(y, p, labels=classes).tolist()
        ref = precision_recall_fscore_support(y, p, labels=classes, zero_division=0)
        for key, values in zip(("precision", "recall", "f1", "support"), ref, strict=True):
            assert np.allclose([m["per_class"][str(i)][key] for i in range(k)], values)


def test_calibration_of_a_perfectly_calibrated_and_an_overconfident_model() -> None:
    labels = np.array([0] * 80 + [1] * 20)
    honest = np.tile([0.8, 0.2], (100, 1))  # says 80% and is right 80% of the time
    ece, bins = calibration(labels, honest)
    assert np.isclose(ece, 0) and len(bins) == 1
    assert bins[0]["count"] == 100 and np.isclose(bins[0]["confidence"], 0.8) and np.isclose(bins[0]["accuracy"], 0.8)
    overconfident = np.tile([0.99, 0.01], (100, 1))
    assert np.isclose(calibration(labels, overconfident)[0], 0.19)


def test_multilabel_and_regression_metrics() -> None:
    targets = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    scores = np.array([[0.9, 0.2], [0.1, 0.8], [0.7, 0.4], [0.2, 0.1]])
    m = multilabel_metrics(targets, scores, 0.5, ["a", "b"])
    assert m["subset_accuracy"] == 0.75 and np.isclose(m["micro_f1"], 0.8571428571) and m["map"] == 1.0
    r = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    assert np.isclose(r["mae"], 1 / 3) and np.isclose(r["mse"], 1 / 3) and r["r2"] == 0.5


def test_macro_f1_averages_over_the_classes_present_in_the_split() -> None:
    # Issue 17: a test split with accuracy 1.0 showed macro-F1 0.909 (an absent class counted as F1 = 0).
    y = np.array([0, 0, 1, 2, 2])
    perfect = classification_metrics(y, y, n_classes=4, names=["a", "b", "c", "d"])  # "d" has no row here
    assert perfect["accuracy"] == 1.0 and perfect["macro_f1"] == 1.0
    assert np.isclose(perfect["macro_f1"], f1_score(y, y, average="macro"))
    # A class that is only predicted is present: its F1 of 0 counts.
    m = classification_metrics(y, np.array([0, 0, 1, 2, 3]), n_classes=4)
    assert np.isclose(m["macro_f1"], f1_score(y, [0, 0, 1, 2, 3], average="macro", zero_division=0))
    assert classification_metrics(np.array([], dtype=int), np.array([], dtype=int), 3)["macro_f1"] == 0.0
    # Multi-label: a label no row has and no row is predicted is left out too.
    targets = np.array([[1, 0, 0], [0, 1, 0]])
    ml = multilabel_metrics(targets, targets.astype(float), 0.5, ["a", "b", "c"])
    assert ml["macro_f1"] == 1.0 and ml["subset_accuracy"] == 1.0
