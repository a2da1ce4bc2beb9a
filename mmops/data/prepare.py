"""The ``prepare`` stage: validate every row, split, build the label map, store inputs compactly.

Bad rows are quarantined with their manifest line, field and reason instead of failing the stage:
one corrupt image should cost one example, not a night's retraining. Rows added later by
``mmops data append`` (``data/appended/<batch>/manifest.csv``, paths relative to that folder) are
merged in; their problems are reported with their own file and line. Each distinct input value is
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
    source: str
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


def required_columns(params: Params) -> list[str]:
    return [*params.inputs, params.target, "split"]


def _read_manifest(path: Path, source: str, root: str, params: Params) -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in required_columns(params) if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; the manifest has {list(df.columns)}")
    df["line"] = np.arange(len(df)) + 2  # header is line 1
    df["source"] = source
    df["root"] = root  # the folder its relative paths start from, relative to the appended folder
    return df


def prepare(raw_dir: Path, out_dir: Path, params: Params, appended_dir: Path | None = None) -> dict:
    """``appended_dir`` defaults to the project layout's ``data/appended`` beside ``raw_dir``."""
    manifest_path = raw_dir / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no manifest. Run `mmops data import easy-vqa` first.")
    appended_dir = appended_dir or raw_dir.parent / "appended"
    batches = sorted(m for m in appended_dir.glob(f"*/{MANIFEST}") if not m.parent.name.startswith(".")) \
        if appended_dir.is_dir() else []
    df = pd.concat(
        [_read_manifest(manifest_path, MANIFEST, "", params)]
        + [_read_manifest(m, f"appended/{m.parent.name}/{MANIFEST}", m.parent.name, params) for m in batches],
        ignore_index=True,
    ).fillna("")  # columns an appended batch lacks (e.g. answer_type) are empty, not NaN

    problems: list[Problem] = []
    bad = np.zeros(len(df), dtype=bool)

    def flag(mask: np.ndarray, field: str, reason: str) -> None:
        for source, line in df.loc[mask & ~bad, ["source", "line"]].itertuples(index=False):
            problems.append(Problem(source, int(line), field, reason))
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
            # One key per file: the same relative path in two batches is two different images.
            values = (df["root"] + "\x00" + values).str.removeprefix("\x00")
            uniques, index = np.unique(values.to_numpy(), return_inverse=True)
            store = np.zeros((len(uniques), params.data.image_size, params.data.image_size, 3), np.uint8)
            broken = np.zeros(len(uniques), dtype=bool)
            for i, key in enumerate(track(uniques, description=f"decoding {name}", transient=True)):
                batch, _, rel = key.rpartition("\x00")
                try:
                    root = appended_dir / batch if batch else raw_dir
                    store[i] = load_image(_resolve_inside(root, rel), params.data.image_size)
                except BadImageError as exc:
                    broken[i] = True
                    flag((values == key).to_numpy(), name, str(exc))
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
    quarantine = pd.DataFrame([p.__dict__ for p in problems], columns=["source", "line", "field", "reason"])
    quarantine = (quarantine.merge(df.drop(columns="root"), on=["source", "line"], how="left")
                  .sort_values(["source", "line"]))
    quarantine.to_csv(out_dir / "quarantine.csv", index=False)
    summary = {
        "rows": len(df),
        "kept": len(rows),
        "quarantined": int(bad.sum()),
        "splits": {k: int(v) for k, v in rows["split"].value_counts().sort_index().items()},
        "labels": len(train_labels),
        "appended_batches": len(batches),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
