"""The client side of distributed inference: routing sessions over inference holders, with failover.

:class:`PipelineEngine` gives each session a *route* (one holder per range) and keeps it there,
because that is where its cache lives; it batches the sessions of a route into a few microbatches and
keeps them all in flight so every stage is busy. When a step fails it pings the route's holders,
replaces the dead (or hung) ones by another holder of the same range, and replays the sessions' whole
prefix from position 0, which rebuilds their caches on the new holder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from neuroray.errors import PipelineError
from neuroray.inference.sessions import Session, pack
from neuroray.model.kv_cache import CacheMissError
from neuroray.swarm.ray_errors import unwrap_ray_error

log = logging.getLogger(__name__)


@dataclass
class _Flight:
    group: list[Session]
    route: tuple
    refs: list  # each stage's output; the last is the Validator's logits
    tokens: int
    attempt: int


class PipelineEngine:
    """Routes sessions through ``holders[stage][replica]``; an engine for :func:`neuroray.inference.sessions.run_sessions`.

    ``microbatches`` is how many groups each route's sessions are split into (default: one per stage,
    so every stage has a group to work on). ``step_timeout_s`` bounds one step; only a holder that then
    also fails a ping within ``step_timeout_s`` is given up on, so a slow but healthy holder is kept.
    """

    def __init__(self, holders: list[list], max_seq_len: int, microbatches: int = 0, step_timeout_s: float = 120.0,
                 max_attempts: int = 3):
        import ray

        if not holders or not all(holders):
            raise PipelineError("an inference pipeline needs at least one holder for every layer range")
        self.ray = ray
        self.alive = [list(row) for row in holders]
        self.max_seq_len = max_seq_len
        self.microbatches = microbatches or len(holders)
        self.step_timeout_s, self.max_attempts = step_timeout_s, max_attempts
        self.routes: dict[str, tuple] = {}
        self.load: dict = {}  # holder -> sessions routed through it
        self.in_flight_refs: dict = {}  # ObjectRef of the Validator's logits -> _Flight
        self.node_ids = {h: nid for h, nid in zip([h for row in holders for h in row],
                                                  ray.get([h.ping.remote() for row in holders for h in row],
                                                          timeout=step_timeout_s))}
        self.observed_tokens: dict[str, int] = {}  # node_id -> tokens it was seen to process (proof receipts)
        self.failovers = 0  # groups moved off a lost holder
        self.replays = 0  # groups whose caches were rebuilt in place (expired or evicted)

    # ----- routing --------------------------------------------------------------------------
    def _pick(self, stage: int):
        return min(self.alive[stage], key=lambda h: self.load.get(h, 0))

    def _assign(self, session: Session, route: tuple) -> None:
        old = self.routes.get(session.sid)
        for h in old or ():
            self.load[h] -= 1
        for h in route:
            self.load[h] = self.load.get(h, 0) + 1
        self.routes[session.sid] = route

    def open(self, session: Session) -> None:
        session.check_fits(self.max_seq_len)
        if session.sid not in self.routes:
            self._assign(session, tuple(self._pick(s) for s in range(len(self.alive))))

    def groups(self, sessions: list[Session]) -> list[list[Session]]:
        """Sessions of one route together (one call per holder), in up to ``microbatches`` groups each."""
        by_route: dict[tuple, list[Session]] = {}
        for s in sessions:
            by_route.setdefault(self.routes[s.sid], []).append(s)
        out = []
        for members in by_route.values():
            k = min(self.microbatches, len(members))
            out.extend(members[i::k] for i in range(k))
        return out

    # ----- steps ----------------------------------------------------------------------------
    def submit(self, group: list[Session], replay: bool = False, attempt: int = 0) -> None:
        route = self.routes[group[0].sid]
        assert all(self.routes[s.sid] == route for s in group), "a group shares one route"
        x, requests = pack(group, replay)
        refs, ref = [], x
        for holder in route:
            ref = holder.forward.remote(requests, ref)
            refs.append(ref)
        self.in_flight_refs[ref] = _Flight(group, route, refs, int(x.shape[1]), attempt)

    @property
    def in_flight(self) -> int:
        return len(self.in_flight_refs)

    def wait(self) -> tuple[list[Session], torch.Tensor]:
        ray = self.ray
        while True:
            ready, _ = ray.wait(list(self.in_flight_refs), num_returns=1, timeout=self.step_timeout_s)
            if not ready:
                self._recover_hung()
                continue
            ref = ready[0]
            flight = self.in_flight_refs.pop(ref)
            try:
                logits = ray.get(ref)
            except ray.exceptions.RayError as exc:
                self._observe(flight, failed=True)
                self._recover(flight, unwrap_ray_error(exc))
                continue
            self._observe(flight)
            return flight.group, logits

    def _observe(self, flight: _Flight, failed: bool = False) -> None:
        """Count the tokens each holder of the route was seen to process (the receipts of its proofs).

        After a failure, the stages before the failing one did their work: count exactly those, so a
        holder's honest claim never exceeds what was observed.
        """
        for holder, ref in zip(flight.route, flight.refs):
            if failed:
                done, _ = self.ray.wait([ref], timeout=0)
                if not done:
                    break
                try:
                    self.ray.get(ref)
                except self.ray.exceptions.RayError:
                    break
            nid = self.node_ids[holder]
            self.observed_tokens[nid] = self.observed_tokens.get(nid, 0) + flight.tokens

    def _is_alive(self, holder) -> bool:
        ray = self.ray
        try:
            ray.get(holder.ping.remote(), timeout=self.step_timeout_s)
            return True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False

    def _fail_over(self, flight: _Flight, dead: set) -> None:
        """Move the group off ``dead`` holders and replay its sessions' prefixes on the new route."""
        for s, row in enumerate(self.alive):
            row[:] = [h for h in row if h not in dead]
            if not row:
                raise PipelineError(f"every holder of layer range {s} is gone; start more (replicas=2 or more) "
                                    "to survive the loss of a holder")
        route = tuple(self._pick(s) if h in dead else h for s, h in enumerate(flight.route))
        for session in flight.group:
            self._assign(session, route)
        self.failovers += 1
        self.submit(flight.group, replay=True, attempt=flight.attempt + 1)

    def _recover(self, flight: _Flight, error: BaseException) -> None:
        if flight.attempt + 1 >= self.max_attempts:
            raise PipelineError(f"a generation step failed {self.max_attempts} times; last error: {error}") from None
        dead = {h for h in flight.route if not self._is_alive(h)}
        if dead:
            log.warning("inference: %d holder(s) lost; replaying %d session(s) on another route", len(dead), len(flight.group))
            self._fail_over(flight, dead)
        elif isinstance(error, CacheMissError):
            # A holder expired or evicted a session (e.g. a slow client): rebuild its cache in place.
            self.replays += 1
            self.submit(flight.group, replay=True, attempt=flight.attempt + 1)
        else:
            raise error

    def _recover_hung(self) -> None:
        """No step finished within the timeout: give up on holders that also fail a ping, replay their groups."""
        routes = {h for f in self.in_flight_refs.values() for h in f.route}
        dead = {h for h in routes if not self._is_alive(h)}
        if not dead:
            raise PipelineError(f"no generation step finished within step_timeout_s={self.step_timeout_s:g}s "
                                "and every holder still answers; raise step_timeout_s")
        for ref, flight in list(self.in_flight_refs.items()):
            if dead & set(flight.route):
                del self.in_flight_refs[ref]
                self._fail_over(flight, dead)

    def close(self, session: Session) -> None:
        """Free the session's caches on its route now (not waiting for the TTL)."""
        route = self.routes.pop(session.sid, ())
        for h in route:
            self.load[h] -= 1
            h.close.remote([session.sid])  # fire and forget: a lost close is caught by the TTL

    # ----- proofs ---------------------------------------------------------------------------
    def registrations(self) -> list[dict]:
        """Ledger registrations (NodeRecord dicts) of the live holders."""
        return self.ray.get([h.registration.remote() for row in self.alive for h in row], timeout=self.step_timeout_s)

    def collect_proofs(self) -> list[tuple[bytes, dict]]:
        """Each live holder's signed proof of its work since its last proof, with this engine's receipt.

        The receipt (a :class:`neuroray.ponw.verifier.Receipt` as a dict) holds the tokens this engine
        saw the holder process, which the ledger checks the claim against. Receipts are exact when one
        engine drives the holders between two collections.
        """
        from neuroray.ponw.proof import SignedProof

        holders = [h for row in self.alive for h in row]
        proofs = self.ray.get([h.prove.remote() for h in holders], timeout=self.step_timeout_s)
        out = []
        for data in proofs:
            if data is None:
                continue
            p = SignedProof.from_bytes(data).proof
            receipt = {"node_id": p.node_id, "outer_round": p.outer_round, "proof_type": "inference",
                       "tokens": self.observed_tokens.pop(p.node_id, 0)}
            out.append((data, receipt))
        return out
