"""Ordinal regression by binary decomposition (Niu et al., "Ordinal Regression with Multiple Output CNN
for Age Estimation", CVPR 2016): K ordered levels become K-1 questions "is it above level k?", one
sigmoid each; the predicted level is the number of "yes" answers. Mistakes are measured in levels (MAE),
so "low" for "high" costs more than "low" for "medium", which plain classification cannot express.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional

from mmops.tasks import HIGHER, LOWER, Task


class OrdinalTask(Task):
    metrics: ClassVar[Mapping[str, str]] = {"mae": LOWER, "accuracy": HIGHER}
    stratify = True
    example_targets = ("low", "high", "medium", "low", "medium")

    def __init__(self, labels: Sequence[str] = (), levels: Sequence[str] = ("low", "medium", "high")) -> None:
        super().__init__(labels)
        self.levels = list(levels)
        if len(self.levels) < 2 or len(set(self.levels)) != len(self.levels):
            raise ValueError(f"levels: two or more distinct levels, lowest first; got {self.levels}")

    def parse(self, cell: str) -> str:
        if cell not in self.levels:
            raise ValueError(f"'{cell}' is not one of the levels {self.levels} (set target.params.levels)")
        return cell

    def vocabulary(self, train_values: Iterable[Any]) -> list[str]:
        return list(self.levels)  # the order is the point: never sorted alphabetically

    def encode(self, value: Any, index: Mapping[str, int]) -> int:
        return index[value]

    @property
    def output_dim(self) -> int:
        return len(self.levels) - 1

    def targets(self, stored: Sequence[Any]) -> np.ndarray:
        return np.asarray(stored, dtype=np.int64)

    def loss(self, outputs: torch.Tensor, targets: np.ndarray) -> torch.Tensor:
        above = torch.from_numpy(targets[:, None] > np.arange(self.output_dim)[None, :]).float()
        return functional.binary_cross_entropy_with_logits(outputs, above)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.sigmoid()  # P(level > k) for k = 0 .. K-2

    def _levels(self, scores: np.ndarray) -> np.ndarray:
        return (scores > 0.5).sum(1)

    def evaluate(self, targets: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None) -> dict:
        predicted = self._levels(scores)
        n = len(targets)
        return {
            "mae": float(np.abs(predicted - targets).mean()) if n else 0.0,
            "accuracy": float((predicted == targets).mean()) if n else 0.0,
            "n": n,
        }

    def describe(self, targets: np.ndarray, scores: np.ndarray, metrics: Mapping[str, Any]) -> dict[str, Any]:
        predicted = self._levels(scores)
        return {
            "target": [self.levels[i] for i in targets],
            "prediction": [self.levels[i] for i in predicted],
            "confidence": np.abs(scores - 0.5).mean(1) * 2,
            "correct": predicted == targets,
            "error": np.abs(predicted - targets).astype(float),
        }

    def answers(self, scores: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
        # The K-1 answers are separate sigmoids, so P(level > k) may rise with k: made non-increasing
        # first, the differences are a distribution (non-negative, summing to 1).
        cumulative = torch.cummin(scores, dim=1).values
        above = torch.cat([torch.ones(len(scores), 1), cumulative, torch.zeros(len(scores), 1)], dim=1)
        probs = above[:, :-1] - above[:, 1:]  # P(level = k)
        return [
            {
                "answer": self.levels[int(level)],
                "top_k": [
                    {"answer": self.levels[int(i)], "probability": round(float(p), 6)}
                    for p, i in zip(*row.topk(min(top_k, len(self.levels))), strict=True)
                ],
            }
            for level, row in zip(self._levels(scores.numpy()), probs, strict=True)
        ]
