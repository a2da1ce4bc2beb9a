"""Search and zero-shot with a contrastive (two-tower) model: one tower at a time, and the gallery index.

A two-tower model answers ``/predict`` on an (image, caption) pair like any model, but search needs
each tower alone: a text query is embedded without an image, and the gallery's images were embedded
once, at packaging time. :class:`Embedder` runs one input through its encoder (the frozen ones through
the predictor's feature LRU, as ``/predict`` does) and the task's projection head; :func:`build_gallery`
embeds the declared splits' distinct values into a :class:`~mmops.serving.index.VectorIndex` stored
next to the weights, so the bento ships it and the service loads it with the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmops.serving.index import EXACT_BELOW, VectorIndex
from mmops.serving.predictor import InputError, Predictor

log = logging.getLogger("mmops.serving.retrieval")

INDEX_DIR = "index"
EMBED_BATCH = 256


def towers_of(task: Any) -> tuple[str, str] | None:
    """The (image, text) input names of a task whose network embeds each tower alone, else None."""
    image, text = getattr(task, "image_input", None), getattr(task, "text_input", None)
    net = getattr(task, "net", None)
    return (image, text) if image and text and hasattr(net, "embed") else None


class Embedder:
    """The towers of a loaded contrastive model: raw values of one input to unit vectors."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.model = predictor.model
        towers = towers_of(self.model.task)
        if towers is None:
            raise ValueError(
                f"the model's task ({self.model.task_name}) has no separate towers to embed with; "
                "search and zero-shot need a contrastive model"
            )
        self.image_input, self.text_input = towers
        self.task = self.model.task

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> Embedder:
        return cls(Predictor(Path(model_dir), device="cpu"))

    def field(self, name: str) -> str:
        """The request field (manifest column) that feeds input ``name``."""
        return (self.model.spec["inputs"][name].get("columns") or [name])[0]

    def decode(self, name: str, value: Any) -> Any:
        """A request value (text; image bytes, base64 or array) checked and decoded as input ``name``."""
        return self.predictor.decoder._decode(self.field(name), value)

    @torch.inference_mode()
    def embed(self, name: str, values: Sequence[Any]) -> np.ndarray:
        """Decoded values of input ``name`` to their unit vectors, ``(len(values), width)`` float32."""
        if not len(values):
            return np.zeros((0, self.task.width), dtype=np.float32)
        self.model.eval()
        encoder, p = self.model.encoders[name], self.predictor
        out = []
        for start in range(0, len(values), EMBED_BATCH):
            chunk = list(values[start : start + EMBED_BATCH])
            if name in p._caches:
                feats = p._caches[name].get_many(chunk, lambda vs, e=encoder: p._frozen_features(e, vs))
            else:
                feats = encoder(p._to_device(encoder.preprocess(chunk)))
            out.append(self.model.head.embed(name, feats).float().cpu().numpy())
        return np.concatenate(out)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed(self.text_input, [self.decode(self.text_input, t) for t in texts])

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        return self.embed(self.image_input, [self.decode(self.image_input, i) for i in images])

    def label_vectors(self, labels: Sequence[str]) -> np.ndarray:
        """Each label through every prompt template, averaged and renormalised (open_clip's zero-shot)."""
        prompts = [p for label in labels for p in self.task.prompts(label)]
        vectors = self.embed(self.text_input, prompts).reshape(len(labels), -1, self.task.width).mean(axis=1)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def zero_shot(self, images: np.ndarray, labels: Sequence[str]) -> list[dict[str, Any]]:
        """Image unit vectors against the labels: ranked labels with softmax probabilities (the model's
        learned temperature) and cosine scores."""
        centres = self.label_vectors(labels)
        scores = images @ centres.T
        scale = float(self.model.head.scale().detach())
        logits = scale * scores
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        out = []
        for p, s in zip(probs, scores, strict=True):
            order = np.argsort(-p, kind="stable")
            out.append(
                {
                    "answer": labels[order[0]],
                    "top_k": [
                        {"answer": labels[j], "probability": round(float(p[j]), 6), "score": round(float(s[j]), 6)}
                        for j in order
                    ],
                }
            )
        return out


class Retriever:
    """What the service's model process holds for ``/embed``, ``/search`` and ``/zero_shot``."""

    def __init__(self, embedder: Embedder, index: VectorIndex | None) -> None:
        self.embedder, self.index = embedder, index

    @classmethod
    def load(cls, predictor: Predictor, model_dir: Path) -> Retriever | None:
        """None for a model without towers; a contrastive model without a packaged index can still embed."""
        if towers_of(predictor.model.task) is None:
            return None
        folder = Path(model_dir) / INDEX_DIR
        index = VectorIndex.load(folder) if (folder / "items.json").is_file() else None
        return cls(Embedder(predictor), index)

    def vectors(self, requests: Sequence[dict[str, Any]]) -> np.ndarray:
        """Decoded requests ``{"input": name, "value": ...}`` to unit vectors, one forward pass per tower."""
        out = np.zeros((len(requests), self.embedder.task.width), dtype=np.float32)
        for name in {r["input"] for r in requests}:
            rows = [i for i, r in enumerate(requests) if r["input"] == name]
            out[rows] = self.embedder.embed(name, [requests[i]["value"] for i in rows])
        return out

    def search(self, requests: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        if self.index is None:
            raise InputError("search", "this model was packaged without a gallery index")
        vectors = self.vectors(requests)
        results = []
        for vector, request in zip(vectors, requests, strict=True):
            hits = self.index.search(vector[None], int(request["k"]))[0]
            results.append([{**self.index.items[i], "score": round(score, 6)} for i, score in hits])
        return results


def build_gallery(
    model_dir: Path,
    prepared_dir: Path,
    raw_dir: Path | None,
    splits: Sequence[str],
    input_name: str | None = None,
    exact_below: int = EXACT_BELOW,
) -> Path | None:
    """Embed the distinct values of ``input_name`` (default: the image tower) in the ``splits`` rows of
    the prepared data and write the index into ``model_dir/index`` (None for a model without towers).

    Each item carries an ``id`` (the manifest's file path or text, so a hit can be fetched), the row's
    target (``label``: the class or image id) and the split.
    """
    from mmops.data.featurize import load_values

    predictor = Predictor(Path(model_dir), device="cpu")
    if towers_of(predictor.model.task) is None:
        return None
    embedder = Embedder(predictor)
    name = input_name or embedder.image_input
    if name not in (embedder.image_input, embedder.text_input):
        raise ValueError(f"index.input '{name}': the towers are {embedder.image_input} and {embedder.text_input}")
    rows = pd.read_parquet(prepared_dir / "rows.parquet")
    rows = rows[rows["split"].isin(list(splits)) & (rows[f"{name}_idx"] >= 0)]
    first = rows.drop_duplicates(f"{name}_idx")
    if first.empty:
        raise ValueError(f"index.splits {list(splits)}: no rows with '{name}' in the prepared data to index")
    spec = predictor.model.spec["inputs"][name]
    values = load_values(prepared_dir, name, spec["modality"])
    picked = first[f"{name}_idx"].to_numpy()
    vectors = embedder.embed(name, [values[i] for i in picked] if isinstance(values, list) else values[picked])
    ids = _ids(first, raw_dir, embedder.field(name), [values[i] for i in picked] if isinstance(values, list) else None)
    items = [
        {"id": i, "label": str(label), "split": split}
        for i, label, split in zip(ids, first["label"], first["split"], strict=True)
    ]
    index = VectorIndex(vectors, items, exact_below)
    folder = index.save(Path(model_dir) / INDEX_DIR)
    log.info("gallery index: %d %s items of %s, %s search", len(items), name, list(splits), index.kind)
    return folder


def _ids(rows: pd.DataFrame, raw_dir: Path | None, column: str, texts: list | None) -> list[str]:
    """Gallery ids: the text itself, or the manifest's value of ``column`` (an image path) by source line."""
    if texts is not None:
        return [str(t) for t in texts]
    found: dict[tuple[str, int], str] = {}
    for source in rows["source"].unique() if raw_dir else []:
        path = Path(raw_dir) / str(source)
        if path.suffix == ".csv" and path.is_file():
            frame = pd.read_csv(path, usecols=[column], dtype=str, keep_default_na=False)
            for line in rows.loc[rows["source"] == source, "line"]:
                found[(source, int(line))] = frame[column].iloc[int(line) - 2]  # line 1 is the header
    return [found.get((s, int(n)), f"{s}:{n}") for s, n in zip(rows["source"], rows["line"], strict=True)]


def index_summary(model_dir: Path) -> dict[str, Any] | None:
    path = Path(model_dir) / INDEX_DIR / "items.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    return {k: meta[k] for k in ("kind", "count", "dim", "exact_below")}


# ---------------------------------------------------------------- requests of /embed, /search, /zero_shot

MAX_SEARCH_K = 100
MAX_LABELS = 64
OPS = ("embed", "search", "zero_shot")


class RetrievalRequests:
    """Checks and decodes ``/embed``, ``/search`` and ``/zero_shot`` items in the service's front, from the
    model's spec alone (no weights), with the same rules as ``/predict``: every refusal is an
    :class:`InputError` naming the field, which the service turns into a 400.

    An item is ``{"text": ...}`` or ``{"image": <base64>}`` (exactly one), with ``k`` for a search
    (1..min(100, gallery size)) and ``labels`` for zero-shot (an image and 1..64 distinct labels).
    """

    def __init__(self, spec: dict[str, Any], decoder: Any, gallery: int | None) -> None:
        params = (spec.get("task") or {}).get("params") or {}
        self.towers = {"image": params.get("image_input"), "text": params.get("text_input")}
        self.decoder, self.gallery = decoder, gallery
        self.available = all(self.towers.values()) and all(n in spec["inputs"] for n in self.towers.values())
        self.fields = {
            kind: (spec["inputs"][n].get("columns") or [n])[0] for kind, n in self.towers.items() if n in spec["inputs"]
        }

    def decode(self, op: str, item: Any, where: str = "") -> dict[str, Any]:
        if not self.available:
            raise InputError("model", f"/{op} needs a contrastive (two-tower) model; this one answers /predict_batch")
        if not isinstance(item, dict):
            raise InputError(f"{where}item", 'must be an object such as {"text": "a red triangle"}')
        allowed = {"text", "image", *({"k"} if op == "search" else ()), *({"labels"} if op == "zero_shot" else ())}
        extra = sorted(set(item) - allowed)
        if extra:
            raise InputError(f"{where}{extra[0]}", f"is not a field of /{op}; it takes {sorted(allowed)}")
        given = [kind for kind in ("text", "image") if item.get(kind) is not None]
        if op == "zero_shot" and given != ["image"]:
            raise InputError(f"{where}image", "is required (text is not taken): /zero_shot ranks labels for an image")
        if len(given) != 1:
            raise InputError(
                f"{where}{'text' if not given else 'image'}",
                "give exactly one of text or image" + (" (both given)" if given else ""),
            )
        kind = given[0]
        try:
            value = self.decoder._decode(self.fields[kind], item[kind])
        except InputError as exc:
            raise InputError(f"{where}{kind}", str(exc).split(": ", 1)[-1]) from None
        request: dict[str, Any] = {"op": op, "input": self.towers[kind], "value": value}
        if op == "search":
            request["k"] = self._k(item.get("k", 5), where)
        if op == "zero_shot":
            request["labels"] = self._labels(item.get("labels"), where)
        return request

    def _k(self, k: Any, where: str) -> int:
        if self.gallery is None:
            raise InputError("search", "this model was packaged without a gallery index")
        top = min(MAX_SEARCH_K, self.gallery)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= top:
            raise InputError(
                f"{where}k", f"must be an integer from 1 to {top} (the gallery holds {self.gallery}), got {k!r}"
            )
        return k

    def _labels(self, labels: Any, where: str) -> list[str]:
        if not isinstance(labels, list) or not labels:
            raise InputError(f"{where}labels", "must be a non-empty list of strings")
        if len(labels) > MAX_LABELS:
            raise InputError(f"{where}labels", f"has {len(labels)} labels, over the limit of {MAX_LABELS}")
        limit = self.decoder.limits.text_chars
        if any(not isinstance(x, str) or not x.strip() or len(x) > limit for x in labels):
            raise InputError(f"{where}labels", f"each label must be a non-empty string of at most {limit} characters")
        cleaned = [x.strip() for x in labels]
        if len(set(cleaned)) != len(cleaned):
            raise InputError(f"{where}labels", "has the same label twice")
        return cleaned


def answer_requests(retriever: Retriever | None, requests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Decoded requests (:class:`RetrievalRequests`) to answers, each tower run once for the whole batch:
    ``{"vector": [...]}``, ``{"results": [{"id", "score", "label", "split"}...]}`` or the ranked labels."""
    if retriever is None:
        raise InputError("model", "this model has no towers to embed with")
    vectors = retriever.vectors(requests)
    out: list[dict[str, Any]] = []
    for vector, request in zip(vectors, requests, strict=True):
        if request["op"] == "embed":
            out.append({"vector": [round(float(x), 7) for x in vector], "input": request["input"]})
        elif request["op"] == "search":
            if retriever.index is None:
                raise InputError("search", "this model was packaged without a gallery index")
            hits = retriever.index.search(vector[None], request["k"])[0]
            out.append({"results": [{**retriever.index.items[i], "score": round(s, 6)} for i, s in hits]})
        else:
            out.append(retriever.embedder.zero_shot(vector[None], request["labels"])[0])
    return out
