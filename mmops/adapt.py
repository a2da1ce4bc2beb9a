"""Adapting a trained model to a new speaker, site or device from its unlabelled inputs (``mmops adapt``).

A network's batch-norm layers standardise every channel with the mean and variance they saw in
training. A new domain (a voice, a microphone, a scanner) shifts those statistics, and each layer then
hands the next inputs scaled unlike anything it learned from. AdaBN (Li et al., 2016, "Revisiting Batch
Normalization For Practical Domain Adaptation") keeps every weight and re-estimates only these
statistics on the new domain's inputs, which need no labels: seconds on a CPU, and the adapted model is
an artifact like any other (served, packaged, compared).

Measured on FSDD-5 (``bench/audio_adapt.py``): models trained on four voices, adapted on half of the
fifth voice's clips and scored on the other half, make fewer errors on that voice (README, issue 16).
Layers inside frozen encoders keep their statistics: their features are cached by content, and a
pretrained checkpoint's statistics come from far more data than a new domain's few clips.

The inputs go through the service's own :class:`~mmops.serving.predictor.RowDecoder` and
:class:`~mmops.serving.predictor.Predictor`, so adaptation sees exactly what serving will.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mmops.core.model import ADAPTATION_FILE, WEIGHTS_FILE, Ensemble, MultimodalModel, ensemble_record
from mmops.data.prepare import FILE_KINDS, BadFileError, read_chunks, resolve_inside
from mmops.serving.predictor import InputError, Predictor

if TYPE_CHECKING:
    from mmops.config import Params
    from mmops.project import Project

PSEUDO_FILE = "pseudo-labels.json"  # marks an appended batch as pseudo-labels of one adapted name


class AdaptError(ValueError):
    """Adaptation cannot run: nothing to adapt, no usable rows, a manifest without the model's inputs."""


def members(model: MultimodalModel | Ensemble) -> list[MultimodalModel]:
    return list(model.members) if isinstance(model, Ensemble) else [model]


def adaptable_norms(model: MultimodalModel | Ensemble) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers of the model's trained parts (every member of an ensemble): not those of
    encoders frozen by their own config or by ``freeze``, whose features may be cached."""
    found: list[nn.modules.batchnorm._BatchNorm] = []
    for member in members(model):
        parts: list[nn.Module] = [e for e in member.encoders.values() if not e.frozen]
        parts += [member.fusion, member.head]
        found += [m for part in parts for m in part.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return found


@contextlib.contextmanager
def reestimating(model: MultimodalModel | Ensemble) -> Iterator[int]:
    """Inside: the adaptable batch-norm layers forget their statistics and average those of every batch
    that passes (``momentum=None``: a plain average over the batches, not a moving one); every other
    module stays in eval mode (no dropout, no augmentation). Yields how many layers adapt."""
    norms = adaptable_norms(model)
    momenta = [n.momentum for n in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    try:
        yield len(norms)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.eval()


def read_records(manifest: Path, inputs: dict[str, str], target: str | None) -> tuple[list[dict], list[dict]]:
    """The manifest's rows as service requests (file columns as paths inside the manifest's folder), and
    the problems of the rows that cannot be used (line, field, reason). ``target`` is kept aside when the
    column is there: labels never reach the model, they only measure it before and after."""
    root = manifest.parent
    rows: list[dict] = []
    problems: list[dict] = []
    for chunk in read_chunks(manifest, 4096):
        missing = [c for c in inputs if c not in chunk.columns]
        if missing:
            raise AdaptError(
                f"{manifest}: no column {', '.join(repr(c) for c in missing)}; the model reads {sorted(inputs)}"
            )
        for item in chunk.to_dict("records"):
            record: dict[str, Any] = {}
            try:
                for column, kind in inputs.items():
                    value = item[column]
                    if kind in FILE_KINDS and value and not value.lstrip().startswith("["):
                        try:
                            value = resolve_inside(root, value)
                        except BadFileError as exc:
                            raise InputError(column, str(exc)) from None
                    record[column] = value
            except InputError as exc:
                problems.append({"line": int(item["line"]), "field": exc.field, "reason": exc.reason})
                continue
            label = item.get(target) if target else None
            rows.append({"line": int(item["line"]), "record": record, "label": label or None, "cells": item})
    return rows, problems


def load_rows(predictor: Predictor, manifest: Path, target: str | None) -> tuple[list, list[dict], list[dict]]:
    """The manifest's usable rows decoded by the service's checks, as (decoded row, label or None); their
    manifest cells; and the refused rows' problems, by line. Raises when no row is usable."""
    rows, problems = read_records(manifest, predictor.inputs, target)
    decoded, cells = [], []
    for row in rows:
        try:
            decoded.append((predictor.validate(row["record"]), row["label"]))
        except InputError as exc:
            problems.append({"line": row["line"], "field": exc.field, "reason": exc.reason})
            continue
        cells.append(row["cells"])
    problems.sort(key=lambda p: p["line"])
    if not decoded:
        raise AdaptError(f"{manifest}: no usable rows ({len(problems)} refused; the first: {_first(problems)})")
    return decoded, cells, problems


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _metrics(predictor: Predictor, decoded: list[tuple[dict, Any]], batch_size: int) -> dict[str, Any] | None:
    """The task's metrics on the rows whose target cell the model can read (a label it knows, for a
    classifier), parsed and encoded as the prepare stage does; None when no row has one."""
    model, task = predictor.model, predictor.model.task
    index = {label: i for i, label in enumerate(model.labels)}
    known, unknown = [], 0
    for row, cell in decoded:
        if cell is None:
            continue
        try:
            known.append((row, task.encode(task.parse(str(cell).strip()), index)))
        except (KeyError, ValueError):
            unknown += 1
    if not known:
        return None
    scores = np.concatenate(
        [
            task.scores(predictor.logits([row for row, _ in part]).float().cpu()).numpy()
            for part in _batches(known, batch_size)
        ]
    )
    metrics = task.evaluate(task.targets([stored for _, stored in known]), scores)
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, float | int) and not isinstance(v, bool)}
    return {**out, "rows": len(known), "unknown_targets": unknown}


def adapt_artifact(
    model_dir: Path,
    manifest: Path,
    out_dir: Path,
    target: str | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write to ``out_dir`` the artifact in ``model_dir`` with its batch-norm statistics re-estimated on
    the manifest's rows (every member of an ensemble alike), and return what was done: rows used, rows
    refused and why, layers adapted, and the task's metrics before and after when ``target`` labels the
    rows. The source artifact is never modified."""
    manifest = manifest.resolve()
    predictor = Predictor(model_dir, device="cpu")
    model = predictor.model
    if not adaptable_norms(model):
        raise AdaptError(
            f"{model_dir.name}: nothing to adapt; its trained parts have no batch-norm layers "
            "(adaptation re-estimates batch-norm statistics: encoders such as mel_audio or cnn_image have them)"
        )
    decoded, _, problems = load_rows(predictor, manifest, target)
    before = _metrics(predictor, decoded, batch_size) if target else None
    with reestimating(model) as layers, torch.inference_mode():
        done = 0
        for part in _batches([row for row, _ in decoded], batch_size):
            predictor.logits(part)
            done += len(part)
            if progress:
                progress(done, len(decoded))
    after = _metrics(predictor, decoded, batch_size) if target else None
    _write(model, model_dir, out_dir)
    summary = {
        "method": "batchnorm",
        "source": str(model_dir),
        "manifest": str(manifest),
        "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
        "rows": len(decoded),
        "refused": problems,
        "layers": layers,
        "members": len(members(model)),
        **({"before": before, "after": after} if before is not None else {}),
    }
    (out_dir / ADAPTATION_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def pseudo_labels(
    model_dir: Path, manifest: Path, threshold: float, target: str, batch_size: int = 64
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The manifest's rows the model in ``model_dir`` is at least ``threshold`` sure of, with its answer in
    the ``target`` column: self-training (Lee, 2013, "Pseudo-Label"), for ``mmops data append`` to add to
    training. Returns those rows (the manifest's own cells, the guess, ``pseudo_confidence``) and a summary.
    A classifier's top probability is its confidence; other tasks have none and are refused. Where the
    manifest already has ``target`` labels, the share of kept guesses that are right is reported (and the
    guesses replace them: the labels are never used)."""
    if not 0.0 < threshold <= 1.0:
        raise AdaptError(f"the pseudo-label threshold is a probability in (0, 1], got {threshold}")
    predictor = Predictor(model_dir, device="cpu")
    model, task = predictor.model, predictor.model.task
    if model.task_name != "classification":
        raise AdaptError(
            f"pseudo-labels need a classifier (confidence: its top probability); this is {model.task_name}"
        )
    decoded, cells, _ = load_rows(predictor, manifest.resolve(), target)
    probs = np.concatenate(
        [
            task.scores(predictor.logits([row for row, _ in part]).float().cpu()).numpy()
            for part in _batches(decoded, batch_size)
        ]
    )
    confidence, guess = probs.max(axis=1), probs.argmax(axis=1)
    keep = np.flatnonzero(confidence >= threshold)
    kept = pd.DataFrame([cells[i] for i in keep], columns=list(cells[0])).drop(columns="line")
    kept[target] = [model.labels[guess[i]] for i in keep]
    kept["pseudo_confidence"] = confidence[keep].round(4)
    checked = [i for i in keep if decoded[i][1] is not None]
    summary = {"threshold": threshold, "kept": len(keep), "of": len(decoded)}
    if checked:
        summary["correct"] = sum(str(decoded[i][1]).strip() == model.labels[guess[i]] for i in checked) / len(checked)
    return kept, summary


def append_pseudo_labels(
    kept: pd.DataFrame, manifest: Path, name: str, appended_dir: Path, params: Params, stats: dict[str, Any]
) -> dict[str, Any]:
    """``kept`` (from :func:`pseudo_labels`) as a ``mmops data append`` training batch marked with
    :data:`PSEUDO_FILE`. A later round for the same ``name`` (after retraining, the model answers
    differently) replaces the earlier batch once the new one is in place, so a clip is never trained on
    twice with two guesses; the same rows and guesses again change nothing (``unchanged``)."""
    from mmops.data.append import append_manifest

    rows = kept.assign(split="train")
    if params.data.group_column:  # the new domain is one group (a speaker, a site): never split across
        rows[params.data.group_column] = name
    earlier = [
        m.parent for m in sorted(appended_dir.glob(f"*/{PSEUDO_FILE}")) if json.loads(m.read_text())["name"] == name
    ]
    # Written beside the manifest, so its relative file paths resolve, and removed once appended.
    staged = manifest.resolve().parent / f".mmops-pseudo-labels-{name}.csv"
    rows.to_csv(staged, index=False)
    try:
        content = staged.read_bytes()
        for batch in earlier:
            if (batch / "manifest.csv").read_bytes() == content:
                return {"path": batch, "rows": len(rows), "unchanged": True, "replaced": []}
        out = append_manifest(staged, appended_dir, params)
    finally:
        staged.unlink(missing_ok=True)
    (out["path"] / PSEUDO_FILE).write_text(json.dumps({"name": name, **stats}, indent=2))
    for batch in earlier:
        shutil.rmtree(batch)
    return {**out, "unchanged": False, "replaced": [b.name for b in earlier]}


def _first(problems: list[dict]) -> str:
    return f"line {problems[0]['line']}, {problems[0]['field']}: {problems[0]['reason']}" if problems else "none"


def _write(model: MultimodalModel | Ensemble, source: Path, out_dir: Path) -> None:
    """A copy of the source artifact (spec, assets, the ensemble's record) with each member's weights
    file replaced by its adapted state; written beside ``out_dir`` and moved in place last, so an
    interrupted adaptation leaves no half-written model."""
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns(ADAPTATION_FILE, "predictions_*"))
    record = ensemble_record(source)
    paths = [m["path"] for m in record["members"]] if record else ["."]
    from safetensors.torch import save_file

    for member, path in zip(members(model), paths, strict=True):
        save_file(member.trainable_state(), str(staging / path / WEIGHTS_FILE))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def register_adapted(project: Project, adapted: Path, name: str, summary: dict[str, Any], run_id: str | None) -> dict:
    """Record the adapted artifact as a version of its own registry model, ``<model_name>-<name>``, and
    build its bento: one model line per speaker, site or device, next to (never in place of) the model
    it came from. The version's run is the source's training run (its weights came from there); the
    adaptation's record travels in the BentoML model's metadata."""
    from mmops.pipeline import _quiet_known_notices
    from mmops.registry.store import Registry
    from mmops.serving.package import build_bento, save_to_store

    if run_id is None:
        raise AdaptError(f"{summary['source']}: not a recorded run (no run_id); train it with `mmops run` first")
    model_name = f"{project.params.registry.model_name}-{name}"
    registry = Registry(project.db_url)
    _quiet_known_notices(project)
    metrics = summary.get("after") or {}
    version = registry.add_model_version(model_name, run_id, metrics={k: v for k, v in metrics.items() if k != "rows"})
    model_tag = save_to_store(
        adapted,
        model_name,
        labels={"registry_version": version.ref, "adapted_from": Path(summary["source"]).name},
        metadata={"run_id": run_id, "adaptation": {k: v for k, v in summary.items() if k != "refused"}},
    )
    own = project.root / "bentofile.yaml"
    bento_tag = build_bento(model_tag, own if own.is_file() else None)
    registry.set_tags(model_name, version.version, model_tag=model_tag, bento_tag=bento_tag)
    return {"model_version": version.ref, "model_tag": model_tag, "bento_tag": bento_tag}
