"""The ``sweep`` flow: data stages through DVC, then every candidate as a task, ranked on val.

The task runner is chosen by config (``runner`` in params.yaml) or flag: a bounded thread pool here,
a Dask cluster (a local one, or ``address``) or a Ray cluster. Tasks get the project path, not data:
workers read the memory-mapped features from shared storage.
"""

from __future__ import annotations

import os

from prefect import flow, task
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from mmops import pipeline
from mmops.config import RunnerConfig
from mmops.project import Project, configure_environment


@task(name="data-stages")
def data_stages(root: str) -> dict[str, str]:
    return pipeline.run_stages(Project.at(root))


@task(name="train-candidate", task_run_name="train-{name}", retries=2, retry_delay_seconds=5)
def train_candidate(root: str, name: str, flow_run_id: str | None, threads: int, force: bool) -> dict:
    project = Project.at(root)
    configure_environment(project)  # a Dask or Ray worker is a fresh process
    return pipeline.train_one(project, project.params.candidate(name), flow_run_id, threads=threads, force=force)


def task_runner(runner: RunnerConfig):
    """The runner for ``runner.kind``; local clusters get one single-threaded process per worker."""
    if runner.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if runner.address:
            return DaskTaskRunner(address=runner.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": runner.max_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None,
                                              "host": "127.0.0.1"})
    if runner.kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise RuntimeError("runner.kind 'ray' needs prefect-ray: pip install 'mmops[ray]'") from exc
        return RayTaskRunner(address=runner.address, init_kwargs={"num_cpus": runner.max_workers})
    return ThreadPoolTaskRunner(max_workers=runner.max_workers)


@flow(name="sweep")
def sweep(project_dir: str = ".", force: bool = False) -> dict:
    """Reproduce the data stages, train every candidate (listed and swept), rank them on val."""
    project = Project.at(project_dir)
    configure_environment(project)
    params = project.params
    stages = data_stages(str(project.root))
    threads = params.train.threads or max(1, (os.cpu_count() or 1) // params.runner.max_workers)
    # Recorded on each registry run: the top flow run (retrain's, as `mmops schedule run` prints and a
    # schedule creates), not this sweep's own subflow run.
    run_id = str(flow_run.root_flow_run_id or flow_run.id) if flow_run.id else None
    futures = [train_candidate.submit(str(project.root), c.name, run_id, threads, force)
               for c in params.all_candidates()]
    wait(futures)
    results = []
    for candidate, future in zip(params.all_candidates(), futures, strict=True):
        try:
            results.append(future.result())
        except Exception as exc:  # retries exhausted: record it, rank the others
            results.append({"candidate": candidate.name, "fusion": candidate.fusion, "status": "failed",
                            "error": f"{type(exc).__name__}: {exc}"})
    best = pipeline.select_best(results, params.select_metric, params.metric_sign(params.select_metric))
    pipeline.write_metrics(project, results, best)
    return {"stages": stages, "results": results, "best": best}


def configured(project: Project, runner: RunnerConfig | None = None):
    """The sweep flow with the project's task runner (or ``runner``, e.g. from CLI flags)."""
    return sweep.with_options(task_runner=task_runner(runner or project.params.runner))
