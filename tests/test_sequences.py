"""Issue 15: token sequences with masks, from the encoders through the feature cache to the fusions."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from mmops.config import Params, load_params
from mmops.core import conformance
from mmops.core.conformance import check_plugin
from mmops.core.interfaces import Encoder, Fusion, Tokens, as_tokens
from mmops.core.model import MultimodalModel
from mmops.core.plugin_registry import get_encoder

REPO = Path(__file__).resolve().parent.parent
ATTENDING = ["attention", "cross_attention", "film", "mm_transformer", "mult"]
TEXTS = ["what color is the shape?", "is there a red circle in the image?", "circle?"]


def _spec(inputs: dict[str, tuple], fusion: str, params: dict | None = None) -> dict:
    """``inputs``: name -> (modality, encoder, params[, extra input fields])."""
    items = {
        n: {"modality": t[0], "encoder": t[1], "params": t[2], **(t[3] if len(t) > 3 else {})}
        for n, t in inputs.items()
    }
    return {
        "candidate": "t",
        "labels": ["no", "yes", "red"],
        "image_size": 16,
        "target": "answer",
        "seed": 0,
        "inputs": items,
        "fusion": {"name": fusion, "params": params or {}},
        "head": {"hidden": 8, "dropout": 0.0},
    }


# --- the Tokens type ----------------------------------------------------------------------------------------------


def test_tokens_helpers_ignore_padding():
    values = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]], [[2.0, 0.0], [-5.0, 7.0], [9.0, 9.0]]])
    tokens = Tokens(values, torch.tensor([[True, True, False], [True, False, False]]))
    assert torch.equal(tokens.mean(), torch.tensor([[2.0, 2.0], [2.0, 0.0]]))
    padded = tokens.pad_to(5)
    assert padded.length == 5 and not padded.mask[:, 3:].any() and torch.equal(padded.mean(), tokens.mean())
    rows = tokens.split()
    assert [r.length for r in rows] == [2, 1]
    joined = Tokens.cat(rows)
    assert joined.length == 2 and torch.equal(joined.mean(), tokens.mean())
    picked = tokens.select(torch.tensor([1, 1, 0]))
    assert picked.batch == 3 and torch.equal(picked.mean()[2], tokens.mean()[0])
    assert torch.equal(Tokens.from_vector(torch.ones(4, 3)).mask, torch.ones(4, 1, dtype=torch.bool))
    assert torch.equal(tokens.padding_mask, ~tokens.mask)


def test_tokens_refuse_a_mask_of_the_wrong_shape_or_type():
    with pytest.raises(ValueError, match="mask must be bool"):
        Tokens(torch.zeros(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask must be bool"):
        Tokens(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="values must be"):
        Tokens(torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool))


def test_plain_tensors_from_older_encoders_are_wrapped():
    assert as_tokens(torch.zeros(2, 5, 3), "x").mask.all()
    assert as_tokens(torch.zeros(2, 3), "x").length == 1
    with pytest.raises(ValueError, match="enc: forward_sequence must return Tokens"):
        as_tokens([1, 2], "enc")


# --- encoders -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params",
    [("hf_text", {}), ("gru_text", {"hidden": 8, "embedding_dim": 8}), ("word2vec_text", {"dim": 8, "epochs": 1})],
)
def test_text_encoders_give_one_real_token_per_word(name, params):
    encoder = get_encoder(name)(**params).fit(TEXTS).eval()
    with torch.no_grad():
        tokens = encoder.forward_sequence(encoder.preprocess(TEXTS))
    lengths = tokens.mask.sum(1).tolist()
    words = [len(t.split()) for t in TEXTS]
    if name == "hf_text":  # word pieces, with [CLS], [SEP] and the '?'
        assert lengths[0] > words[0] and lengths[1] > lengths[0] > lengths[2] > 1
    else:
        assert lengths == words
    assert tokens.length == max(lengths) and tokens.dim == encoder.output_dim


def test_hf_text_tokens_mean_is_its_sentence_vector():
    encoder = get_encoder("hf_text")()
    batch = encoder.preprocess(TEXTS)
    with torch.no_grad():
        assert torch.allclose(encoder.forward_sequence(batch).mean(), encoder(batch), atol=1e-6)


def test_mel_audio_masks_the_silence_that_pads_short_clips():
    from scipy.io import wavfile

    def wav(samples: int) -> bytes:
        buf = io.BytesIO()
        wavfile.write(buf, 16000, (np.random.default_rng(samples).standard_normal(samples) * 3000).astype(np.int16))
        return buf.getvalue()

    encoder = get_encoder("mel_audio")().eval()
    with torch.no_grad():
        tokens = encoder.forward_sequence(encoder.preprocess([wav(16000), wav(4000)]))
    full, short = tokens.mask.sum(1).tolist()
    assert full == tokens.length and 1 < short < full // 2


def test_cnn_positions_are_all_real():
    encoder = get_encoder("cnn_image")(channels=[4, 8])
    tokens = encoder.forward_sequence(encoder.preprocess(np.zeros((2, 16, 16, 3), np.uint8)))
    assert tokens.length == 16 and tokens.mask.all()


def test_cnn_token_grid_averages_positions_and_leaves_the_vector_alone():
    torch.manual_seed(0)
    full = get_encoder("cnn_image")(channels=[4, 8]).eval()
    pooled = get_encoder("cnn_image")(channels=[4, 8], token_grid=2).eval()
    pooled.load_state_dict(full.state_dict())
    batch = full.preprocess(np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8))
    with torch.no_grad():
        every, grid = full.forward_sequence(batch), pooled.forward_sequence(batch)
        assert grid.length == 4 and grid.mask.all()
        # The top-left token is the mean of the 2x2 positions it covers; the pooled vector is unchanged.
        corner = every.values.view(2, 4, 4, 8)[:, :2, :2].mean(dim=(1, 2))
        assert torch.allclose(grid.values[:, 0], corner, atol=1e-6)
        assert torch.equal(full(batch), pooled(batch))
    with pytest.raises(ValueError, match="token_grid"):
        get_encoder("cnn_image")(token_grid=-1)


class _OldStyleEncoder(Encoder):
    """A third-party encoder written before masks: forward_sequence returns a plain (B, T, D) tensor."""

    modality = "tabular"
    output_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(1, 4)

    def preprocess(self, values: Any) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).view(len(values), -1, 1)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.proj(batch).mean(1)

    def forward_sequence(self, batch: torch.Tensor) -> torch.Tensor:
        return self.proj(batch)

    def config(self) -> dict[str, Any]:
        return {}


class _VectorOnlyEncoder(_OldStyleEncoder):
    forward_sequence = Encoder.forward_sequence  # today's default: the vector as one token


@pytest.mark.parametrize("fusion", ATTENDING)
def test_encoders_written_against_the_old_interface_still_feed_attending_fusions(fusion):
    encoders = {"a": _OldStyleEncoder(), "b": _VectorOnlyEncoder()}
    spec = _spec({"a": ("tabular", "numeric", {}), "b": ("tabular", "numeric", {})}, fusion)
    model = MultimodalModel(spec, encoders).eval()
    x = {"a": torch.randn(3, 5, 1), "b": torch.randn(3, 2, 1)}
    with torch.no_grad():
        assert model(x).shape == (3, 3)


# --- fusions ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ATTENDING)
def test_attending_fusions_ignore_appended_padding_on_real_encoder_tokens(fusion):
    """The sequence half of `mmops plugins check`, on MiniLM word pieces and CNN positions."""
    spec = _spec({"question": ("text", "hf_text", {}), "image": ("image", "cnn_image", {"channels": [4, 8]})}, fusion)
    torch.manual_seed(0)
    model = MultimodalModel(spec).eval()
    images = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    question, image = model.encoders["question"], model.encoders["image"]
    with torch.no_grad():
        feats = {
            "question": question.forward_sequence(question.preprocess(TEXTS)),
            "image": image.forward_sequence(image.preprocess(images)),
        }
    conformance.assert_padding_invariant(model.fusion, feats, fusion)


class _MeansOverPadding(Fusion):
    """Attends, but averages over every position, padding included: what the fusions did before masks."""

    needs_sequences = True

    def __init__(self, dims: Mapping[str, int]) -> None:
        super().__init__(dims)
        self.names = sorted(dims)
        self.proj = nn.ModuleDict({n: nn.Linear(dims[n], 4) for n in self.names})
        self.output_dim = 4 * len(self.names)

    def forward(self, features: Mapping[str, Tokens]) -> torch.Tensor:
        self.check_inputs(features)
        return torch.cat([self.proj[n](features[n].values).mean(1) for n in self.names], dim=1)


def test_the_check_catches_a_fusion_that_attends_to_padding(monkeypatch):
    monkeypatch.setattr(conformance, "get_fusion", lambda name: _MeansOverPadding)
    checks = check_plugin("leaky", kind="fusion")
    failed = {c.name: c.detail for c in checks if not c.passed}
    assert {c.name for c in checks if c.passed} >= {"eval mode is deterministic", "builds with 2 and 3 inputs"}
    assert "3 appended padding tokens do not change the output" in failed
    assert "is the mask honoured?" in failed["3 appended padding tokens do not change the output"]


class _WrongShape(_MeansOverPadding):
    def forward(self, features: Mapping[str, Tokens]) -> torch.Tensor:
        return super().forward(features)[:, :3]


def test_a_fusion_returning_the_wrong_shape_is_named_with_its_package(monkeypatch):
    monkeypatch.setattr(conformance, "get_fusion", lambda name: _WrongShape)
    failed = {c.name: c.detail for c in check_plugin("attention", kind="fusion") if not c.passed}
    shape = next(d for n, d in failed.items() if n.startswith("output shape"))
    assert "fusion 'attention' (package mmops " in shape and "got (1, 3)" in shape

    import mmops.core.model as model_module

    monkeypatch.setattr(model_module, "get_fusion", lambda name: _WrongShape)
    model = MultimodalModel(
        _spec(
            {"a": ("tabular", "numeric", {"n_features": 2}), "b": ("tabular", "numeric", {"n_features": 2})},
            "attention",
        )
    ).eval()
    with pytest.raises(ValueError, match=r"fusion 'attention' \(package mmops .*\) returned \(2, 3\)"):
        model({"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)})


def test_a_missing_input_is_one_token_for_attending_fusions():
    spec = _spec(
        {
            "question": ("text", "gru_text", {"hidden": 4, "embedding_dim": 4}, {"missing": "learn"}),
            "image": ("image", "cnn_image", {"channels": [4]}),
        },
        "mm_transformer",
        {"width": 8, "heads": 2},
    )
    encoders = {
        "question": get_encoder("gru_text")(hidden=4, embedding_dim=4).fit(TEXTS),
        "image": get_encoder("cnn_image")(channels=[4]),
    }
    torch.manual_seed(0)
    model = MultimodalModel(spec, encoders).eval()
    images = np.zeros((2, 16, 16, 3), np.uint8)
    x = {"question": encoders["question"].preprocess(TEXTS), "image": encoders["image"].preprocess(images)}
    with torch.no_grad():
        some = model(x, {"question": torch.tensor([1, -1]), "image": torch.tensor([0, 1])})
        none = model({**x, "question": None}, {"question": torch.tensor([-1, -1]), "image": torch.tensor([0, 1])})
    assert torch.allclose(some[1], none[1], atol=1e-6)  # an absent row is the same whatever else is in the batch
    assert not torch.allclose(some[0], none[0], atol=1e-4)


# --- the feature cache --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Params]:
    from mmops.data.easyvqa import import_easy_vqa
    from mmops.data.prepare import prepare

    root = tmp_path_factory.mktemp("seq")
    params = load_params(REPO / "params.yaml")
    params = params.model_copy(update={"data": params.data.model_copy(update={"limit": 200, "image_size": 16})})
    import_easy_vqa(root / "raw", limit=200)
    prepare(root / "raw", root / "prepared", params)
    return root, params


def _with_fusion(params: Params, fusion: str, fusion_params: dict) -> Params:
    candidate = params.candidates[0].model_copy(update={"name": fusion, "fusion": fusion, "params": fusion_params})
    image = params.inputs["image"].model_copy(update={"params": {"channels": [4, 8]}})
    return params.model_copy(update={"candidates": [candidate], "inputs": {**params.inputs, "image": image}})


def test_frozen_minilm_tokens_are_cached_and_give_the_same_model_output(prepared, tmp_path):
    """A model computes the same whether or not MiniLM's word pieces came from the cache (float16 tolerance)."""
    from mmops.data.featurize import featurize
    from mmops.training.loop import Batcher, Dataset, build_spec, fit_encoders

    root, base = prepared
    params = _with_fusion(base, "mm_transformer", {"width": 32, "layers": 1, "heads": 2})
    cache = tmp_path / "cache"
    info = featurize(root / "prepared", tmp_path / "features", params, cache)["question"]
    assert info["tokens_key"].startswith("hf_text-tokens-") and info["tokens_key"] != info["key"]
    assert info["tokens"] > 3 * info["distinct"]  # real word pieces, not one token per question
    again = featurize(root / "prepared", tmp_path / "features2", params, cache)["question"]
    assert again["tokens_computed"] == 0 and again["computed"] == 0

    cached = Dataset.load(root / "prepared", tmp_path / "features", params)
    computed = Dataset.load(root / "prepared", tmp_path / "features", params, use_cache=False)
    assert "question" in cached.precomputed and "question" not in computed.precomputed
    rows = cached.split("val").head(40)
    spec = build_spec(params, params.candidates[0], cached.labels, cached.task)
    torch.manual_seed(0)
    model = MultimodalModel(spec, fit_encoders(spec, cached, cached.split("train"))).eval()
    outputs = []
    for data in (cached, computed):
        [(inputs, index, _, _)] = list(Batcher(data, rows, model.encoders, 64))
        if data is cached:
            assert inputs["question"].features_for(True).length > 1
        with torch.no_grad():
            outputs.append(model(inputs, index, data.precomputed))
    assert torch.allclose(outputs[0], outputs[1], atol=2e-3, rtol=1e-3)
    assert not torch.equal(outputs[0], outputs[1])  # float16 storage: close, not bit-identical


def test_tokens_are_cached_only_when_a_candidate_attends(prepared, tmp_path):
    from mmops.data.featurize import featurize, lacks_sequences
    from mmops.training.loop import Batcher, Dataset, build_spec, fit_encoders

    root, base = prepared
    params = _with_fusion(base, "concat", {"hidden": 8})
    info = featurize(root / "prepared", tmp_path / "features", params, tmp_path / "cache")["question"]
    assert "tokens" not in info and not list((tmp_path / "features").glob("*.tokens*"))
    # Features written for pooled vectors only, read by a model whose fusion attends: a clear error.
    attending = _with_fusion(base, "attention", {"hidden": 8, "heads": 2})
    assert lacks_sequences(tmp_path / "features", attending)  # so `mmops run` re-runs the stage
    assert not lacks_sequences(tmp_path / "features", params)
    data = Dataset.load(root / "prepared", tmp_path / "features", attending)
    spec = build_spec(attending, attending.candidates[0], data.labels, data.task)
    model = MultimodalModel(spec, fit_encoders(spec, data, data.split("train"))).eval()
    inputs, index, _, _ = next(iter(Batcher(data, data.split("val").head(8), model.encoders, 8)))
    with pytest.raises(RuntimeError, match=r"cached as pooled vectors only.*mmops data featurize"):
        model(inputs, index, data.precomputed)


def test_the_sweep_fusions_decide_too(prepared):
    from mmops.config import SweepConfig
    from mmops.data.featurize import needs_sequences

    _, base = prepared
    assert not needs_sequences(base)
    sweep = SweepConfig.model_validate({"fusion": ["concat", "mult"]})
    assert needs_sequences(base.model_copy(update={"sweep": sweep}))


def test_features_json_records_the_tokens(prepared, tmp_path):
    from mmops.data.featurize import featurize

    root, base = prepared
    featurize(root / "prepared", tmp_path / "f", _with_fusion(base, "film", {"hidden": 8}), tmp_path / "cache")
    entry = json.loads((tmp_path / "f" / "features.json").read_text())["question"]
    assert entry["tokens"]
    offsets = np.load(tmp_path / "f" / "question.tokens.offsets.npy")
    assert len(offsets) == entry["distinct"] + 1 and offsets[-1] == entry["tokens"]
    assert np.load(tmp_path / "f" / "question.tokens.npy", mmap_mode="r").dtype == np.float16


def test_token_store_keeps_ragged_sequences_across_shards(tmp_path):
    from mmops.data.cache import RaggedTokens, TokenStore

    rng = np.random.default_rng(0)
    rows = [
        Tokens(
            torch.from_numpy(rng.standard_normal((1, n, 3)).astype(np.float32)),
            torch.tensor([[True] * (n - 1) + [n % 2 == 1 or n == 1]]),
        )
        for n in (1, 4, 2, 5)
    ]
    store = TokenStore(tmp_path, "k")
    store.add(["a", "b"], RaggedTokens.from_tokens(Tokens.cat(rows[:2])))
    store.add(["c", "d"], RaggedTokens.from_tokens(Tokens.cat(rows[2:])))
    again = TokenStore(tmp_path, "k")  # reopened from disk
    assert len(again) == 4 and again.missing(["a", "e", "e"]) == ["e"]
    order = ["d", "a", "c", "d", "b"]
    written = again.write(order, tmp_path / "out", 3)
    batch = written.batch(np.arange(len(order)))
    for i, key in enumerate(order):
        expected = rows["abcd".index(key)].split()[0]  # cut after its last real token
        n = expected.length
        assert torch.equal(batch.mask[i, :n], expected.mask[0]) and not batch.mask[i, n:].any()
        assert torch.allclose(batch.values[i, :n], expected.values[0].half().float())
