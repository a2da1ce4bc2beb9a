"""easy-VQA as image-caption pairs: attributes read from the image's own questions, several captions per
image, splits grouped by image, and colour-shape pairs held out of train and val for zero-shot."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from mmops.data.easyvqa import (
    CAPTION_TEMPLATES,
    HOLDOUT_PAIRS,
    ZERO_SHOT_PAIRS,
    image_attributes,
    import_easy_vqa_captions,
)


def test_attributes_come_from_answers_yes_no_and_negations():
    questions = (
        [
            "what color is the shape?",
            "is there a triangle?",
            "does the image not contain a circle?",
            "is there not a red shape?",
            "is no blue shape present?",
            "is there a circle?",
        ],
        ["green", "no", "yes", "no", "yes", "no"],
        [1, 1, 1, 2, 2, 3],
    )
    # 1: green from the answer, rectangle as the only shape neither denied. 2: red (negated "no"), no
    # shape named: left out. 3: nothing but an absent circle: left out.
    assert image_attributes(questions) == {1: ("green", "rectangle")}


def test_conflicting_answers_leave_the_image_out():
    questions = (["what color is the circle?", "is there a red shape?"], ["blue", "yes"], [5, 5])
    assert image_attributes(questions) == {}


def test_captions_manifest_groups_splits_by_image_and_holds_out_pairs(tmp_path):
    manifest = import_easy_vqa_captions(tmp_path, limit=150)
    df = pd.read_csv(manifest)
    assert set(df["split"]) == {"train", "val", "test"}
    assert (df.groupby("image_id")["split"].nunique() == 1).all()  # no image in two splits
    assert (df.groupby("image_id").size() == len(CAPTION_TEMPLATES)).all()
    assert (df.groupby("image_id")["caption"].nunique() == len(CAPTION_TEMPLATES)).all()
    assert df["label"].eq(df["colour"] + " " + df["shape"]).all()
    assert all(row.colour in row.caption and row.shape in row.caption for row in df.itertuples())
    held = {f"{c} {s}" for c, s in HOLDOUT_PAIRS}
    assert not set(df.loc[df["split"] != "test", "label"]) & held
    assert set(df.loc[df["zero_shot"], "label"]) <= held and df["zero_shot"].any()
    trained = df[df["split"] == "train"]
    for colour, shape in HOLDOUT_PAIRS:  # each part of a held-out pair is seen apart in training
        assert (trained["colour"] == colour).any() and (trained["shape"] == shape).any()
    assert df.drop_duplicates("image_id").groupby("split").size().max() <= 150
    assert (tmp_path / df["image"].iloc[0]).is_file()


def test_no_zero_shot_pairs_keeps_package_splits_by_image(tmp_path):
    """Captioning's split: nothing held out, so every test pair can have been learnt in train."""
    df = pd.read_csv(import_easy_vqa_captions(tmp_path, limit=150, holdout=ZERO_SHOT_PAIRS["none"]))
    assert not df["zero_shot"].any()
    assert (df.groupby("image_id")["split"].nunique() == 1).all()  # still split by image
    source = df["image_id"].str.split("/").str[0]
    assert (df.loc[source == "test", "split"] == "test").all() and (df.loc[source == "train", "split"] != "test").all()
    held = {f"{c} {s}" for c, s in HOLDOUT_PAIRS}
    assert set(df.loc[df["split"] == "train", "label"]) & held  # the CLIP hold-out pairs now train too
    assert set(df.loc[df["split"] == "test", "label"]) <= set(df.loc[df["split"] == "train", "label"])


def test_cli_zero_shot_pairs_option_and_params_default(tmp_path):
    from mmops.cli.main import app
    from mmops.scaffold import init_project

    init_project(tmp_path / "p", "captioning", git=False)  # its params say zero_shot_pairs: none
    runner = CliRunner()
    project = ["--limit", "30", "-p", str(tmp_path / "p")]
    bad = runner.invoke(app, ["data", "import", "easy-vqa", "--zero-shot-pairs", "some", *project])
    assert bad.exit_code == 2 and "none" in bad.output
    manifest = tmp_path / "p" / "data" / "raw" / "manifest.csv"
    assert runner.invoke(app, ["data", "import", *project]).exit_code == 0
    assert not pd.read_csv(manifest)["zero_shot"].any()
    ok = runner.invoke(app, ["data", "import", "easy-vqa", "--zero-shot-pairs", "default", *project])
    assert ok.exit_code == 0, ok.output
    assert pd.read_csv(manifest)["zero_shot"].any()


def test_cli_imports_captions_and_refuses_unknown_layouts(tmp_path):
    from mmops.cli.main import app
    from mmops.scaffold import init_project

    init_project(tmp_path / "p", "vqa", git=False)
    runner = CliRunner()
    bad = runner.invoke(app, ["data", "import", "easy-vqa", "--as", "triples", "-p", str(tmp_path / "p")])
    assert bad.exit_code == 2 and "captions" in bad.output
    ok = runner.invoke(
        app, ["data", "import", "easy-vqa", "--as", "captions", "--limit", "20", "-p", str(tmp_path / "p")]
    )
    assert ok.exit_code == 0, ok.output
    df = pd.read_csv(tmp_path / "p" / "data" / "raw" / "manifest.csv")
    assert {"image", "caption", "label", "split", "image_id"} <= set(df.columns)


# ---------------------------------------------------------------- Fashion-MNIST (Debian's dataset-fashion-mnist)


def _fashion_mnist_dir():
    from mmops.data.fashion_mnist import DEFAULT_DIR, INSTALL

    if not (DEFAULT_DIR / "train-images-idx3-ubyte.gz").is_file():  # CI installs it (.ci/run): never skipped
        pytest.fail(f"Fashion-MNIST is not installed at {DEFAULT_DIR}: {INSTALL}")
    return DEFAULT_DIR


def test_fashion_mnist_import_holds_two_classes_out(tmp_path):
    from PIL import Image

    from mmops.data.fashion_mnist import CLASSES, HELD_OUT, PHRASES, TEMPLATES, import_fashion_mnist

    df = pd.read_csv(import_fashion_mnist(_fashion_mnist_dir(), tmp_path, limit=300))
    assert df.groupby("split").size().to_dict() == {"test": 300, "train": 300, "val": 300}
    assert set(df.loc[df["split"] != "test", "label"]) == set(CLASSES) - set(HELD_OUT)
    assert set(HELD_OUT) <= set(df.loc[df["split"] == "test", "label"])
    assert df["zero_shot"].eq(df["label"].isin(HELD_OUT)).all()
    # each caption: one of the templates around its class's phrase, and the templates vary within a class
    allowed = {c: {t.format(PHRASES[c]) for t in TEMPLATES} for c in CLASSES}
    assert all(cap in allowed[label] for cap, label in zip(df["caption"], df["label"], strict=True))
    assert (df.groupby("label")["caption"].nunique() > 1).all()
    assert df["image_id"].is_unique
    with Image.open(tmp_path / df["image"].iloc[0]) as img:
        assert img.size == (28, 28)


def test_fashion_mnist_phrases_carry_the_held_out_classes_kind_in_minilm():
    """Zero-shot to a held-out class goes through the frozen MiniLM: an image of it lands near the
    captions of its trained relatives (sneaker and ankle boot for sandal, coat and shirt for pullover),
    so their captions must be nearer its own label than the other held-out class's. With the phrases
    they are; with bare names ("a photo of a sandal") they are not: footwear captions sit nearer
    "pullover", which is what put the held-out images the wrong way round (18% between the two)."""
    import torch
    from mmops_plugins.encoders.hf_text import HFTextEncoder

    from mmops.data.fashion_mnist import PHRASES, TEMPLATES

    encoder = HFTextEncoder()

    def class_vectors(words):  # each class through every template, averaged (open_clip's prompt ensembling)
        out = {}
        for c, text in words.items():
            with torch.no_grad():
                v = encoder(encoder.preprocess([t.format(text) for t in TEMPLATES]))
            v = torch.nn.functional.normalize(v, dim=-1).mean(0)
            out[c] = torch.nn.functional.normalize(v, dim=0)
        return out

    def transfers(vectors) -> bool:
        footwear, top = vectors["sneaker"] + vectors["ankle boot"], vectors["coat"] + vectors["shirt"]
        return bool(
            footwear @ vectors["sandal"] > footwear @ vectors["pullover"]
            and top @ vectors["pullover"] > top @ vectors["sandal"]
        )

    assert transfers(class_vectors(PHRASES))
    assert not transfers(class_vectors({c: c for c in PHRASES}))  # the bare names: the failure measured before


def test_fashion_mnist_bad_folder_says_how_to_install(tmp_path):
    import gzip

    from mmops.data.fashion_mnist import import_fashion_mnist, read_idx

    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        import_fashion_mnist(tmp_path, tmp_path / "out")
    good = tmp_path / "x-idx1-ubyte.gz"
    good.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([1, 2, 3])))
    assert read_idx(good).tolist() == [1, 2, 3]
    cut = tmp_path / "y-idx1-ubyte.gz"
    cut.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes([1, 2])))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(cut)
