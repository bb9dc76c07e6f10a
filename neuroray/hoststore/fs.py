"""``nrhost://`` for fsspec: files on the driver's disk, reached through its store actor from any node.

A URL reads ``nrhost://<actor>,<timeout_s>,<chunk_bytes>/<absolute path on the driver's disk>``: it names
the actor and carries the two settings a holder on another node needs (cluster.store_timeout_s and
cluster.store_chunk_mb), so nothing else has to be configured there. Paths inside the filesystem are the
plain absolute paths. Only what Genesis and SnapshotStore use is implemented: info, ls, exists, cat_file
(ranged), pipe_file, open (rb/wb), makedirs, rm.

Errors keep their meaning: FileNotFoundError is "no such file"; a store that does not answer in time is
TimeoutError and one that is gone ConnectionError (genesis.store turns both into "unreachable").
"""

from __future__ import annotations

import io
import uuid

from fsspec.spec import AbstractFileSystem

from neuroray.hoststore import NAMESPACE, PROTOCOL


def host_url(actor: str, timeout_s: float, chunk_bytes: int, path: str) -> str:
    return f"{PROTOCOL}://{actor},{timeout_s:g},{int(chunk_bytes)}/{path.lstrip('/')}"


def _split(url: str) -> tuple[str, str]:
    """``(netloc, /path)`` of an nrhost URL."""
    rest = url[len(PROTOCOL) + 3:]
    netloc, _, path = rest.partition("/")
    return netloc, "/" + path


class _Upload(io.BytesIO):
    """A file opened "wb": buffered here, sent on close; an exception inside ``with`` sends nothing."""

    def __init__(self, fs: "HostFileSystem", path: str):
        super().__init__()
        self.fs, self.path = fs, path

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            self.fs.pipe_file(self.path, data)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            super().close()  # discard: half an artefact part is never published
            return False
        self.close()
        return False


class HostFileSystem(AbstractFileSystem):
    protocol = (PROTOCOL,)
    root_marker = "/"

    def __init__(self, store: str, timeout_s: float, chunk_bytes: int, **kwargs):
        super().__init__(**kwargs)
        self.store, self.timeout_s, self.chunk_bytes = store, float(timeout_s), max(1, int(chunk_bytes))
        self._actor = None
        self._node = None

    @classmethod
    def _strip_protocol(cls, path):
        path = path[0] if isinstance(path, list) else path
        if path.startswith(f"{PROTOCOL}://"):
            path = _split(path)[1]
        return path.rstrip("/") or "/"

    @staticmethod
    def _get_kwargs_from_urls(path):
        store, timeout_s, chunk_bytes = _split(path)[0].split(",")
        return {"store": store, "timeout_s": float(timeout_s), "chunk_bytes": int(chunk_bytes)}

    def unstrip_protocol(self, name: str) -> str:
        return host_url(self.store, self.timeout_s, self.chunk_bytes, name)

    # ----- one call to the actor ------------------------------------------------------------------
    def _call(self, method: str, *args):
        import ray

        what = f"the driver-hosted store {self.store}"
        try:
            if self._actor is None:
                self._actor = ray.get_actor(self.store, namespace=NAMESPACE)
            return ray.get(getattr(self._actor, method).remote(*args), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"{what} did not answer {method} within cluster.store_timeout_s="
                               f"{self.timeout_s:g}s") from None
        except ray.exceptions.RayActorError:
            raise ConnectionError(f"{what} is gone (the driver's run ended or its node died)") from None
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, OSError):  # the store's own answer: no such file, refused path
                raise type(cause)(*cause.args) from None
            raise
        except ValueError as exc:  # get_actor: no actor of that name in the cluster
            raise ConnectionError(f"{what} is not running ({exc})") from None

    def _here(self) -> str:
        """This process's node id: the store counts what it moves per node."""
        if self._node is None:
            import ray

            self._node = ray.get_runtime_context().get_node_id()
        return self._node

    # ----- what Genesis and SnapshotStore use -----------------------------------------------------
    def info(self, path, **kwargs):
        return self._call("info", self._strip_protocol(path))

    def ls(self, path, detail=True, **kwargs):
        entries = self._call("ls", self._strip_protocol(path))
        return entries if detail else [e["name"] for e in entries]

    def exists(self, path, **kwargs):
        """Only "no such file" is False: a store that does not answer raises (fsspec's default says False)."""
        try:
            self.info(path)
            return True
        except FileNotFoundError:
            return False

    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        pos, chunks, size = start or 0, [], None
        while True:
            want = pos + self.chunk_bytes if end is None else min(end, pos + self.chunk_bytes)
            data, size = self._call("read", path, pos, want, self._here())
            chunks.append(data)
            pos += len(data)
            stop = size if end is None else min(end, size)
            if not data or pos >= stop:
                return b"".join(chunks)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        path, upload = self._strip_protocol(path), uuid.uuid4().hex[:12]
        step = self.chunk_bytes
        try:
            for i in range(0, max(len(value), 1), step):
                self._call("write", path, upload, bytes(value[i:i + step]), i == 0, i + step >= len(value),
                           self._here())
        except BaseException:
            try:
                self._call("abort", path, upload)
            except Exception:  # the first error is the one to report
                pass
            raise

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if "r" in mode:
            return io.BytesIO(self.cat_file(path))
        if "w" in mode:
            return _Upload(self, self._strip_protocol(path))
        raise ValueError(f"{PROTOCOL}:// opens files for rb or wb, not {mode!r}")

    def makedirs(self, path, exist_ok=False):
        self._call("makedirs", self._strip_protocol(path))

    def mkdir(self, path, create_parents=True, **kwargs):
        self.makedirs(path, exist_ok=True)

    def rm_file(self, path):
        self._call("rm", self._strip_protocol(path), False)

    def rm(self, path, recursive=False, maxdepth=None):
        for p in path if isinstance(path, list) else [path]:
            self._call("rm", self._strip_protocol(p), recursive)

    def _rm(self, path):
        self.rm_file(path)
