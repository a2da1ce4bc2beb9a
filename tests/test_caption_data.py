"""Caption data feeding the captioning task: an image folder with ``<stem>.txt`` sidecars, and the real COCO
``captions_*.json`` schema on a small file; every caption is a row, and an image's rows are one example."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mmops_plugins.tasks.captioning import CaptioningTask
from PIL import Image

from mmops.config import Params
from mmops.data.importers import ImportError_, import_caption_folder, import_coco_captions
from mmops.data.prepare import prepare


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


def _params(**data) -> Params:
    return Params.model_validate(
        {
            "data": {"image_size": 16, "val_fraction": 0.2, "test_fraction": 0.2, **data},
            "inputs": {"image": {"modality": "image", "encoder": "cnn_image", "params": {"channels": [4]}}},
            "target": {"column": "caption", "type": "captioning"},
            "select_metric": "val_cider",
            "candidates": [{"name": "decoder"}],
        }
    )


def test_sidecar_folder_gives_one_row_per_caption_line(tmp_path):
    src = tmp_path / "photos"
    _png(src / "train" / "beach" / "a.jpg", (200, 180, 90))
    (src / "train" / "beach" / "a.txt").write_text("A dog on the beach.\n\n  a brown dog runs  \n", encoding="utf-8")
    _png(src / "train" / "b.png", (10, 10, 200))
    (src / "train" / "b.txt").write_text("a blue square\n", encoding="utf-8")
    _png(src / "test" / "c.png", (200, 10, 10))  # no sidecar: one empty row, quarantined by prepare
    out = tmp_path / "raw"
    df = pd.read_csv(import_caption_folder(src, out), keep_default_na=False)
    assert df[["image", "caption", "split"]].values.tolist() == [
        ["images/train/b.png", "a blue square", "train"],
        ["images/train/beach/a.jpg", "A dog on the beach.", "train"],
        ["images/train/beach/a.jpg", "a brown dog runs", "train"],
        ["images/test/c.png", "", "test"],
    ]
    assert df["origin"].tolist() == ["train/b.txt:1", "train/beach/a.txt:1", "train/beach/a.txt:3", "test/c.txt:0"]
    assert (out / "images" / "train" / "beach" / "a.jpg").is_file()
    assert len(pd.read_csv(import_caption_folder(src, tmp_path / "one", limit=1))) == 2  # first image of each split
    (src / "train" / "b.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ImportError_, match=r"b\.txt: not UTF-8"):
        import_caption_folder(src, tmp_path / "bad")


def _coco(
    root: Path, subset: str, images: list[tuple[int, str, tuple[int, int, int]]], captions: list[tuple[int, int, str]]
) -> None:
    """A ``captions_<subset>.json`` in COCO's own schema (info, licenses, images, annotations), with its images."""
    for _, name, colour in images:
        _png(root / subset / name, colour)
    doc = {
        "info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017},
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "BY-NC-SA"}],
        "images": [
            {
                "license": 1,
                "file_name": name,
                "coco_url": f"http://images.cocodataset.org/{subset}/{name}",
                "height": 16,
                "width": 16,
                "date_captured": "2013-11-14 17:02:52",
                "flickr_url": "",
                "id": i,
            }
            for i, name, _ in images
        ],
        "annotations": [
            {"image_id": image_id, "id": ann_id, "caption": caption} for ann_id, image_id, caption in captions
        ],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"captions_{subset}.json").write_text(json.dumps(doc))


def test_coco_captions_schema_feeds_the_caption_task_with_all_references(tmp_path):
    src = tmp_path / "coco"
    colours = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}
    train = [(100 + i, f"{100 + i:012d}.jpg", colours[c]) for i, c in enumerate(["red", "blue", "green"] * 4)]
    phrasings = ["a {} square", "a {} box", "the square is {}", "a plain {} picture", "{} all over"]
    names = {v: k for k, v in colours.items()}
    _coco(
        src,
        "train2017",
        train,
        [
            (1000 + 5 * n + k, i, phrasings[k].format(names[c]).capitalize() + ".")
            for n, (i, _, c) in enumerate(train)
            for k in range(5)
        ],
    )
    test = [(7, "000000000007.jpg", colours["red"]), (9, "000000000009.jpg", colours["blue"])]
    _coco(
        src,
        "val2017",
        test,
        [(5000 + 5 * n + k, i, phrasings[k].format(names[c])) for n, (i, _, c) in enumerate(test) for k in range(5)],
    )
    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    manifest = pd.read_csv(import_coco_captions(src, raw))
    assert len(manifest) == 70 and set(manifest["split"]) == {"train", "test"}
    summary = prepare(raw, prepared, _params(source="coco-captions"))
    assert summary["quarantined"] == 0
    rows = pd.read_parquet(prepared / "rows.parquet")
    labels = json.loads((prepared / "labels.json").read_text())
    assert labels[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and {"red", "square", "box"} <= set(labels)
    # No image has captions on both sides of a split, and every stored caption is normalised text.
    assert (rows.groupby("image_idx")["split"].nunique() == 1).all()
    assert rows.loc[rows["image_idx"] == rows["image_idx"].iloc[0], "label"].str.islower().all()
    task = CaptioningTask(labels=labels)
    test_rows = rows[rows["split"] == "test"].reset_index(drop=True)
    groups = task.reference_groups(test_rows)
    assert len(np.unique(groups)) == 2 and all((groups == g).sum() == 5 for g in np.unique(groups))
    # A model that answers each test image's first reference matches one of its five: exact match 1.
    first = test_rows.groupby(groups)["label"].transform("first")
    ids = task.ids(first.tolist())[:, 1:-1]
    scores = np.zeros((len(test_rows), 2 + task.max_length), dtype=np.float32)
    scores[:, 2 : 2 + ids.shape[1]] = ids
    metrics = task.evaluate(task.targets(test_rows["label"].tolist()), scores, groups)
    assert metrics["images"] == 2 and metrics["exact_match"] == 1.0 and metrics["bleu_1"] == pytest.approx(1.0)


def test_report_lists_test_images_with_references_worst_cider_first(tmp_path):
    from mmops.report import _captions_section

    np.save(tmp_path / "image.npy", np.zeros((2, 8, 8, 3), dtype=np.uint8))
    preds = pd.DataFrame(
        {
            "image_idx": [0, 0, 1, 1],
            "target": ["a red circle", "a picture of a red circle", "a blue square", "blue square"],
            "prediction": ["a red circle", "a red circle", "a green triangle", "a green triangle"],
        }
    )
    page = _captions_section(preds, {"image": {"modality": "image"}}, tmp_path)
    assert "2 of 2 test images" in page and page.count("<img") == 2
    assert page.index("a green triangle") < page.index("a red circle</td>")  # the wrong one first
    assert "a picture of a red circle" in page  # every reference is shown
