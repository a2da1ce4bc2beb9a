"""Rows of tabular values, shared by the tabular encoders: one value or a list of values per row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def table(values: Sequence[Any] | np.ndarray, encoder: str, width: int | None) -> list[list[Any]]:
    """Rows as lists of one width; a scalar per row is a one-column table. ``width`` None: any width."""
    rows = [list(v) if isinstance(v, Sequence | np.ndarray) and not isinstance(v, str) else [v] for v in values]
    widths = {len(r) for r in rows}
    expected = width if width is not None else next(iter(widths), 0)
    if widths - {expected}:
        raise ValueError(f"{encoder} expects rows of {expected} column(s), got rows of {sorted(widths)}")
    return rows
