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
* ``MMOPS_MAX_*`` request limits (:class:`mmops.serving.predictor.Limits`, by default derived from the
  model's spec); ``MMOPS_MAX_QUEUE`` / ``MMOPS_MAX_INFLIGHT_BYTES`` admission (503 + Retry-After beyond).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from tempfile import SpooledTemporaryFile

import aiohttp
import anyio
import anyio.to_thread
import bentoml
from bentoml.exceptions import InvalidArgument
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import PydanticJsonSchemaWarning, SkipJsonSchema
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from mmops.core.model import ADAPTATION_FILE, SPEC_FILE, ensemble_record
from mmops.serving.predictor import InputError, Limits, Predictor, RowDecoder, _env_int
from mmops.serving.retrieval import RetrievalRequests, Retriever, answer_requests, index_summary

log = logging.getLogger("mmops.service")


class _RefusalsInOneLine(logging.Filter):
    """BentoML logs every refused request (a 4xx: bad input, a failed validation) at ERROR with its full
    traceback. A client's mistake is not a server error: one INFO line naming it, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pydantic import ValidationError

        exc = record.exc_info[1] if record.exc_info else None
        code = getattr(getattr(exc, "error_code", None), "value", 500)
        if exc is not None and (isinstance(exc, ValidationError) or code < 500):
            record.msg, record.args = "refused %s [%s]: %s", (*tuple(record.args or ())[:2], exc)
            record.exc_info, record.exc_text, record.levelno, record.levelname = None, None, logging.INFO, "INFO"
        return True


logging.getLogger("bentoml._internal.server.http_app").addFilter(_RefusalsInOneLine())

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
# Prediction batches on their way to the model process at once (see _RowBatcher).
BATCHES_IN_FLIGHT = _env_int("MMOPS_BATCHES_IN_FLIGHT", 1)
LIMITS = Limits()  # generic; the service applies Limits(spec) of the model it serves
MAX_TOP_K = 20
# What /model tells of an adapted model (the refused rows and the metrics stay in the artifact's file).
ADAPTATION_SHOWN = ("method", "source", "manifest_sha256", "rows", "layers", "members")
# /caption's request options: beams cost memory and time linearly; a caption is at most the model's length.
MAX_BEAMS = _env_int("MMOPS_MAX_BEAMS", 8)
MAX_CAPTION_LENGTH = 64
# Admission (see _Admission): prediction requests in flight at the front beyond which it answers 503.
# Two full adaptive batches: enough to keep the model busy, and a bound on every request's wait.
MAX_QUEUE = _env_int("MMOPS_MAX_QUEUE", 2 * BATCH_MAX_SIZE)
# Request bodies in flight (declared Content-Length); 0 means twice the model's request limit.
INFLIGHT_BYTES = int(os.environ.get("MMOPS_MAX_INFLIGHT_BYTES") or 0)
RETRY_AFTER_S = 1
ADMITTED_PATHS = frozenset({"/predict", "/predict_batch", "/caption", "/embed", "/search", "/zero_shot"})
# Form parts and other bodies above this stay on disk, not in memory, while a request waits.
SPOOL_BYTES = _env_int("MMOPS_SPOOL_BYTES", 64 * 1024)
REPLAY_CHUNK = 256 * 1024
MAX_FORM_PARTS = 32
FORM_SCOPE_KEY = "mmops.form"
FILE_KINDS = frozenset({"image", "audio"})
# Images decoded at once in the front (each briefly holds its full-size pixels).
DECODE_THREADS = _env_int("MMOPS_DECODE_THREADS", 2)
MODEL_HEADER = "x-mmops-model"
# Requests whose whole body is at most this are decoded on the event loop (see MultimodalService._decoding).
INLINE_DECODE_BYTES = _env_int("MMOPS_INLINE_DECODE_BYTES", 32 * 1024)
# ... and whose images together declare at most this many pixels (a 256x256 PNG decodes in about 1 ms).
INLINE_DECODE_PIXELS = _env_int("MMOPS_INLINE_DECODE_PIXELS", 256 * 256)
# The body size of the request being answered, set by ServingMiddleware once it has read the body.
_body_bytes: ContextVar[int | None] = ContextVar("mmops_body_bytes", default=None)

# Written once the model is loaded; read by the middleware for headers and /readyz.
_served: dict[str, Any] = {}


class Answer(BaseModel):
    """What the model's task answers. The built-in tasks fill ``answer`` and ``top_k``; a task plugin may
    add fields of its own (a ranking, a caption's score), which pass through unchanged."""

    model_config = ConfigDict(extra="allow")

    answer: Any = Field(
        description="the task's answer: the class; the labels over the threshold (multi-label); the value "
        "(regression); or what a task plugin answers"
    )
    top_k: list[dict[str, Any]]
    model: str = Field(description="the registry version of the model that answered")


def _freeze_startup_heap() -> None:
    """Keep what start-up loaded out of every later garbage collection.

    A full collection walks every tracked object, and after torch, BentoML and the model are loaded a
    service process holds about 300,000 of them: each full collection then stops the process for tens
    to hundreds of milliseconds (1.2 s measured on a loaded 2-core machine). Under load the requests
    that arrive during such a pause wait for it, and when it ends they find the queue full and are
    refused late. Start-up objects live as long as the process, so scanning them again is wasted work;
    ``gc.freeze`` moves them to a generation the collector ignores (after a collection, so no garbage
    is frozen with them).
    """
    gc.collect()
    gc.freeze()


class _Admission:
    """How much the front holds at once: requests in flight and their body bytes.

    Beyond either bound a request is answered 503 with ``Retry-After`` before its body is read, so
    latency stays bounded by the queue (about ``MAX_QUEUE`` requests ahead) rather than growing with
    the offered load, and memory by ``MAX_QUEUE`` requests or ``inflight_bytes`` of bodies.
    """

    def __init__(self, max_requests: int) -> None:
        self.max_requests, self.requests, self.bytes = max_requests, 0, 0

    def enter(self, size: int, budget: int) -> bool:
        if self.requests >= self.max_requests or (self.requests and self.bytes + size > budget):
            return False
        self.requests, self.bytes = self.requests + 1, self.bytes + size
        return True

    def leave(self, size: int) -> None:
        self.requests, self.bytes = self.requests - 1, self.bytes - size


class _RowBatcher:
    """Adaptive batching in the front: the rows of concurrent requests cross to the model process together.

    BentoML batches inside the model process, so with its batching every request still crossed the
    process boundary on its own and paid BentoML's per-request machinery a second time there (ASGI
    app, middlewares, tracing span, access log, pickling): a profile under 16 clients found the
    forward pass in only 21% of the model process's samples. Here whatever rows wait while a batch
    computes leave together, as one call, once the model is free: no timer, so under light load a
    request goes at once, alone, and under heavy load batches fill up to ``max_rows``.
    ``max_inflight`` batches travel at once, so the next one crosses while the model computes.
    """

    def __init__(self, send: Callable[[list[Any]], Awaitable[list[Any]]], max_rows: int, max_inflight: int) -> None:
        self.send, self.max_rows, self.max_inflight = send, max_rows, max_inflight
        self.waiting: deque[tuple[list[Any], asyncio.Future[list[Any]]]] = deque()
        self.inflight = 0
        self.batches = self.rows = 0  # sent so far: /model reports their mean size
        self.tasks: set[asyncio.Task[None]] = set()  # held, so a running batch is not collected

    async def __call__(self, rows: list[Any]) -> list[Any]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.waiting.append((rows, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        while self.waiting and self.inflight < self.max_inflight:
            batch = [self.waiting.popleft()]
            size = len(batch[0][0])
            while self.waiting and size + len(self.waiting[0][0]) <= self.max_rows:
                size += len(self.waiting[0][0])
                batch.append(self.waiting.popleft())
            self.inflight += 1
            self.batches, self.rows = self.batches + 1, self.rows + size
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run(self, batch: list[tuple[list[Any], asyncio.Future[list[Any]]]]) -> None:
        try:
            results = await self.send([row for rows, _ in batch for row in rows])
            start = 0
            for rows, future in batch:
                if not future.done():  # its client may have gone
                    future.set_result(results[start : start + len(rows)])
                start += len(rows)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self.inflight -= 1
            self._dispatch()


class _TooLarge(Exception):
    pass


class _Body:
    """A request body read from ASGI ``receive`` in chunks, refused past ``limit`` bytes."""

    def __init__(self, receive: Any, limit: int) -> None:
        self.receive, self.limit, self.size, self.done = receive, limit, 0, False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.done:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            self.size += len(chunk)
            self.done = not message.get("more_body", False)
            if self.size > self.limit:
                raise _TooLarge()
            if chunk:
                yield chunk

    async def drain(self) -> bool:
        """Read the rest and drop it; False when it is over the limit or the client left."""
        try:
            async for _ in self.chunks():
                pass
        except (_TooLarge, ClientDisconnect):
            return False
        return True


class _SpoolingParser(MultiPartParser):
    """Starlette's streaming multipart parser, keeping only small parts in memory."""

    spool_max_size = SPOOL_BYTES


class ServingMiddleware:
    """Request-level guards, and the model version on every response.

    * Admission (:class:`_Admission`): beyond the queue, 503 with ``Retry-After`` at once. Any other
      503 (the model's batch queue timing out) also gets ``Retry-After``.
    * Refuses a body over the model's request limit (from Content-Length up front, or by counting a
      chunked upload) with 413. Bodies are streamed: a form is parsed once, here, with parts above
      ``MMOPS_SPOOL_BYTES`` spooled to disk, and handed to ``/predict`` through the ASGI scope; any
      other body is spooled to disk above that size and replayed to BentoML.
    * Adds the ``x-mmops-model`` header to every response, errors included, and answers ``/readyz``
      with JSON ``{"ready": ..., "model": ...}`` around BentoML's own verdict.
    """

    def __init__(self, app: Any, max_queue: int = 64) -> None:
        self.app, self.admission = app, _Admission(max_queue)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("path") == "/readyz":
            await self._readyz(scope, receive, send)
            return
        model = _served.get("model", "").encode()

        async def send_with_model(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                if model and MODEL_HEADER.encode() not in names:
                    headers.append((MODEL_HEADER.encode(), model))
                if message["status"] == 503 and b"retry-after" not in names:
                    headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
                message["headers"] = headers
            await send(message)

        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send_with_model)
            return
        limits: Limits = _served.get("limits") or LIMITS
        body = _Body(receive, limits.request_bytes)
        path = scope.get("path")
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        size = int(declared) if declared.isdigit() else None
        if size is not None and size > limits.request_bytes:
            await self._reject(send_with_model, scope, *self._too_large(size, limits))  # not read: closes
            return
        admitted = path in ADMITTED_PATHS
        reserve = size if size is not None else limits.request_bytes
        if admitted and not self.admission.enter(reserve, INFLIGHT_BYTES or 2 * limits.request_bytes):
            message = (
                f"overloaded: {self.admission.requests} requests in flight "
                f"(MMOPS_MAX_QUEUE={self.admission.max_requests}), retry after {RETRY_AFTER_S} s"
            )
            await self._reject(send_with_model, scope, 503, message, body)
            return
        held: Any = None
        try:
            form_type = _is_form(scope)
            if form_type and path != "/predict":
                message = f"{path} takes a JSON body (application/json); multipart forms go to /predict"
                await self._reject(send_with_model, scope, 415, message, body)
                return
            if not form_type and path == "/predict":
                message = (
                    "/predict takes a multipart form (multipart/form-data) of the model's inputs; "
                    "JSON goes to /predict_batch"
                )
                await self._reject(send_with_model, scope, 415, message, body)
                return
            try:
                if form_type:
                    held = await self._parse_form(scope, body, form_type)
                    scope[FORM_SCOPE_KEY] = held
                    receive = _replay(b"", receive)
                else:
                    held = await self._spool(body)
                    receive = _replay_file(held, receive)
            except _TooLarge:
                await self._reject(send_with_model, scope, *self._too_large(None, limits))
                return
            except MultiPartException as exc:
                await self._reject(send_with_model, scope, 400, f"multipart body: {exc.message}", body)
                return
            except ClientDisconnect:
                return
            _body_bytes.set(body.size)
            await self.app(scope, receive, send_with_model)
        finally:
            if admitted:
                self.admission.leave(reserve)
            if isinstance(held, FormData):
                await held.close()
            elif held is not None:
                held.close()

    @staticmethod
    async def _reject(send: Any, scope: dict, status: int, message: str, body: _Body | None = None) -> None:
        """Answer ``status`` at once. The rest of the body is read and dropped first where it is within
        the limit, so the client, still sending, gets the answer rather than a reset connection; a body
        left unread closes the connection."""
        log.info("rejected %s: %s", scope.get("path"), message)
        drained = body is not None and await body.drain()
        await _send_json(send, status, {"error": message}, close=not drained)

    @staticmethod
    def _too_large(size: int | None, limits: Limits) -> tuple[int, str]:
        shown = f"{size} bytes" if size is not None else "more bytes"
        return 413, f"request body: {shown}, over the limit of {limits.request_bytes} (MMOPS_MAX_REQUEST_BYTES)"

    @staticmethod
    async def _parse_form(scope: dict, body: _Body, form_type: str) -> FormData:
        headers = Headers(scope=scope)
        if form_type == "multipart":
            parser = _SpoolingParser(headers, body.chunks(), max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS)
            return await parser.parse()
        return await FormParser(headers, body.chunks(), max_fields=MAX_FORM_PARTS).parse()

    @staticmethod
    async def _spool(body: _Body) -> SpooledTemporaryFile:
        spool = SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 (closed once the response is sent)
        try:
            async for chunk in body.chunks():
                spool.write(chunk)
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool

    async def _readyz(self, scope: dict, receive: Any, send: Any) -> None:
        status: list[int] = []

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        try:
            await self.app(scope, receive, capture)
        except Exception:  # BentoML raises while the model is loading: not ready, not a 500
            status.clear()
        code = status[0] if status else 503
        await _send_json(send, code, {"ready": code == 200, "model": _served.get("model")})


def _steady_client(proxy: Any) -> Any:
    """The dependency's async client, with BentoML's periodic session refresh turned off.

    BentoML 1.4.30+ (``_bentoml_impl.client.proxy2.SessionManager``) replaces its aiohttp session
    every 100 requests or 5 minutes by closing the old one, which kills the requests still in flight
    on it: under 16 concurrent clients that failed about 8% of requests with 500s
    (bentoml/BentoML#5544, #5698). A session to a local socket has no reason to be refreshed.

    This sets private attributes, so it runs once at start-up and refuses to start when they are
    gone: a BentoML release that renames them would otherwise bring the 500s back silently.
    """
    client = proxy.to_async
    manager = getattr(client, "_session_manager", None)
    if manager is None or not all(hasattr(manager, a) for a in ("max_requests", "max_age")):
        raise RuntimeError(
            f"BentoML {bentoml.__version__}: the dependency client has no _session_manager with max_requests "
            "and max_age, so mmops cannot stop it from closing connections with requests in flight (500s "
            "under load, bentoml/BentoML#5544). Install the BentoML version mmops was tested with "
            "(see pyproject.toml) or update mmops.serving.service._steady_client for this one."
        )
    manager.max_requests, manager.max_age = sys.maxsize, float("inf")
    return client


def _is_form(scope: dict) -> str | None:
    content_type = dict(scope.get("headers") or ()).get(b"content-type", b"").lower()
    if content_type.startswith(b"multipart/"):
        return "multipart"
    return "urlencoded" if content_type.startswith(b"application/x-www-form-urlencoded") else None


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


def _replay_file(spool: SpooledTemporaryFile, receive: Any) -> Any:
    """An ASGI ``receive`` that hands over a spooled body in chunks, then defers to the real one."""
    done = False

    async def replay() -> dict:
        nonlocal done
        if done:
            return await receive()
        chunk = spool.read(REPLAY_CHUNK)
        more = len(chunk) == REPLAY_CHUNK
        done = not more
        return {"type": "http.request", "body": chunk, "more_body": more}

    return replay


async def _send_json(send: Any, status: int, body: dict, close: bool = False) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    if status == 503:
        headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    if _served.get("model"):
        headers.append((MODEL_HEADER.encode(), _served["model"].encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class PredictForm(bentoml.IODescriptor):
    """One example as a multipart form: one part per model input (``POST /model`` lists them), and
    ``top_k``. Shown here: the image + question of a VQA model; a model with other inputs takes its
    own field names (images and audio as file parts, the others as text parts)."""

    # The middleware has already parsed the form (once, streaming, large parts on disk): this hands
    # its parts to MultimodalService.predict instead of BentoML's form parser, which answers 500 to
    # a binary part it does not expect and ignores parts it does not know.
    image: Annotated[Path, Field(description="the image file (PNG, JPEG, ...)")] = None  # type: ignore[assignment]
    question: Annotated[str | None, Field(description="the question about the image")] = None
    top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K)] = 3
    parts: SkipJsonSchema[list[tuple[str, Any]]] = Field(default_factory=list)

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        with warnings.catch_warnings():  # the file field's None default has no JSON form: it is left out
            warnings.simplefilter("ignore", PydanticJsonSchemaWarning)
            return super().model_json_schema(*args, **kwargs)

    @classmethod
    async def from_http_request(cls, request: Any, serde: Any) -> PredictForm:
        form: FormData | None = request.scope.get(FORM_SCOPE_KEY)
        if form is None:
            raise InvalidArgument("/predict takes a multipart form of the model's inputs")
        top_k = form.getlist("top_k")
        if len(top_k) > 1:
            raise InvalidArgument("top_k: given more than once")
        given = {"top_k": top_k[0]} if top_k else {}
        return cls.model_validate({**given, "parts": [(k, v) for k, v in form.multi_items() if k != "top_k"]})


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
        self.retriever = Retriever.load(self.predictor, Path(self.model_ref.path))  # two towers: /search...
        log.info(
            "model %s on %s, autocast %s, adaptive batching %s (max %d rows, %d ms)",
            self.model_ref.tag,
            self.predictor.device,
            self.predictor.autocast,
            ADAPTIVE_BATCHING,
            BATCH_MAX_SIZE,
            BATCH_MAX_LATENCY_MS,
        )
        _freeze_startup_heap()

    @bentoml.api
    def infer(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows decoded by :class:`RowDecoder` to answers (the top ``MAX_TOP_K``), in one forward pass.

        Not batchable here: the front batches these rows (:class:`_RowBatcher`) before they cross."""
        return self.predictor.forward(rows, top_k=MAX_TOP_K)

    @bentoml.api(batchable=ADAPTIVE_BATCHING, max_batch_size=BATCH_MAX_SIZE, max_latency_ms=BATCH_MAX_LATENCY_MS)
    def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Decoded rows with their decoding options (``/caption``): rows asking the same options decode together."""
        out: list[dict[str, Any]] = [{}] * len(requests)
        same: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            same.setdefault(json.dumps(request["options"], sort_keys=True), []).append(i)
        for key, rows in same.items():
            answers = self.predictor.forward([requests[i]["row"] for i in rows], top_k=1, options=json.loads(key))
            for i, answer in zip(rows, answers, strict=True):
                out[i] = answer
        return out

    @bentoml.api(batchable=ADAPTIVE_BATCHING, max_batch_size=BATCH_MAX_SIZE, max_latency_ms=BATCH_MAX_LATENCY_MS)
    def retrieve(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Decoded /embed, /search and /zero_shot items: each tower runs once for the whole batch."""
        return answer_requests(self.retriever, requests)

    @bentoml.api
    def device(self) -> dict[str, Any]:
        """Where the weights live, for ``/model`` and ``scripts/gpu_check.sh``."""
        params = {str(p.device) for p in self.predictor.model.parameters()}
        return {
            "device": str(self.predictor.device),
            "parameter_devices": sorted(params),
            "autocast": str(self.predictor.autocast),
        }


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
        self.limits = Limits(spec)
        self.decoder = RowDecoder(spec, self.limits)
        self.labels: list[str] = spec["labels"]
        self.task: str = (spec.get("task") or {}).get("name") or "classification"
        self.task_params: dict[str, Any] = (spec.get("task") or {}).get("params") or {}
        self.model_version = self.model_ref.info.labels.get("registry_version", str(self.model_ref.tag))
        self.index = index_summary(Path(self.model_ref.path))
        record = ensemble_record(Path(self.model_ref.path))  # train.ensemble: the model process averages them
        self.ensemble = (
            {"members": len(record["members"]), "seeds": [m["seed"] for m in record["members"]]} if record else None
        )
        adapted = Path(self.model_ref.path) / ADAPTATION_FILE  # `mmops adapt`: whose statistics it carries
        self.adaptation = (
            {k: v for k, v in json.loads(adapted.read_text()).items() if k in ADAPTATION_SHOWN}
            if adapted.is_file()
            else None
        )
        self.retrieval = RetrievalRequests(spec, self.decoder, self.index["count"] if self.index else None)
        self.client = _steady_client(self.model)  # fails start-up loudly if the workaround cannot apply
        self.infer = _RowBatcher(self._infer, BATCH_MAX_SIZE, BATCHES_IN_FLIGHT) if ADAPTIVE_BATCHING else self._infer
        self._decode_limiter: anyio.CapacityLimiter | None = None
        _served.update(model=self.model_version, limits=self.limits)
        log.info(
            "serving %s (%s), limits %s, queue %d",
            self.model_ref.tag,
            self.model_version,
            self.limits.as_dict(),
            MAX_QUEUE,
        )
        _freeze_startup_heap()

    def _decode(self, rows: list[Any], prefix: str) -> list[dict[str, Any]]:
        decoded = []
        for i, row in enumerate(rows):
            try:
                decoded.append(self.decoder.validate(row))
            except InputError as exc:
                raise _invalid(f"{prefix.format(i=i)}{exc}") from None
        return decoded

    async def _decoding(
        self, images: list[Any], decode: Callable[..., list[dict[str, Any]]], *args: Any
    ) -> list[dict[str, Any]]:
        """``decode(*args)``: on the event loop for a small request, else in one of a few threads.

        A 64x64 PNG decodes in about 0.2 ms, less than the hop to a thread and back costs; but a large
        image stops the event loop (and every other request) while it decodes, and a small body can
        hold one: a 17 KB PNG of 2048x2048 pixels took 91 ms. So a request is decoded here only when
        its body is small and its ``images`` together declare few pixels in their headers (read without
        decoding); anything else, or unreadable, goes to a thread."""
        size = _body_bytes.get()
        if size is not None and size <= INLINE_DECODE_BYTES and _few_pixels(images):
            return decode(*args)
        if self._decode_limiter is None:
            self._decode_limiter = anyio.CapacityLimiter(DECODE_THREADS)
        return await anyio.to_thread.run_sync(decode, *args, limiter=self._decode_limiter)

    def _images(self, rows: list[Any]) -> list[Any]:
        return [v for r in rows if isinstance(r, dict) for k, v in r.items() if self.decoder.inputs.get(k) == "image"]

    async def _answer(self, rows: list[Any], top_k: int, prefix: str = "") -> list[Answer]:
        # Decoding is CPU work (a large JPEG takes tens of ms): off the event loop, and a few at a
        # time, since each decoded image briefly holds its full-size pixels.
        decoded = await self._decoding(self._images(rows), self._decode, rows, prefix)
        results = await self.infer(decoded)
        return [Answer(**{**r, "top_k": r["top_k"][:top_k], "model": self.model_version}) for r in results]

    async def _infer(self, decoded: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            return await self.client.infer(decoded)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError):
            # A pooled keep-alive connection the model process had just closed; the forward pass
            # has no side effects, so one retry on a fresh connection is safe.
            return await self.client.infer(decoded)

    def _form_row(self, parts: list[tuple[str, Any]]) -> dict[str, Any]:
        """The form's parts as one row of the model's inputs; an unknown, repeated or undecodable
        part is refused by name."""
        takes = f"/predict takes {sorted(self.decoder.inputs)} (and top_k)"
        row: dict[str, Any] = {}
        for name, value in parts:
            kind = self.decoder.inputs.get(name)
            if kind is None:
                raise _invalid(f"{name}: is not an input of this model; {takes}")
            if name in row:
                raise _invalid(f"{name}: is given more than once")
            if isinstance(value, UploadFile):
                if kind in FILE_KINDS or kind == "vectors":  # a feature sequence as an uploaded .npy
                    row[name] = value.file
                    continue
                value.file.seek(0)
                data = value.file.read(4 * self.limits.text_chars + 1)
                try:
                    value = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise _invalid(f"{name}: must be text (UTF-8), got a binary file part") from None
            elif kind in FILE_KINDS:
                raise _invalid(f"{name}: must be an uploaded file (a form part with a filename)")
            row[name] = value
        return row

    @bentoml.api(input_spec=PredictForm)
    async def predict(
        self,
        image: Path | None = None,
        question: str | None = None,
        top_k: int = 3,
        parts: list[tuple[str, Any]] | None = None,
    ) -> Answer:
        """Answer one example sent as a multipart form of the model's own inputs.

        One part per input (``POST /model`` lists them): images and audio as file parts, text and
        numbers as text parts, a feature sequence as a ``.npy`` file part or a JSON list of frames;
        e.g. ``image`` + ``question`` for easy-VQA. An unknown part is a 400
        naming it. ``predict_batch`` takes the same fields as JSON, many rows at once.
        """
        return (await self._answer([self._form_row(parts or [])], top_k))[0]

    @bentoml.api
    async def predict_batch(
        self,
        items: Annotated[
            list[dict[str, Any]],
            Field(
                min_length=1,
                max_length=LIMITS.batch_size,
                description="one object per row: {input name: text, the image base64-encoded, or a feature "
                "sequence as a list of frames (lists of numbers)}",
            ),
        ],
        top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K)] = 3,
    ) -> list[Answer]:
        """Answer a list of rows (JSON), e.g. ``[{"image": "<base64>", "question": "what shape?"}]``."""
        if len(items) > self.limits.batch_size:
            raise _invalid(
                f"items: {len(items)} items, over this model's limit of {self.limits.batch_size} (MMOPS_MAX_BATCH)"
            )
        return await self._answer(items, top_k, "items[{i}].")

    @bentoml.api(route="/caption")
    async def caption(
        self,
        images: Annotated[
            list[str],
            Field(min_length=1, max_length=LIMITS.batch_size, description="images, each base64-encoded"),
        ],
        num_beams: Annotated[int | None, Field(ge=1, le=MAX_BEAMS, description="beam size; 1 = greedy")] = None,
        max_length: Annotated[int | None, Field(ge=1, le=MAX_CAPTION_LENGTH, description="tokens at most")] = None,
    ) -> list[Answer]:
        """Caption images with a captioning model: one answer per image, its ``caption`` and ``score`` (the
        log-probability over length ** length_penalty). Unset options take the model's own settings."""
        if self.task != "captioning":
            raise _invalid(f"/caption: this model's task is {self.task}, not captioning; use /predict_batch")
        fields = [name for name, kind in self.decoder.inputs.items() if kind == "image"]
        if len(fields) != 1 or len(self.decoder.inputs) != 1:
            raise _invalid(f"/caption: this model takes {sorted(self.decoder.inputs)}; use /predict_batch")
        if len(images) > self.limits.batch_size:
            raise _invalid(
                f"images: {len(images)} images, over this model's limit of {self.limits.batch_size} (MMOPS_MAX_BATCH)"
            )
        decoded = await self._decoding(images, self._decode, [{fields[0]: i} for i in images], "images[{i}].")
        longest = int(self.task_params.get("max_length", MAX_CAPTION_LENGTH))
        if max_length is not None and max_length > longest:
            raise _invalid(f"max_length: {max_length} is over this model's longest caption ({longest} tokens)")
        options = {k: v for k, v in (("num_beams", num_beams), ("max_length", max_length)) if v is not None}
        results = await self.client.generate([{"row": row, "options": options} for row in decoded])
        return [Answer(**{**r, "model": self.model_version}) for r in results]

    async def _retrieve(self, op: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """/embed, /search, /zero_shot: every item checked in the front (a 400 names it), answered in one batch."""
        if len(items) > self.limits.batch_size:
            raise _invalid(f"items: {len(items)} items, over this model's limit of {self.limits.batch_size}")

        def decode() -> list[dict[str, Any]]:
            out = []
            for i, item in enumerate(items):
                try:
                    out.append(self.retrieval.decode(op, item, f"items[{i}]."))
                except InputError as exc:
                    raise _invalid(str(exc)) from None
            return out

        decoded = await self._decoding([i.get("image") for i in items if isinstance(i, dict) and "image" in i], decode)
        return [{**r, "model": self.model_version} for r in await self.client.retrieve(decoded)]

    @bentoml.api(route="/embed")
    async def embed(
        self,
        items: Annotated[
            list[dict[str, Any]],
            Field(
                min_length=1,
                max_length=LIMITS.batch_size,
                description='{"text": "a red triangle"} or {"image": "<base64>"}: its unit vector',
            ),
        ],
    ) -> list[dict]:
        """Texts or images to the shared embedding space of a contrastive model (unit vectors)."""
        return await self._retrieve("embed", items)

    @bentoml.api(route="/search")
    async def search(
        self,
        items: Annotated[
            list[dict[str, Any]],
            Field(
                min_length=1,
                max_length=LIMITS.batch_size,
                description='{"text": "a red triangle", "k": 5} or {"image": "<base64>", "k": 5}',
            ),
        ],
    ) -> list[dict]:
        """The k nearest gallery items (ids, scores by cosine, labels) from the index packaged with the model."""
        return await self._retrieve("search", items)

    @bentoml.api(route="/zero_shot")
    async def zero_shot(
        self,
        items: Annotated[
            list[dict[str, Any]],
            Field(
                min_length=1,
                max_length=LIMITS.batch_size,
                description='{"image": "<base64>", "labels": ["cat", "dog"]}: the labels ranked',
            ),
        ],
    ) -> list[dict]:
        """Zero-shot classification: each label through the model's prompt templates, ranked by similarity."""
        return await self._retrieve("zero_shot", items)

    @bentoml.api(route="/model", input_spec=None)
    async def model_info(self) -> dict[str, Any]:
        """The model version served, what it takes, where it runs and the request limits."""
        return {
            "model": self.model_version,
            "tag": str(self.model_ref.tag),
            "inputs": self.decoder.inputs,
            "labels": self.labels,
            **({"ensemble": self.ensemble} if self.ensemble else {}),  # each answer costs that many forward passes
            **({"adaptation": self.adaptation} if self.adaptation else {}),
            **({"index": self.index} if self.index else {}),  # the gallery /search answers from
            **(await self.model.to_async.device()),
            "limits": self.limits.as_dict(),
            "queue": MAX_QUEUE,
            "batching": {
                "adaptive": ADAPTIVE_BATCHING,
                "max_batch_size": BATCH_MAX_SIZE,
                "max_latency_ms": BATCH_MAX_LATENCY_MS,
                "batches_in_flight": BATCHES_IN_FLIGHT,
                **(
                    {"prediction_batches": self.infer.batches, "prediction_rows": self.infer.rows}
                    if isinstance(self.infer, _RowBatcher)
                    else {}
                ),
            },
        }


def _declared_pixels(value: Any) -> int | None:
    """The pixels an image (bytes, base64 text or an uploaded file) declares in its header, read without
    decoding them; None when the header cannot be read."""
    try:
        if isinstance(value, str):
            value = base64.b64decode(value, validate=True)
        if isinstance(value, bytes | bytearray):
            value = io.BytesIO(value)
        value.seek(0)
        try:
            with Image.open(value) as image:
                width, height = image.size
        finally:
            value.seek(0)
    except Exception:  # not an image, not base64, not a file: the decoder, in a thread, says what is wrong
        return None
    return width * height


def _few_pixels(images: list[Any]) -> bool:
    """Whether the images together declare at most INLINE_DECODE_PIXELS (a batch of many small images
    costs as much as one large one); False when one cannot be read."""
    total = 0
    for image in images:
        pixels = _declared_pixels(image)
        if pixels is None:
            return False
        total += pixels
        if total > INLINE_DECODE_PIXELS:
            return False
    return True


def _invalid(message: str) -> InvalidArgument:
    log.info("rejected: %s", message)
    return InvalidArgument(message)


MultimodalService.add_asgi_middleware(ServingMiddleware, max_queue=MAX_QUEUE)
