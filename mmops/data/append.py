"""``mmops data append FILE``: add labelled rows to the dataset as a new, self-contained batch.

A batch lives in ``data/appended/<batch>/``: the manifest as given plus copies of the files it
refers to (paths in it are relative to the manifest's own folder). ``data/appended`` is a DVC
dependency of ``prepare``, so the next run re-prepares and re-featurizes and leaves ``import`` alone;
the imported ``data/raw`` is never rewritten. Bad rows are not rejected here: like any row, they are
quarantined by ``prepare`` with their file, line and reason.
"""

from __future__ import annotations

import hashlib
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from mmops.config import Params
from mmops.data.prepare import FILE_KINDS, MANIFEST, required_columns


def append_manifest(file: Path, appended_dir: Path, params: Params) -> dict:
    """Copy ``file`` and its files into a new batch; refuses a file whose rows were already appended."""
    content = file.read_bytes()
    df = pd.read_csv(file, dtype=str, keep_default_na=False)
    missing = [c for c in [*required_columns(params), "split"] if c not in df.columns]
    if missing:
        raise ValueError(f"{file}: missing columns {missing}; the manifest has {list(df.columns)}")
    if df.empty:
        raise ValueError(f"{file}: no rows to append")
    digest = hashlib.sha256(content).hexdigest()[:12]
    for existing in appended_dir.glob(f"*-{digest}"):
        raise ValueError(f"{file}: these rows were already appended as {existing.name}")

    batch = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{digest}"
    dest = appended_dir / batch
    tmp = appended_dir / f".{batch}.tmp"  # a half-copied batch must never be seen by prepare
    tmp.mkdir(parents=True)
    source_root = file.parent.resolve()
    copied, unusable = 0, 0
    for name, spec in params.inputs.items():
        if spec.kind not in FILE_KINDS:
            continue
        for rel in df[name].str.strip().unique():
            if not rel:  # a missing input (inputs.<name>.missing: learn)
                continue
            src = (source_root / rel).resolve()
            if not (src.is_relative_to(source_root) and src.is_file()):
                unusable += int((df[name].str.strip() == rel).sum())
                continue
            target = tmp / src.relative_to(source_root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            copied += 1
    (tmp / MANIFEST).write_bytes(content)
    tmp.rename(dest)
    return {"batch": batch, "path": dest, "rows": len(df), "files": copied, "rows_with_missing_files": unusable,
            "splits": df["split"].value_counts().to_dict()}
