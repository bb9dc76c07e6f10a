"""Hop rechecks under swarm routing (``swarm.routing=router``): the same checks as fixed pipelines, by route.

Under the router there are no replica chains: each hop of each microbatch goes to whichever holder of the next
range the router picks, so microbatch j's hops may cross holders of three different replicas. What makes the
fixed checks (neuroray/training/hop_audit.py) work still holds: every holder of a range is at theta0 during a
round's first inner step, and every holder records that step (neuroray/swarm/hop_record.py), the Driver the
token ids it read. What changes is who sent a holder's inputs and who received its outputs: not its replica's
neighbours but the holders the router sent the hops to. The router knows (its flights: the forward that was
passed on, the backward that counted, the loss it collected), so the coordinator judges by its own record of
the routes (:func:`routes_of`), never by the holders' accounts:

* the draw: for each holder, its microbatches of the first step that it ran both ways (forward and backward; a hop
  that was hedged, taken back or recomputed elsewhere is not drawn: the holders that lost a race hold records
  of work that was not passed on), each with probability ``ponw.hop_recheck_rate``, re-executed on a random
  other live holder of the range;
* the judgement, attribution and evidence: as under fixed routing, with the route's sender and receivers;
* the data check: each Driver's recorded token ids of a microbatch against that microbatch of the shared ring
  (under the router every Driver reads microbatch ``mb`` at position ``mb``), read by the coordinator.

When: at the outer step, not beside the round's later steps as under fixed routing. A re-execution on a holder's
compute thread would sit in front of routed calls, and the router takes a call back from a holder that has not
started it ``swarm.start_grace_s`` (30 ms) after its turn: the checks would look like stuck holders. So the records
are asked for behind each holder's last inner step, and the re-executions run before the pseudo-gradients are
reduced; a holder found faulty is left out of the outer step (as late holders are: it loads the new theta0 and
earns nothing), barred from routing and its round redone without it (neuroray/training/routed.py), and the validator
files evidence once the round is booked (neuroray/training/audit.py).

The Driver spot checks: a Driver's proof commits the losses of its microbatches of the first step
(training/routed.py), which the router may have sent through any holder. A loss that went through a holder the
rechecks proved faulty that round is that holder's doing, so the Driver is excused from that round's spot check
(:func:`excused_drivers`), as fixed routing excuses a faulty holder's replica-mates; its pseudo-gradient is used. (Only
when the round could not be redone without that holder: after a redo no committed loss went through it.)
"""

from __future__ import annotations

import random
from typing import NamedTuple

import ray

from neuroray.training.executor import value_or_none
from neuroray.training.hop_audit import Finding, HopRechecks, Routes, data_findings, draw_checks


class RoutedVerdict(NamedTuple):
    """One round's hop rechecks under swarm routing, as the outer step uses them."""

    findings: list[Finding]  # one per holder blamed: left out of the outer step, evidence filed
    checked: int  # microbatches re-executed
    excused: set[tuple[int, int]]  # (0, Driver) excused from the round's spot checks
    withheld: set[tuple[int, int]]  # (range, index) of live holders whose record did not come in: left out


def routes_of(flights: dict, stages: int) -> tuple[Routes, dict[tuple[int, int], float]]:
    """The router's flights of one inner step (neuroray/swarm/route_state.py ``Flight``): who ran each range of each
    microbatch, and the loss collected, keyed ``(the last range's holder, mb)`` as :func:`hop_audit.judge` reads it."""
    fwd, bwd, losses = {}, {}, {}
    for mb, f in flights.items():
        ran = [f.fwd[s] for s in range(stages - 1)] + [f.trained.get(stages - 1)]  # the last range: forward-backward
        fwd[mb] = tuple(None if h is None else h.index for h in ran)
        bwd[mb] = tuple(None if f.trained.get(s) is None else f.trained[s].index for s in range(stages))
        if f.loss is not None and bwd[mb][-1] is not None:
            losses[bwd[mb][-1], mb] = f.loss
    return Routes(fwd, bwd), losses


def excused_drivers(route: Routes, committed: dict[int, list[int]],
                    failed: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """``(0, r)`` of each Driver r not itself found faulty whose committed microbatches (``committed[r]``) went forward
    through a holder in ``failed`` (``(range, index)``): its committed losses are not its own doing."""
    out = set()
    for r, mbs in committed.items():
        if (0, r) in failed:
            continue
        if any((s, h) in failed for mb in mbs for s, h in enumerate(route.fwd.get(mb, ())) if h is not None):
            out.add((0, r))
    return out


class RoutedRechecks(HopRechecks):
    """The router executor's side (neuroray/training/routed.py): routes kept at the first step, checks at the outer."""

    def __init__(self, trainer, router):
        super().__init__(trainer)
        self.router = router
        self.committed: dict[int, list[int]] = {}  # Driver index -> the first-step microbatches its proof commits
        self.withheld: set[tuple[int, int]] = set()  # (range, index) of live holders whose record did not come in

    def first_step_routed(self, step: int) -> None:
        """Inner step ``step`` (a round's first) was routed: keep who ran what, and what each Driver commits."""
        if not self.enabled:
            return
        self._reset()
        n, stages = self.trainer.cfg.data.num_microbatches, len(self.router.ranges)
        self.route, self.losses = routes_of(self.router.flights, stages)
        first = step * n * len(self.router.ranges[0])
        self.committed = {r: list(range(first + r * n, first + (r + 1) * n))
                          for r in range(len(self.router.ranges[0]))}

    def launch(self, wait: bool = False) -> None:
        """At the outer step (``wait``): every live holder's record, asked for behind its last inner step; the
        data check; the draw, submitted to the checkers (they run before anything the outer step sends them)."""
        if not wait or self.route is None:
            return
        # a barred holder (proven faulty in an earlier round, neuroray/swarm/router.py) ran nothing and checks nothing:
        # its re-executions would be trusted
        takes = {(s, h.index): h.handle.take_hop_record.remote() for s, hs in enumerate(self.router.ranges)
                 for h in hs if not h.down and not h.barred}
        refs = list(takes.values())
        c = self.trainer.cfg
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=min(c.swarm.outer_deadline_s,
                                                                     c.cluster.step_timeout_s))[0])
        # a live holder that has not handed its record over by the outer step's deadline would escape its checks
        # and still make the quorum (its pseudo-gradient is asked for later): it is left out, as a late holder is
        self.withheld = {key for key, ref in takes.items() if ref not in ready}
        self.records = {key: rec for key, ref in takes.items()
                        if ref in ready and (rec := value_or_none(ref)) is not None}
        holders = sorted({i for _, i in self.records})
        self.findings += data_findings(self.records, holders, self._shared_batch, shared=True)
        self._reexecute(draw_checks(self.records, len(self.router.ranges), holders, self.rate, random.SystemRandom(),
                                    self.route))

    def _shared_batch(self, driver: int, position: int):
        """Microbatch ``position`` of the shared ring, as every Driver reads it under the router (read here)."""
        from neuroray.training.copies import batch_at

        t = self.trainer
        return batch_at(t, t.swarm.infos[0]["node_id"], position, ring_start=0)

    def settle_routed(self, outer_round: int) -> RoutedVerdict:
        """:meth:`settle`, the Drivers excused from this round's spot checks (:func:`excused_drivers`), and the
        holders that withheld their record."""
        route, committed, self.withheld = self.route, self.committed, set()
        findings, checked, _ = self.settle(outer_round)
        failed = {(f.stage, f.replica) for f in findings}
        withheld, self.withheld = self.withheld, set()
        for s, i in sorted(withheld):
            self.trainer.log(f"hop recheck: round {outer_round}: r{i}-s{s} did not hand its record over within "
                             "swarm.outer_deadline_s: unchecked, so left out of this outer step as a late holder")
        excused = set() if route is None else excused_drivers(route, committed, failed)
        return RoutedVerdict(findings, checked, excused, withheld)
