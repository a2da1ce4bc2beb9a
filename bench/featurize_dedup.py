"""Featurize easy-VQA's questions with MiniLM: once per distinct value (mmops) vs once per row.

    .venv/bin/python bench/featurize_dedup.py              # all 48,248 questions
    .venv/bin/python bench/featurize_dedup.py --rows 5000  # a quicker, smaller measurement

Each way computes what the featurize stage keeps when a candidate's fusion attends: the pooled
vector and the word-piece token sequence of every question. mmops hashes every row, encodes each
distinct question once through the content-addressed store (``cached_features``, ``cached_sequences``:
float16 ragged shards, output written and memory-mapped back) into an empty cache, and maps rows to
them (vectors gathered per row; tokens are read per batch by the training loop, so a row index). The
baseline runs the same encoder code (``encode_all``, ``encode_sequences``) on every row. Both run in
the same process, one after the other, so the ratio is measured in one run. Output: a line per way,
the ratio, and bench/results/featurize_dedup.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=0, help="questions to encode (0 = all of train and test)")
    args = parser.parse_args()

    import easy_vqa
    import numpy as np
    import torch
    from mmops_plugins.encoders.hf_text import HFTextEncoder
    from sweep import report

    from mmops.data.cache import RaggedTokens, cached_features, cached_sequences, content_hash, encode_sequences
    from mmops.data.featurize import encode_all

    rows = list(easy_vqa.get_train_questions()[0]) + list(easy_vqa.get_test_questions()[0])
    rows = rows[: args.rows] if args.rows else rows
    encoder = HFTextEncoder().eval()

    with tempfile.TemporaryDirectory(prefix="mmops-dedup-") as tmp:
        store, out = Path(tmp) / "cache", Path(tmp) / "out"
        out.mkdir()
        t0 = time.perf_counter()
        hashes = [content_hash(q) for q in rows]  # what the feature cache keys on
        distinct = list(dict.fromkeys(rows))
        vectors, stats = cached_features(store, "hf_text", encoder, distinct, encode_all)
        tokens, token_stats = cached_sequences(store, "hf_text", encoder, distinct, out / "question.tokens")
        position = {q: i for i, q in enumerate(distinct)}
        index = np.array([position[q] for q in rows])
        dedup_vectors = vectors[index]
        dedup_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        every_vector = encode_all(encoder, rows)
        every_tokens = RaggedTokens.concatenate(
            list(encode_sequences(encoder, rows, batch_size=256)), encoder.output_dim
        )
        naive_s = time.perf_counter() - t0

        assert len(set(hashes)) == len(distinct) == stats["computed"] == token_stats["tokens_computed"]
        vector_diff = float(np.abs(dedup_vectors - every_vector).max())
        token_diff = 0.0
        for start in range(0, len(rows), 4096):  # the rows' tokens as training reads them, both ways
            rows_here = np.arange(start, min(start + 4096, len(rows)))
            a, b = tokens.batch(index[rows_here]), every_tokens.batch(rows_here)
            assert torch.equal(a.mask, b.mask)
            token_diff = max(token_diff, float((a.values - b.values).abs().max()))
        n_tokens = int(every_tokens.offsets[-1])
    ratio = naive_s / dedup_s
    lines = [
        f"rows: {len(rows):,}   distinct questions: {len(distinct)}   word-piece tokens of all rows: {n_tokens:,}",
        f"encode every row (vectors + tokens):            {naive_s:8.2f} s",
        f"encode each distinct once, through the cache:   {dedup_s:8.2f} s   (hashing, float16 shards, "
        "gather included)",
        f"speed-up: {ratio:.0f}x   (largest difference between the two: vectors {vector_diff:.1e}, "
        f"float16 tokens {token_diff:.1e})",
    ]
    report("featurize_dedup.md", lines)


if __name__ == "__main__":
    main()
