"""The ``retrain`` flow: data stages through DVC, candidates fanned out as tasks, best one shipped,
then champion/challenger decides whether it replaces the production version."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from prefect import flow, task
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from mmops import lifecycle, pipeline
from mmops.project import Project, configure_environment


@task(name="data-stages")
def data_stages(root: str) -> dict[str, str]:
    return pipeline.run_stages(Project.at(root))


@task(name="train-candidate", task_run_name="train-{name}")
def train_candidate(root: str, name: str, flow_run_id: str | None) -> dict:
    project = Project.at(root)
    candidate = next(c for c in project.params.candidates if c.name == name)
    return pipeline.train_one(project, candidate, flow_run_id)


@task(name="register-and-package")
def register_and_package(root: str, best: dict, build: bool) -> dict:
    return pipeline.register_and_package(Project.at(root), best, build=build)


@task(name="champion-challenger")
def champion_challenger(root: str, model_version: str, model_dir: str, context: dict) -> dict:
    outcome = lifecycle.champion_challenger(Project.at(root), model_version, Path(model_dir), context)
    return {**asdict(outcome), "summary": outcome.summary()}


@flow(name="retrain")
def retrain(project_dir: str = ".", build_bento: bool = True) -> dict:
    """Reproduce the data stages, train every candidate, pick the best on val, register and package it,
    and promote it if it beats the production version on the test split."""
    project = Project.at(project_dir)
    configure_environment(project)  # a deployment run may start in a process mmops did not configure
    params = project.params
    stages = data_stages(str(project.root))
    workers = params.runner.max_workers
    if not params.train.threads:  # share the cores between the candidates that run at once
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    futures = [
        train_candidate.submit(str(project.root), c.name, str(flow_run.id) if flow_run.id else None)
        for c in params.candidates
    ]
    wait(futures)
    results = [f.result() for f in futures]
    best = pipeline.select_best(results, params.select_metric)
    pipeline.write_metrics(project, results, best)
    shipped = register_and_package(str(project.root), best, build_bento)
    promotion = champion_challenger(str(project.root), shipped["model_version"], best["model_dir"],
                                    {"stages": stages, "flow_run_id": str(flow_run.id) if flow_run.id else None})
    return {"stages": stages, "results": results, "best": best["candidate"], **shipped, "promotion": promotion}


def with_workers(max_workers: int):
    """The flow with a bounded thread pool: torch work must not oversubscribe the cores."""
    return retrain.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max_workers))
