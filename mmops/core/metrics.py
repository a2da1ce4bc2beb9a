"""Metric implementations the built-in task plugins share: classification, multi-label, regression.

Classification also reports calibration (expected calibration error and the reliability bins),
because a model that is right 90% of the time but says 99% misleads whoever acts on its scores.

Macro-F1 (classes and labels alike) is the mean F1 over the classes present in the split, in its rows
or its predictions (y_true ∪ y_pred, as scikit-learn's default ``labels``); a prediction of a class the
data no longer has counts as a miss, not as a class.
"""

from __future__ import annotations

import itertools

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    r2_score,
)

CALIBRATION_BINS = 10


def calibration(labels: np.ndarray, probs: np.ndarray, bins: int = CALIBRATION_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error (Guo et al., "On Calibration of Modern Neural Networks", 2017) over
    equal-width confidence bins, and the bins for a reliability diagram."""
    confidence, predicted = probs.max(1), probs.argmax(1)
    correct = predicted == labels
    edges = np.linspace(0, 1, bins + 1)
    ece, table = 0.0, []
    for lower, upper in itertools.pairwise(edges):
        inside = (confidence > lower) & (confidence <= upper)
        if not inside.any():
            continue
        conf, acc = float(confidence[inside].mean()), float(correct[inside].mean())
        ece += inside.mean() * abs(conf - acc)
        table.append(
            {
                "bin_lower": float(lower),
                "bin_upper": float(upper),
                "confidence": conf,
                "accuracy": acc,
                "count": int(inside.sum()),
            }
        )
    return float(ece), table


def _per_class(precision, recall, f1, support, names: list[str], extra: dict | None = None) -> dict:
    return {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
            **({k: float(v[i]) for k, v in extra.items()} if extra else {}),
        }
        for i, name in enumerate(names)
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's ``zero_division=0``)."""
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def classification_metrics(
    labels: np.ndarray,
    predictions: np.ndarray,
    n_classes: int,
    groups: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    names: list[str] | None = None,
) -> dict:
    """Everything from one confusion matrix: training calls this every epoch, and scikit-learn's input
    validation cost more than the epoch itself on cached features."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    known = (labels >= 0) & (labels < n_classes) & (predictions >= 0) & (predictions < n_classes)
    confusion = np.bincount(labels[known] * n_classes + predictions[known], minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )
    # A prediction outside the classes (a label an older model never knew) is still a miss.
    support = np.bincount(labels[(labels >= 0) & (labels < n_classes)], minlength=n_classes)
    predicted = np.bincount(predictions[(predictions >= 0) & (predictions < n_classes)], minlength=n_classes)
    tp = np.diag(confusion)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * tp, support + predicted)
    # Macro-F1 averages over the classes present in this split (a row of it, or a prediction), as
    # scikit-learn does without ``labels=``: a class with no rows and no predictions here has no F1,
    # and counting it as 0 would give a perfect split a macro-F1 below 1.
    present = (support + predicted) > 0
    metrics: dict = {
        "accuracy": float((labels == predictions).mean()) if len(labels) else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "n": len(labels),
    }
    if probs is not None and len(labels):
        metrics["ece"], metrics["calibration"] = calibration(labels, probs)
    if groups is not None:
        metrics["by_type"] = {
            str(g): float((labels[groups == g] == predictions[groups == g]).mean()) for g in np.unique(groups)
        }
    if names is not None:
        metrics["per_class"] = _per_class(precision, recall, f1, support, names)
    metrics["confusion"] = confusion.tolist()
    return metrics


def multilabel_metrics(targets: np.ndarray, scores: np.ndarray, threshold: float, names: list[str]) -> dict:
    """``targets`` and ``scores`` are ``(rows, labels)``: 0/1 and sigmoid scores."""
    predicted = (scores >= threshold).astype(np.int64)
    targets = targets.astype(np.int64)
    present = targets.sum(0) > 0  # AP is undefined for a label with no positive row
    ap = np.array(
        [
            average_precision_score(targets[:, j], scores[:, j]) if present[j] else np.nan
            for j in range(targets.shape[1])
        ]
    )
    p, r, f, s = precision_recall_fscore_support(targets, predicted, zero_division=0)
    labelled = (s + predicted.sum(0)) > 0  # as for classes: macro-F1 over the labels present in the split
    return {
        "micro_f1": float(f1_score(targets, predicted, average="micro", zero_division=0)),
        "macro_f1": float(f[labelled].mean()) if labelled.any() else 0.0,
        "map": float(np.nanmean(ap)) if present.any() else 0.0,
        "subset_accuracy": float((predicted == targets).all(1).mean()) if len(targets) else 0.0,
        "threshold": threshold,
        "n": len(targets),
        "per_class": _per_class(p, r, f, s, names, {"ap": np.nan_to_num(ap)}),
    }


def regression_metrics(targets: np.ndarray, predictions: np.ndarray) -> dict:
    if not len(targets):
        return {"mse": 0.0, "mae": 0.0, "r2": 0.0, "n": 0}
    return {
        "mse": float(mean_squared_error(targets, predictions)),
        "mae": float(mean_absolute_error(targets, predictions)),
        "r2": float(r2_score(targets, predictions)) if len(targets) > 1 else 0.0,
        "n": len(targets),
    }
