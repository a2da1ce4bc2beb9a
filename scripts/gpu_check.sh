#!/usr/bin/env bash
# The one check to run where a GPU is lent (an NVIDIA GPU and a CUDA build of torch in .venv); under
# 10 minutes. Writes bench/results/gpu.json (or $GPU_JSON).
#
#   scripts/gpu_check.sh [PROJECT_DIR] [--cpu]
#
# Installs nothing and touches no network (pip and the Hugging Face hub are switched offline).
# 1. Training and featurize (bench/gpu_train.py): one epoch of the same candidate on the CPU (fp32) and
#    on CUDA (fp32, bf16), and MiniLM featurize throughput on both.
# 2. The service: it serves the project's latest bento (or, without one, an untrained model of the project's
# architecture) with MMOPS_GPU=1 on 127.0.0.1, checks through /model that every model parameter is
# on CUDA, then sends /predict_batch requests of 1, 8 and 32 easy-VQA rows, one at a time for
# CHECK_SECONDS (default 10) each, and prints p50/p99 latency and rows/s for each batch size.
# MMOPS_AUTOCAST=fp16|bf16 is passed through. --cpu runs the same steps on the CPU (a dry run of the
# script itself on a machine without a GPU; it then checks the parameters are on the CPU).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
PROJECT="$REPO"
DEVICE=cuda
for arg in "$@"; do
  case "$arg" in
    --cpu) DEVICE=cpu ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) PROJECT="$(cd "$arg" && pwd)" ;;
  esac
done

export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 BENTOML_DO_NOT_TRACK=true DO_NOT_TRACK=1
export MMOPS_DEVICE="$DEVICE" MMOPS_REPO="$REPO" SECONDS_PER_BATCH="${CHECK_SECONDS:-10}"
if [[ "$DEVICE" == cuda ]]; then export MMOPS_GPU=1; fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [[ "$DEVICE" == cpu ]]; then
  export GPU_JSON="${GPU_JSON:-$(mktemp -d)/gpu.json}"  # a dry run never overwrites the GPU figures
  "$PY" "$REPO/bench/gpu_train.py" --cpu --limit "${CHECK_LIMIT:-1000}" --out "$GPU_JSON"
else
  export GPU_JSON="${GPU_JSON:-$REPO/bench/results/gpu.json}"
  "$PY" "$REPO/bench/gpu_train.py" --limit "${CHECK_LIMIT:-4000}" --out "$GPU_JSON"
fi

exec "$PY" - "$PROJECT" "$DEVICE" <<'PYEOF'
import base64, json, os, statistics, sys, tempfile, time
from pathlib import Path

project, device = Path(sys.argv[1]), sys.argv[2]
import torch

if device == "cuda" and not torch.cuda.is_available():
    sys.exit(f"no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
             "run on a GPU host with a CUDA build of torch, or pass --cpu for a dry run")
if device == "cuda":
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")

import importlib.util

spec = importlib.util.spec_from_file_location("serve_load", Path(os.environ["MMOPS_REPO"]) / "bench" / "serve_load.py")
bench = sys.modules["serve_load"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
import httpx

found = bench.find_bento(project)
scratch = None
if found is None:
    scratch = tempfile.TemporaryDirectory(prefix="mmops-gpu-check-")
    print(f"no packaged bento in {project}: building an untrained one of its architecture")
    found = bench.build_scratch_bento(project, Path(scratch.name) / "bentoml")
bento, home, model_tag = found
env = {**bench._env(project, home), "MMOPS_DEVICE": device, "MMOPS_GPU": os.environ.get("MMOPS_GPU", ""),
       "MMOPS_AUTOCAST": os.environ.get("MMOPS_AUTOCAST", "off")}
port = bench.free_port()
log = Path(tempfile.mkdtemp(prefix="mmops-gpu-log-")) / "serve.log"
url = f"http://127.0.0.1:{port}"
proc = bench.serve(bento, env, port, log)
failed = False
try:
    info = httpx.post(f"{url}/model", timeout=30).json()
    print(f"bento {bento}: model {info['model']} on {info['device']}, parameters on {info['parameter_devices']}, "
          f"autocast {info['autocast']}")
    want = "cuda" if device == "cuda" else "cpu"
    if not info["parameter_devices"] or any(not d.startswith(want) for d in info["parameter_devices"]):
        print(f"FAIL: model parameters are on {info['parameter_devices']}, expected {want}")
        failed = True
    rows = bench.load_rows(256)
    items = [{"image": base64.b64encode(img).decode(), "question": q} for img, q in rows]
    seconds = float(os.environ["SECONDS_PER_BATCH"])
    print(f"{'batch':>5} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'rows/s':>8}")
    service = {"bento": bento, "device": info["device"], "parameter_devices": info["parameter_devices"],
               "autocast": info["autocast"], "batches": {}}
    with httpx.Client(timeout=60) as http:
        for batch in (1, 8, 32):
            for _ in range(3):  # warm-up: CUDA kernels, the text-feature cache
                http.post(f"{url}/predict_batch", json={"items": items[:batch]}).raise_for_status()
            latencies, start, i = [], time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                chunk = [items[(i + k) % len(items)] for k in range(batch)]
                t0 = time.perf_counter()
                r = http.post(f"{url}/predict_batch", json={"items": chunk})
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    print(f"FAIL: batch {batch}: {r.status_code} {r.text[:300]}")
                    failed = True
                    break
                i += batch
            elapsed = time.perf_counter() - start
            latencies.sort()
            p50 = latencies[len(latencies) // 2] * 1000
            p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000
            print(f"{batch:>5} {len(latencies):>8} {p50:>8.1f} {p99:>8.1f} {len(latencies) * batch / elapsed:>8.1f}")
            service["batches"][str(batch)] = {"requests": len(latencies), "p50_ms": round(p50, 1),
                                              "p99_ms": round(p99, 1),
                                              "rows_per_s": round(len(latencies) * batch / elapsed, 1)}
    out = Path(os.environ["GPU_JSON"])
    figures = json.loads(out.read_text()) if out.is_file() else {}
    figures["service"] = {**service, "failed": failed}
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures written to {out}")
finally:
    bench.stop(proc)
    if scratch is not None:
        scratch.cleanup()
print(f"server log: {log}")
sys.exit(1 if failed else 0)
PYEOF
