"""Build a Genesis dataset: train (or grow) the tokenizer, encode the corpus, cut shards, write the manifest.

Two streamed passes over the text: the first trains the tokenizer, the second encodes documents as
``BOS ids EOS`` into one flat token stream that is cut into shards of ``data.shard_tokens`` tokens.
Shards are hashed and written by a background thread, so I/O overlaps the (Rust, GIL-free) encoding.

Builds are atomic: ``manifest.json`` is written last and a directory without one is never a dataset.
On a local disk everything goes into a temporary directory that is renamed into place; on an object
store the shards go straight to their keys and the manifest's single PUT is the commit (an old manifest
is deleted first, so a rebuild is never half-visible). A failed build removes what it wrote.

Extending in place: a build that grows ``data.base_tokenizer`` into a store that already holds a dataset
leaves that dataset readable until its manifest is replaced, and its files after: the new tokenizer and
shards get names of their own (``tokenizer-<sha>-<nonce>.json``, ``shard-<sha>-<nonce>_00000.bin``), the manifest is
written last, and only files that neither the new nor the old manifest names are removed. A run training
on the old manifest keeps reading its shards until it switches (neuroray/genesis/extend.py, docs/genesis.md).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from neuroray.config import DataConfig
from neuroray.errors import DataError
from neuroray.genesis.corpus import Source, open_source
from neuroray.genesis.manifest import (
    DTYPES, FORMAT_VERSION, MANIFEST_FILE, Manifest, check_pinned, dtype_for, read_manifest,
)
from neuroray.genesis.own_tokenizer import check_tokenizer_matches_manifest, load_user_tokenizer
from neuroray.genesis.shards import verify_dataset
from neuroray.genesis.store import DatasetRoot, Store, atomic_write, join, normalize
from neuroray.genesis.tokenizer import (
    BOS_ID, EOS_ID, encode_documents, grow_tokenizer, read_checked_tokenizer, tokenizer_from_bytes, tokenizer_hash,
    train_tokenizer,
)

TOKENIZER_FILE = "tokenizer.json"
MIN_LAST_SHARD = 1024  # a shorter tail is merged into the shard before it rather than kept alone
ENCODE_DOCS = 1000  # documents per encode call: large enough for the Rust thread pool to spread
WRITES_IN_FLIGHT = 2  # shards queued for the writer thread: bounds memory to a few shards

Progress = Callable[[str, int, int], None]  # (phase "tokenizer" | "shards", documents, tokens) so far


def _batches(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(itertools.islice(docs, size)):
        yield batch


def encode_batch(tok, docs: list[str], dtype: np.dtype) -> np.ndarray:
    """``BOS ids EOS`` for every document, flattened into one array of the shard dtype."""
    ids = list(encode_documents(tok, docs))
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    body = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lens.sum()))
    starts = np.cumsum(lens + 2) - (lens + 2)  # where each document's BOS goes
    out = np.empty(body.size + 2 * len(ids), dtype=dtype)
    keep = np.ones(out.size, dtype=bool)
    keep[starts] = keep[starts + lens + 1] = False
    out[starts], out[starts + lens + 1] = BOS_ID, EOS_ID
    out[keep] = body
    return out


class ShardWriter:
    """Cuts a token stream into shards; a background thread hashes and writes them in order."""

    def __init__(self, store: Store, shard_tokens: int, dtype: str, prefix: str = "shard_"):
        self.store, self.shard_tokens, self.dtype, self.prefix = store, shard_tokens, DTYPES[dtype], prefix
        self.min_tail = min(MIN_LAST_SHARD, max(1, shard_tokens // 2))
        self.shards: list[dict] = []
        self.written: list[str] = []  # file names, for cleanup after a failure
        self._parts: list[np.ndarray] = []
        self._pending = 0
        self._futures: list[Future] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genesis-writer")

    def add(self, tokens: np.ndarray) -> None:
        self._parts.append(tokens)
        self._pending += tokens.size
        # Cut only once the rest is sure to be a long enough tail, so no tail ever has to be merged
        # into a shard already written.
        if self._pending >= self.shard_tokens + self.min_tail:
            flat = np.concatenate(self._parts)
            start = 0
            while flat.size - start >= self.shard_tokens + self.min_tail:
                self._emit(flat[start:start + self.shard_tokens])
                start += self.shard_tokens
            self._parts, self._pending = [flat[start:]], flat.size - start

    def _emit(self, tokens: np.ndarray) -> None:
        while len(self._futures) >= WRITES_IN_FLIGHT:
            self.shards.append(self._futures.pop(0).result())  # re-raises a write error here
        index = len(self.shards) + len(self._futures)
        self._futures.append(self._pool.submit(self._write, index, tokens))

    def _write(self, index: int, tokens: np.ndarray) -> dict:
        data = tokens.astype(self.dtype, copy=False).tobytes()
        name = f"{self.prefix}{index:05d}.bin"
        self.written.append(name)
        self.store.write(name, data)
        return {"id": index, "file": name, "split": "train", "tokens": int(tokens.size), "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest()}

    def finish(self) -> list[dict]:
        """Write the tail and wait for every write; returns the shard entries in order."""
        if self._pending:
            self._emit(np.concatenate(self._parts))
            self._parts, self._pending = [], 0
        try:
            while self._futures:
                self.shards.append(self._futures.pop(0).result())
        finally:
            self._pool.shutdown(wait=True)
        return self.shards

    def abort(self) -> None:
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=True)


class _TrainingDocs:
    """The source as the tokenizer trainer reads it: re-iterable (growth may train more than once), cut to
    ``data.tokenizer_docs`` documents, counting what was read (for progress and the empty-corpus check)."""

    def __init__(self, source: Source, limit: int, progress: Progress | None):
        self.source, self.limit, self.progress, self.seen = source, limit, progress, 0

    def __iter__(self) -> Iterator[str]:
        self.seen = 0
        docs = iter(self.source) if self.limit <= 0 else itertools.islice(self.source, self.limit)
        for doc in docs:
            self.seen += 1
            if self.progress is not None and self.seen % ENCODE_DOCS == 0:
                self.progress("tokenizer", self.seen, 0)
            yield doc


def _tokenizer(cfg: DataConfig, source: Source, progress: Progress | None) -> tuple[Tokenizer, str | None, int | None]:
    """Train (or grow ``data.base_tokenizer``) on the corpus, or take ``data.tokenizer`` as it is; returns
    (tokenizer, parent sha or None, docs read; None when no pass over the corpus was made)."""
    if cfg.tokenizer:
        return load_user_tokenizer(cfg.tokenizer)[0], None, None
    docs = _TrainingDocs(source, cfg.tokenizer_docs, progress)
    if cfg.base_tokenizer:
        base_bytes = read_base_tokenizer(cfg.base_tokenizer)
        tok = grow_tokenizer(tokenizer_from_bytes(base_bytes, cfg.base_tokenizer), docs, cfg.vocab_size)
        return tok, hashlib.sha256(base_bytes).hexdigest(), docs.seen
    return train_tokenizer(docs, cfg.vocab_size), None, docs.seen


def read_base_tokenizer(url: str) -> bytes:
    """The bytes of ``data.base_tokenizer``: a tokenizer.json, or a dataset (whose tokenizer is then used)."""
    url = normalize(url)
    if not url.endswith(".json"):
        store = Store(url)
        manifest = read_manifest(store)
        return read_checked_tokenizer(store, manifest, f"data.base_tokenizer's tokenizer in {url}", "its manifest",
                                      "rebuild or republish that dataset")
    parent, _, name = url.rpartition("/")
    try:
        return Store(parent).read(name)
    except FileNotFoundError:
        raise DataError(f"data.base_tokenizer={url} does not exist; point it at a tokenizer.json or a dataset") from None


def _write_all(cfg: DataConfig, source: Source, store: Store, log, progress: Progress | None,
               extend: bool = False) -> Manifest:
    """``extend``: the store holds a dataset that must stay readable: new files get names of their own."""
    tok, parent, docs_seen = _tokenizer(cfg, source, progress)
    if docs_seen == 0:  # a given tokenizer reads nothing here: an empty corpus then gives no shards, refused below
        raise DataError(f"data.source={cfg.source} holds no text (every document is empty); add documents or use "
                        "data.source=embedded")
    vocab = tok.get_vocab_size()
    dtype = dtype_for(vocab)
    how = (f"data.tokenizer={cfg.tokenizer}" if docs_seen is None else
           f"{'grown' if parent else 'trained'} on {docs_seen} docs")
    log(f"genesis: tokenizer {how} ({vocab} tokens, {dtype} shards)")
    sha = tokenizer_hash(tok)
    tok_file, prefix = TOKENIZER_FILE, "shard_"
    if extend:  # a name per build: even the same tokenizer over other text never overwrites a file being read
        tag = f"{sha[:12]}-{os.urandom(3).hex()}"
        tok_file, prefix = f"tokenizer-{tag}.json", f"shard-{tag}_"
    shards = write_shards(tok, source, store, cfg.shard_tokens, progress, prefix=prefix)
    try:
        total = sum(s["tokens"] for s in shards)
        if len(shards) <= cfg.eval_shards:
            raise DataError(
                f"data.source={cfg.source} gives {total} tokens = {len(shards)} shard(s) of data.shard_tokens="
                f"{cfg.shard_tokens}, not enough for {cfg.eval_shards} eval shard(s) plus one train shard; "
                "lower data.shard_tokens (or data.eval_shards)"
            )
        for shard in shards[len(shards) - cfg.eval_shards:]:
            shard["split"] = "eval"
        tok_bytes = tok.to_str().encode("utf-8")  # the file's SHA-256 is tokenizer_hash(tok): one identity
        store.write(tok_file, tok_bytes)
        manifest = Manifest(
            format_version=FORMAT_VERSION, tokenizer_file=tok_file, tokenizer_sha256=sha,
            vocab_size=vocab, dtype=dtype, shards=shards, total_tokens=total,
            total_bytes=sum(s["bytes"] for s in shards), shard_tokens=cfg.shard_tokens, source=source.describe(),
            parent_tokenizer_sha256=parent,
        )
        store.write(MANIFEST_FILE, (manifest.to_json() + "\n").encode("utf-8"))  # last: the commit
    except BaseException:
        store.remove([*(s["file"] for s in shards), tok_file])  # invisible without a manifest; no litter
        raise
    return manifest


def write_shards(tok, source, store: Store, shard_tokens: int, progress: Progress | None = None,
                 prefix: str = "shard_") -> list[dict]:
    """Encode every document of ``source`` and write the shards into ``store``; returns their entries.

    This is the pass the build benchmark times against raw ``encode_batch``.
    """
    dtype = dtype_for(tok.get_vocab_size())
    writer = ShardWriter(store, shard_tokens, dtype, prefix)
    try:
        docs = tokens = 0
        for batch in _batches(iter(source), ENCODE_DOCS):
            ids = encode_batch(tok, batch, DTYPES[dtype])
            writer.add(ids)
            docs, tokens = docs + len(batch), tokens + ids.size
            if progress is not None:
                progress("shards", docs, tokens)
        return writer.finish()
    except BaseException:
        writer.abort()
        store.remove(writer.written)
        raise


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
        shutil.rmtree(tmp, ignore_errors=True)  # a concurrent builder of the same settings finished first
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_dataset(cfg: DataConfig, url: str | None = None, *, log: Callable[[str], None] = print,
                  progress: Progress | None = None) -> Manifest:
    """Build the dataset of ``cfg`` at ``url`` (default :func:`dataset_url`), replacing what is there."""
    if cfg.shard_tokens <= 0 or cfg.eval_shards < 0:
        raise DataError(f"data.shard_tokens={cfg.shard_tokens} must be positive and data.eval_shards="
                        f"{cfg.eval_shards} >= 0")
    url = normalize(url or dataset_url(cfg))
    store = Store(url)
    store.check_writable()  # read-only or unreachable: fail before any work
    source = open_source(cfg)
    if cfg.base_tokenizer and store.exists(MANIFEST_FILE):
        return _extend(cfg, source, store, log, progress)
    if store.is_local:
        out = store.local_path
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            manifest = _write_all(cfg, source, Store(tmp), log, progress)
            _replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # check_writable created it; leave no empty directory behind
            raise
        return manifest
    store.remove([MANIFEST_FILE])  # the old dataset disappears before any of its files is overwritten
    old_files = set(store.sizes() or {})
    manifest = _write_all(cfg, source, store, log, progress)
    keep = {MANIFEST_FILE, manifest.tokenizer_file, *(s["file"] for s in manifest.shards)}
    store.remove(sorted(f for f in old_files - keep if f.startswith("shard_")))  # a longer old build's tail
    return manifest


def _extend(cfg: DataConfig, source: Source, store: Store, log, progress: Progress | None) -> Manifest:
    """Rebuild the dataset in ``store`` with a grown tokenizer while the one there stays readable (see the
    module docstring): new names, manifest last, then only files neither manifest names are removed."""
    try:
        old = read_manifest(store)
        keep = {old.tokenizer_file, *(s["file"] for s in old.shards)}
    except DataError:  # a damaged dataset: nobody can be reading it
        keep = set()
    log(f"genesis: extending {store.url} in place (its current files stay until the next extension)")
    manifest = _write_all(cfg, source, store, log, progress, extend=True)
    keep |= {MANIFEST_FILE, manifest.tokenizer_file, *(s["file"] for s in manifest.shards)}
    listed = store.sizes()
    if listed is not None:  # files of the extension before the previous one: no run reads them any more
        store.remove(sorted(f for f in listed if f not in keep and f.startswith(("shard", "tokenizer"))))
    return manifest


# ---------------------------------------------------------------- finding or building a dataset


def dataset_url(cfg: DataConfig) -> str:
    """``data.dataset`` if set, else ``<data.store>/<name>-<hash of everything that shapes the data>``."""
    if cfg.dataset:
        return normalize(cfg.dataset)
    source = open_source(cfg)
    key = {**source.key(), "vocab_size": cfg.vocab_size, "shard_tokens": cfg.shard_tokens,
           "eval_shards": cfg.eval_shards, "tokenizer_docs": cfg.tokenizer_docs, "format": FORMAT_VERSION,
           "base_tokenizer": hashlib.sha256(read_base_tokenizer(cfg.base_tokenizer)).hexdigest()
           if cfg.base_tokenizer else ""}
    if cfg.tokenizer:  # a given tokenizer fixes the ids: its hash, not the training knobs, keys the data (only
        # when set, so every dataset built without one keeps its URL)
        tok, sha = load_user_tokenizer(cfg.tokenizer)
        key.update(tokenizer=sha, vocab_size=tok.get_vocab_size(), tokenizer_docs=0)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.name)[:40].strip("._") or "data"
    return join(cfg.store, f"{name}-{digest}")


def check_store(store: Store) -> tuple[Manifest, bytes]:
    """Manifest, tokenizer hash and (where the store can list) every shard's presence and size; returns the
    manifest and the tokenizer's bytes.

    Shard hashes are checked by whoever reads a shard, before use; downloading all of them here would
    make every start as slow as a full `verify`.
    """
    manifest = read_manifest(store)
    tokenizer = read_checked_tokenizer(store, manifest)
    sizes = store.sizes()
    for s in manifest.shards if sizes is not None else ():
        if s["file"] not in sizes:
            raise DataError(f"shard {s['id']} ({store.url_of(s['file'])}) is missing: the manifest names it but the "
                            "store has no such file; rebuild or republish the dataset")
        if sizes[s["file"]] != s["bytes"]:
            raise DataError(f"shard {s['id']} ({store.url_of(s['file'])}) has {sizes[s['file']]} bytes, the manifest "
                            f"says {s['bytes']} (truncated or replaced); rebuild or republish the dataset")
    return manifest, tokenizer


def dataset_root(cfg: DataConfig, store: Store, manifest: Manifest) -> DatasetRoot:
    """The DatasetRoot: a local store is its own root; a remote one gets a verified local mirror."""
    cache_bytes = cfg.cache_size_mb << 20
    if store.is_local:
        return DatasetRoot(store.url, store.local_path, cfg.cache_dir, cache_bytes)
    mirror = Path(cfg.cache_dir).expanduser() / "datasets" / hashlib.sha256(store.url.encode()).hexdigest()[:16]
    tok = read_checked_tokenizer(store, manifest)
    atomic_write(mirror / manifest.tokenizer_file, tok)
    atomic_write(mirror / MANIFEST_FILE, (manifest.to_json() + "\n").encode("utf-8"))
    (mirror / "url.txt").write_text(store.url + "\n", encoding="utf-8")  # for humans browsing the cache
    return DatasetRoot(store.url, mirror, cfg.cache_dir, cache_bytes)


def ensure_dataset(cfg: DataConfig, log: Callable[[str], None] = print,
                   progress: Progress | None = None) -> tuple[DatasetRoot, Manifest]:
    """The checked dataset for ``cfg``: reused if present, built if absent, rebuilt if damaged.

    A local dataset has every shard hash-checked here; a remote one has its manifest, tokenizer and
    listing checked (shards are verified by whoever reads them). A dataset named by ``data.dataset`` is
    used as-is: if it is missing or damaged that is an error, never a rebuild.
    """
    url = dataset_url(cfg)
    store = Store(url)
    if store.exists(MANIFEST_FILE):
        # a manifest that is not the pinned one is refused, never rebuilt over: it may be an attack
        check_pinned(store, cfg.manifest_sha256, cfg.manifest_publisher)
        try:
            manifest = verify_dataset(url) if store.is_local else check_store(store)[0]
        except DataError as exc:
            if cfg.dataset or store.read_only:
                raise
            log(f"genesis: warning: {exc}; rebuilding {url}")
        else:
            if cfg.tokenizer:  # a pinned or named dataset tokenized with another tokenizer: its ids mean other text
                check_tokenizer_matches_manifest(load_user_tokenizer(cfg.tokenizer)[1], manifest)
            log(f"genesis: using dataset {url} ({len(manifest.shards)} shards, {manifest.total_tokens} tokens)")
            return dataset_root(cfg, store, manifest), manifest
    elif cfg.dataset:
        raise DataError(f"no dataset at data.dataset={cfg.dataset}: {MANIFEST_FILE} is missing; build it with "
                        "`python -m neuroray.genesis build data.store=...` or fix the URL")
    log(f"genesis: building dataset from {cfg.source} into {url}")
    manifest = build_dataset(cfg, url, log=log, progress=progress)
    check_pinned(store, cfg.manifest_sha256, cfg.manifest_publisher)  # a pinned run trains on that data or none
    log(f"genesis: built dataset {url} ({len(manifest.shards)} shards, {manifest.total_tokens} tokens)")
    return dataset_root(cfg, store, manifest), manifest

