"""Training engineering: data loading, batching, the loop, early stopping, checkpoints.

Model code is in :mod:`mmops.core.model`; this module decides how it sees data. Two choices make CPU
training fast without changing what is learned:

* frozen encoders are not run at all: their features come memory-mapped from the ``featurize`` stage;
* batches are grouped by image, so each distinct image goes through the CNN once per batch however
  many questions ask about it (easy-VQA has about ten per image), and its gradient sums over them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mmops.config import TASK_METRICS, CandidateConfig, Params, metric_sign
from mmops.core.interfaces import Encoder
from mmops.core.metrics import task_metrics
from mmops.core.model import ArtifactResolver, MultimodalModel, artifact_folder, build_input_encoder
from mmops.data.featurize import load_values

log = logging.getLogger("mmops.training.loop")


@dataclass
class Dataset:
    """Rows of the prepared data plus, per input, its distinct values or cached features."""

    rows: pd.DataFrame
    values: dict[str, Any]
    precomputed: frozenset[str]
    labels: list[str]
    task: dict[str, Any] = field(default_factory=lambda: {"type": "classification"})

    @classmethod
    def load(cls, prepared_dir: Path, features_dir: Path, params: Params, use_cache: bool = True) -> Dataset:
        rows = pd.read_parquet(prepared_dir / "rows.parquet")
        cached = json.loads((features_dir / "features.json").read_text()) if use_cache else {}
        values: dict[str, Any] = {}
        for name, spec in params.inputs.items():
            if name in cached:
                entry = cached[name]
                if entry["encoder"] != spec.encoder or any(
                    entry["config"].get(k) != v for k, v in spec.params.items()
                ):
                    raise RuntimeError(f"features of '{name}' are stale; run `dvc repro featurize`")
                values[name] = np.load(features_dir / f"{name}.npy", mmap_mode="r")
            else:
                values[name] = load_values(prepared_dir, name, spec.modality)
        labels = json.loads((prepared_dir / "labels.json").read_text())
        task: dict[str, Any] = {"type": params.target.type}
        if task["type"] == "multilabel":
            task["threshold"] = params.target.threshold
        if task["type"] == "regression":  # the model learns a standardised target; the spec un-scales it
            y = rows.loc[rows["split"] == "train", "label"].to_numpy(np.float64)
            task["mean"], task["std"] = (float(y.mean()), float(y.std() or 1.0)) if len(y) else (0.0, 1.0)
        return cls(rows, values, frozenset(cached), labels, task)

    def split(self, name: str) -> pd.DataFrame:
        return self.rows[self.rows["split"] == name].reset_index(drop=True)

    def targets(self, rows: pd.DataFrame) -> np.ndarray:
        """Labels as the metrics take them: class indices, a 0/1 matrix, or values in target units."""
        if self.task["type"] == "multilabel":
            out = np.zeros((len(rows), len(self.labels)), dtype=np.float32)
            for i, labels in enumerate(rows["label"]):
                out[i, list(labels)] = 1.0
            return out
        return rows["label"].to_numpy()


def target_tensor(task: dict[str, Any], targets: np.ndarray) -> torch.Tensor:
    """What the loss compares the model's output with."""
    if task["type"] == "regression":
        return torch.from_numpy(((targets - task["mean"]) / task["std"]).astype(np.float32)).unsqueeze(1)
    return torch.from_numpy(targets)


def loss_for(task: dict[str, Any]) -> nn.Module:
    return {"classification": nn.CrossEntropyLoss(), "multilabel": nn.BCEWithLogitsLoss(),
            "regression": nn.MSELoss()}[task["type"]]


def scores_from_logits(task: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
    """Probabilities (classification), per-label scores (multi-label) or values in target units."""
    if task["type"] == "multilabel":
        return torch.sigmoid(logits)
    if task["type"] == "regression":
        return logits * task["std"] + task["mean"]
    return torch.softmax(logits, dim=1)


@dataclass
class Batcher:
    """Yields ``(inputs, index, labels, row_positions)`` batches over one split."""

    data: Dataset
    rows: pd.DataFrame
    encoders: nn.ModuleDict
    batch_size: int
    group_by: str | None = None
    dedup: bool = True  # encode each distinct value once per batch; False encodes every row (baseline)
    _groups: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.group_by:
            keys = self.rows[f"{self.group_by}_idx"].to_numpy()
            order = np.argsort(keys, kind="stable")
            bounds = np.flatnonzero(np.diff(keys[order])) + 1
            self._groups = np.split(order, bounds)
        else:
            self._groups = [np.array([i]) for i in range(len(self.rows))]
        mean = len(self.rows) / max(1, len(self._groups))
        self.groups_per_batch = max(1, round(self.batch_size / mean))
        self.targets = self.data.targets(self.rows)

    def __len__(self) -> int:
        return -(-len(self._groups) // self.groups_per_batch)

    def __iter__(self):
        return self.batches(None)

    def batches(self, rng: np.random.Generator | None):
        order = rng.permutation(len(self._groups)) if rng is not None else np.arange(len(self._groups))
        for start in range(0, len(order), self.groups_per_batch):
            pos = np.concatenate([self._groups[g] for g in order[start : start + self.groups_per_batch]])
            inputs, index = {}, {}
            for name, encoder in self.encoders.items():
                idx = self.rows[f"{name}_idx"].to_numpy()[pos]
                present = idx >= 0  # -1: the row lacks this input; the model uses its "missing" embedding
                uniq, inv = (np.unique(idx[present], return_inverse=True) if self.dedup
                             else (idx[present], np.arange(int(present.sum()))))
                full = np.full(len(idx), -1, dtype=np.int64)
                full[present] = inv.reshape(-1)
                index[name] = torch.from_numpy(full)
                values = self.data.values[name]
                if not len(uniq):
                    inputs[name] = None
                elif name in self.data.precomputed:
                    inputs[name] = torch.from_numpy(np.asarray(values[uniq]))
                elif isinstance(values, list):
                    inputs[name] = encoder.preprocess([values[i] for i in uniq])
                else:
                    inputs[name] = encoder.preprocess(np.asarray(values[uniq]))
            labels = target_tensor(self.data.task, self.targets[pos])
            yield inputs, index, labels, pos


def set_determinism(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@torch.inference_mode()
def predict_split(model: MultimodalModel, batcher: Batcher, precomputed: frozenset[str]) -> np.ndarray:
    """Scores of every row of the batcher's split (see :func:`scores_from_logits`)."""
    model.eval()
    out = np.zeros((len(batcher.rows), model.n_outputs), dtype=np.float32)
    for inputs, index, _, pos in batcher:
        out[pos] = scores_from_logits(model.task, model(inputs, index, precomputed)).numpy()
    return out


def evaluate_split(model: MultimodalModel, data: Dataset, split: str, batch_size: int) -> tuple[dict, np.ndarray]:
    """The split's metrics, and its scores (for the predictions file)."""
    rows = data.split(split)
    batcher = Batcher(data, rows, model.encoders, batch_size, _group_key(model))
    scores = predict_split(model, batcher, data.precomputed)
    groups = rows["group"].to_numpy() if "group" in rows else None
    return task_metrics(model.task, batcher.targets, scores, data.labels, groups), scores


def predictions_table(data: Dataset, rows: pd.DataFrame, scores: np.ndarray, metrics: dict) -> pd.DataFrame:
    """One row per example: what it was, what the model said, how sure it was. The report's mistakes."""
    task, names = data.task, data.labels
    out = rows[["line", "source", *[c for c in rows.columns if c.endswith("_idx")]]].copy()
    if task["type"] == "regression":
        error = np.abs(scores[:, 0] - rows["label"].to_numpy())
        out["target"] = rows["label"].map(lambda v: f"{v:.6g}")
        out["prediction"] = [f"{v:.6g}" for v in scores[:, 0]]
        out["confidence"] = np.nan
        out["correct"] = error <= metrics.get("mae", 0.0)
        out["error"] = error
        return out
    if task["type"] == "multilabel":
        threshold = task["threshold"]
        predicted = scores >= threshold
        targets = data.targets(rows).astype(bool)
        out["target"] = ["|".join(names[j] for j in np.flatnonzero(t)) for t in targets]
        out["prediction"] = ["|".join(names[j] for j in np.flatnonzero(p)) for p in predicted]
        out["confidence"] = np.abs(scores - threshold).mean(1)
        out["correct"] = (predicted == targets).all(1)
    else:
        out["target"] = [names[i] for i in rows["label"]]
        out["prediction"] = [names[i] for i in scores.argmax(1)]
        out["confidence"] = scores.max(1)
        out["correct"] = rows["label"].to_numpy() == scores.argmax(1)
    out["error"] = np.nan
    return out


def select_key(params: Params) -> tuple[str, float]:
    """The validation metric training keeps the best epoch by, and its sign (+1: higher is better)."""
    return params.select_metric.removeprefix("val_"), metric_sign(params.select_metric)


def _group_key(model: MultimodalModel) -> str | None:
    trainable = [n for n, e in model.encoders.items() if not e.frozen and e.modality == "image"]
    return trainable[0] if trainable else None


def build_spec(params: Params, candidate: CandidateConfig, labels: list[str], task: dict | None = None) -> dict:
    train = params.train_for(candidate)
    return {
        "candidate": candidate.name,
        "inputs": {n: {"modality": i.modality, "encoder": i.encoder, "params": dict(i.params), "kind": i.kind,
                       "columns": params.columns(n), "missing": i.missing,
                       **({"init_from": i.init_from} if i.init_from else {}), **({"freeze": True} if i.freeze else {})}
                   for n, i in params.inputs.items()},
        "fusion": {"name": candidate.fusion, "params": dict(candidate.params)},
        "head": {"hidden": train.head_hidden, "dropout": train.dropout},
        "labels": labels,
        "image_size": params.data.image_size,
        "sample_rate": params.data.sample_rate,
        "audio_seconds": params.data.audio_seconds,
        "target": params.target.column,
        "task": task or {"type": "classification"},
        "seed": params.seed,
    }


def fit_encoders(spec: dict, data: Dataset, train_rows: pd.DataFrame,
                 resolve: ArtifactResolver = artifact_folder) -> dict[str, Encoder]:
    """Each input's encoder, fitted on the distinct values of the train split only (never val/test).

    Fitting comes before the model is built because what is learned (a vocabulary) can size the
    encoder's output and so the fusion. Cached (frozen) inputs hold features, not values: not fitted.
    """
    encoders = {}
    for name, item in spec["inputs"].items():
        encoder = build_input_encoder(item, resolve)
        if name not in data.precomputed and type(encoder).fit is not Encoder.fit:
            idx = np.unique(train_rows[f"{name}_idx"].to_numpy())
            values, idx = data.values[name], idx[idx >= 0]
            encoder.fit([values[i] for i in idx] if isinstance(values, list) else np.asarray(values[idx]))
        encoders[name] = encoder
    return encoders


def train_candidate(
    params: Params, candidate: CandidateConfig, data: Dataset, out_dir: Path,
    on_epoch: Any = None, resolve: ArtifactResolver = artifact_folder,
) -> dict:
    """Train one candidate with early stopping on the selection metric; save the best epoch's artifact."""
    cfg = params.train_for(candidate)
    set_determinism(params.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_rows, val_rows = data.split("train"), data.split("val")
    if train_rows.empty or val_rows.empty:
        raise ValueError("the prepared data has no train or no val rows; check data.limit and val_fraction")
    spec = build_spec(params, candidate, data.labels, data.task)
    model = MultimodalModel(spec, fit_encoders(spec, data, train_rows, resolve))
    group = _group_key(model) if cfg.feature_cache else None
    train_b = Batcher(data, train_rows, model.encoders, cfg.batch_size, group, cfg.feature_cache)
    val_b = Batcher(data, val_rows, model.encoders, cfg.batch_size, group, cfg.feature_cache)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * len(train_b), pct_start=0.25
    )
    loss_fn = loss_for(data.task)
    rng = np.random.default_rng(params.seed)
    metric, sign = select_key(params)
    best_score, best_state, best_epoch, history = -np.inf, None, 0, []
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total, count, t0 = 0.0, 0, time.perf_counter()
        for inputs, index, labels, _ in train_b.batches(rng):
            loss = loss_fn(model(inputs, index, data.precomputed), labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"candidate '{candidate.name}': loss diverged at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, count = total + loss.item() * len(labels), count + len(labels)
        scores = predict_split(model, val_b, data.precomputed)
        val = task_metrics(data.task, val_b.targets, scores, data.labels)
        record = {"epoch": epoch, "train_loss": total / count,
                  **{f"val_{k}": val[k] for k in TASK_METRICS[data.task["type"]]},
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        if on_epoch:
            on_epoch(candidate.name, record)
        log.info("%s epoch %d: loss %.4f val_%s %.4f", candidate.name, epoch, record["train_loss"], metric, val[metric])
        if sign * val[metric] > best_score:
            best_score, best_epoch = sign * val[metric], epoch
            best_state = copy.deepcopy(model.trainable_state())
        elif epoch - best_epoch >= cfg.patience:
            break
    train_seconds = time.perf_counter() - started
    model.load_state_dict(best_state, strict=False)
    model.eval()
    model.save(out_dir)
    metrics, scores = {}, {}
    for split in ("val", "test"):
        metrics[split], scores[split] = evaluate_split(model, data, split, cfg.batch_size)
    predictions_table(data, data.split("test"), scores["test"], metrics["test"]).to_parquet(
        out_dir / "predictions_test.parquet", index=False)
    result = {
        "candidate": candidate.name,
        "fusion": candidate.fusion,
        "task": data.task["type"],
        "labels": data.labels,
        "select_metric": params.select_metric,
        "model_dir": str(out_dir),
        "seed": params.seed,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_seconds": train_seconds,
        "history": history,
        "metrics": metrics,
        "config": {"candidate": candidate.model_dump(), "train": cfg.model_dump()},
        "pid": os.getpid(),
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result
