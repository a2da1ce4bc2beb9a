"""The ``prepare`` stage on a large manifest: streamed in chunks vs read whole — time and peak memory.

    .venv/bin/python bench/prepare_stream.py                      # 200,000 rows, chunks of 10,000
    .venv/bin/python bench/prepare_stream.py --rows 5000 --chunk-rows 1000   # a quick check
    .venv/bin/python bench/prepare_stream.py --rows 20000 --profile          # where prepare's time goes

A seeded manifest (text ~5% distinct, 2,000 distinct 32x32 PNGs, width/height, shop, label, split) is
written once, then ``mmops.data.prepare.prepare`` runs on it twice, each time in a fresh interpreter so
that each way's peak resident memory (``ru_maxrss``) is its own and not the high-water mark of the other:
(a) streamed, ``data.chunk_rows`` = 10,000; (b) the whole manifest as one chunk. A third child only
imports ``mmops.data.prepare``: its memory is the floor both ways stand on, so the table shows what
prepare itself adds. Both ways must write the same prepared data; the run says whether they did.
Output: a table, the ratios, and bench/results/prepare_stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Only the standard library at module level: the baseline child imports this file, and must measure
# the memory of ``mmops.data.prepare``'s imports, not of this script's.

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
WORDS = [
    "red",
    "green",
    "blue",
    "small",
    "large",
    "round",
    "square",
    "bright",
    "dark",
    "old",
    "new",
    "shiny",
    "matte",
    "soft",
    "hard",
    "light",
    "heavy",
    "striped",
    "plain",
    "wooden",
    "metal",
    "glass",
    "paper",
    "cotton",
    "leather",
    "cheap",
    "fancy",
    "tiny",
    "huge",
    "simple",
    "classic",
    "modern",
]
SHOPS = [f"shop_{i:02d}" for i in range(40)]
LABELS = [f"class_{i}" for i in range(10)]


def peak_rss_mb() -> float:
    """This process's peak resident set so far; Linux reports KiB, macOS bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def make_params(rows: int, chunk_rows: int) -> dict[str, Any]:
    """The raw params both ways share; only ``data.chunk_rows`` differs between them."""
    return {
        "data": {"source": "manifest", "image_size": 32, "chunk_rows": chunk_rows},
        "inputs": {
            "text": {"modality": "text", "encoder": "bow_text"},
            "image": {"modality": "image", "encoder": "cnn_image"},
            "size": {"modality": "number", "columns": ["width", "height"]},
            "shop": {"modality": "category"},
        },
        "target": "label",
        "candidates": [{"name": "concat", "fusion": "concat"}],
    }


def generate(raw: Path, rows: int, images: int, seed: int) -> dict[str, int]:
    """Write ``raw/manifest.csv`` and the PNGs it refers to; returns the distinct counts per column.

    Width and height belong to the image (its size before resizing), so the ``size`` input has at most
    as many distinct values as there are images, as in a real catalogue; texts repeat (~5% distinct)
    because product captions do, which is what prepare's one-copy-per-distinct-value store is for.
    """
    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(seed)
    (raw / "images").mkdir(parents=True, exist_ok=True)
    for i in range(images):  # a plain colour with a darker square: cheap to write, not all alike
        pixels = np.empty((32, 32, 3), dtype=np.uint8)
        pixels[:] = rng.integers(0, 256, 3, dtype=np.uint8)
        x, y = rng.integers(0, 24, 2)
        pixels[y : y + 8, x : x + 8] //= 2
        Image.fromarray(pixels).save(raw / "images" / f"{i:05d}.png")

    n_text = max(1, round(rows * 0.05))
    texts: dict[str, None] = {}
    while len(texts) < n_text:
        words = rng.choice(WORDS, size=int(rng.integers(3, 8)))
        texts[" ".join(words)] = None
    text_pool = np.array(list(texts), dtype=object)
    image_paths = np.array([f"images/{i:05d}.png" for i in range(images)], dtype=object)
    widths, heights = rng.integers(200, 2000, images), rng.integers(200, 2000, images)

    img = rng.integers(0, images, rows)
    manifest = pd.DataFrame(
        {
            "text": text_pool[rng.integers(0, n_text, rows)],
            "image": image_paths[img],
            "width": widths[img],
            "height": heights[img],
            "shop": np.array(SHOPS, dtype=object)[rng.integers(0, len(SHOPS), rows)],
            "label": np.array(LABELS, dtype=object)[rng.integers(0, len(LABELS), rows)],
            "split": np.where(rng.random(rows) < 0.8, "train", "test"),
        }
    )
    manifest.to_csv(raw / "manifest.csv", index=False)
    return {
        "text": int(manifest["text"].nunique()),
        "image": int(manifest["image"].nunique()),
        "size": int(manifest[["width", "height"]].drop_duplicates().shape[0]),
        "shop": int(manifest["shop"].nunique()),
    }


def child(args: argparse.Namespace) -> None:
    """Runs in a fresh interpreter: import (and, unless baseline, prepare), then write the figures."""
    t0 = time.perf_counter()
    from mmops.config import Params
    from mmops.data.prepare import prepare

    result: dict[str, Any] = {"import_seconds": time.perf_counter() - t0, "import_rss_mb": peak_rss_mb()}
    if args.child == "prepare":
        params = Params.model_validate(json.loads(args.params))
        t0 = time.perf_counter()
        result["summary"] = prepare(Path(args.raw), Path(args.out), params)
        result["seconds"] = time.perf_counter() - t0
    result["peak_rss_mb"] = peak_rss_mb()
    Path(args.result).write_text(json.dumps(result))


def spawn(kind: str, work: Path, name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """One fresh child process; its figures come back through a file, since rich may print to stdout."""
    result = work / f"{name}.result.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        kind,
        "--result",
        str(result),
        "--raw",
        str(work / "raw"),
        "--out",
        str(work / name),
        "--params",
        json.dumps(params or {}),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def same_outputs(a: Path, b: Path) -> bool:
    """Streaming must not change the result: the same rows, splits and stored values either way."""
    import pandas as pd

    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    for name in names:
        if name.endswith(".parquet"):
            if not pd.read_parquet(a / name).equals(pd.read_parquet(b / name)):
                return False
        elif (a / name).read_bytes() != (b / name).read_bytes():
            return False
    return True


def profile(work: Path, rows: int, chunk_rows: int, top: int) -> None:
    """The streamed way in this process under cProfile: the functions prepare spends its time in."""
    import cProfile
    import pstats

    from mmops.config import Params
    from mmops.data.prepare import prepare

    params = Params.model_validate(make_params(rows, chunk_rows))
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.runcall(prepare, work / "raw", work / "profiled", params)
    print(f"prepare, {rows:,} rows, chunks of {chunk_rows:,}: {time.perf_counter() - t0:.1f} s (under cProfile)")
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)


def report(
    rows: int,
    chunk_rows: int,
    distinct: dict[str, int],
    gen_s: float,
    base: dict[str, Any],
    runs: list[dict[str, Any]],
    identical: bool,
) -> dict[str, Any]:
    """Print the table and ratios; return what goes into bench/results/prepare_stream.json."""
    from rich.console import Console
    from rich.table import Table

    a, b = runs
    floor = base["peak_rss_mb"]
    for run in runs:
        run["added_rss_mb"] = run["peak_rss_mb"] - floor
        run["rows_per_s"] = rows / run["seconds"]
    ratios = {
        "peak_rss_b_over_a": b["peak_rss_mb"] / a["peak_rss_mb"],
        "added_rss_b_over_a": b["added_rss_mb"] / a["added_rss_mb"] if a["added_rss_mb"] > 0 else None,
        "time_a_over_b": a["seconds"] / b["seconds"],
    }
    table = Table(title=f"prepare: {rows:,} rows ({', '.join(f'{k} {v:,}' for k, v in distinct.items())} distinct)")
    for col in ("way", "chunk_rows", "seconds", "peak RSS MB", "added MB", "rows/s"):
        table.add_column(col, justify="left" if col == "way" else "right", no_wrap=True)
    table.add_row("imports only", "-", f"{base['import_seconds']:.2f}", f"{floor:.0f}", "0", "-")
    for run in runs:
        table.add_row(
            run["way"],
            f"{run['chunk_rows']:,}",
            f"{run['seconds']:.1f}",
            f"{run['peak_rss_mb']:.0f}",
            f"{run['added_rss_mb']:.0f}",
            f"{run['rows_per_s']:,.0f}",
        )
    console = Console()
    console.print(table)
    added = ratios["added_rss_b_over_a"]
    console.print(
        f"peak memory b/a: {ratios['peak_rss_b_over_a']:.2f}x"
        + (f"   (memory prepare adds, b/a: {added:.2f}x)" if added is not None else "")
        + f"   time a/b: {ratios['time_a_over_b']:.2f}x"
    )
    console.print(
        f"added MB: peak RSS over the imports-only child. Same prepared data both ways: "
        f"{'yes' if identical else 'NO'}. Data set written in {gen_s:.1f} s; cores: {os.cpu_count()}"
    )
    if rows <= chunk_rows:
        console.print(f"note: rows ({rows:,}) <= chunk_rows ({chunk_rows:,}): both ways read one chunk")
    return {
        "benchmark": "prepare_stream",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "rows": rows,
        "distinct": distinct,
        "generate_seconds": gen_s,
        "identical_outputs": identical,
        "baseline": {"import_seconds": base["import_seconds"], "peak_rss_mb": floor},
        "runs": [
            {k: r[k] for k in ("way", "chunk_rows", "seconds", "peak_rss_mb", "added_rss_mb", "rows_per_s")}
            for r in runs
        ],
        "ratios": ratios,
        "summary": a["summary"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="manifest rows")
    parser.add_argument("--chunk-rows", type=int, default=10_000, help="way (a): rows per chunk (>= 100)")
    parser.add_argument("--images", type=int, default=2_000, help="distinct images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="write the data set and outputs here and keep them")
    parser.add_argument("--profile", action="store_true", help="instead: profile way (a) in-process, print top")
    parser.add_argument("--top", type=int, default=25, help="--profile: functions shown per ordering")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for prepare_stream.json")
    for hidden in ("--child", "--result", "--raw", "--params"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.chunk_rows < 100 or args.rows < 100:
        parser.error("--rows and --chunk-rows must be at least 100 (data.chunk_rows' minimum)")

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="mmops-bench-prepare-")
    work = args.workdir or Path(tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        distinct = generate(work / "raw", args.rows, args.images, args.seed)
        gen_s = time.perf_counter() - t0
        print(f"data set: {args.rows:,} rows, {args.images:,} images, in {work} ({gen_s:.1f} s)", flush=True)
        if args.profile:
            profile(work, args.rows, args.chunk_rows, args.top)
            return
        base = spawn("baseline", work, "baseline")
        runs = []
        for way, chunk_rows in (("a: streamed", args.chunk_rows), ("b: whole file", args.rows)):
            print(f"running {way} (chunk_rows {chunk_rows:,}) ...", flush=True)
            run = spawn("prepare", work, f"prepared_{way[0]}", make_params(args.rows, chunk_rows))
            runs.append({"way": way, "chunk_rows": chunk_rows, **run})
        identical = same_outputs(work / "prepared_a", work / "prepared_b")
        figures = report(args.rows, args.chunk_rows, distinct, gen_s, base, runs, identical)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "prepare_stream.json").write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.out / 'prepare_stream.json'}")
    finally:
        if tmp:
            tmp.cleanup()


if __name__ == "__main__":
    main()
