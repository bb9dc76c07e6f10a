"""Swarm routing: every hop of every microbatch goes to the best holder of the next layer range.

Under ``swarm.routing=router`` a range has several holders (its DiLoCo replicas) and no fixed
pipelines. For one inner step the :class:`Router` drives N microbatches hop by hop:

- **Scoring.** A forward hop goes to the holder of the range with the lowest expected finish time,
  ``latency EWMA x (calls queued + 1) + a penalty per recent failure``. A holder twice as slow gets
  about half the microbatches: load follows measured throughput.
- **Buffering and backpressure.** A holder has at most ``queue_depth`` calls queued or running, so it
  always has the next one ready; an activation it produced waits in the object store until a holder
  downstream has room, and a holder with ``outbound_depth`` such activations gets no more work. No
  new microbatch starts while ``max_inflight`` are between their first forward and last backward.
- **Stuck holders.** A holder runs its calls in order; if the head of its queue has not started
  ``start_grace_s`` after its turn came, it is *taken back* on the holder's control thread (only if it
  has not started: one lock decides), with the calls queued behind it, and all are re-sent. Re-sent and
  hedged calls run on the new holder's ``failover`` thread, beside its own queue.
- **Slow holders.** A started call is late after ``failover_k`` x the p99 of its holder's hop times
  (clamped to ``[failover_floor_s, failover_ceiling_s]``). A late forward is *hedged*: a copy goes to
  another holder from the hop's input, still in the object store, and the first to finish wins; nothing
  is cancelled. A late gradient-applying call is revoked only if it had not started, so a range applies
  each microbatch's gradient exactly once (claims carry an attempt id per call, so a hop may go back to
  a holder it was taken from, but never runs twice there). At a step's tail an idle holder steals a
  slower one's queued, unstarted calls.
- **Dead holders.** Their calls are re-sent at once, and the microbatches whose gradient they had
  applied this step are re-applied on a live holder of the range.
- **Unreachable holders.** A holder's control thread answers at once whatever its compute thread does,
  so a take-back, revoke or ping it leaves unanswered for ``liveness_timeout_s``
  (``cluster.liveness_timeout_s``) has its host probed (neuroray.swarm.liveness); a host that does not
  answer is cut off or gone, and the holder is marked down as if dead. Ray would say so only when its
  health check gives the node up (about a minute, docs/lab.md).
- **Rejected hops.** A holder that rejects an activation or gradient it was sent (neuroray/swarm/hop_guard.py)
  raises before it claims the call; the router knows who produced that input and *benches* the sender: down,
  as if dead (its calls re-sent, the gradients it applied this step re-applied elsewhere), but not probed
  back before the round's outer step, which leaves it out; the hop that made the bad tensor is redone on
  another holder of the sender's range. The trainer names the sender (:attr:`Router.rejections`).
- **Proven-faulty holders.** A holder the hop rechecks prove faulty (a peer's re-execution contradicts what it
  sent; neuroray/training/hop_routes.py) is *barred* (:meth:`Router.bar`): no hop goes to it for the rest of the
  run. It stays up, so it still answers the outer step and loads each theta0, but nothing it computes is used.
- **Rejoining.** A dead holder is probed every ``probe_interval_s``; once Ray has restarted it (it
  restored its newest snapshot) it rejoins at the range's current theta0.

The Router keeps its latency statistics and holder health across steps; the trainer calls
:meth:`Router.run_step` once per inner step (neuroray/training/routed.py).
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import ray

from neuroray.config import SwarmConfig
from neuroray.errors import PipelineError
from neuroray.swarm.hop_guard import HopRejected
from neuroray.swarm.ray_errors import holder_died, unwrap_ray_error, user_error
from neuroray.swarm.route_state import Call, Flight, HolderState, RouterStats, claim_kind, Failed

__all__ = ["Call", "Flight", "HolderState", "Router", "RouterStats", "holder_died"]


class Router:
    def __init__(self, holders_by_range: list[list], cfg: SwarmConfig, theta0_of=None, recovery_timeout_s: float = 120.0,
                 snapshot_dir: str = "", log=print, liveness_timeout_s: float = 0.0, liveness_probe_s: float = 1.0,
                 hosts_lost=None, rounds_of=None):
        """``theta0_of(s)`` returns the ref of range s's current theta0 (a restarted holder rejoins there), and
        ``rounds_of()`` the swarm's outer round count (which it rejoins at).
        ``liveness_timeout_s``: a control call unanswered this long has its holder's host probed, and the
        holder marked down when the host does not answer (0: never); ``hosts_lost(handles)`` says which
        (default: neuroray.swarm.liveness.lost with ``liveness_probe_s``)."""
        self.cfg, self.log, self.theta0_of, self.rounds_of = cfg, log, theta0_of, rounds_of
        self.liveness_timeout_s = liveness_timeout_s
        if hosts_lost is None:
            from neuroray.swarm.liveness import lost

            hosts_lost = lambda handles: lost(handles, liveness_probe_s)  # noqa: E731
        self.hosts_lost = hosts_lost
        self.control_sent: dict = {}  # control-thread call ref -> when it was sent (liveness)
        self.rejoined: list[HolderState] = []  # since the caller last took them (their key may be new)
        self.recovery_timeout_s, self.snapshot_dir = recovery_timeout_s, snapshot_dir
        self.ranges = [[HolderState(h, s, i) for i, h in enumerate(hs)] for s, hs in enumerate(holders_by_range)]
        self.S = len(self.ranges)
        self.calls: dict = {}  # status ref -> Call
        self.flights: dict[int, Flight] = {}  # this step's microbatches
        self.control: dict = {}  # revoke/probe/step/rejoin ref -> (what, holder, payload)
        self.stats = RouterStats()
        self._attempts = 0  # ids of routed calls: a take-back refuses only the attempts it names
        self.rejections: list[tuple[HolderState, HopRejected]] = []  # (sender, why) since the caller last took them

    # ----- scoring and deadlines --------------------------------------------------------------
    def deadline(self, h: HolderState) -> float:
        """How long a call may wait on ``h`` past its due time: k x p99 of its hop times, clamped."""
        if h.deadline_s is None:  # cached until the next observation
            c = self.cfg
            if len(h.samples) < 5:
                h.deadline_s = c.failover_ceiling_s
            else:
                p99 = float(np.percentile(np.asarray(h.samples), 99))
                h.deadline_s = min(max(c.failover_k * p99, c.failover_floor_s), c.failover_ceiling_s)
        return h.deadline_s

    def _score(self, h: HolderState, now: float) -> float:
        latency = h.ewma if h.ewma is not None else 0.0  # never measured (new or rejoined): try it first
        decay = 0.5 ** ((now - h.failure_t) / self.cfg.failover_ceiling_s)
        return latency * (h.inflight + 1) + self.cfg.failure_penalty_s * h.failures * decay

    def pick(self, stage: int, exclude=(), capacity: bool = True) -> HolderState | None:
        now = time.monotonic()
        c = self.cfg
        for h in self.ranges[stage]:
            if h.stuck and not h.queue:
                h.stuck = False  # everything it held has come back: it is answering again
        ok = [h for h in self.ranges[stage] if not h.down and not h.stuck and not h.barred and h not in exclude
              and (not capacity or (h.inflight < c.queue_depth
                                    and (stage == self.S - 1 or h.outbound < c.outbound_depth)))]
        return min(ok, key=lambda h: (self._score(h, now), h.index)) if ok else None

    # ----- one inner step ---------------------------------------------------------------------
    def run_step(self, mb_ids: list[int], timeout_s: float, lr: float | None = None) -> float:
        """Route microbatches ``mb_ids`` forward and back, then submit every live holder's inner step.

        Returns the mean loss. Raises PipelineError when a range has no live holder for
        ``recovery_timeout_s`` or the step makes no progress for ``timeout_s``.
        """
        self.flights = {mb: Flight(mb, [None] * self.S, [None] * self.S, [None] * self.S) for mb in mb_ids}
        waiting = deque(self.flights.values())
        active: list[Flight] = []
        limit = self.cfg.max_inflight or len(mb_ids)
        losses = []
        progress = time.monotonic()
        while waiting or active:
            while waiting and len(active) < limit:
                f = waiting.popleft()
                f.next = ("fb", 0) if self.S == 1 else ("f", 0)
                active.append(f)
            for f in active:
                if f.next is not None:
                    self._dispatch(f)
            if self.pump():
                progress = time.monotonic()
            elif time.monotonic() - progress > timeout_s:
                raise PipelineError(f"no microbatch moved for {timeout_s:g}s; raise cluster.step_timeout_s or check "
                                    "the Ray dashboard for stuck holders")
            self._check_deadlines()
            self._steal()
            self.probe_down()
            for f in [f for f in active if f.done]:
                active.remove(f)
                losses.append(f.loss)
        for hs in self.ranges:
            for h in hs:
                if not h.down and not h.barred:  # a barred holder ran nothing this step
                    h.barrier = h.handle.step.remote(mean=True, after=h.barrier, lr=lr)
                    self.control[h.barrier] = ("step", h, None)
                h.applied.clear()  # in the step now: a later death loses it with the holder's weights
        return sum(losses) / len(losses)

    def _dispatch(self, f: Flight) -> None:
        kind, s = f.next
        if kind == "b":
            h = f.fwd[s]
            if h is None or h.down or h.stuck or h in f.exclude:
                kind = "rb"  # its graph is gone or stuck: recompute the range from its input elsewhere
            else:
                self._submit(f, "b", s, h)
                return
        # a re-sent hop runs on the failover thread, beside the holder's queue: it needs no room in it
        h = self.pick(s, exclude=f.exclude, capacity=f.origin is None)
        if h is None and f.exclude:
            # exclusions are a preference: once a holder is neither down nor stuck it may take the hop back
            f.exclude = {x for x in f.exclude if x.down or x.stuck}
            h = self.pick(s, exclude=f.exclude, capacity=f.origin is None)
        if h is None:
            self._check_range_alive(s)
            return  # backpressure: no holder of the range has room; the hop waits in the object store
        self._submit(f, kind, s, h)

    def _submit(self, f: Flight, kind: str, s: int, h: HolderState, *, repair: bool = False,
                origin: float | None = None) -> Call:
        if not repair and f.next is not None:
            if kind != "b" and s > 0 and f.fwd[s - 1] is not None:
                f.fwd[s - 1].outbound = max(f.fwd[s - 1].outbound - 1, 0)  # its activation is taken
            f.next, origin, f.origin = None, f.origin, None
        behind, f.behind = f.behind, False
        urgent = origin is not None  # it replaces a late or lost call
        a, two = h.handle, {"num_returns": 2, **({"concurrency_group": "failover"} if urgent else {})}
        self._attempts += 1
        at = {"attempt": self._attempts}
        if kind == "f" and s == 0:
            ref, status = a.forward_first.options(**two).remote(f.mb, after=h.barrier, **at)
        elif kind == "f":
            ref, status = a.forward.options(**two).remote(f.mb, f.inputs[s], after=h.barrier, status=True, **at)
        elif kind == "fb":
            status, ref = a.forward_backward.options(**two).remote(f.mb, f.inputs[s], f.labels, 1.0, after=h.barrier,
                                                                   **at)
        elif kind == "b":
            ref, status = a.backward.options(**two).remote(f.mb, f.grads[s], status=True, **at)
        else:
            ref, status = a.recompute_backward.options(**two).remote(f.mb, f.inputs[s], f.grads[s], after=h.barrier,
                                                                     **at)
        h.inflight += 1
        call = Call(f, kind, s, h, ref, status, time.monotonic(), repair=repair, origin=origin, urgent=urgent,
                    attempt=self._attempts, behind=behind and origin is not None)
        if s > 0 and kind != "b":  # who produced each input it was given: a rejected one is theirs
            call.sent_by["fwd"] = f.fwd[s - 1]
        if kind in ("b", "rb"):
            call.sent_by["bwd"] = f.grad_from.get(s)
        if not urgent:
            h.queue.append(call)
        self.calls[status] = call
        return call

    # ----- completions ------------------------------------------------------------------------
    def pump(self) -> bool:
        """Wait for the next finished call or control reply (or deadline) and handle what is ready."""
        refs = list(self.calls) + list(self.control)
        if not refs:  # nothing in flight: every hop waits for a holder with room (or a range is down)
            time.sleep(min(self.cfg.start_grace_s, self.cfg.probe_interval_s))
            return False
        timeout = min(self._next_deadline() - time.monotonic(), self.cfg.probe_interval_s)
        ready, _ = ray.wait(refs, num_returns=1, timeout=max(timeout, 0.0))
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        values = self._read(ready)
        for ref, value in zip(ready, values):
            if ref in self.calls:
                self._on_call(self.calls.pop(ref), value)
            else:
                self.control_sent.pop(ref, None)
                self._on_control(ref, *self.control.pop(ref), value)
        return bool(ready)

    @staticmethod
    def _read(refs: list) -> list:
        """Values of ready refs in one round trip; a failed one comes back as its exception."""
        try:
            return ray.get(refs)
        except Exception:  # noqa: BLE001 - at least one failed: read them one by one
            out = []
            for ref in refs:
                try:
                    out.append(ray.get(ref))
                except Exception as exc:  # noqa: BLE001
                    out.append(Failed(exc))
            return out

    def _on_call(self, c: Call, value) -> None:
        h, now = c.holder, time.monotonic()
        h.inflight = max(h.inflight - 1, 0)
        if not c.urgent and c in h.queue:
            h.queue.remove(c)
        if isinstance(value, Failed):
            exc = value.exc
            rejected = unwrap_ray_error(exc)
            if isinstance(rejected, HopRejected) and c.sent_by.get(rejected.direction) is not None:
                self._hop_rejected(c, rejected)
                return
            if c.stale:
                return  # a copy that lost or was taken back: its outcome no longer matters
            if not holder_died(exc):
                raise user_error(exc, "a routed call") from None
            if c.t_submit >= h.up_since:
                self.holder_down(h, exc)
            self._resend(c, exclude=h)
            return
        ran = value is not None and value is not False  # else revoked before it ran: nothing applied
        if ran:  # a taken-back call's wait is not a hop time
            h.observe(now - (c.t_submit if c.urgent else max(c.t_submit, h.last_done)), self.cfg.latency_ewma)
        if not c.urgent:
            h.last_done = now
            if h.stuck:
                h.stuck = False  # its compute thread answers again
                self.log(f"router: holder {h.name} answers again")
        if c.stale or not ran:
            return
        f = c.flight
        if c.kind in ("fb", "b", "rb"):
            h.applied.add(f.mb)
            h.microbatches += 1
            h.total += 1
        if c.repair:
            return
        for other in [o for o in self.calls.values()
                      if o.flight is f and o is not c and not o.stale and not o.repair]:
            other.stale = True  # a hedged copy lost the race: never cancelled, its graph is dropped
            if other.holder is h:
                continue  # the same holder (re-asked after a copy also went late): its claim refused the repeat
            self._send_control("revoke", other.holder, other.holder.handle.revoke.options(
                concurrency_group="control").remote([f.mb], "f", attempts=[other.attempt]))
        if c.origin is not None:
            self.stats.failovers.append({"stage": c.stage, "kind": c.kind, "seconds": now - c.origin,
                                         "healthy_hop_s": self._healthy_hop(c.stage), "queued_behind": c.behind})
        s = c.stage
        if c.kind == "f":
            f.inputs[s + 1], f.fwd[s] = c.ref, h
            if s == 0:
                f.labels = c.status
            h.outbound += 1
            f.next = ("fb", s + 1) if s + 1 == self.S - 1 else ("f", s + 1)
        else:
            f.trained[s] = h  # its backward of range s counted: it learned from this microbatch
            if c.kind == "fb":
                f.loss = float(value)
            if s > 0:
                f.grads[s - 1], f.grad_from[s - 1] = c.ref, h
                f.next = ("b", s - 1)
            else:
                f.done = True
        f.exclude = set()

    def _on_control(self, ref, what: str, h: HolderState, payload, value) -> None:
        if isinstance(value, Failed):
            exc = value.exc
            if not holder_died(exc):
                raise user_error(exc, "a routed call") from None
            if what == "steal":
                payload[1].inflight = max(payload[1].inflight - 1, 0)
            if what == "probe":
                h.probe = None
                if isinstance(exc, ray.exceptions.ActorDiedError):  # restarts exhausted: it will not come back
                    h.gone = True
            else:
                self.holder_down(h, exc)
                if what == "revoke" and payload is not None:  # died before the revoke landed: re-send anyway
                    self._resend(payload, exclude=h)
            return
        if what == "revoke" and payload is not None and not payload.stale:  # stale: re-sent when h went down
            if value[0]:  # had not started and never will: re-send it elsewhere
                self.stats.revoked += 1
                payload.stale = True
                self._resend(payload, exclude=h, count=False)
            # else: it is running on a slow but healthy holder; keep waiting, never cancel
        elif what == "start":
            h.probing = False
            if h.down:
                return  # its calls were re-sent when it went down
            if value[0] and payload in h.queue:
                self._stuck(h, payload)  # still queued behind whatever holds the compute thread
            elif value[0]:
                self._take_back(payload, h)  # it came back empty before this answer: the holder moves again
            else:
                payload.started = True  # running (slow or not): the hop-time deadline applies from here on
        elif what == "steal":
            c, idle = payload
            idle.inflight = max(idle.inflight - 1, 0)
            if value[0] and not h.down:
                self._take_back(c, h)
            else:
                c.steal, c.started = False, True  # it started meanwhile: leave it where it is
        elif what == "take back" and not h.down:
            for c, not_started in zip(payload, value):
                if not_started:
                    self._take_back(c, h)
                else:
                    c.started = True
        elif what == "probe":
            h.probe = None
            if h.down and not h.gone:
                self._rejoin(h)
        elif what in ("step", "load", "rejoin") and ref == h.barrier:
            # Calls queued behind this wait for it legitimately: time them from here, so neither their
            # deadline nor the hop-time statistics count an optimizer step or a theta0 load.
            h.last_done = max(h.last_done, time.monotonic())
            h.barrier_seen = ref

    def _resend(self, c: Call, exclude: HolderState, count: bool = True, failover: bool = True) -> None:
        """Send ``c``'s hop again, not to ``exclude``. ``failover``: it replaces a late or lost call (timed,
        and run on the new holder's failover thread); else it is work moved to an idle holder."""
        if count:
            self.stats.reroutes += 1
        c.stale = True
        f = c.flight
        if c.repair:
            self._repair(f.mb, c.stage, exclude)
            return
        if any(o.flight is f and o.stage == c.stage and not o.stale and not o.repair for o in self.calls.values()):
            return  # a hedged copy of this hop is still running: it carries the microbatch on
        f.exclude.add(exclude)
        f.next = (c.kind if c.kind != "b" else "rb", c.stage)
        if failover:
            f.behind = c.behind
            f.origin = c.origin if c.origin is not None else c.due if c.due is not None else max(c.t_submit,
                                                                                                  exclude.last_done)
        self._dispatch(f)

    # ----- deadlines: take back calls a holder does not start, hedge late forwards, revoke late ---
    # gradient calls
    def _barrier_done(self, h: HolderState) -> bool:
        """Whether h's last step/load/rejoin finished (calls queued behind it are not due before)."""
        if h.barrier is None or h.barrier is h.barrier_seen:
            return True
        if not ray.wait([h.barrier], timeout=0)[0]:
            return False
        h.barrier_seen = h.barrier
        h.last_done = max(h.last_done, time.monotonic())
        return True

    def _start_of(self, c: Call) -> float | None:
        """When ``c`` was due to start: failover calls at once, queued ones after the holder's previous call
        (None while the holder's optimizer step or theta0 load runs ahead of it)."""
        if c.urgent:
            return c.t_submit
        return max(c.t_submit, c.holder.last_done) if self._barrier_done(c.holder) else None

    def _head(self, h: HolderState) -> Call | None:
        """The queued call h's compute thread should be running now, if the router may probe it."""
        if h.down or h.stuck or h.probing:
            return None
        head = next((c for c in h.queue if not c.taken_back), None)
        # a hedge loser may be running for as long as it takes: nothing is due behind it yet
        return head if head is not None and not head.stale and not head.started else None

    def _next_deadline(self) -> float:
        due = []
        for c in self.calls.values():
            start = None if c.stale or c.late else self._start_of(c)
            if start is not None:
                due.append(max(start + self.deadline(c.holder), c.recheck_at))
        for hs in self.ranges:
            for h in hs:
                head = self._head(h)
                start = None if head is None else self._start_of(head)
                if start is not None:
                    due.append(start + self.cfg.start_grace_s)
        return min(due, default=time.monotonic() + self.cfg.probe_interval_s)

    def _check_deadlines(self) -> None:
        self._check_liveness()
        now = time.monotonic()
        for hs in self.ranges:
            for h in hs:
                # The head of a queue has no reason to wait once due: if it has not started within
                # start_grace_s, the compute thread is stuck elsewhere. Take it back, never a started call.
                head = self._head(h)
                start = None if head is None else self._start_of(head)
                if start is not None and now - start > self.cfg.start_grace_s:
                    h.probing = True
                    self._send_control("start", h, h.handle.revoke.options(concurrency_group="control").remote(
                        [head.flight.mb], claim_kind(head.kind), keep_started=True, attempts=[head.attempt]),
                        payload=head)
        for c in list(self.calls.values()):
            if c.stale or c.late:
                continue
            start = self._start_of(c)
            if start is None or now - start <= self.deadline(c.holder) or now < c.recheck_at:
                continue
            h = c.holder
            if c.kind == "f":
                busy = {o.holder for o in self.calls.values() if o.flight is c.flight and not o.stale}
                other = self.pick(c.stage, exclude=busy | c.flight.exclude, capacity=False)
                if other is None:
                    c.recheck_at = now + self.cfg.probe_interval_s  # no one to hedge with: keep waiting
                    continue
            h.failures = h.failures * 0.5 ** ((now - h.failure_t) / self.cfg.failover_ceiling_s) + 1
            h.failure_t = now
            if c.kind == "f":
                c.late = True
                self.stats.hedges += 1
                self._submit(c.flight, "f", c.stage, other, origin=start)
                self.ping(h)  # a late call may be a cut-off host: its control thread says
            else:
                c.late = True  # take it back first: re-send only if it had not started
                self._send_control("revoke", h, h.handle.revoke.options(concurrency_group="control").remote(
                    [c.flight.mb], "b", attempts=[c.attempt]), payload=c)

    def _stuck(self, h: HolderState, head: Call) -> None:
        """``head`` was due and had not started: take it and the calls queued behind it elsewhere."""
        now = time.monotonic()
        h.stuck = True
        h.failures = h.failures * 0.5 ** ((now - h.failure_t) / self.cfg.failover_ceiling_s) + 1
        h.failure_t = now
        self.stats.stuck += 1
        self.log(f"router: holder {h.name} did not start a call within swarm.start_grace_s="
                 f"{self.cfg.start_grace_s:g}s of its turn; re-sending its queue")
        due = self._start_of(head) or now
        self._take_back(head, h)
        rest = [c for c in h.queue if not c.stale and not c.taken_back and not c.started]
        for c in rest:
            # timed from when the head was due (when the holder got stuck): the wait for the calls ahead of
            # it on a healthy holder is counted too, so these failover times are upper bounds
            c.due, c.behind = max(c.t_submit, due), True
        for kind in ("f", "b"):
            calls = [c for c in rest if claim_kind(c.kind) == kind]
            if calls:
                self._send_control("take back", h, h.handle.revoke.options(concurrency_group="control").remote(
                    [c.flight.mb for c in calls], kind, keep_started=True, attempts=[c.attempt for c in calls]),
                    payload=calls)

    def _take_back(self, c: Call, h: HolderState) -> None:
        c.taken_back = True
        if c.stale:
            return  # a copy elsewhere already carries it
        if c.steal:
            self.stats.stolen += 1
            self._resend(c, exclude=h, count=False, failover=False)
            return
        self.stats.taken_back += 1
        self._resend(c, exclude=h, count=False)

    # ----- work stealing: an idle holder takes queued work from a slower one --------------------
    def _steal(self) -> None:
        """At a step's tail, a holder with nothing to do takes back the last queued, not yet started call
        of a busier holder of its range, when it would finish it sooner (load follows throughput)."""
        hops_waiting = {f.next[1] for f in self.flights.values() if f.next is not None and not f.done}
        for s, hs in enumerate(self.ranges):
            if s in hops_waiting:
                continue  # the idle holder gets new work from the waiting hop anyway
            for idle in hs:
                if idle.down or idle.stuck or idle.barred or idle.inflight or idle.ewma is None:
                    continue
                best = None
                for h in hs:
                    if h is idle or h.down or h.stuck or h.probing:
                        continue
                    for i, c in enumerate(h.queue):
                        # a backward needs the graph its holder kept; a claimed or copied call is no one's to move
                        if i == 0 or c.kind == "b" or c.stale or c.taken_back or c.started or c.steal or c.repair:
                            continue
                        owner_finish = (i + 0.5) * (h.ewma or 0.0)  # the head half done, on average
                        if idle.ewma < owner_finish and (best is None or owner_finish > best[0]):
                            best = (owner_finish, h, c)
                if best is not None:
                    _, h, c = best
                    c.steal = True
                    idle.inflight += 1  # reserved for the stolen call until the take-back answers
                    self._send_control("steal", h, h.handle.revoke.options(concurrency_group="control").remote(
                        [c.flight.mb], claim_kind(c.kind), keep_started=True, attempts=[c.attempt]),
                        payload=(c, idle))

    # ----- dead and unreachable holders ----------------------------------------------------------
    def ping(self, h: HolderState) -> None:
        """Ask ``h``'s control thread for its counters; unanswered for liveness_timeout_s, ``h`` is marked down."""
        if self.liveness_timeout_s > 0 and not h.down and not any(
                w == "ping" and x is h for w, x, _ in (self.control[r] for r in self.control_sent)):
            self._send_control("ping", h, h.handle.counters.options(concurrency_group="control").remote())

    def read_pings(self) -> None:
        """Between steps (no pump runs): read the pings answered so far, and mark down whoever is overdue."""
        refs = [r for r in self.control_sent if self.control[r][0] == "ping"]
        ready = ray.wait(refs, num_returns=len(refs), timeout=0)[0] if refs else []
        for ref, value in zip(ready, self._read(ready)):
            del self.control_sent[ref]
            self._on_control(ref, *self.control.pop(ref), value)
        self._check_liveness()

    def _check_liveness(self) -> None:
        if self.liveness_timeout_s <= 0:
            return
        now = time.monotonic()
        for hs in self.ranges:
            for h in hs:
                # work waiting on it (calls, or an optimizer step the calls queue behind) and nothing finished
                # for a while: ask its control thread, whose silence is what the deadline below times
                if not h.down and (h.queue or not self._barrier_done(h)) and now - h.last_done > self.liveness_timeout_s:
                    self.ping(h)
        overdue: dict = {}  # holder -> (what, refs) of its control calls unanswered past the deadline
        for ref, t in self.control_sent.items():
            what, h, _ = self.control[ref]
            if not h.down and now - t > self.liveness_timeout_s:
                overdue.setdefault(h, (what, []))[1].append(ref)
        if not overdue:
            return
        holders = list(overdue)
        for h, is_lost in zip(holders, self.hosts_lost([h.handle for h in holders])):
            what, refs = overdue[h]
            if is_lost:
                self.holder_down(h, TimeoutError(f"its host does not answer: a {what} was unanswered for "
                                                 f"cluster.liveness_timeout_s={self.liveness_timeout_s:g}s"))
            else:  # a slow control thread on a host that answers: ask the host again after another deadline
                for ref in refs:
                    self.control_sent[ref] = now

    def holder_down(self, h: HolderState, exc: BaseException) -> None:
        if h.down:
            return
        h.down, h.down_since, h.outbound = True, time.monotonic(), 0
        h.failures += 1
        h.failure_t = time.monotonic()
        why = str(exc) if isinstance(exc, TimeoutError) else type(exc).__name__
        self.log(f"router: holder {h.name} is down ({why}); re-sending its calls")
        for ref in [r for r, (_, x, _) in self.control.items() if x is h and r in self.control_sent]:
            del self.control_sent[ref]  # its liveness is settled; the probe tells when it is back
        for c in list(self.calls.values()):
            if c.holder is h and not c.stale:
                self._resend(c, exclude=h)
        # Its accumulated gradient died with it: re-apply this step's microbatches on a live holder.
        lost, h.applied = sorted(h.applied), set()
        h.microbatches -= len(lost)
        h.total -= len(lost)
        for mb in lost:
            self._repair(mb, h.stage, h)

    def _hop_rejected(self, c: Call, err: HopRejected) -> None:
        """``c``'s holder rejected an input (before claiming the call: nothing ran): bench the holder that produced
        it, and redo the hop that made it elsewhere (an activation: the forward before; a gradient: the call
        after, which also applies that range's gradient again, in place of the sender's)."""
        sender, f = c.sent_by[err.direction], c.flight
        self.rejections.append((sender, err))
        if err.direction == "bwd" and not c.stale and not c.repair and f.mb in sender.applied:
            sender.applied.discard(f.mb)  # redone below rather than repaired when it goes down
            sender.microbatches, sender.total = sender.microbatches - 1, sender.total - 1
        self.bench(sender, err)
        if c.stale or c.repair:
            return  # a lost copy, or a repair (that microbatch's gradient is then missing from its range)
        if err.direction == "fwd" and c.kind == "rb":
            self._resend(c, exclude=c.holder)  # backward under way: recompute on another holder of the range
            return
        for o in self.calls.values():
            if o.flight is f and o.stage == c.stage and not o.repair:
                o.stale = True  # a hedged copy of the hop was given the same input
        s = c.stage - 1 if err.direction == "fwd" else c.stage + 1
        f.next = ("f", s) if err.direction == "fwd" else ("fb" if s == self.S - 1 else "rb", s)
        f.exclude = {sender}
        self._dispatch(f)

    def bench(self, h: HolderState, why: BaseException) -> None:
        """Take ``h`` out until the round's outer step (:meth:`release_benched`): down, as if it had died."""
        if h.benched:
            return
        h.benched = True
        self.holder_down(h, why)

    def release_benched(self) -> None:
        """After the outer step that left them out: benched holders rejoin at the new theta0."""
        for hs in self.ranges:
            for h in hs:
                if h.benched:
                    h.benched = False
                    if h.down and not h.gone:
                        self._rejoin(h, "rejoins after a round left out for a rejected hop")

    def bar(self, h: HolderState, why: str) -> None:
        """Route nothing to ``h`` for the rest of the run: the hop rechecks proved it faulty (its hops poison every
        holder they reach, so leaving only its own update out is not enough). It is not marked down: the outer
        step still asks it (its pseudo-gradient is left out) and sends it each theta0, so its proof of the round it
        cheated in is finished and filed against, and its weights stay the range's (evaluation and the final
        checkpoint may read them)."""
        if not h.barred:
            h.barred = True
            self.log(f"router: holder {h.name} is barred from routing for the rest of the run: {why}")

    def restart_round(self) -> None:
        """Every live holder that is not barred goes back to its range's theta0, and its inner optimizer to its state at
        the round's start, to redo the round (its work of the round is dropped, its proof of the round starts again);
        the router counts the redone work only."""
        for hs in self.ranges:
            for h in hs:
                if h.down or h.barred:
                    continue
                h.barrier = h.handle.rejoin.remote(self.theta0_of(h.stage), self.rounds_of() if self.rounds_of else None,
                                                   redo=True)
                self.control[h.barrier] = ("rejoin", h, None)
                h.applied.clear()
                h.microbatches = 0

    def _repair(self, mb: int, stage: int, exclude: HolderState) -> None:
        f = self.flights[mb]
        other = self.pick(stage, exclude={exclude}, capacity=False)
        if other is None:
            self._check_range_alive(stage)
            return
        self.stats.repairs += 1
        self._submit(f, "fb" if stage == self.S - 1 else "rb", stage, other, repair=True)

    def _check_range_alive(self, s: int) -> None:
        hs = self.ranges[s]
        if not all(h.down or h.barred for h in hs):
            return
        since = min((h.down_since for h in hs if h.down), default=time.monotonic())
        if all(h.gone or h.barred for h in hs) or time.monotonic() - since > self.recovery_timeout_s:
            raise PipelineError(
                f"every holder of layer range {s} is down and none came back within "
                f"checkpoint.recovery_timeout_s={self.recovery_timeout_s:g}s; the snapshots are kept"
                + (f" under {self.snapshot_dir}" if self.snapshot_dir else "") + "; rerun with resume=true")

    def probe_down(self) -> None:
        now = time.monotonic()
        for hs in self.ranges:
            for h in hs:
                if (h.down and not h.gone and not h.benched and h.probe is None
                        and now - h.probe_t >= self.cfg.probe_interval_s):
                    h.probe_t = now
                    h.probe = h.handle.counters.options(concurrency_group="control").remote()
                    self.control[h.probe] = ("probe", h, None)

    def _rejoin(self, h: HolderState, why: str = "restarted and rejoins") -> None:
        theta0 = self.theta0_of(h.stage) if self.theta0_of else h.handle.flat_params.remote()
        # and at the swarm's round count, so its next proof names the round the ledger's receipt does
        h.barrier = h.handle.rejoin.remote(theta0, self.rounds_of() if self.rounds_of else None)
        self.control[h.barrier] = ("rejoin", h, None)
        h.down = False
        h.forget()
        h.last_done = h.up_since = time.monotonic()
        self.stats.rejoins += 1
        self.rejoined.append(h)
        self.log(f"router: holder {h.name} {why} at its range's theta0")

    # ----- helpers ------------------------------------------------------------------------------
    def _send_control(self, what: str, h: HolderState, ref, payload=None) -> None:
        """A call on ``h``'s control thread, which answers at once: unanswered, it times ``h``'s liveness."""
        self.control[ref] = (what, h, payload)
        self.control_sent[ref] = time.monotonic()

    def _healthy_hop(self, stage: int) -> float:
        values = [x.ewma for x in self.ranges[stage] if x.ewma is not None and not x.down]
        return min(values, default=0.0)

    def live(self, stage: int) -> list[HolderState]:
        return [h for h in self.ranges[stage] if not h.down and not h.barred]
