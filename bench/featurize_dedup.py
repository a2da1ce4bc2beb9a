"""Featurize easy-VQA's questions with MiniLM: once per distinct value (mmops) vs once per row.

    .venv/bin/python bench/featurize_dedup.py              # all 48,248 questions
    .venv/bin/python bench/featurize_dedup.py --rows 5000  # a quicker, smaller measurement

Both ways run the same encoder code (``encode_all``) in the same process, one after the other, so
the ratio is measured in one run. Output: a line per way, the ratio, and bench/results/featurize_dedup.md.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=0, help="questions to encode (0 = all of train and test)")
    args = parser.parse_args()

    import easy_vqa
    import numpy as np
    from mmops_plugins.encoders.hf_text import HFTextEncoder
    from sweep import report

    from mmops.data.cache import content_hash
    from mmops.data.featurize import encode_all

    rows = list(easy_vqa.get_train_questions()[0]) + list(easy_vqa.get_test_questions()[0])
    rows = rows[: args.rows] if args.rows else rows
    encoder = HFTextEncoder().eval()

    t0 = time.perf_counter()
    hashes = [content_hash(q) for q in rows]  # what the feature cache keys on
    distinct = list(dict.fromkeys(rows))
    unique = encode_all(encoder, distinct)
    index = {q: i for i, q in enumerate(distinct)}
    dedup_features = unique[[index[q] for q in rows]]
    dedup_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    every_row = encode_all(encoder, rows)
    naive_s = time.perf_counter() - t0

    assert len(set(hashes)) == len(distinct)
    max_diff = float(np.abs(dedup_features - every_row).max())
    ratio = naive_s / dedup_s
    lines = [
        f"rows: {len(rows):,}   distinct questions: {len(distinct)}",
        f"encode every row:            {naive_s:8.2f} s",
        f"encode each distinct once:   {dedup_s:8.2f} s   (hashing and gather included)",
        f"speed-up: {ratio:.0f}x   (largest difference between the two feature sets: {max_diff:.1e})",
    ]
    report("featurize_dedup.md", lines)


if __name__ == "__main__":
    main()
