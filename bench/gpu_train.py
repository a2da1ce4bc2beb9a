"""Training and featurize on the GPU vs the CPU, for ``scripts/gpu_check.sh`` (run where a GPU is lent).

    .venv/bin/python bench/gpu_train.py [--cpu] [--limit 4000] [--out bench/results/gpu.json]

On one prepared easy-VQA subset (64 px images, MiniLM question features cached): the time of one
training epoch of the same candidate (CNN trained end to end + concat fusion) on the CPU in fp32 and
on CUDA in fp32 and bf16 (train.device / train.precision, as a project sets them), and the featurize
throughput of MiniLM on both (distinct strings encoded per second). ``--cpu`` runs the CPU half only:
a dry run of the script on a machine without a GPU. Writes the figures under ``training`` and
``featurize`` in the output JSON (other keys, e.g. the service's, are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true", help="CPU only (no GPU here): a dry run")
    parser.add_argument("--limit", type=int, default=4000)
    parser.add_argument("--strings", type=int, default=4096, help="distinct strings for the featurize figure")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from mmops.config import load_params
    from mmops.core.model import build_input_encoder
    from mmops.data.easyvqa import import_easy_vqa
    from mmops.data.featurize import encode_all, featurize
    from mmops.data.prepare import prepare
    from mmops.training.loop import Dataset, train_candidate

    setups = [("cpu", "fp32")] + ([] if args.cpu else [("cuda", "fp32"), ("cuda", "bf16")])
    root = Path(tempfile.mkdtemp(prefix="mmops-gpu-bench-"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(limit=args.limit, image_size=64)
    params["train"].update(epochs=1, patience=1, threads=0)
    params["candidates"] = [{"name": "concat", "fusion": "concat", "params": {"hidden": 256}}]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    loaded = load_params(root / "params.yaml")
    import_easy_vqa(root / "raw", limit=args.limit)
    prepare(root / "raw", root / "prepared", loaded)
    featurize(root / "prepared", root / "features", loaded)
    data = Dataset.load(root / "prepared", root / "features", loaded)

    training = {}
    for device, precision in setups:
        chosen = loaded.model_copy(
            update={"train": loaded.train.model_copy(update={"device": device, "precision": precision})}
        )
        train_candidate(chosen, chosen.candidates[0], data, root / "warm")  # CUDA context, kernels, caches
        result = train_candidate(chosen, chosen.candidates[0], data, root / f"{device}-{precision}")
        training[f"{device}_{precision}"] = {
            "epoch_s": round(result["history"][0]["seconds"], 3),
            "device": result["device"],
            "val_accuracy": round(result["history"][0]["val_accuracy"], 4),
        }
        print(device, precision, training[f"{device}_{precision}"])
    base = training["cpu_fp32"]["epoch_s"]
    for row in training.values():
        row["speedup_vs_cpu"] = round(base / row["epoch_s"], 2)

    strings = [f"what colour is shape number {i} in the picture?" for i in range(args.strings)]
    encoder = build_input_encoder(loaded.inputs["question"].model_dump())
    featurizing = {}
    for device in ["cpu"] + ([] if args.cpu else ["cuda"]):
        target = torch.device(device)
        encoder.to(target)
        encode_all(encoder, strings[:256], device=target)  # warm-up
        t0 = time.perf_counter()
        encode_all(encoder, strings, device=target)
        if device == "cuda":
            torch.cuda.synchronize()
        featurizing[device] = {"strings_per_s": round(len(strings) / (time.perf_counter() - t0), 1)}
        print("featurize", device, featurizing[device])
    encoder.to("cpu")

    figures = json.loads(args.out.read_text()) if args.out.is_file() else {}
    figures.update(
        {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_cores": os.cpu_count(),
            "questions_per_split": args.limit,
            "training": training,
            "featurize": featurizing,
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
