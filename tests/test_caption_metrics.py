"""Caption metrics with five references per image equal pycocoevalcap's scorers called directly, and the
task counts every caption row of an image as a reference of that one image."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from mmops_plugins.tasks.captioning import CaptioningTask, caption_metrics
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

# Four images, five references each (as COCO has), lower case without punctuation (what pycocoevalcap's
# PTB tokenizer would leave), and one generated caption each.
REFERENCES = {
    "img1": [
        "a man riding a horse on a beach",
        "a person rides a brown horse along the sea",
        "a rider on a horse near the water",
        "man on horseback at the beach",
        "a horse and its rider by the ocean",
    ],
    "img2": [
        "two dogs playing in the snow",
        "a pair of dogs run through snow",
        "dogs playing outside in winter",
        "two puppies in the snow",
        "a couple of dogs play in a snowy field",
    ],
    "img3": [
        "a plate of food with broccoli",
        "broccoli and rice on a white plate",
        "a meal of rice and vegetables",
        "a dinner plate with broccoli and chicken",
        "food on a plate on a table",
    ],
    "img4": [
        "a red bus on a city street",
        "a double decker bus drives down the road",
        "a bus in traffic",
        "a red double decker bus",
        "the bus is parked by the curb",
    ],
}
GENERATED = {
    "img1": "a man riding a horse on the beach",
    "img2": "two dogs play in the snow",
    "img3": "a plate of rice and broccoli",
    "img4": "a red double decker bus",
}


def _direct() -> dict[str, float]:
    gts, res = REFERENCES, {k: [v] for k, v in GENERATED.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        **{f"bleu_{n + 1}": b for n, b in enumerate(bleu)},
        "rouge_l": Rouge().compute_score(gts, res)[0],
        "cider": Cider().compute_score(gts, res)[0],
    }


def test_metrics_equal_pycocoevalcap_on_five_references():
    ours = caption_metrics(REFERENCES, GENERATED)
    for name, value in _direct().items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name
    assert ours["exact_match"] == 0.25  # img4's caption is one of its references
    assert 0 < ours["bleu_4"] < ours["bleu_1"] <= 1 and ours["cider"] > 0


def test_the_task_takes_every_row_of_an_image_as_a_reference():
    """Twenty rows (image, caption), as the importers write them: the task's metrics on them, grouped by
    image, are the same figures as the direct call on four images with five references each."""
    keys = list(REFERENCES)
    task = CaptioningTask(
        labels=CaptioningTask().vocabulary(
            [CaptioningTask().parse(c) for refs in REFERENCES.values() for c in [*refs, *GENERATED.values()]]
        ),
        max_length=12,
    )
    rows = [(k, ref) for k in keys for ref in REFERENCES[k]]
    groups = np.array([keys.index(k) for k, _ in rows])
    targets = np.array([ref for _, ref in rows])
    generated = task.ids([GENERATED[k] for k, _ in rows])[:, 1:-1]
    scores = np.zeros((len(rows), 2 + task.max_length), dtype=np.float32)
    scores[:, 2 : 2 + generated.shape[1]] = generated
    metrics = task.evaluate(targets, scores, groups)
    assert metrics["images"] == 4 and metrics["n"] == 20
    for name, value in _direct().items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name
    # Without the grouping each row would have one reference: different (and wrong) figures.
    alone = task.evaluate(targets, scores)
    assert alone["cider"] != pytest.approx(metrics["cider"])


def test_short_captions_have_no_bleu_4_but_a_cider():
    """Three-word captions have no 4-gram: BLEU-4 of a right caption is about 0.03 (pycocoevalcap's tiny
    smoothing of an empty 4-gram count), BLEU-1 is 1 and CIDEr-D is high."""
    refs = {1: ["a blue circle", "a picture of a blue circle"], 2: ["a red square", "a square coloured red"]}
    out = caption_metrics(refs, {1: "a blue circle", 2: "a red square"})
    assert out["exact_match"] == 1.0 and out["bleu_1"] == pytest.approx(1.0)
    assert out["bleu_4"] < 0.05 and out["cider"] > 1.0


@pytest.mark.slow  # two Java start-ups: 10-45 s on a shared machine
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR runs in Java")
def test_meteor_equals_the_direct_call():
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    direct = scorer.compute_score(REFERENCES, {k: [v] for k, v in GENERATED.items()})[0]
    del scorer  # stops its Java process
    assert caption_metrics(REFERENCES, GENERATED, meteor=True)["meteor"] == pytest.approx(direct, abs=1e-9)
