"""The vector index a contrastive model's bento ships: gallery unit vectors, their ids, and a search.

Below ``exact_below`` vectors the search is exact: one matrix product and a partial sort, which on a
few thousand vectors takes well under a millisecond and is always right. Above it the search is
approximate, by one of two methods (``bench/search.py`` measures both against exact search; the
frontier and the choice are in docs/retrieval.md):

* ``pq`` (when faiss-cpu is installed): a product-quantised copy of the vectors (faiss
  ``IndexPQFastScan``: one 4-bit code per pair of dimensions, 1/16 of the float32 size) is scanned for
  ``max(RERANK * k, MIN_CANDIDATES)`` candidates, which are then scored exactly against the float32
  vectors. On 100,000 random 128-d unit vectors: Recall@10 0.977 at 16.5x the speed of exact search.
* ``hnsw`` (usearch, float32, inner product, no quantisation): a graph searched with a beam. On the same
  random vectors its beam must score 29% of the gallery for Recall@10 >= 0.95, and is then 2.1x slower
  than exact search; on clustered embeddings it does far better, but that is not measured here.

With ``method=None`` the index takes ``pq`` where faiss imports and ``hnsw`` where it does not. The
vectors stay in the folder, so an index can be rebuilt or checked without the model, and a ``pq`` index
loaded where faiss is missing falls back to exact search (right, slower) instead of failing.

Folder layout: ``vectors.npy`` (float32, one unit row per item), ``items.json`` (id and metadata per
row, plus how the index was built and its search settings), ``hnsw.usearch`` or ``pq.faiss`` (only for
the approximate kinds).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EXACT_BELOW = 20_000
METHODS = ("exact", "hnsw", "pq")
# PQ settings (bench/search.py, bench/results/search.json): 4-bit codes over pairs of dimensions, and the
# candidates re-scored exactly per result wanted (k = 10: 200 candidates).
PQ_DIMS_PER_CODE = 2
RERANK = 20
MIN_CANDIDATES = 100
# faiss runs on one OpenMP thread: /search asks one query at a time, PQ training takes under a second for 100k
# vectors on one, and on a loaded 2-core machine OpenMP's spinning threads made it 25x slower on two (20.6 s
# against 0.8 s for 20,000 vectors).
FAISS_THREADS = 1
# HNSW settings, chosen from the same frontier: connectivity 32 with expansion_add 256 and a beam of 768 gives
# Recall@10 0.981 scoring 29% of the gallery (beam 512: 0.943), where connectivity 16 with expansion_add 128
# needs a beam of 2048 and 36% of the gallery for 0.977. The beam is the smallest measured with recall >= 0.95.
CONNECTIVITY = 32
EXPANSION_ADD = 256
EXPANSION_SEARCH = 768


def _faiss() -> Any:
    import faiss

    faiss.omp_set_num_threads(FAISS_THREADS)  # per calling thread: set again before each use
    return faiss


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def default_method(dim: int) -> str:
    """The approximate method an index above ``exact_below`` gets when none is named."""
    return "pq" if dim % PQ_DIMS_PER_CODE == 0 and faiss_available() else "hnsw"


class VectorIndex:
    """Unit vectors with ids, searched by cosine similarity (inner product of unit vectors)."""

    def __init__(
        self,
        vectors: np.ndarray,
        items: Sequence[dict[str, Any]],
        exact_below: int = EXACT_BELOW,
        method: str | None = None,
        *,
        built: Any = None,
    ) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(items):
            raise ValueError(f"{vectors.shape} vectors for {len(items)} items: one unit vector per item")
        if method is not None and method not in METHODS:
            raise ValueError(f"index method '{method}': one of {', '.join(METHODS)}")
        self.vectors, self.items, self.exact_below = vectors, list(items), int(exact_below)
        if len(vectors) < self.exact_below:
            self.kind = "exact"
        else:
            self.kind = method or default_method(vectors.shape[1])
        self._built = built
        if self._built is None and self.kind == "hnsw":
            self._built = build_hnsw(vectors)
        elif self._built is None and self.kind == "pq":
            self._built = build_pq(vectors)

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
        if self.kind == "pq":
            return pq_search(self._built, self.vectors, queries, k)
        return hnsw_search(self._built, queries, k)

    def settings(self) -> dict[str, Any]:
        """How the approximate index was built and is searched (empty for exact search)."""
        if self.kind == "hnsw":
            return {
                "library": "usearch",
                "dtype": "f32",
                "metric": "ip",
                "connectivity": int(self._built.connectivity),
                "expansion_add": int(self._built.expansion_add),
                "expansion_search": int(self._built.expansion_search),
            }
        if self.kind == "pq":
            return {
                "library": "faiss",
                "index": "IndexPQFastScan",
                "subquantizers": int(self._built.M),
                "bits": int(self._built.nbits),
                "rerank": RERANK,
                "min_candidates": MIN_CANDIDATES,
            }
        return {}

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "vectors.npy", self.vectors)
        meta = {
            "kind": self.kind,
            "exact_below": self.exact_below,
            "dim": self.dim,
            "count": len(self),
            "items": self.items,
        }
        if self.kind == "hnsw":
            self._built.save(str(folder / "hnsw.usearch"))
            meta["hnsw"] = self.settings()
        elif self.kind == "pq":
            _faiss().write_index(self._built, str(folder / "pq.faiss"))
            meta["pq"] = self.settings()
        (folder / "items.json").write_text(json.dumps(meta))
        return folder

    @classmethod
    def load(cls, folder: Path) -> VectorIndex:
        meta = json.loads((folder / "items.json").read_text())
        vectors = np.load(folder / "vectors.npy")
        kind, built = meta["kind"], None
        if kind == "hnsw":
            # the file holds the graph (and its connectivity); the search beam is a setting, kept in items.json
            made = meta.get("hnsw", {})
            built = _new_hnsw(
                vectors.shape[1],
                made.get("connectivity", CONNECTIVITY),
                made.get("expansion_add", EXPANSION_ADD),
                made.get("expansion_search", EXPANSION_SEARCH),
            )
            built.load(str(folder / "hnsw.usearch"))
        elif kind == "pq":
            if not faiss_available():
                log.warning("%s: a PQ index, but faiss-cpu is not installed: searching it exactly", folder)
                return cls(vectors, meta["items"], meta["exact_below"], "exact")
            built = _faiss().read_index(str(folder / "pq.faiss"))
        return cls(vectors, meta["items"], meta["exact_below"], kind, built=built)


def _ranked(scores: np.ndarray, ids: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` best of ``ids`` by ``scores`` (ties by id, so results are stable)."""
    if k < len(ids):
        part = np.argpartition(-scores, k - 1)[:k]
        scores, ids = scores[part], ids[part]
    order = np.lexsort((ids, -scores))
    return [(int(ids[i]), float(scores[i])) for i in order]


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Brute force: all scores, then the top ``k`` by a partial sort (ties by position, so results are stable)."""
    if k <= 0:
        return [[] for _ in range(len(queries))]
    scores = queries @ vectors.T
    positions = np.arange(scores.shape[1])
    return [_ranked(row, positions, k) for row in scores]


def pq_search(
    pq: Any, vectors: np.ndarray, queries: np.ndarray, k: int, rerank: int = RERANK
) -> list[list[tuple[int, float]]]:
    """Candidates from the PQ codes (``max(rerank * k, MIN_CANDIDATES)`` per query), scored exactly on the
    float32 ``vectors``: the scores returned are the true cosines."""
    wanted = min(len(vectors), max(rerank * k, MIN_CANDIDATES))
    _faiss()
    _, candidates = pq.search(queries, wanted)
    out = []
    for query, ids in zip(queries, candidates, strict=True):
        ids = ids[ids >= 0]
        out.append(_ranked(vectors[ids] @ query, ids, k))
    return out


def build_pq(vectors: np.ndarray, dims_per_code: int = PQ_DIMS_PER_CODE) -> Any:
    """A 4-bit product quantiser, one code per ``dims_per_code`` dimensions (faiss fast-scan), trained on the
    vectors themselves."""
    faiss = _faiss()
    dim = vectors.shape[1]
    pq = faiss.IndexPQFastScan(dim, dim // dims_per_code, 4, faiss.METRIC_INNER_PRODUCT)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    pq.train(vectors)
    pq.add(vectors)
    return pq


def hnsw_search(hnsw: Any, queries: np.ndarray, k: int, threads: int = 0) -> list[list[tuple[int, float]]]:
    """The graph's ``k`` best of each query (row positions and cosine scores, best first); ``threads`` as usearch
    takes it (0: all cores, used only across the queries of a batch: one query runs on one thread)."""
    found = hnsw.search(queries, k, threads=threads)
    if not hasattr(found, "counts"):  # usearch answers one query with a flat Matches, not BatchMatches
        return [[(int(key), float(1.0 - d)) for key, d in zip(found.keys, found.distances, strict=True)]]
    keys, distances = np.atleast_2d(found.keys), np.atleast_2d(found.distances)
    counts = np.atleast_1d(found.counts)
    return [
        [(int(key), float(1.0 - d)) for key, d in zip(keys[i, : counts[i]], distances[i, : counts[i]], strict=True)]
        for i in range(len(queries))
    ]


def build_hnsw(
    vectors: np.ndarray,
    connectivity: int = CONNECTIVITY,
    expansion_add: int = EXPANSION_ADD,
    expansion_search: int = EXPANSION_SEARCH,
    threads: int = 0,
) -> Any:
    """An HNSW graph over the rows of ``vectors`` (keys are row positions), built on ``threads`` cores (0: all)."""
    index = _new_hnsw(vectors.shape[1], connectivity, expansion_add, expansion_search)
    index.add(
        np.arange(len(vectors), dtype=np.uint64), np.ascontiguousarray(vectors, dtype=np.float32), threads=threads
    )
    return index


def _new_hnsw(
    dim: int,
    connectivity: int = CONNECTIVITY,
    expansion_add: int = EXPANSION_ADD,
    expansion_search: int = EXPANSION_SEARCH,
) -> Any:
    from usearch.index import Index

    # float32 and the inner product: on unit vectors 1 - distance is the cosine, with no quantisation loss
    return Index(
        ndim=dim,
        metric="ip",
        dtype="f32",
        connectivity=int(connectivity),
        expansion_add=int(expansion_add),
        expansion_search=int(expansion_search),
    )
