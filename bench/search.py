"""The served vector index on 100,000 random unit vectors: HNSW (usearch) against exact search.

    nice -n 10 .venv/bin/python bench/search.py        # -> bench/results/search.json

Random unit vectors in the model's dimension (128, the retrieval template's ``width``) are the hard case
for a graph index: no clusters to exploit, every neighbour nearly as far as any other. Measured: build
time, Recall@10 of the HNSW index against exact (brute-force) search, single-query latency of both
(one query at a time, as ``/search`` asks), and the memory of each (the vectors; the graph's file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from mmops.serving.index import CONNECTIVITY, EXPANSION_ADD, EXPANSION_SEARCH, VectorIndex, exact_search

ROOT = Path(__file__).resolve().parents[1]


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def per_query_ms(search, queries: np.ndarray, k: int) -> tuple[float, list]:
    found, started = [], time.perf_counter()
    for q in queries:
        found.append(search(q[None], k)[0])
    return 1000 * (time.perf_counter() - started) / len(queries), found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--expansion", type=int, nargs="+", default=[128, 256, 512, 1024, 2048],
                        help="HNSW search beams to measure (the served one is index.EXPANSION_SEARCH)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "search.json")
    args = parser.parse_args()
    vectors, queries = unit(args.n, args.dim, 0), unit(args.queries, args.dim, 1)
    items = [{"id": str(i)} for i in range(args.n)]

    started = time.perf_counter()
    hnsw = VectorIndex(vectors, items, exact_below=0)
    build_s = time.perf_counter() - started
    exact = VectorIndex(vectors, items, exact_below=args.n + 1)

    exact_ms, truth = per_query_ms(exact.search, queries, args.k)
    frontier = []  # the search beam trades latency for recall on one built graph
    for ef in args.expansion:
        hnsw._hnsw.expansion_search = ef
        ms, found = per_query_ms(hnsw.search, queries, args.k)
        recall = float(np.mean([len({i for i, _ in f} & {i for i, _ in t}) / args.k
                                for f, t in zip(found, truth, strict=True)]))
        frontier.append({"expansion_search": ef, "recall_at_10": round(recall, 4), "ms_per_query": round(ms, 3),
                         "speedup": round(exact_ms / ms, 1)})
        print(frontier[-1], flush=True)
    served = next((f for f in frontier if f["expansion_search"] == EXPANSION_SEARCH), frontier[0])
    recall, hnsw_ms = served["recall_at_10"], served["ms_per_query"]
    batch_started = time.perf_counter()
    exact_search(vectors, queries, args.k)
    exact_batch_ms = 1000 * (time.perf_counter() - batch_started) / len(queries)
    with tempfile.TemporaryDirectory() as tmp:
        folder = hnsw.save(Path(tmp) / "index")
        graph_bytes = (folder / "hnsw.usearch").stat().st_size
    out = {
        "vectors": args.n, "dim": args.dim, "queries": args.queries, "k": args.k,
        "library": "usearch", "hnsw": {"connectivity": CONNECTIVITY, "expansion_add": EXPANSION_ADD,
                                       "expansion_search": EXPANSION_SEARCH},
        "build_seconds": round(build_s, 2),
        "recall_at_10": round(recall, 4),
        "exact_ms_per_query": round(exact_ms, 3),
        "hnsw_ms_per_query": round(hnsw_ms, 3),
        "speedup": round(exact_ms / hnsw_ms, 1),
        "served_expansion_search": EXPANSION_SEARCH,
        "frontier": frontier,
        "exact_batched_ms_per_query": round(exact_batch_ms, 3),
        "memory_mb": {"vectors_float32": round(vectors.nbytes / 2**20, 1),
                      "hnsw_graph_file": round(graph_bytes / 2**20, 1)},
        "goals": {"recall_at_10": ">= 0.95", "speedup": ">= 10x"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "note": "2 shared cores, nice -n 10, other jobs running: latencies are upper bounds"},
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
