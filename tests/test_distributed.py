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


def _sync_bn_rank(rank: int, port: int, out: str) -> None:
    import torch
    from torch import distributed as dist

    from mmops.training.distributed import sync_batch_norm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, g, bn = _sync_bn_case()
        part = slice(rank * 5, (rank + 1) * 5)  # two unequal halves would do too; the counts are summed
        model = sync_batch_norm(torch.nn.Sequential(bn)).train()
        xr = x[part].clone().requires_grad_(True)
        y = model(xr)
        (y * g[part]).sum().backward()
        torch.save(
            {
                "y": y.detach(),
                "x_grad": xr.grad,
                "w_grad": model[0].weight.grad,
                "b_grad": model[0].bias.grad,
                "running_mean": model[0].running_mean,
                "running_var": model[0].running_var,
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _sync_bn_case():
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, 4, 4, generator=gen) * 3 + 1
    g = torch.randn(10, 3, 4, 4, generator=gen)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(3, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(3, generator=gen))
    return x, g, bn


def test_cpu_sync_batch_norm_over_two_gloo_ranks_equals_one_batch_norm_over_the_whole_batch(tmp_path):
    """Outputs, input gradients, the affine parameters' gradients (summed over ranks, as DDP's
    all-reduce does before averaging) and the running statistics equal one process's batch norm over
    the whole batch; each rank's own half-batch statistics would not."""
    import torch
    import torch.multiprocessing as mp
    from conftest import free_port

    mp.spawn(_sync_bn_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, g, bn = _sync_bn_case()
    x.requires_grad_(True)
    y = bn.train()(x)
    (y * g).sum().backward()
    close = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), **close)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad, **close)
    torch.testing.assert_close(ranks[0]["w_grad"] + ranks[1]["w_grad"], bn.weight.grad, **close)
    torch.testing.assert_close(ranks[0]["b_grad"] + ranks[1]["b_grad"], bn.bias.grad, **close)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], bn.running_mean, **close)
        torch.testing.assert_close(r["running_var"], bn.running_var, **close)
    _, _, alone = _sync_bn_case()
    half = alone.train()(x[:5].detach())
    assert not torch.allclose(half, y[:5].detach(), atol=1e-3)  # the half batch alone normalises otherwise


def test_sync_batch_norm_keeps_the_layers_own_parameters_so_a_frozen_layer_stays_frozen():
    import torch

    from mmops.training.distributed import SyncBatchNorm, sync_batch_norm

    frozen, trained = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm1d(4)
    frozen.requires_grad_(False)
    frozen.eval()
    model = sync_batch_norm(torch.nn.Sequential(frozen, torch.nn.Sequential(trained)))
    assert isinstance(model[0], SyncBatchNorm) and isinstance(model[1][0], SyncBatchNorm)
    assert model[0].weight is frozen.weight and not model[0].weight.requires_grad and not model[0].training
    assert model[0].running_mean is frozen.running_mean and model[1][0].bias is trained.bias
    assert model[1][0].bias.requires_grad
