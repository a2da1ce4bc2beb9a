"""Importers for standard dataset layouts (VQA v2, COCO captions, ImageNet-style folders) into a manifest.

Each writes ``out_dir/manifest.csv`` plus the image files it names (hard links, else copies) and returns the
manifest path. A row whose image file is missing is kept, so that ``prepare`` quarantines it by manifest line
instead of the import hiding it; the ``origin`` column says which source file and entry each row came from.
Structural problems (bad JSON, missing keys, dangling references) raise :class:`ImportError_` at once,
because a half-understood source would otherwise turn into silently wrong training data.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from mmops.data.mmsa import import_mmsa

log = logging.getLogger("mmops.import")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
# Subset-name prefix -> manifest split. The public val sets become our test split: mmops carves its own
# validation split from train, and the official test sets have no public answers.
SUBSET_SPLITS = {"train": "train", "val": "test"}
VQA_FIX = "use the unmodified VQA v2 files from visualqa.org (questions and annotations of the same subset)"
COCO_FIX = "use the unmodified COCO captions_<subset>.json from cocodataset.org"


class ImportError_(ValueError):
    """The source does not have the layout its importer expects; the message names file, entry and fix."""


def _split_of(subset: str) -> str | None:
    return next((split for prefix, split in SUBSET_SPLITS.items() if subset.startswith(prefix)), None)


def _check_dirs(source: Path, out_dir: Path) -> None:
    """Refuse overlapping folders: re-linking an image onto itself would first delete the only copy."""
    if not source.is_dir():
        raise ImportError_(f"{source}: not a folder; pass the dataset's folder with --from")
    src, out = source.resolve(), out_dir.resolve()
    images = out / "images"
    if out == src or src in out.parents or src == images or images in src.parents:
        raise ImportError_(f"{out_dir} overlaps the source {source}; import into a folder outside the source")
    out_dir.mkdir(parents=True, exist_ok=True)


def _load(path: Path, key: str, fix: str) -> list[Any]:
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImportError_(f"{path}: not valid JSON ({exc}); {fix}") from exc
    if not isinstance(data, dict) or key not in data:
        raise ImportError_(f"{path}: no top-level {key!r} key; {fix}")
    if not isinstance(data[key], list):
        raise ImportError_(f"{path}: {key!r} is not a list; {fix}")
    return data[key]


def _field(entry: Any, key: str, path: Path, where: str, fix: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise ImportError_(f"{path}: {where} has no {key!r} key; {fix}")
    return entry[key]


def _place(src: Path, dst: Path) -> bool:
    """Link ``src`` at ``dst``; False when ``src`` is missing (the row stays, ``prepare`` quarantines it).

    An existing ``dst`` is unlinked first, never written through: it may be a hard link into the source or
    into the DVC cache, and copying onto it would corrupt that file. A stale ``dst`` whose source has since
    gone is removed too, so the missing image is noticed rather than served from an old import.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    if not src.is_file():
        return False
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)
    return True


def _write(name: str, source: Path, out_dir: Path, rows: list[dict], columns: list[str], missing: int) -> Path:
    """Write via a temporary file and rename, for the same reason as :func:`_place`.

    Only ``columns`` are written, so a row may carry keys (``split`` None) that this layout does not use.
    """
    if not rows:
        raise ImportError_(f"{source}: no rows to import as {name}; check the folder layout (see docs)")
    manifest = out_dir / "manifest.csv"
    tmp = out_dir / ".manifest.csv.tmp"
    pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False)
    os.replace(tmp, manifest)
    splits = Counter(row.get("split") or "all" for row in rows)
    log.info("%s: wrote %d rows %s to %s", name, len(rows), dict(splits), manifest)
    if missing:
        log.warning("%s: %d rows refer to a missing image file; prepare will quarantine them", name, missing)
    return manifest


def import_vqa_v2(source: Path, out_dir: Path, limit: int = 0) -> Path:
    """One row per question of the VQA v2 ``train*`` (-> train) and ``val*`` (-> test) subsets.

    The answer is ``multiple_choice_answer``, the annotators' consensus, which is what VQA classifiers are
    trained on. Subsets without an annotations file (the official test sets) are skipped with a warning.
    """
    _check_dirs(source, out_dir)
    prefix, suffix = "v2_OpenEnded_mscoco_", "_questions.json"
    question_files = sorted(source.glob(f"{prefix}*{suffix}"))
    if not question_files:
        raise ImportError_(
            f"{source}: no {prefix}<subset>{suffix} file; put the unzipped VQA v2 question and annotation "
            "files at the top of this folder and the images in <subset>/"
        )
    rows: list[dict] = []
    placed: dict[str, bool] = {}
    kept: Counter[str] = Counter()
    missing = 0
    for qfile in question_files:
        subset = qfile.name[len(prefix) : -len(suffix)]
        split = _split_of(subset)
        afile = source / f"v2_mscoco_{subset}_annotations.json"
        if not afile.is_file():
            log.warning("vqa-v2: skipping %s: no %s next to it, so no answers", qfile.name, afile.name)
            continue
        if split is None:
            log.warning("vqa-v2: skipping %s: subset %r is neither train* nor val*", qfile.name, subset)
            continue
        questions = _load(qfile, "questions", VQA_FIX)
        by_qid = {}
        for j, ann in enumerate(_load(afile, "annotations", VQA_FIX)):
            by_qid[_field(ann, "question_id", afile, f"annotations[{j}]", VQA_FIX)] = (j, ann)
        asked = set()
        for i, question in enumerate(questions):
            if limit and kept[split] >= limit:
                break
            where = f"questions[{i}]"
            qid = _field(question, "question_id", qfile, where, VQA_FIX)
            text = _field(question, "question", qfile, where, VQA_FIX)
            image_id = _field(question, "image_id", qfile, where, VQA_FIX)
            if not isinstance(image_id, int):
                raise ImportError_(f"{qfile}: {where} has image_id {image_id!r}, not an integer; {VQA_FIX}")
            if qid not in by_qid:
                raise ImportError_(f"{afile}: no annotation for question_id {qid!r} ({qfile.name}#{where}); {VQA_FIX}")
            j, ann = by_qid[qid]
            answer = _field(ann, "multiple_choice_answer", afile, f"annotations[{j}]", VQA_FIX)
            answer_type = _field(ann, "answer_type", afile, f"annotations[{j}]", VQA_FIX)
            name = f"COCO_{subset}_{image_id:012d}.jpg"
            rel = f"images/{subset}/{name}"
            if rel not in placed:
                placed[rel] = _place(source / subset / name, out_dir / rel)
            missing += not placed[rel]
            asked.add(qid)
            kept[split] += 1
            rows.append(
                {
                    "question": text,
                    "image": rel,
                    "answer": answer,
                    "answer_type": answer_type,
                    "split": split,
                    "question_id": qid,
                    "origin": f"{qfile.name}#{where}",
                }
            )
        if not limit and len(asked) < len(by_qid):
            log.warning("vqa-v2: %d annotations in %s have no question", len(by_qid) - len(asked), afile.name)
    columns = ["question", "image", "answer", "answer_type", "split", "question_id", "origin"]
    return _write("vqa-v2", source, out_dir, rows, columns, missing)


class _Caption(NamedTuple):
    image: tuple[str, Any]  # (subset, image_id): ids are only promised unique within one file
    image_id: Any
    caption: str
    origin: str
    src: Path
    rel: str


def import_coco_captions(source: Path, out_dir: Path, limit: int = 0) -> Path:
    """COCO captions as image-caption pairs for contrastive training (CLIP): one row per caption.

    ``image_id`` is the match key (the contrastive target): the five captions of an image are its
    positives and every other image of the batch a negative, so no negative pairs are written. Ids are
    only promised unique within one file, which is enough: a file is one split. ``limit`` keeps the first
    N captions of each split in file order, so re-imports with a larger limit extend the same rows.
    """
    _check_dirs(source, out_dir)
    files = sorted((source / "annotations").glob("captions_*.json"))
    if not files:
        raise ImportError_(
            f"{source}: no annotations/captions_<subset>.json; put the unzipped COCO annotations folder and "
            "the image folders (train2017/, val2017/) in this folder"
        )
    by_split: dict[str, list[_Caption]] = defaultdict(list)
    for afile in files:
        subset = afile.stem[len("captions_") :]
        split = _split_of(subset)
        if split is None:
            log.warning("coco-captions: skipping %s: subset %r is neither train* nor val*", afile.name, subset)
            continue
        images = {}
        for i, image in enumerate(_load(afile, "images", COCO_FIX)):
            file_name = str(_field(image, "file_name", afile, f"images[{i}]", COCO_FIX))
            if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
                raise ImportError_(f"{afile}: images[{i}] file_name {file_name!r} leaves the image folder")
            images[_field(image, "id", afile, f"images[{i}]", COCO_FIX)] = file_name
        for i, ann in enumerate(_load(afile, "annotations", COCO_FIX)):
            image_id = _field(ann, "image_id", afile, f"annotations[{i}]", COCO_FIX)
            caption = _field(ann, "caption", afile, f"annotations[{i}]", COCO_FIX)
            if image_id not in images:
                raise ImportError_(
                    f"{afile}: annotations[{i}] refers to image_id {image_id!r}, which has no entry in 'images'; "
                    f"{COCO_FIX}"
                )
            by_split[split].append(
                _Caption(
                    (subset, image_id),
                    image_id,
                    str(caption).strip(),
                    f"{afile.name}#annotations[{i}]",
                    source / subset / images[image_id],
                    f"images/{subset}/{images[image_id]}",
                )
            )
    rows: list[dict] = []
    placed: dict[str, bool] = {}
    missing = 0
    for split in ("train", "test"):
        for c in by_split.get(split, [])[: limit or None]:
            if c.rel not in placed:
                placed[c.rel] = _place(c.src, out_dir / c.rel)
            missing += not placed[c.rel]
            rows.append({"image": c.rel, "caption": c.caption, "split": split, "image_id": c.image_id,
                         "origin": c.origin})
    columns = ["image", "caption", "split", "image_id", "origin"]
    return _write("coco-captions", source, out_dir, rows, columns, missing)


def import_imagefolder(source: Path, out_dir: Path, limit: int = 0) -> Path:
    """ImageNet-style ``<class>/<file>`` (optionally under ``train/`` and ``val/`` or ``test/``): label = class.

    A sidecar ``<stem>.txt`` next to an image fills the ``text`` column, so a folder dataset can feed a
    multimodal model. Rows are ordered round-robin over the classes, so that ``limit`` keeps every class
    instead of only the alphabetically first ones.
    """
    _check_dirs(source, out_dir)
    dirs = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [d for d in dirs if d.name in ("train", "val", "test")]
    if split_dirs and len(split_dirs) != len(dirs):
        raise ImportError_(
            f"{source}: mixes split folders ({', '.join(d.name for d in split_dirs)}) with class folders; "
            "put every class folder under train/ and val/ (or test/), or use no split folders at all"
        )
    if {"val", "test"} <= {d.name for d in split_dirs}:
        log.warning("imagefolder: both val/ and test/ in %s: both become the test split", source)
    roots: dict[str | None, list[Path]] = defaultdict(list)
    for d in split_dirs or [source]:
        roots[None if not split_dirs else "train" if d.name == "train" else "test"].append(d)
    rows: list[dict] = []
    missing = ignored = 0
    for split, split_roots in sorted(roots.items(), key=lambda item: item[0] != "train"):  # train rows first
        per_class: dict[str, list[Path]] = defaultdict(list)
        for root in split_roots:
            for entry in sorted(root.iterdir()):
                if not entry.name.startswith(".") and not entry.is_dir():
                    ignored += 1  # a loose file has no class
            for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                for path in sorted(class_dir.rglob("*")):
                    if path.suffix.lower() in IMAGE_EXTENSIONS and not path.is_dir():
                        per_class[class_dir.name].append(path)
                    elif path.suffix.lower() != ".txt" and not path.is_dir() and not path.name.startswith("."):
                        ignored += 1
        ordered = [p for group in itertools.zip_longest(*per_class.values()) for p in group if p is not None]
        labels = {p: label for label, paths in per_class.items() for p in paths}
        for path in ordered[: limit or None]:
            origin = path.relative_to(source).as_posix()
            sidecar = path.with_suffix(".txt")
            try:
                text = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""
            except UnicodeDecodeError as exc:
                raise ImportError_(f"{sidecar}: not UTF-8 text ({exc}); save the sidecar as UTF-8") from exc
            rel = f"images/{origin}"
            missing += not _place(path, out_dir / rel)
            rows.append({"image": rel, "text": text, "label": labels[path], "split": split, "origin": origin})
    if ignored:
        log.warning("imagefolder: ignored %d files in %s that are not images inside a class folder", ignored, source)
    columns = ["image", "text", "label", *(["split"] if split_dirs else []), "origin"]
    return _write("imagefolder", source, out_dir, rows, columns, missing)


def import_caption_folder(source: Path, out_dir: Path, limit: int = 0) -> Path:
    """Images with captions in sidecars (``mmops data import imagefolder --as captions``): ``<stem>.txt``
    beside each image holds its captions, one a line. One row per (image, caption), as the COCO captions
    layout gives, so a caption task trains on every caption and scores against all of an image's.

    Images may sit in any subfolders; top-level ``train/``, ``val/`` and ``test/`` folders set the split
    (else ``prepare`` carves val and test, grouped by image). An image without a sidecar, or with no
    caption in it, gives one row with an empty caption, which ``prepare`` quarantines by line. ``limit``
    keeps the first N images of each split. ``origin`` is ``<sidecar>:<line>``.
    """
    _check_dirs(source, out_dir)
    split_dirs = [d for d in ("train", "val", "test") if (source / d).is_dir()]
    roots = [(source / d, d) for d in split_dirs] or [(source, None)]
    rows: list[dict] = []
    missing = 0
    for root, split in roots:
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(source).parts))
        for path in images[: limit or None]:
            rel_path = path.relative_to(source)
            rel = f"images/{rel_path.as_posix()}"
            missing += not _place(path, out_dir / rel)
            sidecar = path.with_suffix(".txt")
            try:
                lines = sidecar.read_text(encoding="utf-8").splitlines() if sidecar.is_file() else []
            except UnicodeDecodeError as exc:
                raise ImportError_(f"{sidecar}: not UTF-8 text ({exc}); save the captions as UTF-8") from exc
            captions = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
            side = sidecar.relative_to(source).as_posix()
            for n, caption in captions or [(0, "")]:
                rows.append({"image": rel, "caption": caption, "split": split,
                             "image_id": rel_path.with_suffix("").as_posix(), "origin": f"{side}:{n}"})
    empty = sum(1 for r in rows if not r["caption"])
    if empty:
        log.warning("caption folder: %d images have no caption (no <stem>.txt, or an empty one); prepare "
                    "will quarantine them", empty)
    columns = ["image", "caption", *(["split"] if split_dirs else []), "image_id", "origin"]
    return _write("caption folder", source, out_dir, rows, columns, missing)


IMPORTERS: dict[str, Callable[[Path, Path, int], Path]] = {
    "mmsa": import_mmsa,  # MMSA's MOSI/MOSEI/SIMS feature pickles (mmops/data/mmsa.py)
    "vqa-v2": import_vqa_v2,
    "coco-captions": import_coco_captions,
    "imagefolder": import_imagefolder,
}


def import_manifest(source: Path, out_dir: Path, file_columns: list[str], limit: int = 0) -> Path:
    """A user's manifest (CSV, JSONL or Parquet) and the files its ``file_columns`` name, relative to
    the manifest's folder. The manifest keeps its format; files are linked, not copied.

    A path escaping the manifest's folder is not followed (and so not linked): ``prepare`` then
    quarantines its row with the reason. ``limit`` keeps the first N rows (of each split, if any).
    """
    from mmops.data.prepare import MANIFEST_FORMATS, read_chunks

    if not source.is_file():
        raise ImportError_(f"{source}: no such manifest; set data.path in params.yaml to your manifest file "
                           f"({', '.join(f.removeprefix('manifest') for f in MANIFEST_FORMATS)})")
    suffix = source.suffix.lower()
    if f"manifest{suffix}" not in MANIFEST_FORMATS:
        raise ImportError_(f"{source}: unknown manifest format '{suffix}'; use .csv, .jsonl or .parquet")
    root = source.parent.resolve()
    _check_dirs(source.parent, out_dir)
    for old in MANIFEST_FORMATS:  # one manifest only: prepare refuses two
        (out_dir / old).unlink(missing_ok=True)
    target = out_dir / f"manifest{suffix}"
    if limit:
        df = pd.concat(list(read_chunks(source, 100_000)), ignore_index=True).drop(columns="line")
        df = df.groupby("split", sort=False).head(limit) if "split" in df.columns else df.head(limit)
        {".csv": lambda: df.to_csv(target, index=False),
         ".jsonl": lambda: df.to_json(target, orient="records", lines=True),
         ".parquet": lambda: df.to_parquet(target, index=False)}[suffix]()
        chunks = [df]
    else:
        _place(source, target)
        chunks = (c for c in read_chunks(source, 50_000))
    linked, missing = 0, 0
    for chunk in chunks:
        for column in file_columns:
            if column not in chunk.columns:
                raise ImportError_(f"{source}: no column {column!r}; the manifest has {list(chunk.columns)}")
            for rel in chunk[column].astype(str).str.strip().unique():
                if not rel:
                    continue
                src = (root / rel).resolve()
                if not src.is_relative_to(root) or not src.is_file():
                    missing += 1
                    continue
                dst = out_dir / src.relative_to(root)
                if not dst.exists():
                    _place(src, dst)
                    linked += 1
    log.info("manifest: %s with %d files linked; %d referenced files missing or outside %s",
             target.name, linked, missing, root)
    return target
