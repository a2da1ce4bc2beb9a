"""The prepare stage: bad rows are quarantined by line with a reason, never a crash; splits are sound."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from mmops.config import Params, load_params
from mmops.data.easyvqa import import_easy_vqa
from mmops.data.prepare import prepare

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    import_easy_vqa(out, limit=600)
    return out


@pytest.fixture
def params() -> Params:
    p = load_params(REPO / "params.yaml")
    return p.model_copy(update={"data": p.data.model_copy(update={"image_size": 32})})


def _copy(raw: Path, tmp: Path) -> Path:
    dst = tmp / "raw"
    shutil.copytree(raw, dst)
    return dst


def test_clean_data_is_kept_and_split_without_image_leakage(raw, tmp_path, params):
    summary = prepare(raw, tmp_path / "out", params)
    assert summary["quarantined"] == 0 and summary["kept"] == 1200
    rows = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    assert set(rows["split"]) == {"train", "val", "test"}
    train_imgs = set(rows.loc[rows.split == "train", "image_idx"])
    assert train_imgs.isdisjoint(set(rows.loc[rows.split == "val", "image_idx"]))
    # Deterministic: the same seed gives the same split.
    prepare(raw, tmp_path / "again", params)
    assert rows.equals(pd.read_parquet(tmp_path / "again" / "rows.parquet"))


def test_bad_rows_are_quarantined_by_line(raw, tmp_path, params):
    data = _copy(raw, tmp_path)
    manifest = pd.read_csv(data / "manifest.csv")
    (data / "images" / "train" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = (data / manifest.loc[0, "image"]).read_bytes()
    (data / "images" / "train" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "outside.png").write_bytes(good)
    manifest.loc[1, "image"] = "images/train/corrupt.png"
    manifest.loc[2, "image"] = "images/train/missing.png"
    manifest.loc[3, "image"] = "../outside.png"
    manifest.loc[4, "question"] = "   "
    manifest.loc[5, "image"] = "images/train/truncated.png"
    test_row = manifest.index[manifest.split == "test"][0]
    manifest.loc[test_row, "answer"] = "purple"
    manifest.to_csv(data / "manifest.csv", index=False)

    summary = prepare(data, tmp_path / "out", params)
    assert summary["quarantined"] == 6 and summary["kept"] == 1194
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv").set_index("line")
    assert q.loc[3, "reason"].startswith(("not a decodable image", "corrupt")) and q.loc[3, "field"] == "image"
    assert "not found" in q.loc[4, "reason"]
    assert "escapes the data root" in q.loc[5, "reason"]
    assert q.loc[6, "field"] == "question" and "empty" in q.loc[6, "reason"]
    assert "truncated" in q.loc[7, "reason"] or "corrupt" in q.loc[7, "reason"]
    assert q.loc[test_row + 2, "field"] == "answer" and "never seen" in q.loc[test_row + 2, "reason"]
    assert q.loc[3, "question"] == manifest.loc[1, "question"]  # the row itself, ready to fix


def test_missing_manifest_and_columns_are_clear(tmp_path, params):
    with pytest.raises(FileNotFoundError, match="mmops data import"):
        prepare(tmp_path, tmp_path / "out", params)
    pd.DataFrame({"question": ["q"], "split": ["train"]}).to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(ValueError, match=r"missing columns \['image', 'answer'\]"):
        prepare(tmp_path, tmp_path / "out", params)
