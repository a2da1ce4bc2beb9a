"""Regression on one number: the model learns the standardised target with a mean squared error loss.

The train split's mean and standard deviation are learned by :meth:`fit` and saved with the model,
so answers and metrics are in the target's own units. Reports MAE, MSE (lower is better) and R².
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mmops.core.metrics import regression_metrics
from mmops.core.tasks import HIGHER, LOWER, Task

if TYPE_CHECKING:
    import torch


class RegressionTask(Task):
    metrics: ClassVar[Mapping[str, str]] = {"mae": LOWER, "mse": LOWER, "r2": HIGHER}
    example_targets = ("1.5", "-2", "0.25", "3", "10")

    def __init__(self, labels=(), mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__(labels)
        self.mean, self.std = float(mean), float(std)

    def parse(self, cell: str) -> float:
        try:
            value = float(cell)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError("the target must be a number (regression)")
        return value

    def vocabulary(self, train_values: Iterable[Any]) -> list[str]:
        return []

    def encode(self, value: Any, index: Mapping[str, int]) -> float:
        return float(value)

    def fit(self, targets: np.ndarray) -> RegressionTask:
        y = np.asarray(targets, dtype=np.float64)
        self.mean, self.std = (float(y.mean()), float(y.std() or 1.0)) if len(y) else (0.0, 1.0)
        return self

    @property
    def output_dim(self) -> int:
        return 1

    def targets(self, stored) -> np.ndarray:
        return np.asarray(stored, dtype=np.float64)

    def loss(self, outputs: torch.Tensor, targets: np.ndarray) -> torch.Tensor:
        import torch
        from torch.nn import functional

        scaled = torch.from_numpy(((targets - self.mean) / self.std).astype(np.float32)).unsqueeze(1)
        return functional.mse_loss(outputs, scaled)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs * self.std + self.mean

    def combine(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The members' mean (of the standardised outputs: :meth:`scores` is linear, so it is the mean
        prediction; a subclass that clips, like sentiment, clips the mean)."""
        import torch

        return torch.stack([o.float() for o in outputs]).mean(dim=0)

    def evaluate(self, targets: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None) -> dict:
        return regression_metrics(np.asarray(targets, dtype=np.float64), scores[:, 0].astype(np.float64))

    def describe(self, targets: np.ndarray, scores: np.ndarray, metrics: Mapping[str, Any]) -> dict[str, Any]:
        error = np.abs(scores[:, 0] - targets)
        return {
            "target": [f"{v:.6g}" for v in targets],
            "prediction": [f"{v:.6g}" for v in scores[:, 0]],
            "confidence": np.full(len(targets), np.nan),
            "correct": error <= metrics.get("mae", 0.0),
            "error": error,
        }

    def answers(self, scores: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
        return [{"answer": round(float(v), 6), "top_k": []} for v in scores[:, 0]]
