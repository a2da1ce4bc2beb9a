"""Training engineering: data loading, batching, the loop, early stopping, checkpoints.

Model code is in :mod:`mmops.core.model`; this module decides how it sees data. Two choices make CPU
training fast without changing what is learned:

* frozen encoders are not run at all: their features come memory-mapped from the ``featurize`` stage;
* batches are grouped by image, so each distinct image goes through the CNN once per batch however
  many questions ask about it (easy-VQA has about ten per image), and its gradient sums over them.
"""

from __future__ import annotations

import contextlib
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

from mmops.config import CandidateConfig, Params
from mmops.core.devices import Precision, describe, resolve_device, resolve_precision, to_device
from mmops.core.interfaces import Encoder
from mmops.core.model import ArtifactResolver, Ensemble, MultimodalModel, artifact_folder, build_input_encoder
from mmops.core.tasks import Task, build_task, task_params
from mmops.data.cache import CachedFeatures
from mmops.data.featurize import load_values
from mmops.training import distributed

log = logging.getLogger("mmops.training.loop")


@dataclass
class Dataset:
    """Rows of the prepared data plus, per input, its distinct values or cached features."""

    rows: pd.DataFrame
    values: dict[str, Any]
    precomputed: frozenset[str]
    labels: list[str]
    task: Task

    @classmethod
    def load(cls, prepared_dir: Path, features_dir: Path, params: Params, use_cache: bool = True) -> Dataset:
        rows = pd.read_parquet(prepared_dir / "rows.parquet")
        cached = json.loads((features_dir / "features.json").read_text()) if use_cache else {}
        values: dict[str, Any] = {}
        for name, spec in params.inputs.items():
            if name in cached:
                entry = cached[name]
                if entry["encoder"] != spec.encoder or any(entry["config"].get(k) != v for k, v in spec.params.items()):
                    raise RuntimeError(f"features of '{name}' are stale; run `dvc repro featurize`")
                values[name] = CachedFeatures.load(features_dir, name, entry)  # vectors, and tokens if kept
            else:
                values[name] = load_values(prepared_dir, name, spec.modality)
        labels = json.loads((prepared_dir / "labels.json").read_text())
        task = build_task(params.target.type, task_params(params.target.type, params.target), labels)
        task.fit(task.targets(rows.loc[rows["split"] == "train", "label"].tolist()))
        return cls(rows, values, frozenset(cached), labels, task)

    def split(self, name: str) -> pd.DataFrame:
        return self.rows[self.rows["split"] == name].reset_index(drop=True)

    def targets(self, rows: pd.DataFrame) -> np.ndarray:
        """The rows' targets as the task's loss and metrics take them."""
        return self.task.targets(rows["label"].tolist())


@dataclass
class Batcher:
    """Yields ``(inputs, index, targets, row_positions)`` batches over one split (targets as the task takes them)."""

    data: Dataset
    rows: pd.DataFrame
    encoders: nn.ModuleDict
    batch_size: int
    group_by: str | None = None
    dedup: bool = True  # encode each distinct value once per batch; False encodes every row (baseline)
    rank: int = 0  # data-parallel training: this process's share of the groups (mmops.training.distributed)
    world: int = 1
    seen: list[np.ndarray] = field(default_factory=list)  # row positions of the last training epoch
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
        # Data-parallel ranks split each batch: the global batch (and so the step count) stays batch_size.
        self.groups_per_batch = max(1, round(self.batch_size / self.world / mean))
        self.targets = self.data.targets(self.rows)

    def __len__(self) -> int:
        groups = len(self._groups) // self.world if self.world > 1 else len(self._groups)
        return -(-groups // self.groups_per_batch)

    def __iter__(self):
        return self.batches(None)

    def batches(self, rng: np.random.Generator | None):
        order = rng.permutation(len(self._groups)) if rng is not None else np.arange(len(self._groups))
        order = shard(order, self.rank, self.world, drop_last=rng is not None)
        if rng is not None:
            self.seen = []
        for start in range(0, len(order), self.groups_per_batch):
            pos = np.concatenate([self._groups[g] for g in order[start : start + self.groups_per_batch]])
            inputs, index = {}, {}
            for name, encoder in self.encoders.items():
                idx = self.rows[f"{name}_idx"].to_numpy()[pos]
                present = idx >= 0  # -1: the row lacks this input; the model uses its "missing" embedding
                uniq, inv = (
                    np.unique(idx[present], return_inverse=True)
                    if self.dedup
                    else (idx[present], np.arange(int(present.sum())))
                )
                full = np.full(len(idx), -1, dtype=np.int64)
                full[present] = inv.reshape(-1)
                index[name] = torch.from_numpy(full)
                values = self.data.values[name]
                if not len(uniq):
                    inputs[name] = None
                elif name in self.data.precomputed:  # read as vectors or tokens, as the model's fusion takes them
                    inputs[name] = values.rows(uniq)
                elif isinstance(values, list):
                    inputs[name] = encoder.preprocess([values[i] for i in uniq])
                else:
                    inputs[name] = encoder.preprocess(np.asarray(values[uniq]))
            if rng is not None:
                self.seen.append(pos)
            yield inputs, index, self.targets[pos], pos


def shard(order: np.ndarray, rank: int, world: int, drop_last: bool) -> np.ndarray:
    """Rank ``rank``'s share of a group order that every rank drew alike (same seed): every ``world``-th
    group, so the ranks' rows are disjoint and each image's questions stay in one batch.

    Training (``drop_last``) leaves out the last ``len % world`` groups of the epoch's order (other ones
    each epoch, as the order is reshuffled): every rank takes the same number of steps, which the
    gradient all-reduce needs, and no row is seen twice in an epoch. Evaluation keeps every group."""
    if world == 1:
        return order
    end = len(order) - len(order) % world if drop_last else len(order)
    return order[rank:end:world]


def on_device(inputs: dict, index: dict, device: torch.device, sequences: bool) -> tuple[dict, dict]:
    """A batch on the model's device. On the CPU nothing is touched: cached features stay lazy views
    and the loop runs exactly as before the device code existed."""
    if device.type == "cpu":
        return inputs, index
    moved = {
        name: None
        if value is None
        else to_device(value.features_for(sequences) if hasattr(value, "features_for") else value, device)
        for name, value in inputs.items()
    }
    return moved, {name: to_device(i, device) for name, i in index.items()}


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of weights on the CPU: the best epoch kept aside, and checkpoints that load anywhere."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def set_determinism(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@torch.inference_mode()
def predict_split(
    model: MultimodalModel | Ensemble,
    batcher: Batcher,
    precomputed: frozenset[str],
    precision: Precision | None = None,
) -> np.ndarray:
    """Scores of every row of the batcher's split (the task's :meth:`~mmops.core.tasks.Task.scores`), on
    the model's device; a data-parallel rank scores its share and the shares are gathered on every rank."""
    model.eval()
    device = model_device(model)
    parts = []
    for inputs, index, _, pos in batcher:
        inputs, index = on_device(inputs, index, device, model.needs_sequences)
        with precision.autocast() if precision else contextlib.nullcontext():
            logits = model(inputs, index, precomputed)
        parts.append((pos, model.task.scores(logits.float()).float().cpu().numpy()))
    if batcher.world > 1:
        gathered: list = [None] * batcher.world
        torch.distributed.all_gather_object(gathered, parts)
        parts = [part for rank_parts in gathered for part in rank_parts]
    out: np.ndarray | None = None
    for pos, scores in parts:
        if out is None:
            out = np.zeros((len(batcher.rows), *scores.shape[1:]), dtype=np.float32)
        out[pos] = scores
    return out if out is not None else np.zeros((0, model.task.output_dim), dtype=np.float32)


def evaluate_split(
    model: MultimodalModel | Ensemble, data: Dataset, split: str, batch_size: int
) -> tuple[dict, np.ndarray]:
    """The split's metrics, and its scores (for the predictions file)."""
    rows = data.split(split)
    batcher = Batcher(data, rows, model.encoders, batch_size, _group_key(model))
    scores = predict_split(model, batcher, data.precomputed)
    metrics = model.task.evaluate(batcher.targets, scores, evaluation_groups(model.task, rows))
    if "split_group" in rows:  # data.group_column: how each speaker / patient / user fares
        metrics["by_group"] = per_group(model.task, batcher.targets, scores, rows["split_group"].to_numpy())
    return metrics, scores


def evaluate_and_record(model: MultimodalModel | Ensemble, data: Dataset, out_dir: Path, batch_size: int) -> dict:
    """Val and test metrics of a trained model, and its test predictions file in ``out_dir`` (the report's
    mistakes): for one seed's model, and for the ensemble of several (``train.ensemble``)."""
    metrics, scores = {}, {}
    for split in ("val", "test"):
        metrics[split], scores[split] = evaluate_split(model, data, split, batch_size)
    predictions_table(data, data.split("test"), scores["test"], metrics["test"]).to_parquet(
        out_dir / "predictions_test.parquet", index=False
    )
    return metrics


def evaluation_groups(task: Task, rows: pd.DataFrame) -> np.ndarray | None:
    """What the task's ``evaluate`` gets as ``groups``: its reference groups (a caption task: the rows of
    one image), else the data set's ``group`` column (easy-VQA's answer type), if any."""
    groups = task.reference_groups(rows)
    if groups is None and "group" in rows:
        groups = rows["group"].to_numpy()
    return groups


def per_group(task: Task, targets: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """The task's first metric on each group's rows: a mean can hide one user the model fails."""
    first = next(iter(task.metrics))
    return {str(g): float(task.evaluate(targets[groups == g], scores[groups == g])[first]) for g in np.unique(groups)}


def predictions_table(data: Dataset, rows: pd.DataFrame, scores: np.ndarray, metrics: dict) -> pd.DataFrame:
    """One row per example: what it was, what the model said, how sure it was. The report's mistakes."""
    out = rows[["line", "source", *[c for c in rows.columns if c.endswith("_idx")]]].copy()
    for column, values in data.task.describe(data.targets(rows), scores, metrics).items():
        out[column] = values
    return out


def select_key(params: Params) -> tuple[str, float]:
    """The validation metric training keeps the best epoch by, and its sign (+1: higher is better)."""
    return params.select_metric.removeprefix("val_"), params.metric_sign(params.select_metric)


def _group_key(model: MultimodalModel | Ensemble) -> str | None:
    trainable = [n for n, e in model.encoders.items() if not e.frozen and e.modality == "image"]
    return trainable[0] if trainable else None


def build_spec(params: Params, candidate: CandidateConfig, labels: list[str], task: Task | None = None) -> dict:
    train = params.train_for(candidate)
    used = candidate.input_names(list(params.inputs))
    fused = len(used) > 1 and not params.task_combines_inputs  # such a task's network fuses, not a plugin
    return {
        "candidate": candidate.name,
        "inputs": {
            n: {
                "modality": i.modality,
                "encoder": i.encoder,
                "params": dict(i.params),
                "kind": i.kind,
                "columns": params.columns(n),
                "missing": i.missing,
                **({"init_from": i.init_from} if i.init_from else {}),
                **({"freeze": True} if i.freeze else {}),
            }
            for n, i in params.inputs.items()
            if n in used
        },
        "fusion": {"name": candidate.fusion if fused else None, "params": dict(candidate.params) if fused else {}},
        "head": {"hidden": train.head_hidden, "dropout": train.dropout},
        "labels": labels,
        "image_size": params.data.image_size,
        "sample_rate": params.data.sample_rate,
        "audio_seconds": params.data.audio_seconds,
        "target": params.target.column,
        "task": {
            "name": params.target.type,
            "params": task.config() if task else task_params(params.target.type, params.target),
        },
        "seed": params.seed,
    }


def fit_encoders(
    spec: dict, data: Dataset, train_rows: pd.DataFrame, resolve: ArtifactResolver = artifact_folder
) -> dict[str, Encoder]:
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


def one_cycle(optimizer: torch.optim.Optimizer, lr: float, steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """The one-cycle schedule over ``steps`` optimizer steps (a quarter warm-up).

    PyTorch divides by zero when the warm-up ends on step 0 (4 steps in all, e.g. 2 epochs of 2 batches):
    a tiny data set gets a schedule of at least 8 steps, of which it uses the first ones.
    """
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 8), pct_start=0.25)


def train_candidate(
    params: Params,
    candidate: CandidateConfig,
    data: Dataset,
    out_dir: Path,
    on_epoch: Any = None,
    resolve: ArtifactResolver = artifact_folder,
) -> dict:
    """Train one candidate with early stopping on the selection metric; save the best epoch's artifact."""
    cfg = params.train_for(candidate)
    set_determinism(params.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    rank, world = distributed.rank_world()
    train_rows, val_rows = data.split("train"), data.split("val")
    if train_rows.empty or val_rows.empty:
        raise ValueError("the prepared data has no train or no val rows; check data.limit and val_fraction")
    spec = build_spec(params, candidate, data.labels, data.task)
    model = MultimodalModel(spec, fit_encoders(spec, data, train_rows, resolve)).to(device)
    group = _group_key(model) if cfg.feature_cache else None
    train_b = Batcher(data, train_rows, model.encoders, cfg.batch_size, group, cfg.feature_cache, rank, world)
    val_b = Batcher(data, val_rows, model.encoders, cfg.batch_size, group, cfg.feature_cache, rank, world)
    net = distributed.wrap(model, device) if world > 1 else model
    scaler = precision.scaler()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = one_cycle(optimizer, cfg.lr, cfg.epochs * len(train_b))
    # train.ema: an exponential moving average of the weights (and batch-norm statistics) is what val
    # judges and the artifact keeps; it smooths the epoch-to-epoch noise a small val split amplifies.
    ema = (
        torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema), use_buffers=True
        )
        if cfg.ema
        else None
    )
    judged = ema.module if ema is not None else model
    rng = np.random.default_rng(params.seed)
    metric, sign = select_key(params)
    best_score, best_state, best_epoch, history = -np.inf, None, 0, []
    best_smoothed, smoothed_epoch = -np.inf, 0  # patience counts from the best mean of the last train.smoothing
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total, count, t0 = 0.0, 0, time.perf_counter()
        for inputs, index, targets, _ in train_b.batches(rng):
            inputs, index = on_device(inputs, index, device, model.needs_sequences)
            with precision.autocast():
                outputs = net(inputs, index, data.precomputed)
            # The task's loss on the CPU in float32: task plugins build their targets there from numpy.
            loss = data.task.loss(outputs.float() if device.type == "cpu" else outputs.float().cpu(), targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"candidate '{candidate.name}': loss diverged at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:  # fp16: the loss scaled so small gradients survive float16, unscaled before the step
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            total, count = total + loss.item() * len(targets), count + len(targets)
        if world > 1:  # every rank logs, and stops early, on the same figures and the same weights
            total, count = distributed.sum_across(total, count)
            distributed.sync_buffers(model)
            if judged is not model:  # train.ema: its averaged statistics too
                distributed.sync_buffers(judged)
        scores = predict_split(judged, val_b, data.precomputed, precision)
        val = data.task.evaluate(val_b.targets, scores, data.task.reference_groups(val_rows))
        record = {
            "epoch": epoch,
            "train_loss": total / count,
            **{f"val_{k}": val[k] for k in data.task.metrics},
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        if on_epoch:
            on_epoch(candidate.name, record)
        log.info("%s epoch %d: loss %.4f val_%s %.4f", candidate.name, epoch, record["train_loss"], metric, val[metric])
        smoothed = float(np.mean([sign * h[f"val_{metric}"] for h in history[-cfg.smoothing :]]))
        if smoothed > best_smoothed:
            best_smoothed, smoothed_epoch = smoothed, epoch
        if sign * val[metric] > best_score:
            best_score, best_epoch = sign * val[metric], epoch
            best_state = cpu_state(judged.trainable_state())
        elif epoch - smoothed_epoch >= cfg.patience:
            break
    train_seconds = time.perf_counter() - started
    model.load_state_dict(best_state, strict=False)
    model.eval()
    parallel = distributed.report(model, train_b, device) if world > 1 else None
    if rank != 0:  # rank 0 alone writes the artifact, evaluates and records
        return {"candidate": candidate.name, "rank": rank, "distributed": parallel}
    model.cpu()  # checkpoints hold CPU tensors: they load on any machine
    model.save(out_dir)
    model.to(device)
    metrics = evaluate_and_record(model, data, out_dir, cfg.batch_size)
    result = {
        "candidate": candidate.name,
        "fusion": candidate.fusion,
        "inputs": list(spec["inputs"]),
        "task": params.target.type,
        "labels": data.labels,
        "select_metric": params.select_metric,
        "model_dir": str(out_dir),
        "seed": params.seed,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_seconds": train_seconds,
        "device": describe(device),
        "precision": precision.name,
        **({"distributed": parallel} if parallel else {}),
        "history": history,
        "metrics": metrics,
        "config": {"candidate": candidate.model_dump(), "train": cfg.model_dump()},
        "pid": os.getpid(),
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result
