"""Import easy-VQA from the ``easy-vqa`` package into a manifest; nothing is downloaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

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
