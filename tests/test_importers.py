"""Importers for VQA v2, COCO captions and image folders, on tiny datasets written in the real formats."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from mmops.data import importers
from mmops.data.importers import IMPORTERS, import_coco_captions, import_imagefolder, import_vqa_v2

INFO = {"description": "tiny", "version": "1.0", "year": 2017}
LICENSE = {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}


def _image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)  # format from the extension
    return path


def _dump(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _same_file(a: Path, b: Path) -> bool:
    return os.stat(a).st_ino == os.stat(b).st_ino or a.read_bytes() == b.read_bytes()


def _resolves(manifest: Path) -> pd.DataFrame:
    """Every image cell must name a file under the manifest's folder, as ``prepare`` reads it."""
    frame = pd.read_csv(manifest)
    for rel in frame["image"]:
        assert not Path(rel).is_absolute() and "\\" not in rel
        assert (manifest.parent / rel).resolve().is_relative_to(manifest.parent.resolve())
        assert (manifest.parent / rel).is_file(), rel
    return frame


# --- VQA v2 ---------------------------------------------------------------------------------------------------

VQA_QUESTIONS = {
    "train2014": [(1, "What color is the bus?", 10), (1, "Is it raining?", 11), (2, "How many dogs?", 20)],
    "val2014": [(3, "What is on the plate?", 30)],
}
VQA_ANSWERS = {10: ("red", "other"), 11: ("no", "yes/no"), 20: ("2", "number"), 30: ("pizza", "other")}


def _vqa(root: Path) -> Path:
    for subset, questions in [*VQA_QUESTIONS.items(), ("test2015", [(9, "Is this a test?", 90)])]:
        _dump(
            root / f"v2_OpenEnded_mscoco_{subset}_questions.json",
            {
                "info": INFO,
                "license": LICENSE,
                "task_type": "Open-Ended",
                "data_type": "mscoco",
                "data_subtype": subset,
                "questions": [{"image_id": i, "question": q, "question_id": qid} for i, q, qid in questions],
            },
        )
        for image_id in {i for i, _, _ in questions}:
            _image(root / subset / f"COCO_{subset}_{image_id:012d}.jpg")
        if subset == "test2015":
            continue  # no public answers
        annotations = []
        for image_id, _, qid in questions:
            answer, answer_type = VQA_ANSWERS[qid]
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": "what",
                    "answer_type": answer_type,
                    "multiple_choice_answer": answer,
                    "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k} for k in (1, 2, 3)],
                }
            )
        _dump(
            root / f"v2_mscoco_{subset}_annotations.json",
            {"info": INFO, "license": LICENSE, "data_subtype": subset, "annotations": annotations},
        )
    return root


def test_vqa_v2_rows_splits_links_and_origin(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source, out = _vqa(tmp_path / "vqa"), tmp_path / "raw"
    with caplog.at_level(logging.INFO, logger="mmops.import"):
        manifest = import_vqa_v2(source, out)
    assert manifest == out / "manifest.csv"
    frame = pd.read_csv(manifest)
    assert list(frame.columns) == ["question", "image", "answer", "answer_type", "split", "question_id", "origin"]
    assert frame["question_id"].tolist() == [10, 11, 20, 30]
    assert frame["split"].tolist() == ["train", "train", "train", "test"]
    assert frame["answer"].astype(str).tolist() == ["red", "no", "2", "pizza"]
    assert frame["answer_type"].tolist() == ["other", "yes/no", "number", "other"]
    assert frame["image"][0] == "images/train2014/COCO_train2014_000000000001.jpg"
    assert frame["origin"].tolist()[2:] == [
        "v2_OpenEnded_mscoco_train2014_questions.json#questions[2]",
        "v2_OpenEnded_mscoco_val2014_questions.json#questions[0]",
    ]
    assert _same_file(out / frame["image"][3], source / "val2014" / "COCO_val2014_000000000003.jpg")
    assert "skipping v2_OpenEnded_mscoco_test2015_questions.json: no v2_mscoco_test2015_annotations.json" in caplog.text
    assert "wrote 4 rows" in caplog.text


def test_vqa_v2_manifest_resolves(tmp_path: Path) -> None:
    frame = _resolves(IMPORTERS["vqa-v2"](_vqa(tmp_path / "vqa"), tmp_path / "raw", 0))
    assert len(frame) == 4


def test_vqa_v2_limit_per_split(tmp_path: Path) -> None:
    frame = pd.read_csv(import_vqa_v2(_vqa(tmp_path / "vqa"), tmp_path / "raw", limit=1))
    assert frame["question_id"].tolist() == [10, 30]


def test_vqa_v2_missing_image_keeps_row(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = _vqa(tmp_path / "vqa")
    (source / "train2014" / "COCO_train2014_000000000002.jpg").unlink()
    frame = pd.read_csv(import_vqa_v2(source, tmp_path / "raw"))
    row = frame[frame["question_id"] == 20].iloc[0]
    assert row["origin"] == "v2_OpenEnded_mscoco_train2014_questions.json#questions[2]"
    assert not (tmp_path / "raw" / row["image"]).exists()
    assert "1 rows refer to a missing image" in caplog.text


def test_vqa_v2_structural_errors_name_the_file(tmp_path: Path) -> None:
    source = _vqa(tmp_path / "vqa")
    qfile = source / "v2_OpenEnded_mscoco_train2014_questions.json"
    good = json.loads(qfile.read_text())

    qfile.write_text('{"questions": [')
    with pytest.raises(ValueError, match=r"v2_OpenEnded_mscoco_train2014_questions\.json: not valid JSON"):
        import_vqa_v2(source, tmp_path / "raw")

    _dump(qfile, {k: v for k, v in good.items() if k != "questions"})
    with pytest.raises(ValueError, match=r"train2014_questions\.json: no top-level 'questions' key"):
        import_vqa_v2(source, tmp_path / "raw")

    _dump(qfile, {**good, "questions": [good["questions"][0], {"question": "Where?", "question_id": 12}]})
    with pytest.raises(ValueError, match=r"train2014_questions\.json: questions\[1\] has no 'image_id' key"):
        import_vqa_v2(source, tmp_path / "raw")

    _dump(qfile, {**good, "questions": [*good["questions"], {"image_id": 1, "question": "Why?", "question_id": 99}]})
    with pytest.raises(
        ValueError, match=r"train2014_annotations\.json: no annotation for question_id 99 .*#questions\[3\]"
    ):
        import_vqa_v2(source, tmp_path / "raw")

    for path in source.glob("*_questions.json"):
        path.unlink()
    with pytest.raises(ValueError, match=r"no v2_OpenEnded_mscoco_<subset>_questions\.json"):
        import_vqa_v2(source, tmp_path / "raw")


@pytest.mark.parametrize("can_link", [True, False])
def test_reimport_replaces_links_never_writes_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, can_link: bool
) -> None:
    """The output may be hard-linked into the DVC cache; a re-import must not change that file."""
    source, out = _vqa(tmp_path / "vqa"), tmp_path / "raw"
    link = os.link

    def no_link(*args: object) -> None:
        raise OSError("cross-device link")

    if not can_link:
        monkeypatch.setattr(importers.os, "link", no_link)
    import_vqa_v2(source, out)
    image = out / "images/train2014/COCO_train2014_000000000001.jpg"
    cache = tmp_path / "cache_file"
    cache.write_bytes(b"cached")
    image.unlink()
    link(cache, image)
    (out / "manifest.csv").unlink()
    link(cache, out / "manifest.csv")
    import_vqa_v2(source, out)
    assert cache.read_bytes() == b"cached"
    assert image.read_bytes() == (source / "train2014/COCO_train2014_000000000001.jpg").read_bytes()
    assert (os.stat(image).st_ino == os.stat(source / "train2014/COCO_train2014_000000000001.jpg").st_ino) == can_link


def test_output_inside_source_is_refused(tmp_path: Path) -> None:
    source = _vqa(tmp_path / "vqa")
    with pytest.raises(ValueError, match="overlaps the source"):
        import_vqa_v2(source, source / "raw")


# --- COCO captions --------------------------------------------------------------------------------------------

COCO_CAPTIONS = {
    "train2017": {
        1: ["A cat on a sofa.", "a dog in the grass"],
        2: ["A dog in the grass.", "A brown dog."],
        3: ["A red bus."],
    },
    "val2017": {7: ["A plate of food."], 8: ["Two people skiing.", "People on snow."]},
}


def _coco(root: Path) -> Path:
    for subset, captions in COCO_CAPTIONS.items():
        images, annotations = [], []
        for image_id, texts in captions.items():
            name = f"{image_id:012d}.jpg"
            _image(root / subset / name, (image_id * 20, 0, 0))
            images.append({"license": 1, "file_name": name, "coco_url": "", "height": 4, "width": 4, "id": image_id})
            for text in texts:
                annotations.append({"image_id": image_id, "id": 100 + len(annotations), "caption": text + "\n"})
        _dump(
            root / "annotations" / f"captions_{subset}.json",
            {"info": INFO, "licenses": [LICENSE], "images": images, "annotations": annotations},
        )
    return root


def test_coco_captions_pair_rows(tmp_path: Path) -> None:
    """One row per caption, image_id the match key of the contrastive task; no negative rows."""
    source, out = _coco(tmp_path / "coco"), tmp_path / "raw"
    frame = pd.read_csv(import_coco_captions(source, out))
    assert list(frame.columns) == ["image", "caption", "split", "image_id", "origin"]
    assert frame["split"].value_counts().to_dict() == {"train": 5, "test": 3}
    assert frame["caption"].tolist()[:3] == ["A cat on a sofa.", "a dog in the grass", "A dog in the grass."]
    assert frame["origin"].tolist()[:2] == [
        "captions_train2017.json#annotations[0]",
        "captions_train2017.json#annotations[1]",
    ]
    for _, row in frame.iterrows():  # each caption sits with its own image
        subset = "train2017" if row["split"] == "train" else "val2017"
        assert row["caption"] in COCO_CAPTIONS[subset][row["image_id"]]
        assert row["image"] == f"images/{subset}/{row['image_id']:012d}.jpg"
    assert _same_file(out / frame.iloc[0]["image"], source / "train2017" / "000000000001.jpg")


def test_coco_captions_deterministic_and_limit_is_a_prefix(tmp_path: Path) -> None:
    source = _coco(tmp_path / "coco")
    first = import_coco_captions(source, tmp_path / "a").read_bytes()
    assert import_coco_captions(source, tmp_path / "b").read_bytes() == first
    full = pd.read_csv(tmp_path / "a" / "manifest.csv")
    limited = pd.read_csv(import_coco_captions(source, tmp_path / "c", limit=3))
    assert limited["split"].value_counts().to_dict() == {"train": 3, "test": 3}
    expected = pd.concat([full[full["split"] == s].head(3) for s in ("train", "test")], ignore_index=True)
    pd.testing.assert_frame_equal(limited, expected)


def test_coco_captions_manifest_resolves(tmp_path: Path) -> None:
    assert len(_resolves(IMPORTERS["coco-captions"](_coco(tmp_path / "coco"), tmp_path / "raw", 0))) == 8


def test_coco_captions_missing_image_keeps_rows(tmp_path: Path) -> None:
    source = _coco(tmp_path / "coco")
    (source / "val2017" / "000000000007.jpg").unlink()
    frame = pd.read_csv(import_coco_captions(source, tmp_path / "raw"))
    rows = frame[frame["image_id"] == 7]
    assert len(rows) == 1 and rows.iloc[0]["caption"] == "A plate of food."
    assert not (tmp_path / "raw" / rows.iloc[0]["image"]).exists()


def test_coco_captions_structural_errors(tmp_path: Path) -> None:
    source = _coco(tmp_path / "coco")
    afile = source / "annotations" / "captions_val2017.json"
    good = json.loads(afile.read_text())

    _dump(afile, {**good, "annotations": [*good["annotations"], {"image_id": 42, "id": 999, "caption": "Lost."}]})
    with pytest.raises(ValueError, match=r"captions_val2017\.json: annotations\[3\] refers to image_id 42"):
        import_coco_captions(source, tmp_path / "raw")

    _dump(afile, {**good, "annotations": [{"image_id": 7, "id": 1}]})
    with pytest.raises(ValueError, match=r"captions_val2017\.json: annotations\[0\] has no 'caption' key"):
        import_coco_captions(source, tmp_path / "raw")

    _dump(afile, {k: v for k, v in good.items() if k != "images"})
    with pytest.raises(ValueError, match=r"captions_val2017\.json: no top-level 'images' key"):
        import_coco_captions(source, tmp_path / "raw")

    afile.write_text("not json")
    with pytest.raises(ValueError, match=r"captions_val2017\.json: not valid JSON"):
        import_coco_captions(source, tmp_path / "raw")


# --- image folders --------------------------------------------------------------------------------------------


def test_imagefolder_flat_with_sidecar_text(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source, out = tmp_path / "pets", tmp_path / "raw"
    _image(source / "cat" / "001.jpg")
    _image(source / "cat" / "002.PNG")
    (source / "cat" / "001.txt").write_text("a sleepy cat\n")
    _image(source / "dog" / "a.JPEG")
    (source / "dog" / "notes.csv").write_text("x")
    (source / "README.md").write_text("loose")
    frame = pd.read_csv(import_imagefolder(source, out), keep_default_na=False)
    assert list(frame.columns) == ["image", "text", "label", "origin"]
    assert frame.to_dict("records") == [  # round-robin over classes
        {"image": "images/cat/001.jpg", "text": "a sleepy cat", "label": "cat", "origin": "cat/001.jpg"},
        {"image": "images/dog/a.JPEG", "text": "", "label": "dog", "origin": "dog/a.JPEG"},
        {"image": "images/cat/002.PNG", "text": "", "label": "cat", "origin": "cat/002.PNG"},
    ]
    assert _same_file(out / "images/cat/001.jpg", source / "cat" / "001.jpg")
    assert "ignored 2 files" in caplog.text


def test_imagefolder_splits_and_limit(tmp_path: Path) -> None:
    source = tmp_path / "pets"
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        _image(source / "train" / "cat" / name)
    _image(source / "train" / "dog" / "1.png")
    _image(source / "val" / "dog" / "9.jpg")
    frame = pd.read_csv(import_imagefolder(source, tmp_path / "raw"))
    assert list(frame.columns) == ["image", "text", "label", "split", "origin"]
    assert frame["split"].value_counts().to_dict() == {"train": 4, "test": 1}
    assert frame["origin"].tolist()[-1] == "val/dog/9.jpg"
    limited = pd.read_csv(import_imagefolder(source, tmp_path / "raw2", limit=2))
    assert limited["label"].tolist() == ["cat", "dog", "dog"]  # the limit keeps every class
    assert limited["split"].tolist() == ["train", "train", "test"]


def test_imagefolder_manifest_resolves(tmp_path: Path) -> None:
    source = tmp_path / "pets"
    _image(source / "test" / "cat" / "1.jpg")
    _image(source / "train" / "cat" / "2.bmp")
    assert len(_resolves(IMPORTERS["imagefolder"](source, tmp_path / "raw", 0))) == 2


def test_imagefolder_refuses_mixed_split_and_class_folders(tmp_path: Path) -> None:
    source = tmp_path / "pets"
    _image(source / "train" / "cat" / "1.jpg")
    _image(source / "dog" / "1.jpg")
    with pytest.raises(ValueError, match="mixes split folders"):
        import_imagefolder(source, tmp_path / "raw")
    with pytest.raises(ValueError, match="not a folder"):
        import_imagefolder(tmp_path / "nowhere", tmp_path / "raw")


def test_imported_bad_rows_are_quarantined_by_manifest_line_with_their_origin(tmp_path: Path) -> None:
    """An importer keeps a row whose image is missing; `prepare` names its line, reason and origin."""
    from mmops.config import Params
    from mmops.data.prepare import prepare

    source = _vqa(tmp_path / "vqa")
    (source / "train2014" / "COCO_train2014_000000000002.jpg").unlink()
    raw = tmp_path / "raw"
    import_vqa_v2(source, raw)
    params = Params.model_validate(
        {
            "inputs": {"question": {"modality": "text"}, "image": {"modality": "image"}},
            "candidates": [{"name": "concat", "fusion": "concat"}],
            "data": {"image_size": 8},
        }
    )
    summary = prepare(raw, tmp_path / "prepared", params, appended_dir=tmp_path / "none")
    quarantine = pd.read_csv(tmp_path / "prepared" / "quarantine.csv").set_index("line")
    # Line 4 (question 20) lost its image; line 5 (question 30, test) has an answer never seen in train.
    assert quarantine.loc[4, "field"] == "image" and "not found" in quarantine.loc[4, "reason"]
    assert quarantine.loc[4, "origin"] == "v2_OpenEnded_mscoco_train2014_questions.json#questions[2]"
    assert quarantine.loc[5, "field"] == "answer" and "never seen" in quarantine.loc[5, "reason"]
    assert summary["quarantined"] == 2 and summary["kept"] == 2
