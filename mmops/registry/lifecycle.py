"""Champion/challenger: should the model a run just produced replace the one in production?

Both models are evaluated by the same function, on the current prepared test split; the caller hands
it in (``evaluate``: the training layer's ``evaluate_on_test``), so the registry never reaches up into
training code. The
rule is in ``params.yaml`` (``promotion``): the challenger must meet the minimums and beat the
champion by more than the margin; the first model that meets the minimums becomes production.
Anything else leaves the champion alone and records the challenger as staging, with the reason.
No Prefect here: the flow and the CLI call these functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from mmops.config import PromotionConfig
from mmops.project import Project
from mmops.registry.store import NotComparable, Registry, parse_ref

ACTOR = "retrain flow (champion/challenger)"


@dataclass
class Outcome:
    decision: str  # "promoted", "staged", or "kept" (the challenger is the production version itself)
    challenger: str
    champion: str | None
    metric: str
    challenger_score: float | None
    champion_score: float | None
    reason: str

    def summary(self) -> str:
        if self.decision == "kept":
            return f"{self.challenger} kept in production — {self.reason}"
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


def decide(challenger: dict, champion: dict | None, rule: PromotionConfig, sign: float = 1.0) -> tuple[bool, str]:
    """The rule alone, on two metric dicts (``champion`` None: no production version yet); ``sign`` is
    the task's direction for ``rule.metric`` (-1: lower is better)."""
    below = _below_minimum(challenger, rule)
    if below:
        return False, below
    if champion is None:
        return True, "first model to meet the minimums"
    gain = sign * (challenger[rule.metric] - champion[rule.metric])
    if gain > rule.margin:
        return True, f"beats the champion by {gain:+.4f} (margin {rule.margin})"
    return False, f"does not beat the champion by more than the margin {rule.margin} ({gain:+.4f})"


def champion_challenger(project: Project, ref: str, challenger_dir: Path,
                        evaluate: Callable[[Path, Project], dict],
                        context: dict | None = None, actor: str = ACTOR) -> Outcome:
    """Evaluate the new version ``ref`` against production, decide, and record the decision (with
    its evidence and ``context``, e.g. which data stages ran) as one stage change."""
    import bentoml

    rule = project.params.promotion
    sign = project.params.metric_sign(rule.metric)
    registry = Registry(project.db_url)
    version = registry.get_version(*parse_ref(ref))
    champion = registry.production(version.name)
    if champion is not None and champion.version == version.version:
        # A rerun whose new candidates all failed (or changed nothing) hands back the version already in
        # production: comparing it with itself can only "lose" by the margin and demote it to staging,
        # leaving the project with no production model. Nothing to decide, nothing to record.
        return Outcome(decision="kept", challenger=version.ref, champion=champion.ref, metric=rule.metric,
                       challenger_score=None, champion_score=None,
                       reason="the run's best model is the production version itself; production unchanged")
    challenger_metrics = evaluate(challenger_dir, project)
    champion_metrics = None
    if champion is None:
        promote, reason = decide(challenger_metrics, None, rule, sign)
    else:
        try:
            if not champion.model_tag:
                raise NotComparable("it has no model in the BentoML store")
            champion_metrics = evaluate(Path(bentoml.models.get(champion.model_tag).path), project)
        except (NotComparable, bentoml.exceptions.NotFound) as exc:
            promote, reason = False, f"champion {champion.ref} could not be evaluated on the current test data " \
                                     f"({exc}); kept it — promote by hand if intended"
        else:
            promote, reason = decide(challenger_metrics, champion_metrics, rule, sign)
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
