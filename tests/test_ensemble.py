"""Deep ensembles (``train.ensemble``): the seeds' models kept and served as the average of their outputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mmops_plugins.tasks.captioning import CaptioningTask
from mmops_plugins.tasks.classification import ClassificationTask
from mmops_plugins.tasks.contrastive import ContrastiveTask
from mmops_plugins.tasks.multilabel import MultilabelTask
from mmops_plugins.tasks.regression import RegressionTask
from mmops_plugins.tasks.sentiment import SentimentTask

from mmops.config import ConfigError, load_params
from mmops.core import plugin_registry
from mmops.core.model import ENSEMBLE_FILE, Ensemble, MultimodalModel, load_model
from mmops.core.tasks import Task
from mmops.data.featurize import featurize
from mmops.data.prepare import prepare
from mmops.pipeline import model_size, train_one, write_metrics
from mmops.project import Project
from mmops.registry.store import Registry
from mmops.serving.predictor import Predictor

TRAIN = {"epochs": 3, "patience": 3, "batch_size": 32, "seeds": 3, "head_hidden": 16, "threads": 1}


class NoCombineTask(ClassificationTask):
    """A third-party task written before ``combine()`` existed."""

    combine = Task.combine


@pytest.fixture
def third_party_task(monkeypatch):
    real = plugin_registry.get_task
    monkeypatch.setattr(plugin_registry, "get_task", lambda name: NoCombineTask if name == "nocombine" else real(name))


def write_project(root: Path, train: dict, target: str | dict = "label") -> Path:
    """Two number columns and a noisy label (seeds differ; a second to train), params.yaml written."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 2))
    label = np.where(x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.7, size=240) > 0, "hi", "lo")
    raw = root / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "label": label}).to_csv(raw / "manifest.csv", index=False)
    set_params(root, train, target)
    return root


def set_params(root: Path, train: dict, target: str | dict = "label") -> None:
    params = {
        "data": {"source": "manifest"},
        "inputs": {"a": {"modality": "number"}, "b": {"modality": "number"}},
        "target": target,
        "train": train,
        "candidates": [{"name": "concat", "fusion": "concat"}],
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def prepared(root: Path) -> Project:
    project = Project.at(root)
    project.state_dir.mkdir(exist_ok=True)
    prepare(root / "data" / "raw", project.prepared_dir, project.params)
    featurize(project.prepared_dir, project.features_dir, project.params)
    return project


@pytest.fixture
def trained(tmp_path, monkeypatch) -> tuple[Project, dict]:
    monkeypatch.delenv("MMOPS_DB_URL", raising=False)
    project = prepared(write_project(tmp_path, {**TRAIN, "ensemble": True}))
    result = train_one(project, project.params.candidates[0])
    assert result["status"] == "completed", result
    return project, result


# ---------------------------------------------------------------- the task hooks are exact


def test_classification_combines_probabilities_not_logits():
    torch.manual_seed(0)
    outputs = [torch.randn(5, 4) * 3 for _ in range(3)]
    combined = ClassificationTask(["a", "b", "c", "d"]).combine(outputs)
    mean = torch.stack([o.softmax(1) for o in outputs]).mean(0)
    assert torch.allclose(combined.softmax(1), mean, atol=1e-6)
    assert not torch.allclose(combined.softmax(1), torch.stack(outputs).mean(0).softmax(1), atol=1e-3)
    confident = ClassificationTask(["a", "b"]).combine([torch.tensor([[1e4, -1e4]]), torch.tensor([[-1e4, 1e4]])])
    assert torch.allclose(confident.softmax(1), torch.tensor([[0.5, 0.5]]))  # no overflow, no NaN


def test_multilabel_combines_probabilities_per_label_and_survives_saturation():
    torch.manual_seed(0)
    outputs = [torch.randn(6, 3) * 4 for _ in range(3)]
    combined = MultilabelTask(["a", "b", "c"]).combine(outputs)
    assert torch.allclose(combined.sigmoid(), torch.stack([o.sigmoid() for o in outputs]).mean(0), atol=1e-6)
    saturated = MultilabelTask(["a"]).combine([torch.tensor([[200.0]]), torch.tensor([[200.0]])])
    assert torch.isfinite(saturated).all() and saturated.sigmoid().item() == pytest.approx(1.0)
    half = MultilabelTask(["a"]).combine([torch.tensor([[200.0]]), torch.tensor([[-200.0]])])
    assert half.sigmoid().item() == pytest.approx(0.5)


def test_regression_and_sentiment_combine_to_the_mean_prediction():
    outputs = [torch.tensor([[0.5], [-1.0]]), torch.tensor([[1.5], [3.0]])]
    task = RegressionTask(mean=10.0, std=2.0)
    assert torch.allclose(task.scores(task.combine(outputs)), torch.tensor([[12.0], [12.0]]))
    sentiment = SentimentTask(mean=0.0, std=2.0)  # scores clip to [-3, 3]: the mean is clipped, not the members
    assert torch.allclose(sentiment.scores(sentiment.combine(outputs)), torch.tensor([[2.0], [2.0]]))


def test_which_tasks_combine_models():
    assert all(t.combines_models() for t in (ClassificationTask, MultilabelTask, RegressionTask, SentimentTask))
    assert not any(t.combines_models() for t in (CaptioningTask, ContrastiveTask, NoCombineTask))
    with pytest.raises(NotImplementedError, match="NoCombineTask"):
        NoCombineTask(["a"]).combine([torch.zeros(1, 1)])


class SummingTask(MultilabelTask):
    """A third-party combine() that adds logits up instead of averaging probabilities."""

    def combine(self, outputs):
        return torch.stack(outputs).sum(0)


def test_the_task_conformance_run_checks_combine_where_a_task_has_it(monkeypatch):
    from mmops.core.conformance import check_task

    real = plugin_registry.get_task
    monkeypatch.setattr(plugin_registry, "get_task", lambda name: SummingTask if name == "summing" else real(name))
    name = "combine() of identical members scores as one (train.ensemble)"
    for task in ("classification", "multilabel", "regression", "sentiment"):
        checks = {c.name: c.passed for c in check_task(task)}
        assert checks[name] and all(checks.values()), (task, checks)
    assert name not in {c.name for c in check_task("contrastive")}  # no combine(): nothing to check
    failed = {c.name: c.detail for c in check_task("summing") if not c.passed}
    assert list(failed) == [name] and "identical members" in failed[name]


# ---------------------------------------------------------------- configuration errors, before training


@pytest.mark.parametrize(
    ("train", "where"),
    [({"ensemble": True}, "train.ensemble"), ({"ensemble": True, "seeds": 1}, "train.ensemble")],
)
def test_an_ensemble_of_one_seed_is_a_config_error_that_says_the_fix(tmp_path, train, where):
    set_params(tmp_path, train)
    with pytest.raises(ConfigError, match=r"train\.seeds: 3") as info:
        load_params(tmp_path / "params.yaml")
    assert where in str(info.value) and "concat" in str(info.value)


def test_a_candidate_override_is_checked_too(tmp_path):
    set_params(tmp_path, {"seeds": 1})
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["candidates"][0]["train"] = {"ensemble": True}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"candidates\[concat\]\.train\.ensemble.*train\.seeds: 3"):
        load_params(tmp_path / "params.yaml")
    params["candidates"][0]["train"] = {"ensemble": True, "seeds": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert load_params(tmp_path / "params.yaml").train_for(_first(tmp_path)).ensemble


def _first(root: Path):
    return load_params(root / "params.yaml").candidates[0]


@pytest.mark.usefixtures("third_party_task")
@pytest.mark.parametrize("task", ["nocombine", "captioning"])
def test_a_task_that_cannot_average_models_is_named(tmp_path, task):
    set_params(tmp_path, {"ensemble": True, "seeds": 3}, {"column": "label", "type": task})
    with pytest.raises(ConfigError, match=f"the {task} task cannot average.*combine"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.usefixtures("third_party_task")
def test_a_third_party_task_without_the_hook_still_trains_without_ensemble(tmp_path, monkeypatch):
    monkeypatch.delenv("MMOPS_DB_URL", raising=False)
    project = prepared(write_project(tmp_path, {**TRAIN, "seeds": 2}, {"column": "label", "type": "nocombine"}))
    result = train_one(project, project.params.candidates[0])
    assert result["status"] == "completed", result
    assert "ensemble" not in result and isinstance(load_model(Path(result["model_dir"])), MultimodalModel)


# ---------------------------------------------------------------- the artifact, the metrics, the registry


def test_an_ensemble_is_saved_loaded_and_answers_with_its_members_mean_probability(trained, tmp_path):
    _, result = trained
    folder = Path(result["model_dir"])
    record = json.loads((folder / ENSEMBLE_FILE).read_text())
    assert record["members"] == [
        {"seed": 42, "path": "."},
        {"seed": 43, "path": "members/43"},
        {"seed": 44, "path": "members/44"},
    ]
    model = load_model(folder)
    assert isinstance(model, Ensemble) and model.seeds == [42, 43, 44] and model.labels == ["hi", "lo"]
    rows = [{"a": 0.3, "b": -1.2}, {"a": -0.1, "b": 0.4}, {"a": 2.0, "b": 1.0}]
    served = Predictor(folder, device="cpu").predict(rows, top_k=2)
    first = tmp_path / "first"  # the first member's own files, without the ensemble record beside them
    first.mkdir()
    for name in ("spec.json", "model.safetensors"):
        shutil.copy(folder / name, first / name)
    members = [Predictor(f, device="cpu") for f in (first, folder / "members" / "43", folder / "members" / "44")]
    assert all(type(p.model) is MultimodalModel for p in members)  # each member is a normal artifact
    answers = [p.predict(rows, top_k=2) for p in members]
    for i, answer in enumerate(served):
        expected = {
            label: np.mean([next(t["probability"] for t in a[i]["top_k"] if t["answer"] == label) for a in answers])
            for label in ("hi", "lo")
        }
        assert {t["answer"]: t["probability"] for t in answer["top_k"]} == pytest.approx(expected, abs=2e-6)
    # Members differ (else the test proves nothing).
    assert answers[0] != answers[1] or answers[0] != answers[2]


def test_the_ensembles_own_metrics_rank_it_and_its_members_stay_recorded(trained):
    project, result = trained
    from mmops.training.loop import Dataset, evaluate_split

    folder = Path(result["model_dir"])
    data = Dataset.load(project.prepared_dir, project.features_dir, project.params)
    own = evaluate_split(load_model(folder), data, "test", 32)[0]
    assert result["metrics"]["test"]["accuracy"] == pytest.approx(own["accuracy"])
    assert result["final"]["test_accuracy"] == pytest.approx(own["accuracy"])
    assert len(pd.read_parquet(folder / "predictions_test.parquet")) == own["n"]  # the ensemble's predictions
    seeds = result["seeds"]
    assert [s["seed"] for s in seeds] == [42, 43, 44]
    for key in ("val_accuracy", "test_accuracy"):
        values = [s[key] for s in seeds]
        assert result["ensemble"]["mean"][key] == pytest.approx(np.mean(values))
        assert result["ensemble"]["std"][key] == pytest.approx(np.std(values, ddof=1))
    assert "final_std" not in result  # no ± beside the ensemble's own figure: the spread is its members'
    assert json.loads((folder / "result.json").read_text())["ensemble"]["members"] == 3

    write_metrics(project, [result], result)
    [row] = json.loads((project.metrics_dir / "leaderboard.json").read_text())
    assert row["ensemble"] == 3 and row["seeds"] == 3
    assert row["test_accuracy"] == pytest.approx(own["accuracy"])
    assert row["members_test_accuracy"] == pytest.approx(result["ensemble"]["mean"]["test_accuracy"])
    assert row["members_val_accuracy_std"] == pytest.approx(result["ensemble"]["std"]["val_accuracy"])
    assert "test_accuracy_std" not in row
    single = model_size({"model_dir": str(folder / "members" / "43")})
    assert row["params"] == 3 * single  # an ensemble stores (and ties on) all its members' weights
    best = json.loads((project.metrics_dir / "best.json").read_text())
    assert best["test"]["accuracy"] == pytest.approx(own["accuracy"])
    assert best["ensemble"] == {"members": 3, "seeds": [42, 43, 44]}
    assert best["seeds"]["mean"]["test_accuracy"] == pytest.approx(result["ensemble"]["mean"]["test_accuracy"])

    registry = Registry(project.db_url)
    logged = registry.get_run(result["run_id"]).final_metrics()
    assert logged["test_accuracy"] == pytest.approx(own["accuracy"])
    assert logged["members_test_accuracy"] == pytest.approx(result["ensemble"]["mean"]["test_accuracy"])
    assert logged["members_test_accuracy_std"] == pytest.approx(result["ensemble"]["std"]["test_accuracy"])
    assert "test_accuracy_std" not in logged

    from mmops.registry.lifecycle import seed_means

    version = registry.add_model_version("m", result["run_id"], metrics=result["final"])
    means, stds, n, members = seed_means(registry, version)  # champion/challenger: the ensemble's own figure
    assert means["accuracy"] == pytest.approx(own["accuracy"]) and (stds, n, members) == ({}, 1, 3)


def test_the_report_and_the_cli_leaderboard_say_a_row_is_an_ensemble(trained, monkeypatch):
    project, result = trained
    from rich.console import Console

    from mmops.cli import common, main
    from mmops.pipeline import write_run_report

    write_metrics(project, [result], result)
    page = write_run_report(project).read_text()
    assert "average of 3 seeds&#x27; models" in page and "the members: val_accuracy" in page
    console = Console(width=220, record=True)
    monkeypatch.setattr(main, "console", console)
    monkeypatch.setattr(common, "console", console)
    main.print_leaderboard([{**result, "status": "completed"}], "concat", "val_accuracy")
    out = console.export_text()
    assert "concat (ensemble of 3)" in out
    mean, std = result["ensemble"]["mean"]["val_accuracy"], result["ensemble"]["std"]["val_accuracy"]
    assert f"{result['final']['val_accuracy']:.4f} (members {mean:.4f} ± {std:.4f})" in out


def test_an_unchanged_ensemble_is_reused_and_retraining_without_it_leaves_a_plain_artifact(trained):
    project, result = trained
    folder = Path(result["model_dir"])
    again = train_one(project, project.params.candidates[0])
    assert again["reused"] and again["ensemble"] == result["ensemble"] and again["final"] == result["final"]
    set_params(project.root, {**TRAIN, "seeds": 2})
    plain = train_one(Project.at(project.root), _first(project.root))
    assert plain["status"] == "completed" and not plain["reused"], plain
    assert not (folder / ENSEMBLE_FILE).exists() and not (folder / "members").exists()
    model = load_model(folder)
    assert isinstance(model, MultimodalModel)
    assert plain["metrics"]["test"]["accuracy"] == pytest.approx(plain["seeds"][0]["test_accuracy"])
    assert math.isfinite(plain["final_std"]["test_accuracy"]) and "ensemble" not in plain


def test_a_plain_artifact_loads_exactly_as_before(trained):
    """load_model on a folder without ensemble.json is MultimodalModel.load: the same weights and outputs."""
    _, result = trained
    member = Path(result["model_dir"]) / "members" / "43"
    loaded, direct = load_model(member), MultimodalModel.load(member)
    assert type(loaded) is MultimodalModel and loaded.spec == direct.spec
    state = direct.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    inputs = {n: e.preprocess(np.array([[0.3], [-1.0]])) for n, e in loaded.encoders.items()}
    assert torch.equal(loaded(inputs), direct(inputs))


@pytest.mark.slow
def test_the_bento_of_an_ensemble_serves_the_ensemble(trained):
    """`mmops package` copies the whole folder into the model store; the bento answers as the ensemble
    does and `/model` says it is one (about a minute: a wheel, a bento, a server)."""
    import httpx
    from conftest import mmops, serve_bento

    project, result = trained
    write_metrics(project, [result], result)
    out = mmops(project.root, "package").stdout
    bento = out.split("bento ")[-1].strip()
    rows = [{"a": 0.3, "b": -1.2}, {"a": 2.0, "b": 1.0}]
    expected = Predictor(Path(result["model_dir"]), device="cpu").predict(rows, top_k=2)
    with serve_bento(project.root, bento) as (url, _):
        info = httpx.post(f"{url}/model", timeout=30).json()
        answers = httpx.post(f"{url}/predict_batch", json={"items": rows, "top_k": 2}, timeout=30).json()
    assert info["ensemble"] == {"members": 3, "seeds": [42, 43, 44]}
    assert [a["top_k"] for a in answers] == [e["top_k"] for e in expected]


def test_champion_challenger_takes_an_ensemble_as_one_model_with_its_own_figure(tmp_path):
    """Against a 3-seed champion on the same data, an ensemble challenger is judged on its own figure
    (0.90), not its members' mean (0.84); two ensembles are left to their own evaluations."""
    from mmops.registry.lifecycle import _compare_means

    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}")

    def version(ensemble: bool, test: float, members: float | None = None):
        run = registry.start_run("c", {"train": {"seeds": 3, "ensemble": ensemble}}, 42, {"prepare:x": "ab"}, None)
        registry.log_metrics(run, {"test_accuracy": test, "test_accuracy_std": 0.02} if not ensemble else {})
        if ensemble:
            registry.log_metrics(run, {"test_accuracy": test, "members_test_accuracy": members})
        registry.finish_run(run, "completed", 1.0)
        return registry.add_model_version("m", run, metrics={"test_accuracy": test})

    champion, challenger = version(False, 0.86), version(True, 0.90, members=0.84)
    new, old, note = _compare_means(registry, challenger, champion, "accuracy")
    assert (new["accuracy"], old["accuracy"]) == (0.90, 0.86)
    assert "the ensemble of 3 seeds' models" in note and "0.8600 ± 0.0200 (3 seeds)" in note
    assert _compare_means(registry, version(True, 0.91, members=0.85), challenger, "accuracy") is None
