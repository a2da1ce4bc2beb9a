"""Bounded serving, fast: start-up guards, `mmops serve`'s process group, limits that follow the model,
the /predict form parsed once into the model's own fields, and admission control (503 + Retry-After).

The same properties against the served bento (memory under load, p99 under overload, SIGTERM of
`mmops serve`) are the slow tests at the end, on the shared trained project.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import wave
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

from mmops.serving import service
from mmops.serving.predictor import Limits, RowDecoder

VQA_SPEC = {
    "inputs": {"image": {"modality": "image"}, "question": {"modality": "text"}},
    "image_size": 32,
    "labels": ["yes", "no"],
}
# The bring-your-own-data model of tests/byod.py: image, text, audio (may be missing), numbers, a category.
BYOD_SPEC = {
    "inputs": {
        "image": {"modality": "image"},
        "text": {"modality": "text"},
        "audio": {"modality": "audio", "missing": "learn"},
        "numbers": {"modality": "tabular", "kind": "number", "columns": ["width", "height"]},
        "shop": {"modality": "tabular", "kind": "category"},
    },
    "image_size": 24,
    "sample_rate": 8000,
    "audio_seconds": 0.5,
    "labels": ["red", "green", "blue"],
}


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def wav(seconds: float = 0.5, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        t = np.arange(int(rate * seconds)) / rate
        w.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _no_limit_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("MMOPS_MAX_"):
            monkeypatch.delenv(key)


# ---------------------------------------------------------------- 13: the connection-pool workaround


def test_session_refresh_workaround_applies_to_this_bentoml():
    from _bentoml_impl.client import RemoteProxy

    client = service._steady_client(RemoteProxy("http://127.0.0.1:1"))
    assert client._session_manager.max_requests == sys.maxsize and client._session_manager.max_age == float("inf")


def test_start_up_fails_loudly_when_the_private_attribute_is_gone(tmp_path, monkeypatch):
    from _bentoml_impl.client import RemoteProxy

    proxy = RemoteProxy("http://127.0.0.1:1")
    monkeypatch.delattr(proxy.to_async, "_session_manager")
    with pytest.raises(RuntimeError, match=r"BentoML .*_session_manager.*500s under load"):
        service._steady_client(proxy)
    # ...and at start-up of the service, not on the first request.
    with pytest.raises(RuntimeError, match="_session_manager"):
        _fake_service(tmp_path, VQA_SPEC, proxy)


def _fake_service(tmp_path: Path, spec: dict, proxy=None):
    """The HTTP front's class with its model reference and dependency replaced (no model store)."""
    from _bentoml_impl.client import RemoteProxy

    (tmp_path / "spec.json").write_text(json.dumps(spec))
    ref = SimpleNamespace(path=str(tmp_path), tag="m:1", info=SimpleNamespace(labels={"registry_version": "m:1"}))
    fake = type(
        "Front",
        (service.MultimodalService.inner,),
        {"model_ref": ref, "model": proxy or RemoteProxy("http://127.0.0.1:1")},
    )
    return fake()


# ---------------------------------------------------------------- 14: `mmops serve` and its process group


def test_sigterm_stops_the_whole_process_group(tmp_path):
    """A child that starts a grandchild (as `bentoml serve` starts workers): SIGTERM to the parent
    must leave neither running."""
    import psutil

    child = tmp_path / "child.py"
    child.write_text(
        textwrap.dedent("""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        time.sleep(300)
    """)
    )
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys; from mmops.cli.main import run_process_group; "
                f"sys.exit(run_process_group([sys.executable, {str(child)!r}], grace=5))"
            ),
        ]
    )
    try:
        deadline = time.monotonic() + 60
        tree: list = []
        while len(tree) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            tree = psutil.Process(parent.pid).children(recursive=True)
        assert len(tree) >= 2, tree
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        assert not _alive(tree), _alive(tree)
    finally:
        parent.kill()


def _alive(processes: list) -> list:
    import psutil

    left = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


# ---------------------------------------------------------------- 15: limits follow the model


def test_limits_follow_the_model():
    generic = Limits()
    assert generic.image_pixels == 16_000_000 and generic.batch_size == 64
    small = Limits(VQA_SPEC)  # 32-px images: up to 1024x1024 (32 times the side)
    assert small.image_pixels == 1024 * 1024 and small.image_bytes < 5 * 2**20
    assert Limits({**VQA_SPEC, "image_size": 64}).image_pixels == 2048 * 2048
    big = Limits({**VQA_SPEC, "image_size": 1024})  # a row decodes to 3 MiB: fewer rows a batch
    assert big.image_pixels == 16_000_000 and big.batch_size == 21
    audio = Limits(BYOD_SPEC)
    assert audio.audio_bytes == 2**20 and audio.request_bytes <= 64 * 2**20
    text_only = Limits({"inputs": {"q": {"modality": "text"}}, "image_size": 64})
    assert text_only.request_bytes < 2**20  # no file inputs: a batch of texts


def test_environment_overrides_the_model(monkeypatch):
    monkeypatch.setenv("MMOPS_MAX_IMAGE_PIXELS", "5000000")
    monkeypatch.setenv("MMOPS_MAX_BATCH", "8")
    limits = Limits(VQA_SPEC)
    assert (limits.image_pixels, limits.batch_size) == (5_000_000, 8)


def test_decoder_applies_the_models_pixel_limit():
    decoder = RowDecoder(VQA_SPEC)
    assert decoder.validate({"image": png(1000, 1000), "question": "q"})["image"].shape == (32, 32, 3)
    with pytest.raises(ValueError, match=r"image: .*1100x1000 pixels, over the limit of 1048576 pixels"):
        decoder.validate({"image": png(1100, 1000), "question": "q"})


# ---------------------------------------------------------------- 16: /predict takes the model's own fields


def _form_app(front):
    """The real middleware, PredictForm and the front's form-to-row code, around a stand-in endpoint
    that decodes the row (the model's forward pass is all that is missing)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from mmops.serving.predictor import InputError

    async def predict(request: Request) -> JSONResponse:
        try:
            form = await service.PredictForm.from_http_request(request, None)
            row = front.decoder.validate(front._form_row(form.parts))
        except (service.InvalidArgument, InputError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({k: None if v is None else type(v).__name__ for k, v in row.items()})

    async def batch(request: Request) -> JSONResponse:
        return JSONResponse({"bytes": len(await request.body())})

    app = Starlette(
        routes=[Route("/predict", predict, methods=["POST"]), Route("/predict_batch", batch, methods=["POST"])]
    )
    return service.ServingMiddleware(app, max_queue=8)


def _post(app, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post(path, **kwargs)

    return asyncio.run(go())


def test_predict_form_takes_audio_and_numbers(tmp_path):
    app = _form_app(_fake_service(tmp_path, BYOD_SPEC))
    fields = {"text": "a mug", "width": "30", "height": "12", "shop": "north"}
    r = _post(
        app,
        "/predict",
        files={"image": ("x.png", png(24, 24), "image/png"), "audio": ("x.wav", wav(), "audio/wav")},
        data=fields,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"image": "ndarray", "text": "str", "audio": "ndarray", "numbers": "list", "shop": "list"}
    r = _post(app, "/predict", files={"image": ("x.png", png(24, 24), "image/png")}, data=fields)
    assert r.status_code == 200 and r.json()["audio"] is None  # missing: learn


@pytest.mark.parametrize(
    ("spec", "files", "data", "needle"),
    [
        (
            VQA_SPEC,
            {"extra": ("x.bin", bytes(range(256)) * 4, "application/octet-stream")},
            {"question": "q"},
            "extra: is not an input of this model; /predict takes ['image', 'question']",
        ),
        (VQA_SPEC, {}, {"question": "q", "colour": "red"}, "colour: is not an input of this model"),
        (
            VQA_SPEC,
            {"question": ("q.bin", b"\xff\xfe\x00binary", "application/octet-stream")},
            {},
            "question: must be text (UTF-8), got a binary file part",
        ),
        (VQA_SPEC, {}, {"question": "q", "image": "http://127.0.0.1:1/x.png"}, "image: must be an uploaded file"),
        (VQA_SPEC, {}, {"question": ["a", "b"]}, "question: is given more than once"),
        (
            BYOD_SPEC,
            {"audio": ("x.wav", b"RIFF\x00\x00not a wave", "audio/wav")},
            {"text": "t", "width": "1", "height": "2", "shop": "north"},
            "audio: ",
        ),
        (BYOD_SPEC, {}, {"text": "t", "width": "wide", "height": "2", "shop": "north"}, "width: must be a number"),
        (BYOD_SPEC, {"question": ("x.png", b"\x89PNG", "image/png")}, {"text": "t"}, "question: is not an input"),
    ],
)
def test_every_unknown_or_undecodable_part_is_a_4xx_naming_it(tmp_path, spec, files, data, needle):
    app = _form_app(_fake_service(tmp_path, spec))
    files = {"image": ("x.png", png(24, 24), "image/png"), **files}
    r = _post(app, "/predict", files=files, data=data)
    assert r.status_code == 400 and needle in r.text, (r.status_code, r.text)


def test_wrong_body_type_for_an_endpoint_is_a_415_saying_which_to_use(tmp_path):
    app = _form_app(_fake_service(tmp_path, VQA_SPEC))
    r = _post(app, "/predict", json={"image": "x", "question": "q"})
    assert r.status_code == 415 and "/predict_batch" in r.text
    r = _post(app, "/predict_batch", files={"image": ("x.png", b"x", "image/png")})
    assert r.status_code == 415 and "multipart forms go to /predict" in r.text


def test_large_parts_and_bodies_are_spooled_to_disk(tmp_path):
    """A part or body above MMOPS_SPOOL_BYTES is on disk while the request is served."""
    seen: dict = {}

    async def app(scope, receive, send):
        form = scope.get(service.FORM_SCOPE_KEY)
        if form is not None:
            seen["part_on_disk"] = form["image"].file._rolled
        else:
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            seen["body"] = len(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = service.ServingMiddleware(app, max_queue=4)
    big = os.urandom(3 * service.SPOOL_BYTES)
    assert _post(middleware, "/predict", files={"image": ("x.png", big, "image/png")}).status_code == 200
    assert seen["part_on_disk"] is True
    body = json.dumps({"items": [{"image": base64.b64encode(big).decode()}]}).encode()
    r = _post(middleware, "/predict_batch", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200 and seen["body"] == len(body)


def test_a_chunked_body_over_the_limit_is_a_413(monkeypatch):
    monkeypatch.setitem(service._served, "limits", SimpleNamespace(request_bytes=1000))

    async def never(scope, receive, send):
        raise AssertionError("the app must not be reached")

    async def chunks():
        for _ in range(10):
            yield b"x" * 300

    r = _post(
        service.ServingMiddleware(never),
        "/predict_batch",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and "over the limit of 1000" in r.text


# ---------------------------------------------------------------- 17: admission control


def test_beyond_the_queue_requests_get_503_with_retry_after_at_once():
    release = threading.Event()

    async def slow(scope, receive, send):
        while not release.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = service.ServingMiddleware(slow, max_queue=3)

    async def go() -> list[tuple[int, str | None, float]]:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client:

            async def one() -> tuple[int, str | None, float]:
                start = time.perf_counter()
                r = await client.post("/predict_batch", json={"items": [{"q": "x"}]})
                return r.status_code, r.headers.get("retry-after"), time.perf_counter() - start

            tasks = [asyncio.create_task(one()) for _ in range(10)]
            await asyncio.sleep(0.5)
            release.set()
            return await asyncio.gather(*tasks)

    results = asyncio.run(go())
    assert sorted(s for s, _, _ in results) == [200] * 3 + [503] * 7
    rejected = [(retry, seconds) for s, retry, seconds in results if s == 503]
    assert all(retry == "1" for retry, _ in rejected)
    assert all(seconds < 0.4 for _, seconds in rejected), rejected  # not held until the queue drains
    assert middleware.admission.requests == 0 and middleware.admission.bytes == 0  # everything released


def test_every_503_carries_retry_after():
    """A 503 from inside (the model's batch queue timing out) gets Retry-After too."""

    async def busy(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    r = _post(service.ServingMiddleware(busy), "/predict_batch", json={"items": []})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"


# ---------------------------------------------------------------- the served bento (slow)

# Resident memory of the whole service (`bentoml serve`, the HTTP front and the model process) while 16
# clients send maximum-size bodies, above its idle figure; README's serving section states the same.
# From the limits: at most 2 x MMOPS_MAX_REQUEST_BYTES (64 MiB) of bodies in flight, each about 3 times
# its size while a JSON body is parsed (bytes, str, decoded files), plus 2 images decoding at once.
GROWTH_BOUND = 512 * 2**20


def _bento(root: Path) -> str:
    from mmops.registry.store import Registry

    [version] = [v for v in Registry(f"sqlite:///{root / '.mmops' / 'registry.db'}").model_versions() if v.bento_tag]
    return version.bento_tag


def _tree_rss(pid: int) -> int:
    import psutil

    total = 0
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def _question(root: Path) -> str:
    import pandas as pd

    return str(pd.read_csv(root / "data" / "raw" / "manifest.csv")["question"].iloc[0])


@pytest.mark.slow
def test_memory_stays_bounded_under_maximum_size_bodies(trained_project):
    """16 clients, 30 s: half post the largest image the model accepts to /predict, half the largest
    /predict_batch body; every request is answered 2xx, 4xx or 503 and the service's RSS stays within
    GROWTH_BOUND of its idle figure."""
    from conftest import serve_bento

    root, _ = trained_project
    with serve_bento(root, _bento(root)) as (url, proc):
        limits = httpx.post(f"{url}/model", timeout=30).json()["limits"]
        assert limits["image_pixels"] < 16_000_000  # follows the model's image_size, not a generic limit
        side = int(limits["image_pixels"] ** 0.5)
        image = png(side, side)  # noise: the largest file at the largest size the model takes
        assert len(image) <= limits["image_bytes"]
        question = _question(root)
        item = {"image": base64.b64encode(image).decode(), "question": question}
        n = min(limits["batch_size"], (limits["request_bytes"] - 1024) // (len(item["image"]) + 200))
        batch = json.dumps({"items": [item] * n}).encode()
        assert n >= 1 and len(batch) > limits["request_bytes"] * 0.8, (n, len(batch), limits)

        httpx.post(f"{url}/predict_batch", content=batch, headers={"content-type": "application/json"}, timeout=120)
        idle = _tree_rss(proc.pid)  # warm: every code path has run once
        statuses: dict[int, int] = {}
        lost: list[str] = []
        stop_at = time.monotonic() + 30
        samples: list[int] = []

        def client(i: int) -> None:
            with httpx.Client(timeout=120) as http:
                while time.monotonic() < stop_at:
                    try:
                        if i % 2:
                            r = http.post(
                                f"{url}/predict",
                                files={"image": ("x.png", image, "image/png")},
                                data={"question": question},
                            )
                        else:
                            r = http.post(
                                f"{url}/predict_batch", content=batch, headers={"content-type": "application/json"}
                            )
                    except httpx.HTTPError as exc:
                        lost.append(f"{type(exc).__name__}: {exc}")
                        continue
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code == 503:
                        time.sleep(0.05)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            samples.append(_tree_rss(proc.pid))
            time.sleep(0.25)
        for t in threads:
            t.join()
        peak = max(samples)
        print(
            f"\nidle RSS {idle / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB (+{(peak - idle) / 2**20:.0f} MiB); "
            f"statuses {statuses}, lost {len(lost)}; bodies {len(image)} B (/predict), {len(batch)} B ({n} rows)"
        )
        assert not lost, lost[:5]
        assert all(200 <= s < 300 or 400 <= s < 500 or s == 503 for s in statuses), statuses
        assert statuses.get(200, 0) >= 16, statuses
        assert peak - idle < GROWTH_BOUND, f"idle {idle / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _multipart(port: int, image: bytes, question: str) -> bytes:
    """One /predict request as raw HTTP/1.1 bytes, built once: the load clients spend no CPU on it."""
    boundary = "mmopsboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + (
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="question"\r\n\r\n{question}'
            f"\r\n--{boundary}--\r\n"
        ).encode()
    )
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    await reader.readexactly(int(headers.get("content-length", 0)))
    return int(head[0].split()[1]), headers


async def _raw_clients(
    port: int, request: bytes, clients: int, seconds: float, warmup: float = 0.0
) -> list[tuple[int, float, str | None]]:
    """``clients`` keep-alive connections, each sending ``request`` again as soon as it is answered
    (after Retry-After on a 503); (status, seconds, Retry-After) per request, status 0 for one lost.

    Clients connect at random moments within the first half second, as independent clients do, and
    requests sent in the first ``warmup`` seconds are not returned: 32 requests written in the same
    millisecond are read one after another by the front's event loop, so the last of that burst is
    answered (refused, mostly) some 30-60 ms late on 2 cores; that is the burst, not the service.
    """
    results: list[tuple[int, float, str | None]] = []
    start = time.monotonic()
    until = start + warmup + seconds

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        await asyncio.sleep(rng.uniform(0, 0.5) if clients > 1 else 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < until:
                measured = time.monotonic() - start >= warmup
                t0 = time.perf_counter()
                writer.write(request)
                try:
                    status, headers = await asyncio.wait_for(_response(reader), timeout=60)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    results.append((0, time.perf_counter() - t0, None))  # lost: counted even in the warm-up
                    headers, status = {"connection": "close"}, 0
                else:
                    if measured:
                        results.append((status, time.perf_counter() - t0, headers.get("retry-after")))
                if headers.get("connection") == "close":
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if status == 503:  # as a well-behaved client does: Retry-After, with jitter
                    await asyncio.sleep(float(headers.get("retry-after") or 1) * rng.uniform(0.5, 1.5))
        finally:
            writer.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return results


@pytest.mark.slow
@pytest.mark.exclusive
# A timing bound on 2 cores, run alone by `make test` (marked exclusive). Its refusal tail (p95 60-128 ms
# against bounds of 55-62 ms, p50 1.5 ms, in CI and on a quiet machine) had two causes, both outside the
# admission queue: the 32 clients' first requests, all written at once and refused one after another
# (the last ~50 ms late), and full garbage collections of the service processes' 300,000-500,000
# start-up objects (350-880 ms each, measured under load), now frozen at start-up. Every assertion must
# hold in one run; up to two reruns let scheduling noise pass, never a refusal that waits every time.
@pytest.mark.flaky(reruns=2, only_rerun=["AssertionError"])
def test_overload_gets_503_with_retry_after_and_a_bounded_p99(trained_project):
    """Well past capacity (32 clients against a queue of 4): the excess gets 503 + Retry-After at
    once, and the p99 latency of the accepted requests stays within a multiple of one request's
    latency alone, instead of growing with the number of clients."""
    from conftest import serve_bento

    root, _ = trained_project
    queue = 4
    with serve_bento(root, _bento(root), env={"MMOPS_MAX_QUEUE": str(queue)}) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        request = _multipart(port, png(32, 32), _question(root))
        alone = asyncio.run(_raw_clients(port, request, 1, 3))
        single = _percentile([s for code, s, _ in alone if code == 200], 0.5)
        results = asyncio.run(_raw_clients(port, request, 32, 15, warmup=1))
    accepted = [s for code, s, _ in results if code == 200]
    rejected = [(s, retry) for code, s, retry in results if code == 503]
    share = len(rejected) / len(results)
    p99 = _percentile(accepted, 0.99)
    refused = [s for s, _ in rejected] or [0.0]
    print(
        f"\nsingle {single * 1000:.1f} ms ({len(alone)} requests); accepted {len(accepted)}, "
        f"p50 {_percentile(accepted, 0.5) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; 503 share {share:.0%}, "
        f"503 p50 {_percentile(refused, 0.5) * 1000:.1f} ms, p99 {_percentile(refused, 0.99) * 1000:.1f} ms"
    )
    assert {code for code, _, _ in results} <= {200, 503}, {code for code, _, _ in results}  # 0: lost
    assert rejected and all(retry == "1" for _, retry in rejected)
    assert len(accepted) >= 50
    # Little's law: with at most `queue` requests ahead of an accepted one, its latency is about
    # (queue + 1) service times; without admission control it would be about `clients` (32) of them.
    # The service time is measured under this same load (seconds per answered request while saturated)
    # rather than alone: a request alone took 6-22 ms depending on what else the 2 cores ran, which made
    # a bound on it flaky. 3x leaves room for the tail and still sits far below 32 service times.
    service = 15 / len(accepted)
    bound = 3 * (queue + 1) * max(service, single)
    assert p99 <= bound, (
        f"p99 {p99 * 1000:.1f} ms > {bound * 1000:.1f} ms (service time under load "
        f"{service * 1000:.1f} ms, a request alone {single * 1000:.1f} ms)"
    )
    # Refused at once, not after waiting in a queue: typically faster than a request alone. (Its p99
    # is left to the noise of a shared 2-core machine: a process not scheduled for a few hundred ms.)
    assert _percentile(refused, 0.5) <= 2 * single and _percentile(refused, 0.95) <= bound


@pytest.mark.slow
def test_mmops_serve_sigterm_leaves_no_process(trained_project):
    import psutil
    from conftest import BIN, free_port, project_env

    root, _ = trained_project
    port = free_port()
    log = root / f"mmops-serve-{port}.log"
    proc = subprocess.Popen(
        [BIN / "mmops", "serve", "--port", str(port)],
        cwd=root,
        env=project_env(root),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) >= 3, tree  # bentoml serve, the HTTP front, the model process
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(tree), [(p.pid, p.cmdline()) for p in _alive(tree)]
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            p.kill()
        proc.kill()
