"""Malformed configuration fails early, naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmops.config import ConfigError, load_params

REPO = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert {c.name for c in params.candidates} >= {"concat", "product"}
    assert params.select_metric.startswith("val_")


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda p: p["train"].update(epochs=0), "train.epochs"),
        (lambda p: p["train"].update(epohcs=3), "train.epohcs"),
        (lambda p: p["inputs"]["image"].update(modality="smell"), "inputs.image.modality"),
        (lambda p: p.update(candidates=[]), "candidates"),
        (lambda p: p.update(select_metric="test_accuracy"), "select_metric"),
        (lambda p: p["candidates"].append(dict(p["candidates"][0])), "unique"),
    ],
)
def test_invalid_values_name_the_key(tmp_path, mutate, needle):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(params)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_params(_write(tmp_path, params))


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(_write(tmp_path, "seed: [1, 2"))
    with pytest.raises(ConfigError, match="no params file"):
        load_params(tmp_path / "nope.yaml")
