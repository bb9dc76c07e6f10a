"""Verified shard bytes: read from a local store, or fetched from a remote one through a local cache.

The one rule: no token of a shard is used before its bytes hash to the SHA-256 in the manifest. It holds
for fresh downloads and cached files alike. A cached copy that fails is discarded and fetched again; a
download that fails is discarded and fetched once more; a second failure is a :class:`ShardCorruptError`
naming the shard. Verified downloads go into a size-limited cache (least recently used shards are
evicted first), and the shard a stream will need next is prefetched in the background.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import numpy as np

from neuroray.errors import DataError, ShardCorruptError
from neuroray.genesis.manifest import Manifest
from neuroray.genesis.store import Store, atomic_write

log = logging.getLogger("neuroray.genesis")

CACHE_ENV = "NEURORAY_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/neuroray/cache"
DEFAULT_CACHE_BYTES = 4096 << 20


def default_cache_dir() -> Path:
    """$NEURORAY_CACHE_DIR, else ``~/.cache/neuroray/cache`` (the DataConfig default)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def corrupt_error(where: str, expected: str, actual: str, fix: str) -> ShardCorruptError:
    """A ShardCorruptError whose one-line message carries the fix that fits where the bad bytes came from."""
    err = ShardCorruptError(where, expected, actual)
    err.args = (f"shard {where} is corrupt: sha256 {actual[:12]}… != manifest {expected[:12]}…; {fix}",)
    return err


def _verified(data: bytes, shard: dict) -> tuple[bool, str]:
    actual = hashlib.sha256(data).hexdigest()
    return actual == shard["sha256"] and len(data) == shard["bytes"], actual


class ShardCache:
    """Verified shards on local disk, named by their SHA-256, evicted least-recently-used past ``max_bytes``."""

    def __init__(self, cache_dir: str | Path, max_bytes: int):
        self.dir = Path(cache_dir).expanduser() / "shards"
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def path(self, sha256: str) -> Path:
        return self.dir / f"{sha256}.bin"

    def get(self, shard: dict, what: str) -> bytes | None:
        """The cached bytes of ``shard`` if present and verified; a bad copy is deleted and None returned."""
        path = self.path(shard["sha256"])
        try:
            data = path.read_bytes()
        except OSError:  # absent, or evicted by another process between listing and reading
            return None
        ok, actual = _verified(data, shard)
        if not ok:
            path.unlink(missing_ok=True)
            log.warning("genesis: cached copy of %s failed verification (sha256 %s…), discarded; re-fetching",
                        what, actual[:12])
            return None
        try:
            os.utime(path)  # mark as recently used
        except OSError:
            pass
        return data

    def put(self, shard: dict, data: bytes, keep: set[str]) -> None:
        atomic_write(self.path(shard["sha256"]), data)
        self.evict(keep | {shard["sha256"]})

    def evict(self, keep: set[str]) -> None:
        """Delete the least recently used shards until the cache fits; never those in ``keep``."""
        with self._lock:
            entries = []
            for p in self.dir.glob("*.bin"):
                try:
                    st = p.stat()
                except OSError:
                    continue
                entries.append((st.st_mtime, st.st_size, p))
            total = sum(size for _, size, _ in entries)
            for _, size, p in sorted(entries):
                if total <= self.max_bytes:
                    break
                if p.stem not in keep:
                    p.unlink(missing_ok=True)
                    total -= size


class ShardSource:
    """Verified shards of one dataset (its URL and manifest) for this process."""

    def __init__(self, url: str, manifest: Manifest, cache_dir: str | Path | None = None,
                 cache_bytes: int | None = None):
        self.store = Store(url)
        self.manifest = manifest
        self.cache = None if self.store.is_local else ShardCache(
            cache_dir or default_cache_dir(), cache_bytes or DEFAULT_CACHE_BYTES)
        self._prefetching: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def _what(self, shard: dict) -> str:
        return f"{shard['id']} ({self.store.url_of(shard['file'])})"

    def load(self, shard: dict) -> np.ndarray:
        """Token ids of ``shard``, read-only, after its SHA-256 matched the manifest."""
        data = self._load_local(shard) if self.cache is None else self._load_remote(shard)
        return np.frombuffer(data, dtype=self.manifest.np_dtype)

    def _load_local(self, shard: dict) -> bytes:
        path = self.store.local_path / shard["file"]
        for _ in range(2):  # a second read rules out a torn read; the store itself is the only copy
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise DataError(f"shard {self._what(shard)} is missing: the manifest names it but the dataset "
                                "lacks the file; rebuild the dataset (python -m neuroray.genesis build)") from None
            except OSError as exc:
                raise DataError(f"shard {self._what(shard)} is unreadable ({exc.__class__.__name__}); check the "
                                "disk, or rebuild the dataset") from None
            ok, actual = _verified(data, shard)
            if ok:
                return data
        raise corrupt_error(str(path), shard["sha256"], actual,
                            "the dataset's own copy is damaged: rebuild it (python -m neuroray.genesis build)")

    def _load_remote(self, shard: dict) -> bytes:
        with self._lock:
            pending = self._prefetching.pop(shard["sha256"], None)
        if pending is not None:
            pending.join()
        data = self.cache.get(shard, f"shard {self._what(shard)}")
        return data if data is not None else self._download(shard)

    def _download(self, shard: dict) -> bytes:
        """Fetch, verify, cache. A bad download is discarded and fetched once more, then it is an error."""
        for attempt in (1, 2):
            try:
                data = self.store.read(shard["file"])
            except FileNotFoundError:
                raise DataError(f"shard {self._what(shard)} is missing: the manifest names it but "
                                "the store has no such file; rebuild or republish the dataset") from None
            ok, actual = _verified(data, shard)
            if ok:
                with self._lock:
                    keep = set(self._prefetching)
                self.cache.put(shard, data, keep=keep)
                return data
            if attempt == 1:
                log.warning("genesis: shard %s failed verification (sha256 %s… != %s…), discarded; re-fetching once",
                            self._what(shard), actual[:12], shard["sha256"][:12])
        raise corrupt_error(self._what(shard), shard["sha256"], actual,
                            "fetched twice, bad both times: the store's copy is damaged; rebuild or republish the dataset")

    def prefetch(self, shard: dict) -> None:
        """Start fetching ``shard`` into the cache in the background (remote stores only; idempotent)."""
        if self.cache is None or self.cache.path(shard["sha256"]).exists():
            return
        with self._lock:
            if shard["sha256"] in self._prefetching:
                return
            thread = threading.Thread(target=self._prefetch, args=(shard,), daemon=True,
                                      name=f"genesis-prefetch-{shard['id']}")
            self._prefetching[shard["sha256"]] = thread
        thread.start()

    def wait(self) -> None:
        """Block until background prefetches have finished (clean shutdown, tests)."""
        with self._lock:
            threads = list(self._prefetching.values())
        for thread in threads:
            thread.join()

    def _prefetch(self, shard: dict) -> None:
        try:
            self._download(shard)
        except Exception as exc:  # the foreground load fetches again and reports the error where it matters
            log.debug("genesis: prefetch of shard %s failed: %s", self._what(shard), exc)
