"""The ``retrain`` flow: data stages through DVC, candidates fanned out as tasks, best one shipped,
then champion/challenger decides whether it replaces the production version."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from mmops_flows import sweep as sweep_flow
from prefect import flow, task
from prefect.runtime import flow_run

from mmops import pipeline
from mmops.config import RunnerConfig
from mmops.project import Project, configure_environment
from mmops.registry import lifecycle
from mmops.training.evaluation import evaluate_on_test


@task(name="register-and-package")
def register_and_package(root: str, best: dict, build: bool) -> dict:
    return pipeline.register_and_package(Project.at(root), best, build=build)


@task(name="champion-challenger")
def champion_challenger(root: str, model_version: str, model_dir: str, context: dict) -> dict:
    outcome = lifecycle.champion_challenger(Project.at(root), model_version, Path(model_dir), evaluate_on_test, context)
    return {**asdict(outcome), "summary": outcome.summary()}


@task(name="report")
def report(root: str, candidate: str) -> str:
    return str(pipeline.write_run_report(Project.at(root), candidate))


@flow(name="retrain")
def retrain(project_dir: str = ".", build_bento: bool = True, force: bool = False, runner: dict | None = None) -> dict:
    """Reproduce the data stages, train every candidate, pick the best on val, register and package it,
    and promote it if it beats the production version on the test split."""
    project = Project.at(project_dir)
    configure_environment(project)  # a deployment run may start in a process mmops did not configure
    # One run per project at a time: a scheduled run waits for a manual one (`mmops run` already holds it).
    with pipeline.run_guard(project, wait=True):
        swept = sweep_flow.run_sweep(project, RunnerConfig(**runner) if runner else None, force=force)
        stages, results, best = swept["stages"], swept["results"], swept["best"]
        shipped = register_and_package(str(project.root), best, build_bento)
        promotion = champion_challenger(
            str(project.root),
            shipped["model_version"],
            best["model_dir"],
            {"stages": stages, "flow_run_id": str(flow_run.id) if flow_run.id else None},
        )
        html = report(str(project.root), best["candidate"])
    return {
        "stages": stages,
        "results": results,
        "best": best["candidate"],
        **shipped,
        "promotion": promotion,
        "report": html,
    }
