"""Champion/challenger: should the model a run just produced replace the one in production?

Both models are evaluated by the same function, on the current prepared test split; the caller hands
it in (``evaluate``: the training layer's ``evaluate_on_test``), so the registry never reaches up into
training code. The
rule is in ``params.yaml`` (``promotion``): the challenger must meet the minimums and beat the
champion by more than the margin; the first model that meets the minimums becomes production.
Anything else leaves the champion alone and records the challenger as staging, with the reason.
When the two were trained on the same data and at least one with several seeds (``train.seeds``),
the rule is applied to their means over seeds, as recorded by their runs: one seed's model ranks luck
(10 points between two seeds of one candidate were measured on a speaker-disjoint task). Both models
are still evaluated, and those figures kept as evidence. A run with ``train.ensemble`` serves the
average of its seeds' models: its figure is the ensemble's own (which its run records as its final
metrics), never its members' mean, and it counts as one model, not as several seeds.
No Prefect here: the flow and the CLI call these functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from mmops.config import PromotionConfig
from mmops.project import Project
from mmops.registry.store import ModelVersion, NotComparable, Registry, parse_ref

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
        vs = (
            f" vs champion {self.champion} {self.champion_score:.4f}"
            if self.champion_score is not None
            else f" (champion {self.champion} not evaluated)"
            if self.champion
            else ""
        )
        return (
            f"{self.challenger} {self.decision} to {'production' if self.decision == 'promoted' else 'staging'}"
            f": test {self.metric} {self.challenger_score:.4f}{vs} — {self.reason}"
        )


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


def seed_means(registry: Registry, version: ModelVersion) -> tuple[dict[str, float], dict[str, float], int, int]:
    """The test metrics of the run behind ``version`` as means over its seeds, their standard deviations,
    the number of seeds (1: the run's own figures, std 0), and the members of its ensemble (0: none).

    An ensemble's run records the ensemble's own test metrics (its members' are ``members_test_*``):
    those are returned, as one model's (1 seed, no std)."""
    run = registry.get_run(version.run_id)
    final = run.final_metrics()
    train = run.config.get("train") or {}
    seeds = int(train.get("seeds") or 1)
    means = {k[5:]: v for k, v in final.items() if k.startswith("test_") and not k.endswith("_std")}
    stds = {k[5:-4]: v for k, v in final.items() if k.startswith("test_") and k.endswith("_std")}
    if train.get("ensemble"):
        return means, {}, 1, seeds
    return means, stds, seeds, 0


def _figure(means: dict, stds: dict, seeds: int, members: int, metric: str) -> str:
    """One side of the comparison in words: an ensemble's own figure, or a mean ± std over seeds."""
    if members:
        return f"{means[metric]:.4f} (the ensemble of {members} seeds' models)"
    return f"{means[metric]:.4f} ± {stds.get(metric, 0.0):.4f} ({seeds} seeds)"


def _compare_means(
    registry: Registry, challenger: ModelVersion, champion: ModelVersion, metric: str
) -> tuple[dict, dict, str] | None:
    """Seed means of both versions when they can be compared: the same data version, the metric recorded
    by both runs, and more than one seed on at least one side (an ensemble is one model). None otherwise:
    the two models' own evaluations decide (two ensembles: each ensemble's own figure)."""
    if challenger.data_version_id is None or challenger.data_version_id != champion.data_version_id:
        return None
    new, new_std, new_n, new_members = seed_means(registry, challenger)
    old, old_std, old_n, old_members = seed_means(registry, champion)
    if max(new_n, old_n) < 2 or metric not in new or metric not in old:
        return None
    note = (
        f"means over seeds on the same data: challenger {_figure(new, new_std, new_n, new_members, metric)}, "
        f"champion {_figure(old, old_std, old_n, old_members, metric)}"
    )
    return new, old, note


def champion_challenger(
    project: Project,
    ref: str,
    challenger_dir: Path,
    evaluate: Callable[[Path, Project], dict],
    context: dict | None = None,
    actor: str = ACTOR,
) -> Outcome:
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
        return Outcome(
            decision="kept",
            challenger=version.ref,
            champion=champion.ref,
            metric=rule.metric,
            challenger_score=None,
            champion_score=None,
            reason="the run's best model is the production version itself; production unchanged",
        )
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
            promote, reason = (
                False,
                f"champion {champion.ref} could not be evaluated on the current test data "
                f"({exc}); kept it — promote by hand if intended",
            )
        else:
            promote, reason = decide(challenger_metrics, champion_metrics, rule, sign)
    scores = (challenger_metrics[rule.metric], champion_metrics[rule.metric] if champion_metrics else None)
    means = _compare_means(registry, version, champion, rule.metric) if champion_metrics else None
    if means is not None:
        promote, reason = decide(means[0], means[1], rule, sign)
        reason, scores = f"{reason}; {means[2]}", (means[0][rule.metric], means[1][rule.metric])
    outcome = Outcome(
        decision="promoted" if promote else "staged",
        challenger=version.ref,
        champion=champion.ref if champion else None,
        metric=rule.metric,
        challenger_score=scores[0],
        champion_score=scores[1],
        reason=reason,
    )
    details = {
        **asdict(outcome),
        "rule": rule.model_dump(),
        "challenger_metrics": challenger_metrics,
        "champion_metrics": champion_metrics,
        **({"challenger_seed_means": means[0], "champion_seed_means": means[1]} if means else {}),
        **(context or {}),
    }
    registry.transition(
        version.name,
        version.version,
        "production" if promote else "staging",
        reason,
        actor=actor,
        action="champion-challenger",
        details=details,
    )
    return outcome
