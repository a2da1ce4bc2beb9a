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


def _typo_params(tmp_path: Path) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["candidates"] = [
        {"name": "concat", "fusion": "concat", "params": {"hidden": 8}},
        {"name": "lrt", "fusion": "low_rank_tensor", "params": {"rnak": 4}},
        {"name": "mystery", "fusion": "no_such_fusion"},
    ]
    params["inputs"]["image"]["params"] = {"chanels": [8, 16]}
    params["sweep"] = {"fusion": ["concat", "low_rank_tensor"], "params": {"rank": [2, 4]}}
    return _write(tmp_path, params)


def test_unknown_plugins_and_plugin_parameters_are_named_by_key(tmp_path):
    from mmops.core.params import check_plugin_params, plugin_problems
    from mmops.core.plugin_registry import discover

    path = _typo_params(tmp_path)
    problems = plugin_problems(load_params(path))
    assert problems == [
        "inputs.image.params.chanels: unknown parameter of encoder 'cnn_image'; "
        "known: channels, augment, shift, rotate, scale, flip, token_grid",
        "candidates[1].params.rnak: unknown parameter of fusion 'low_rank_tensor'; known: hidden, rank, dropout, "
        "normalize",
        f"candidates[2].fusion: unknown fusion 'no_such_fusion'; known fusions: {', '.join(sorted(discover('fusion')))}"
        " (see `mmops plugins list`)",
        "sweep.params.rank: unknown parameter of fusion 'concat'; known: hidden, dropout",
    ]
    with pytest.raises(ConfigError, match=r"candidates\[1\]\.params\.rnak"):
        check_plugin_params(load_params(path))
    assert plugin_problems(load_params(REPO / "params.yaml")) == []


@pytest.mark.parametrize("command", [["data", "validate"], ["run"]])
def test_validate_and_run_reject_a_plugin_parameter_typo_before_any_stage(tmp_path, command):
    from conftest import mmops

    _typo_params(tmp_path)
    proc = mmops(tmp_path, *command, check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "candidates[1].params.rnak: unknown parameter of fusion 'low_rank_tensor'" in proc.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "dvc.lock").exists()  # nothing ran


def test_a_one_input_candidate_needs_no_fusion_in_the_plugin_check(tmp_path):
    from mmops.core.params import plugin_problems

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["candidates"].append({"name": "only-image", "inputs": ["image"]})
    assert plugin_problems(load_params(_write(tmp_path, params))) == []
