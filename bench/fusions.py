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
    for spec in raw["inputs"].values():
        if spec["encoder"] == "cnn_image" and args.token_grid:
            spec.setdefault("params", {})["token_grid"] = args.token_grid
    raw["candidates"] = candidates
    return raw


def save_rows(rows: list[dict], out: Path) -> list[dict]:
    """Rows into ``out/fusions.json``, replacing earlier rows of the same candidate: one table can be
    completed by several runs (each row keeps its own date and commit)."""
    path = out / "fusions.json"
    kept = json.loads(path.read_text()) if path.is_file() else []
    names = {r["candidate"] for r in rows}
    merged = [r for r in kept if r["candidate"] not in names] + rows
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2))
    return merged


def commit() -> str:
    import subprocess

    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def run_project(work: Path, raw_dir: Path, raw_params: dict, out: Path | None = None, label: str = "") -> list[dict]:
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
        rows.append(
            {
                "candidate": candidate.name + label,
                "fusion": candidate.fusion,
                "params": candidate.params,
                "image_encoder": "frozen, from concat (two-stage)" if label else "trained end to end",
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "commit": commit(),
                "torch_threads": torch.get_num_threads(),
                "sequences": model.fusion.needs_sequences,
                "encoders": {n: i.encoder for n, i in params.inputs.items()},
                "val_accuracy": result["metrics"]["val"]["accuracy"],
                "test_accuracy": result["metrics"]["test"]["accuracy"],
                "trained_parameters": trainable,
                "fusion_parameters": fusion,
                "train_seconds": result["train_seconds"],
                "epochs_run": result["epochs_run"],
                "best_epoch": result["best_epoch"],
            }
        )
        print(
            f"  val {rows[-1]['val_accuracy']:.4f}  test {rows[-1]['test_accuracy']:.4f}  "
            f"{rows[-1]['train_seconds']:.0f} s",
            flush=True,
        )
        if out is not None:  # a long run keeps what it finished
            save_rows(rows, out)
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
        "marked *tokens*, which see MiniLM's word pieces (cached) and the CNN's positions "
        f"({f'averaged to {args.token_grid}×{args.token_grid}' if args.token_grid else 'the whole map'}), "
        "padding masked. Rows `+cnn(concat)` are two-stage: the CNN that `concat` trained, frozen, its "
        "tokens cached. "
        "*One token*: the same fusion when it saw one vector per input (before masks; "
        f"{args.before.name if before else 'not given'}). Test is reported, never used to select.",
        "",
        "| candidate | fusion | inputs | encoders | val acc | test acc | one token: test acc | trained params | "
        "fusion params | train time |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        enc = " + ".join(r["encoders"].values())
        if r.get("image_encoder", "").startswith("frozen"):
            enc += " (CNN frozen, from concat)"
        old = f"{before[r['candidate']]:.4f}" if r.get("sequences") and r["candidate"] in before else ""
        lines.append(
            f"| {r['candidate']} | `{r['fusion']}` | {'tokens' if r.get('sequences') else 'vectors'} | "
            f"{enc} | {r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | {old} | "
            f"{r['trained_parameters']:,} | {r['fusion_parameters']:,} | {r['train_seconds']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusions", default=",".join(FUSIONS), help="comma-separated fusion names")
    parser.add_argument("--epochs", type=int, default=0, help="epochs per candidate (0: params.yaml's)")
    parser.add_argument("--limit", type=int, default=0, help="questions per split (0: all)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--no-classic", action="store_true", help="skip the classic pipeline row")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--before",
        type=Path,
        default=RESULTS / "fusions_pooled.json",
        help="an earlier fusions.json to compare the attending fusions with",
    )
    parser.add_argument(
        "--token-grid",
        type=int,
        default=4,
        help="CNN positions averaged to N×N tokens for attending fusions (0: the whole 8×8 map)",
    )
    parser.add_argument(
        "--two-stage",
        default="",
        help="comma-separated attending fusions also trained on the CNN that `concat` trained "
        "(frozen, its tokens cached), as VisualBERT reads a pre-trained detector's regions",
    )
    parser.add_argument(
        "--cnn-from",
        type=Path,
        help="a saved concat model whose CNN the two-stage rows use (instead of training concat here)",
    )
    parser.add_argument(
        "--two-stage-epochs",
        type=int,
        default=0,
        help="epochs of the two-stage rows (0: --epochs); say so wherever the row is quoted",
    )
    parser.add_argument(
        "--two-stage-lr",
        type=float,
        default=0.0,
        help="peak learning rate of the two-stage rows (0: params.yaml's); named in the row",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep rows of other candidates already in OUT/fusions.json (complete a table in parts)",
    )
    args = parser.parse_args()
    two_stage = [f for f in args.two_stage.split(",") if f]
    unknown = [f for f in [*args.fusions.split(","), *two_stage] if f and f not in FUSIONS]
    if unknown:
        parser.error(f"unknown fusions {unknown}; choose from {list(FUSIONS)}")
    if two_stage and not args.cnn_from and "concat" not in args.fusions.split(","):
        parser.error("--two-stage reuses the CNN that `concat` trains: include concat in --fusions")
    if not args.append and (args.out / "fusions.json").is_file():
        (args.out / "fusions.json").unlink()

    from mmops.data.easyvqa import import_easy_vqa

    with tempfile.TemporaryDirectory(prefix="mmops-bench-") as tmp:
        work = Path(tmp)
        import_easy_vqa(work / "raw", args.limit)
        # concat first: the two-stage rows start from its CNN.
        names = sorted([f for f in args.fusions.split(",") if f], key=lambda f: f != "concat")
        candidates = [{"name": f, "fusion": f, "params": FUSIONS[f]} for f in names]
        main_params = load_params(REPO / "params.yaml", args, candidates)
        if two_stage:
            cnn = args.cnn_from
            if cnn is None:
                run_project(work / "fusions", work / "raw", {**main_params, "candidates": candidates[:1]}, args.out)
                cnn, candidates = work / "fusions" / "models" / "concat", candidates[1:]
            train = {
                **(
                    {"epochs": args.two_stage_epochs, "patience": args.two_stage_epochs}
                    if args.two_stage_epochs
                    else {}
                ),
                **({"lr": args.two_stage_lr} if args.two_stage_lr else {}),
            }
            train = {"train": train} if train else {}
            staged = load_params(
                REPO / "params.yaml", args, [{"name": f, "fusion": f, "params": FUSIONS[f], **train} for f in two_stage]
            )
            for spec in staged["inputs"].values():
                if spec["encoder"] == "cnn_image":
                    spec.update(init_from=str(cnn.resolve()), freeze=True)
            label = (
                "+cnn(concat)"
                + (f", {args.two_stage_epochs} epochs" if args.two_stage_epochs else "")
                + (f", lr {args.two_stage_lr:g}" if args.two_stage_lr else "")
            )
            run_project(work / "two-stage", work / "raw", staged, args.out, label=label)
        if candidates:
            run_project(work / "fusions", work / "raw", {**main_params, "candidates": candidates}, args.out)
        if not args.no_classic:
            classic = yaml.safe_load((REPO / "configs" / "classic.yaml").read_text())["candidates"]
            run_project(
                work / "classic", work / "raw", load_params(REPO / "configs" / "classic.yaml", args, classic), args.out
            )
    rows = json.loads((args.out / "fusions.json").read_text())
    table = write_table(rows, args, main_params["train"]["epochs"])
    (args.out / "fusions.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
