"""The ``featurize`` stage: run every frozen encoder once per distinct input and store the features.

A frozen encoder's output depends on its input alone, so recomputing it every epoch (or for every one
of the ~360 questions that share each easy-VQA question string) is pure waste. Features are written
as ``.npy`` files that training memory-maps. Trainable encoders are skipped: they must see gradients.

When a candidate's fusion attends (``needs_sequences``, read from the candidates and the sweep in
params), each frozen input's token sequences are kept too (``<input>.tokens*.npy``, ragged, float16),
so word pieces and patches reach the fusion without running the encoder during training.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from mmops.config import Params
from mmops.core.devices import resolve_device, to_device
from mmops.core.model import ArtifactResolver, artifact_folder, build_input_encoder
from mmops.core.plugin_registry import PluginError, get_fusion
from mmops.core.tasks import task_class
from mmops.data.cache import cached_features, cached_sequences


def load_values(prepared_dir: Path, name: str, modality: str) -> list | np.ndarray:
    """Distinct values of an input: strings and tabular rows from JSON, images and audio memory-mapped,
    feature sequences as a list of ``(time, dim)`` views into one memory-mapped array (they are ragged)."""
    if modality in ("text", "tabular"):
        return json.loads((prepared_dir / f"{name}.json").read_text())
    if modality == "vectors":
        frames = np.load(prepared_dir / f"{name}.npy", mmap_mode="r")
        offsets = np.load(prepared_dir / f"{name}.offsets.npy")
        return [frames[a:b] for a, b in itertools.pairwise(offsets)]
    return np.load(prepared_dir / f"{name}.npy", mmap_mode="r")


log = logging.getLogger("mmops.featurize")


@torch.inference_mode()
def encode_all(encoder, values, batch_size: int = 256, device: torch.device | None = None) -> np.ndarray:
    """Pooled features of ``values`` in batches, computed on ``device`` (float32 on the CPU for the cache)."""
    device = device or torch.device("cpu")
    encoder.eval()
    out = np.zeros((len(values), encoder.output_dim), dtype=np.float32)
    with Progress(transient=True) as progress:
        task = progress.add_task(f"encoding {len(values)} distinct values", total=len(values))
        for start in range(0, len(values), batch_size):
            chunk = values[start : start + batch_size]
            batch = to_device(encoder.preprocess(chunk), device)
            out[start : start + len(chunk)] = encoder(batch).float().cpu().numpy()
            progress.advance(task, len(chunk))
    return out


def needs_sequences(params: Params) -> bool:
    """Whether any candidate (listed, or from the sweep) has a fusion that attends over token sequences,
    or the task combines the inputs itself from token sequences (a caption decoder)."""
    task = task_class(params.target.type)
    if task.combines_inputs:
        return task.needs_sequences
    found = False
    for candidate in params.all_candidates():
        if candidate.fusion is None:  # one input: no fusion, it reads vectors
            continue
        try:
            found = found or get_fusion(candidate.fusion).needs_sequences
        except PluginError as exc:  # reported where the candidate trains; it must not stop the others' features
            log.warning("candidate %s: %s", candidate.name, exc)
    return found


def lacks_sequences(features_dir: Path, params: Params) -> bool:
    """Features written before a candidate's fusion started attending: pooled vectors only.

    DVC cannot see this (the stage tracks ``inputs``, and a sweep may be absent from params.yaml), so
    the pipeline re-runs the stage when it is true.
    """
    try:
        written = json.loads((features_dir / "features.json").read_text())
    except (OSError, ValueError):
        return False  # never featurized: DVC runs the stage anyway
    return any(not entry.get("tokens") for entry in written.values()) and needs_sequences(params)


def featurize(prepared_dir: Path, out_dir: Path, params: Params, cache_dir: Path | None = None,
              resolve: ArtifactResolver = artifact_folder) -> dict:
    """Write ``out_dir/<input>.npy`` (one row per distinct value of this data) for every frozen input.

    Features come from the content-addressed store in ``cache_dir`` (default ``data/feature-cache``,
    a persistent output of the stage): only values no earlier run has encoded are computed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_dir or out_dir.parent / "feature-cache"
    cache_dir.mkdir(parents=True, exist_ok=True)  # a DVC output even when no input is frozen
    torch.manual_seed(params.seed)
    sequences = needs_sequences(params)
    written = {}
    for name, spec in params.inputs.items():
        encoder = build_input_encoder(spec.model_dump(), resolve)
        if not encoder.frozen:
            log.info("%s: encoder %s is trainable, so its features are computed in training, not cached",
                     name, spec.encoder)
            continue
        values = load_values(prepared_dir, name, spec.modality)
        # Pooled features on the training device (train.device / MMOPS_DEVICE); the encoder goes back to
        # the CPU after, as frozen encoders are shared in this process, and token sequences are kept there.
        device = resolve_device(params.train.device)
        features, stats = cached_features(cache_dir, spec.encoder, encoder.to(device), values,
                                          functools.partial(encode_all, device=device))
        encoder.to("cpu")
        np.save(out_dir / f"{name}.npy", features)
        written[name] = {"encoder": spec.encoder, "config": encoder.config(), "dim": encoder.output_dim, **stats}
        if sequences:
            _, token_stats = cached_sequences(cache_dir, spec.encoder, encoder, values, out_dir / f"{name}.tokens")
            written[name].update(token_stats)  # "tokens": how many were kept (ragged, float16)
        else:
            for stale in out_dir.glob(f"{name}.tokens*.npy"):  # never read tokens another params wrote
                stale.unlink()
    (out_dir / "features.json").write_text(json.dumps(written, indent=2))
    return written
