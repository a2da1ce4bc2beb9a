"""Issue 14: where training runs. Device selection (MMOPS_DEVICE over train.device over auto) with clear
errors for a device this machine lacks, mixed precision (bf16 autocast on the CPU; fp16 with a gradient
scaler only on CUDA), device-independent checkpoints, and the device and precision on the registry run.

Written on a CPU-only machine: the CUDA paths are refused here with their reasons, and run for real by
scripts/gpu_check.sh where a GPU is lent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tinyproject import tiny_project

from mmops.core.devices import DeviceError, Precision, resolve_device, resolve_precision

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def test_device_comes_from_the_environment_then_the_config_then_auto(monkeypatch):
    monkeypatch.delenv("MMOPS_DEVICE", raising=False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    monkeypatch.setenv("MMOPS_DEVICE", "cpu")
    assert resolve_device("cuda") == torch.device("cpu")  # the machine's say wins over the project's
    monkeypatch.setenv("MMOPS_DEVICE", "cuda:1")
    with pytest.raises(DeviceError, match=r"MMOPS_DEVICE='cuda:1': CUDA is not available here \(a CPU-only build"):
        resolve_device("cpu")


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        ("cuda", r"train.device='cuda': CUDA is not available here .*set train.device to auto or cpu"),
        ("mps", r"train.device='mps': MPS \(Apple GPU\) is not available here"),
        ("tpu", r"train.device='tpu': not a device; use auto, cpu, cuda, cuda:N or mps"),
        ("meta", r"train.device='meta': mmops trains on cpu, cuda, cuda:N or mps"),
    ],
)
def test_a_device_this_machine_lacks_fails_with_the_reason(monkeypatch, asked, message):
    monkeypatch.delenv("MMOPS_DEVICE", raising=False)
    with pytest.raises(DeviceError, match=message):
        resolve_device(asked)


def test_precision_rules():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu).dtype is None and resolve_precision("fp32", cpu).scaler() is None
    bf16 = resolve_precision("bf16", cpu)
    assert bf16.dtype == torch.bfloat16 and bf16.scaler() is None  # bfloat16 needs no loss scaling
    with bf16.autocast():
        assert torch.nn.Linear(4, 2)(torch.ones(1, 4)).dtype == torch.bfloat16
    with pytest.raises(DeviceError, match=r"fp16' needs a CUDA device .* use bf16 on the CPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(DeviceError, match="use fp32, bf16 or fp16"):
        resolve_precision("fp8", cpu)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return tiny_project(tmp_path_factory.mktemp("devices") / "proj")


def _train(project_root: Path, **train) -> dict:
    from mmops import pipeline
    from mmops.project import Project

    proj = Project.at(project_root)
    candidate = proj.params.candidates[0]
    candidate = candidate.model_copy(update={"train": {**candidate.train, **train}})
    return pipeline.train_one(proj, candidate, force=True)


def _run_config(project_root: Path, run_id: str) -> dict:
    from mmops.project import Project
    from mmops.registry.store import Registry

    return Registry(Project.at(project_root).db_url).get_run(run_id).config


def test_bf16_trains_on_the_cpu_and_the_run_records_device_and_precision(project, monkeypatch):
    monkeypatch.delenv("MMOPS_DEVICE", raising=False)
    result = _train(project, precision="bf16")
    assert result["status"] == "completed", result.get("error")
    assert result["device"] == "cpu" and result["precision"] == "bf16"
    assert 0.3 < result["final"]["val_accuracy"] <= 1.0
    assert _run_config(project, result["run_id"])["runtime"] == {"device": "cpu", "precision": "bf16", "processes": 1}
    # Autocast computes in bfloat16 but the weights stay float32: the artifact is the same kind as fp32's.
    weights = load_file(str(Path(result["model_dir"]) / "model.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    assert all(t.device.type == "cpu" for t in weights.values())
    saved = json.loads((Path(result["model_dir"]) / "result.json").read_text())
    assert saved["precision"] == "bf16"


def test_the_fp16_scaler_path_steps_and_saves_float32_weights(project, monkeypatch):
    """fp16 is refused on the CPU; its GradScaler code path is run here on the CPU's own scaler."""
    from mmops.training import loop

    monkeypatch.delenv("MMOPS_DEVICE", raising=False)
    scaled = Precision("fp16", torch.device("cpu"), torch.float16, True)
    monkeypatch.setattr(loop, "resolve_precision", lambda name, device: scaled)
    result = _train(project, epochs=2)
    assert result["status"] == "completed", result.get("error")
    assert result["precision"] == "fp16" and result["history"][-1]["train_loss"] < 5
    weights = load_file(str(Path(result["model_dir"]) / "model.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}


def test_an_unavailable_device_fails_the_run_with_the_reason(project, monkeypatch):
    monkeypatch.setenv("MMOPS_DEVICE", "cuda")
    result = _train(project)
    assert result["status"] == "failed"
    assert "DeviceError: MMOPS_DEVICE='cuda': CUDA is not available here" in result["error"]
    assert _run_config(project, result["run_id"])["runtime"]["device"] == "auto (unavailable)"
