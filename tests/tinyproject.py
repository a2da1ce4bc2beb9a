"""A tiny prepared and featurized project built by calling the stages directly (seconds, no DVC run):
for tests of training mechanics (devices, data-parallel ranks) that need real data, not a good model."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import REPO, _merge

TINY = {
    "data": {"limit": 600, "image_size": 16},
    "train": {"epochs": 3, "patience": 3, "batch_size": 64, "lr": 0.005, "threads": 1, "head_hidden": 32},
    "candidates": [{"name": "concat", "fusion": "concat", "params": {"hidden": 32}}],
    "inputs": {"image": {"params": {"channels": [4, 8]}}},
}


def tiny_project(root: Path, overrides: dict | None = None) -> Path:
    """``root`` with params.yaml, data/prepared and data/features (MiniLM question features cached)."""
    from mmops.config import load_params
    from mmops.data.easyvqa import import_easy_vqa
    from mmops.data.featurize import featurize
    from mmops.data.prepare import prepare

    root.mkdir(parents=True, exist_ok=True)
    params = _merge(_merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY), overrides or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    loaded = load_params(root / "params.yaml")
    import_easy_vqa(root / "data" / "raw", limit=loaded.data.limit)
    prepare(root / "data" / "raw", root / "data" / "prepared", loaded)
    featurize(root / "data" / "prepared", root / "data" / "features", loaded)
    return root
