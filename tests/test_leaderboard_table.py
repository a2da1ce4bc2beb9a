"""The CLI's leaderboard stays readable for tasks with many metrics: the selection metric first, a few more,
and a note saying where the rest are."""

from __future__ import annotations

from mmops_plugins.tasks.contrastive import ContrastiveTask
from rich.console import Console

from mmops.cli import common, main


def _print(monkeypatch, results, select_metric):
    console = Console(width=200, record=True)
    monkeypatch.setattr(main, "console", console)
    monkeypatch.setattr(common, "console", console)
    main.print_leaderboard(results, results[0]["candidate"], select_metric)
    return console.export_text()


def test_a_task_with_many_metrics_shows_the_selection_metric_first_and_says_where_the_rest_are(monkeypatch):
    metrics = list(ContrastiveTask.metrics)
    final = {**{f"val_{m}": 0.5 for m in metrics}, "val_t2i_r5": 0.75, "test_t2i_r5": 0.7}
    results = [{"candidate": "clip", "task": "contrastive", "status": "completed", "final": final, "train_seconds": 3}]
    out = _print(monkeypatch, results, "val_t2i_r5")
    header = next(line for line in out.splitlines() if "candidate" in line)
    assert header.index("val t2i r5") < header.index("val recall mean")  # the selection metric leads
    assert "val zeroshot top5" not in out  # beyond the shown few
    assert f"{len(metrics) - main.LEADERBOARD_METRICS} more val metrics" in out and "leaderboard.json" in out
    assert "0.7500" in out and "0.7000" in out


def test_a_task_with_few_metrics_shows_them_all_and_no_note(monkeypatch):
    final = {"val_accuracy": 0.9, "val_macro_f1": 0.8, "test_accuracy": 0.85}
    results = [{"candidate": "c", "task": "classification", "status": "completed", "final": final, "train_seconds": 3}]
    out = _print(monkeypatch, results, "val_accuracy")
    assert "val macro f1" in out and "more val metrics" not in out
