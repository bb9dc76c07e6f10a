"""Key/value caches for incremental decoding, per layer, per session and per stage holder.

Three levels, each owning the one below:

* :class:`LayerKV` - one layer's rotated keys and values for one session, grown by doubling;
* :class:`SessionKV` - every layer of one stage for one session; its ``length`` is the number of
  positions already cached, which is the RoPE position of the next token: positions continue across
  steps instead of restarting at 0 (the failure DESIGN.md section 5 names);
* :class:`KVCache` - a holder's sessions keyed by session id, with an idle TTL and an LRU bound so an
  abandoned session's memory is freed.

A request names the position its chunk starts at. A cache longer than that is truncated first (the
entries past it are recomputed identically), which makes a retried step idempotent; a cache shorter
than that cannot continue and raises :class:`CacheMissError`, and the caller replays the prefix.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from neuroray.errors import NeurorayError


class CacheMissError(NeurorayError):
    """Sessions whose cache is missing or too short to continue at the requested position."""

    def __init__(self, holder: str, sessions: list[str]):
        self.holder, self.sessions = holder, list(sessions)
        super().__init__(
            f"{holder}: no KV cache to continue session(s) {', '.join(self.sessions)} "
            "(expired, evicted or never seen); replay the prefix from position 0"
        )

    def __reduce__(self):  # rebuilt from its fields when Ray carries it back from a holder
        return CacheMissError, (self.holder, self.sessions)


class LayerKV:
    """Rotated keys and values of one layer for one session: ``[1, n_kv_heads, capacity, head_dim]``.

    Only the first ``length`` positions are valid. Storage doubles when full, so appending one token
    per step costs amortised O(1) copies instead of a ``torch.cat`` of the whole prefix every step.
    """

    __slots__ = ("k", "v", "length")

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` ``[1, H, T, hd]`` after the valid prefix; return views of all valid positions."""
        T = k.shape[2]
        need = self.length + T
        if self.k is None or need > self.k.shape[2]:
            cap = max(need, 16, 2 * (0 if self.k is None else self.k.shape[2]))
            shape = (1, k.shape[1], cap, k.shape[3])
            new_k = k.new_empty(shape)
            new_v = v.new_empty(shape)
            if self.length:
                new_k[:, :, : self.length] = self.k[:, :, : self.length]
                new_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length : need] = k
        self.v[:, :, self.length : need] = v
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need]

    @property
    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class SessionKV:
    """One session's cache for every layer of one stage (keyed by the GLOBAL layer index)."""

    def __init__(self, layer_indices: Iterable[int]) -> None:
        self.layers = {int(i): LayerKV() for i in layer_indices}
        assert self.layers, "a stage holds at least one layer"
        self.last_used = 0.0

    @property
    def length(self) -> int:
        """Positions cached so far: the RoPE position of the next token this session feeds."""
        lengths = {kv.length for kv in self.layers.values()}
        assert len(lengths) == 1, f"layers of one session disagree on the cached length: {lengths}"
        return lengths.pop()

    def truncate(self, length: int) -> None:
        """Forget positions ``>= length`` (storage is kept: the next append overwrites it)."""
        for kv in self.layers.values():
            kv.length = min(kv.length, length)

    @property
    def nbytes(self) -> int:
        return sum(kv.nbytes for kv in self.layers.values())


@dataclass(frozen=True)
class PackedKV:
    """How one layer's packed ``[1, N, ...]`` input splits into sessions: chunk lengths and their caches.

    Segment i is the next ``lengths[i]`` rows; its first token sits at position ``caches[i].length``.
    """

    lengths: tuple[int, ...]
    caches: tuple[LayerKV, ...]


class KVCache:
    """A stage holder's caches, keyed by session id, freed after ``ttl_s`` idle or beyond ``max_sessions``."""

    def __init__(self, layer_indices: Iterable[int], ttl_s: float = 300.0, max_sessions: int = 1024,
                 clock: Callable[[], float] = time.monotonic, name: str = "holder") -> None:
        if ttl_s <= 0 or max_sessions < 1:
            raise ValueError(f"ttl_s={ttl_s} must be positive and max_sessions={max_sessions} at least 1")
        self.layer_indices = tuple(layer_indices)
        self.ttl_s, self.max_sessions, self.clock, self.name = ttl_s, max_sessions, clock, name
        self.sessions: OrderedDict[str, SessionKV] = OrderedDict()  # least recently used first
        self.expired = 0  # sessions freed by the TTL or the LRU bound, for stats

    def acquire(self, requests: list[tuple[str, int]]) -> list[SessionKV]:
        """Caches positioned at each ``(session_id, start_pos)``; all-or-nothing.

        ``start_pos == 0`` starts (or restarts) a session. Raises :class:`CacheMissError` naming every
        session that cannot continue, before touching any cache, so a failed batch changes nothing.
        """
        ids = [sid for sid, _ in requests]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.name}: a batch names the same session twice: {ids}")
        missing = [sid for sid, start in requests
                   if start > 0 and (sid not in self.sessions or self.sessions[sid].length < start)]
        if missing:
            raise CacheMissError(self.name, missing)
        now, out = self.clock(), []
        for sid, start in requests:
            cache = self.sessions.get(sid)
            if cache is None:
                cache = self.sessions[sid] = SessionKV(self.layer_indices)
            cache.truncate(start)
            cache.last_used = now
            self.sessions.move_to_end(sid)
            out.append(cache)
        self._evict_over_limit(keep=set(ids))
        return out

    def _evict_over_limit(self, keep: set[str]) -> None:
        while len(self.sessions) > self.max_sessions:
            sid = next((s for s in self.sessions if s not in keep), None)
            if sid is None:  # the batch itself is larger than the bound: keep it, it is in use
                return
            del self.sessions[sid]
            self.expired += 1

    def close(self, session_id: str) -> bool:
        """Free a finished session now; False if it was not here."""
        return self.sessions.pop(session_id, None) is not None

    def expire(self, now: float | None = None) -> list[str]:
        """Free every session idle for longer than ``ttl_s``; return their ids."""
        now = self.clock() if now is None else now
        gone = [sid for sid, c in self.sessions.items() if now - c.last_used > self.ttl_s]
        for sid in gone:
            del self.sessions[sid]
        self.expired += len(gone)
        return gone

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.sessions.values())

    def __len__(self) -> int:
        return len(self.sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.sessions
