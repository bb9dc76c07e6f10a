"""Where Genesis datasets live: any fsspec URL (a local path, ``memory://``, ``s3://``, read-only ``https://``).

:class:`Store` is the only place that talks to fsspec. It turns the zoo of backend exceptions into two
outcomes callers can act on: :class:`FileNotFoundError` (the store answered: no such file) and
:class:`DataError` (the store could not be reached or refused access), so "missing" is never confused
with "unreachable".

Store options (an S3 endpoint, credentials) come from the environment, never from the config, so every
process of a job — the CLI, the trainer, a Driver on another machine — reaches the store the same way:
fsspec reads ``FSSPEC_<PROTOCOL>_<OPTION>`` variables (e.g. ``FSSPEC_S3_ENDPOINT_URL``), and s3fs/boto
read ``AWS_*``. Set them in the Ray runtime env for a cluster.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from neuroray.errors import DataError

READ_ONLY_PROTOCOLS = ("http", "https")  # a CDN serves files; it cannot take writes


def is_remote(url: str | os.PathLike) -> bool:
    """True for fsspec URLs other than local files (``file://`` and plain paths are local)."""
    text = os.fspath(url) if not isinstance(url, str) else url
    return "://" in text and not text.startswith("file://")


def normalize(url: str | os.PathLike) -> str:
    """A canonical form of ``url``: local paths absolute with ``~`` expanded, URLs without a trailing slash."""
    text = os.fspath(url)
    if not is_remote(text):
        text = text[len("file://"):] if text.startswith("file://") else text
        return str(Path(text).expanduser().absolute())
    return text.rstrip("/")


def join(url: str, name: str) -> str:
    return f"{normalize(url)}/{name}"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:160]}"


class Store:
    """One directory of a store: read, write and list plain files by name."""

    def __init__(self, url: str | os.PathLike):
        import fsspec  # lazy: importing fsspec's backends costs time holders without data never pay

        from neuroray.hoststore import register

        register()  # nrhost://, the driver-hosted store of a multi-node run
        self.url = normalize(url)
        self.protocol = self.url.split("://", 1)[0] if is_remote(self.url) else "file"
        self.read_only = self.protocol in READ_ONLY_PROTOCOLS
        with self._io("connect to"):
            self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.is_local = not is_remote(self.url)

    @property
    def local_path(self) -> Path:
        assert self.is_local, f"{self.url} is not a local store"
        return Path(self.url)

    def _key(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def url_of(self, name: str) -> str:
        return join(self.url, name)

    @contextmanager
    def _io(self, what: str, name: str = "") -> Iterator[None]:
        """Map backend errors: FileNotFoundError stays; everything else becomes a one-line DataError."""
        where = self.url_of(name) if name else self.url
        try:
            yield
        except FileNotFoundError:
            raise
        except DataError:
            raise
        except PermissionError as exc:
            raise DataError(f"store refused to {what} {where} ({_short(exc)}); check the store's credentials "
                            "(AWS_* or FSSPEC_* environment variables)") from None
        except Exception as exc:  # aiohttp, botocore, OSError...: one outcome, the store is not usable
            raise DataError(f"store {where} is unreachable, cannot {what} it ({_short(exc)}); check the URL, "
                            "the network and the store's credentials") from None

    def read(self, name: str) -> bytes:
        """The bytes of ``name``; FileNotFoundError if the store has no such file."""
        with self._io("read", name):
            return self.fs.cat_file(self._key(name))

    def exists(self, name: str) -> bool:
        try:
            if self.read_only:
                # fsspec's HTTP info() reports a refused connection as "not found"; a GET tells them
                # apart (only used for small files such as the manifest).
                self.read(name)
                return True
            with self._io("check", name):
                self.fs.info(self._key(name))
            return True
        except FileNotFoundError:
            return False

    def sizes(self) -> dict[str, int] | None:
        """``{file name: size}`` of the directory, or None where the store cannot list (plain HTTP)."""
        if self.read_only:
            return None  # an HTTP "listing" is a scraped HTML page: not evidence of anything
        try:
            with self._io("list"):
                entries = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                for e in entries if e.get("type") == "file"}

    def check_writable(self) -> None:
        """Fail fast, before any work, if nothing can be written here."""
        if self.read_only:
            raise DataError(f"store {self.url} is read-only ({self.protocol}:// serves files, it cannot take "
                            "writes); build to a local path or s3:// and publish that through the CDN")
        with self._io("create"):
            self.fs.makedirs(self.path, exist_ok=True)

    def write(self, name: str, data: bytes) -> None:
        """Write ``name`` whole: a local file goes through a temp file + rename, so it is never seen half-written."""
        if self.is_local:
            atomic_write(self.local_path / name, data)
            return
        with self._io("write", name):
            self.fs.pipe_file(self._key(name), data)

    def remove(self, names: list[str]) -> None:
        """Delete ``names``, ignoring ones already gone (used to clean up after a failed build)."""
        for name in names:
            try:
                with self._io("delete", name):
                    self.fs.rm_file(self._key(name))
            except FileNotFoundError:
                pass


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` through a temp file in the same directory, fsync, rename: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class DatasetRoot(os.PathLike):
    """Where one dataset is, for this machine and for every other one.

    ``str(root)`` is the dataset's URL: what a Driver on any machine fetches shards from (pass it to
    holders). ``os.fspath(root)`` / ``Path(root)`` is this machine's local directory holding the
    verified ``manifest.json`` and ``tokenizer.json``: the dataset itself for a local store, a small
    mirror for a remote one (shards are fetched on demand into ``cache_dir``).
    """

    url: str
    local: Path
    cache_dir: str | None = None
    cache_bytes: int | None = None

    def __fspath__(self) -> str:
        return str(self.local)

    def __str__(self) -> str:
        return self.url

    def __truediv__(self, name: str) -> Path:
        return self.local / name


def root_url(root: str | os.PathLike) -> str:
    """The dataset URL of any root a caller may hold: a :class:`DatasetRoot`, a path or a URL string."""
    return root.url if isinstance(root, DatasetRoot) else normalize(root)
