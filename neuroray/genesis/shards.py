"""Which tokens each Driver trains on: assignment, token streams, and recomputing any step's batch.

Assignment: a node starts on shard ``int(sha256(node_id)) mod N`` of the N train shards and reads the
following shards in order, wrapping around (the *ring*). The ring is cut into consecutive windows of
``seq_len + 1`` tokens (a window may span two shards); a microbatch is ``microbatch_size`` windows, and
``labels`` are ``inputs`` shifted by one. Microbatch ``k`` of a node is therefore a pure function of
(manifest, node_id, seq_len, microbatch_size, k), and so is the batch of inner step ``s`` — microbatches
``s*M .. s*M+M-1`` for a Driver that takes ``M`` microbatches per step — which lets any peer recompute
exactly what a Driver trained on (:func:`batch_for`, :func:`batch_span`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from neuroray.errors import DataError
from neuroray.genesis.fetch import ShardSource, corrupt_error
from neuroray.genesis.manifest import SPLITS, Manifest, read_manifest
from neuroray.genesis.store import DatasetRoot, Store, root_url
from neuroray.genesis.tokenizer import read_checked_tokenizer


def shard_for(node_id: str, num_shards: int) -> int:
    """The shard a node starts on: ``int(sha256(node_id)) mod num_shards``, the same on every machine."""
    if num_shards <= 0:
        raise ValueError(f"num_shards={num_shards} must be positive")
    return int(hashlib.sha256(node_id.encode("utf-8")).hexdigest(), 16) % num_shards


def shard_order(manifest: Manifest, node_id: str, split: str = "train") -> list[dict]:
    """The ring of ``split`` shards as ``node_id`` reads it: its own shard first, then the following ones."""
    shards = _split_shards(manifest, split)
    start = shard_for(node_id, len(shards))
    return shards[start:] + shards[:start]


def _split_shards(manifest: Manifest, split: str) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    shards = manifest.train_shards if split == "train" else manifest.eval_shards
    if not shards:
        raise DataError(f"the dataset has no {split} shards; rebuild it with more data or a lower data.shard_tokens")
    return shards


def _source(root, manifest: Manifest, cache_dir=None, cache_bytes=None) -> ShardSource:
    if isinstance(root, DatasetRoot):
        cache_dir, cache_bytes = cache_dir or root.cache_dir, cache_bytes or root.cache_bytes
    return ShardSource(root_url(root), manifest, cache_dir, cache_bytes)


def load_shard(root: str | os.PathLike, manifest: Manifest, shard: dict) -> np.ndarray:
    """Token ids of one shard after verifying its SHA-256 (fetched and cached if the store is remote)."""
    return _source(root, manifest).load(shard)


@dataclass(frozen=True)
class TokenSpan:
    """Tokens ``[start, end)`` of shard ``shard_id``."""

    shard_id: int
    start: int
    end: int


def _locate(ring: list[dict], token: int) -> tuple[int, int]:
    """(ring index, offset in that shard) of token ``token`` of the endlessly repeated ring."""
    offset = token % sum(s["tokens"] for s in ring)
    idx = 0
    while offset >= ring[idx]["tokens"]:  # manifest counts locate it: no skipped shard is read
        offset -= ring[idx]["tokens"]
        idx += 1
    return idx, offset


def _spans(ring: list[dict], token: int, count: int) -> list[TokenSpan]:
    """The shard ranges holding ``count`` ring tokens from ``token`` on, in reading order."""
    idx, offset = _locate(ring, token)
    spans: list[TokenSpan] = []
    while count:
        shard = ring[idx]
        take = min(count, shard["tokens"] - offset)
        spans.append(TokenSpan(shard["id"], offset, offset + take))
        count -= take
        idx, offset = (idx + 1) % len(ring), 0
    return spans


class TokenStream:
    """An endless, deterministic stream of ``(inputs, labels)`` microbatches for one node.

    ``root`` is where the dataset is: a :class:`DatasetRoot`, a local path, or a store URL (a Driver on
    another machine fetches from the URL into its own cache, ``$NEURORAY_CACHE_DIR`` by default). Shards
    are verified before use; the next shard of the ring is prefetched while the current one is read.
    :meth:`seek` and :meth:`from_state` resume exactly.
    """

    def __init__(self, root: str | os.PathLike, manifest: Manifest, node_id: str, seq_len: int,
                 microbatch_size: int, split: str = "train", *, cache_dir: str | None = None,
                 cache_bytes: int | None = None, prefetch: bool = True, _start: int | None = None):
        if seq_len <= 0 or microbatch_size <= 0:
            raise ValueError(f"seq_len={seq_len} and microbatch_size={microbatch_size} must be positive")
        self.root, self.manifest, self.node_id = root, manifest, node_id
        self.seq_len, self.microbatch_size, self.split = seq_len, microbatch_size, split
        shards = _split_shards(manifest, split)
        self.start_index = shard_for(node_id, len(shards)) if _start is None else _start % len(shards)
        self.ring = shards[self.start_index:] + shards[:self.start_index]
        self.ring_tokens = sum(s["tokens"] for s in self.ring)
        self.source = _source(root, manifest, cache_dir, cache_bytes)
        self.prefetch = prefetch
        self._tokens: tuple[int, np.ndarray] | None = None  # (ring index, verified tokens): one shard in memory
        self.seek(0)

    @property
    def window(self) -> int:
        return self.seq_len + 1

    @property
    def tokens_per_microbatch(self) -> int:
        return self.microbatch_size * self.window

    @property
    def shard_id(self) -> int:
        """Id of the shard the next token comes from (for proofs of work and spot checks)."""
        return self.ring[self._ring_idx]["id"]

    def seek(self, position: int) -> None:
        """Continue as if ``position`` microbatches had already been served."""
        if position < 0:
            raise ValueError(f"position={position} must be >= 0")
        self.position = position
        self._ring_idx, self._offset = _locate(self.ring, position * self.tokens_per_microbatch)

    def spans(self, first: int, count: int) -> list[TokenSpan]:
        """Shard ranges holding microbatches ``first .. first+count-1`` (no shard is read)."""
        return _spans(self.ring, first * self.tokens_per_microbatch, count * self.tokens_per_microbatch)

    def state(self) -> dict:
        """JSON-able resume point; pass it to :meth:`from_state`."""
        return {"node_id": self.node_id, "seq_len": self.seq_len, "microbatch_size": self.microbatch_size,
                "split": self.split, "position": self.position, "start_index": self.start_index,
                "tokenizer_sha256": self.manifest.tokenizer_sha256, "total_tokens": self.manifest.total_tokens}

    @classmethod
    def from_state(cls, root: str | os.PathLike, manifest: Manifest, state: dict, **kwargs) -> TokenStream:
        """Rebuild a stream saved with :meth:`state`; DataError if it was saved against other data."""
        if (state["tokenizer_sha256"], state["total_tokens"]) != (manifest.tokenizer_sha256, manifest.total_tokens):
            raise DataError(f"the saved data position belongs to a different dataset than {root}; "
                            "resume with the same data.* settings or start a fresh run")
        stream = cls(root, manifest, state["node_id"], state["seq_len"], state["microbatch_size"],
                     state["split"], _start=state["start_index"], **kwargs)
        stream.seek(state["position"])
        return stream

    def _shard(self, idx: int) -> np.ndarray:
        if self._tokens is None or self._tokens[0] != idx:
            self._tokens = None  # drop the old shard before loading the next: one in memory at a time
            self._tokens = (idx, self.source.load(self.ring[idx]))
            if self.prefetch and len(self.ring) > 1:
                self.source.prefetch(self.ring[(idx + 1) % len(self.ring)])
        return self._tokens[1]

    def _take(self, n: int) -> np.ndarray:
        parts, need = [], n
        while need:
            tokens = self._shard(self._ring_idx)
            part = tokens[self._offset:self._offset + need]
            parts.append(part)
            need -= len(part)
            self._offset += len(part)
            if self._offset >= len(tokens):
                self._ring_idx, self._offset = (self._ring_idx + 1) % len(self.ring), 0
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def next_microbatch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)``, int64 tensors of shape ``[microbatch_size, seq_len]``."""
        flat = self._take(self.tokens_per_microbatch).astype(np.int64)
        windows = torch.from_numpy(flat).view(self.microbatch_size, self.window)
        self.position += 1
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def batch_span(manifest: Manifest, node_id: str, step: int, *, seq_len: int, microbatch_size: int,
               microbatches_per_step: int) -> list[TokenSpan]:
    """The shard token ranges a Driver's inner step ``step`` (0-based, counted over the whole run) used.

    Pure arithmetic on the manifest: a verifier learns which shards to fetch before fetching anything.
    """
    per_microbatch = microbatch_size * (seq_len + 1)
    return _spans(shard_order(manifest, node_id), step * microbatches_per_step * per_microbatch,
                  microbatches_per_step * per_microbatch)


def batch_for(root: str | os.PathLike, manifest: Manifest, node_id: str, step: int, *, seq_len: int,
              microbatch_size: int, microbatches_per_step: int,
              cache_dir: str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(inputs, labels)`` microbatches a Driver trained on at inner step ``step`` (0-based).

    Equal, tensor for tensor, to what ``TokenStream(root, manifest, node_id, seq_len, microbatch_size)``
    served as microbatches ``step*M .. step*M+M-1`` with ``M = microbatches_per_step`` (the Driver's
    ``data.num_microbatches``). Fetches and verifies only the shards :func:`batch_span` names.
    """
    if step < 0 or microbatches_per_step <= 0:
        raise ValueError(f"step={step} must be >= 0 and microbatches_per_step={microbatches_per_step} positive")
    stream = TokenStream(root, manifest, node_id, seq_len, microbatch_size, cache_dir=cache_dir, prefetch=False)
    stream.seek(step * microbatches_per_step)
    return [stream.next_microbatch() for _ in range(microbatches_per_step)]


def eval_batches(root: str | os.PathLike, manifest: Manifest, seq_len: int, microbatch_size: int,
                 max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``max_batches`` microbatches read in order from the first eval shard on.

    The same for every node. Returns at least one batch when eval shards exist (wrapping around if the
    eval split is smaller than one microbatch), and ``[]`` when the dataset has no eval split.
    """
    if not manifest.eval_shards or max_batches <= 0:
        return []
    stream = TokenStream(root, manifest, "eval", seq_len, microbatch_size, split="eval", prefetch=False, _start=0)
    available = stream.ring_tokens // stream.tokens_per_microbatch
    return [stream.next_microbatch() for _ in range(max(1, min(max_batches, available)))]


def verify_dataset(root: str | os.PathLike,
                   progress: Callable[[dict, str | None], None] | None = None) -> Manifest:
    """Check the manifest, the tokenizer and every shard as the store holds them (never a cached copy).

    ``progress(shard, problem)`` is called after each shard (problem None when it verified). Raises the
    shard's own error if one failed, or a DataError counting them if several did.
    """
    store = Store(root_url(root))
    manifest = read_manifest(store)
    read_checked_tokenizer(store, manifest)
    failures: list[DataError] = []
    for shard in manifest.shards:
        where = f"{shard['id']} ({store.url_of(shard['file'])})"
        problem = None
        try:
            data = store.read(shard["file"])
        except FileNotFoundError:
            problem = DataError(f"shard {where} is missing: the manifest names it but the store has no such file; "
                                "rebuild or republish the dataset")
        else:
            actual = hashlib.sha256(data).hexdigest()
            if actual != shard["sha256"] or len(data) != shard["bytes"]:
                problem = corrupt_error(where, shard["sha256"], actual, "rebuild or republish the dataset")
        if problem is not None:
            failures.append(problem)
        if progress is not None:
            progress(shard, None if problem is None else str(problem))
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise DataError(f"{len(failures)} of {len(manifest.shards)} shards failed verification, first: {failures[0]}")
    return manifest

