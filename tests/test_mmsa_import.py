"""`mmops data import mmsa`: MMSA's feature pickle to a manifest of feature sequences; a pickle that is
not plain data is refused unread; prepare quarantines bad sequences by row and field."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmops.config import Params
from mmops.data.featurize import load_values
from mmops.data.importers import IMPORTERS
from mmops.data.mmsa import UnsafePickleError, import_mmsa, load_plain_pickle
from mmops.data.prepare import prepare

DIMS = {"text": 4, "audio": 3, "vision": 2}


def mmsa_split(n: int, rng: np.random.Generator, offset: int = 0) -> dict:
    """One split exactly as MMSA's aligned_50.pkl holds it (shrunk: 6 frames instead of 50), field by field:

    - ``raw_text``: (N,) object array of str, the transcript;
    - ``audio``: (N, T, d_a) float32, acoustic frames (COVAREP) aligned to the words, zero-padded;
    - ``vision``: (N, T, d_v) float32, facial frames (Facet), aligned and padded like audio;
    - ``id``: (N,) object array of str, ``"<YouTube id>$_$<clip>"``;
    - ``text``: (N, T, d_t) float32, word features (BERT in MMSA's files), zero-padded here;
    - ``text_bert``: (N, 3, T) token ids / attention mask / segment ids;
    - ``annotations``: (N,) object array, "Negative" / "Neutral" / "Positive";
    - ``classification_labels``: (N,) float32 (0, 1, 2);
    - ``regression_labels``: (N,) float32, the sentiment in [-3, 3].
    MMSA's unaligned files add ``audio_lengths`` / ``vision_lengths`` (lists of ints).
    """
    t = 6
    lengths = np.array([2 + (i % 4) for i in range(n)])
    out = {}
    for m, d in DIMS.items():
        x = np.zeros((n, t, d), np.float32)
        for i, k in enumerate(lengths):
            x[i, :k] = rng.standard_normal((k, d)) + 0.1  # never exactly 0 inside a sequence
        out[m] = x
    bert = np.zeros((n, 3, t), np.int64)
    for i, k in enumerate(lengths):
        bert[i, 0, :k], bert[i, 1, :k] = 101 + np.arange(k), 1
    labels = np.round(rng.uniform(-3, 3, n), 1).astype(np.float32)
    labels[0] = 0.0
    return {
        "raw_text": np.array([f"utterance {offset + i}" for i in range(n)], dtype=object),
        "audio": out["audio"],
        "vision": out["vision"],
        "id": np.array([f"vid{offset + i}$_$1" for i in range(n)], dtype=object),
        "text": out["text"],
        "text_bert": bert,
        "annotations": np.array(["Neutral"] * n, dtype=object),
        "classification_labels": np.ones(n, np.float32),
        "regression_labels": labels,
    }


@pytest.fixture
def mmsa_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    data = {"train": mmsa_split(12, rng), "valid": mmsa_split(4, rng, 100), "test": mmsa_split(4, rng, 200)}
    data["train"]["audio"][1, 0, 0] = -np.inf  # COVAREP's log energy of silence
    path = tmp_path / "aligned_50.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


def test_import_writes_one_sequence_per_row_and_modality(mmsa_file: Path, tmp_path: Path):
    assert IMPORTERS["mmsa"] is import_mmsa
    raw = tmp_path / "raw"
    manifest = pd.read_csv(import_mmsa(mmsa_file, raw), dtype=str, keep_default_na=False)
    assert list(manifest.columns) == ["id", "split", "raw_text", "text", "audio", "vision", "label", "origin"]
    assert manifest["split"].value_counts().to_dict() == {"train": 12, "val": 4, "test": 4}  # valid -> val
    data = load_plain_pickle(mmsa_file)
    for row in manifest.itertuples():
        split = {"train": "train", "val": "valid", "test": "test"}[row.split]
        i = int(row.origin.split("[")[1].rstrip("]"))
        k = int(data[split]["text_bert"][i, 1].sum())  # the real words
        for m in DIMS:
            seq = np.load(raw / getattr(row, m))
            expected = data[split][m][i, :k].copy()
            if m == "audio":
                expected[np.isneginf(expected)] = 0.0  # as MMSA's loader does
            np.testing.assert_array_equal(seq, expected)  # the padding is gone, nothing else
        assert float(row.label) == pytest.approx(float(data[split]["regression_labels"][i]))
        assert row.raw_text == data[split]["raw_text"][i] and row.id == data[split]["id"][i]
    assert np.load(raw / manifest["audio"][1])[0, 0] == 0.0
    assert len(import_mmsa(mmsa_file, tmp_path / "few", limit=2).read_text().splitlines()) == 1 + 3 * 2


def test_lengths_keys_win_and_zero_padding_is_trimmed_without_them(tmp_path: Path):
    rng = np.random.default_rng(1)
    data = {s: mmsa_split(3, rng) for s in ("train", "valid", "test")}
    for part in data.values():
        del part["text_bert"]
        part["audio_lengths"] = [1, 1, 1]  # an unaligned file's own counts
        part["vision"][:, 0] = 0.0  # zero padding in front (older CMU files pad before)
    path = tmp_path / "unaligned.pkl"
    path.write_bytes(pickle.dumps(data))
    raw = tmp_path / "raw"
    manifest = pd.read_csv(import_mmsa(path, raw))
    for row in manifest.itertuples():
        assert np.load(raw / row.audio).shape == (1, DIMS["audio"])
        assert np.load(raw / row.vision).shape[0] == np.load(raw / row.text).shape[0] - 1


def test_files_written_by_numpy_1_with_protocol_2_load(tmp_path: Path):
    """MMSA's files predate NumPy 2: their arrays name numpy.core (not numpy._core), and Python 3 writes an
    array's bytes into a protocol 2 pickle through _codecs.encode. Both are allowed, and nothing else."""
    data = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "s": np.array(["x"], dtype=object),
        "f": np.float32(2.5),
        "l": [1, "two", 3.0],
    }
    old = pickle.dumps(data, protocol=2).replace(b"cnumpy._core.", b"cnumpy.core.")
    assert b"cnumpy.core.multiarray\n_reconstruct" in old and b"c_codecs\nencode" in old
    (tmp_path / "old.pkl").write_bytes(old)
    loaded = load_plain_pickle(tmp_path / "old.pkl")
    np.testing.assert_array_equal(loaded["a"], data["a"])
    assert loaded["s"].tolist() == ["x"] and loaded["f"] == 2.5 and loaded["l"] == [1, "two", 3.0]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickle_that_is_not_plain_data_is_refused_unexecuted(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"train": {"regression_labels": _Evil()}}))
    with pytest.raises(UnsafePickleError, match=r"refused: the pickle references (posix|nt)\.system"):
        import_mmsa(path, tmp_path / "raw")
    assert not (tmp_path / "PWNED").exists()
    # any other class, even a harmless one, is refused too: only plain data and NumPy arrays load
    path.write_bytes(pickle.dumps({"train": pd.DataFrame({"a": [1]})}))
    with pytest.raises(UnsafePickleError, match="pandas"):
        load_plain_pickle(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2, 3], "a dict with the splits"),
        ({"train": {}, "valid": {}}, "found \\['train', 'valid'\\]"),
        ({s: {"regression_labels": np.zeros(2)} for s in ("train", "valid", "test")}, "none of the feature arrays"),
        (
            {s: {"regression_labels": np.zeros(2), "audio": np.zeros((3, 4, 2))} for s in ("train", "valid", "test")},
            "3 rows, but 'regression_labels' has 2",
        ),
        (
            {s: {"regression_labels": np.zeros(2), "audio": np.zeros((2, 4))} for s in ("train", "valid", "test")},
            "numeric \\(N, time, features\\)",
        ),
    ],
)
def test_a_plain_pickle_of_another_structure_is_refused_by_name(tmp_path: Path, data, message):
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(ValueError, match=message):
        import_mmsa(path, tmp_path / "raw")


def test_the_transcript_feeds_a_text_input_next_to_feature_sequences(mmsa_file: Path, tmp_path: Path):
    raw = tmp_path / "data" / "raw"
    import_mmsa(mmsa_file, raw)
    params = Params.model_validate(
        {
            "data": {"source": "mmsa"},
            "inputs": {
                "raw_text": {"modality": "text", "encoder": "bow_text"},
                "audio": {"modality": "vectors", "encoder": "mean_features"},
            },
            "target": {"column": "label", "type": "sentiment"},
            "candidates": [{"name": "concat", "fusion": "concat"}],
        }
    )
    summary = prepare(raw, tmp_path / "prepared", params, tmp_path / "appended")
    assert summary["kept"] == 20 and summary["quarantined"] == 0
    texts = load_values(tmp_path / "prepared", "raw_text", "text")
    assert sorted(texts) == sorted(f"utterance {i}" for i in [*range(12), *range(100, 104), *range(200, 204)])


def _params(**data) -> Params:
    return Params.model_validate(
        {
            "data": {"source": "mmsa", **data},
            "inputs": {m: {"modality": "vectors", "encoder": "mean_features"} for m in DIMS},
            "target": {"column": "label", "type": "sentiment"},
            "candidates": [{"name": "tensor", "fusion": "tensor"}],
        }
    )


def test_prepare_keeps_mmsa_splits_and_quarantines_bad_sequences_by_row_and_field(mmsa_file: Path, tmp_path: Path):
    raw = tmp_path / "data" / "raw"
    manifest_path = import_mmsa(mmsa_file, raw)
    manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    bad = {  # manifest line (header = 1) -> (field, array, words in the reason)
        2: ("audio", np.ones((3, DIMS["audio"] + 1), np.float32), "width 4"),
        3: ("vision", np.zeros((0, DIMS["vision"]), np.float32), "empty"),
        4: ("text", np.full((2, DIMS["text"]), np.nan, np.float32), "NaN"),
        5: ("audio", np.ones((7, DIMS["audio"]), np.float32), "over max_length 6"),
        6: ("vision", np.ones(DIMS["vision"], np.float32), "shape (2,)"),
    }
    for line, (field, array, _) in bad.items():
        rel = f"features/bad-{line}.npy"
        np.save(raw / rel, array)
        manifest.loc[line - 2, field] = rel
    manifest.to_csv(manifest_path, index=False)
    params = _params()
    params.inputs["audio"].params["max_length"] = 6
    summary = prepare(raw, tmp_path / "data" / "prepared", params, tmp_path / "data" / "appended")
    assert summary["splits"] == {"test": 4, "train": 12 - len(bad), "val": 4}  # MMSA's valid is val, not carved
    quarantine = pd.read_csv(tmp_path / "data" / "prepared" / "quarantine.csv")
    assert sorted(quarantine["line"]) == sorted(bad)
    for row in quarantine.itertuples():
        field, _, words = bad[row.line]
        assert row.field == field and words in row.reason, row
    values = load_values(tmp_path / "data" / "prepared", "vision", "vectors")
    used = pd.read_parquet(tmp_path / "data" / "prepared" / "rows.parquet")["vision_idx"]
    assert all(values[i].shape[1] == DIMS["vision"] and len(values[i]) >= 1 for i in used)
    assert sum(len(values[i]) for i in used) == sum(
        len(np.load(raw / manifest.loc[line - 2, "vision"])) for line in range(2, 22) if line not in bad
    )
