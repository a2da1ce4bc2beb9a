"""Dask clusters for sweeps: warm workers, thread counts, and a local cluster made like a real one.

A sweep on Dask ships each candidate to a worker as ``(project path, candidate name)``; the worker
reads the memory-mapped features from the shared project folder. What a worker must do before its
first candidate (import torch and the plugins, load the frozen encoders such as MiniLM) is done once
per worker process by :class:`WarmWorker`, a Dask ``WorkerPlugin``: registered on the scheduler, it
also runs on every worker that joins later, so a worker is warm for every sweep it serves, not cold
for each. Nothing here imports Prefect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from distributed import WorkerPlugin

from mmops.config import RunnerConfig
from mmops.project import Project, configure_environment

log = logging.getLogger("mmops.cluster")


def warm(root: str, threads: int = 0) -> dict[str, Any]:
    """Import what training needs and build the project's frozen encoders in this process (they stay in
    :mod:`mmops.core.model`'s per-process cache, where every later candidate finds them)."""
    started = time.perf_counter()
    project = Project.at(root)
    configure_environment(project)
    import torch

    from mmops.core.model import build_input_encoder
    from mmops.training import loop  # noqa: F401  (imports the training stack once, here)

    if threads:
        torch.set_num_threads(threads)
    frozen = []
    for name, spec in project.params.inputs.items():
        encoder = build_input_encoder(spec.model_dump())  # cached when frozen (a shared MiniLM)
        if encoder.frozen:
            frozen.append(name)
    return {"pid": os.getpid(), "frozen": frozen, "seconds": time.perf_counter() - started}


class WarmWorker(WorkerPlugin):
    """Runs :func:`warm` once in each worker process, when it is registered and when a worker joins."""

    idempotent = True  # registered again by the next sweep: a worker already warm is left as it is

    def __init__(self, root: str) -> None:
        self.root = root
        self.name = f"mmops-warm:{root}"

    def setup(self, worker: Any) -> None:
        worker.mmops_warm = warm(self.root, worker_torch_threads(worker))
        log.info("mmops: worker %s warm in %.1f s", worker.address, worker.mmops_warm["seconds"])


def worker_torch_threads(worker: Any = None) -> int:
    """Torch threads for a candidate on a Dask worker: its machine's cores shared by the candidates it
    runs at once (``dask worker --nthreads``). 0 outside a worker."""
    if worker is None:
        try:
            from distributed import get_worker

            worker = get_worker()
        except ValueError:
            return 0
    return max(1, (os.cpu_count() or 1) // max(1, worker.state.nthreads))


def candidate_threads(project: Project, runner: RunnerConfig) -> int:
    """Torch threads per candidate for the runner actually used (``--workers`` and ``--runner``
    included): ``train.threads`` if set; threads and local clusters share this machine's cores among
    ``max_workers`` candidates; 0 on a cluster by address, where each worker decides by its own cores."""
    if project.params.train.threads:
        return project.params.train.threads
    if runner.kind == "dask" and runner.address:
        return 0
    return max(1, (os.cpu_count() or 1) // runner.max_workers)


@contextlib.contextmanager
def dask_address(project: Project, runner: RunnerConfig) -> Iterator[str]:
    """The scheduler address of the runner's cluster, its workers warm. With ``runner.address`` the
    cluster is joined (and left running); without, a local one is started (one single-threaded
    process per worker, as on separate machines) and closed afterwards."""
    from distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        address = runner.address
        if not address:
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=runner.max_workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    host="127.0.0.1",
                )
            )
            address = cluster.scheduler_address
        with Client(address, set_as_default=False) as client:
            client.register_plugin(WarmWorker(str(project.root)))
        yield address
