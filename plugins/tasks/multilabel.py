"""Multi-label classification: one sigmoid per label, binary cross-entropy, labels over a threshold.

A cell holds a row's labels joined by ``separator``. Reports micro- and macro-F1 at the threshold,
mean average precision and subset accuracy, with per-label figures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mmops.core.metrics import multilabel_metrics
from mmops.core.tasks import HIGHER, Task

if TYPE_CHECKING:
    import torch


class MultilabelTask(Task):
    metrics: ClassVar[Mapping[str, str]] = {"micro_f1": HIGHER, "macro_f1": HIGHER, "map": HIGHER}
    example_targets = ("a|b", "b", "c|a", "a", "b|c")

    def __init__(self, labels=(), threshold: float = 0.5, separator: str = "|") -> None:
        super().__init__(labels)
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        self.threshold, self.separator = float(threshold), separator

    def parse(self, cell: str) -> tuple[str, ...]:
        labels = tuple(sorted({p.strip() for p in cell.split(self.separator) if p.strip()}))
        if not labels:
            raise ValueError(f"no labels (separate them with '{self.separator}')")
        return labels

    def vocabulary(self, train_values: Iterable[Any]) -> list[str]:
        return sorted({label for labels in train_values for label in labels})

    def encode(self, value: Any, index: Mapping[str, int]) -> list[int]:
        return [index[label] for label in value]

    def targets(self, stored) -> np.ndarray:
        out = np.zeros((len(stored), len(self.labels)), dtype=np.float32)
        for i, labels in enumerate(stored):
            out[i, list(labels)] = 1.0
        return out

    def loss(self, outputs: torch.Tensor, targets: np.ndarray) -> torch.Tensor:
        import torch
        from torch.nn import functional

        return functional.binary_cross_entropy_with_logits(outputs, torch.from_numpy(targets))

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.sigmoid()

    def combine(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The logit of the members' mean probability per label, so :meth:`scores` is that mean. Computed
        from log-sigmoids: a saturated member (p = 1 in float32) gives no infinite logit."""
        import torch
        from torch.nn import functional

        stacked, log_n = torch.stack([o.float() for o in outputs]), math.log(len(outputs))
        log_p = functional.logsigmoid(stacked).logsumexp(dim=0) - log_n
        log_not_p = functional.logsigmoid(-stacked).logsumexp(dim=0) - log_n
        return log_p - log_not_p

    def evaluate(self, targets: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None) -> dict:
        return multilabel_metrics(targets, scores, self.threshold, self.labels)

    def describe(self, targets: np.ndarray, scores: np.ndarray, metrics: Mapping[str, Any]) -> dict[str, Any]:
        predicted, truth = scores >= self.threshold, targets.astype(bool)
        return {
            "target": ["|".join(self.labels[j] for j in np.flatnonzero(t)) for t in truth],
            "prediction": ["|".join(self.labels[j] for j in np.flatnonzero(p)) for p in predicted],
            "confidence": np.abs(scores - self.threshold).mean(1),
            "correct": (predicted == truth).all(1),
            "error": np.full(len(targets), np.nan),
        }

    def answers(self, scores: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
        top = scores.topk(max(1, min(top_k, scores.shape[1])), dim=1)
        return [
            {
                "answer": [self.labels[j] for j in (row >= self.threshold).nonzero().flatten().tolist()],
                "top_k": [
                    {"answer": self.labels[int(i)], "probability": round(float(p), 6)}
                    for p, i in zip(pr, idx, strict=True)
                ],
            }
            for row, pr, idx in zip(scores, top.values, top.indices, strict=True)
        ]
