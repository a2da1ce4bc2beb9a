"""Run every benchmark in bench/ with its defaults, one after the other (`make bench`).

Each prints its own figures and writes bench/results/<name>.md, which README quotes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "featurize_dedup.py",
    "sweep.py",
    "noop_run.py",
    "serve_load.py",
    "fusions.py",
    "prepare_stream.py",
    "dask_overhead.py",
    "ddp_overhead.py",
    "cpu_train_speed.py",
]

if __name__ == "__main__":
    failed = []
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        if subprocess.call([sys.executable, str(HERE / script)], cwd=HERE.parent):
            failed.append(script)
    sys.exit(f"failed: {', '.join(failed)}" if failed else 0)
