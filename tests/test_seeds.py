"""Multi-seed candidates (train.seeds): mean ± std on val and test, selection on the mean."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from mmops.data.featurize import featurize
from mmops.data.prepare import prepare
from mmops.pipeline import seed_summary, select_best, train_one, write_metrics
from mmops.project import Project


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> Project:
    """Two number columns, a noisy label: seeds differ, training takes a second."""
    monkeypatch.delenv("MMOPS_DB_URL", raising=False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 2))
    label = np.where(x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.7, size=240) > 0, "hi", "lo")
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "label": label}).to_csv(raw / "manifest.csv", index=False)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "data": {"source": "manifest"},
                "inputs": {"a": {"modality": "number"}, "b": {"modality": "number"}},
                "target": "label",
                "train": {"epochs": 4, "patience": 4, "batch_size": 32, "seeds": 3, "head_hidden": 16},
                "candidates": [{"name": "concat", "fusion": "concat"}],
            }
        )
    )
    project = Project.at(tmp_path)
    project.state_dir.mkdir()
    prepare(raw, project.prepared_dir, project.params)
    featurize(project.prepared_dir, project.features_dir, project.params)
    return project


def test_seeds_report_mean_and_std_and_keep_the_first_seed_model(tiny):
    result = train_one(tiny, tiny.params.candidates[0])
    assert result["status"] == "completed", result
    seeds = result["seeds"]
    assert [s["seed"] for s in seeds] == [42, 43, 44]
    for key in ("val_accuracy", "test_accuracy", "test_macro_f1"):
        values = [s[key] for s in seeds]
        assert result["final"][key] == pytest.approx(np.mean(values))
        assert result["final_std"][key] == pytest.approx(np.std(values, ddof=1))
    # The artifact is the first seed's model: its own metrics are seed 42's.
    assert result["metrics"]["test"]["accuracy"] == pytest.approx(seeds[0]["test_accuracy"])
    assert result["seed"] == 42
    assert not any(p.name.startswith("tmp") for p in tiny.state_dir.iterdir())  # other seeds' models are gone
    write_metrics(tiny, [result], result)
    board = json.loads((tiny.metrics_dir / "leaderboard.json").read_text())
    assert board[0]["seeds"] == 3 and board[0]["test_accuracy_std"] == pytest.approx(
        result["final_std"]["test_accuracy"]
    )
    best = json.loads((tiny.metrics_dir / "best.json").read_text())
    assert best["seeds"]["n"] == 3 and best["seeds"]["mean"]["val_accuracy"] == result["final"]["val_accuracy"]
    # The registry keeps the mean and the std.
    from mmops.registry.store import Registry

    logged = {m.key: m.value for m in Registry(tiny.db_url).get_run(result["run_id"]).metrics if m.step is None}
    assert logged["val_accuracy"] == pytest.approx(result["final"]["val_accuracy"])
    assert logged["test_accuracy_std"] == pytest.approx(result["final_std"]["test_accuracy"])


def _run(name: str, val: list[float]) -> dict:
    results = [
        {"seed": 42 + i, "best_epoch": 1, "metrics": {"val": {"accuracy": v}, "test": {"accuracy": v}}}
        for i, v in enumerate(val)
    ]
    final, std, seeds = seed_summary(results)
    return {"candidate": name, "status": "completed", "final": final, "final_std": std, "seeds": seeds}


def test_selection_uses_the_mean_over_seeds_not_one_lucky_seed():
    lucky = _run("lucky", [0.98, 0.62, 0.64])  # best single seed, worst mean
    steady = _run("steady", [0.85, 0.84, 0.86])
    assert select_best([lucky, steady], "val_accuracy", 1.0)["candidate"] == "steady"
    assert steady["final_std"]["val_accuracy"] == pytest.approx(0.01)
    one = seed_summary([{"seed": 1, "best_epoch": 1, "metrics": {"val": {"accuracy": 0.5}}}])
    assert one[1] == {"val_accuracy": 0.0}
