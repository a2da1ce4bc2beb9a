"""The caption decoder: masks keep the future and the padding out, beam search finds captions at least as
likely as greedy's, decoding constraints hold, and a model with a caption task trains and round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mmops_plugins.tasks.captioning import BOS, EOS, PAD, CaptioningTask, generate, normalize

from mmops.core.interfaces import Tokens
from mmops.core.model import MultimodalModel, build_input_encoder

CAPTIONS = ["a red circle", "a blue square", "a small red square", "a blue circle", "red"]


def _task(**params) -> CaptioningTask:
    probe = CaptioningTask()
    labels = probe.vocabulary([probe.parse(c) for c in CAPTIONS])
    return CaptioningTask(labels=labels, **params)


def _network(task: CaptioningTask, width: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return task.network({"image": 8}, width, 0.0).eval()


def _memory(rows: int = 3, length: int = 5, seed: int = 1) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    return Tokens.full(torch.randn(rows, length, 8, generator=g))


def test_tokenizer_vocabulary_and_round_trip():
    task = _task()
    assert task.labels[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert task.parse("A Red, circle.") == ("a", "red", "circle")
    ids = task.ids(["a red circle", "a green thing"])
    assert ids[0].tolist() == [BOS, *[task.labels.index(w) for w in ("a", "red", "circle")], EOS]
    assert task.text(ids[0][1:]) == "a red circle"
    assert task.text(ids[1][1:]) == "a <unk> <unk>"
    with pytest.raises(ValueError, match="no words"):
        task.parse(" ... ")


def test_minilm_word_pieces_detokenize():
    task = CaptioningTask(tokenizer="minilm")
    pieces = task.parse("A bluish circle")
    assert any(p.startswith("##") for p in pieces) or "bluish" in pieces
    assert task.detokenize(pieces) == "a bluish circle"


def test_decoder_is_causal_and_ignores_padding():
    task = _task()
    net = _network(task)
    memory = _memory(2)
    out = net({"image": memory})
    ids = torch.tensor([[BOS, 5, 6, 7], [BOS, 5, 8, 9]])
    logits = net.logits(out.memory, out.padding, ids)
    # The first two positions see the same prefix: the later, different tokens must not leak back.
    same_prefix = torch.tensor([[BOS, 5, 6, 7], [BOS, 5, 6, 7]])
    first = net.logits(out.memory[:1].expand(2, -1, -1), out.padding[:1].expand(2, -1), same_prefix)
    changed = net.logits(out.memory[:1].expand(2, -1, -1), out.padding[:1].expand(2, -1), ids)
    assert torch.allclose(first[:, :2], changed[:, :2], atol=1e-5)
    assert not torch.allclose(first[1, 2:], changed[1, 2:], atol=1e-5)
    # Padded memory positions change nothing, whatever they hold.
    padded = Tokens(
        torch.cat([memory.values, torch.randn(2, 3, 8) * 50], 1),
        torch.cat([memory.mask, torch.zeros(2, 3, dtype=torch.bool)], 1),
    )
    out_padded = net({"image": padded})
    assert torch.allclose(logits, net.logits(out_padded.memory, out_padded.padding, ids), atol=1e-5)
    # Padding in the caption (a shorter one) changes nothing before it.
    short = torch.tensor([[BOS, 5, PAD, PAD]])
    assert torch.allclose(net.logits(out.memory[:1], out.padding[:1], short)[:, :2], logits[:1, :2], atol=1e-5)


def _sequence_logprob(net, memory: Tokens, ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each row's ids (then eos, unless cut at the maximum length) by teacher forcing."""
    out = net({"image": memory})
    lengths = (ids != PAD).sum(1)
    full = torch.zeros((ids.shape[0], ids.shape[1] + 2), dtype=torch.long)
    full[:, 0] = BOS
    full[:, 1:-1] = ids
    full[torch.arange(len(ids)), lengths + 1] = EOS
    logp = net.logits(out.memory, out.padding, full[:, :-1]).log_softmax(-1)
    picked = logp.gather(2, full[:, 1:].unsqueeze(-1)).squeeze(-1)
    ended = lengths + (lengths < ids.shape[1]).long()  # a caption cut at max_length has no eos
    keep = torch.arange(full.shape[1] - 1).view(1, -1) < ended.view(-1, 1)
    return (picked * keep).sum(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_is_at_least_as_likely_as_greedy(seed):
    task = _task()
    net = _network(task, seed=seed)
    memory = _memory(6, seed=seed + 10)
    out = net({"image": memory})
    with torch.no_grad():
        g_ids, _, g_logp = generate(net, out.memory, out.padding, num_beams=1, max_length=6, length_penalty=0.0)
        b_ids, b_score, b_logp = generate(net, out.memory, out.padding, num_beams=5, max_length=6, length_penalty=0.0)
        assert torch.all(b_logp >= g_logp - 1e-4)
        assert torch.allclose(b_score, b_logp)
        # The reported log-probabilities are the decoder's own (teacher forcing agrees).
        assert torch.allclose(_sequence_logprob(net, memory, g_ids), g_logp, atol=1e-4)
        assert torch.allclose(_sequence_logprob(net, memory, b_ids), b_logp, atol=1e-4)


def test_decoding_constraints_and_batching():
    task = _task()
    net = _network(task, seed=3)
    memory = _memory(4)
    out = net({"image": memory})
    with torch.no_grad():
        ids, _, _ = generate(net, out.memory, out.padding, num_beams=3, max_length=8, min_length=5, no_repeat_ngram=1)
        for row in ids.tolist():
            words = [t for t in row if t != PAD]
            assert len(words) >= 5
            assert len(words) == len(set(words))  # no unigram repeats
        short, _, _ = generate(net, out.memory, out.padding, num_beams=2, max_length=2)
        assert short.shape == (4, 2)
        # A batch decodes each row as it would alone, and duplicated rows decode once, identically.
        alone = [
            generate(net, out.memory[i : i + 1], out.padding[i : i + 1], num_beams=3, max_length=6)[0] for i in range(4)
        ]
        twice = torch.cat([out.memory, out.memory[:2]])
        batch, _, _ = generate(net, twice, torch.cat([out.padding, out.padding[:2]]), num_beams=3, max_length=6)
        assert torch.equal(batch[:4], torch.cat(alone)) and torch.equal(batch[4:], batch[:2])


def test_exact_match_and_groups_use_every_reference():
    task = _task(num_beams=1, max_length=4)
    ids = task.ids(["a red circle", "a blue square"])[:, 1:-1]
    scores = np.zeros((3, 2 + 4), dtype=np.float32)
    scores[0, 2:5] = ids[0]
    scores[1, 2:5] = ids[0]  # same image as row 0: one example, two references
    scores[2, 2:5] = ids[1]
    targets = np.array(["red circle", "a red circle", "a blue circle"])
    metrics = task.evaluate(targets, scores, np.array([7, 7, 8]))
    assert metrics["images"] == 2 and metrics["exact_match"] == 0.5
    assert normalize("A red circle.") == "a red circle"


def _image_model(task: CaptioningTask) -> MultimodalModel:
    spec = {
        "candidate": "c",
        "labels": task.labels,
        "image_size": 16,
        "target": "caption",
        "seed": 0,
        "inputs": {"image": {"modality": "image", "encoder": "cnn_image", "params": {"channels": [8, 16]}}},
        "fusion": {"name": None, "params": {}},
        "head": {"hidden": 32, "dropout": 0.0},
        "task": {"name": "captioning", "params": task.config()},
    }
    torch.manual_seed(0)
    return MultimodalModel(spec, {"image": build_input_encoder(spec["inputs"]["image"])})


def test_a_caption_model_learns_two_images_and_round_trips(tmp_path):
    task = _task(num_beams=2, max_length=5)
    model = _image_model(task)
    assert model.needs_sequences
    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    images[0, ..., 0] = 255
    images[1, ..., 2] = 255
    batch = model.encoders["image"].preprocess(images)
    targets = np.array(["a red square", "a blue circle"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(80):
        loss = task.loss(model({"image": batch}), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = model.task.scores(model({"image": batch}))
    assert model.task.captions(scores.numpy()) == ["a red square", "a blue circle"]
    answers = model.task.answers(scores, 3)
    assert answers[0]["caption"] == "a red square" and answers[0]["score"] <= 0
    model.save(tmp_path / "m")
    loaded = MultimodalModel.load(tmp_path / "m")
    with torch.no_grad():
        again = loaded.task.scores(loaded({"image": batch}).with_options(num_beams=1))
    assert loaded.task.captions(again.numpy()) == ["a red square", "a blue circle"]


def test_captioning_passes_the_task_conformance_run():
    from mmops.core.conformance import check_plugin

    checks = check_plugin("captioning", "task")
    assert all(c.passed for c in checks), [f"{c.name}: {c.detail}" for c in checks if not c.passed]
