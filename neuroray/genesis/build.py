"""Build a Genesis dataset: train the tokenizer, tokenize the corpus, cut shards, write the manifest.

Builds are atomic: everything is written into a temporary directory beside the target, the manifest
last, and the directory is renamed into place. A directory without ``manifest.json`` is never a dataset,
so a crash mid-build leaves nothing that could be mistaken for one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from neuroray.config import DataConfig
from neuroray.errors import DataError
from neuroray.genesis.corpus import _CORPUS_VERSION, EMBEDDED, iter_documents, source_files
from neuroray.genesis.shards import (
    FORMAT_VERSION, MANIFEST_FILE, Manifest, dtype_for, verify_dataset,
)
from neuroray.genesis.tokenizer import BOS_ID, EOS_ID, tokenizer_hash, train_tokenizer

TOKENIZER_FILE = "tokenizer.json"
MIN_LAST_SHARD = 1024  # a shorter tail is merged into the shard before it rather than kept alone
_ENCODE_CHUNK = 1000  # documents per encode_batch call: large enough to use the Rust thread pool


def _encoded(tok, docs: Iterator[str]) -> Iterator[np.ndarray]:
    """Each document as ``[BOS] + ids + [EOS]``, so documents stay separable in the flat stream."""
    chunk: list[str] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == _ENCODE_CHUNK:
            yield from _encode_chunk(tok, chunk)
            chunk = []
    if chunk:
        yield from _encode_chunk(tok, chunk)


def _encode_chunk(tok, chunk: list[str]) -> Iterator[np.ndarray]:
    for enc in tok.encode_batch(chunk, add_special_tokens=False):
        yield np.array([BOS_ID, *enc.ids, EOS_ID], dtype=np.int64)


def _write_shard(tmp: Path, index: int, tokens: np.ndarray, dtype: str) -> dict:
    data = tokens.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    name = f"shard_{index:05d}.bin"
    with open(tmp / name, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"id": index, "file": name, "split": "train", "tokens": int(tokens.size), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``, moving any old ``out_dir`` aside first (rename needs an empty target)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not (out_dir / MANIFEST_FILE).is_file():
            raise
        # A concurrent builder of the same settings finished first; its dataset is identical to ours.
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_dataset(source: str, out_dir: str | Path, vocab_size: int, shard_tokens: int, eval_shards: int,
                  cache_dir: str | Path, log: Callable[[str], None] = print) -> Manifest:
    """Build the dataset of ``source`` into ``out_dir`` (replacing what is there) and return its manifest.

    Shards hold ``shard_tokens`` tokens each; a final tail shorter than ``min(1024, shard_tokens // 2)``
    is appended to the shard before it. The last ``eval_shards`` shards are the eval split.
    """
    if shard_tokens <= 0 or eval_shards < 0:
        raise ValueError(f"shard_tokens={shard_tokens} must be positive and eval_shards={eval_shards} >= 0")
    out_dir = Path(out_dir).expanduser().absolute()
    docs_seen = [0, 0]  # documents, characters: counted while the tokenizer reads them

    def counted(docs: Iterator[str]) -> Iterator[str]:
        for doc in docs:
            docs_seen[0] += 1
            docs_seen[1] += len(doc)
            yield doc

    # Two passes over the documents (train, then encode) rather than one list: a user corpus may not
    # fit in memory twice. iter_documents validates the source eagerly, before any work.
    tok = train_tokenizer(counted(iter_documents(source, cache_dir)), vocab_size)
    if docs_seen[0] == 0:
        raise DataError(f"data.source={source} holds no text; add documents or use data.source=embedded")
    log(f"genesis: corpus collected {docs_seen[0]} docs ({docs_seen[1] / 1e6:.1f} M chars)")
    vocab = tok.get_vocab_size()
    dtype = dtype_for(vocab)
    log(f"genesis: tokenizer trained ({vocab} tokens, {dtype} shards)")

    min_tail = min(MIN_LAST_SHARD, max(1, shard_tokens // 2))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        shards: list[dict] = []
        pending: list[np.ndarray] = []
        pending_len = 0
        for doc in _encoded(tok, iter_documents(source, cache_dir)):
            pending.append(doc)
            pending_len += doc.size
            # Cut a shard only once the rest is sure to be a long enough tail, so no tail ever has to be
            # merged into a shard already on disk.
            while pending_len >= shard_tokens + min_tail:
                flat = np.concatenate(pending)
                shards.append(_write_shard(tmp, len(shards), flat[:shard_tokens], dtype))
                log(f"genesis: shard {len(shards) - 1} written ({shard_tokens} tokens)")
                pending, pending_len = [flat[shard_tokens:]], flat.size - shard_tokens
        if pending_len:
            shards.append(_write_shard(tmp, len(shards), np.concatenate(pending), dtype))
            log(f"genesis: shard {len(shards) - 1} written ({pending_len} tokens)")
        total = sum(s["tokens"] for s in shards)
        if len(shards) <= eval_shards:
            raise DataError(
                f"data.source={source} gives {total} tokens = {len(shards)} shard(s) of data.shard_tokens="
                f"{shard_tokens}, not enough for {eval_shards} eval shard(s) plus one train shard; "
                "lower data.shard_tokens (or data.eval_shards)"
            )
        for shard in shards[len(shards) - eval_shards:]:
            shard["split"] = "eval"
        # Written as to_str() so the file's SHA-256 equals tokenizer_hash(tok): one identity for both.
        (tmp / TOKENIZER_FILE).write_text(tok.to_str(), encoding="utf-8")
        tok_sha = tokenizer_hash(tok)
        assert tok_sha == hashlib.sha256((tmp / TOKENIZER_FILE).read_bytes()).hexdigest()
        manifest = Manifest(format_version=FORMAT_VERSION, tokenizer_file=TOKENIZER_FILE,
                            tokenizer_sha256=tok_sha, vocab_size=vocab, dtype=dtype, shards=shards,
                            total_tokens=total)
        manifest.save(tmp)  # last: its presence is what marks a complete dataset
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _source_key(source: str) -> dict:
    if source == EMBEDDED:
        # The embedded text differs between Python versions, so the dataset does too.
        return {"source": EMBEDDED, "python": platform.python_version(), "corpus": _CORPUS_VERSION}
    files = source_files(source)
    # Size and mtime of each file make an edited corpus a new dataset instead of a stale cache hit.
    return {"source": str(Path(source).expanduser().resolve()),
            "files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def dataset_dir(cfg: DataConfig) -> Path:
    """Where the dataset for these settings lives: ``<store>/<name>-<hash of the settings>``."""
    key = {**_source_key(cfg.source), "vocab_size": cfg.vocab_size, "shard_tokens": cfg.shard_tokens,
           "eval_shards": cfg.eval_shards, "format": FORMAT_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = EMBEDDED if cfg.source == EMBEDDED else Path(cfg.source).expanduser().stem
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:40] or "data"
    return Path(cfg.store).expanduser() / f"{name}-{digest}"


def ensure_dataset(cfg: DataConfig, log: Callable[[str], None] = print) -> tuple[Path, Manifest]:
    """The verified dataset for ``cfg``, built on first use and rebuilt if the cached copy is damaged.

    Every shard of a cached dataset is hash-checked; a missing or corrupt file or a malformed manifest
    gets a warning naming it, and the whole dataset is rebuilt (it is derived data).
    """
    root = dataset_dir(cfg)
    if (root / MANIFEST_FILE).exists():
        try:
            manifest = verify_dataset(root)
        except DataError as exc:
            log(f"genesis: warning: {exc}; rebuilding {root}")
        else:
            log(f"genesis: using cached dataset {root} ({len(manifest.shards)} shards, "
                f"{manifest.total_tokens} tokens)")
            return root, manifest
    log(f"genesis: building dataset from {cfg.source} into {root}")
    manifest = build_dataset(cfg.source, root, cfg.vocab_size, cfg.shard_tokens, cfg.eval_shards,
                             cache_dir=Path(cfg.store).expanduser() / "corpus", log=log)
    log(f"genesis: built dataset {root} ({len(manifest.shards)} shards, {manifest.total_tokens} tokens)")
    return root, manifest
