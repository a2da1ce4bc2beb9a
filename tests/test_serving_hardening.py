"""The served bento against bad requests, fuzzing and a soak; and the decoding limits it relies on.

The HTTP tests share one server of the trained project's bento, started with small limits so that
each limit can be crossed cheaply; every bad request must get a 4xx that names the field and the
limit, and the server must keep answering good requests correctly.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import random
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import serve_bento
from PIL import Image

from mmops.data.images import BadImageError, load_image
from mmops.serving.predictor import InputError, Limits, Predictor, RowDecoder

LIMITS = {
    "MMOPS_MAX_IMAGE_BYTES": "100000",
    "MMOPS_MAX_IMAGE_PIXELS": "1000000",
    "MMOPS_MAX_REQUEST_BYTES": "500000",
    "MMOPS_MAX_TEXT_CHARS": "200",
    "MMOPS_MAX_BATCH": "8",
}


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG of a few dozen bytes whose header declares ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def noise_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- fast: decoding and limits


def test_decompression_bomb_is_refused_from_its_header():
    start = time.perf_counter()
    with pytest.raises(BadImageError, match="over the limit of"):
        load_image(bomb_png(), 64)
    with pytest.raises(BadImageError, match="over the limit of 1000000 pixels"):
        load_image(bomb_png(2000, 2000), 64, max_pixels=1_000_000)
    assert time.perf_counter() - start < 1.0  # nothing was decompressed


def test_limits_come_from_the_environment(monkeypatch):
    for key, value in LIMITS.items():
        monkeypatch.setenv(key, value)
    limits = Limits()
    assert (limits.image_bytes, limits.image_pixels, limits.request_bytes, limits.text_chars, limits.batch_size) == (
        100000,
        1000000,
        500000,
        200,
        8,
    )
    monkeypatch.setenv("MMOPS_MAX_IMAGE_BYTES", "ten")
    with pytest.raises(ValueError, match="MMOPS_MAX_IMAGE_BYTES='ten': must be an integer"):
        Limits()


def test_row_decoder_names_field_and_limit(monkeypatch):
    for key, value in LIMITS.items():
        monkeypatch.setenv(key, value)
    decoder = RowDecoder(
        {"inputs": {"question": {"modality": "text"}, "image": {"modality": "image"}}, "image_size": 16}
    )
    ok = noise_png(20, 20)
    assert decoder.validate({"image": ok, "question": " what? "})["question"] == "what?"
    cases = [
        ({"image": ok, "question": "x" * 201}, "question: is 201 characters, over the limit of 200"),
        ({"image": noise_png(200, 200), "question": "q"}, "image: is .* bytes, over the limit of 100000"),
        ({"image": bomb_png(1200, 1000), "question": "q"}, "image: .*over the limit of 1000000 pixels"),
        ({"image": ok[:60], "question": "q"}, "image: corrupt or truncated"),
        ({"image": "not base64!", "question": "q"}, "image: is not valid base64"),
        ({"image": ok, "question": "q", "audio": "x"}, "audio: is not an input of this model"),
        ({"question": "q"}, "image: is required"),
        ({"image": 3, "question": "q"}, "image: must be image bytes"),
    ]
    for row, message in cases:
        with pytest.raises(InputError, match=message):
            decoder.validate(row)


# ---------------------------------------------------------------- the served bento


@pytest.fixture(scope="module")
def hardened(trained_project):
    root, _ = trained_project
    from mmops.registry.store import Registry

    [version] = [v for v in Registry(f"sqlite:///{root / '.mmops' / 'registry.db'}").model_versions() if v.bento_tag]
    with serve_bento(root, version.bento_tag, env=LIMITS) as (url, proc):
        yield url, root, version, proc


def _rows(root: Path, n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    import pandas as pd

    manifest = pd.read_csv(root / "data" / "raw" / "manifest.csv")
    test = manifest[manifest["split"] == "test"].sample(n, random_state=seed)
    return [((root / "data" / "raw" / r.image).read_bytes(), r.question) for r in test.itertuples()]


def _post(url: str, image: bytes | None, question: str | None, **kw) -> httpx.Response:
    files = {"image": ("x.png", image, "image/png")} if image is not None else None
    data = {"question": question} if question is not None else {}
    return httpx.post(f"{url}/predict", files=files, data=data, timeout=30, **kw)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.slow
def test_health_metrics_and_model_version_everywhere(hardened):
    url, root, version, _ = hardened
    ready = httpx.get(f"{url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json() == {"ready": True, "model": version.ref}
    assert httpx.get(f"{url}/livez", timeout=10).status_code == 200
    image, question = _rows(root, 1)[0]
    ok = _post(url, image, question)
    assert ok.status_code == 200 and ok.json()["model"] == version.ref
    assert ok.headers["x-mmops-model"] == version.ref
    bad = _post(url, image, "")
    assert bad.status_code == 400 and bad.headers["x-mmops-model"] == version.ref
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert "bentoml_service_request_total" in metrics or "request_total" in metrics
    info = httpx.post(f"{url}/model", timeout=10).json()
    assert info["model"] == version.ref and info["parameter_devices"] == ["cpu"]
    assert info["limits"]["image_bytes"] == 100000
    batching = info["batching"]  # the answered prediction crossed to the model process in a front batch
    assert batching["prediction_batches"] >= 1 and batching["prediction_rows"] >= batching["prediction_batches"]


def _bad_requests(url: str, good: bytes) -> list[tuple[str, dict, str]]:
    """(name, httpx.post kwargs, text the error must contain) for each kind of bad request."""
    form = {"question": "what shape is in the image?"}
    boundary = "b0undary"
    return [
        ("missing image", {"data": form}, "image"),
        ("missing question", {"files": {"image": ("x.png", good, "image/png")}}, "question"),
        (
            "empty question",
            {"files": {"image": ("x.png", good, "image/png")}, "data": {"question": "  "}},
            "question: must be a non-empty string",
        ),
        (
            "long question",
            {"files": {"image": ("x.png", good, "image/png")}, "data": {"question": "x" * 201}},
            "question: is 201 characters, over the limit of 200",
        ),
        (
            "not an image",
            {"files": {"image": ("x.txt", b"hello", "text/plain")}, "data": form},
            "image: not a decodable image",
        ),
        (
            "truncated image",
            {"files": {"image": ("x.png", good[: len(good) // 2], "image/png")}, "data": form},
            "image: corrupt or truncated",
        ),
        (
            "image over byte limit",
            {"files": {"image": ("x.png", noise_png(250, 250), "image/png")}, "data": form},
            "over the limit of 100000",
        ),
        ("decompression bomb", {"files": {"image": ("x.png", bomb_png(), "image/png")}, "data": form}, "pixels"),
        (
            "image over pixel limit",
            {"files": {"image": ("x.png", bomb_png(1100, 1000), "image/png")}, "data": form},
            "over the limit of 1000000 pixels",
        ),
        (
            "body over request limit",
            {"files": {"image": ("x.png", b"\0" * 600_000, "image/png")}, "data": form},
            "over the limit of 500000",
        ),
        (
            "URL instead of a file",
            {"data": {**form, "image": "http://127.0.0.1:1/x.png"}},
            "image: must be an uploaded file",
        ),
        (
            "extra binary part",
            {
                "files": {
                    "image": ("x.png", good, "image/png"),
                    "extra": ("x.bin", bytes(range(256)), "application/octet-stream"),
                },
                "data": form,
            },
            "extra: is not an input of this model",
        ),
        (
            "extra text part",
            {"files": {"image": ("x.png", good, "image/png")}, "data": {**form, "colour": "red"}},
            "colour: is not an input of this model",
        ),
        (
            "binary question part",
            {
                "files": {
                    "image": ("x.png", good, "image/png"),
                    "question": ("q.bin", b"\xff\xfe\x00", "application/octet-stream"),
                }
            },
            "question: must be text",
        ),
        ("JSON to /predict", {"json": {"question": "q"}}, "/predict_batch"),
        (
            "malformed multipart",
            {"content": b"--nope\r\n\r\n", "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}},
            "multipart body",
        ),
    ]


@pytest.mark.slow
def test_each_bad_request_gets_4xx_naming_field_and_limit(hardened):
    url, root, _, _ = hardened
    good, question = _rows(root, 1)[0]
    for name, kwargs, needle in _bad_requests(url, good):
        start = time.perf_counter()
        r = httpx.post(f"{url}/predict", timeout=30, **kwargs)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        assert needle in r.text, (name, r.text)
        assert time.perf_counter() - start < 10, name
    b64 = _b64(good)
    batch_cases = [
        ({"items": [{"image": b64, "audio": "x"}]}, "items[0].audio: is not an input of this model"),
        ({"items": [{"image": b64, "question": "q"}, {"image": b64}]}, "items[1].question: is required"),
        ({"items": [{"image": b64, "question": "q"}] * 9}, "at most 8 items"),
        ({"items": [{"image": "%%%", "question": "q"}]}, "items[0].image: is not valid base64"),
        ({"items": []}, "at least 1 item"),
    ]
    for body, needle in batch_cases:
        r = httpx.post(f"{url}/predict_batch", json=body, timeout=30)
        assert r.status_code == 400 and needle in r.text, (body.keys(), r.status_code, r.text)
    assert _post(url, good, question).status_code == 200  # and it keeps serving


@pytest.mark.slow
def test_a_bad_request_never_fails_the_good_ones_batched_with_it(hardened):
    """Good and bad requests at once: adaptive batching must not let one spoil another."""
    url, root, _, _ = hardened
    rows = _rows(root, 24, seed=1)
    expected = _expected(root, rows)
    outcomes: list[tuple[str, int, str]] = []

    def good(i: int) -> None:
        r = _post(url, *rows[i])
        answer = r.json()["answer"] if r.status_code == 200 else r.text
        outcomes.append(("good", r.status_code, "right" if answer == expected[i] else f"wrong: {answer}"))

    def bad(i: int) -> None:
        r = _post(url, rows[i][0][:100], rows[i][1])
        outcomes.append(("bad", r.status_code, r.text))

    threads = [threading.Thread(target=f, args=(i,)) for i in range(len(rows)) for f in (good, bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(s for kind, s, _ in outcomes if kind == "good") == [200] * len(rows), outcomes
    assert all(text == "right" for kind, _, text in outcomes if kind == "good"), outcomes
    assert sorted(s for kind, s, _ in outcomes if kind == "bad") == [400] * len(rows), outcomes


def _expected(root: Path, rows: list[tuple[bytes, str]]) -> list[str]:
    """What the trained model answers in this process, one row at a time."""
    model_dir = root / "models" / json.loads((root / "metrics" / "best.json").read_text())["best"]
    predictor = Predictor(model_dir)
    return [predictor.predict([{"image": img, "question": q}])[0]["answer"] for img, q in rows]


@pytest.mark.slow
def test_openapi_fuzz_never_gets_a_5xx(hardened):
    """Schemathesis draws requests from the service's own OpenAPI schema (bounded examples)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    url, _, _, _ = hardened
    schema = schemathesis.openapi.from_url(f"{url}/docs.json")
    failures: list[tuple[str, int, str]] = []
    seen: set[int] = set()

    def fuzz(operation) -> None:
        @settings(
            max_examples=25, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy())
        def call(case) -> None:
            response = case.call(base_url=url, timeout=30)
            seen.add(response.status_code)
            if response.status_code >= 500:
                failures.append((operation.path, response.status_code, response.text[:300]))

        call()

    for result in schema.get_all_operations():
        fuzz(result.ok())
    assert not failures, failures
    assert 200 in seen and 400 in seen


def _tree_rss(pid: int) -> int:
    import psutil

    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


@pytest.mark.slow
def test_soak_mixed_traffic_memory_stays_flat(hardened):
    """About 35 s of good and bad requests from 6 clients: every good one right, memory flat."""
    url, root, _, proc = hardened
    rows = _rows(root, 30, seed=2)
    expected = _expected(root, rows)
    bad = _bad_requests(url, rows[0][0])
    counts = {"good": 0, "bad": 0}
    problems: list[str] = []
    stop_at = time.monotonic() + 35
    samples: list[tuple[float, int]] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=30) as http:
            while time.monotonic() < stop_at:
                if rng.random() < 0.7:
                    i = rng.randrange(len(rows))
                    r = http.post(
                        f"{url}/predict",
                        files={"image": ("x.png", rows[i][0], "image/png")},
                        data={"question": rows[i][1]},
                    )
                    if r.status_code != 200 or r.json()["answer"] != expected[i]:
                        problems.append(f"good {i}: {r.status_code} {r.text[:200]}")
                    counts["good"] += 1
                else:
                    name, kwargs, _ = rng.choice(bad)
                    r = http.post(f"{url}/predict", **kwargs)
                    if not 400 <= r.status_code < 500:
                        problems.append(f"bad {name}: {r.status_code} {r.text[:200]}")
                    counts["bad"] += 1

    threads = [threading.Thread(target=client, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        samples.append((time.monotonic(), _tree_rss(proc.pid)))
        time.sleep(1)
    for t in threads:
        t.join()
    assert not problems, problems[:10]
    assert counts["good"] > 50 and counts["bad"] > 20, counts
    # Flat: after a warm-up third, the server's memory grows by less than 10% (or 40 MB) to the end.
    warm = [rss for t, rss in samples if t > stop_at - 35 * 2 / 3]
    assert max(warm) - warm[0] < max(40 * 2**20, 0.10 * warm[0]), [r // 2**20 for _, r in samples]
