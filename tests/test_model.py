"""The model artifact round-trips exactly, and the text encoder loads any checkpoint path."""

from __future__ import annotations

import shutil

import numpy as np
import torch
from mmops_plugins.encoders.hf_text import HFTextEncoder, resolve_checkpoint

from mmops.core.model import MultimodalModel
from mmops.serving.predictor import Predictor

SPEC = {
    "candidate": "t",
    "labels": ["no", "yes", "red"],
    "image_size": 16,
    "target": "answer",
    "seed": 0,
    "inputs": {
        "question": {"modality": "text", "encoder": "hf_text", "params": {}},
        "image": {"modality": "image", "encoder": "cnn_image", "params": {"channels": [4, 8]}},
    },
    "fusion": {"name": "concat", "params": {"hidden": 8}},
    "head": {"hidden": 8, "dropout": 0.0},
}


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = MultimodalModel(SPEC).eval()
    images = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    inputs = {
        "question": model.encoders["question"].preprocess(["is it red?", "what shape?"]),
        "image": model.encoders["image"].preprocess(images),
    }
    with torch.no_grad():
        before = model(inputs)
    model.save(tmp_path / "m")
    loaded = MultimodalModel.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(before, loaded(inputs))
    # Frozen encoder weights travel as assets, not duplicated in the safetensors file.
    assert (tmp_path / "m" / "assets" / "question" / "config.json").is_file()
    assert not any(k.startswith("encoders.question") for k in model.trainable_state())


def test_hf_text_loads_any_checkpoint_folder(tmp_path):
    copy = tmp_path / "my-checkpoint"
    shutil.copytree(resolve_checkpoint("default"), copy)
    a, b = HFTextEncoder(), HFTextEncoder(checkpoint=str(copy))
    with torch.no_grad():
        ea, eb = a(a.preprocess(["what color is the shape?"])), b(b.preprocess(["what color is the shape?"]))
    assert ea.shape == (1, 384) and torch.allclose(ea, eb)
    cls = HFTextEncoder(checkpoint=str(copy), pooling="cls")
    with torch.no_grad():
        assert not torch.allclose(cls(cls.preprocess(["what color is the shape?"])), ea)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="cannot load checkpoint"):
        HFTextEncoder(checkpoint=str(tmp_path / "absent"))


def test_predictor_caches_frozen_features_and_validates(tmp_path):
    import pytest

    from mmops.serving.predictor import InputError

    MultimodalModel(SPEC).save(tmp_path / "m")
    predictor = Predictor(tmp_path / "m")
    img = np.zeros((20, 20, 3), np.uint8)
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    out = predictor.predict([{"image": buf.getvalue(), "question": "is it red?"}] * 3)
    assert len(out) == 3 and out[0]["answer"] in SPEC["labels"]
    assert len(predictor._caches["question"].data) == 1  # identical questions encoded once
    with pytest.raises(InputError, match="question: must be a non-empty string"):
        predictor.predict([{"image": buf.getvalue(), "question": " "}])
    with pytest.raises(InputError, match="image: is required"):
        predictor.predict([{"question": "is it red?"}])
    with pytest.raises(InputError, match="audio: is not an input"):
        predictor.predict([{"image": buf.getvalue(), "question": "q", "audio": b""}])


def test_a_model_whose_fusion_attends_round_trips_and_serves_word_pieces_from_its_memo(tmp_path):
    """Frozen MiniLM feeding mm_transformer: the service memoises token sequences, not one vector."""
    from io import BytesIO

    from PIL import Image

    from mmops.core.interfaces import Tokens

    spec = {**SPEC, "fusion": {"name": "mm_transformer", "params": {"width": 16, "layers": 1, "heads": 2}}}
    torch.manual_seed(0)
    model = MultimodalModel(spec).eval()
    model.save(tmp_path / "m")
    predictor = Predictor(tmp_path / "m")
    images = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    pngs = []
    for img in images:
        buf = BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    questions = ["is it red?", "what shape is in the image?"]
    out = predictor.predict([{"image": p, "question": q} for p, q in zip(pngs, questions, strict=True)], top_k=3)
    memo = predictor._caches["question"].data
    assert len(memo) == 2 and all(isinstance(t, Tokens) and t.length > 3 for t in memo.values())
    inputs = {
        "question": model.encoders["question"].preprocess(questions),
        "image": model.encoders["image"].preprocess(images),
    }
    loaded = MultimodalModel.load(tmp_path / "m")
    with torch.no_grad():
        probs = torch.softmax(loaded(inputs), dim=1)
    for row, answer in zip(probs, out, strict=True):
        assert answer["answer"] == SPEC["labels"][int(row.argmax())]
        assert abs(answer["top_k"][0]["probability"] - float(row.max())) < 1e-5
