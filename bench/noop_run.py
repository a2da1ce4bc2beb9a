"""`mmops run` with nothing changed vs a full run of the same project, measured in one run.

    .venv/bin/python bench/noop_run.py                 # 8,000 questions per split, 3 epochs
    .venv/bin/python bench/noop_run.py --limit 0       # the full data set (as `make demo`)

A fresh project runs the whole retrain flow (DVC stages, 2 candidates, registry, bento), then runs it
again unchanged: the second run finds every stage clean and every candidate's fingerprint unchanged,
reports so, and stops. Output: both wall times, the ratio, and bench/results/noop_run.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml
from sweep import BIN, REPO, mmops, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=8000, help="questions per split (0 = all)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="mmops-bench-noop-")) / "proj"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["limit"] = args.limit
    params["train"].update(epochs=args.epochs, patience=args.epochs)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)

    full = mmops(root, "run")
    noop = mmops(root, "run")
    lines = [
        f"questions per split: {args.limit or 'all'}, epochs: {args.epochs}",
        f"full `mmops run`:            {full:7.1f} s",
        f"unchanged `mmops run`:       {noop:7.1f} s",
        f"no-op / full: {100 * noop / full:.1f}%",
    ]
    report("noop_run.md", lines)
    shutil.rmtree(root.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
