"""The training loop's engineering on edge cases of small data."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("steps", range(1, 12))
def test_the_learning_rate_schedule_takes_any_number_of_steps(steps: int):
    """Two epochs of two batches (4 steps) made PyTorch's one-cycle schedule divide by zero."""
    from mmops.training.loop import one_cycle

    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    scheduler = one_cycle(optimizer, 1e-3, steps)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    assert 0 < optimizer.param_groups[0]["lr"] <= 1e-3
