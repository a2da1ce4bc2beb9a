"""Each single modality against four fusions on the SYNTHETIC MMSA-layout sentiment set; a table of
MMSA's metrics on its test split.

    .venv/bin/python bench/sentiment.py                    # the README table (400/100/100 rows, 3 seeds)
    .venv/bin/python bench/sentiment.py --rows 120 30 30 --seeds 1 --epochs 3 --out /tmp/sent   # a quick check

The data is :func:`mmops.data.mmsa.synthetic_mmsa`: the text frames carry the intensity and a weak
polarity hint, the polarity itself is only readable from audio and vision together. So the single
modalities are expected to fail in known ways and fusion to succeed; the figures say nothing about
real speakers (the published CMU-MOSI references are in the sentiment template's README). Every
candidate uses the sentiment template's encoders (seq_features for each modality) and training
settings; unimodal rows read one input with no fusion. It calls the stage and training functions
directly (no Prefect, DVC or registry). Output: bench/results/sentiment.json and sentiment.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
TEMPLATE = REPO / "mmops" / "templates" / "sentiment" / "params.yaml"

CANDIDATES = [
    {"name": "text only", "inputs": ["text"]},
    {"name": "audio only", "inputs": ["audio"]},
    {"name": "vision only", "inputs": ["vision"]},
    {"name": "tensor (TFN)", "fusion": "tensor", "params": {"hidden": 8}},
    {"name": "low_rank_tensor (LMF)", "fusion": "low_rank_tensor", "params": {"hidden": 64, "rank": 4}},
    {"name": "mult (MulT)", "fusion": "mult", "params": {"hidden": 32, "heads": 4, "layers": 1}},
    {"name": "mm_transformer", "fusion": "mm_transformer", "params": {"width": 32, "layers": 1, "heads": 4}},
]
SHOWN = ("acc2_non0", "f1_non0", "acc2_has0", "f1_has0", "mae", "corr", "acc7")


def run(work: Path, sizes: tuple[int, int, int], seed: int, epochs: int, names: list[str]) -> list[dict]:
    from mmops.config import Params
    from mmops.data.featurize import featurize
    from mmops.data.mmsa import import_mmsa, write_synthetic
    from mmops.data.prepare import prepare
    from mmops.training.loop import Dataset, train_candidate

    raw = yaml.safe_load(TEMPLATE.read_text())
    raw["seed"] = seed
    raw["train"].update(epochs=epochs, patience=max(3, epochs // 3), threads=1)
    raw["candidates"] = [c for c in CANDIDATES if c["name"] in names]
    params = Params.model_validate(raw)
    manifest = import_mmsa(write_synthetic(work / "aligned_50.pkl", sizes, seed=0), work / "raw")
    prepare(manifest.parent, work / "prepared", params, work / "appended")
    featurize(work / "prepared", work / "features", params)
    data = Dataset.load(work / "prepared", work / "features", params)
    rows = []
    for candidate in params.candidates:
        print(f"seed {seed}: training {candidate.name} ...", flush=True)
        started = time.perf_counter()
        result = train_candidate(params, candidate, data, work / "models" / candidate.name.split()[0])
        rows.append(
            {
                "candidate": candidate.name,
                "seed": seed,
                "epochs_run": result["epochs_run"],
                "best_epoch": result["best_epoch"],
                "seconds": round(time.perf_counter() - started, 1),
                "val": result["metrics"]["val"],
                "test": result["metrics"]["test"],
            }
        )
        print(f"  test mae {rows[-1]['test']['mae']:.3f} acc2_non0 {rows[-1]['test']['acc2_non0']:.3f}", flush=True)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    for name in dict.fromkeys(r["candidate"] for r in rows):
        mine = [r for r in rows if r["candidate"] == name]
        entry = {"candidate": name, "seeds": len(mine), "seconds": round(float(np.mean([r["seconds"] for r in mine])))}
        for metric in SHOWN:
            values = [r["test"][metric] for r in mine]
            entry[metric] = float(np.mean(values))
            entry[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        table.append(entry)
    return table


def markdown(table: list[dict], meta: dict) -> str:
    pct = {"acc2_non0", "f1_non0", "acc2_has0", "f1_has0", "acc7"}
    head = "| model | Acc-2 (non0) | F1 (non0) | Acc-2 (has0) | F1 (has0) | MAE | Corr | Acc-7 | s/run |"
    lines = [head, "|" + "---|" * 9]
    for e in table:
        cells = [
            f"{100 * e[m]:.1f} ± {100 * e[m + '_std']:.1f}" if m in pct else f"{e[m]:.3f} ± {e[m + '_std']:.3f}"
            for m in SHOWN
        ]
        lines.append(f"| {e['candidate']} | {' | '.join(cells)} | {e['seconds']} |")
    intro = (
        f"SYNTHETIC data (mmops.data.mmsa.synthetic_mmsa), test split of {meta['sizes'][2]} rows; mean ± std "
        f"over {meta['seeds']} seeds; {meta['epochs']} epochs at most; {meta['machine']}."
    )
    return intro + "\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs=3, default=[400, 100, 100], metavar=("TRAIN", "VALID", "TEST"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or [c["name"] for c in CANDIDATES]
    # One thread: on a machine shared with other jobs, two spinning threads ran 3-4x slower than one.
    torch.set_num_threads(1)
    rows = []
    started = time.perf_counter()
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            rows += run(Path(tmp), tuple(args.rows), seed, args.epochs, names)
    meta = {
        "sizes": args.rows,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, CPU shared with other jobs",
        "wall_seconds": round(time.perf_counter() - started),
        "data": "synthetic (mmops.data.mmsa.synthetic_mmsa)",
    }
    table = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sentiment.json").write_text(json.dumps({"meta": meta, "table": table, "runs": rows}, indent=2))
    (args.out / "sentiment.md").write_text(markdown(table, meta))
    print(markdown(table, meta))


if __name__ == "__main__":
    main()
