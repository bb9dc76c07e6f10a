"""SHA-256 of a range's vectors: one format for proofs, receipts and outer-update bases, hashed once, off the
compute thread.

:func:`tensor_digest` is the one commitment format: the holder (its proof), the coordinator (its receipt) and
the outer step (the base an update applies to) hash the same theta0 or delta and must agree.

:class:`DigestThread` hashes on one background thread (hashlib releases the GIL on large buffers, so compute
runs beside it) and remembers each tensor it hashed while that tensor is alive: a holder that commits to
theta0 at the end of one round, at the start of the next and checks the next update's base against it hashes
theta0 once. Its callers replace theta0 and never change one in place (neuroray/swarm/outer_state.py).
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor


def tensor_digest(t) -> str:
    """sha256 (hex) of a tensor as contiguous little-endian float32 bytes, prefixed by its shape."""
    import torch

    t = t.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(f"f32{tuple(t.shape)}".encode())
    h.update(t.numpy().data)
    return h.hexdigest()


class DigestThread:
    """``of(t)``: a future of :func:`tensor_digest` of ``t``, computed once per live tensor on one thread."""

    def __init__(self, name: str = "digest"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._seen: dict[int, tuple[weakref.ref, Future]] = {}

    def of(self, t) -> Future:
        with self._lock:
            self._seen = {k: v for k, v in self._seen.items() if v[0]() is not None}  # forget dead tensors
            hit = self._seen.get(id(t))
            if hit is not None and hit[0]() is t:
                return hit[1]
            # on CUDA the host copy is taken here, so the thread hashes a tensor nobody else holds
            host = t.detach().to("cpu")
            future = self._pool.submit(tensor_digest, host)
            self._seen[id(t)] = (weakref.ref(t), future)
            return future

    def digest(self, t) -> str:
        """:func:`tensor_digest` of ``t``, waiting for it (at once when it was hashed already)."""
        return self.of(t).result()
