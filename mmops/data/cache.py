"""A content-addressed store of frozen-encoder features.

Keyed twice: by the encoder (its name, configuration and a hash of its weights) and, inside that, by a
hash of each input's content. So a value is encoded once per encoder, whichever row, data version,
candidate or later run asks for it; a changed encoder config gets a new key (nothing stale is reused);
new or changed data computes only the values the store has not seen.

Layout: ``<root>/<encoder key>/meta.json`` plus append-only shards ``shard-NNNNN.npy`` (float32 rows)
with ``shard-NNNNN.keys`` (one content hash per row). Shards are memory-mapped, never loaded whole.

Token sequences (for fusions that attend) live under their own key (``<encoder>-tokens-<hash>``):
values of unequal lengths are ragged, so each shard is one float16 array of every token of every
value (``shard-NNNNN.npy``, ``(tokens, dim)``), its mask (``.mask.npy``) and where each value starts
(``.offsets.npy``). float16 halves the disk and page cache a ViT's 197 patches per image cost; the
models compute in float32 from it.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmops.core.interfaces import Encoder, Tokens, as_tokens
from mmops.project import atomic_path, atomic_write


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


# A frozen encoder's weights never change: hash MiniLM's 90 MB once per instance, not once per key.
_WEIGHTS: weakref.WeakKeyDictionary[Encoder, bytes] = weakref.WeakKeyDictionary()


def weights_digest(encoder: Encoder) -> bytes:
    if encoder.frozen and encoder in _WEIGHTS:
        return _WEIGHTS[encoder]
    h = hashlib.blake2b(digest_size=16)
    for key, tensor in sorted(encoder.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if encoder.frozen:
        _WEIGHTS[encoder] = h.digest()
    return h.digest()


def encoder_key(name: str, encoder: Encoder, kind: str = "pooled") -> str:
    """Name + config + weights (+ what is kept, pooled vectors or tokens): same key, same features."""
    h = hashlib.blake2b(digest_size=12)
    meta = {"name": name, "config": encoder.config(), **({"kind": kind} if kind != "pooled" else {})}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    h.update(weights_digest(encoder))
    return f"{name}-{h.hexdigest()}" if kind == "pooled" else f"{name}-{kind}-{h.hexdigest()}"


class _ShardedStore:
    """What both stores share: append-only shards under ``root/key``, each with a ``.keys`` file, and
    an index from content hash to (shard, row). Subclasses say how a shard is read."""

    def __init__(self, root: Path, key: str) -> None:
        self.dir = root / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, tuple[int, int]] = {}
        self._shards: list[Any] = []
        for i, keys_file in enumerate(sorted(self.dir.glob("shard-*.keys"))):
            self._shards.append(self._load_shard(keys_file))
            for row, h in enumerate(keys_file.read_text().split()):
                self._index[h] = (i, row)

    def _load_shard(self, keys_file: Path) -> Any:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, hashes: Sequence[str]) -> list[str]:
        return [h for h in dict.fromkeys(hashes) if h not in self._index]


class FeatureStore(_ShardedStore):
    def _load_shard(self, keys_file: Path) -> np.ndarray:
        return np.load(keys_file.with_suffix(".npy"), mmap_mode="r")

    def add(self, hashes: Sequence[str], features: np.ndarray) -> None:
        if not len(hashes):
            return
        n = len(self._shards)
        # Each file whole or absent (a run killed mid-write leaves no half shard); the keys last, since a
        # shard counts only once its keys exist.
        with atomic_path(self.dir / f"shard-{n:05d}.npy") as tmp:
            np.save(tmp, features.astype(np.float32, copy=False))
        atomic_write(self.dir / f"shard-{n:05d}.keys", "\n".join(hashes) + "\n")
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


@dataclass(frozen=True)
class RaggedTokens:
    """Token sequences of unequal lengths, one after another: ``values`` ``(total tokens, dim)``, ``mask``
    ``(total tokens,)`` and ``offsets`` (value i is ``offsets[i]:offsets[i + 1]``). Arrays may be memory-mapped."""

    values: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_tokens(cls, tokens: Tokens) -> RaggedTokens:
        """Each row cut after its last real token (:meth:`Tokens.split`), stored as float16."""
        rows = tokens.split()
        lengths = [r.length for r in rows]
        values = np.concatenate([r.values[0].detach().float().cpu().numpy() for r in rows]).astype(np.float16)
        mask = np.concatenate([r.mask[0].cpu().numpy() for r in rows])
        return cls(values, mask, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    @classmethod
    def concatenate(cls, parts: Sequence[RaggedTokens], dim: int) -> RaggedTokens:
        if not parts:
            return cls(np.zeros((0, dim), np.float16), np.zeros(0, bool), np.zeros(1, np.int64))
        starts = np.cumsum([0] + [len(p.values) for p in parts[:-1]])
        offsets = np.concatenate([[0], *[p.offsets[1:] + s for p, s in zip(parts, starts, strict=True)]])
        return cls(np.concatenate([p.values for p in parts]), np.concatenate([p.mask for p in parts]),
                   offsets.astype(np.int64))

    def save(self, prefix: Path) -> None:
        np.save(f"{prefix}.npy", self.values)
        np.save(f"{prefix}.mask.npy", self.mask)
        np.save(f"{prefix}.offsets.npy", self.offsets)

    @classmethod
    def load(cls, prefix: Path) -> RaggedTokens:
        return cls(np.load(f"{prefix}.npy", mmap_mode="r"), np.load(f"{prefix}.mask.npy", mmap_mode="r"),
                   np.load(f"{prefix}.offsets.npy"))

    def batch(self, rows: Sequence[int] | np.ndarray) -> Tokens:
        """Values ``rows`` as float32 :class:`Tokens`, padded to the longest (one fancy-indexed read)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, lengths = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        width = max(1, int(lengths.max())) if len(rows) else 1
        positions = np.arange(width)
        real = positions[None, :] < lengths[:, None]
        where = np.where(real, starts[:, None] + positions[None, :], 0)
        values = np.where(real[..., None], np.asarray(self.values[where.reshape(-1)]).reshape(*where.shape, -1), 0)
        mask = real & np.asarray(self.mask[where.reshape(-1)]).reshape(where.shape)
        return Tokens(torch.from_numpy(values.astype(np.float32)), torch.from_numpy(mask))


class TokenStore(_ShardedStore):
    """The ragged counterpart of :class:`FeatureStore`: token sequences by content hash."""

    def _load_shard(self, keys_file: Path) -> RaggedTokens:
        return RaggedTokens.load(keys_file.with_suffix(""))

    def add(self, hashes: Sequence[str], tokens: RaggedTokens) -> None:
        if not len(hashes):
            return
        n = len(self._shards)
        prefix = self.dir / f"shard-{n:05d}"
        tokens.save(prefix)
        atomic_write(self.dir / f"shard-{n:05d}.keys", "\n".join(hashes) + "\n")  # the shard counts from here
        self._shards.append(RaggedTokens.load(prefix))
        self._index.update({h: (n, row) for row, h in enumerate(hashes)})

    def write(self, hashes: Sequence[str], prefix: Path, dim: int) -> RaggedTokens:
        """The sequences of ``hashes``, in order, written to ``prefix`` (``.npy``, ``.mask.npy``,
        ``.offsets.npy``) without holding them all in memory, and memory-mapped back."""
        where = [self._index[h] for h in hashes]
        lengths = np.array([self._shards[s].offsets[r + 1] - self._shards[s].offsets[r] for s, r in where], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = np.lib.format.open_memmap(f"{prefix}.npy", mode="w+", dtype=np.float16, shape=(int(offsets[-1]), dim))
        mask = np.lib.format.open_memmap(f"{prefix}.mask.npy", mode="w+", dtype=bool, shape=(int(offsets[-1]),))
        shards, shard_rows = np.array([s for s, _ in where], np.int64), np.array([r for _, r in where], np.int64)
        for s in np.unique(shards):  # one fancy-indexed copy per shard, not one per value
            sel = np.flatnonzero(shards == s)
            shard, n = self._shards[s], lengths[sel]
            within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
            source = np.repeat(shard.offsets[shard_rows[sel]], n) + within
            target = np.repeat(offsets[sel], n) + within
            values[target] = shard.values[source]
            mask[target] = shard.mask[source]
        values.flush()
        mask.flush()
        del values, mask
        np.save(f"{prefix}.offsets.npy", offsets)
        return RaggedTokens.load(prefix)


def encode_sequences(encoder: Encoder, values: Sequence[Any], batch_size: int = 64) -> Iterator[RaggedTokens]:
    """``forward_sequence`` over ``values`` in batches (so a ViT's patches never all sit in memory)."""
    encoder.eval()
    with torch.inference_mode():
        for start in range(0, len(values), batch_size):
            batch = encoder.preprocess(values[start : start + batch_size])
            yield RaggedTokens.from_tokens(as_tokens(encoder.forward_sequence(batch), "forward_sequence"))


def cached_sequences(
    store_root: Path, name: str, encoder: Encoder, values: Sequence[Any], prefix: Path,
) -> tuple[RaggedTokens, dict[str, Any]]:
    """:func:`cached_features` for token sequences: computes only unseen values, writes ``values``' sequences
    (one per row, ragged) to ``prefix`` and returns them memory-mapped."""
    key = encoder_key(name, encoder, "tokens")
    store = TokenStore(store_root, key)
    hashes = [content_hash(v) for v in values]
    missing = store.missing(hashes)
    if missing:
        first = {h: i for i, h in reversed(list(enumerate(hashes)))}
        chunk = 1024  # a shard per chunk: bounded memory for large frozen image encoders
        for start in range(0, len(missing), chunk):
            todo_hashes = missing[start : start + chunk]
            todo = [values[first[h]] for h in todo_hashes]
            if isinstance(values, np.ndarray):
                todo = np.stack(todo)
            parts = list(encode_sequences(encoder, todo))
            store.add(todo_hashes, RaggedTokens.concatenate(parts, encoder.output_dim))
    (store.dir / "meta.json").write_text(json.dumps({"encoder": name, "kind": "tokens", "config": encoder.config()},
                                                    default=str))
    tokens = store.write(hashes, prefix, encoder.output_dim)
    stats = {"tokens_key": key, "tokens_computed": len(missing), "tokens": int(tokens.offsets[-1])}
    return tokens, stats


@dataclass(frozen=True)
class CachedFeatures:
    """A frozen input's features for the distinct values of the data: pooled vectors, and token sequences
    when the featurize stage kept them (a candidate's fusion attends)."""

    name: str
    vectors: np.ndarray
    tokens: RaggedTokens | None = None

    @classmethod
    def load(cls, features_dir: Path, name: str, entry: dict[str, Any]) -> CachedFeatures:
        tokens = RaggedTokens.load(features_dir / f"{name}.tokens") if entry.get("tokens") else None
        return cls(name, np.load(features_dir / f"{name}.npy", mmap_mode="r"), tokens)

    def rows(self, rows: np.ndarray) -> CachedRows:
        return CachedRows(self, rows)


@dataclass(frozen=True)
class CachedRows:
    """Some values' cached features, read only once the model says which form its fusion takes."""

    cache: CachedFeatures
    index: np.ndarray

    def features_for(self, sequences: bool) -> torch.Tensor | Tokens:
        if not sequences:
            return torch.from_numpy(np.asarray(self.cache.vectors[self.index]))
        if self.cache.tokens is None:
            raise RuntimeError(f"features of '{self.cache.name}' were cached as pooled vectors only, and this "
                               "model's fusion attends over token sequences; run `mmops data featurize` (or "
                               "`dvc repro featurize`) with the candidate in params.yaml")
        return self.cache.tokens.batch(self.index)
