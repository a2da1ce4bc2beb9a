"""Multimodal sentiment intensity: regression on [-3, 3] judged by the protocol the field reports.

CMU-MOSI, CMU-MOSEI (and MMSA's tables) label each utterance with the mean of annotators' scores from
-3 (highly negative) to +3 (highly positive) and report, for a regression model, the metrics of MMSA's
``metricsTop`` (``__eval_mosei_regression``). Definitions, with ``y`` the labels and ``p`` the
predictions (mmops keeps full precision where MMSA rounds to 4 decimals):

* ``mae``: mean of ``|p - y|``; ``corr``: Pearson correlation of ``p`` and ``y`` (0 when either is
  constant, where it is undefined);
* ``acc2_has0`` / ``f1_has0``: "has0", zero labels kept: positive means ``>= 0`` for both ``y`` and
  ``p``; accuracy, and F1 weighted by class support (scikit-learn ``average="weighted"``);
* ``acc2_non0`` / ``f1_non0``: "non0", rows whose label is exactly 0 dropped; positive means ``> 0``;
* ``acc5`` / ``acc7``: ``y`` and ``p`` clipped to [-2, 2] / [-3, 3], rounded to the nearest integer
  (NumPy's ``round``: halves to even, so 0.5 -> 0 and 1.5 -> 2, as MMSA computes it), equal.

Training minimises the L1 loss on the standardised target (MMSA trains TFN, LMF and MulT with L1),
and predictions are clipped to the label range (a score outside it is never closer to a label).
Selection defaults to ``val_mae`` (lower is better), as in MMSA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from mmops_plugins.tasks.regression import RegressionTask

from mmops.core.tasks import HIGHER, LOWER

if TYPE_CHECKING:
    import torch


def _weighted_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(truth, predicted, average="weighted", zero_division=0)) if len(truth) else 0.0


def sentiment_metrics(targets: np.ndarray, predictions: np.ndarray) -> dict[str, Any]:
    """MMSA's regression metrics for MOSI/MOSEI (see the module docstring for each definition)."""
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    p = np.asarray(predictions, dtype=np.float64).reshape(-1)
    n = len(y)
    if not n:
        return {name: 0.0 for name in SentimentTask.metrics} | {"n": 0, "n_non0": 0}
    corr = float(np.corrcoef(p, y)[0, 1]) if n > 1 and p.std() > 0 and y.std() > 0 else 0.0
    non0 = y != 0
    has0_truth, has0_pred = y >= 0, p >= 0
    non0_truth, non0_pred = y[non0] > 0, p[non0] > 0
    return {
        "mae": float(np.abs(p - y).mean()),
        "corr": corr,
        "acc2_has0": float((has0_truth == has0_pred).mean()),
        "f1_has0": _weighted_f1(has0_truth, has0_pred),
        "acc2_non0": float((non0_truth == non0_pred).mean()) if non0.any() else 0.0,
        "f1_non0": _weighted_f1(non0_truth, non0_pred),
        "acc5": float((np.round(np.clip(p, -2, 2)) == np.round(np.clip(y, -2, 2))).mean()),
        "acc7": float((np.round(np.clip(p, -3, 3)) == np.round(np.clip(y, -3, 3))).mean()),
        "n": n,
        "n_non0": int(non0.sum()),
    }


def polarity(score: float) -> str:
    return "positive" if score > 0 else "negative" if score < 0 else "neutral"


class SentimentTask(RegressionTask):
    metrics: ClassVar[Mapping[str, str]] = {
        "mae": LOWER,
        "corr": HIGHER,
        "acc2_has0": HIGHER,
        "f1_has0": HIGHER,
        "acc2_non0": HIGHER,
        "f1_non0": HIGHER,
        "acc5": HIGHER,
        "acc7": HIGHER,
    }
    example_targets = ("-3", "0", "1.4", "2.6", "-0.8")

    def __init__(
        self,
        labels=(),
        mean: float = 0.0,
        std: float = 1.0,
        low: float = -3.0,
        high: float = 3.0,
        loss: Literal["l1", "mse"] = "l1",
    ) -> None:
        super().__init__(labels, mean, std)
        if not low < 0 < high:
            raise ValueError(f"sentiment: the range [low, high] must contain 0, got [{low}, {high}]")
        if loss not in ("l1", "mse"):
            raise ValueError(f"sentiment: loss must be l1 or mse, got {loss!r}")
        self.low, self.high, self.loss_name = float(low), float(high), loss

    def config(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "low": self.low, "high": self.high, "loss": self.loss_name}

    def parse(self, cell: str) -> float:
        value = super().parse(cell)
        if not self.low <= value <= self.high:
            raise ValueError(
                f"sentiment {value:g} is outside [{self.low:g}, {self.high:g}] "
                "(set target.params.low/high for another scale)"
            )
        return value

    def loss(self, outputs: torch.Tensor, targets: np.ndarray) -> torch.Tensor:
        import torch
        from torch.nn import functional

        scaled = torch.from_numpy(((targets - self.mean) / self.std).astype(np.float32)).unsqueeze(1)
        scaled = scaled.to(outputs.device)
        return functional.l1_loss(outputs, scaled) if self.loss_name == "l1" else functional.mse_loss(outputs, scaled)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        return (outputs * self.std + self.mean).clamp(self.low, self.high)

    def evaluate(self, targets: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None) -> dict:
        return sentiment_metrics(targets, scores[:, 0])

    def describe(self, targets: np.ndarray, scores: np.ndarray, metrics: Mapping[str, Any]) -> dict[str, Any]:
        out = super().describe(targets, scores, metrics)
        out["correct"] = (scores[:, 0] >= 0) == (np.asarray(targets) >= 0)  # the has0 polarity is right
        return out

    def answers(self, scores: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
        return [{"answer": round(float(v), 6), "sentiment": polarity(float(v)), "top_k": []} for v in scores[:, 0]]
