"""Evaluating a saved model on the project's current test split: what champion/challenger compares.

It lives with training (it needs the batcher and the model), and the registry's champion/challenger
receives it as a function, so layers only import downward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from mmops.core.model import load_model
from mmops.core.tasks import build_task
from mmops.data.featurize import load_values
from mmops.project import Project
from mmops.registry.store import NotComparable
from mmops.training.loop import Batcher, Dataset, evaluation_groups, predict_split


def evaluate_on_test(model_dir: Path, project: Project) -> dict[str, Any]:
    """Test metrics of the artifact in ``model_dir`` on the project's current prepared test split.

    Predictions are compared by label *name*: a model trained before appended data brought a new
    answer still gets a fair score (rows with labels it never knew count as errors).
    """
    prepared = project.prepared_dir
    try:
        model = load_model(model_dir)
    except Exception as exc:
        raise NotComparable(f"cannot load {model_dir}: {type(exc).__name__}: {exc}") from exc
    rows = pd.read_parquet(prepared / "rows.parquet")
    labels: list[str] = json.loads((prepared / "labels.json").read_text())
    values: dict[str, Any] = {}
    for name, spec in model.spec["inputs"].items():
        if f"{name}_idx" not in rows.columns:
            raise NotComparable(f"the model reads input '{name}', which the current data does not have")
        values[name] = load_values(prepared, name, spec["modality"])
    if model.task_name != project.params.target.type:
        raise NotComparable(
            f"the model predicts a {model.task_name} target, the project now a {project.params.target.type} one"
        )
    # The model's task (its threshold, its scaler) over today's labels: today's rows index those.
    task = build_task(model.task_name, model.task.config(), labels)
    data = Dataset(rows, values, frozenset(), labels, task)
    test = data.split("test")
    if test.empty:
        raise NotComparable("the prepared data has no test rows")
    try:
        probs = predict_split(model, Batcher(data, test, model.encoders, project.params.train.batch_size), frozenset())
    except Exception as exc:
        raise NotComparable(f"evaluation failed: {type(exc).__name__}: {exc}") from exc
    probs = model.task.align(probs, labels)  # the model's label order to the current data's, by name
    metrics = task.evaluate(data.targets(test), probs, evaluation_groups(task, test))
    for bulky in ("confusion", "per_class", "calibration"):
        metrics.pop(bulky, None)
    metrics["unknown_labels"] = sorted(set(labels) - set(model.labels))
    return metrics
