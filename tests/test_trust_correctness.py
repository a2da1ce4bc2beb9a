"""Issue 17, correctness: reuse notices code changes, selection does not depend on timing, a failed rerun
never demotes production. Training is stubbed (these are about the decisions around it), so each test
takes a second or two."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from mmops import pipeline
from mmops.core import plugin_registry
from mmops.project import Project
from mmops.registry import lifecycle
from mmops.registry.store import Registry

REPO = Path(__file__).resolve().parent.parent

FUSION = """from mmops_plugins.fusions.concat import ConcatFusion


class AcmeConcat(ConcatFusion):
    scale = {scale}
"""


def install_fusion_package(site: Path, scale: int = 1) -> Path:
    """A real, installed third-party distribution (``acme-fuse 1.0``) providing fusion ``acme_concat``."""
    package = site / "acme_fuse"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "fusion.py").write_text(FUSION.format(scale=scale))
    info = site / "acme_fuse-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-fuse\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mmops.fusions]\nacme_concat = acme_fuse.fusion:AcmeConcat\n")
    (info / "top_level.txt").write_text("acme_fuse\n")
    return package / "fusion.py"


@pytest.fixture
def acme(tmp_path, monkeypatch) -> Path:
    source = install_fusion_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    plugin_registry.discover.cache_clear()
    plugin_registry._load.cache_clear()
    yield source
    plugin_registry.discover.cache_clear()
    plugin_registry._load.cache_clear()


def write_params(root: Path, candidates: list[dict]) -> Project:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["candidates"] = candidates
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return Project.at(root)  # a new Project: params are read once per instance


class StubTraining:
    """Stands in for the training loop: records who trained, fails on request, writes a weights file
    whose size is ``sizes[name]`` parameters."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.sizes: dict[str, int] = {}

    def __call__(self, params, candidate, data, out_dir: Path, **_) -> dict:
        self.calls.append(candidate.name)
        if candidate.name in self.fail:
            raise FloatingPointError(f"candidate '{candidate.name}': loss diverged at epoch 1")
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(
            {"w": np.zeros(self.sizes.get(candidate.name, 10), dtype=np.float32)}, str(out_dir / "model.safetensors")
        )
        scores = {"accuracy": 0.8, "macro_f1": 0.8}
        return {
            "candidate": candidate.name,
            "fusion": candidate.fusion,
            "task": "classification",
            "model_dir": str(out_dir),
            "train_seconds": float(len(self.calls)),
            "history": [],
            "metrics": {"val": dict(scores), "test": dict(scores)},
        }


@pytest.fixture
def stub(monkeypatch) -> StubTraining:
    from mmops.training import loop

    monkeypatch.delenv("MMOPS_DB_URL", raising=False)
    training = StubTraining()
    monkeypatch.setattr(loop, "train_candidate", training)
    monkeypatch.setattr(loop.Dataset, "load", classmethod(lambda cls, *args, **kwargs: None))
    return training


def select(results: list[dict]) -> dict:
    # select_best takes the metric's direction as an argument once tasks are plugins.
    args = ["val_accuracy", 1.0] if "sign" in inspect.signature(pipeline.select_best).parameters else ["val_accuracy"]
    return pipeline.select_best(results, *args)


# ---------------------------------------------------------------- 1. reuse notices code changes


def test_changing_a_plugins_code_retrains_its_candidate_and_nothing_else(tmp_path, acme, stub):
    candidates = [{"name": "acme", "fusion": "acme_concat"}, {"name": "plain", "fusion": "concat"}]
    project = write_params(tmp_path / "proj", candidates)
    first = [pipeline.train_one(project, c) for c in project.params.all_candidates()]
    assert [r["reused"] for r in first] == [False, False]
    code = Registry(project.db_url).get_run(first[0]["run_id"]).config["code"]
    assert set(code) == {"acme-fuse 1.0", "mmops 0.1.0"} and all(len(h) == 16 for h in code.values())
    assert "acme-fuse 1.0" not in Registry(project.db_url).get_run(first[1]["run_id"]).config["code"]

    project = write_params(tmp_path / "proj", candidates)
    again = [pipeline.train_one(project, c) for c in project.params.all_candidates()]
    assert [r["reused"] for r in again] == [True, True] and stub.calls == ["acme", "plain"]

    acme.write_text(FUSION.format(scale=2))  # a plugin release (or an edit) that keeps its version number
    project = write_params(tmp_path / "proj", candidates)
    third = [pipeline.train_one(project, c) for c in project.params.all_candidates()]
    assert [r["reused"] for r in third] == [False, True] and stub.calls == ["acme", "plain", "acme"]
    new_code = Registry(project.db_url).get_run(third[0]["run_id"]).config["code"]
    assert new_code["acme-fuse 1.0"] != code["acme-fuse 1.0"] and new_code["mmops 0.1.0"] == code["mmops 0.1.0"]


def test_plugin_code_is_fingerprinted_after_dask_distributed_is_imported(tmp_path, acme, monkeypatch):
    """Importing ``distributed`` (the Dask runner does, in the process that trains) puts the
    ``importlib_metadata`` backport's finder on ``sys.meta_path``: entry points then carry the backport's
    distribution objects, and the plugin's package must still be in the candidate's code fingerprint."""
    import importlib
    import sys

    pytest.importorskip("distributed")
    importlib.import_module("distributed")
    finders = [f for f in sys.meta_path if hasattr(f, "find_distributions")]
    assert any("importlib_metadata" in getattr(f, "__module__", "") for f in finders), finders  # the case tested
    plugin_registry.discover.cache_clear()
    project = write_params(tmp_path / "proj", [{"name": "acme", "fusion": "acme_concat"}])
    [candidate] = project.params.all_candidates()
    assert set(pipeline.candidate_code(project, candidate)) == {"acme-fuse 1.0", "mmops 0.1.0"}


# ---------------------------------------------------------------- 2. deterministic selection


def _result(name: str, val: float, seconds: float, size: int | None, root: Path) -> dict:
    model_dir = root / name
    if size is not None:
        model_dir.mkdir(parents=True)
        save_file({"w": np.zeros(size, dtype=np.float32)}, str(model_dir / "model.safetensors"))
    return {
        "candidate": name,
        "status": "completed",
        "final": {"val_accuracy": val},
        "train_seconds": seconds,
        "model_dir": str(model_dir),
    }


def test_ties_on_val_go_to_fewer_parameters_then_name_never_to_wall_time(tmp_path):
    big_fast = _result("big", 0.9, 1.0, 1000, tmp_path)
    small_slow = _result("small", 0.9, 50.0, 10, tmp_path)
    worse = _result("worse", 0.8, 0.1, 1, tmp_path)
    for order in ([big_fast, small_slow, worse], [worse, small_slow, big_fast]):
        assert select(order)["candidate"] == "small"
    # Same size: the name decides, whichever trained faster or came first.
    b, a = _result("b", 0.9, 1.0, 10, tmp_path), _result("a", 0.9, 9.0, 10, tmp_path)
    assert select([b, a])["candidate"] == select([a, b])["candidate"] == "a"
    # A candidate without an artifact to measure loses the tie, never crashes it.
    assert select([_result("gone", 0.9, 0.1, None, tmp_path), a])["candidate"] == "a"
    assert "fewer parameters" in pipeline.TIE_BREAK and pipeline.model_size(small_slow) == 10


# ---------------------------------------------------------------- 4. a failed rerun never demotes production


def test_a_rerun_whose_new_candidates_all_fail_leaves_production_untouched(tmp_path, stub, monkeypatch):
    from mmops.serving import package

    monkeypatch.setattr(package, "save_to_store", lambda model_dir, name, **_: f"{name}:stored")

    def evaluate(model_dir: Path, project: Project) -> dict:
        return {"accuracy": 0.9, "macro_f1": 0.9}

    stub.sizes = {"concat": 10, "product": 20}
    candidates = [{"name": "concat", "fusion": "concat"}, {"name": "product", "fusion": "product"}]
    project = write_params(tmp_path / "proj", candidates)
    results = [pipeline.train_one(project, c) for c in project.params.all_candidates()]
    best = select(results)
    shipped = pipeline.register_and_package(project, best, build=False)
    first = lifecycle.champion_challenger(project, shipped["model_version"], Path(best["model_dir"]), evaluate)
    assert first.decision == "promoted"
    registry = Registry(project.db_url)
    name = project.params.registry.model_name
    events = len(registry.events(name))

    # The rerun: a new candidate is added and fails; the others are unchanged, so reused.
    stub.fail = {"new"}
    new = {"name": "new", "fusion": "concat", "params": {"hidden": 3}}
    project = write_params(tmp_path / "proj", [*candidates, new])
    results = [pipeline.train_one(project, c) for c in project.params.all_candidates()]
    assert [r["status"] for r in results] == ["completed", "completed", "failed"]
    best = select(results)
    shipped_again = pipeline.register_and_package(project, best, build=False)
    assert shipped_again["model_version"] == shipped["model_version"]  # the production version itself
    second = lifecycle.champion_challenger(project, shipped_again["model_version"], Path(best["model_dir"]), evaluate)
    assert second.decision == "kept" and "production unchanged" in second.summary()
    production = registry.production(name)
    assert production is not None and production.ref == shipped["model_version"]
    assert len(registry.events(name)) == events  # nothing moved, nothing to record


class SeededStub(StubTraining):
    """Test accuracy by candidate and seed: ``scores[name][k]`` for the k-th seed."""

    def __init__(self, scores: dict[str, list[float]], base_seed: int) -> None:
        super().__init__()
        self.scores, self.base_seed = scores, base_seed

    def __call__(self, params, candidate, data, out_dir: Path, **kwargs) -> dict:
        result = super().__call__(params, candidate, data, out_dir, **kwargs)
        value = self.scores[candidate.name][params.seed - self.base_seed]
        result["metrics"] = {split: {"accuracy": value, "macro_f1": value} for split in ("val", "test")}
        return {**result, "seed": params.seed, "best_epoch": 1}


def test_champion_challenger_compares_seed_means_on_the_same_data(tmp_path, monkeypatch):
    """With ``train.seeds: 3`` a challenger whose first seed is lucky (0.95 against the champion's 0.90)
    but whose mean is lower (0.85 against 0.90) is staged, and one whose mean is higher is promoted;
    the single models' figures stay in the event as evidence."""
    from mmops.serving import package
    from mmops.training import loop

    monkeypatch.delenv("MMOPS_DB_URL", raising=False)
    monkeypatch.setattr(loop.Dataset, "load", classmethod(lambda cls, *args, **kwargs: None))
    import importlib

    # The model store, stood in for: a stored model is its candidate's folder. (``bentoml.models`` is a
    # lazy loader; the function lives in the module it loads.)
    store = importlib.import_module("bentoml.models")
    monkeypatch.setattr(package, "save_to_store", lambda model_dir, name, **_: f"{Path(model_dir).name}:stored")
    monkeypatch.setattr(store, "get", lambda tag: SimpleNamespace(path=str(models / tag.split(":")[0])))
    project = write_params(tmp_path / "proj", [{"name": "champ", "fusion": "concat"}])
    models = project.models_dir
    stub = SeededStub(
        {"champ": [0.90, 0.90, 0.90], "lucky": [0.95, 0.80, 0.80], "steady": [0.93, 0.93, 0.93]}, project.params.seed
    )
    monkeypatch.setattr(loop, "train_candidate", stub)
    (tmp_path / "proj" / "dvc.lock").write_text(
        yaml.safe_dump({"schema": "2.0", "stages": {"prepare": {"outs": [{"path": "data/prepared", "md5": "ab"}]}}})
    )

    def evaluate(model_dir: Path, project: Project) -> dict:  # the first seed's model, as saved
        value = stub.scores[Path(model_dir).name][0]
        return {"accuracy": value, "macro_f1": value}

    def ship(name: str) -> lifecycle.Outcome:
        params = yaml.safe_load((tmp_path / "proj" / "params.yaml").read_text())
        params["candidates"], params["train"]["seeds"] = [{"name": name, "fusion": "concat"}], 3
        (tmp_path / "proj" / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        current = Project.at(tmp_path / "proj")
        [result] = [pipeline.train_one(current, c) for c in current.params.all_candidates()]
        shipped = pipeline.register_and_package(current, result, build=False)
        return lifecycle.champion_challenger(current, shipped["model_version"], Path(result["model_dir"]), evaluate)

    assert ship("champ").decision == "promoted"
    lucky = ship("lucky")
    assert lucky.decision == "staged", lucky.summary()
    assert (lucky.challenger_score, lucky.champion_score) == (pytest.approx(0.85), pytest.approx(0.90))
    assert "means over seeds on the same data" in lucky.reason and "(3 seeds)" in lucky.reason
    event = Registry(project.db_url).events(project.params.registry.model_name)[-1]
    assert event.details["challenger_metrics"]["accuracy"] == 0.95  # the single model, kept as evidence
    steady = ship("steady")
    assert steady.decision == "promoted" and steady.challenger_score == pytest.approx(0.93), steady.summary()


# ---------------------------------------------------------------- 20. rare labels never become silent classes


def _prepare_labels(tmp_path, rows: list[dict], caplog):
    import json
    import logging

    import pandas as pd

    from mmops.config import Params
    from mmops.data.prepare import prepare

    raw = tmp_path / "raw"
    raw.mkdir()
    pd.DataFrame(rows).to_csv(raw / "manifest.csv", index=False)
    params = Params.model_validate(
        {
            "inputs": {"text": {"modality": "text", "encoder": "bow_text"}, "width": {"modality": "number"}},
            "target": "label",
            "candidates": [{"name": "c", "fusion": "concat"}],
        }
    )
    with caplog.at_level(logging.WARNING, logger="mmops.data.prepare"):
        summary = prepare(raw, tmp_path / "out", params, appended_dir=tmp_path / "none")
    labels = json.loads((tmp_path / "out" / "labels.json").read_text())
    prepared = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    # Never a class without a train row: every label the model gets has one.
    assert set(prepared.loc[prepared.split == "train", "label"]) == set(range(len(labels)))
    return summary, labels, pd.read_csv(tmp_path / "out" / "quarantine.csv", dtype=str)


def test_a_label_seen_once_stays_in_train_and_is_warned_about_by_name(tmp_path, caplog):
    rows = [{"text": f"item {i}", "width": str(i), "label": "ab"[i % 2]} for i in range(60)]
    singletons = [f"once{i}" for i in range(8)]  # one row each: carved at random, most would leave train
    rows += [{"text": f"odd {s}", "width": "7", "label": s} for s in singletons]
    summary, labels, quarantine = _prepare_labels(tmp_path, rows, caplog)
    assert set(singletons) <= set(labels) and summary["rare_labels"] == singletons
    assert all(s in caplog.text for s in singletons)
    assert summary["kept"] == len(rows) and quarantine.empty
    assert summary["splits"]["test"] > 0 and summary["splits"]["val"] > 0


def test_a_label_only_outside_train_is_quarantined_by_name(tmp_path, caplog):
    rows = [{"text": f"item {i}", "width": str(i), "label": "ab"[i % 2], "split": "train"} for i in range(40)]
    rows += [{"text": f"test {i}", "width": str(i), "label": "ab"[i % 2], "split": "test"} for i in range(10)]
    rows += [{"text": f"new {i}", "width": "3", "label": "purple", "split": "test"} for i in range(2)]
    summary, labels, quarantine = _prepare_labels(tmp_path, rows, caplog)
    assert "purple" not in labels and summary["kept"] == 50 and summary["quarantined"] == 2
    assert list(quarantine["label"]) == ["purple", "purple"]
    for reason in quarantine["reason"]:
        assert "label 'purple' never seen in the train split (2 rows in val/test)" in reason
        assert "unknown target" in reason
