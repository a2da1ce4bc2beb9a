"""Issue 14: data-parallel training of one candidate. Two gloo ranks on the CPU train on disjoint image
groups, hold one model (equal weight digests), rank 0 alone saves and records it, the same seed gives the
same model again, and accuracy lands in the single-process band."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tinyproject import tiny_project

from mmops.training.loop import shard


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_share_an_epoch_disjointly_and_take_equal_steps(world):
    order = np.random.default_rng(0).permutation(101)
    parts = [shard(order, r, world, drop_last=True) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # equal steps: the all-reduce never waits for a missing rank
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined) >= 101 - (world - 1)
    evaluated = np.concatenate([shard(order, r, world, drop_last=False) for r in range(world)])
    assert sorted(evaluated) == list(range(101))  # evaluation keeps every group


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return tiny_project(tmp_path_factory.mktemp("ddp") / "proj", {"train": {"epochs": 4, "patience": 4}})


def _train(root: Path, processes: int) -> dict:
    from mmops import pipeline
    from mmops.project import Project

    proj = Project.at(root)
    base = proj.params.candidates[0]
    candidate = base.model_copy(update={"train": {"distributed": {"processes": processes}}})
    result = pipeline.train_one(proj, candidate, force=True)
    assert result["status"] == "completed", result.get("error")
    return result


@pytest.mark.slow
def test_two_gloo_ranks_train_one_model_that_rank_0_saves_and_records(project):
    from mmops.core.model import MultimodalModel
    from mmops.project import Project
    from mmops.registry.store import Registry
    from mmops.training.distributed import state_digest

    registry = Registry(Project.at(project).db_url)
    single = _train(project, 1)
    runs_before = len(registry.runs(limit=1000))
    parallel = _train(project, 2)
    assert len(registry.runs(limit=1000)) == runs_before + 1  # one registry run, written by rank 0's parent

    report = parallel["distributed"]
    assert report["processes"] == 2 and report["backend"] == "gloo" and report["disjoint"]
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len({r["pid"] for r in ranks} | {os.getpid()}) == 3  # two processes of their own
    rows = pd.read_parquet(project / "data" / "prepared" / "rows.parquet")
    assert min(r["rows"] for r in ranks) > 0 and sum(r["rows"] for r in ranks) <= (rows["split"] == "train").sum()

    saved = MultimodalModel.load(Path(parallel["model_dir"]))
    assert ranks[0]["digest"] == ranks[1]["digest"] == state_digest(saved)  # the model rank 0 reports is saved
    assert Registry(Project.at(project).db_url).get_run(parallel["run_id"]).config["runtime"]["processes"] == 2

    # The same seed and world size give the same model.
    again = _train(project, 2)
    assert again["distributed"]["ranks"][0]["digest"] == ranks[0]["digest"]

    # One process's global batch and schedule: accuracy in its band (600 questions, 4 epochs).
    assert abs(parallel["final"]["val_accuracy"] - single["final"]["val_accuracy"]) <= 0.05
    assert [h["epoch"] for h in parallel["history"]] == [1, 2, 3, 4]  # rank 0's epochs reached the parent
