"""Champion/challenger: should the model a run just produced replace the one in production?

Both models are evaluated here, by the same code, on the current prepared test split, each through
its own encoders from raw inputs (no cached features, which belong to the current config only). The
rule is in ``params.yaml`` (``promotion``): the challenger must meet the minimums and beat the
champion by more than the margin; the first model that meets the minimums becomes production.
Anything else leaves the champion alone and records the challenger as staging, with the reason.
No Prefect here: the flow and the CLI call these functions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmops.config import PromotionConfig, metric_sign
from mmops.project import Project
from mmops.registry.store import Registry, parse_ref

ACTOR = "retrain flow (champion/challenger)"


class NotComparable(RuntimeError):
    """The champion cannot be evaluated on the current data (missing input, broken artifact...)."""


def evaluate_on_test(model_dir: Path, project: Project) -> dict[str, Any]:
    """Test metrics of the artifact in ``model_dir`` on the project's current prepared test split.

    Predictions are compared by label *name*: a model trained before appended data brought a new
    answer still gets a fair score (rows with labels it never knew count as errors).
    """
    from mmops.core.metrics import task_metrics
    from mmops.core.model import MultimodalModel
    from mmops.data.featurize import load_values
    from mmops.training.loop import Batcher, Dataset, predict_split

    prepared = project.prepared_dir
    try:
        model = MultimodalModel.load(model_dir)
    except Exception as exc:
        raise NotComparable(f"cannot load {model_dir}: {type(exc).__name__}: {exc}") from exc
    rows = pd.read_parquet(prepared / "rows.parquet")
    labels: list[str] = json.loads((prepared / "labels.json").read_text())
    values: dict[str, Any] = {}
    for name, spec in model.spec["inputs"].items():
        if f"{name}_idx" not in rows.columns:
            raise NotComparable(f"the model reads input '{name}', which the current data does not have")
        values[name] = load_values(prepared, name, spec["modality"])
    task = model.task
    if task["type"] != project.params.target.type:
        raise NotComparable(
            f"the model predicts a {task['type']} target, the project now a {project.params.target.type} one"
        )
    data = Dataset(rows, values, frozenset(), labels, task)
    test = data.split("test")
    if test.empty:
        raise NotComparable("the prepared data has no test rows")
    try:
        probs = predict_split(model, Batcher(data, test, model.encoders, project.params.train.batch_size),
                              frozenset())
    except Exception as exc:
        raise NotComparable(f"evaluation failed: {type(exc).__name__}: {exc}") from exc
    if task["type"] != "regression":  # the model's label order to the current data's, by name
        scores = np.zeros((len(test), len(labels)), dtype=np.float32)
        mine = {label: i for i, label in enumerate(model.labels)}
        for j, label in enumerate(labels):
            if label in mine:
                scores[:, j] = probs[:, mine[label]]
        probs = scores
    groups = test["group"].to_numpy() if "group" in test else None
    metrics = task_metrics(task, data.targets(test), probs, labels, groups)
    for bulky in ("confusion", "per_class", "calibration"):
        metrics.pop(bulky, None)
    metrics["unknown_labels"] = sorted(set(labels) - set(model.labels))
    return metrics


@dataclass
class Outcome:
    decision: str  # "promoted" or "staged"
    challenger: str
    champion: str | None
    metric: str
    challenger_score: float
    champion_score: float | None
    reason: str

    def summary(self) -> str:
        vs = (f" vs champion {self.champion} {self.champion_score:.4f}" if self.champion_score is not None
              else f" (champion {self.champion} not evaluated)" if self.champion else "")
        return (f"{self.challenger} {self.decision} to {'production' if self.decision == 'promoted' else 'staging'}"
                f": test {self.metric} {self.challenger_score:.4f}{vs} — {self.reason}")


def _below_minimum(metrics: dict, rule: PromotionConfig) -> str | None:
    """The minimums are classification's (accuracy, macro-F1); other tasks are judged on the margin."""
    for key, floor in (("accuracy", rule.min_accuracy), ("macro_f1", rule.min_macro_f1)):
        if key in metrics and "accuracy" in metrics and metrics[key] < floor:
            return f"test {key} {metrics[key]:.4f} is below the minimum {floor}"
    return None


def decide(challenger: dict, champion: dict | None, rule: PromotionConfig) -> tuple[bool, str]:
    """The rule alone, on two metric dicts (``champion`` None: no production version yet)."""
    below = _below_minimum(challenger, rule)
    if below:
        return False, below
    if champion is None:
        return True, "first model to meet the minimums"
    gain = metric_sign(rule.metric) * (challenger[rule.metric] - champion[rule.metric])
    if gain > rule.margin:
        return True, f"beats the champion by {gain:+.4f} (margin {rule.margin})"
    return False, f"does not beat the champion by more than the margin {rule.margin} ({gain:+.4f})"


def champion_challenger(project: Project, ref: str, challenger_dir: Path,
                        context: dict | None = None, actor: str = ACTOR) -> Outcome:
    """Evaluate the new version ``ref`` against production, decide, and record the decision (with
    its evidence and ``context``, e.g. which data stages ran) as one stage change."""
    import bentoml

    rule = project.params.promotion
    registry = Registry(project.db_url)
    version = registry.get_version(*parse_ref(ref))
    champion = registry.production(version.name)
    challenger_metrics = evaluate_on_test(challenger_dir, project)
    champion_metrics = None
    if champion is None:
        promote, reason = decide(challenger_metrics, None, rule)
    else:
        try:
            if not champion.model_tag:
                raise NotComparable("it has no model in the BentoML store")
            champion_metrics = evaluate_on_test(Path(bentoml.models.get(champion.model_tag).path), project)
        except (NotComparable, bentoml.exceptions.NotFound) as exc:
            promote, reason = False, f"champion {champion.ref} could not be evaluated on the current test data " \
                                     f"({exc}); kept it — promote by hand if intended"
        else:
            promote, reason = decide(challenger_metrics, champion_metrics, rule)
    outcome = Outcome(
        decision="promoted" if promote else "staged", challenger=version.ref,
        champion=champion.ref if champion else None, metric=rule.metric,
        challenger_score=challenger_metrics[rule.metric],
        champion_score=champion_metrics[rule.metric] if champion_metrics else None, reason=reason,
    )
    details = {**asdict(outcome), "rule": rule.model_dump(), "challenger_metrics": challenger_metrics,
               "champion_metrics": champion_metrics, **(context or {})}
    registry.transition(version.name, version.version, "production" if promote else "staging", reason,
                        actor=actor, action="champion-challenger", details=details)
    return outcome
