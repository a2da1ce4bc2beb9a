"""The BentoML service: raw inputs in, answer out, all preprocessing inside.

The model to serve is a build argument (``bentoml build --arg model_tag=NAME:VERSION``, which
``mmops package`` passes), recorded in the bento; ``MMOPS_MODEL_TAG`` overrides it for development.

Two BentoML services, as BentoML 1.4 composes adaptive batching with pre-processing:

* ``MultimodalService`` (the HTTP front): ``predict`` (multipart) and ``predict_batch`` (JSON) check
  and decode each request on its own with :class:`RowDecoder` (which needs only the model's spec),
  answering 4xx that name the field and the limit, so a bad request never reaches a batch;
* ``ModelService`` (a dependency, its own process): one batchable core, ``infer``, that BentoML's
  adaptive batching feeds with the decoded rows of many concurrent requests, sent over a local
  socket as pickles (numpy arrays, no base64 or JSON).

On two cores this also splits the work: HTTP parsing and image decoding in one process, the batched
forward pass in the other. (Calling a batchable API of the same service through ``self`` goes
through an in-process ASGI connector that loses request bodies under concurrency in BentoML 1.4.40.)

Deployment switches (environment, read at start-up; docs/serving.md has the full list):

* ``MMOPS_GPU=1`` (or ``--arg gpu=true`` at build) declares ``resources={"gpu": 1}``; the device itself
  is chosen by :func:`mmops.serving.predictor.pick_device` (CUDA when available, ``MMOPS_DEVICE``).
* ``MMOPS_BATCH_MAX_SIZE`` / ``MMOPS_BATCH_MAX_LATENCY_MS`` tune adaptive batching;
  ``MMOPS_ADAPTIVE_BATCHING=0`` turns it off (the batch-size-1 baseline of ``bench/serve_load.py``).
* ``MMOPS_MAX_*`` request limits (:class:`mmops.serving.predictor.Limits`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import aiohttp
import bentoml
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from mmops.core.model import SPEC_FILE
from mmops.serving.predictor import InputError, Limits, Predictor, RowDecoder

log = logging.getLogger("mmops.service")

_args = bentoml.use_arguments()
MODEL_TAG = os.environ.get("MMOPS_MODEL_TAG") or getattr(_args, "model_tag", None) or "easy-vqa:latest"


def _flag(env: str, arg: str, default: bool) -> bool:
    value = os.environ.get(env) or str(getattr(_args, arg, "") or "")
    return default if not value else value.lower() in ("1", "true", "yes", "on")


GPU = _flag("MMOPS_GPU", "gpu", False)
ADAPTIVE_BATCHING = _flag("MMOPS_ADAPTIVE_BATCHING", "adaptive_batching", True)
# Measured on 2 CPU cores (bench/serve_load.py): batches beyond 32 rows no longer raise throughput,
# and 16 concurrent clients fill a batch within a few milliseconds. The latency bound is generous
# because BentoML answers 503 to any request queued longer than it.
BATCH_MAX_SIZE = int(os.environ.get("MMOPS_BATCH_MAX_SIZE", 32))
BATCH_MAX_LATENCY_MS = int(os.environ.get("MMOPS_BATCH_MAX_LATENCY_MS", 2000))
LIMITS = Limits()
MAX_TOP_K = 20
MODEL_HEADER = "x-mmops-model"

# Written once the model is loaded; read by the middleware for headers and /readyz.
_served: dict[str, str] = {}


class Answer(BaseModel):
    answer: str | float | list[str] = Field(
        description="the class; the labels over the threshold (multi-label); or the value (regression)"
    )
    top_k: list[dict[str, Any]]
    model: str = Field(description="the registry version of the model that answered")


class ServingMiddleware:
    """Request-level guards, and the model version on every response.

    * Reads the body itself, refusing one over ``MMOPS_MAX_REQUEST_BYTES`` (from Content-Length up
      front, or by counting a chunked upload) before BentoML spools it to disk.
    * Parses a form body (multipart or urlencoded) once before BentoML does: BentoML answers 500 to
      a malformed one, and would fetch a URL given as text in place of a file field.
    * Adds the ``x-mmops-model`` header to every response, errors included, and answers ``/readyz``
      with JSON ``{"ready": ..., "model": ...}`` around BentoML's own verdict.
    """

    def __init__(self, app: Any, max_request_bytes: int, file_fields: frozenset[str]) -> None:
        self.app, self.max_request_bytes, self.file_fields = app, max_request_bytes, file_fields

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("path") == "/readyz":
            await self._readyz(scope, receive, send)
            return
        model = _served.get("model", "").encode()

        async def send_with_model(message: dict) -> None:
            if message["type"] == "http.response.start" and model and not any(
                k == MODEL_HEADER.encode() for k, _ in message.get("headers", [])
            ):
                message["headers"] = [*message.get("headers", []), (MODEL_HEADER.encode(), model)]
            await send(message)

        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await self._read_body(scope, receive)
            error = self._too_large(len(body)) if body is not None else self._too_large(None)
            if error is None and _is_form(scope):
                error = await self._check_form(scope, body)
            if error is not None:
                log.info("rejected %s: %s", scope.get("path"), error[1])
                await _send_json(send_with_model, error[0], {"error": error[1]})
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send_with_model)

    def _too_large(self, size: int | None) -> tuple[int, str] | None:
        if size is not None and size <= self.max_request_bytes:
            return None
        shown = f"{size} bytes" if size is not None else "more bytes"
        return 413, f"request body: {shown}, over the limit of {self.max_request_bytes} (MMOPS_MAX_REQUEST_BYTES)"

    async def _read_body(self, scope: dict, receive: Any) -> bytes | None:
        """The whole body, or None once it passes the limit (declared or counted)."""
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_request_bytes:
                return None
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _check_form(self, scope: dict, body: bytes) -> tuple[int, str] | None:
        from starlette.datastructures import UploadFile
        from starlette.requests import Request

        request = Request(scope, _replay(body, None))
        try:
            form = await request.form()
        except Exception as exc:  # starlette raises HTTPException / MultiPartException for bad framing
            return 400, f"multipart body: {getattr(exc, 'detail', None) or exc}"
        try:
            for name in self.file_fields:
                if any(not isinstance(v, UploadFile) for v in form.getlist(name)):
                    return 400, f"{name}: must be an uploaded file (a form part with a filename)"
        finally:
            await form.close()
        return None

    async def _readyz(self, scope: dict, receive: Any, send: Any) -> None:
        status: list[int] = []

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await self.app(scope, receive, capture)
        code = status[0] if status else 503
        await _send_json(send, code, {"ready": code == 200, "model": _served.get("model")})


def _steady_client(proxy: Any) -> Any:
    """The dependency's async client, with BentoML's periodic session refresh turned off.

    BentoML 1.4.30+ (``_bentoml_impl.client.proxy2.SessionManager``) replaces its aiohttp session
    every 100 requests or 5 minutes by closing the old one, which kills the requests still in flight
    on it: under 16 concurrent clients that failed about 8% of requests with 500s
    (bentoml/BentoML#5544, #5698). A session to a local socket has no reason to be refreshed.
    """
    client = proxy.to_async
    manager = getattr(client, "_session_manager", None)
    if manager is not None and getattr(manager, "max_requests", None) != sys.maxsize:
        manager.max_requests, manager.max_age = sys.maxsize, float("inf")
    return client


def _is_form(scope: dict) -> bool:
    content_type = dict(scope.get("headers") or ()).get(b"content-type", b"")
    return content_type.startswith((b"multipart/", b"application/x-www-form-urlencoded"))


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI ``receive`` that hands over ``body`` once, then defers to the real one (disconnects)."""
    pending = [body]

    async def replay() -> dict:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        if receive is None:
            return {"type": "http.disconnect"}
        return await receive()

    return replay


async def _send_json(send: Any, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if _served.get("model"):
        headers.append((MODEL_HEADER.encode(), _served["model"].encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


@bentoml.service(
    name="mmops-model",
    resources={"gpu": 1} if GPU else {"cpu": "1"},
    traffic={"timeout": 30},
)
class ModelService:
    """The model process: batched forward passes on already validated, decoded rows."""

    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        self.predictor = Predictor(Path(self.model_ref.path))
        log.info("model %s on %s, autocast %s, adaptive batching %s (max %d rows, %d ms)",
                 self.model_ref.tag, self.predictor.device, self.predictor.autocast, ADAPTIVE_BATCHING,
                 BATCH_MAX_SIZE, BATCH_MAX_LATENCY_MS)

    @bentoml.api(batchable=ADAPTIVE_BATCHING, max_batch_size=BATCH_MAX_SIZE, max_latency_ms=BATCH_MAX_LATENCY_MS)
    def infer(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows decoded by :class:`RowDecoder` to answers (the top ``MAX_TOP_K``), in one forward pass."""
        return self.predictor.forward(rows, top_k=MAX_TOP_K)

    @bentoml.api
    def device(self) -> dict[str, Any]:
        """Where the weights live, for ``/model`` and ``scripts/gpu_check.sh``."""
        params = {str(p.device) for p in self.predictor.model.parameters()}
        return {"device": str(self.predictor.device), "parameter_devices": sorted(params),
                "autocast": str(self.predictor.autocast)}


@bentoml.service(
    name="mmops",
    resources={"cpu": "1"},
    traffic={"timeout": 30, "max_concurrency": 128},
)
class MultimodalService:
    model_ref = bentoml.models.BentoModel(MODEL_TAG)
    model = bentoml.depends(ModelService)

    def __init__(self) -> None:
        spec = json.loads((Path(self.model_ref.path) / SPEC_FILE).read_text())
        self.decoder = RowDecoder(spec, LIMITS)
        self.labels: list[str] = spec["labels"]
        self.model_version = self.model_ref.info.labels.get("registry_version", str(self.model_ref.tag))
        _served["model"] = self.model_version
        log.info("serving %s (%s), limits %s", self.model_ref.tag, self.model_version, LIMITS.as_dict())

    def _decode(self, rows: list[Any], prefix: str) -> list[dict[str, Any]]:
        decoded = []
        for i, row in enumerate(rows):
            try:
                decoded.append(self.decoder.validate(row))
            except InputError as exc:
                message = f"{prefix.format(i=i)}{exc}"
                log.info("rejected: %s", message)
                raise InvalidArgument(message) from None
        return decoded

    async def _answer(self, rows: list[Any], top_k: int, prefix: str = "") -> list[Answer]:
        # Decoding is CPU work (a large JPEG takes tens of ms): keep it off the event loop.
        decoded = await run_in_threadpool(self._decode, rows, prefix)
        client = _steady_client(self.model)
        try:
            results = await client.infer(decoded)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError):
            # A pooled keep-alive connection the model process had just closed; the forward pass
            # has no side effects, so one retry on a fresh connection is safe.
            results = await client.infer(decoded)
        return [Answer(answer=r["answer"], top_k=r["top_k"][:top_k], model=self.model_version) for r in results]

    @bentoml.api
    async def predict(
        self,
        image: Annotated[Path, Field(description="the image file (PNG, JPEG, ...)")],
        question: Annotated[str, Field(description="the question about the image", max_length=LIMITS.text_chars)],
        top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K)] = 3,
    ) -> Answer:
        """Answer one question about one uploaded image (multipart form).

        For a model trained on another set of inputs, use ``predict_batch``, which takes any.
        """
        return (await self._answer([{"image": image, "question": question}], top_k))[0]

    @bentoml.api
    async def predict_batch(
        self,
        items: Annotated[
            list[dict[str, Any]],
            Field(min_length=1, max_length=LIMITS.batch_size,
                  description="one object per row: {input name: text, or the image base64-encoded}"),
        ],
        top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K)] = 3,
    ) -> list[Answer]:
        """Answer a list of rows (JSON), e.g. ``[{"image": "<base64>", "question": "what shape?"}]``."""
        return await self._answer(items, top_k, "items[{i}].")

    @bentoml.api(route="/model", input_spec=None)
    async def model_info(self) -> dict[str, Any]:
        """The model version served, what it takes, where it runs and the request limits."""
        return {"model": self.model_version, "tag": str(self.model_ref.tag), "inputs": self.decoder.inputs,
                "labels": self.labels, **(await self.model.to_async.device()), "limits": LIMITS.as_dict(),
                "batching": {"adaptive": ADAPTIVE_BATCHING, "max_batch_size": BATCH_MAX_SIZE,
                             "max_latency_ms": BATCH_MAX_LATENCY_MS}}


MultimodalService.add_asgi_middleware(
    ServingMiddleware, max_request_bytes=LIMITS.request_bytes, file_fields=frozenset({"image"})
)
