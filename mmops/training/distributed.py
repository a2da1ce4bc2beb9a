"""Data-parallel training of one candidate over several processes (``train.distributed.processes``).

Each rank is a process of its own with the same seed, the same model and a disjoint share of the
image groups (:func:`mmops.training.loop.shard`); PyTorch's ``DistributedDataParallel`` averages the
gradients after every backward pass (gloo on the CPU, nccl on CUDA), so every rank holds the same
weights after every step. Each rank takes ``batch_size / processes`` rows a step: the global batch,
the number of steps and the learning-rate schedule are those of one process, which keeps the
accuracy in the single-process band. Validation scores are gathered on every rank, so all of them
stop early on the same epoch; rank 0 alone writes the artifact, the metrics and the registry run.

:func:`train_parallel` starts the ranks with ``torch.multiprocessing`` and the same environment
rendezvous as ``torchrun`` (``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``) on this machine.
"""

from __future__ import annotations

import hashlib
import os
import queue as queue_module
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import distributed as dist
from torch import nn


def rank_world() -> tuple[int, int]:
    """This process's rank and the number of ranks; ``(0, 1)`` outside data-parallel training."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every rank's loss depends on every
    rank's contribution to the sum."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of every rank, on the CPU (gloo), where PyTorch's own
    ``nn.SyncBatchNorm`` refuses to run.

    Each rank otherwise normalises by the statistics of its own ``batch_size / processes`` rows: a
    noisier batch norm than one process's, which cost 0.65 points of test accuracy (mean of 3 seeds,
    every seed below every single-process seed; ``bench/ddp_overhead.py --accuracy-only``). Here the
    per-channel sums, sums of squares and row counts are added over the ranks with a differentiable
    all-reduce, so the forward pass and its gradients are those of the global batch; the running
    statistics follow the global batch too (unbiased variance, as ``nn.BatchNorm`` keeps). The state
    dict is ``nn.BatchNorm``'s, so a saved model loads into the plain layer.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        self._check_input_dim(input)
        channels, dims = input.size(1), [0, *range(2, input.dim())]
        count = input.new_tensor([input.numel() / channels])
        stats = _SumOverRanks.apply(torch.cat([input.sum(dims), (input * input).sum(dims), count]))
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels : 2 * channels] / total - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (total / (total - 1).clamp_min(1))
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def sync_batch_norm(module: nn.Module) -> nn.Module:
    """Every batch-norm layer of ``module`` replaced by :class:`SyncBatchNorm` holding the layer's own
    parameters and buffers (the same objects, as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does): a
    frozen layer stays frozen, and nothing is copied."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        synced = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        for name, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            setattr(synced, name, value)
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, sync_batch_norm(child))
    return module


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model under ``DistributedDataParallel``, its batch norm over the global batch (PyTorch's
    ``SyncBatchNorm`` on CUDA, :class:`SyncBatchNorm` on the CPU). Unused parameters are allowed: a
    learned 'missing' embedding, or a one-input batch, leaves some weights without a gradient in some
    steps."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        sync_batch_norm(model)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def sum_across(*values: float) -> tuple[float, ...]:
    """The sums over every rank (an epoch's loss total and row count)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tuple(tensor.tolist())


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank. DDP broadcasts them before each
    forward pass, so after an epoch each rank's still hold its own last batch: without this the ranks
    would score validation with slightly different statistics and keep different best weights."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def state_digest(model: nn.Module) -> str:
    """SHA-256 of the weights an artifact stores (in key order, on the CPU): equal digests on every rank
    mean the ranks trained one model; the saved artifact's digest must be rank 0's."""
    h = hashlib.sha256()
    for key, value in sorted(model.trainable_state().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def report(model: nn.Module, batcher: Any, device: torch.device) -> dict:
    """What the ranks did, gathered on every rank: their processes, the rows of their last epoch (checked
    disjoint) and the digest of their final weights."""
    rank, world = rank_world()
    seen = np.sort(np.concatenate(batcher.seen)) if batcher.seen else np.zeros(0, dtype=np.int64)
    mine = {"rank": rank, "pid": os.getpid(), "rows": len(seen), "digest": state_digest(model)}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (mine, seen))
    rows = [s for _, s in everyone]
    union = np.unique(np.concatenate(rows)) if rows else rows
    return {
        "processes": world,
        "backend": dist.get_backend(),
        "device": str(device),
        "disjoint": bool(len(union) == sum(len(r) for r in rows)),
        "ranks": [info for info, _ in everyone],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(choice: str, device: torch.device) -> str:
    if choice != "auto":
        return choice
    return "nccl" if device.type == "cuda" else "gloo"


def _rank_main(rank: int, world: int, port: int, job: dict, events: Any) -> None:
    """One rank: join the group, load the data (memory-mapped, shared by the page cache), train."""
    from mmops.core.devices import resolve_device
    from mmops.training.loop import Dataset, train_candidate

    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
        }
    )
    params, candidate = job["params"], job["candidate"]
    cfg = params.train_for(candidate)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None:  # one GPU per rank, as torchrun's LOCAL_RANK
        os.environ["MMOPS_DEVICE"] = f"cuda:{rank % torch.cuda.device_count()}"
        device = resolve_device(cfg.device)
        torch.cuda.set_device(device)
    torch.set_num_threads(job["threads"])
    dist.init_process_group(_backend(cfg.distributed.backend, device), rank=rank, world_size=world)
    try:
        data = Dataset.load(job["prepared_dir"], job["features_dir"], params, use_cache=cfg.feature_cache)

        def on_epoch(name: str, record: dict) -> None:
            events.put(("epoch", record))

        result = train_candidate(
            params, candidate, data, job["out_dir"], on_epoch if rank == 0 else None, job["resolve"]
        )
        if rank == 0:
            events.put(("result", result))
    finally:
        dist.destroy_process_group()


def train_parallel(
    params: Any,
    candidate: Any,
    prepared_dir: Path,
    features_dir: Path,
    out_dir: Path,
    processes: int,
    on_epoch: Any = None,
    resolve: Any = None,
) -> dict:
    """Train ``candidate`` on ``processes`` ranks of this machine; rank 0's result (as
    :func:`~mmops.training.loop.train_candidate` returns it, with ``distributed``: the ranks' report).

    Rank 0's epochs reach ``on_epoch`` here, in the calling process, as they finish. A rank that fails
    stops them all; its traceback is in the raised error.
    """
    from torch import multiprocessing

    from mmops.core.model import artifact_folder

    cfg = params.train_for(candidate)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // processes)
    job = {
        "params": params,
        "candidate": candidate,
        "prepared_dir": Path(prepared_dir),
        "features_dir": Path(features_dir),
        "out_dir": Path(out_dir),
        "resolve": resolve or artifact_folder,
        "threads": threads,
    }
    events = multiprocessing.get_context("spawn").Queue()
    ranks = multiprocessing.start_processes(
        _rank_main, args=(processes, free_port(), job, events), nprocs=processes, join=False, start_method="spawn"
    )
    result = None

    def drain(block: float) -> None:
        nonlocal result
        while True:
            try:
                kind, payload = events.get(timeout=block)
            except queue_module.Empty:
                return
            block = 0.0
            if kind == "result":
                result = payload
            elif on_epoch is not None:
                on_epoch(candidate.name, payload)

    try:
        while not ranks.join(timeout=0.2):
            drain(0.0)
    except multiprocessing.ProcessRaisedException as exc:
        raise RuntimeError(f"data-parallel training of '{candidate.name}' failed on a rank:\n{exc}") from None
    except multiprocessing.ProcessExitedException as exc:
        raise RuntimeError(f"data-parallel training of '{candidate.name}': a rank died ({exc})") from None
    drain(1.0)
    if result is None:
        raise RuntimeError(f"data-parallel training of '{candidate.name}': rank 0 returned no result")
    return result
