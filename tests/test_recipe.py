"""The training recipe of issue 16: EMA weights, patience on a smoothed val metric, label smoothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mmops.config import Params
from mmops.core.model import MultimodalModel
from mmops.core.tasks import build_task
from mmops.data.prepare import prepare
from mmops.training.loop import Dataset, evaluate_split, train_candidate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2))
    label = np.where(x[:, 0] - x[:, 1] + rng.normal(scale=0.8, size=300) > 0, "p", "n")
    (folder / "raw").mkdir()
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "y": label}).to_csv(folder / "raw" / "manifest.csv", index=False)
    return folder


def _train(folder, name: str, **train) -> tuple[dict, Dataset]:
    params = Params.model_validate(
        {
            "data": {"source": "manifest"},
            "inputs": {"a": {"modality": "number"}, "b": {"modality": "number"}},
            "target": "y",
            "train": {"epochs": 8, "patience": 8, "batch_size": 32, "head_hidden": 16, **train},
            "candidates": [{"name": "c", "fusion": "concat"}],
        }
    )
    if not (folder / "prepared").exists():
        prepare(folder / "raw", folder / "prepared", params)
    data = Dataset.load(folder / "prepared", folder / "none", params, use_cache=False)
    return train_candidate(params, params.candidates[0], data, folder / name), data


def test_ema_weights_are_judged_and_saved(tiny):
    plain, _ = _train(tiny, "plain")
    averaged, data = _train(tiny, "ema", ema=0.9)
    best = max(h["val_accuracy"] for h in averaged["history"])
    assert averaged["metrics"]["val"]["accuracy"] == pytest.approx(best)  # the saved model is the judged one
    model = MultimodalModel.load(tiny / "ema")
    assert evaluate_split(model, data, "val", 64)[0]["accuracy"] == pytest.approx(best)
    plain_w = MultimodalModel.load(tiny / "plain").state_dict()
    assert any(not torch.equal(v, plain_w[k]) for k, v in model.state_dict().items())
    assert [h["train_loss"] for h in averaged["history"]][:1] == [h["train_loss"] for h in plain["history"]][:1]


def test_smoothing_one_is_the_old_early_stopping_and_more_waits_longer(tiny):
    base, _ = _train(tiny, "base", patience=1, epochs=12)
    same, _ = _train(tiny, "same", patience=1, epochs=12, smoothing=1)
    assert [h["val_accuracy"] for h in base["history"]] == [h["val_accuracy"] for h in same["history"]]
    patient, _ = _train(tiny, "smooth", patience=1, epochs=12, smoothing=4)
    assert patient["epochs_run"] >= base["epochs_run"]


def test_label_smoothing_softens_the_targets():
    logits = torch.tensor([[6.0, -6.0], [-6.0, 6.0]])
    targets = np.array([0, 1])
    hard = build_task("classification", {}, ["n", "p"])
    soft = build_task("classification", {"label_smoothing": 0.2}, ["n", "p"])
    assert soft.loss(logits, targets) > hard.loss(logits, targets) + 0.5
    assert soft.config() == {"label_smoothing": 0.2}
    with pytest.raises(Exception, match=r"label_smoothing must be in \[0, 1\)"):
        build_task("classification", {"label_smoothing": 1.5}, ["n", "p"])
