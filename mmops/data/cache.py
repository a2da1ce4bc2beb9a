"""A content-addressed store of frozen-encoder features.

Keyed twice: by the encoder (its name, configuration and a hash of its weights) and, inside that, by a
hash of each input's content. So a value is encoded once per encoder, whichever row, data version,
candidate or later run asks for it; a changed encoder config gets a new key (nothing stale is reused);
new or changed data computes only the values the store has not seen.

Layout: ``<root>/<encoder key>/meta.json`` plus append-only shards ``shard-NNNNN.npy`` (float32 rows)
with ``shard-NNNNN.keys`` (one content hash per row). Shards are memory-mapped, never loaded whole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmops.core.interfaces import Encoder


def content_hash(value: Any) -> str:
    """A stable hash of one raw value: text by its UTF-8 bytes, arrays by dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(value, str):
        h.update(b"s:" + value.encode())
    else:
        array = np.ascontiguousarray(value)
        h.update(f"a:{array.dtype}:{array.shape}:".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def encoder_key(name: str, encoder: Encoder) -> str:
    """Name + config + weights: two encoders with this key produce the same features."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps({"name": name, "config": encoder.config()}, sort_keys=True, default=str).encode())
    for key, tensor in sorted(encoder.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{name}-{h.hexdigest()}"


class FeatureStore:
    def __init__(self, root: Path, key: str) -> None:
        self.dir = root / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, tuple[int, int]] = {}
        self._shards: list[np.ndarray] = []
        for i, keys_file in enumerate(sorted(self.dir.glob("shard-*.keys"))):
            self._shards.append(np.load(keys_file.with_suffix(".npy"), mmap_mode="r"))
            for row, h in enumerate(keys_file.read_text().split()):
                self._index[h] = (i, row)

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, hashes: Sequence[str]) -> list[str]:
        return [h for h in dict.fromkeys(hashes) if h not in self._index]

    def add(self, hashes: Sequence[str], features: np.ndarray) -> None:
        if not len(hashes):
            return
        n = len(self._shards)
        np.save(self.dir / f"shard-{n:05d}.npy", features.astype(np.float32, copy=False))
        (self.dir / f"shard-{n:05d}.keys").write_text("\n".join(hashes) + "\n")
        self._shards.append(np.load(self.dir / f"shard-{n:05d}.npy", mmap_mode="r"))
        self._index.update({h: (n, row) for row, h in enumerate(hashes)})

    def gather(self, hashes: Sequence[str]) -> np.ndarray:
        """Features in the order of ``hashes``, each shard read once with a fancy index."""
        if not hashes:
            return np.zeros((0, 0), np.float32)
        where = np.array([self._index[h] for h in hashes])
        dim = self._shards[where[0, 0]].shape[1]
        out = np.empty((len(hashes), dim), np.float32)
        for shard in np.unique(where[:, 0]):
            sel = where[:, 0] == shard
            out[sel] = self._shards[shard][where[sel, 1]]
        return out


def cached_features(
    store_root: Path, name: str, encoder: Encoder, values: Sequence[Any],
    encode: Callable[[Encoder, Sequence[Any]], np.ndarray],
) -> tuple[np.ndarray, dict[str, Any]]:
    """Features for ``values`` (one row each), computing only those the store has not seen."""
    key = encoder_key(name, encoder)
    store = FeatureStore(store_root, key)
    hashes = [content_hash(v) for v in values]
    missing = store.missing(hashes)
    if missing:
        first = {h: i for i, h in reversed(list(enumerate(hashes)))}
        todo = [values[first[h]] for h in missing]
        store.add(missing, encode(encoder, todo))
    (store.dir / "meta.json").write_text(json.dumps({"encoder": name, "config": encoder.config()}, default=str))
    stats = {"key": key, "values": len(values), "distinct": len(set(hashes)), "computed": len(missing),
             "reused": len(set(hashes)) - len(missing)}
    return store.gather(hashes), stats
