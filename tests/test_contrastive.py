"""The contrastive task: symmetric InfoNCE with same-target pairs masked, retrieval ranks worked by hand,
zero-shot from caption (prompt) embeddings, and a model built on the task-combines-inputs seam."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mmops_plugins.tasks.contrastive import ContrastiveTask, retrieval_ranks

from mmops.core.model import MultimodalModel, build_input_encoder
from mmops.core.tasks import build_task


def _task(labels=(), width=2, **kw) -> ContrastiveTask:
    return build_task("contrastive", {"width": width, **kw}, labels)


def _unit(*rows) -> np.ndarray:
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_loss_is_symmetric_infonce_with_the_temperature():
    task = _task()
    image = torch.tensor(_unit([1, 0], [0, 1]))
    text = torch.tensor(_unit([1, 0], [1, 1]))
    outputs = torch.cat([image, text], dim=1)
    scale = 1 / 0.07  # the initial temperature, as open_clip starts
    logits = scale * image @ text.T
    by_hand = -0.5 * (torch.log_softmax(logits, 1).diag().mean() + torch.log_softmax(logits, 0).diag().mean())
    assert torch.allclose(task.loss(outputs, np.array(["a", "b"], dtype=object)), by_hand, atol=1e-5)


def test_same_target_pairs_are_not_negatives():
    """Two captions of one image (same target): their cross pair is masked, so a perfect model has ~0 loss
    even though the captions' embeddings coincide; without the mask the loss would be log 2 per row."""
    task = _task()
    image = torch.tensor(_unit([1, 0], [1, 0], [0, 1]))
    text = torch.tensor(_unit([1, 0], [1, 0], [0, 1]))
    outputs = torch.cat([image, text], dim=1)
    masked = task.loss(outputs, np.array(["x", "x", "y"], dtype=object))
    unmasked = task.loss(outputs, np.array(["x", "z", "y"], dtype=object))
    assert masked.item() < 1e-3
    assert unmasked.item() == pytest.approx(2 / 3 * math.log(2), abs=1e-3)


def test_ranks_worked_by_hand():
    sim = np.array(
        [
            [0.9, 0.5, 0.1],  # positive at 0 is best: rank 1
            [0.8, 0.2, 0.7],  # positive at 1 is last: two negatives above, rank 3
            [0.3, 0.6, 0.4],
        ]
    )  # positives 0 and 2: best positive 0.4, one negative (0.6) above: rank 2
    positive = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1]], dtype=bool)
    assert retrieval_ranks(sim, positive).tolist() == [1, 3, 2]


def test_metrics_over_distinct_images_and_captions():
    """Rows: image A with two captions, image B with one, image C with one. Captions of A point at A,
    B's caption points nearer A than B, C's at C."""
    task = _task(labels=["A", "B", "C"], width=2)
    a, b, c = [1, 0], [0.6, 0.8], [-1, 0]
    ta1, ta2, tb, tc = [1, 0.05], [1, -0.05], [0.9, 0.3], [-1, 0.1]
    image = _unit(a, a, b, c)
    text = _unit(ta1, ta2, tb, tc)
    targets = np.array(["A", "A", "B", "C"], dtype=object)
    m = task.evaluate(targets, np.concatenate([image, text], axis=1))
    assert (m["images"], m["captions"], m["n"]) == (3, 4, 4)
    # i2t: A's best caption is its own (rank 1); B's own caption tb scores 0.6*0.95+0.8*0.32 ~ 0.82 while
    # A's captions score ~0.64: rank 1; C: rank 1.
    assert m["i2t_r1"] == 1.0 and m["i2t_mean_rank"] == 1.0
    # t2i: ta1, ta2 -> A (rank 1); tb scores A 0.95 > B 0.82: rank 2; tc -> C (rank 1).
    assert m["t2i_r1"] == pytest.approx(3 / 4) and m["t2i_r5"] == 1.0
    assert m["t2i_mean_rank"] == pytest.approx(5 / 4) and m["t2i_median_rank"] == 1.0
    assert m["recall_mean"] == pytest.approx((3 + 0.75 + 2) / 6)
    assert task.direction("t2i_mean_rank") == "min" and task.direction("i2t_r1") == "max"


def test_zero_shot_from_caption_prompts_and_unseen_classes():
    """Class embeddings are the mean of each class's captions; 'C' was not among the train labels."""
    task = _task(labels=["A", "B"], width=2)
    image = _unit([1, 0.1], [0.1, 1], [-1, 0], [-1, -0.2])
    text = _unit([1, 0], [0.2, 1], [-1, 0.3], [-1, -0.3])
    targets = np.array(["A", "B", "C", "C"], dtype=object)
    m = task.evaluate(targets, np.concatenate([image, text], axis=1))
    assert m["zeroshot_top1"] == 1.0 and m["zeroshot_classes"] == 3
    assert m["zeroshot_chance"] == pytest.approx(1 / 3)
    assert m["unseen_images"] == 2 and m["unseen_classes"] == 1 and m["unseen_top1"] == 1.0
    assert m["seen_i2t_r1"] == 1.0 and m["unseen_i2t_r1"] == 1.0
    described = task.describe(targets, np.concatenate([image, text], axis=1), m)
    assert described["prediction"] == ["A", "B", "C", "C"] and described["correct"].all()
    # Images of A and B swapped: each lands on the other's class (top-1 wrong), still within the top 5.
    swapped = task.evaluate(targets, np.concatenate([image[[1, 0, 2, 3]], text], 1))
    assert swapped["zeroshot_top1"] == pytest.approx(0.5) and swapped["zeroshot_top5"] == 1.0


def test_bad_parameters_and_towers_are_named():
    with pytest.raises(ValueError, match="templates"):
        build_task("contrastive", {"templates": ["a photo"]})
    with pytest.raises(ValueError, match="image_input"):
        _task().network({"picture": 4, "caption": 3}, 8, 0.0)


def test_a_two_tower_model_trains_both_towers_and_round_trips(tmp_path):
    spec = {
        "candidate": "clip",
        "labels": ["red circle", "blue square"],
        "image_size": 16,
        "target": "label",
        "seed": 0,
        "inputs": {
            "caption": {"modality": "text", "encoder": "bow_text", "params": {}},
            "image": {"modality": "image", "encoder": "cnn_image", "params": {"channels": [4, 8]}},
        },
        "fusion": {"name": None, "params": {}},
        "head": {"hidden": 8, "dropout": 0.0},
        "task": {"name": "contrastive", "params": {"width": 4}},
    }
    torch.manual_seed(0)
    encoders = {n: build_input_encoder(i) for n, i in spec["inputs"].items()}
    encoders["caption"].fit(["a red circle", "a blue square"])
    model = MultimodalModel(spec, encoders)
    images = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    inputs = {
        "caption": model.encoders["caption"].preprocess(["a red circle", "a blue square"]),
        "image": model.encoders["image"].preprocess(images),
    }
    outputs = model(inputs)
    assert outputs.shape == (2, 8)
    assert torch.allclose(outputs[:, :4].norm(dim=1), torch.ones(2), atol=1e-5)
    model.task.loss(outputs, np.array(["red circle", "blue square"], dtype=object)).backward()
    assert model.head.logit_scale.grad is not None and model.head.logit_scale.grad.abs() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders["image"].parameters())
    model.eval().save(tmp_path / "m")
    loaded = MultimodalModel.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(model(inputs), loaded(inputs))
    assert loaded.task.config() == {
        "image_input": "image",
        "text_input": "caption",
        "width": 4,
        "templates": ["a photo of a {}"],
    }
