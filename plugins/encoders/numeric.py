"""Numeric tabular features: standardised with the training mean and std, then a small MLP.

Standardising matters for gradient descent as much as it does for a linear model: raw columns on
different scales (age, income) make one dominate the first layer. ``fit`` stores mean and std as
buffers (they travel in the safetensors file). Missing values (NaN) become the training mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from mmops_plugins.encoders._tabular import table
from torch import nn

from mmops.core.interfaces import Encoder


class NumericEncoder(Encoder):
    modality = "tabular"

    def __init__(self, hidden: int = 64, n_features: int | None = None) -> None:
        super().__init__()
        self.hidden, self.output_dim = hidden, hidden
        self._build(n_features)

    def _build(self, n_features: int | None) -> None:
        self.n_features = n_features
        width = n_features or 0
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        self.mlp = (
            nn.Sequential(nn.Linear(width, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.hidden))
            if width
            else None
        )

    def _array(self, values: Sequence[Any] | np.ndarray) -> np.ndarray:
        rows = table(values, "numeric", self.n_features)
        try:
            return np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"numeric expects numbers: {exc}") from exc

    def fit(self, values: Sequence[Any] | np.ndarray) -> NumericEncoder:
        self.n_features = None
        array = self._array(values)
        self._build(array.shape[1])
        self.mean = torch.from_numpy(np.nan_to_num(np.nanmean(array, axis=0)))
        std = np.nan_to_num(np.nanstd(array, axis=0))
        self.std = torch.from_numpy(np.where(std > 0, std, 1.0).astype(np.float32))
        return self

    def preprocess(self, values: Sequence[Any] | np.ndarray) -> torch.Tensor:
        if self.n_features is None:
            raise ValueError("numeric: not fitted; it learns its scaler from the training values")
        return torch.from_numpy(self._array(values))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.mlp is None:
            raise ValueError("numeric: not fitted; it learns its scaler from the training values")
        return self.mlp(torch.nan_to_num((batch - self.mean) / self.std, nan=0.0))

    def config(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "n_features": self.n_features}
