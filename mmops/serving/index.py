"""The vector index a contrastive model's bento ships: gallery unit vectors, their ids, and a search.

Below ``exact_below`` vectors the search is exact: one matrix product and a partial sort, which on a
few thousand vectors takes well under a millisecond and is always right. Above it, an HNSW graph built
with usearch answers in about logarithmic time with a recall measured by ``bench/search.py`` (the
vectors stay in the folder, so an index can be rebuilt or checked without the model). usearch was
chosen over faiss-cpu for size: a 2.3 MB wheel against 18.8 MB (faiss was not benchmarked here).

Folder layout: ``vectors.npy`` (float32, one unit row per item), ``items.json`` (id and metadata per
row, plus how the index was built), ``hnsw.usearch`` (only for the approximate kind).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

EXACT_BELOW = 20_000
# HNSW settings. On 100k random 128-d unit vectors (the worst case: no cluster structure) this beam gives
# Recall@10 0.89 at the speed of exact search, 2048 gives 0.97 at half its speed (bench/search.py):
# galleries under exact_below are searched exactly for that reason.
CONNECTIVITY = 16
EXPANSION_ADD = 128
EXPANSION_SEARCH = 1024


class VectorIndex:
    """Unit vectors with ids, searched by cosine similarity (inner product of unit vectors)."""

    def __init__(self, vectors: np.ndarray, items: Sequence[dict[str, Any]], exact_below: int = EXACT_BELOW,
                 hnsw: Any = None) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(items):
            raise ValueError(f"{vectors.shape} vectors for {len(items)} items: one unit vector per item")
        self.vectors, self.items, self.exact_below = vectors, list(items), int(exact_below)
        self.kind = "exact" if len(vectors) < self.exact_below else "hnsw"
        self._hnsw = hnsw
        if self.kind == "hnsw" and self._hnsw is None:
            self._hnsw = _build_hnsw(vectors)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """The ``k`` nearest items of each query (row positions and cosine scores, best first)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries of dimension {queries.shape[1]}; the index holds {self.dim}")
        k = min(k, len(self))
        if self.kind == "exact" or k == 0:
            return exact_search(self.vectors, queries, k)
        found = self._hnsw.search(queries, k)
        if not hasattr(found, "counts"):  # usearch answers one query with a flat Matches, not BatchMatches
            return [[(int(key), float(1.0 - d)) for key, d in zip(found.keys, found.distances, strict=True)]]
        keys, distances = np.atleast_2d(found.keys), np.atleast_2d(found.distances)
        counts = np.atleast_1d(found.counts)
        return [[(int(key), float(1.0 - d)) for key, d in zip(keys[i, : counts[i]], distances[i, : counts[i]],
                                                              strict=True)]
                for i in range(len(queries))]

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "vectors.npy", self.vectors)
        meta = {"kind": self.kind, "exact_below": self.exact_below, "dim": self.dim, "count": len(self),
                "items": self.items}
        if self._hnsw is not None:
            self._hnsw.save(str(folder / "hnsw.usearch"))
            meta["hnsw"] = {"library": "usearch", "connectivity": CONNECTIVITY, "expansion_add": EXPANSION_ADD,
                            "expansion_search": EXPANSION_SEARCH}
        (folder / "items.json").write_text(json.dumps(meta))
        return folder

    @classmethod
    def load(cls, folder: Path) -> VectorIndex:
        meta = json.loads((folder / "items.json").read_text())
        vectors = np.load(folder / "vectors.npy")
        hnsw = None
        if meta["kind"] == "hnsw":
            hnsw = _new_hnsw(vectors.shape[1])
            hnsw.load(str(folder / "hnsw.usearch"))
        return cls(vectors, meta["items"], meta["exact_below"], hnsw)


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Brute force: all scores, then the top ``k`` by a partial sort (ties by position, so results are stable)."""
    if k <= 0:
        return [[] for _ in range(len(queries))]
    scores = queries @ vectors.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(
        np.arange(scores.shape[1]), (len(queries), 1))
    out = []
    for row, cand in zip(scores, top, strict=True):
        order = cand[np.lexsort((cand, -row[cand]))]
        out.append([(int(i), float(row[i])) for i in order])
    return out


def _new_hnsw(dim: int) -> Any:
    from usearch.index import Index

    return Index(ndim=dim, metric="ip", dtype="f32", connectivity=CONNECTIVITY, expansion_add=EXPANSION_ADD,
                 expansion_search=EXPANSION_SEARCH)


def _build_hnsw(vectors: np.ndarray) -> Any:
    index = _new_hnsw(vectors.shape[1])
    index.add(np.arange(len(vectors), dtype=np.uint64), vectors)
    return index
