"""MMSA's feature pickles (CMU-MOSI, CMU-MOSEI, CH-SIMS: ``aligned_50.pkl``, ``unaligned_50.pkl``) to a
manifest of feature-sequence files, and a synthetic data set written in the same layout.

The layout, as MMSA's ``data_loader.py`` reads it: a dict with the splits ``train``, ``valid`` and
``test``; each split a dict of arrays over its N utterances:

* ``text`` (N, T, d_t) word features (GloVe or BERT), ``audio`` (N, T_a, d_a) acoustic frames
  (COVAREP, librosa), ``vision`` (N, T_v, d_v) facial frames (Facet, OpenFace); padded with zeros to
  the split's longest, float32;
* ``regression_labels`` (N,) the sentiment, a mean of annotators' scores in [-3, 3] (SIMS: [-1, 1]);
* ``raw_text`` (N,) the transcript, ``id`` (N,) ``"<video>$_$<clip>"``;
* optional: ``audio_lengths`` / ``vision_lengths`` (unaligned files: each row's real frame count),
  ``text_bert`` (N, 3, T) BERT token ids, attention mask and segment ids, ``annotations``,
  ``classification_labels``, ``regression_labels_T/A/V`` (SIMS' unimodal labels): read where needed,
  otherwise ignored.

Each row's real length is its ``<modality>_lengths`` entry when the file has one; for ``text`` the sum
of ``text_bert``'s attention mask when present; otherwise the frames left after dropping all-zero
frames at both ends (the zero padding; at least one frame is kept). ``-inf`` acoustic values become
0, as MMSA's loader does; NaN is left for ``prepare`` to quarantine by row and field.

**A pickle runs code when loaded.** This importer never calls ``pickle.load``: a restricted
unpickler accepts only what MMSA's files hold (dicts, lists, tuples, strings, numbers and NumPy
arrays, dtypes and scalars) and refuses any other reference by name, before anything is built; the
result must then have exactly the structure above. Still: import only files from a source you trust.
"""

from __future__ import annotations

import importlib
import io
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("mmops.import")

SPLITS = {"train": "train", "valid": "val", "test": "test"}
MODALITIES = ("text", "audio", "vision")
FIX = "use the unmodified .pkl from MMSA's published feature files (see the sentiment template's README)"
# The only globals an MMSA pickle references: NumPy's array, dtype and scalar reconstructors (module
# numpy.core in files written by NumPy 1.x, numpy._core by 2.x), and _codecs.encode, with which Python 3
# writes bytes (an array's buffer) into a protocol 2 pickle: it turns a string into bytes, nothing more.
_ALLOWED = {
    (module, name)
    for package in ("numpy.core", "numpy._core")
    for module, name in ((f"{package}.multiarray", "_reconstruct"), (f"{package}.multiarray", "scalar"),
                         (f"{package}.numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class UnsafePickleError(ValueError):
    """The pickle references something other than plain data and NumPy arrays: refused unread."""


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(
                f"refused: the pickle references {module}.{name}, which is not plain data or a NumPy array; "
                "an MMSA feature file holds only dicts, lists, strings, numbers and arrays, so this file "
                "is not one (a pickle can run code when loaded: it was not)")
        if module.startswith("numpy.core."):  # NumPy 1.x's module names, under NumPy 2's real modules
            try:
                return getattr(importlib.import_module(module.replace("numpy.core.", "numpy._core.", 1)), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def load_plain_pickle(path: Path) -> Any:
    """Unpickle ``path`` allowing only dicts, lists, tuples, strings, numbers and NumPy arrays."""
    with path.open("rb") as f:
        try:
            return _PlainDataUnpickler(f, encoding="latin1").load()  # latin1: Python 2 pickles' byte strings
        except UnsafePickleError:
            raise
        except Exception as exc:  # truncated or not a pickle at all
            raise ValueError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc}); {FIX}") from exc


def _array(split: dict, key: str, where: str) -> np.ndarray:
    value = split[key]
    array = np.asarray(value)
    if array.dtype == object and array.ndim > 1:
        raise ValueError(f"{where}[{key!r}]: not a numeric array; {FIX}")
    return array


def _check(data: Any, path: Path) -> None:
    """The structure MMSA's loader expects, or an error naming the first thing that is not."""
    if not isinstance(data, dict) or not set(SPLITS) <= set(data):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected MMSA's layout, a dict with the splits {list(SPLITS)}; found {found}; {FIX}")
    for split in SPLITS:
        part = data[split]
        where = f"{path.name}[{split!r}]"
        if not isinstance(part, dict):
            raise ValueError(f"{where}: expected a dict of arrays, found {type(part).__name__}; {FIX}")
        if "regression_labels" not in part:
            raise ValueError(f"{where}: no 'regression_labels'; {FIX}")
        present = [m for m in MODALITIES if m in part]
        if not present:
            raise ValueError(f"{where}: none of the feature arrays {list(MODALITIES)}; {FIX}")
        n = len(np.asarray(part["regression_labels"]).reshape(-1))
        for key in (*present, "raw_text", "id", "audio_lengths", "vision_lengths", "text_bert"):
            if key not in part:
                continue
            array = _array(part, key, where)
            if key in MODALITIES and (array.ndim != 3 or array.dtype.kind not in "iuf"):
                raise ValueError(f"{where}[{key!r}]: expected a numeric (N, time, features) array, got "
                                 f"{array.dtype} {array.shape}; {FIX}")
            if len(array) != n:
                raise ValueError(f"{where}[{key!r}]: {len(array)} rows, but 'regression_labels' has {n}; {FIX}")


def _lengths(part: dict, modality: str, array: np.ndarray) -> np.ndarray:
    """Each row's real frames as (start, stop): see the module docstring for the rule."""
    n, t = array.shape[:2]
    if f"{modality}_lengths" in part:
        stop = np.clip(np.asarray(part[f"{modality}_lengths"]).astype(np.int64).reshape(-1)[:n], 1, t)
        return np.stack([np.zeros(n, np.int64), stop], 1)
    if modality == "text" and "text_bert" in part and np.asarray(part["text_bert"]).shape[-1] == t:
        stop = np.clip(np.asarray(part["text_bert"])[:n, 1].sum(1).astype(np.int64), 1, t)
        return np.stack([np.zeros(n, np.int64), stop], 1)
    real = np.abs(array).sum(2) != 0
    any_real = real.any(1)
    start = np.where(any_real, real.argmax(1), 0)
    stop = np.where(any_real, t - real[:, ::-1].argmax(1), 1)
    return np.stack([start, stop], 1)


def import_mmsa(source: Path, out_dir: Path, limit: int = 0) -> Path:
    """Write ``out_dir/manifest.csv`` (id, split, raw_text, text, audio, vision, label, origin) and one
    ``.npy`` per row and modality under ``out_dir/features/<modality>/``. ``limit`` keeps the first N
    rows of each split. The splits are MMSA's own: ``valid`` becomes mmops' ``val``."""
    if not source.is_file():
        raise ValueError(f"{source}: no such file; pass MMSA's aligned_50.pkl / unaligned_50.pkl with --from")
    data = load_plain_pickle(source)
    _check(data, source)
    out_dir.mkdir(parents=True, exist_ok=True)
    features = out_dir / "features"
    shutil.rmtree(features, ignore_errors=True)  # a previous import's files must not linger
    rows: list[dict[str, Any]] = []
    for split, ours in SPLITS.items():
        part = data[split]
        labels = np.asarray(part["regression_labels"], dtype=np.float64).reshape(-1)
        n = len(labels) if not limit else min(limit, len(labels))
        ids = [str(x) for x in np.asarray(part.get("id", np.arange(len(labels))))[:n]]
        texts = [str(x) for x in np.asarray(part["raw_text"])[:n]] if "raw_text" in part else [""] * n
        columns: dict[str, list[str]] = {}
        for modality in MODALITIES:
            if modality not in part:
                continue
            array = np.asarray(part[modality])[:n].astype(np.float32)
            if modality == "audio":
                array[np.isneginf(array)] = 0.0  # as MMSA's loader: -inf log-energies of silence
            spans = _lengths(part, modality, array)
            folder = features / modality
            folder.mkdir(parents=True, exist_ok=True)
            columns[modality] = []
            for i, (start, stop) in enumerate(spans):
                rel = f"features/{modality}/{ours}-{i:06d}.npy"
                np.save(out_dir / rel, np.ascontiguousarray(array[i, start:stop]))
                columns[modality].append(rel)
        for i in range(n):
            rows.append({"id": ids[i], "split": ours, "raw_text": texts[i],
                         **{m: paths[i] for m, paths in columns.items()},
                         "label": repr(float(labels[i])), "origin": f"{source.name}:{split}[{i}]"})
    manifest = out_dir / "manifest.csv"
    for other in ("manifest.jsonl", "manifest.parquet"):
        (out_dir / other).unlink(missing_ok=True)
    pd.DataFrame(rows).to_csv(manifest, index=False)
    log.info("mmsa: %d rows (%s) from %s", len(rows), ", ".join(f"{s} {sum(r['split'] == s for r in rows)}"
                                                               for s in SPLITS.values()), source)
    return manifest


# ---------------------------------------------------------------- the synthetic demonstration set

SYNTHETIC_DIMS = {"text": 32, "audio": 5, "vision": 20}  # MOSI's audio and vision widths in MMSA's files


def synthetic_mmsa(sizes: tuple[int, int, int] = (600, 150, 150), seed: int = 0, length: int = 50,
                   dims: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """A SYNTHETIC data set in MMSA's aligned layout, for demonstrations and tests only: no real person,
    video or sentiment is in it.

    Each utterance has a sentiment ``y`` in [-3, 3] (multiples of 0.2, about 8% exactly 0, as MOSI's
    annotator means often are) and its signal is split across the modalities:

    * the text frames carry the intensity ``|y|`` and only a weak, noisy hint of the polarity;
    * the polarity ``sign(y)`` is ``a * v``: a random ±1 cue ``a`` in the acoustic frames and the cue
      ``v = sign(y) * a`` in the visual ones. Either alone says nothing about the polarity; together
      (do they agree?) they give it.

    So no single modality can be right about both the polarity and the intensity, and fusion can. The
    cues sit in a random stretch of each utterance's frames (half to all of them), under unit noise;
    utterances have 8 to ``length`` aligned frames, zero-padded to ``length`` like MMSA's files.
    """
    rng = np.random.default_rng(seed)
    dims = dims or SYNTHETIC_DIMS
    # A fixed direction per cue (text has two: intensity and the polarity hint), of norm about 2.
    directions = {m: rng.standard_normal((2, d)) / np.sqrt(d) * 2 for m, d in dims.items()}
    out: dict[str, dict[str, Any]] = {}
    for split, n in zip(SPLITS, sizes, strict=True):
        y = np.round(rng.uniform(-3, 3, n) / 0.2) * 0.2
        y[rng.random(n) < 0.08] = 0.0
        y = np.round(y, 1)
        polarity = np.sign(y)
        a = rng.choice([-1.0, 1.0], n)
        hint = np.where(rng.random(n) < 0.65, polarity, -polarity)  # right 65% of the time
        # (cue along the first direction, cue along the second) per modality
        cues = {"text": (np.abs(y) / 1.5 - 1, 0.5 * hint), "audio": (a, 0 * a), "vision": (polarity * a, 0 * a)}
        lengths = rng.integers(8, length + 1, n)
        part: dict[str, Any] = {}
        for m, d in dims.items():
            frames = np.zeros((n, length, d), np.float32)
            for i in range(n):
                t = int(lengths[i])
                seq = rng.standard_normal((t, d))
                span = int(rng.integers(max(1, t // 2), t + 1))
                start = int(rng.integers(0, t - span + 1))
                seq[start : start + span] += cues[m][0][i] * directions[m][0] + cues[m][1][i] * directions[m][1]
                frames[i, :t] = seq
            part[m] = frames
        bert = np.zeros((n, 3, length), np.int64)
        for i, t in enumerate(lengths):
            bert[i, 0, :t] = rng.integers(1000, 30000, t)
            bert[i, 1, :t] = 1
        part.update({
            "text_bert": bert,
            "raw_text": np.array([f"synthetic utterance {split} {i}" for i in range(n)], dtype=object),
            "id": np.array([f"synth{i // 10:04d}$_${i % 10}" for i in range(n)], dtype=object),
            "regression_labels": y.astype(np.float32),
            "classification_labels": (np.sign(y) + 1).astype(np.float32),
            "annotations": np.array([{1: "Positive", 0: "Neutral", -1: "Negative"}[int(s)] for s in polarity],
                                    dtype=object),
        })
        out[split] = part
    return out


def write_synthetic(path: Path, sizes: tuple[int, int, int] = (600, 150, 150), seed: int = 0) -> Path:
    """:func:`synthetic_mmsa` pickled to ``path`` (a file MMSA's own loader reads too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    pickle.dump(synthetic_mmsa(sizes, seed), buffer, protocol=4)
    path.write_bytes(buffer.getvalue())
    return path


if __name__ == "__main__":  # python -m mmops.data.mmsa OUT.pkl [train valid test]
    import sys

    args = sys.argv[1:]
    if not args or len(args) not in (1, 4):
        sys.exit("usage: python -m mmops.data.mmsa OUT.pkl [TRAIN VALID TEST]  (a SYNTHETIC set in MMSA's layout)")
    counts = tuple(int(x) for x in args[1:]) if len(args) == 4 else (600, 150, 150)
    print(f"wrote {write_synthetic(Path(args[0]), counts)} (synthetic: for demonstrations and tests only)")
