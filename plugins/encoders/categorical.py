"""Categorical tabular features: one learned embedding per category and column, concatenated
(entity embeddings, Guo and Berkhahn, "Entity Embeddings of Categorical Variables", 2016).

``fit`` learns each column's categories (saved in the model spec); a category never seen in training
maps to a shared "unknown" embedding, so the service never fails on a new value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from mmops_plugins.encoders._tabular import table
from torch import nn

from mmops.core.interfaces import Encoder


class CategoricalEncoder(Encoder):
    modality = "tabular"

    def __init__(self, embedding_dim: int = 8, categories: list[list[str]] | None = None) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self._build(categories)

    def _build(self, categories: list[list[str]] | None) -> None:
        self.categories = [list(c) for c in categories] if categories is not None else None
        self.index = [{c: i + 1 for i, c in enumerate(col)} for col in self.categories or []]  # 0: unknown
        self.embeddings = nn.ModuleList(nn.Embedding(len(col) + 1, self.embedding_dim) for col in self.index)
        self.output_dim = self.embedding_dim * len(self.index)

    def fit(self, values: Sequence[Any] | np.ndarray) -> CategoricalEncoder:
        rows = table(values, "categorical", None)
        self._build([sorted({str(r[j]) for r in rows}) for j in range(len(rows[0]) if rows else 0)])
        return self

    def preprocess(self, values: Sequence[Any] | np.ndarray) -> torch.Tensor:
        if self.categories is None:
            raise ValueError("categorical: not fitted; it learns its categories from the training values")
        rows = table(values, "categorical", len(self.index))
        return torch.tensor(
            [[col.get(str(v), 0) for col, v in zip(self.index, r, strict=True)] for r in rows], dtype=torch.long
        ).view(len(rows), len(self.index))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([emb(batch[:, j]) for j, emb in enumerate(self.embeddings)], dim=1)

    def config(self) -> dict[str, Any]:
        return {"embedding_dim": self.embedding_dim, "categories": self.categories}
