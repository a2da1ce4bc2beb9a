"""Writes the saved-model fixtures with the mmops of before the plugin changes they guard against.

Run it from a checkout of the parent of 0997d63 (mel_audio's new parameters; d0f88c6's fusion
normalisation came after it), so the artifacts are what a released mmops really saved::

    git worktree add --detach /tmp/oldmmops 0997d63^
    PYTHONPATH=/tmp/oldmmops .venv/bin/python tests/data/saved_models/make.py /tmp/oldmmops tests/data/saved_models
    git worktree remove /tmp/oldmmops

Each ``<name>/`` holds the artifact (``spec.json``, ``model.safetensors``), its inputs and the old
code's outputs on them (``expected.safetensors``); tests/test_saved_model_compat.py loads the artifact
with today's code and compares.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from scipy.io import wavfile

OLD, OUT = Path(sys.argv[1]), Path(sys.argv[2])
# The plugins are the package ``mmops_plugins`` (pyproject maps it to plugins/): take the old folder's.
spec_ = importlib.util.spec_from_file_location("mmops_plugins", OLD / "plugins" / "__init__.py",
                                               submodule_search_locations=[str(OLD / "plugins")])
plugins = importlib.util.module_from_spec(spec_)
sys.modules["mmops_plugins"] = plugins
spec_.loader.exec_module(plugins)

import mmops  # noqa: E402
from mmops.core.model import MultimodalModel  # noqa: E402

assert Path(mmops.__file__).is_relative_to(OLD), f"not the old mmops: {mmops.__file__}"

HEAD = {"hidden": 4, "dropout": 0.0}
FUSIONS = {"gated": {"hidden": 4}, "film": {"hidden": 4}, "low_rank_tensor": {"hidden": 4, "rank": 2},
           "tensor": {"hidden": 3}}


def spec(inputs: dict, fusion: str | None, params: dict) -> dict:
    return {"candidate": "old", "labels": ["a", "b", "c"], "image_size": 16, "target": "answer", "seed": 0,
            "inputs": inputs, "fusion": {"name": fusion, "params": params}, "head": HEAD}


def perturb(model: MultimodalModel) -> None:
    """Trained-looking weights: LayerNorm/BatchNorm affine and running statistics away from their init."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(0.3 * torch.randn(tensor.shape, generator=g))
                if "running_var" in name:
                    tensor.abs_().add_(0.5)


def save(name: str, model: MultimodalModel, raw: dict, tensors: dict) -> None:
    perturb(model)
    model.eval()
    folder = model.save(OUT / name)
    with torch.no_grad():
        batches = {n: model.encoders[n].preprocess(v) for n, v in raw.items()}
        tensors["logits"] = model(batches)
        if "audio" in batches:  # the frames fusions that attend get, and which are padding
            tokens = model.encoders["audio"].forward_sequence(batches["audio"])
            tensors.update(tokens=tokens.values, mask=tokens.mask.to(torch.uint8))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "expected.safetensors"))
    print(name, sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()), "bytes")


torch.manual_seed(0)
rows = np.random.default_rng(0).normal(size=(4, 3)).round(3).astype(np.float32)
for fusion, params in FUSIONS.items():
    numeric = {"modality": "tabular", "encoder": "numeric", "params": {"hidden": 4, "n_features": 3}}
    model = MultimodalModel(spec({"a": numeric, "b": numeric}, fusion, params))
    raw = {"a": rows.tolist(), "b": (rows[::-1] * 2).tolist()}
    save(fusion, model, raw, {"a": torch.from_numpy(rows), "b": torch.from_numpy(rows[::-1] * 2)})

# mel_audio at the old defaults (n_fft 400, hop 160, no normalisation, mean pooling): a tone, noise and a
# clip shorter than ``seconds`` (padding frames), as WAV bytes.
rate, clips = 8000, []
t = np.arange(800) / rate
for wave in (0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.random.default_rng(1).normal(size=800),
             0.3 * np.sin(2 * np.pi * 1000 * t[:500])):
    buffer = io.BytesIO()
    wavfile.write(buffer, rate, (wave * 32767).astype(np.int16))
    clips.append(buffer.getvalue())
audio = {"modality": "audio", "encoder": "mel_audio",
         "params": {"sample_rate": rate, "seconds": 0.1, "n_mels": 8, "channels": [2, 4]}}
model = MultimodalModel(spec({"audio": audio}, None, {}))
(OUT / "mel_audio").mkdir(parents=True, exist_ok=True)
for i, clip in enumerate(clips):
    (OUT / "mel_audio" / f"clip{i}.wav").write_bytes(clip)
save("mel_audio", model, {"audio": clips}, {})
