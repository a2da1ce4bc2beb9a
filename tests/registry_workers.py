"""Child-process bodies for the registry concurrency tests, in a module that imports little: each
spawned process imports it, and importing the test module (the CLI, pandas...) would dominate."""

from __future__ import annotations

import random

from mmops.registry.store import Registry

POINTS = 500


def write_metrics(url: str, run_id: str, worker: int) -> None:
    registry = Registry(url)
    for step in range(POINTS // 2):  # per-epoch logging, two keys per step: 250 transactions
        registry.log_metrics(run_id, {"loss": worker + step / 1000, "acc": step / 1000}, step=step)
    registry.engine.dispose()


def promote_randomly(url: str, seed: int, versions: int = 4, times: int = 15) -> None:
    registry = Registry(url)
    rng = random.Random(seed)
    for _ in range(times):
        registry.transition("m", rng.randint(1, versions), "production", f"stress {seed}", actor=f"p{seed}")
    registry.engine.dispose()
