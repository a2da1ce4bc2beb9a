"""Contrastive image-text learning (CLIP): two towers, a shared embedding space, retrieval and zero-shot.

Each of the two inputs (``image_input``, ``text_input``) goes through its own encoder (trainable or
frozen) and a projection head to ``width`` dimensions, then L2 normalisation. The loss is open_clip's
symmetric InfoNCE: cross-entropy over ``exp(t) * image @ text.T`` both ways, with a learnable log
temperature ``t`` (initialised at log(1/0.07), capped at log(100)) and the other rows of the batch as
negatives.

**The target column says what makes a pair a match.** Two rows whose targets are equal are positives
of each other: for COCO that is the image id (each image and its five captions), for easy-VQA captions
the colour-shape class ("blue circle": many images share a caption), for Fashion-MNIST the class name.
Within a batch, a pair with the same target is therefore never used as a negative (several captions
of one image, or two images of one class, are not pushed apart); the caption is an input, never the
target. The train split's distinct targets are the task's labels, so evaluation knows which classes
were seen in training and reports zero-shot on the unseen ones apart.

**Metrics** (as open_clip's ``get_clip_metrics``, with several positives per query): over the split's
distinct images and distinct captions, the rank of the best-scoring positive among all candidates,
image->text and text->image: Recall@1/5/10 (higher is better), mean and median rank (lower is better).
**Zero-shot** classification: each class embedding is the normalised mean of its captions' embeddings
(the captions are written from prompt templates by the importers: class names x templates), each
image is assigned the nearest class: top-1/top-5 over all classes of the split, and top-1 for the
images of classes never seen in training (``unseen_top1``, against all classes: generalised zero-shot).
At serving time ``/zero_shot`` embeds the caller's labels through ``templates`` the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mmops.core.tasks import HIGHER, LOWER, Task

if TYPE_CHECKING:
    import torch
    from torch import nn

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # open_clip's initial temperature
MAX_LOGIT_SCALE = math.log(100.0)  # and its clamp: a sharper softmax only overfits
KS = (1, 5, 10)
DECIMALS = 4  # embeddings equal to this many decimals are one image (one caption) in the metrics


def _network_class() -> type:
    """Built lazily: tasks are read by the prepare stage, which must not import torch."""
    import torch
    from torch import nn

    class TwoTowers(nn.Module):
        """A projection head per tower to a shared width, L2-normalised, and the learnable temperature."""

        def __init__(
            self, dims: Mapping[str, int], towers: Sequence[str], hidden: int, width: int, dropout: float
        ) -> None:
            super().__init__()
            self.towers = list(towers)
            self.proj = nn.ModuleDict(
                {
                    name: nn.Sequential(
                        nn.Linear(dims[name], hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width)
                    )
                    for name in self.towers
                }
            )
            self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

        def embed(self, name: str, features: torch.Tensor) -> torch.Tensor:
            """One tower's unit vectors: what the index stores and what queries are."""
            return nn.functional.normalize(self.proj[name](features.float()), dim=-1)

        def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return torch.cat([self.embed(name, features[name]) for name in self.towers], dim=1)

        def scale(self) -> torch.Tensor:
            return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    return TwoTowers


def _distinct(vectors: np.ndarray) -> np.ndarray:
    """Row positions of the distinct vectors (first occurrence): an image with three captions is one query."""
    _, first = np.unique(np.round(vectors, DECIMALS), axis=0, return_index=True)
    return np.sort(first)


def retrieval_ranks(sim: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """For each query (row), the 1-based rank of its best-scoring positive: 1 + the negatives above it.

    A query without any positive among the candidates gets rank ``n_candidates + 1`` (never retrieved).
    """
    best = np.where(positive, sim, -np.inf).max(axis=1, keepdims=True)
    return 1 + ((sim > best) & ~positive).sum(axis=1)


def rank_metrics(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_r{k}": float((ranks <= k).mean()) for k in KS}
    out[f"{prefix}_mean_rank"] = float(ranks.mean())
    out[f"{prefix}_median_rank"] = float(np.floor(np.median(ranks)))
    return out


def class_embeddings(text: np.ndarray, classes: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Per class, the normalised mean of its captions' (prompts') unit vectors, as open_clip averages prompts."""
    names = sorted(set(classes.tolist()))
    means = np.stack([text[classes == c].mean(axis=0) for c in names])
    return names, means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)


class ContrastiveTask(Task):
    metrics: ClassVar[Mapping[str, str]] = {
        "recall_mean": HIGHER,
        **{f"{d}_r{k}": HIGHER for d in ("i2t", "t2i") for k in KS},
        **{f"{d}_{m}": LOWER for d in ("i2t", "t2i") for m in ("mean_rank", "median_rank")},
        "zeroshot_top1": HIGHER,
        "zeroshot_top5": HIGHER,
    }
    example_targets: ClassVar[tuple[str, ...]] = ("red circle", "blue box", "red circle", "green star", "blue box")
    combines_inputs = True
    example_inputs: ClassVar[tuple[str, ...]] = ("image", "caption")  # the default towers' names

    def __init__(
        self,
        labels: Sequence[str] = (),
        image_input: str = "image",
        text_input: str = "caption",
        width: int = 128,
        templates: Sequence[str] = ("a photo of a {}",),
    ) -> None:
        super().__init__(labels)
        if image_input == text_input:
            raise ValueError(f"image_input and text_input are both '{image_input}': name the two towers' inputs")
        if width < 2:
            raise ValueError(f"width {width}: the shared embedding needs at least 2 dimensions")
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise ValueError(f"templates {bad or list(templates)}: each needs exactly one '{{}}' for the label")
        self.image_input, self.text_input, self.width = image_input, text_input, int(width)
        self.templates = list(templates)
        self.net: nn.Module | None = None

    # ------------------------------------------------------------------ target column
    def vocabulary(self, train_values: Iterable[Any]) -> list[str]:
        """The classes (or image ids) seen in training: zero-shot metrics single out the others."""
        return sorted({str(v) for v in train_values})

    def encode(self, value: Any, index: Mapping[str, int]) -> str:
        return str(value)  # any target is fine outside train: a held-out class is the point of zero-shot

    def targets(self, stored: Sequence[Any]) -> np.ndarray:
        return np.asarray([str(s) for s in stored], dtype=object)

    # ------------------------------------------------------------------ network and loss
    @property
    def output_dim(self) -> int:
        return 2 * self.width

    def network(self, dims: Mapping[str, int], hidden: int, dropout: float) -> nn.Module:
        towers = [self.image_input, self.text_input]
        if sorted(dims) != sorted(towers):
            raise ValueError(
                f"task 'contrastive' has towers {towers} but the model's inputs are {sorted(dims)}; "
                "set target.params.image_input and text_input to the two inputs' names"
            )
        self.net = _network_class()(dims, towers, hidden, self.width, dropout)
        return self.net

    def split(self, outputs: torch.Tensor | np.ndarray) -> tuple[Any, Any]:
        """Image and text unit vectors of each row."""
        return outputs[:, : self.width], outputs[:, self.width :]

    def loss(self, outputs: torch.Tensor, targets: np.ndarray) -> torch.Tensor:
        import torch
        from torch.nn import functional

        image, text = self.split(outputs)
        scale = self.net.scale() if self.net is not None else torch.tensor(math.exp(INIT_LOGIT_SCALE))
        logits = scale * image @ text.T
        same = torch.from_numpy(np.asarray(targets)[:, None] == np.asarray(targets)[None, :])
        diagonal = torch.eye(len(targets), dtype=torch.bool)
        logits = logits.masked_fill(same & ~diagonal, float("-inf"))  # another caption of the row's match
        labels = torch.arange(len(targets))
        return (functional.cross_entropy(logits, labels) + functional.cross_entropy(logits.T, labels)) / 2

    # ------------------------------------------------------------------ judging and answering
    def evaluate(self, targets: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None) -> dict:
        targets = np.asarray(targets, dtype=object)
        image, text = self.split(np.asarray(scores, dtype=np.float32))
        images, texts = _distinct(image), _distinct(text)
        sim = image[images] @ text[texts].T
        positive = targets[images][:, None] == targets[texts][None, :]
        i2t = retrieval_ranks(sim, positive)
        out = {**rank_metrics(i2t, "i2t"), **rank_metrics(retrieval_ranks(sim.T, positive.T), "t2i")}
        seen = np.isin(targets[images], np.asarray(self.labels, dtype=object))
        for name, rows in (("seen", seen), ("unseen", ~seen)):  # details: classes trained on, or held out
            out[f"{name}_i2t_r1"] = float((i2t[rows] <= 1).mean()) if self.labels and rows.any() else None
        out["recall_mean"] = float(np.mean([out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in KS]))
        out.update(self._zero_shot(image[images], targets[images], text[texts], targets[texts]))
        out.update(n=len(targets), images=len(images), captions=len(texts))
        return out

    def _zero_shot(self, image: np.ndarray, truth: np.ndarray, text: np.ndarray, classes: np.ndarray) -> dict:
        names, centres = class_embeddings(text, classes)
        order = np.argsort(-(image @ centres.T), axis=1, kind="stable")
        right = np.asarray(names, dtype=object)[order] == truth[:, None]
        unseen = ~np.isin(truth, np.asarray(self.labels, dtype=object)) if self.labels else np.zeros(len(truth), bool)
        n_unseen_classes = len(set(truth[unseen].tolist()))
        return {
            "zeroshot_top1": float(right[:, :1].any(axis=1).mean()) if len(truth) else float("nan"),
            "zeroshot_top5": float(right[:, :5].any(axis=1).mean()) if len(truth) else float("nan"),
            "zeroshot_classes": len(names),
            "zeroshot_chance": 1.0 / max(1, len(names)),
            # a detail, not a declared metric: a split without unseen classes has none (None, not NaN)
            "unseen_top1": float(right[unseen, :1].mean()) if unseen.any() else None,
            "unseen_images": int(unseen.sum()),
            "unseen_classes": n_unseen_classes,
        }

    def describe(self, targets: np.ndarray, scores: np.ndarray, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Each row's zero-shot class (nearest class embedding of the split's captions) and its cosine."""
        targets = np.asarray(targets, dtype=object)
        image, text = self.split(np.asarray(scores, dtype=np.float32))
        if not len(targets):
            return {
                "target": [],
                "prediction": [],
                "confidence": np.zeros(0),
                "correct": np.zeros(0, bool),
                "error": np.zeros(0),
            }
        texts = _distinct(text)
        names, centres = class_embeddings(text[texts], targets[texts])
        sims = image @ centres.T
        predicted = np.asarray(names, dtype=object)[sims.argmax(1)]
        return {
            "target": targets.tolist(),
            "prediction": predicted.tolist(),
            "confidence": sims.max(1),
            "correct": predicted == targets,
            "error": np.full(len(targets), np.nan),
        }

    def answers(self, scores: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
        """``/predict`` on an (image, caption) pair: how well they match, as a cosine in [-1, 1]."""
        image, text = self.split(scores)
        similarity = (image * text).sum(dim=1)
        return [{"answer": round(float(s), 6), "similarity": round(float(s), 6), "top_k": []} for s in similarity]

    def align(self, scores: np.ndarray, labels: Sequence[str]) -> np.ndarray:
        """Embeddings do not depend on the label list: an older model's scores are compared as they are."""
        return scores

    def prompts(self, label: str) -> list[str]:
        """The texts whose embeddings are averaged into ``label``'s class embedding at serving time."""
        return [t.format(label) for t in self.templates]
