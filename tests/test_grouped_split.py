"""Grouped splits (data.group_column): val and a carved test hold users never seen in train."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from mmops.config import ConfigError, Params, load_params
from mmops.core.tasks import build_task
from mmops.data.prepare import GROUP, _link_groups, prepare
from mmops.report import _per_group_table
from mmops.training.loop import per_group


def _manifest(folder, groups: int = 12, per_group: int = 30, split: bool = False, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(groups):
        for i in range(per_group):
            label = ["a", "b", "c"][(g + i) % 3]  # every group has every label, in near-equal parts
            rows.append(
                {
                    "x": float(rng.normal()),
                    "speaker": f"spk{g:02d}",
                    "label": label,
                    **({"split": "test" if g == 0 else "train"} if split else {}),
                }
            )
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)


def _params(**data) -> Params:
    return Params.model_validate(
        {
            "data": {"source": "manifest", "group_column": "speaker", **data},
            "inputs": {"x": {"modality": "number"}},
            "target": "label",
            "candidates": [{"name": "x", "inputs": ["x"]}],
        }
    )


def test_no_group_in_two_splits_and_labels_stay_stratified(tmp_path):
    _manifest(tmp_path / "raw")
    summary = prepare(tmp_path / "raw", tmp_path / "out", _params())
    rows = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    assert rows.groupby(GROUP)["split"].nunique().max() == 1
    assert set(rows["split"]) == {"train", "val", "test"}
    assert summary["groups"]["in_two_splits"] == []
    assert sum(summary["groups"]["per_split"].values()) == 12 and summary["groups"]["per_split"]["val"] >= 1
    overall = rows["label"].value_counts(normalize=True)
    for split in ("val", "test"):
        share = rows.loc[rows["split"] == split, "label"].value_counts(normalize=True)
        assert (share.reindex(overall.index, fill_value=0) - overall).abs().max() < 0.1, split
    # The same seed gives the same split.
    prepare(tmp_path / "raw", tmp_path / "again", _params())
    assert rows.equals(pd.read_parquet(tmp_path / "again" / "rows.parquet"))


def test_few_groups_hold_out_a_whole_group(tmp_path, caplog):
    _manifest(tmp_path / "raw", groups=5)
    with caplog.at_level(logging.WARNING, logger="mmops.data.prepare"):
        summary = prepare(tmp_path / "raw", tmp_path / "out", _params())
    assert summary["groups"]["per_split"] == {"test": 1, "train": 3, "val": 1}
    assert "only 4 groups" in caplog.text


def test_named_groups_become_val_and_test(tmp_path):
    _manifest(tmp_path / "raw", groups=5)
    summary = prepare(tmp_path / "raw", tmp_path / "out", _params(val_groups=["spk01"], test_groups=["spk03"]))
    rows = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    assert set(rows.loc[rows["split"] == "val", GROUP]) == {"spk01"}
    assert set(rows.loc[rows["split"] == "test", GROUP]) == {"spk03"}
    assert summary["splits"] == {"test": 30, "train": 90, "val": 30}


def test_bad_group_settings_are_named(tmp_path, caplog):
    _manifest(tmp_path / "raw", groups=4)
    with pytest.raises(ValueError, match=r"speaker has no \['nobody'\]"):
        prepare(tmp_path / "raw", tmp_path / "out", _params(val_groups=["nobody"]))
    with pytest.raises(ValueError, match="set group_column too"):
        Params.model_validate(
            {
                "data": {"val_groups": ["a"]},
                "inputs": {"x": {"modality": "number"}},
                "candidates": [{"name": "x", "inputs": ["x"]}],
            }
        )
    with pytest.raises(ValueError, match="a group belongs to one split"):
        _params(val_groups=["spk01"], test_groups=["spk01"])
    # One group cannot give a held-out split.
    _manifest(tmp_path / "one", groups=1)
    with pytest.raises(ValueError, match="at least two groups"):
        prepare(tmp_path / "one", tmp_path / "out1", _params())


def test_manifest_split_sharing_a_group_is_warned_by_name(tmp_path, caplog):
    _manifest(tmp_path / "raw", groups=6, split=True)
    manifest = pd.read_csv(tmp_path / "raw" / "manifest.csv")
    manifest.loc[manifest.index[-1], "split"] = "test"  # one row of spk05 in test, the rest in train
    manifest.to_csv(tmp_path / "raw" / "manifest.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="mmops.data.prepare"):
        summary = prepare(tmp_path / "raw", tmp_path / "out", _params())
    assert "spk05" in caplog.text and "spk00" not in caplog.text.split("seen:")[-1]
    assert summary["groups"]["in_two_splits"] == ["spk05"]
    with pytest.raises(ValueError, match="own split column"):
        prepare(tmp_path / "raw", tmp_path / "out2", _params(test_groups=["spk01"]))


def test_empty_group_cell_is_quarantined_by_line(tmp_path):
    _manifest(tmp_path / "raw", groups=4)
    manifest = pd.read_csv(tmp_path / "raw" / "manifest.csv")
    manifest["speaker"] = manifest["speaker"].astype(object)
    manifest.loc[7, "speaker"] = ""
    manifest.to_csv(tmp_path / "raw" / "manifest.csv", index=False)
    summary = prepare(tmp_path / "raw", tmp_path / "out", _params())
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert summary["quarantined"] == 1 and q.loc[0, "line"] == 9 and q.loc[0, "field"] == "speaker"
    assert "data.group_column" in q.loc[0, "reason"]


def test_missing_group_column_is_named(tmp_path):
    _manifest(tmp_path / "raw", groups=3)
    with pytest.raises(ValueError, match=r"missing columns.*user"):
        prepare(tmp_path / "raw", tmp_path / "out", _params(group_column="user"))


def test_a_shared_image_links_the_groups_that_use_it():
    rows = pd.DataFrame({GROUP: ["a", "a", "b", "b", "c", "d"], "image_idx": [0, 1, 1, 2, 3, -1]})
    linked = rows[_link_groups(rows, "image_idx")].to_numpy()
    assert linked[0] == linked[1] == linked[2] == linked[3]  # a and b share image 1
    assert len({linked[0], linked[4], linked[5]}) == 3  # a missing image (-1) links nothing


def test_per_group_scores_and_report_table():
    task = build_task("classification", {}, ["a", "b"])
    targets = np.array([0, 1, 0, 1])
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    by_group = per_group(task, targets, scores, np.array(["ann", "ann", "bob", "bob"]))
    assert by_group == {"ann": 1.0, "bob": 0.0}
    html = _per_group_table({"test": {"by_group": by_group}})
    assert "ann" in html and "bob" in html and _per_group_table({"test": {}}) == ""


def test_params_file_with_groups_loads(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "data: {source: manifest, group_column: speaker, val_groups: [s1]}\n"
        "inputs: {x: {modality: number}}\ntarget: label\ncandidates: [{name: x, inputs: [x]}]\n"
    )
    assert load_params(tmp_path / "params.yaml").data.val_groups == ["s1"]
    (tmp_path / "params.yaml").write_text(
        "data: {val_groups: [s1]}\ninputs: {x: {modality: number}}\ncandidates: [{name: x, inputs: [x]}]\n"
    )
    with pytest.raises(ConfigError, match="group_column"):
        load_params(tmp_path / "params.yaml")
