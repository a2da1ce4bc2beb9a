"""The ``sweep`` flow: data stages through DVC, then every candidate as a task, ranked on val.

The task runner is chosen by config (``runner`` in params.yaml) or flag: a bounded thread pool here,
or a Dask cluster (a local one, or one joined by ``address``) whose workers are warmed once each
(:mod:`mmops.cluster`). Tasks get the project path, not data: workers read the memory-mapped features
from shared storage. A candidate whose worker dies is run again by Dask on another worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
    configure_environment(project)  # a Dask worker is a fresh process
    if not threads:  # a cluster joined by address: each worker sizes it by its own cores
        from mmops.cluster import worker_torch_threads

        threads = worker_torch_threads()
    return pipeline.train_one(project, project.params.candidate(name), flow_run_id, threads=threads, force=force)


@contextlib.contextmanager
def runner_for(project: Project, runner: RunnerConfig | None = None) -> Iterator[tuple[object, int]]:
    """The Prefect task runner for ``runner`` (default: the project's) and the torch threads per
    candidate that go with it. Dask: a local cluster is started here (closed on exit) or the one at
    ``address`` joined; either way its workers are warmed first, once each."""
    from mmops.cluster import candidate_threads, warm

    runner = runner or project.params.runner
    threads = candidate_threads(project, runner)
    if runner.kind != "dask":
        if runner.max_workers > 1:  # threads share this process: warm it once, before they race to import
            warm(str(project.root))
        yield ThreadPoolTaskRunner(max_workers=runner.max_workers), threads
        return
    from prefect_dask import DaskTaskRunner

    from mmops.cluster import dask_address

    with dask_address(project, runner) as address:
        yield DaskTaskRunner(address=address), threads


@flow(name="sweep")
def sweep(project_dir: str = ".", force: bool = False, threads: int | None = None) -> dict:
    """Reproduce the data stages, train every candidate (listed and swept), rank them on val.

    ``threads``: torch threads per candidate, from the runner in use (:func:`runner_for`); 0 lets each
    Dask worker size it by its own cores; None sizes it for the project's own runner."""
    project = Project.at(project_dir)
    configure_environment(project)
    params = project.params
    if threads is None:
        from mmops.cluster import candidate_threads

        threads = candidate_threads(project, params.runner)
    stages = data_stages(str(project.root))
    # Recorded on each registry run: the top flow run (retrain's, as `mmops schedule run` prints and a
    # schedule creates), not this sweep's own subflow run.
    run_id = str(flow_run.root_flow_run_id or flow_run.id) if flow_run.id else None
    futures = [
        train_candidate.submit(str(project.root), c.name, run_id, threads, force) for c in params.all_candidates()
    ]
    wait(futures)
    results = []
    for candidate, future in zip(params.all_candidates(), futures, strict=True):
        try:
            results.append(future.result())
        except Exception as exc:  # retries exhausted: record it, rank the others
            results.append(
                {
                    "candidate": candidate.name,
                    "fusion": candidate.fusion,
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                }
            )
    best = pipeline.select_best(results, params.select_metric, params.metric_sign(params.select_metric))
    pipeline.write_metrics(project, results, best)
    return {"stages": stages, "results": results, "best": best}


def run_sweep(project: Project, runner: RunnerConfig | None = None, force: bool = False) -> dict:
    """The sweep flow on the project's runner (or ``runner``, e.g. from CLI flags)."""
    with runner_for(project, runner) as (task_runner, threads):
        return sweep.with_options(task_runner=task_runner)(str(project.root), force=force, threads=threads)
