"""Models saved by an earlier mmops load with today's plugins and give the same outputs.

The artifacts in tests/data/saved_models were written by the code of before mel_audio's new parameters
(0997d63) and the fusions' normalisation (d0f88c6), with the expected outputs on fixed inputs
(tests/data/saved_models/make.py says how). Their specs lack the parameters added since: ``load``
takes each plugin's ``saved_before`` values for them, never the new defaults.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmops.core.model import MultimodalModel

SAVED = Path(__file__).parent / "data" / "saved_models"
FUSIONS = ["gated", "film", "low_rank_tensor", "tensor"]


def _inputs(name: str, expected: dict[str, torch.Tensor]) -> dict[str, object]:
    if name == "mel_audio":
        return {"audio": [(SAVED / name / f"clip{i}.wav").read_bytes() for i in range(3)]}
    return {"a": expected["a"].tolist(), "b": expected["b"].tolist()}


@pytest.mark.parametrize("name", [*FUSIONS, "mel_audio"])
def test_a_model_saved_by_the_old_code_gives_the_old_outputs(name):
    spec = json.loads((SAVED / name / "spec.json").read_text())
    expected = load_file(str(SAVED / name / "expected.safetensors"))
    model = MultimodalModel.load(SAVED / name, plugin_mismatch="ignore")
    raw = _inputs(name, expected)
    with torch.no_grad():
        batches = {n: model.encoders[n].preprocess(v) for n, v in raw.items()}
        torch.testing.assert_close(model(batches), expected["logits"], rtol=1e-5, atol=1e-6)
        if name == "mel_audio":
            tokens = model.encoders["audio"].forward_sequence(batches["audio"])
            torch.testing.assert_close(tokens.values, expected["tokens"], rtol=1e-5, atol=1e-6)
            assert torch.equal(tokens.mask, expected["mask"].bool())
    # The old spec really lacks the new parameters, and the loaded model took the old values for them.
    if name == "mel_audio":
        assert "normalize" not in spec["inputs"]["audio"]["params"]
        assert model.encoders["audio"].config()["normalize"] == "none"
    else:
        assert "normalize" not in spec["fusion"]["params"]
        assert model.fusion.config()["normalize"] is False


@pytest.mark.parametrize("name", FUSIONS)
def test_a_legacy_fusion_has_exactly_the_old_weights(name):
    """Legacy mode builds the old layers: the saved weights fit strictly, none missing, none extra."""
    saved = {
        k.removeprefix("fusion."): v
        for k, v in load_file(str(SAVED / name / "model.safetensors")).items()
        if k.startswith("fusion.")
    }
    model = MultimodalModel.load(SAVED / name, plugin_mismatch="ignore")
    assert set(model.fusion.state_dict()) == set(saved)


def test_a_saved_value_wins_and_new_models_keep_the_new_defaults(tmp_path):
    """``saved_before`` only fills gaps: a spec that names the parameter keeps its value, and a model saved
    today writes every parameter (the new normalisation on), so it loads as it was trained."""
    folder = tmp_path / "old"
    shutil.copytree(SAVED / "gated", folder)
    spec = json.loads((folder / "spec.json").read_text())
    new = MultimodalModel(
        {k: v for k, v in spec.items() if k != "fusion"} | {"fusion": {"name": "gated", "params": {"hidden": 4}}}
    )
    assert new.fusion.config()["normalize"] is True
    saved = new.save(tmp_path / "new")
    assert json.loads((saved / "spec.json").read_text())["fusion"]["params"]["normalize"] is True
    loaded = MultimodalModel.load(saved)
    assert isinstance(loaded.fusion.norm["a"], torch.nn.LayerNorm)
    x = {"a": torch.randn(2, 3), "b": torch.randn(2, 3)}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), new.eval()(x))
    # A spec that says normalize: true is built with the LayerNorms, so the old weights do not fit it.
    spec["fusion"]["params"]["normalize"] = True
    (folder / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="weights do not match spec"):
        MultimodalModel.load(folder, plugin_mismatch="ignore")
