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
    """Per (microbatch, "f"|"b"): ``(state, attempt)``, state "started" | "revoked" | "discard".

    Every routed call carries an ``attempt`` id, increasing over the run. A revoked attempt never runs,
    but a later attempt of the same hop may run here (the router may have to send it back to a holder
    it took it from once, when no other holder of the range can take it): a revocation only refuses
    attempts up to the one revoked. Nothing ever runs twice: once an attempt started, every other
    attempt of that (microbatch, kind) is refused.
    """

    _LIMIT = 8192  # microbatch ids are never reused: past this, forget the oldest half

    def __init__(self):
        self._state: dict[tuple[int, str], tuple[str, int]] = {}
        self._lock = threading.Lock()

    def claim(self, mb: int, kind: str, attempt: int = 0) -> bool:
        """Compute thread, before running a call: False if it was revoked or already ran here."""
        with self._lock:
            state = self._state.get((mb, kind))
            if state is not None and not (state[0] == "revoked" and attempt > state[1]):
                return False
            self._state[(mb, kind)] = ("started", attempt)
            if len(self._state) > self._LIMIT:
                for key in list(self._state)[: self._LIMIT // 2]:
                    del self._state[key]
            return True

    def keep(self, mb: int, store: Callable[[], None]) -> None:
        """Compute thread, after a forward: ``store`` its graph unless the forward was revoked meanwhile."""
        with self._lock:
            state = self._state.get((mb, "f"))
            if state is None or state[0] != "discard":
                store()

    def revoke(self, mb_ids: list[int], kind: str, drop: Callable[[int], None],
               keep_started: bool = False, attempts: list[int] | None = None) -> list[bool]:
        """Control thread: per microbatch, True when the call (attempt ``attempts[i]``, default 0) had not
        started and now never will; False when it started (a backward is then applied here) or that
        attempt was revoked already. ``drop(mb)`` forgets the microbatch's graph, which a revoked forward
        or a revoked backward no longer needs.

        ``keep_started``: take the call back only if it has not started, and leave a started forward's
        graph alone (the router asks this of a call that is overdue to start, not of a hedge loser)."""
        out = []
        with self._lock:
            for i, mb in enumerate(mb_ids):
                attempt = attempts[i] if attempts is not None else 0
                state = self._state.get((mb, kind))
                fresh = state is None or (state[0] == "revoked" and attempt > state[1])
                if fresh:
                    self._state[(mb, kind)] = ("revoked", attempt)
                elif kind == "f" and state[0] == "started" and not keep_started:
                    self._state[(mb, kind)] = ("discard", state[1])
                if fresh or (kind == "f" and not keep_started):
                    drop(mb)
                out.append(fresh)
        return out

    def clear(self) -> None:
        with self._lock:
            self._state.clear()
