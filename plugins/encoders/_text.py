"""Tokenising and vocabularies shared by the text encoders that learn their own (word2vec, GRU)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

TOKEN = re.compile(r"[a-z0-9']+")
PAD, UNK = 0, 1  # word ids start at 2


def texts(values: Sequence[Any], encoder: str) -> list[str]:
    """Refuse non-strings with the encoder's name, instead of silently encoding ``"None"``."""
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{encoder} expects strings, got {type(bad[0]).__name__} ({bad[0]!r})")
    return list(values)


def tokenize(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


def build_vocabulary(values: Sequence[str], min_count: int, max_size: int | None) -> list[str]:
    """Words seen at least ``min_count`` times, most frequent first (ties alphabetical, for determinism)."""
    counts = Counter(t for v in values for t in tokenize(v))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return words[:max_size] if max_size else words


def word_index(vocabulary: list[str] | None) -> dict[str, int]:
    return {w: i + 2 for i, w in enumerate(vocabulary or [])}


def token_ids(values: Sequence[str], index: dict[str, int], max_length: int) -> torch.Tensor:
    """``(batch, length)`` ids, right-padded with :data:`PAD`; at least one position per row."""
    rows = [[index.get(t, UNK) for t in tokenize(v)][:max_length] for v in values]
    width = max(1, *(len(r) for r in rows)) if rows else 1
    out = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
