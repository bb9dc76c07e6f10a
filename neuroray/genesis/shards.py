"""Genesis shards: the manifest, deterministic assignment, verified loading, and microbatch streams.

A dataset directory holds ``manifest.json``, ``tokenizer.json`` and raw little-endian token arrays
(``shard_00000.bin`` ...). Every shard is checked against the SHA-256 in the manifest before a single
one of its tokens is used: a node can prove which data it trained on only if that data is exactly the
published data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from neuroray.errors import DataError, ShardCorruptError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "eval")
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_SHARD_KEYS = {"id", "file", "split", "tokens", "bytes", "sha256"}


def shard_for(node_id: str, num_shards: int) -> int:
    """The shard a node starts on: ``int(sha256(node_id)) mod num_shards``, the same on every machine."""
    if num_shards <= 0:
        raise ValueError(f"num_shards={num_shards} must be positive")
    return int(hashlib.sha256(node_id.encode("utf-8")).hexdigest(), 16) % num_shards


def _plain_name(name) -> bool:
    # Names come from a possibly remote manifest: never let one point outside the dataset directory.
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name


def dtype_for(vocab_size: int) -> str:
    """Smallest shard dtype that holds every id of a ``vocab_size`` vocabulary."""
    return "uint16" if vocab_size < 65536 else "uint32"


@dataclass
class Manifest:
    """What a dataset directory holds and the SHA-256 of every file a node will read."""

    format_version: int
    tokenizer_file: str
    tokenizer_sha256: str
    vocab_size: int
    dtype: str
    shards: list[dict] = field(default_factory=list)
    total_tokens: int = 0

    @property
    def train_shards(self) -> list[dict]:
        return [s for s in self.shards if s["split"] == "train"]

    @property
    def eval_shards(self) -> list[dict]:
        return [s for s in self.shards if s["split"] == "eval"]

    @property
    def np_dtype(self) -> np.dtype:
        return _DTYPES[self.dtype]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        """Parse and validate; DataError naming ``where`` if anything is missing or inconsistent."""
        def bad(why: str) -> DataError:
            return DataError(f"{where} is malformed ({why}); delete the dataset directory to rebuild it")

        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise bad(f"not JSON: {exc.msg} at line {exc.lineno}") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) != names:
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise bad(f"expected keys {sorted(names)}, got {got}")
        m = cls(**raw)
        try:
            m._validate(bad)
        except (TypeError, KeyError, AttributeError) as exc:  # a wrong JSON type somewhere
            raise bad(f"wrong field type ({exc})") from None
        return m

    def _validate(self, bad) -> None:
        if self.format_version != FORMAT_VERSION:
            raise bad(f"format_version {self.format_version}, this code reads {FORMAT_VERSION}")
        if self.dtype not in _DTYPES:
            raise bad(f"dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")
        if not _plain_name(self.tokenizer_file):
            raise bad(f"tokenizer_file {self.tokenizer_file!r} is not a plain file name")
        if not isinstance(self.shards, list) or not self.shards:
            raise bad("no shards")
        for s in self.shards:
            if not isinstance(s, dict) or set(s) != _SHARD_KEYS:
                raise bad(f"shard entry {s!r} needs keys {sorted(_SHARD_KEYS)}")
            if s["split"] not in SPLITS:
                raise bad(f"shard {s['id']} split {s['split']!r} is not one of {SPLITS}")
            if not _plain_name(s["file"]):
                raise bad(f"shard {s['id']} file {s['file']!r} is not a plain file name")
            if not (isinstance(s["tokens"], int) and s["tokens"] > 0):
                raise bad(f"shard {s['id']} tokens {s['tokens']!r} is not a positive integer")
            if s["bytes"] != s["tokens"] * _DTYPES[self.dtype].itemsize:
                raise bad(f"shard {s['id']} bytes {s['bytes']} != tokens {s['tokens']} x {self.dtype}")
        if self.total_tokens != sum(s["tokens"] for s in self.shards):
            raise bad("total_tokens is not the sum of the shards' tokens")

    def save(self, root: str | Path) -> Path:
        path = Path(root) / MANIFEST_FILE
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        """Read ``<root>/manifest.json``; DataError naming the file if it is missing or malformed."""
        path = Path(root) / MANIFEST_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(
                f"cannot read {path} ({exc.__class__.__name__}); build the dataset with ensure_dataset "
                "or point data.store at a built one"
            ) from None
        return cls.from_json(text, where=str(path))


def load_shard(root: str | Path, manifest: Manifest, shard: dict) -> np.ndarray:
    """Token ids of one shard, read-only, after checking its bytes against the manifest's SHA-256.

    Raises :class:`ShardCorruptError` on a hash or length mismatch, :class:`DataError` if it is missing.
    """
    path = Path(root) / shard["file"]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"shard {path} is missing or unreadable ({exc.__class__.__name__}); "
                        "delete the dataset directory and rerun to rebuild it") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != shard["sha256"] or len(data) != shard["bytes"]:
        raise ShardCorruptError(str(path), shard["sha256"], actual)
    return np.frombuffer(data, dtype=manifest.np_dtype)


def verify_dataset(root: str | Path) -> Manifest:
    """Load the manifest and check the tokenizer and every shard against it; raise DataError if not."""
    root = Path(root)
    manifest = Manifest.load(root)
    tok_path = root / manifest.tokenizer_file
    try:
        actual = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    except OSError:
        raise DataError(f"tokenizer {tok_path} is missing; delete the dataset directory to rebuild it") from None
    if actual != manifest.tokenizer_sha256:
        raise ShardCorruptError(str(tok_path), manifest.tokenizer_sha256, actual)
    for shard in manifest.shards:
        load_shard(root, manifest, shard)
    return manifest


class TokenStream:
    """An endless, deterministic stream of ``(inputs, labels)`` microbatches for one node.

    The split's shards form a ring; the stream starts at shard ``shard_for(node_id, N)`` and reads the
    ring in order, wrapping around. It is cut into consecutive, non-overlapping windows of
    ``seq_len + 1`` tokens (windows may span a shard boundary); ``labels`` is ``inputs`` shifted by one.
    Shards are loaded and verified lazily. Microbatch ``k`` depends only on (manifest, node_id, seq_len,
    microbatch_size, split, k), so :meth:`seek` and :meth:`from_state` resume exactly.
    """

    def __init__(self, root: str | Path, manifest: Manifest, node_id: str, seq_len: int,
                 microbatch_size: int, split: str = "train", *, _start: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        if seq_len <= 0 or microbatch_size <= 0:
            raise ValueError(f"seq_len={seq_len} and microbatch_size={microbatch_size} must be positive")
        self.root, self.manifest, self.node_id = Path(root), manifest, node_id
        self.seq_len, self.microbatch_size, self.split = seq_len, microbatch_size, split
        shards = manifest.train_shards if split == "train" else manifest.eval_shards
        if not shards:
            raise DataError(f"the dataset in {self.root} has no {split} shards; rebuild it with more data "
                            "or a lower data.shard_tokens")
        self.start_index = shard_for(node_id, len(shards)) if _start is None else _start % len(shards)
        # The ring as this node reads it, beginning with its own shard.
        self.ring = shards[self.start_index:] + shards[:self.start_index]
        self.ring_tokens = sum(s["tokens"] for s in self.ring)
        self._cache: dict[int, np.ndarray] = {}  # ring index -> tokens of the shard being read
        self.seek(0)

    @property
    def window(self) -> int:
        return self.seq_len + 1

    @property
    def shard_id(self):
        """Id of the shard the next token comes from (for proofs of work and spot checks)."""
        return self.ring[self._ring_idx]["id"]

    def seek(self, position: int) -> None:
        """Continue as if ``position`` microbatches had already been served."""
        if position < 0:
            raise ValueError(f"position={position} must be >= 0")
        self.position = position
        offset = (position * self.microbatch_size * self.window) % self.ring_tokens
        idx = 0
        # Manifest token counts locate the offset without reading any skipped shard.
        while offset >= self.ring[idx]["tokens"]:
            offset -= self.ring[idx]["tokens"]
            idx += 1
        self._ring_idx, self._offset = idx, offset

    def state(self) -> dict:
        """JSON-able resume point; pass it to :meth:`from_state`."""
        return {"node_id": self.node_id, "seq_len": self.seq_len, "microbatch_size": self.microbatch_size,
                "split": self.split, "position": self.position, "start_index": self.start_index,
                "tokenizer_sha256": self.manifest.tokenizer_sha256, "total_tokens": self.manifest.total_tokens}

    @classmethod
    def from_state(cls, root: str | Path, manifest: Manifest, state: dict) -> TokenStream:
        """Rebuild a stream saved with :meth:`state`; DataError if it was saved against other data."""
        if (state["tokenizer_sha256"], state["total_tokens"]) != (manifest.tokenizer_sha256, manifest.total_tokens):
            raise DataError(f"the saved data position belongs to a different dataset than {root}; "
                            "resume with the same data.* settings or start a fresh run")
        stream = cls(root, manifest, state["node_id"], state["seq_len"], state["microbatch_size"],
                     state["split"], _start=state["start_index"])
        stream.seek(state["position"])
        return stream

    def _shard(self, idx: int) -> np.ndarray:
        if idx not in self._cache:
            self._cache.clear()  # one shard in memory at a time; a spanning window holds views of both
            self._cache[idx] = load_shard(self.root, self.manifest, self.ring[idx])
        return self._cache[idx]

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
        flat = self._take(self.microbatch_size * self.window).astype(np.int64)
        windows = torch.from_numpy(flat).view(self.microbatch_size, self.window)
        self.position += 1
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def eval_batches(root: str | Path, manifest: Manifest, seq_len: int, microbatch_size: int,
                 max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``max_batches`` microbatches read in order from the first eval shard on.

    The same for every node. Returns at least one batch when eval shards exist (wrapping around if the
    eval split is smaller than one microbatch), and ``[]`` when the dataset has no eval split.
    """
    if not manifest.eval_shards or max_batches <= 0:
        return []
    stream = TokenStream(root, manifest, "eval", seq_len, microbatch_size, split="eval", _start=0)
    available = stream.ring_tokens // (microbatch_size * stream.window)
    return [stream.next_microbatch() for _ in range(max(1, min(max_batches, available)))]
