"""A 5-candidate sweep with every encoder frozen: cached features vs recomputing them, Dask 2 vs 1 worker.

    .venv/bin/python bench/sweep.py                       # 3,000 questions per split, 2 epochs
    .venv/bin/python bench/sweep.py --limit 0 --skip-naive  # full data set: peak memory of the sweep

Steps, all in one run on this machine:
1. a fresh project trains one candidate (the "earlier run") whose CNN image encoder is then reused,
   frozen, by every sweep candidate (``inputs.image.init_from`` + ``freeze``); MiniLM encodes questions;
2. ``mmops sweep`` (5 fusions) runs the DVC stages, so ``featurize`` caches both encoders' features;
3. in-process, the same 5 candidates train on the cached features, then with ``feature_cache: false``
   (every encoder recomputed for every row, every epoch) — ratio 1; frozen checkpoints are loaded
   once before both timings;
4. ``mmops sweep --force`` on a Dask LocalCluster with 1 worker, then 2 workers — ratio 2;
5. the peak resident memory of the sweep processes.
Output: the figures, and bench/results/sweep.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BIN = Path(sys.executable).parent
FUSIONS = ["concat", "product", "gated", "weighted_sum", "late"]


def report(name: str, lines: list[str]) -> None:
    """Print the figures and keep them in bench/results/<name>, which README quotes."""
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text("```\n" + "\n".join(lines) + "\n```\n")


def mmops(root: Path, *args: str) -> float:
    env = {**os.environ, "MMOPS_PROJECT": str(root), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for key in [k for k in env if k.startswith(("PREFECT_", "BENTOML_"))]:
        del env[key]
    t0 = time.perf_counter()
    proc = subprocess.run([BIN / "mmops", *args], cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"mmops {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def write_params(root: Path, limit: int, epochs: int, image: dict, candidates: list, sweep: dict | None) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["limit"] = limit
    params["train"].update(epochs=epochs, patience=epochs, threads=1)
    params["inputs"]["image"].update(image)
    params["candidates"] = candidates
    params.pop("sweep", None)
    if sweep:
        params["sweep"] = sweep
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=3000, help="questions per split (0 = all)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--skip-naive", action="store_true", help="skip the recompute-every-epoch baseline")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="mmops-bench-sweep-")) / "proj"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root)
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    out: list[str] = [f"questions per split: {args.limit or 'all'}, epochs: {args.epochs}, cores: {os.cpu_count()}"]

    # 1. The earlier run whose CNN the sweep reuses.
    write_params(root, args.limit, 1, {}, [{"name": "earlier", "fusion": "concat"}], None)
    t = mmops(root, "sweep")
    encoder_dir = root / "encoders" / "cnn-v1"
    shutil.copytree(root / "models" / "earlier", encoder_dir)
    out.append(f"earlier run (trains the CNN that is reused): {t:.1f} s")

    # 2. The sweep itself: every encoder frozen; featurize caches MiniLM and CNN features.
    sweep = {"fusion": FUSIONS, "params": {"hidden": [128]}}
    write_params(root, args.limit, args.epochs, {"init_from": str(encoder_dir), "freeze": True}, [], sweep)
    t = mmops(root, "sweep", "--runner", "threads", "--workers", "1")
    out.append(f"mmops sweep, threads, 1 worker (featurize + 5 candidates): {t:.1f} s")

    # 3. Cached vs recomputed, in this process, training only.
    sys.path.insert(0, str(REPO))
    os.environ["MMOPS_PROJECT"] = str(root)
    from mmops.project import Project, configure_environment

    project = Project.at(root)
    configure_environment(project)
    import torch

    from mmops.training.loop import Dataset, train_candidate

    torch.set_num_threads(os.cpu_count() or 1)
    params = project.params
    candidates = params.all_candidates()
    # Load the frozen checkpoints (MiniLM) once, before either timing: both ways share them, and
    # whichever ran first would otherwise also pay the one-time read from disk.
    from mmops.core.model import build_input_encoder

    for spec in params.inputs.values():
        build_input_encoder(spec.model_dump())

    def run_all(use_cache: bool) -> float:
        tuned = params.model_copy(update={"train": params.train.model_copy(update={"feature_cache": use_cache})})
        data = Dataset.load(project.prepared_dir, project.features_dir, tuned, use_cache=use_cache)
        t0 = time.perf_counter()
        for c in candidates:
            train_candidate(tuned, c, data, Path(tempfile.mkdtemp()) / c.name)
        return time.perf_counter() - t0

    cached = run_all(True)
    out.append(f"5 candidates on cached features:        {cached:8.2f} s")
    if not args.skip_naive:
        naive = run_all(False)
        out.append(f"5 candidates recomputing the encoders:  {naive:8.2f} s")
        out.append(f"ratio 1 (cache speed-up): {naive / cached:.0f}x")

    # 4. Dask LocalCluster: 1 worker vs 2 workers, the same sweep end to end.
    one = mmops(root, "sweep", "--runner", "dask", "--workers", "1", "--force")
    two = mmops(root, "sweep", "--runner", "dask", "--workers", "2", "--force")
    out.append(f"mmops sweep on Dask, 1 worker: {one:.1f} s   2 workers: {two:.1f} s")
    out.append(f"ratio 2 (2 workers vs 1): {one / two:.2f}x")

    # 5. Peak memory: the largest resident set of any sweep process (workers included).
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out.append(f"peak resident memory of a sweep process: {peak:.0f} MiB")

    report("sweep_full.md" if not args.limit else "sweep.md", out)
    if not args.keep:
        shutil.rmtree(root.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
