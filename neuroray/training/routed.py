"""Swarm routing (``swarm.routing=router``): inner steps go through :class:`neuroray.swarm.router.Router`.

No fixed pipelines: every hop goes to the best holder of its range, late calls are hedged and dead
holders failed over, so a dead or hung holder costs time, never a microbatch. Holders of a range may
therefore have seen different microbatches; each averages the gradient of those it saw.

The outer step waits for ``swarm.outer_quorum`` of each range's live holders, at most
``swarm.outer_deadline_s`` beyond the first quorum... then reduces whoever answered. Every live holder,
late ones included, loads the new theta0 after its own pseudo-gradient, so late holders catch up. Before it, the
hop rechecks (neuroray/training/hop_routes.py) redo a sample of the round's first-step hops by the router's routes;
a holder they prove faulty, or one benched for a rejected hop, is left out with its range's ``f`` lowered by one.

A holder the rechecks prove faulty has poisoned more than its own update: its tampered activations reached the next
range's holders and its tampered gradients the previous range's, so every honest update that crossed it is off (the
verification benchmark measured up to +3.07 % eval loss after 2 rounds with the faulty holder's own update left out).
So the round is redone without it (:meth:`RoutedSwarm._redo_without`): the router bars it (no hop goes to it for the
rest of the run), every other holder goes back to its range's theta0, and the round's inner steps run again, with
their own hop rechecks. The barred holder stays up: it still answers the outer step (its pseudo-gradient is left out,
its range's ``f`` lowered) and loads each theta0, and it earns nothing. A redo that would leave a range with no holder
is not made; the holder is then left out of the round only, as before.
"""

from __future__ import annotations

import math
import statistics
import time

import ray

from neuroray.errors import PipelineError
from neuroray.swarm.ray_errors import holder_died, user_error
from neuroray.swarm.router import Router
from neuroray.training.executor import RoundResult, StepExecutor, by_replica


class RoutedSwarm(StepExecutor):
    def attach(self, trainer) -> None:
        super().attach(trainer)
        c = trainer.cfg
        self.router = Router(trainer.swarm.by_range, c.swarm, theta0_of=lambda s: trainer.outer.theta0[s],
                             rounds_of=lambda: trainer.outer.rounds,
                             recovery_timeout_s=c.checkpoint.recovery_timeout_s,
                             snapshot_dir=trainer.snapshot_dir, log=trainer.log,
                             liveness_timeout_s=c.cluster.liveness_timeout_s,
                             liveness_probe_s=c.cluster.liveness_probe_s)
        self.microbatches_per_step = c.data.num_microbatches * c.diloco.replicas
        self.quorum_log: list[dict] = []  # per outer round and range: who made the quorum, who was late
        # this round: (range, holder index) -> the microbatches whose backward it ran (training/copies.py)
        self.trained: dict[tuple[int, int], list[int]] = {}
        self.trained_before: dict[tuple[int, int], list[int]] = {}  # the same, of the round before (training/replays.py)
        self._failovers_seen = 0
        from neuroray.training.hop_routes import RoutedRechecks

        self.rechecks = RoutedRechecks(trainer, self.router)  # ponw.hop_recheck_rate: first-step hops redone on peers

    def _node_id(self, h) -> str:
        return self.trainer.swarm.infos[h.index * len(self.router.ranges) + h.stage]["node_id"]

    def barred(self) -> list[str]:
        return sorted(self._node_id(h) for hs in self.router.ranges for h in hs if h.barred)

    def bar_again(self, node_ids: list[str]) -> None:
        # by key, not by slot: a holder restarted elsewhere under the same key is the same participant
        for hs in self.router.ranges:
            for h in hs:
                if self._node_id(h) in node_ids:
                    self.router.bar(h, "the hop rechecks proved it faulty before this run resumed (snapshot)")

    def submit(self, step: int) -> None:
        """Nothing to queue: the router drives a step hop by hop from the driver, so it runs in :meth:`collect`."""

    def collect(self, step: int) -> float:
        t, N = self.trainer, self.microbatches_per_step
        loss = self.router.run_step(list(range(step * N, (step + 1) * N)), t.cfg.cluster.step_timeout_s, t.inner_lr(step))
        self._note_trained(step)
        self._report_failovers()
        rejections, self.router.rejections = self.router.rejections, []
        for sender, err in rejections:  # benched by the router: left out of this round's outer step
            t.hop_rejected(err, sender.stage, sender.index, step)
        if t.ledger is not None and step % t.cfg.diloco.inner_steps == 0:
            self._commit_theta0_losses(step)
        if step % t.sync_every == 0:  # every holder was at theta0: keep who ran what, for the hop rechecks
            self.rechecks.first_step_routed(step)
        return loss

    def _note_trained(self, step: int) -> None:
        """Who trained on which microbatch this step (the router saw whose backward of each range counted)."""
        if step % self.trainer.sync_every == 0:
            self.trained_before, self.trained = self.trained, {}
        for f in self.router.flights.values():
            for s, h in f.trained.items():
                self.trained.setdefault((s, h.index), []).append(f.mb)

    def _commit_theta0_losses(self, step: int) -> None:
        """Driver r's proof commits microbatches r*n .. r*n+n-1 of the round's first step: all holders are
        at theta0 during it, so their losses are the ones a spot check recomputes from the shared ring."""
        n, N = self.trainer.cfg.data.num_microbatches, self.microbatches_per_step
        for r, driver in enumerate(self.router.ranges[0]):
            first = step * N + r * n
            losses = [self.router.flights[mb].loss for mb in range(first, first + n)]
            driver.handle.set_theta0_losses.remote(losses, data_position=first)

    def _report_failovers(self) -> None:
        t, st = self.trainer, self.router.stats
        new = st.failovers[self._failovers_seen:]
        self._failovers_seen = len(st.failovers)
        if not new:
            return
        if t.metrics:
            for _ in new:
                t.metrics.failover()
        worst = max(f["seconds"] for f in new)
        t.log(f"router: {len(new)} hop(s) finished on another holder this step (slowest {worst * 1e3:.0f} ms "
              f"from when the first holder was due); hedges {st.hedges}, "
              f"taken back from stuck holders {st.taken_back}, "
              f"re-sent {st.reroutes + st.revoked}")

    def routing_summary(self) -> dict:
        st = self.router.stats
        return {"hedges": st.hedges, "revoked": st.revoked, "reroutes": st.reroutes, "repairs": st.repairs,
                "rejoins": st.rejoins, "stuck": st.stuck, "taken_back": st.taken_back,
                "stolen": st.stolen, "failovers": list(st.failovers), "quorums": list(self.quorum_log),
                "microbatches_per_holder": {h.name: h.total for hs in self.router.ranges for h in hs}}

    def finish(self) -> None:
        """Let holders that Ray is restarting rejoin at the final theta0 before the run ends, so every
        holder (replica 0's give the checkpoint) ends on the same weights; bounded by recovery_timeout_s."""
        router, deadline = self.router, time.monotonic() + self.trainer.cfg.checkpoint.recovery_timeout_s
        while any(h.down and not h.gone for hs in router.ranges for h in hs) and time.monotonic() < deadline:
            router.probe_down()
            if not router.pump():
                time.sleep(0.05)  # nothing in flight: the next probe is due later
        self.settle()

    def settle(self) -> None:
        refs = [h.barrier for hs in self.router.ranges for h in hs if not h.down and h.barrier is not None]
        ray.wait(refs, num_returns=len(refs), timeout=self.trainer.cfg.cluster.step_timeout_s)

    def take_proof(self, holder):
        # On the control thread: a late (hung) holder answers at once, with no proof this round. A holder
        # marked down (dead, or its host cut off) has none either: asking one that is cut off would wait.
        state = next((h for hs in self.router.ranges for h in hs if h.handle is holder), None)
        if state is not None and state.down:
            return ray.put(None)
        return holder.take_proof.options(concurrency_group="control").remote()

    def paces(self, result: RoundResult) -> dict[tuple[int, int], float]:
        # The router's own clock: the median of the hop times it measured on each holder (recent calls)
        return {(s, h.index): statistics.median(h.samples) for s, hs in enumerate(self.router.ranges) for h in hs
                if h.samples and not h.down}

    # ----- the outer step with a quorum ------------------------------------------------------------
    def outer_step(self, step: int) -> RoundResult:
        t = self.trainer
        c, outer = t.cfg.cluster, t.outer
        rejoined, self.router.rejoined = self.router.rejoined, []  # restarted elsewhere, a holder has a new key
        t.refresh_identities(list({id(h): h.handle for h in rejoined if not h.down}.values()))
        # the hop rechecks first (behind every holder's last inner step, before its theta0 moves): a holder they
        # prove faulty is barred and the round redone without it; where that cannot be (it is its range's last holder)
        # it is only left out of this outer step, and the Drivers whose committed losses went through it are excused
        # from this round's spot checks
        verdict = self.rechecks.settle_routed(outer.rounds + 1)
        findings, checked = list(verdict.findings), verdict.checked
        while self._redo_without(verdict.findings, step):  # a holder proven faulty: the round again, without it
            verdict = self.rechecks.settle_routed(outer.rounds + 1)
            findings, checked = findings + verdict.findings, checked + verdict.checked
        failed = {(f.stage, f.replica) for f in findings}
        asked = [[(h, h.handle.pseudo_gradient.remote(after=h.barrier)) for h in hs if not h.down]
                 for hs in self.router.ranges]
        t0 = time.monotonic()
        quorums, plan = [], []
        saved = (list(outer.theta0), list(outer.momentum), list(outer.memory))
        outer.begin_round()
        for s, items in enumerate(asked):
            # a barred holder's pseudo-gradient is not waited for (nothing it sends is used), nor counted in the quorum
            answered = self._quorum(s, [(h, ref) for h, ref in items if not h.barred], t0)
            # proven faulty this round (not barred: its round could not be redone): out, as late holders are
            faulty = [h for h, _ in answered if (s, h.index) in failed]
            answered = [(h, ref) for h, ref in answered if (s, h.index) not in failed | verdict.withheld]
            quorums.append([h.index for h, _ in answered])
            used = {id(h) for h, _ in answered} | {id(h) for h in faulty}
            late = [h.name for h, _ in items if id(h) not in used and not h.barred]
            self.quorum_log.append({"round": outer.rounds + 1, "range": s, "answered": len(answered), "late": late})
            if late:
                t.log(f"outer round {outer.rounds + 1}: range {s} reduced {len(answered)} of {len(items)} holders; "
                      f"late {late} catch up from the new theta0")
            plan.append((items, answered, faulty))
        while True:
            reports, loads, proven, sent = self._reduce_and_send(plan, failed)
            outer.rounds += 1
            try:
                results = ray.get(reports, timeout=c.step_timeout_s)
                break
            except ray.exceptions.GetTimeoutError:
                raise PipelineError(f"outer step after inner step {step + 1} took longer than {c.step_timeout_s:g}s") from None
            except Exception as exc:
                if outer.actors is None or not outer.actors.died_here(exc):
                    raise
                # an outer-step actor Ray gave up on: the same pseudo-gradients go to a new one, from the outer state
                # as it was (the holders never saw the lost theta0: a call given it fails before it runs, so the late
                # holders' failed loads are not read as their deaths)
                outer.theta0, outer.momentum, outer.memory = map(list, saved)
                outer.rounds -= 1
                outer.begin_round()
                for ref in sent:
                    self.router.control.pop(ref, None)
                    self.router.control_sent.pop(ref, None)
                t.log(f"outer round {outer.rounds + 1}: an outer-step actor died for good ({type(exc).__name__}); "
                      "the step is redone in a new one from the same pseudo-gradients")
        self.router.release_benched()  # holders benched for a rejected hop rejoin at the new theta0
        ray.wait(loads, num_returns=len(loads), timeout=c.step_timeout_s)
        # a holder proven faulty this round is idle (nothing is routed to it): its load is at once, unless it stalls
        ray.wait(proven, num_returns=len(proven), timeout=min(t.cfg.swarm.outer_deadline_s, c.step_timeout_s))
        acks = [ray.get(ref) if self._read_holder_call(ref) else False for ref in loads]
        comm = outer.measure(results, acks)
        # a report indexes its range's quorum; the ledger wants replica indices, and the late (or benched,
        # down for a rejected hop) were not used
        unused, observed = by_replica(results, quorums, {(s, h.index) for s, hs in enumerate(self.router.ranges)
                                                         for h in hs if h.index not in quorums[s]})
        batches = {(h.stage, h.index): h.microbatches for hs in self.router.ranges for h in hs}
        for hs in self.router.ranges:
            for h in hs:
                h.microbatches = 0
        # a Driver whose committed losses crossed a holder proven faulty this round trained on what that holder sent:
        # if the rule set its update aside for it, it is credited (as fixed routing credits a faulty holder's mates)
        named = {(rep.range_index, quorums[rep.range_index][i]) for rep in results for i in rep.not_aggregated}
        return RoundResult(results, comm, unused, batches, observed, findings, checked,
                           excused=verdict.excused & named, spot_excused=verdict.excused)

    def _reduce_and_send(self, plan: list, failed: set) -> tuple[list, list, list, list]:
        """Every range's outer step over its quorum, and the new theta0 to each of its holders behind its own
        pseudo-gradient. Returns the report refs, the on-time holders' load refs, the loads of the holders proven
        faulty this round, and every ref handed to the router to read (the late holders')."""
        outer = self.trainer.outer
        reports, loads, proven, sent = [], [], [], []
        for s, (items, answered, faulty) in enumerate(plan):
            # a holder benched for a rejected hop is proven faulty too: one of the f its rule tolerates is gone (as
            # under fixed routing; with f kept, 2 holders left of 3 made trimmed_mean f=1 refuse the range's step)
            out = {id(h) for h in faulty} | {id(h) for h in self.router.ranges[s] if h.benched or h.barred}
            theta0, report, update = outer.reduce(s, [ref for _, ref in answered], who=[h.index for h, _ in answered],
                                                  faulty_out=len(out))
            reports.append(report)
            on_time = {id(h) for h, _ in answered}
            for h, pg in items:
                h.barrier = outer.broadcast(s, h.handle, theta0, update, after=pg, counted=id(h) in on_time)
                if id(h) in on_time:
                    loads.append(h.barrier)
                    continue
                # read when it lands, like any other holder call (its bytes are not counted)
                self.router.control[h.barrier] = ("load", h, None)
                self.router.control[pg] = ("late pseudo-gradient", h, None)
                sent += [h.barrier, pg]
                if (s, h.index) in failed:  # the load finishes its proof of the round, booked next (and slashed)
                    proven.append(h.barrier)
        return reports, loads, proven, sent

    def _redo_without(self, findings: list, step: int) -> bool:
        """The holders ``findings`` prove faulty are barred and the round that ends at inner step ``step`` is run again
        from theta0 without them. False (nothing done) when there is none to bar, or barring them would leave a range
        with no holder to route to (they are then left out of this outer step only)."""
        t, router = self.trainer, self.router
        proven = list({id(h): h for f in findings if not (h := router.ranges[f.stage][f.replica]).barred}.values())
        if not proven:
            return False
        for s in {h.stage for h in proven}:
            if not any(not h.down and not h.barred and h not in proven for h in router.ranges[s]):
                t.log(f"outer round {t.outer.rounds + 1}: no holder of range {s} would be left to redo the round "
                      f"without {', '.join(h.name for h in proven)}: left out of this outer step only")
                return False
        names = ", ".join(h.name for h in proven)
        for h in proven:
            router.bar(h, f"the hop rechecks proved it faulty in round {t.outer.rounds + 1}")
        t.log(f"outer round {t.outer.rounds + 1}: redone without {names}: every other holder back at its range's "
              "theta0, the round's inner steps run again")
        router.restart_round()
        first, before = step + 1 - t.sync_every, self.trained_before
        self.trained = before  # the redone first step makes it the round before's again
        losses = [self.collect(s) for s in range(first, step + 1)]
        t.log(f"outer round {t.outer.rounds + 1}: redone: mean loss {sum(losses) / len(losses):.4f} over "
              f"{len(losses)} inner steps")
        return True

    def _quorum(self, s: int, items: list, t0: float) -> list:
        """The (holder, pseudo-gradient ref) pairs that answered: all by the deadline, else the first quorum."""
        sw, c = self.trainer.cfg.swarm, self.trainer.cfg.cluster
        refs = [ref for _, ref in items]
        while True:  # all of them, until outer_deadline_s or until the missing ones are down
            left = t0 + sw.outer_deadline_s - time.monotonic()
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(min(left, sw.probe_interval_s), 0))
            missing = [h for h, ref in items if ref not in ready and not h.down]
            if not missing or left <= 0:
                break
            self._ping(missing)
        while True:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            answered = [(h, ref) for h, ref in items if ref in ready and self._read_holder_call(ref, h)]
            alive = [(h, ref) for h, ref in items if not h.down]
            need = max(1, math.ceil(sw.outer_quorum * len(alive)))
            if len(answered) >= need:
                return answered
            if not alive:
                raise PipelineError(f"outer step: every holder of layer range {s} died; the snapshots are kept; "
                                    "rerun with resume=true")
            if time.monotonic() - t0 > c.step_timeout_s:
                raise PipelineError(f"outer step: only {len(answered)} of the {need} holders of range {s} that "
                                    f"swarm.outer_quorum={sw.outer_quorum} needs answered in {c.step_timeout_s:g}s")
            late = [(h, ref) for h, ref in alive if ref not in ready]
            ray.wait([ref for _, ref in late], num_returns=1, timeout=sw.probe_interval_s)
            self._ping([h for h, _ in late])

    def _ping(self, late: list) -> None:
        """Late holders' hosts may be cut off: their control threads are asked, and those that leave it
        unanswered for cluster.liveness_timeout_s are marked down (the quorum then goes on without them)."""
        for h in late:
            self.router.ping(h)
        self.router.read_pings()

    def _read_holder_call(self, ref, h=None) -> bool:
        """True when the call succeeded; a dead holder is handed to the router, which brings it back."""
        try:
            ray.get(ref, timeout=0)
            return True
        except Exception as exc:  # noqa: BLE001
            if not holder_died(exc):
                raise user_error(exc, "outer step") from None
            if h is not None:
                self.router.holder_down(h, exc)
            return False
