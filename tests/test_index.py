"""The served vector index: exact search worked by hand, HNSW above the threshold agreeing with exact
search, and a save/load round trip of both kinds."""

from __future__ import annotations

import numpy as np
import pytest

from mmops.serving.index import VectorIndex, exact_search


def _unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_exact_search_by_hand():
    vectors = np.array([[1, 0], [0, 1], [-1, 0], [0.6, 0.8]], dtype=np.float32)
    hits = exact_search(vectors, np.array([[1, 0]], dtype=np.float32), 3)[0]
    assert [i for i, _ in hits] == [0, 3, 1] and [round(s, 3) for _, s in hits] == [1.0, 0.6, 0.0]
    index = VectorIndex(vectors, [{"id": f"v{i}"} for i in range(4)])
    assert index.kind == "exact"
    assert [i for i, _ in index.search(np.array([0, 1.0]), 10)[0]] == [1, 3, 0, 2]  # k beyond the gallery: all


def test_hnsw_above_the_threshold_agrees_with_exact_search(tmp_path):
    vectors, queries = _unit(3000, 32), _unit(50, 32, seed=1)
    index = VectorIndex(vectors, [{"id": str(i)} for i in range(3000)], exact_below=1000)
    assert index.kind == "hnsw"
    truth = exact_search(vectors, queries, 10)
    found = index.search(queries, 10)
    recall = np.mean([len({i for i, _ in f} & {i for i, _ in t}) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.95
    for f in found:  # cosine scores, best first
        scores = [s for _, s in f]
        assert scores == sorted(scores, reverse=True) and scores[-1] >= -1.001 and scores[0] <= 1.001
    one = index.search(queries[0], 10)  # a single query (what /search sends) answers like a batch of one
    assert [i for i, _ in one[0]] == [i for i, _ in found[0]]
    loaded = VectorIndex.load(index.save(tmp_path / "hnsw"))
    assert loaded.kind == "hnsw" and loaded.items[7] == {"id": "7"}
    assert [i for i, _ in loaded.search(queries[:3], 5)[0]] == [i for i, _ in found[0][:5]]


def test_exact_round_trip_and_bad_shapes(tmp_path):
    vectors = _unit(20, 8)
    index = VectorIndex(vectors, [{"id": str(i), "label": "x"} for i in range(20)])
    loaded = VectorIndex.load(index.save(tmp_path / "exact"))
    assert loaded.kind == "exact" and np.array_equal(loaded.vectors, vectors)
    assert loaded.search(vectors[4], 1)[0][0][0] == 4
    with pytest.raises(ValueError, match="dimension 3"):
        loaded.search(np.zeros((1, 3)), 1)
    with pytest.raises(ValueError, match="one unit vector per item"):
        VectorIndex(vectors, [{"id": "a"}])


def test_retrieval_requests_refuse_bad_items_by_field():
    """/embed, /search and /zero_shot items are checked from the spec alone, each refusal naming its field."""
    import base64
    import io

    from PIL import Image

    from mmops.serving.predictor import InputError, RowDecoder
    from mmops.serving.retrieval import MAX_LABELS, RetrievalRequests

    towers = {"image_input": "image", "text_input": "caption"}
    spec = {"image_size": 16, "task": {"name": "contrastive", "params": towers},
            "inputs": {"caption": {"modality": "text"}, "image": {"modality": "image"}}}
    requests = RetrievalRequests(spec, RowDecoder(spec), gallery=30)
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (255, 0, 0)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    ok = requests.decode("search", {"text": " a red circle ", "k": 30})
    assert ok == {"op": "search", "input": "caption", "value": "a red circle", "k": 30}
    assert requests.decode("zero_shot", {"image": image, "labels": ["a", "b"]})["value"].shape == (16, 16, 3)
    bad = [
        ("search", {"text": ""}, "items[0].text"), ("search", {"text": "x", "k": 31}, "items[0].k"),
        ("search", {"text": "x", "k": 0}, "items[0].k"), ("search", {"text": "x", "k": True}, "items[0].k"),
        ("embed", {"image": base64.b64encode(b"no image").decode()}, "items[0].image"),
        ("embed", {"text": "x", "image": image}, "items[0].image"), ("embed", {}, "items[0].text"),
        ("embed", {"text": "x", "k": 3}, "items[0].k"),
        ("zero_shot", {"image": image, "labels": ["x"] * 2}, "items[0].labels"),
        ("zero_shot", {"image": image, "labels": [str(i) for i in range(MAX_LABELS + 1)]}, "items[0].labels"),
        ("zero_shot", {"image": image, "labels": [" "]}, "items[0].labels"),
        ("zero_shot", {"text": "x", "labels": ["a"]}, "items[0].image"),
    ]
    for op, item, field in bad:
        with pytest.raises(InputError) as info:
            requests.decode(op, item, "items[0].")
        assert info.value.field == field, (op, item, str(info.value))
    plain = RetrievalRequests({**spec, "task": {"name": "classification"}}, RowDecoder(spec), None)
    with pytest.raises(InputError, match="contrastive"):
        plain.decode("search", {"text": "x"})
