"""Single-label classification: softmax over the classes seen in training, cross-entropy loss.

Reports accuracy and macro-F1 (over the classes present in the split), expected calibration error
with its reliability bins, per-class precision/recall/F1 and the confusion matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mmops.core.metrics import classification_metrics
from mmops.core.tasks import HIGHER, Task

if TYPE_CHECKING:
    import torch


class ClassificationTask(Task):
    metrics: ClassVar[Mapping[str, str]] = {"accuracy": HIGHER, "macro_f1": HIGHER}
    stratify = True

    def __init__(self, labels: Iterable[str] = (), label_smoothing: float = 0.0) -> None:
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        super().__init__(list(labels))
        self.label_smoothing = float(label_smoothing)  # target.params.label_smoothing: softer targets

    def vocabulary(self, train_values: Iterable[Any]) -> list[str]:
        return sorted(set(train_values))

    def encode(self, value: Any, index: Mapping[str, int]) -> int:
        return index[value]

    def targets(self, stored) -> np.ndarray:
        return np.asarray(stored, dtype=np.int64)

    def loss(self, outputs: torch.Tensor, targets: np.ndarray) -> torch.Tensor:
        import torch
        from torch.nn import functional

        return functional.cross_entropy(
            outputs, torch.from_numpy(np.asarray(targets, dtype=np.int64)), label_smoothing=self.label_smoothing
        )

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.softmax(dim=1)

    def combine(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The log of the members' mean probability, so :meth:`scores` is that mean: a deep ensemble
        averages probabilities, not logits (Lakshminarayanan et al., 2017)."""
        import torch

        log_probs = torch.stack([o.float().log_softmax(dim=1) for o in outputs])
        return log_probs.logsumexp(dim=0) - math.log(len(outputs))

    def evaluate(self, targets: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None) -> dict:
        return classification_metrics(targets, scores.argmax(1), len(self.labels), groups, scores, self.labels)

    def describe(self, targets: np.ndarray, scores: np.ndarray, metrics: Mapping[str, Any]) -> dict[str, Any]:
        predicted = scores.argmax(1)
        return {
            "target": [self.labels[i] for i in targets],
            "prediction": [self.labels[i] for i in predicted],
            "confidence": scores.max(1),
            "correct": targets == predicted,
            "error": np.full(len(targets), np.nan),
        }

    def answers(self, scores: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
        top = scores.topk(max(1, min(top_k, scores.shape[1])), dim=1)
        return [
            {
                "answer": self.labels[int(idx[0])],
                "top_k": [
                    {"answer": self.labels[int(i)], "probability": round(float(p), 6)}
                    for p, i in zip(pr, idx, strict=True)
                ],
            }
            for pr, idx in zip(top.values, top.indices, strict=True)
        ]
