"""The driver's side of ``diloco.overlap`` under fixed pipelines: the outer step runs while holders train on.

At a round's end (inner step ``kH - 1``) :meth:`OverlappedOuter.begin` asks every holder for its pseudo-gradient
(``send_pseudo_gradient``: the holder goes straight on) and submits each range's reduce; nothing waits. Unless the
boundary needs the holders still (Trainer._presends), the driver asks for them before it collects that step
(:meth:`OverlappedOuter.presend`) and queues the next step first, so no holder idles at the round's end. Before
inner step ``kH + overlap_steps`` is submitted, :meth:`land` queues every holder's ``land_outer`` behind the
steps it is running, so the reduce and the broadcast had ``overlap_steps`` inner steps to finish; then
:meth:`collect` reads the round's reports and acks into the :class:`RoundResult` the trainer books.

Ray runs a fixed holder's calls in submission order, so where a holder's delta is taken and where the
aggregate lands are fixed points in its step sequence: an overlapped run is reproducible, and its snapshots,
taken between calls, hold a consistent state (the round in flight on each holder, its new theta0 beside
the outer state; a resumed run lands it from the dense theta0 at the same step, see neuroray/diloco/overlap.py).

A holder that died before its pseudo-gradient was taken fails its range's reduce: the outer state rolls back,
every replica is recovered, and the round is redone at once, blocking (each holder resends the delta it
kept, and lands on top of the steps it has run since).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray

from neuroray.errors import PipelineError
from neuroray.swarm.ray_errors import holder_died, user_error
from neuroray.training.executor import RoundResult, by_replica, members, value_or_none


@dataclass
class InFlight:
    """One outer round sent and not landed yet."""

    land_at: int  # land before this inner step is submitted
    outer_round: int  # the round it lands as on the holders
    batches: dict  # (range, replica) -> microbatches of the round (counted at its end)
    saved: tuple | None  # the outer state before it, to roll back to (None: restored from a snapshot)
    reports: list = field(default_factory=list)  # per range, the outer step's report ref
    updates: list = field(default_factory=list)  # per range, (theta0 ref, update ref)
    acks: list = field(default_factory=list)  # every holder's land_outer ref, range by range
    benched: set = field(default_factory=set)  # replicas left out of its outer step (a rejected hop, fixed.py)
    senders: set = field(default_factory=set)  # (range, replica) of each holder whose rejected hop benched one
    end_step: int | None = None  # the inner step the round ended after (None: resumed from a snapshot)


class OverlappedOuter:
    """The round in flight of a :class:`~neuroray.training.fixed.FixedPipelines` run with overlap on."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.inflight: InFlight | None = None
        self.landed: InFlight | None = None  # landing queued, to collect
        self.sent: list[list] | None = None  # per range, per holder: pseudo-gradients asked for ahead (presend)

    @property
    def steps(self) -> int:
        return self.trainer.cfg.diloco.overlap_steps

    def begin(self, step: int, batches: dict, benched: set[int] = frozenset(),
              senders: set[tuple[int, int]] = frozenset()) -> None:
        """The round ending after inner step ``step`` goes to the outer step; holders go straight on.
        ``benched``: replicas whose pseudo-gradients are left out (every holder still sends its own);
        ``senders``: the holders whose rejected hops benched them (the others are excused)."""
        outer = self.trainer.outer
        fl = InFlight(step + 1 + self.steps, outer.rounds + 1, batches,
                      (list(outer.theta0), list(outer.momentum), list(outer.memory)), benched=set(benched),
                      senders=set(senders), end_step=step)
        sent, self.sent = self.sent, None
        if sent is None:
            self._reduce(fl, lambda s, r, h: h.send_pseudo_gradient.remote())
        else:  # asked for before the next step was queued; a holder that died since fails the reduce (_redo)
            self._reduce(fl, lambda s, r, h: sent[s][r])

    def presend(self) -> None:
        """Ask every holder for its pseudo-gradient now, behind the inner step it is running; :meth:`begin`
        reduces these. The holders' call order is the one :meth:`begin` alone gives: the round's last step, the
        pseudo-gradient, the next step."""
        assert self.sent is None, "a round's pseudo-gradients were asked for twice"
        self.sent = [[h.send_pseudo_gradient.remote() for h in holders]
                     for holders in self.trainer.outer.holders_by_range]

    def _reduce(self, fl: InFlight, ask) -> None:
        """Submit every range's outer step over ``ask(holder)``'s pseudo-gradients; ``fl`` is in flight."""
        outer = self.trainer.outer
        outer.begin_round()
        for s, holders in enumerate(outer.holders_by_range):
            deltas = [ask(s, r, h) for r, h in enumerate(holders)]
            # a benched replica holds a proven-faulty holder: one of the f the rule tolerates (OuterSync.submit)
            theta0, report, update = outer.reduce(s, [d for r, d in enumerate(deltas) if r not in fl.benched],
                                                  faulty_out=len(fl.benched))
            fl.reports.append(report)
            fl.updates.append((theta0, update))
        outer.rounds += 1
        self.inflight = fl

    def resumed(self, land_at: int) -> None:
        """Resumed from a snapshot taken with a round in flight: its holders kept their base and their delta,
        the outer state its new theta0; land it from that dense theta0 at the same step."""
        outer = self.trainer.outer
        outer.begin_round()
        fl = InFlight(land_at, outer.rounds, {}, None)
        fl.updates = [(theta0, None) for theta0 in outer.theta0]
        self.inflight = fl

    def due(self, step: int) -> bool:
        return self.inflight is not None and step >= self.inflight.land_at

    def land(self) -> None:
        """Queue every holder's landing (behind the inner steps it is running)."""
        fl, outer = self.inflight, self.trainer.outer
        dense = outer._dense or fl.saved is None  # resumed: only the dense theta0 is at hand
        for s, holders in enumerate(outer.holders_by_range):
            theta0, update = fl.updates[s]
            for h in holders:
                new = theta0 if dense else update
                ack = h.land_outer.remote(fl.outer_round, new, [theta0])
                fl.acks.append(ack)
                if fl.saved is not None:
                    outer._round[s]["acks"].append(ack)
        self.inflight, self.landed = None, fl

    def collect(self, settle) -> RoundResult | None:
        """The landed round's result (None: resumed, nothing to book). ``settle()``: finish every inner step
        in flight (recovering dead holders), called before a failed round is redone."""
        fl, t = self.landed, self.trainer
        if fl is None:
            return None
        self.landed = None
        timeout = t.cfg.cluster.step_timeout_s
        ray.wait(fl.acks, num_returns=len(fl.acks), timeout=timeout)
        if fl.saved is None:
            for ack in fl.acks:
                value_or_none(ack)
            t.log(f"outer round {fl.outer_round}: landed from the snapshot's theta0 (its proofs were lost with "
                  "the stopped run)")
            return None
        try:
            reports = ray.get(fl.reports, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise PipelineError(f"outer round {fl.outer_round} took longer than {timeout:g}s") from None
        except Exception as exc:
            if not holder_died(exc):
                raise user_error(exc, f"outer round {fl.outer_round}") from None
            return self._redo(fl, exc, settle)
        # a holder that died meanwhile lands nothing (the recovery rejoins it at the new theta0)
        acks = [bool(value_or_none(ack)) for ack in fl.acks]
        return self._result(fl, reports, acks)

    def _result(self, fl: InFlight, reports: list, acks: list) -> RoundResult:
        comm = self.trainer.outer.measure(reports, acks)
        for rep in reports:  # the round's first inner step ran before this theta0 existed; the proof commits
            rep.theta0_before = ""  # the weights it ran from (neuroray/swarm/holder.py send_pseudo_gradient)
        kept = members(len(self.trainer.swarm.replicas), fl.benched)
        benched_slots = {(s, r) for s in range(len(reports)) for r in fl.benched}
        unused, observed = by_replica(reports, [kept] * len(reports), benched_slots)
        # as in the blocking outer step (fixed.py): a benched replica's holders that sent no rejected hop did
        # honest work on what a faulty mate sent, so they are credited, not judged
        return RoundResult(reports, comm, unused, fl.batches, observed, excused=benched_slots - fl.senders,
                           end_step=fl.end_step)

    def _redo(self, fl: InFlight, exc: BaseException, settle) -> RoundResult:
        """A pseudo-gradient was lost with its holder: roll back, recover, redo the round now (blocking)."""
        t, outer = self.trainer, self.trainer.outer
        t.log(f"outer round {fl.outer_round}: a holder died before its pseudo-gradient was taken; redoing the round")
        settle()
        outer.theta0, outer.momentum, outer.memory = map(list, fl.saved)
        outer.rounds -= 1
        for r in range(len(t.swarm.replicas)):
            t.recover(r, exc)
        redo = InFlight(0, fl.outer_round, fl.batches, fl.saved, benched=fl.benched, senders=fl.senders,
                        end_step=fl.end_step)
        # a holder still holding the round resends the delta it kept (OuterState.delta)
        self._reduce(redo, lambda s, r, h: h.pseudo_gradient.remote())
        self.land()
        self.landed = None
        values = t.swarm.get(redo.reports + redo.acks, t.cfg.cluster.step_timeout_s, f"redoing outer round {fl.outer_round}")
        return self._result(redo, values[: len(redo.reports)], values[len(redo.reports):])
