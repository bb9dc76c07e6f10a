"""Which routed calls a holder ran, and which the router took back (swarm routing, docs/routing.md).

The router revokes a call it re-sent elsewhere from the holder's control thread, while the compute
thread claims a call before running it. Under one lock, exactly one of the two wins for each
(microbatch, "f"|"b"): so a range applies each microbatch's gradient once, and a holder never applies
the same microbatch twice.
"""

from __future__ import annotations

import threading
from typing import Callable


class Claims:
    _LIMIT = 8192  # microbatch ids are never reused: past this, forget the oldest half

    def __init__(self):
        self._state: dict[tuple[int, str], str] = {}  # -> "started" | "revoked" | "discard"
        self._lock = threading.Lock()

    def claim(self, mb: int, kind: str) -> bool:
        """Compute thread, before running a call: False if it was revoked or already ran here."""
        with self._lock:
            if (mb, kind) in self._state:
                return False
            self._state[(mb, kind)] = "started"
            if len(self._state) > self._LIMIT:
                for key in list(self._state)[: self._LIMIT // 2]:
                    del self._state[key]
            return True

    def keep(self, mb: int, store: Callable[[], None]) -> None:
        """Compute thread, after a forward: ``store`` its graph unless the forward was revoked meanwhile."""
        with self._lock:
            if self._state.get((mb, "f")) != "discard":
                store()

    def revoke(self, mb_ids: list[int], kind: str, drop: Callable[[int], None],
               keep_started: bool = False) -> list[bool]:
        """Control thread: per microbatch, True when the call had not started and now never will; False
        when it started (a backward is then applied here). ``drop(mb)`` forgets the microbatch's graph,
        which a revoked forward or a revoked backward no longer needs.

        ``keep_started``: take the call back only if it has not started, and leave a started forward's
        graph alone (the router asks this of a call that is overdue to start, not of a hedge loser)."""
        out = []
        with self._lock:
            for mb in mb_ids:
                state = self._state.get((mb, kind))
                if state is None:
                    self._state[(mb, kind)] = "revoked"
                elif kind == "f" and state == "started" and not keep_started:
                    self._state[(mb, kind)] = "discard"
                if state is None or (kind == "f" and not keep_started):
                    drop(mb)
                out.append(state is None)
        return out

    def clear(self) -> None:
        with self._lock:
            self._state.clear()
