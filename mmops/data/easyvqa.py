"""Import easy-VQA from the ``easy-vqa`` package into a manifest; nothing is downloaded."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("mmops.import")

SHAPES = {"circle", "rectangle", "triangle"}


def answer_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "colour"


def import_easy_vqa(out_dir: Path, limit: int = 0) -> Path:
    """Copy the images under ``out_dir/images`` and write ``out_dir/manifest.csv``.

    One row per question: question, image (relative to ``out_dir``), answer, split (the package's own
    train/test), answer_type. ``limit`` keeps the first N questions of each split (tests use it).
    """
    import easy_vqa

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, questions, paths in (
        ("train", easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        ("test", easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
    ):
        texts, answers, image_ids = questions
        n = limit or len(texts)
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        for text, answer, image_id in zip(texts[:n], answers[:n], image_ids[:n], strict=True):
            rel = Path("images") / split / f"{image_id}.png"
            if not (out_dir / rel).exists():
                shutil.copyfile(paths[image_id], out_dir / rel)
            rows.append({"question": text, "image": rel.as_posix(), "answer": answer, "split": split,
                         "answer_type": answer_type(answer)})
    manifest = out_dir / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


# ---------------------------------------------------------------- captions (contrastive, captioning)

COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
#: Phrasings of one image's colour and shape: each image gets one row per template, all positives of it.
CAPTION_TEMPLATES = ("a {colour} {shape}", "a picture of a {colour} {shape}", "a {shape} coloured {colour}")
#: Colour-shape pairs never seen in train or val: every colour and shape in them is seen in other pairs,
#: so the test split measures compositional zero-shot ("a red circle" from "red" and "circle" seen apart).
HOLDOUT_PAIRS = (("red", "circle"), ("blue", "triangle"), ("yellow", "rectangle"), ("teal", "circle"))
#: ``zero_shot_pairs`` choices (params ``data.zero_shot_pairs``, ``--zero-shot-pairs``): the CLIP split holds
#: HOLDOUT_PAIRS out; captioning holds none, so its test split asks only for pairs it can have learnt.
ZERO_SHOT_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {"default": HOLDOUT_PAIRS, "none": ()}
CAPTION_COLUMNS = ["image", "caption", "label", "split", "image_id", "colour", "shape", "zero_shot"]


def image_attributes(questions: tuple[list, list, list]) -> dict[int, tuple[str, str]]:
    """Each image's (colour, shape), read from its own questions and answers.

    A "what colour/shape" answer names the attribute; a yes/no question names one present (yes, or a
    negated question answered no) or absent; a shape is also found when the other two are absent. An
    image whose questions do not pin down both (about one in nine) is left out rather than guessed.
    """
    present: dict[int, set[str]] = {}
    absent: dict[int, set[str]] = {}
    vocab = set(COLOURS) | SHAPES
    for text, answer, image_id in zip(*questions, strict=True):
        words = set(re.findall(r"[a-z]+", text.lower()))
        named = words & vocab
        if answer in ("yes", "no"):
            here = (answer == "yes") != bool(words & {"not", "no"})
            (present if here else absent).setdefault(image_id, set()).update(named)
        else:
            present.setdefault(image_id, set()).update(named | {answer})
    out = {}
    for image_id in sorted(set(questions[2])):
        seen, gone = present.get(image_id, set()), absent.get(image_id, set())
        colours, shapes = seen & set(COLOURS), seen & SHAPES
        if not shapes and len(SHAPES - gone) == 1:
            shapes = SHAPES - gone
        if not colours and len(set(COLOURS) - gone) == 1:
            colours = set(COLOURS) - gone
        if len(colours) == 1 and len(shapes) == 1 and not (colours | shapes) & gone:
            out[image_id] = (colours.pop(), shapes.pop())
    return out


def import_easy_vqa_captions(out_dir: Path, limit: int = 0, val_fraction: float = 0.1, seed: int = 0,
                             holdout: tuple[tuple[str, str], ...] = HOLDOUT_PAIRS) -> Path:
    """easy-VQA as image-caption pairs: one row per (image, caption), ``len(CAPTION_TEMPLATES)`` per image.

    Columns: ``image``, ``caption``, ``label`` (the colour-shape class, "blue circle": what makes a pair a
    match, the contrastive target), ``split``, ``image_id`` (``<package split>/<id>``), ``colour``,
    ``shape`` and ``zero_shot`` (the pair is held out). Splits are by image, so no image has captions in
    two splits: the package's test images are test, ``val_fraction`` of its train images are val, and
    every image of a ``holdout`` pair (from either package split) is test (``holdout=()``, i.e.
    ``ZERO_SHOT_PAIRS['none']``, keeps the package's split for every image). ``limit`` keeps N images of
    each split, drawn at random (seeded), so a small import still holds held-out pairs.
    """
    import easy_vqa

    out_dir.mkdir(parents=True, exist_ok=True)
    held = set(holdout)
    rng = np.random.default_rng(seed)
    rows, skipped = [], 0
    for source, questions, paths in (
        ("train", easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        ("test", easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
    ):
        attributes = image_attributes(questions)
        skipped += len(set(questions[2])) - len(attributes)
        ids = sorted(attributes)
        n_val = round(val_fraction * len(ids)) if source == "train" else 0
        val = set(rng.choice(ids, n_val, replace=False).tolist())
        (out_dir / "images" / source).mkdir(parents=True, exist_ok=True)
        for image_id in ids:
            colour, shape = attributes[image_id]
            zero_shot = (colour, shape) in held
            split = "test" if zero_shot or source == "test" else "val" if image_id in val else "train"
            rel = Path("images") / source / f"{image_id}.png"
            if not (out_dir / rel).exists():
                shutil.copyfile(paths[image_id], out_dir / rel)
            for template in CAPTION_TEMPLATES:
                rows.append({"image": rel.as_posix(), "caption": template.format(colour=colour, shape=shape),
                             "label": f"{colour} {shape}", "split": split, "image_id": f"{source}/{image_id}",
                             "colour": colour, "shape": shape, "zero_shot": zero_shot})
    df = pd.DataFrame(rows, columns=CAPTION_COLUMNS)
    if limit:
        images = df.drop_duplicates("image_id").sample(frac=1.0, random_state=seed)  # held-out pairs in a small test
        keep = images.groupby("split", sort=False).head(limit)["image_id"]
        df = df[df["image_id"].isin(set(keep))]
    if skipped:
        log.info("easy-vqa captions: %d images left out: their questions do not name both colour and shape", skipped)
    manifest = out_dir / "manifest.csv"
    df.to_csv(manifest, index=False)
    return manifest
