"""The ``prepare`` stage: validate every row, split, build the label map, store inputs compactly.

Bad rows are quarantined with their manifest line, field and reason instead of failing the stage:
one corrupt image should cost one example, not a night's retraining. Rows added later by
``mmops data append`` (``data/appended/<batch>/manifest.csv``, paths relative to that folder) are
merged in; their problems are reported with their own file and line. Each distinct input value is
stored once (5,000 images serve 48k easy-VQA questions); rows point at it by index, which is what
lets training encode each distinct image once per batch and featurize each distinct text once.

The manifest (CSV, JSONL or Parquet) is streamed in chunks of ``data.chunk_rows`` rows, and decoded
images and audio go straight into memory-mapped ``.npy`` files: memory grows with the distinct values
and a small per-row index, never with the size of the manifest or of the files.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.progress import track
from sklearn.model_selection import StratifiedGroupKFold

from mmops.config import VECTORS_MAX_LENGTH, InputConfig, Params
from mmops.core.tasks import Task, build_task, task_params
from mmops.data.audio import BadAudioError, load_audio
from mmops.data.images import BadImageError, load_image

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
MANIFEST_FORMATS = ("manifest.csv", "manifest.jsonl", "manifest.parquet")
# A manifest's split column: a data set with its own val split keeps it (val is then not carved from train).
SPLITS = ("train", "val", "test")
FILE_KINDS = ("image", "audio", "vectors")


@dataclass
class Problem:
    source: str
    line: int
    field: str
    reason: str


class BadFileError(ValueError):
    """A referenced file that cannot be used: missing, outside the data root, or undecodable."""


def resolve_inside(root: Path, rel: str) -> Path:
    try:
        path = (root / rel).resolve()
        inside = path.is_relative_to(root.resolve())
        found = inside and path.is_file()
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, a symlink loop
        raise BadFileError(f"cannot use path '{rel}': {exc}") from exc
    if not inside:
        raise BadFileError(f"path '{rel}' escapes the data root {root}")
    if not found:
        raise BadFileError(f"file '{rel}' not found under {root}")
    return path


def find_manifest(raw_dir: Path) -> Path:
    """``data/raw/manifest.csv``, ``.jsonl`` or ``.parquet``: exactly one of them."""
    found = [raw_dir / name for name in MANIFEST_FORMATS if (raw_dir / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{raw_dir}: no manifest ({', '.join(MANIFEST_FORMATS)}). "
                                "Run `mmops data import` first.")
    if len(found) > 1:
        raise ValueError(f"{raw_dir}: more than one manifest ({', '.join(p.name for p in found)}); keep one")
    return found[0]


def read_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """Manifest rows as string columns ("" for missing), with ``line``: the row's line in the file (CSV
    counts the header as line 1; JSONL lines and Parquet rows count from 1)."""
    first_line = 2 if path.suffix == ".csv" else 1
    if path.suffix == ".csv":
        chunks: Any = pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=chunk_rows)
    elif path.suffix == ".jsonl":
        try:
            chunks = pd.read_json(path, lines=True, dtype=False, chunksize=chunk_rows)
        except ValueError as exc:
            raise ValueError(f"{path}: not JSON lines: {exc}") from exc
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        chunks = (b.to_pandas() for b in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows))
    else:
        raise ValueError(f"{path}: unknown manifest format; use .csv, .jsonl or .parquet")
    start = first_line
    try:
        for chunk in chunks:
            chunk = chunk.astype(object).where(chunk.notna(), "").astype(str)
            chunk["line"] = np.arange(start, start + len(chunk))
            start += len(chunk)
            yield chunk.reset_index(drop=True)
    except (ValueError, pd.errors.ParserError) as exc:
        raise ValueError(f"{path}: cannot be read near line {start}: {exc}") from exc


def required_columns(params: Params) -> list[str]:
    group = [params.data.group_column] if params.data.group_column else []
    return [*dict.fromkeys(c for name in params.inputs for c in params.columns(name)), params.target.column, *group]


# The prepared rows' column holding ``data.group_column``'s value ("group" is easy-VQA's answer type).
GROUP = "split_group"


@dataclass
class _Values:
    """The distinct values of one input, in first-seen order; rows refer to them by index."""

    spec: InputConfig
    index: dict[Any, int] = field(default_factory=dict)
    values: list[Any] = field(default_factory=list)

    def add(self, key: Any, value: Any) -> int:
        if key not in self.index:
            self.index[key] = len(self.values)
            self.values.append(value)
        return self.index[key]


class _Chunk:
    """One chunk of manifest rows being checked; bad rows are flagged once, with the first reason."""

    def __init__(self, df: pd.DataFrame, source: str, problems: list[Problem]) -> None:
        self.df, self.source, self.problems = df, source, problems
        self.bad = np.zeros(len(df), dtype=bool)

    def flag(self, mask: np.ndarray, field_name: str, reason: str | list[str]) -> None:
        mask = mask & ~self.bad
        reasons = reason if isinstance(reason, list) else None
        for i in np.flatnonzero(mask):
            text = reasons[i] if reasons else reason
            self.problems.append(Problem(self.source, int(self.df["line"].iat[i]), field_name, str(text)))
        self.bad |= mask


def _input_index(chunk: _Chunk, name: str, params: Params, store: _Values, root: np.ndarray) -> np.ndarray:
    """Each row's index into ``store`` for one input (-1: missing, kept when ``missing: learn``)."""
    spec, df = store.spec, chunk.df
    cols = params.columns(name)
    cells = df[cols].apply(lambda c: c.str.strip())
    empty = (cells == "").all(axis=1).to_numpy()
    if spec.missing == "drop":
        chunk.flag(empty, name, f"empty {name}: a missing input is dropped (inputs.{name}.missing: drop; "
                   "set it to learn to keep such rows)")
    out = np.full(len(df), -1, dtype=np.int64)
    keys = cells.to_numpy(dtype=object)  # plain arrays: row lookups in pandas cost 50x more here
    if spec.kind == "number":
        parsed = cells.apply(lambda c: pd.to_numeric(c, errors="coerce")).to_numpy(dtype=np.float64)
        bad = ~np.isfinite(parsed) & (keys != "")
        for j, col in enumerate(cols):
            chunk.flag(bad[:, j], col, "not a number")
    for i in np.flatnonzero(~empty & ~chunk.bad):
        if spec.kind == "text":
            out[i] = store.add(keys[i, 0], keys[i, 0])
        elif spec.kind == "number":
            row = tuple(parsed[i].tolist())
            out[i] = store.add(row, list(row))
        elif spec.kind == "category":
            row = tuple(keys[i].tolist())
            out[i] = store.add(row, list(row))
        else:  # a file: one key per file, the same relative path in two batches is two files
            out[i] = store.add((root[i], keys[i, 0]), (root[i], keys[i, 0]))
    return out


def _decode_files(store: _Values, name: str, path: Path, params: Params, roots: dict[str, Path]) -> np.ndarray:
    """Decode every distinct file into a memory-mapped ``.npy``; returns which ones are broken."""
    size, rate = params.data.image_size, params.data.sample_rate
    shape = (size, size, 3) if store.spec.kind == "image" else (round(rate * params.data.audio_seconds),)
    dtype = np.uint8 if store.spec.kind == "image" else np.float32
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(len(store.values), *shape))
    broken: dict[int, str] = {}
    for i, (batch, rel) in enumerate(track(store.values, description=f"decoding {name}", transient=True)):
        try:
            file = resolve_inside(roots[batch], rel)
            if store.spec.kind == "image":
                out[i] = load_image(file, size)
            else:
                out[i] = load_audio(file, rate, params.data.audio_seconds)
        except (BadFileError, BadImageError, BadAudioError) as exc:
            broken[i] = str(exc)
        except Exception as exc:  # any other decoder failure is still one bad file, never a failed stage
            broken[i] = f"cannot decode this {store.spec.kind} file ({type(exc).__name__}: {exc})"
    out.flush()
    del out
    return np.array([broken.get(i, "") for i in range(len(store.values))], dtype=object)


def decode_vectors(store: _Values, name: str, path: Path, params: Params, roots: dict[str, Path]) -> np.ndarray:
    """Check every distinct feature-sequence file (a ``.npy`` of shape ``(time, dim)``) and store them
    ragged: ``<name>.npy`` holds all frames (float32), ``<name>.offsets.npy`` where each value starts.

    The width is ``inputs.<name>.params.dim`` when set, else the most common one, so one odd file is
    quarantined by name rather than deciding the model's input size. Returns the reason each is broken.
    """
    spec = store.spec.params
    max_length = int(spec.get("max_length") or VECTORS_MAX_LENGTH)
    shapes: list[tuple[int, ...] | None] = []
    broken: dict[int, str] = {}
    for i, (batch, rel) in enumerate(store.values):
        try:
            array = np.load(resolve_inside(roots[batch], rel), mmap_mode="r", allow_pickle=False)
            shapes.append(array.shape)
            if array.dtype.kind not in "iuf":
                broken[i] = f"feature sequence: dtype {array.dtype}, expected numbers"
        except (BadFileError, OSError, ValueError) as exc:
            shapes.append(None)
            broken[i] = f"cannot read this feature sequence as a .npy array ({type(exc).__name__}: {exc})"
    widths = [s[1] for s in shapes if s is not None and len(s) == 2]
    dim = int(spec.get("dim") or (max(set(widths), key=widths.count) if widths else 0))
    for i, shape in enumerate(shapes):
        if shape is None or i in broken:
            continue
        if len(shape) != 2:
            broken[i] = f"feature sequence of shape {shape}: expected (time, {dim}) frames"
        elif shape[1] != dim:
            broken[i] = f"feature sequence of width {shape[1]}: this input's frames have {dim} features " \
                        f"({'inputs.' + name + '.params.dim' if spec.get('dim') else 'the most common width'})"
        elif shape[0] == 0:
            broken[i] = "empty feature sequence (0 frames)"
        elif shape[0] > max_length:
            broken[i] = f"feature sequence of {shape[0]} frames, over max_length {max_length} " \
                        f"(inputs.{name}.params.max_length)"
    lengths = np.array([0 if i in broken or s is None else s[0] for i, s in enumerate(shapes)], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(int(offsets[-1]), max(dim, 1)))
    for i, (batch, rel) in enumerate(track(store.values, description=f"reading {name}", transient=True)):
        if i in broken:
            continue
        array = np.load(resolve_inside(roots[batch], rel), allow_pickle=False).astype(np.float32)
        if not np.isfinite(array).all():
            bad = np.argwhere(~np.isfinite(array))[0]
            broken[i] = f"feature sequence holds NaN or infinity (first at frame {bad[0]}, feature {bad[1]})"
            continue
        out[offsets[i] : offsets[i + 1]] = array
    out.flush()
    del out
    np.save(path.with_suffix(".offsets.npy"), offsets)
    return np.array([broken.get(i, "") for i in range(len(store.values))], dtype=object)


def _target(chunk: _Chunk, column: str, task: Task) -> pd.Series:
    """The target of each row as the task parses it (a label, a label set, a number...)."""
    values = chunk.df[column].str.strip()
    empty = (values == "").to_numpy()
    chunk.flag(empty, column, "empty target")
    parsed: list[Any] = [None] * len(values)
    reasons = [""] * len(values)
    bad = np.zeros(len(values), dtype=bool)
    for i, cell in enumerate(values):
        if empty[i]:
            continue
        try:
            parsed[i] = task.parse(cell)
        except ValueError as exc:
            bad[i], reasons[i] = True, str(exc) or "the task cannot read this target"
    chunk.flag(bad, column, reasons)
    return pd.Series(parsed, index=values.index, dtype=object)


def _carve(rows: pd.DataFrame, fraction: float, seed: int, stratify: bool, group: str | None,
           grouped: bool = False) -> np.ndarray:
    """A seeded held-out part of ``rows``: stratified by label when it is a class, grouped by image (and by
    ``data.group_column`` when ``grouped``) so that no image or user is seen on both sides.

    With few user groups (five speakers), the fold count drops to the number of groups: one held-out
    fold is then a whole group, a larger fraction than asked for, never a group cut in two."""
    n_splits = max(2, round(1 / fraction))
    groups = rows[group].to_numpy() if group else np.arange(len(rows))
    if grouped:
        n_groups = len(np.unique(groups))
        if n_groups < 2:
            raise ValueError(f"data.group_column: {n_groups} group(s) left to split; a held-out split needs rows "
                             "of at least two groups (or name them with data.val_groups/test_groups)")
        if n_groups < n_splits:
            log.warning("only %d groups: holding out one of them (about %.0f%% of the rows, %.0f%% was asked)",
                        n_groups, 100 / n_groups, 100 * fraction)
            n_splits = n_groups
    y = rows["label"].to_numpy() if stratify and rows["label"].nunique() > 1 else np.zeros(len(rows), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    held = np.zeros(len(rows), dtype=bool)
    try:
        _, idx = next(splitter.split(rows, y, groups))
    except ValueError:  # fewer groups than folds: a tiny data set; fall back to a seeded shuffle
        if grouped:
            raise
        idx = np.random.default_rng(seed).permutation(len(rows))[: max(1, round(len(rows) * fraction))]
    held[idx] = True
    return held


def prepare(raw_dir: Path, out_dir: Path, params: Params, appended_dir: Path | None = None) -> dict:
    """``appended_dir`` defaults to the project layout's ``data/appended`` beside ``raw_dir``."""
    manifest_path = find_manifest(raw_dir)
    appended_dir = appended_dir or raw_dir.parent / "appended"
    batches = sorted(m for m in appended_dir.glob(f"*/{MANIFEST}") if not m.parent.name.startswith(".")) \
        if appended_dir.is_dir() else []
    sources = [(manifest_path, manifest_path.name, "")]
    sources += [(m, f"appended/{m.parent.name}/{MANIFEST}", m.parent.name) for m in batches]
    roots = {"": raw_dir, **{m.parent.name: m.parent for m in batches}}
    target = params.target
    task = build_task(target.type, task_params(target.type, target))
    out_dir.mkdir(parents=True, exist_ok=True)

    problems: list[Problem] = []
    stores = {name: _Values(spec) for name, spec in params.inputs.items()}
    parts: list[pd.DataFrame] = []
    bad_rows: list[pd.DataFrame] = []  # the original cells of quarantined rows, for the user to fix
    total, has_split = 0, None
    for path, source, batch in sources:
        for df in read_chunks(path, params.data.chunk_rows):
            missing = [c for c in required_columns(params) if c not in df.columns]
            if missing:
                raise ValueError(f"{path}: missing columns {missing}; the manifest has "
                                 f"{[c for c in df.columns if c != 'line']}. Rename them or set inputs/target "
                                 "in params.yaml.")
            has_split = ("split" in df.columns) if has_split is None else has_split
            if has_split and "split" not in df.columns:
                raise ValueError(f"{path}: no split column, but the main manifest has one")
            total += len(df)
            chunk = _Chunk(df, source, problems)
            if has_split:
                chunk.flag(~df["split"].isin(SPLITS).to_numpy(), "split", "split must be 'train', 'val' or 'test'")
            labels = _target(chunk, target.column, task)
            root = np.full(len(df), batch, dtype=object)
            part = pd.DataFrame({"line": df["line"], "source": source})
            for name in params.inputs:
                part[f"{name}_idx"] = _input_index(chunk, name, params, stores[name], root)
            part["label"] = labels
            part["split"] = df["split"] if has_split else "train"
            if params.data.group_column:
                part[GROUP] = df[params.data.group_column].str.strip()
                chunk.flag((part[GROUP] == "").to_numpy(), params.data.group_column,
                           f"empty {params.data.group_column}: rows are kept together by it (data.group_column);"
                           " fill it in")
            if "answer_type" in df.columns:
                part["group"] = df["answer_type"]
            parts.append(part[~chunk.bad])
            if chunk.bad.any():
                bad_rows.append(df[chunk.bad].assign(source=source))

    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["line", "source", "label", "split"])
    if "group" in rows.columns:  # an appended batch without answer_type: its rows have no group, not NaN
        rows["group"] = rows["group"].fillna("")
    # Files are decoded once each, after every row was read; a broken file quarantines its rows.
    for name, store in stores.items():
        kind = store.spec.kind
        if kind in FILE_KINDS:
            decode = decode_vectors if kind == "vectors" else _decode_files
            broken = decode(store, name, out_dir / f"{name}.npy", params, roots)
            hit = rows[f"{name}_idx"].to_numpy()
            reasons = np.where(hit >= 0, broken[np.maximum(hit, 0)], "")
            drop = reasons != ""
            for (source, line), reason in zip(rows.loc[drop, ["source", "line"]].itertuples(index=False),
                                              reasons[drop], strict=True):
                problems.append(Problem(source, int(line), name, reason))
            if drop.any():
                bad_rows.append(_original_rows(sources, rows.loc[drop, ["source", "line"]], params.data.chunk_rows))
            rows = rows[~drop].reset_index(drop=True)
        else:
            (out_dir / f"{name}.json").write_text(json.dumps(store.values))

    # Split first, then learn the labels from the final train split. A label's only row never leaves
    # train (it is kept, and warned about); a label whose rows are all outside train (only in the
    # manifest's test part, or carved away together) would otherwise become a class no model can learn:
    # such rows are quarantined, naming the label.
    group = next((f"{n}_idx" for n, s in params.inputs.items() if s.kind == "image"), None)
    grouped = bool(params.data.group_column)
    if grouped:
        _check_named_groups(rows, params, has_split)
        group = _link_groups(rows, group)
    stratify = task.stratify
    labelled = bool(task.vocabulary(rows["label"]))  # classes or labels, not numbers
    named_val = rows[GROUP].isin(params.data.val_groups).to_numpy() if grouped else np.zeros(len(rows), bool)
    if grouped and params.data.test_groups:
        rows.loc[rows[GROUP].isin(params.data.test_groups), "split"] = "test"
    elif not has_split and len(rows):
        free = np.flatnonzero(~named_val)
        held = _hold_out(rows.iloc[free].reset_index(drop=True), params.data.test_fraction, params.seed, stratify,
                         group, labelled, grouped)
        rows.loc[free[held], "split"] = "test"
    rows.loc[named_val & (rows["split"] == "train").to_numpy(), "split"] = "val"
    train = (rows["split"] == "train").to_numpy()
    given_val = has_split and bool((rows["split"] == "val").any())  # the data set's own val split (MMSA's)
    if train.sum() > 1 and not (grouped and params.data.val_groups) and not given_val:
        val = _hold_out(rows[train].reset_index(drop=True), params.data.val_fraction, params.seed, stratify, group,
                        labelled, grouped)
        rows.loc[np.flatnonzero(train)[val], "split"] = "val"
    if grouped:
        rows = rows.drop(columns="_linked")

    train_mask = (rows["split"] == "train").to_numpy()
    label_names = task.vocabulary(rows.loc[train_mask, "label"])
    index = {label: i for i, label in enumerate(label_names)}
    counts = _label_counts(rows["label"])
    encoded: list[Any] = []
    unseen = np.zeros(len(rows), dtype=bool)
    targets = rows[["label", "split", "source", "line"]].itertuples(index=False)
    for i, (value, split, source, line) in enumerate(targets):
        try:
            encoded.append(task.encode(value, index))
        except KeyError:
            unseen[i] = True
            problems.append(Problem(source, int(line), target.column, _unseen_reason(value, index, counts, split)))
    if unseen.any():
        bad_rows.append(_original_rows(sources, rows.loc[unseen, ["source", "line"]], params.data.chunk_rows))
    rows = rows[~unseen].reset_index(drop=True)
    rows["label"] = pd.Series(encoded, dtype=None if encoded else object)
    # A label with a single row is kept (it is in train) but can be neither learned well nor evaluated:
    # often a typo of another label. Say so by name.
    rare = sorted(str(label) for label in label_names if counts.get(label, 0) == 1)
    if rare:
        log.warning("labels with a single row (a typo of another label?): %s", ", ".join(rare))

    rows.to_parquet(out_dir / "rows.parquet", index=False)
    (out_dir / "labels.json").write_text(json.dumps(label_names))
    quarantine = pd.DataFrame([p.__dict__ for p in problems], columns=["source", "line", "field", "reason"])
    if bad_rows:
        original = pd.concat(bad_rows, ignore_index=True).drop_duplicates(["source", "line"])
        quarantine = quarantine.merge(original, on=["source", "line"], how="left")
    quarantine = quarantine.sort_values(["source", "line"], kind="stable")
    # Every cell quoted: a bad row's own cells may hold a bare CR, which unquoted would split the row in two.
    quarantine.to_csv(out_dir / "quarantine.csv", index=False, quoting=csv.QUOTE_NONNUMERIC)
    summary = {
        "rows": total,
        "kept": len(rows),
        "quarantined": int(quarantine[["source", "line"]].drop_duplicates().shape[0]),
        "splits": {k: int(v) for k, v in rows["split"].value_counts().sort_index().items()},
        "labels": len(label_names),
        "rare_labels": rare,
        "task": target.type,
        "appended_batches": len(batches),
        "manifest": manifest_path.name,
    }
    if grouped:
        summary["groups"] = _group_summary(rows, params.data.group_column or "")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _hold_out(rows: pd.DataFrame, fraction: float, seed: int, stratify: bool, group: str | None,
              labelled: bool, grouped: bool = False) -> np.ndarray:
    """:func:`_carve` over the rows that may leave the train split: with labels, a row holding the only
    row of a label stays in train (and is warned about), so no label loses its only training example."""
    movable = np.ones(len(rows), dtype=bool)
    if labelled:
        counts = _label_counts(rows["label"])
        movable = np.array([all(counts[x] > 1 for x in (v if isinstance(v, tuple | list) else (v,)))
                            for v in rows["label"]], dtype=bool)
        if grouped and group:  # a group with such a row stays in train whole, never cut in two
            movable = pd.Series(movable).groupby(rows[group].to_numpy()).transform("all").to_numpy(dtype=bool)
    held = np.zeros(len(rows), dtype=bool)
    if movable.any():
        held[np.flatnonzero(movable)] = _carve(rows[movable].reset_index(drop=True), fraction, seed, stratify, group,
                                               grouped)
    return held


def _check_named_groups(rows: pd.DataFrame, params: Params, has_split: bool) -> None:
    """``val_groups``/``test_groups`` must name groups the data has; a manifest split column that puts one
    group on both sides is warned about by name (its test figure then measures seen users)."""
    data = params.data
    known = set(rows[GROUP])
    unknown = sorted(set(data.val_groups + data.test_groups) - known)
    if unknown:
        shown = ", ".join(sorted(known)[:20]) + (" ..." if len(known) > 20 else "")
        raise ValueError(f"data.val_groups/test_groups: {data.group_column} has no {unknown}; it has {shown}")
    if data.test_groups and has_split:
        raise ValueError("data.test_groups: the manifest has its own split column; drop one of the two")
    if has_split:
        splits = rows.groupby(GROUP)["split"].nunique()
        shared = sorted(str(g) for g in splits[splits > 1].index)
        if shared:
            log.warning("%s: %d group(s) in both the train and test rows of the manifest's split column, so "
                        "test measures users the model has seen: %s", data.group_column, len(shared),
                        ", ".join(shared[:20]) + (" ..." if len(shared) > 20 else ""))


def _link_groups(rows: pd.DataFrame, image: str | None) -> str:
    """Groups for carving: rows sharing a ``group_column`` value, or an image, stay on one side.

    The connected components of the (group, image) graph: a speaker's rows stay together, and so do
    an image's rows across speakers. Stored in a temporary ``_linked`` column, whose name is returned."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    codes = pd.factorize(rows[GROUP])[0]
    if image is None or image not in rows.columns:
        rows["_linked"] = codes
        return "_linked"
    has_image = rows[image].to_numpy() >= 0  # a missing image (-1) links nothing
    images = pd.factorize(rows[image])[0] + codes.max() + 1
    n = int(images.max()) + 1 if len(images) else 0
    graph = coo_matrix((np.ones(int(has_image.sum())), (codes[has_image], images[has_image])), shape=(n, n))
    rows["_linked"] = connected_components(graph, directed=False)[1][codes]
    return "_linked"


def _group_summary(rows: pd.DataFrame, column: str) -> dict[str, Any]:
    """Groups per split, and any group found in two splits (what ``mmops data validate`` prints)."""
    per_split = rows.groupby("split")[GROUP].nunique()
    splits = rows.groupby(GROUP)["split"].nunique()
    return {"column": column, "per_split": {k: int(v) for k, v in per_split.sort_index().items()},
            "in_two_splits": sorted(str(g) for g in splits[splits > 1].index)}


def _label_counts(labels: pd.Series) -> dict[Any, int]:
    """Rows per label over every kept row (a multi-label row counts for each of its labels)."""
    counts: dict[Any, int] = {}
    for value in labels:
        for label in value if isinstance(value, tuple | list) else (value,):
            counts[label] = counts.get(label, 0) + 1
    return counts


def _unseen_reason(value: Any, index: dict, counts: dict[Any, int], split: str) -> str:
    """Why a row's target is outside the train split's labels, naming the label(s)."""
    missing = [x for x in value if x not in index] if isinstance(value, tuple | list) else [value]
    parts = []
    for label in missing or [value]:
        n = counts.get(label, 0)
        parts.append(f"label '{label}' never seen in the train split ({'its only row' if n == 1 else f'{n} rows'}"
                     f" in val/test)")
    return (f"{'; '.join(parts)}: unknown target, no model can learn it (this row is in {split}); "
            "add train rows with it or fix the label")


def _original_rows(sources: list[tuple[Path, str, str]], wanted: pd.DataFrame, chunk_rows: int) -> pd.DataFrame:
    """Re-read the manifest cells of rows found bad late (a broken file, an unseen label)."""
    out = []
    for path, source, _ in sources:
        lines = set(wanted.loc[wanted["source"] == source, "line"])
        if lines:
            out += [df[df["line"].isin(lines)].assign(source=source) for df in read_chunks(path, chunk_rows)]
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=["source", "line"])
