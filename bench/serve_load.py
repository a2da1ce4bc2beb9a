"""Load test of the built bento, next to the same model's in-process throughput (the limit).

    python bench/serve_load.py [--project DIR] [--clients 16] [--seconds 20]

It serves the project's latest bento (registry ``.mmops/registry.db``, BentoML store ``.mmops/bentoml``;
``make demo`` makes one at the repo root) on 127.0.0.1 twice, with adaptive batching and without
(``MMOPS_ADAPTIVE_BATCHING=0``, one request per forward), and drives each with N concurrent clients
for T seconds posting easy-VQA test images and questions to ``/predict``; then, the same way, a
trivial BentoML service of the same endpoint shape (``bench/floor_service.py``: the multipart form
parsed, the image decoded, a constant answer), the framework's floor on this machine, of which mmops'
throughput at 16 clients is reported as a fraction. Before that it times the
model in this process on the same inputs (decode + forward, batches of the service's maximum size),
which no HTTP service of it can beat. Without a bento it saves an untrained model of the project's
architecture (same compute, meaningless answers) into a scratch store and builds one.

The clients are a few lines of asyncio over keep-alive sockets with pre-built request bytes, so that
on a small machine they take as little CPU as possible from the server they measure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "serve_load.md"


@dataclass
class LoadResult:
    label: str
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


# ---------------------------------------------------------------- model and bento


def _env(project: Path, bentoml_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BENTOML_", "MMOPS_"))}
    env.update(
        {
            "BENTOML_HOME": str(bentoml_home),
            "BENTOML_DO_NOT_TRACK": "true",
            "HF_HUB_OFFLINE": "1",
            "MMOPS_PROJECT": str(project),
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


def find_bento(project: Path) -> tuple[str, Path, str] | None:
    """(bento tag, BENTOML_HOME, model tag) of the project's latest packaged version, if any."""
    db = project / ".mmops" / "registry.db"
    if not db.is_file():
        return None
    from mmops.registry.store import Registry

    versions = [v for v in Registry(f"sqlite:///{db}").model_versions() if v.bento_tag]
    if not versions:
        return None
    return versions[0].bento_tag, project / ".mmops" / "bentoml", versions[0].model_tag


def build_scratch_bento(project: Path, home: Path) -> tuple[str, Path, str]:
    """An untrained model with the project's architecture, saved and packaged in a scratch store."""
    import easy_vqa

    from mmops.config import load_params
    from mmops.core.model import MultimodalModel
    from mmops.training.loop import build_spec

    os.environ["BENTOML_HOME"] = str(home)
    from mmops.serving.package import build_bento, save_to_store

    params_file = project / "params.yaml" if (project / "params.yaml").is_file() else REPO / "params.yaml"
    params = load_params(params_file)
    model = MultimodalModel(build_spec(params, params.candidates[0], list(easy_vqa.get_answers())))
    artifact = model.save(home.parent / "model")
    model_tag = save_to_store(artifact, params.registry.model_name, {"registry_version": "untrained/bench"}, {})
    return build_bento(model_tag), home, model_tag


# ---------------------------------------------------------------- inputs


def load_rows(n: int) -> list[tuple[bytes, str]]:
    import easy_vqa

    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    rng = random.Random(0)
    picks = rng.sample(range(len(questions)), min(n, len(questions)))
    return [(Path(paths[image_ids[i]]).read_bytes(), questions[i]) for i in picks]


def multipart_request(port: int, image: bytes, question: str) -> bytes:
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + image
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="question"\r\n\r\n{question}'
        f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# ---------------------------------------------------------------- in-process limit


def in_process(model_dir: Path, rows: list[tuple[bytes, str]], batch: int, seconds: float) -> float:
    """Rows per second of decode + forward in this process, batches of ``batch``."""
    from mmops.serving.predictor import Predictor

    predictor = Predictor(model_dir, device="cpu")
    records = [{"image": img, "question": q} for img, q in rows]
    predictor.predict(records[:64])  # warm the text cache and the allocator, as the server's warm-up does
    for start in range(0, len(records), 64):
        predictor.predict(records[start : start + 64])
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        start = random.randrange(0, len(records) - batch)
        predictor.predict(records[start : start + batch])
        done += batch
    return done / (time.perf_counter() - t0)


# ---------------------------------------------------------------- HTTP load


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readline()).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _client(port: int, requests: list[bytes], until: float, result: LoadResult, seed: int) -> None:
    rng = random.Random(seed)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            writer.write(rng.choice(requests))
            try:
                status = await asyncio.wait_for(_read_response(reader), timeout=30)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                result.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status == 200:
                result.latencies.append(time.perf_counter() - t0)
            else:
                result.errors += 1
    finally:
        writer.close()


async def _drive(port: int, requests: list[bytes], clients: int, seconds: float, label: str) -> LoadResult:
    result = LoadResult(label, seconds)
    until = time.perf_counter() + seconds
    await asyncio.gather(*(_client(port, requests, until, result, i) for i in range(clients)))
    return result


def drive(port: int, requests: list[bytes], clients: int, seconds: float, label: str) -> LoadResult:
    return asyncio.run(_drive(port, requests, clients, seconds, label))


# ---------------------------------------------------------------- server


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(bento: str, env: dict[str, str], port: int, log: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    import httpx

    bentoml = Path(sys.executable).parent / "bentoml"
    out = log.open("w")
    proc = subprocess.Popen(
        [str(bentoml), "serve", bento, "--host", "127.0.0.1", "--port", str(port), *extra],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"bento not ready in 120 s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


# ---------------------------------------------------------------- report


def report(
    args: argparse.Namespace, bento: str, limit_bs: float, limit_1: float, runs: list[LoadResult], batch_max: int
) -> str:
    batched, single, floor = runs[0], runs[1], runs[2]
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    lines = [
        "# Serving load test (`bench/serve_load.py`)",
        "",
        f"Run {dt.datetime.now().isoformat(timespec='minutes')} on {os.cpu_count()} CPU cores ({cpu}), "
        f"shared with other work, so absolute figures are noisy; the ratios come from one run.",
        f"Bento `{bento}`; {args.clients} concurrent clients for {args.seconds:.0f} s per configuration "
        f"(in {args.rounds} turns, the three configurations interleaved, each turn after 1 s not counted), "
        "each posting a random easy-VQA test image and its question to `/predict` (multipart), "
        "one request at a time over a keep-alive connection.",
        "",
        "| configuration | requests/s | p50 ms | p99 ms | errors |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(f"| {r.label} | {r.throughput:.1f} | {r.pct(0.5):.1f} | {r.pct(0.99):.1f} | {r.errors} |")
    lines += [
        f"| in-process `Predictor.predict`, batches of {batch_max} (the limit) | {limit_bs:.1f} | | | |",
        f"| in-process `Predictor.predict`, batches of 1 | {limit_1:.1f} | | | |",
        "",
        f"- Service with adaptive batching / in-process limit: **{batched.throughput / limit_bs:.0%}** (goal ≥ 70%).",
        f"- Adaptive batching / batch size 1 (`MMOPS_ADAPTIVE_BATCHING=0`): "
        f"**{batched.throughput / max(single.throughput, 1e-9):.2f}×** (goal ≥ 3×).",
        f"- Service with adaptive batching / the BentoML floor (same endpoint shape, image decoded, constant "
        f"answer, `bench/floor_service.py`): **{batched.throughput / max(floor.throughput, 1e-9):.0%}** "
        "(goal ≥ 70%).",
        "",
        "Not measured on a GPU: no GPU was available. `scripts/gpu_check.sh` is the prepared check for a "
        "GPU host (latency and throughput at batch sizes 1, 8 and 32 on CUDA).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=REPO, help="project with a packaged bento (default: repo)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="per configuration (at most 120)")
    parser.add_argument("--rounds", type=int, default=4, help="turns each configuration takes, interleaved")
    parser.add_argument("--rows", type=int, default=2000, help="distinct test rows to draw requests from")
    parser.add_argument("--write", type=Path, default=RESULTS, help="markdown report ('-' for none)")
    args = parser.parse_args()
    args.seconds = min(args.seconds, 120.0)
    project = args.project.resolve()

    found = find_bento(project)
    scratch = None
    if found is None:
        scratch = tempfile.TemporaryDirectory(prefix="mmops-bench-")
        print(f"no packaged bento in {project}: building an untrained one of its architecture")
        found = build_scratch_bento(project, Path(scratch.name) / "bentoml")
    bento, home, model_tag = found
    env = _env(project, home)
    os.environ["BENTOML_HOME"] = str(home)
    import bentoml

    from mmops.serving.service import BATCH_MAX_SIZE

    model_dir = Path(bentoml.models.get(model_tag).path)
    rows = load_rows(args.rows)
    print(f"bento {bento}, model {model_tag}; {len(rows)} test rows")

    limit_bs = in_process(model_dir, rows, BATCH_MAX_SIZE, min(args.seconds, 10))
    limit_1 = in_process(model_dir, rows, 1, min(args.seconds, 10))
    print(f"in-process: {limit_bs:.1f} rows/s at batch {BATCH_MAX_SIZE}, {limit_1:.1f} rows/s at batch 1")

    # All three servers stay up and take turns, a slice of each round apiece, so that load from
    # anything else on the machine falls on all three alike (run one after another, a busy minute
    # could land on one of them only and move the ratio by tens of points).
    configs = [
        (f"service, adaptive batching (max {BATCH_MAX_SIZE})", bento, {}, ()),
        ("service, batch size 1", bento, {"MMOPS_ADAPTIVE_BATCHING": "0"}, ()),
        ("BentoML floor (constant answer)", "floor_service:Floor", {}, ("--working-dir", str(REPO / "bench"))),
    ]
    log_dir = Path(tempfile.mkdtemp(prefix="mmops-serve-log-"))
    servers = []
    try:
        for i, (label, target, extra, flags) in enumerate(configs):
            port = free_port()
            servers.append((label, port, serve(target, {**env, **extra}, port, log_dir / f"serve-{i}.log", flags)))
        loads = {label: [multipart_request(port, img, q) for img, q in rows] for label, port, _ in servers}
        for label, port, _ in servers:
            drive(port, loads[label], args.clients, 3, "warm-up")  # caches, allocator, connections
        runs = [LoadResult(label, 0.0) for label, _, _ in servers]
        for round_ in range(args.rounds):
            for run, (label, port, _) in zip(runs, servers, strict=True):
                drive(port, loads[label], args.clients, 1, "turn warm-up")  # fresh connections, not counted
                part = drive(port, loads[label], args.clients, args.seconds / args.rounds, label)
                run.seconds += part.seconds
                run.latencies += part.latencies
                run.errors += part.errors
                for status, n in part.statuses.items():
                    run.statuses[status] = run.statuses.get(status, 0) + n
                print(f"round {round_ + 1}/{args.rounds} {label}: {part.throughput:.1f} req/s")
    finally:
        for _, _, proc in servers:
            stop(proc)
    for run in runs:
        print(
            f"{run.label}: {run.throughput:.1f} req/s, p50 {run.pct(0.5):.1f} ms, "
            f"p99 {run.pct(0.99):.1f} ms, errors {run.errors} {run.statuses}"
        )

    text = report(args, bento, limit_bs, limit_1, runs, BATCH_MAX_SIZE)
    print("\n" + text)
    if str(args.write) != "-":
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
        figures = {
            "clients": args.clients,
            "seconds": args.seconds,
            "cores": os.cpu_count(),
            "in_process_rows_per_s": {"batch_max": round(limit_bs, 1), "batch_1": round(limit_1, 1)},
            **{
                r.label: {
                    "requests_per_s": round(r.throughput, 1),
                    "p50_ms": round(r.pct(0.5), 1),
                    "p99_ms": round(r.pct(0.99), 1),
                    "errors": r.errors,
                }
                for r in runs
            },
            "fraction_of_floor": round(runs[0].throughput / max(runs[2].throughput, 1e-9), 3),
            "fraction_of_in_process": round(runs[0].throughput / limit_bs, 3),
            "batching_gain": round(runs[0].throughput / max(runs[1].throughput, 1e-9), 3),
        }
        args.write.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
        print(f"written to {args.write} and {args.write.with_suffix('.json')}")
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
