"""Train every fusion on easy-VQA with the same encoders and budget; write a table of the results.

    .venv/bin/python bench/fusions.py --epochs 5           # the README table: full data, 5 epochs each
    .venv/bin/python bench/fusions.py --epochs 1 --image-size 32 --limit 2000 --fusions mm_transformer,film \
        --no-classic --out /tmp/fusions                     # a quick check

Every fusion gets the project's encoders (params.yaml: frozen MiniLM, a CNN trained end to end) and
the same training budget. Fusions that attend (``needs_sequences``: attention, cross_attention, film,
mm_transformer, mult) see token sequences with their masks: MiniLM's word pieces (frozen, so cached
by the featurize stage) and the CNN's feature-map positions; the others see one vector per input.
The classic pipeline (configs/classic.yaml: bag-of-words + pixels, early_concat, an MLP) is trained on
the same data as one more row. It calls the stage and training functions directly (no Prefect, DVC or
registry), so the times are training alone. Output: bench/results/fusions.md (the table README shows)
and fusions.json; the "one token" column is the same fusion's test accuracy from ``--before``, the
table measured when every input reached a fusion as one pooled vector (fusions_pooled.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

# The same capacity class for every fusion: hidden 256 for the projections, 128 where attention runs.
FUSIONS: dict[str, dict] = {
    "early_concat": {"hidden": 256},
    "concat": {"hidden": 256},
    "product": {"hidden": 256},
    "weighted_sum": {"hidden": 256},
    "attention": {"hidden": 128, "heads": 4},
    "cross_attention": {"hidden": 128, "heads": 4, "query": "question"},
    "gated": {"hidden": 256},
    "tensor": {"hidden": 16},
    "low_rank_tensor": {"hidden": 128, "rank": 4},
    "film": {"hidden": 128, "target": "image"},
    "late": {"hidden": 128},
    "mm_transformer": {"width": 128, "layers": 2, "heads": 4},
    "mult": {"hidden": 64, "heads": 4, "layers": 1},
}


def load_params(path: Path, args: argparse.Namespace, candidates: list[dict]) -> dict:
    raw = yaml.safe_load(path.read_text())
    raw["data"].update(limit=args.limit, image_size=args.image_size)
    if args.epochs:
        raw["train"].update(epochs=args.epochs, patience=args.epochs)
    raw["candidates"] = candidates
    return raw


def run_project(work: Path, raw_dir: Path, raw_params: dict) -> list[dict]:
    from mmops.config import Params
    from mmops.core.model import MultimodalModel
    from mmops.data.featurize import featurize
    from mmops.data.prepare import prepare
    from mmops.training.loop import Dataset, train_candidate

    params = Params.model_validate(raw_params)
    prepare(raw_dir, work / "prepared", params)
    featurize(work / "prepared", work / "features", params)
    data = Dataset.load(work / "prepared", work / "features", params)
    rows = []
    for candidate in params.candidates:
        print(f"training {candidate.name} ...", flush=True)
        result = train_candidate(params, candidate, data, work / "models" / candidate.name)
        model = MultimodalModel.load(work / "models" / candidate.name)
        trainable = sum(v.numel() for v in model.trainable_state().values())
        fusion = sum(p.numel() for p in model.fusion.parameters())
        rows.append({
            "candidate": candidate.name, "fusion": candidate.fusion, "params": candidate.params,
            "sequences": model.fusion.needs_sequences,
            "encoders": {n: i.encoder for n, i in params.inputs.items()},
            "val_accuracy": result["metrics"]["val"]["accuracy"],
            "test_accuracy": result["metrics"]["test"]["accuracy"],
            "trained_parameters": trainable, "fusion_parameters": fusion,
            "train_seconds": result["train_seconds"], "epochs_run": result["epochs_run"],
            "best_epoch": result["best_epoch"],
        })
        print(f"  val {rows[-1]['val_accuracy']:.4f}  test {rows[-1]['test_accuracy']:.4f}  "
              f"{rows[-1]['train_seconds']:.0f} s", flush=True)
    return rows


def write_table(rows: list[dict], args: argparse.Namespace, epochs: int) -> str:
    before = {}
    if args.before and args.before.is_file():
        before = {r["candidate"]: r["test_accuracy"] for r in json.loads(args.before.read_text())}
    lines = [
        "# Fusions on easy-VQA",
        "",
        f"Written by `bench/fusions.py` ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads). Data: easy-VQA, "
        f"{'all' if not args.limit else args.limit} questions per split, images {args.image_size} px; "
        f"{epochs} epochs each, one-cycle schedule, best epoch by val accuracy. Encoders: "
        "frozen all-MiniLM-L6-v2 + a CNN trained end to end, except `classic` "
        "(configs/classic.yaml: bag-of-words + pixels). Inputs: one vector each, except for the fusions "
        "marked *tokens*, which see MiniLM's word pieces (cached) and the CNN's positions, padding masked. "
        "*One token*: the same fusion when it saw one vector per input (before masks; "
        f"{args.before.name if before else 'not given'}). Test is reported, never used to select.",
        "",
        "| candidate | fusion | inputs | encoders | val acc | test acc | one token: test acc | trained params | "
        "fusion params | train time |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        enc = " + ".join(r["encoders"].values())
        old = f"{before[r['candidate']]:.4f}" if r.get("sequences") and r["candidate"] in before else ""
        lines.append(f"| {r['candidate']} | `{r['fusion']}` | {'tokens' if r.get('sequences') else 'vectors'} | "
                     f"{enc} | {r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | {old} | "
                     f"{r['trained_parameters']:,} | {r['fusion_parameters']:,} | {r['train_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusions", default=",".join(FUSIONS), help="comma-separated fusion names")
    parser.add_argument("--epochs", type=int, default=0, help="epochs per candidate (0: params.yaml's)")
    parser.add_argument("--limit", type=int, default=0, help="questions per split (0: all)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--no-classic", action="store_true", help="skip the classic pipeline row")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--before", type=Path, default=RESULTS / "fusions_pooled.json",
                        help="an earlier fusions.json to compare the attending fusions with")
    args = parser.parse_args()
    unknown = [f for f in args.fusions.split(",") if f not in FUSIONS]
    if unknown:
        parser.error(f"unknown fusions {unknown}; choose from {list(FUSIONS)}")

    from mmops.data.easyvqa import import_easy_vqa

    with tempfile.TemporaryDirectory(prefix="mmops-bench-") as tmp:
        work = Path(tmp)
        import_easy_vqa(work / "raw", args.limit)
        candidates = [{"name": f, "fusion": f, "params": FUSIONS[f]} for f in args.fusions.split(",")]
        main_params = load_params(REPO / "params.yaml", args, candidates)
        rows = run_project(work / "fusions", work / "raw", main_params)
        if not args.no_classic:
            classic = yaml.safe_load((REPO / "configs" / "classic.yaml").read_text())["candidates"]
            rows += run_project(work / "classic", work / "raw", load_params(REPO / "configs" / "classic.yaml",
                                                                            args, classic))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fusions.json").write_text(json.dumps(rows, indent=2))
    table = write_table(rows, args, main_params["train"]["epochs"])
    (args.out / "fusions.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
