"""The BentoML service: raw image and question in, answer out, all preprocessing inside.

The model to serve is a build argument (``bentoml build --arg model_tag=NAME:VERSION``, which
``mmops package`` passes), recorded in the bento; ``MMOPS_MODEL_TAG`` overrides it for development.
Bad requests are answered 400 with the field and the limit; the model is never reached with them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import bentoml
from bentoml.exceptions import InvalidArgument
from bentoml.validators import ContentType
from pydantic import BaseModel, Field

from mmops.serving.predictor import InputError, Predictor

log = logging.getLogger("mmops.service")

_args = bentoml.use_arguments()
MODEL_TAG = os.environ.get("MMOPS_MODEL_TAG") or getattr(_args, "model_tag", None) or "easy-vqa:latest"


class Item(BaseModel):
    image: str = Field(description="the image, base64-encoded")
    question: str = Field(description="the question about the image")


class Answer(BaseModel):
    answer: str
    top_k: list[dict[str, Any]]
    model: str


@bentoml.service(
    name="mmops",
    resources={"cpu": "2"},
    traffic={"timeout": 30, "max_concurrency": 64},
)
class MultimodalService:
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        self.predictor = Predictor(Path(self.model_ref.path))
        self.model_version = self.model_ref.info.labels.get("registry_version", str(self.model_ref.tag))
        log.info("serving %s (%s) on %s", self.model_ref.tag, self.model_version, self.predictor.device)

    def _answer(self, records: list[dict[str, Any]], top_k: int) -> list[Answer]:
        try:
            results = self.predictor.predict(records, top_k=top_k)
        except InputError as exc:
            raise InvalidArgument(str(exc)) from exc
        return [Answer(**r, model=self.model_version) for r in results]

    @bentoml.api
    def predict(
        self,
        image: Annotated[Path, ContentType("image/*")],
        question: Annotated[str, Field(min_length=1, max_length=1000)],
        top_k: Annotated[int, Field(ge=1, le=20)] = 3,
    ) -> Answer:
        """Answer one question about one uploaded image (multipart form)."""
        return self._answer([{"image": image, "question": question}], top_k)[0]

    @bentoml.api
    def predict_batch(
        self,
        items: Annotated[list[Item], Field(min_length=1, max_length=64)],
        top_k: Annotated[int, Field(ge=1, le=20)] = 3,
    ) -> list[Answer]:
        """Answer a list of questions, each with a base64 image (JSON)."""
        return self._answer([i.model_dump() for i in items], top_k)

    @bentoml.api(route="/model", input_spec=None)
    def model_info(self) -> dict[str, Any]:
        """The model version served and what it takes."""
        return {"model": self.model_version, "tag": str(self.model_ref.tag),
                "inputs": self.predictor.inputs, "labels": self.predictor.model.labels,
                "device": str(self.predictor.device)}
