"""The ``prepare`` stage: validate every row, split, build the label map, store inputs compactly.

Bad rows are quarantined with their manifest line, field and reason instead of failing the stage:
one corrupt image should cost one example, not a night's retraining. Each distinct input value is
stored once (5,000 images serve 48k easy-VQA questions); rows point at it by index, which is what
lets training encode each distinct image once per batch and featurize each distinct text once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import track
from sklearn.model_selection import StratifiedGroupKFold

from mmops.config import Params
from mmops.data.images import BadImageError, load_image

MANIFEST = "manifest.csv"


@dataclass
class Problem:
    line: int
    field: str
    reason: str


def _resolve_inside(root: Path, rel: str) -> Path:
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BadImageError(f"path '{rel}' escapes the data root {root}")
    if not path.is_file():
        raise BadImageError(f"file '{rel}' not found under {root}")
    return path


def _split_train_val(rows: pd.DataFrame, target: str, group: str | None, fraction: float, seed: int) -> pd.Series:
    """Stratified by target and grouped by image, so no image is seen in both train and val."""
    n_splits = max(2, round(1 / fraction))
    groups = rows[group] if group else np.arange(len(rows))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, val_idx = next(splitter.split(rows, rows[target], groups))
    split = pd.Series("train", index=rows.index)
    split.iloc[val_idx] = "val"
    return split


def prepare(raw_dir: Path, out_dir: Path, params: Params) -> dict:
    manifest_path = raw_dir / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no manifest. Run `mmops data import easy-vqa` first.")
    df = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    df["line"] = np.arange(len(df)) + 2  # header is line 1
    required = [*params.inputs, params.target, "split"]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{manifest_path}: missing columns {missing}; the manifest has {list(df.columns)}")

    problems: list[Problem] = []
    bad = np.zeros(len(df), dtype=bool)

    def flag(mask: np.ndarray, field: str, reason: str) -> None:
        for line in df.loc[mask & ~bad, "line"]:
            problems.append(Problem(int(line), field, reason))
        bad[mask] = True

    flag(~df["split"].isin(["train", "test"]).to_numpy(), "split", "split must be 'train' or 'test'")
    flag((df[params.target].str.strip() == "").to_numpy(), params.target, "empty target")

    out_dir.mkdir(parents=True, exist_ok=True)
    columns: dict[str, np.ndarray] = {}
    for name, spec in params.inputs.items():
        values = df[name].str.strip()
        if spec.modality == "text":
            flag((values == "").to_numpy(), name, "empty text")
            uniques, index = np.unique(values.to_numpy(), return_inverse=True)
            (out_dir / f"{name}.json").write_text(json.dumps(uniques.tolist()))
        elif spec.modality == "image":
            uniques, index = np.unique(values.to_numpy(), return_inverse=True)
            store = np.zeros((len(uniques), params.data.image_size, params.data.image_size, 3), np.uint8)
            broken = np.zeros(len(uniques), dtype=bool)
            for i, rel in enumerate(track(uniques, description=f"decoding {name}", transient=True)):
                try:
                    store[i] = load_image(_resolve_inside(raw_dir, rel), params.data.image_size)
                except BadImageError as exc:
                    broken[i] = True
                    flag((values == rel).to_numpy(), name, str(exc))
            np.save(out_dir / f"{name}.npy", store)
        else:
            raise NotImplementedError(f"inputs.{name}: modality '{spec.modality}' is not supported yet")
        columns[f"{name}_idx"] = index.astype(np.int64)

    train_labels = sorted(set(df.loc[~bad & (df["split"] == "train").to_numpy(), params.target]))
    flag(~df[params.target].isin(train_labels).to_numpy(), params.target,
         "label never seen in the train split, so no model can predict it")

    rows = pd.DataFrame({"line": df["line"], **columns, "label": 0, "split": df["split"]})
    label_of = {label: i for i, label in enumerate(train_labels)}
    rows["label"] = df[params.target].map(label_of).fillna(-1).astype(np.int64)
    if "answer_type" in df.columns:
        rows["group"] = df["answer_type"]
    rows = rows[~bad].reset_index(drop=True)
    image_inputs = [n for n, s in params.inputs.items() if s.modality == "image"]
    train_mask = rows["split"] == "train"
    rows.loc[train_mask, "split"] = _split_train_val(
        rows[train_mask], "label", f"{image_inputs[0]}_idx" if image_inputs else None,
        params.data.val_fraction, params.seed,
    ).to_numpy()

    rows.to_parquet(out_dir / "rows.parquet", index=False)
    (out_dir / "labels.json").write_text(json.dumps(train_labels))
    quarantine = pd.DataFrame([p.__dict__ for p in problems], columns=["line", "field", "reason"])
    quarantine = quarantine.merge(df, on="line", how="left").sort_values("line")
    quarantine.to_csv(out_dir / "quarantine.csv", index=False)
    summary = {
        "rows": int(len(df)),
        "kept": int(len(rows)),
        "quarantined": int(bad.sum()),
        "splits": {k: int(v) for k, v in rows["split"].value_counts().sort_index().items()},
        "labels": len(train_labels),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
