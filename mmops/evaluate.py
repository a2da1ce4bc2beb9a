"""Metrics for a set of predictions: accuracy, macro-F1, per answer type, confusion matrix."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score


def classification_metrics(
    labels: np.ndarray, predictions: np.ndarray, n_classes: int, groups: np.ndarray | None = None,
) -> dict:
    classes = np.arange(n_classes)
    metrics: dict = {
        "accuracy": float((labels == predictions).mean()) if len(labels) else 0.0,
        "macro_f1": float(f1_score(labels, predictions, labels=classes, average="macro", zero_division=0)),
        "n": len(labels),
    }
    if groups is not None:
        metrics["by_type"] = {
            str(g): float((labels[groups == g] == predictions[groups == g]).mean()) for g in np.unique(groups)
        }
    metrics["confusion"] = confusion_matrix(labels, predictions, labels=classes).tolist()
    return metrics
