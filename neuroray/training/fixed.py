"""Fixed pipelines (``swarm.routing=fixed``): replica r's microbatches always go through replica r's holders.

The driver submits work and reads results one step late, so holders never wait on it. When a holder
dies, Ray restarts it (``checkpoint.max_restarts``) and it restores its newest good snapshot in
``__init__``; the trainer brings the replica back (:meth:`~neuroray.training.trainer.Trainer.recover`),
then this executor drops the half-done microbatches of that replica and re-runs its lost steps. Other
replicas keep going. The outer step waits for every holder of every range, unless ``diloco.overlap`` lets
it run beside the next inner steps (neuroray/training/overlap.py).

A hop a holder rejects (neuroray/swarm/hop_guard.py: wrong shape or dtype, NaN or Inf, a norm outside the
band) is not a crash either: the holder that sent it is the one before the receiver (an activation) or after
it (a gradient) in the same replica, and it is named (:meth:`~neuroray.training.trainer.Trainer.hop_rejected`).
A replica is one chain, so its round fails as a unit: its calls in flight settle, its holders drop the step's
half-done microbatches and gradients, it runs no more inner steps this round, and the outer step leaves out
every one of its pseudo-gradients (none of them earns anything). The other replicas go on; at the round's end
the replica's holders load the new theta0 like every other holder and train again from the next round.

A host that is cut off is not a crash: Ray would notice it only when its health check gives the node up
(about a minute). So a step that is not back within ``cluster.liveness_timeout_s`` has the hosts of its
replica's holders probed (neuroray.swarm.liveness); holders on a host that does not answer are ended and
started afresh on a live node from their newest snapshots, and the replica recovers as from a crash.
"""

from __future__ import annotations

import random
import time
import uuid

import ray

from neuroray.errors import PipelineError
from neuroray.ponw.stragglers import straggler_factor
from neuroray.swarm.direct_transport import HopGroups, direct_or_none, ended_for_good
from neuroray.swarm.ray_errors import holder_died, user_error
from neuroray.swarm.shm_transport import ShmEdges
from neuroray.training.call_clock import CallClock
from neuroray.training.executor import RoundResult, StepExecutor, by_replica, hop_rejection, members, value_or_none
from neuroray.training.schedule import STEP, StepRefs, submit_inner_step


class HostsLost(Exception):
    """Holders of a replica sit on nodes that stopped answering (neuroray.swarm.liveness)."""

    def __init__(self, replica: int, lost: dict[int, str]):
        self.lost = lost  # stage -> node id
        super().__init__(f"the host of replica {replica}'s holders {sorted(lost)} does not answer "
                         f"(node {', '.join(sorted({n[:12] for n in lost.values()}))})")


class FixedPipelines(StepExecutor):
    def __init__(self):
        self.pending: dict[int, list[StepRefs]] = {}  # step -> per-replica refs submitted but not yet collected
        self._theta0_losses: dict[int, list[float]] = {}  # replica -> losses of the round's first inner step
        self._batches: dict[tuple[int, int], int] = {}  # (range, replica) -> microbatches collected this round
        self.overlap = None  # diloco.overlap: the round in flight (OverlappedOuter)
        self._settled: dict[int, float] = {}  # step -> mean loss, collected early (a redone overlapped round)
        self.benched: set[int] = set()  # replicas whose round failed on a rejected hop: out until the outer step
        self.bench_senders: set[tuple[int, int]] = set()  # (stage, replica) of the holder that sent each rejected hop
        self.direct: HopGroups | None = None  # swarm.hop_transport=gloo|nccl: each replica's collective group
        self.shm: ShmEdges | None = None  # swarm.hop_transport=shm: each replica's same-node rings
        self.clock: CallClock | None = None  # the straggler rule's paces: the driver's own clock of the calls
        self._round_end = -1  # the last inner step of the round the outer step was last run for
        self._timed_steps: dict[int, set[int]] = {}  # round -> the inner steps the call clock times in it
        self._losses_sent = -1  # the round end (inner step) whose theta0 losses presend already sent

    def attach(self, trainer) -> None:
        super().attach(trainer)
        if trainer.cfg.diloco.overlap != "none":
            from neuroray.training.overlap import OverlappedOuter

            self.overlap = OverlappedOuter(trainer)
        from neuroray.training.hop_audit import HopRechecks

        self.rechecks = HopRechecks(trainer)  # ponw.hop_recheck_rate: the round's first step redone on peers
        transport = direct_or_none(trainer.swarm.hop_transport)
        if transport is not None:
            self.direct = HopGroups(transport, f"{trainer.swarm.name_prefix or 'neuroray-'}hops")
        if trainer.swarm.hop_transport == "shm":
            cfg = trainer.cfg
            self.shm = ShmEdges(uuid.uuid4().hex[:12], cfg.swarm.hop_shm_slots or cfg.data.num_microbatches + 1,
                                cfg.cluster.step_timeout_s)
        p = trainer.cfg.ponw
        if p.enabled and straggler_factor(p.straggler_factor, "fixed") > 0:
            self.clock = CallClock(p.call_clock_poll_s)

    def paces(self, result: RoundResult) -> dict[tuple[int, int], float]:
        """The coordinator's own clock (neuroray/training/call_clock.py): per holder, the median over its compute
        calls in the round of each call's service time over the same call's median on its range's holders. A
        service time is measured by the driver from when it submitted the call, the holder's previous call
        finished and its inputs appeared, to when its result appeared."""
        if self.clock is None:
            return {}
        t = self.trainer
        paces = self.clock.take(self._round_end, t.cfg.cluster.step_timeout_s)
        # left out of the round (benched): no pace to judge
        paces = {slot: x for slot, x in paces.items() if result.batches.get(slot, 0)}
        t.log(f"call clock: round {t.outer.rounds}: pace, x the range's median per call: " + " ".join(
            f"r{r}-s{s} {x:.2f}" for (s, r), x in sorted(paces.items(), key=lambda kv: kv[0][::-1]))
              + f" (the clock's own CPU so far {self.clock.cpu_s:.2f}s in {self.clock.wakes} wakes)")
        return paces

    def close(self) -> None:
        if self.clock is not None:
            self.clock.close()
        if self.direct is not None:
            self.direct.close()
        if self.shm is not None:
            self.shm.close(self.trainer.swarm.replicas)

    def recovered(self, replica: int) -> None:
        """A holder of ``replica`` may have been restarted or replaced: its hops need a new group, or new rings."""
        if self.direct is not None:
            self.direct.remake(replica, self.trainer.swarm.replicas[replica])
        if self.shm is not None:
            self.shm.remake(replica, self.trainer.swarm.replicas[replica])
            rings = sum(len(names) for names in self.shm.made[replica])
            self.trainer.log(f"hops: replica {replica}'s shared-memory rings made anew ({rings} rings)")

    def submit(self, step: int) -> None:
        if self.overlap is not None and self.overlap.due(step):  # the round in flight lands before this step
            self.overlap.land()
        self.pending[step] = [self._submit(step, r) for r in range(len(self.trainer.swarm.replicas))]

    def _submit(self, step: int, replica: int) -> StepRefs:
        t = self.trainer
        if replica in self.benched:
            return StepRefs([], [], [])
        n, pipeline = t.cfg.data.num_microbatches, t.swarm.replicas[replica]
        if self.direct is not None:  # made once per replica (also for replicas added mid-run)
            self.direct.ensure(replica, pipeline)
        if self.shm is not None:
            self.shm.ensure(replica, pipeline)
        clock = self.clock
        record = None if clock is None else (
            lambda stage, ref, inputs, kind: clock.record((stage, replica), step, ref, inputs, kind))
        if clock is not None and not self._timed(step):
            # before a timed step, only when each holder's step ends (its next call's start); otherwise nothing, so
            # the clock's thread sleeps through the untimed stretch
            before = self._timed(step + 1)
            record = (lambda stage, ref, inputs, kind:
                      clock.record((stage, replica), step, ref) if before and kind == STEP else None)
        return submit_inner_step(pipeline, n, step * n, t.inner_lr(step), t.cfg.swarm.schedule,
                                 None if self.direct is None else self.direct.backend, record)

    def _timed(self, step: int) -> bool:
        """Whether the call clock times ``step``'s calls: ``ponw.call_clock_steps`` steps of its round, drawn from
        the operating system's randomness (a holder cannot know them in advance and stretch only the others)."""
        t = self.trainer
        k, h = t.cfg.ponw.call_clock_steps, t.sync_every
        if k <= 0 or k >= h:
            return True
        r = step // h
        if r not in self._timed_steps:  # kept a round longer: a step redone after a recovery pairs as first timed
            self._timed_steps = {q: x for q, x in self._timed_steps.items() if q >= r - 1}
            self._timed_steps[r] = set(random.SystemRandom().sample(range(r * h, (r + 1) * h), k))
        return step in self._timed_steps[r]

    def collect(self, step: int) -> float:
        """Wait for one step on every replica, recovering replicas whose holders died or whose host was lost."""
        if step in self._settled:
            return self._settled.pop(step)
        t, c = self.trainer, self.trainer.cfg.cluster
        refs = self.pending.pop(step)
        losses, fresh = [], {}
        for r in range(len(refs)):
            while True:
                try:
                    values = self._wait(refs[r], r, step)
                    losses += values[: len(refs[r].losses)]
                    if step % t.sync_every == 0 or fresh.get(r) == step:  # computed at theta0: what the Driver's proof commits
                        self._theta0_losses[r] = values[: len(refs[r].losses)]
                    break
                except PipelineError:
                    raise
                except Exception as exc:
                    lost = isinstance(exc, HostsLost)
                    if not lost and not holder_died(exc):
                        later = self._settle_replica(r, step, refs[r], c.step_timeout_s)
                        rejected = hop_rejection(refs[r].losses + refs[r].tails)
                        if rejected is None:
                            raise user_error(exc, f"inner step {step + 1}") from None
                        self._bench(r, step, rejected, later)
                        self._void(r, [step, *later])
                        refs[r] = StepRefs([], [], [])
                        break
                    if lost:  # Ray would restart them only once its health check gives the node up
                        self._replace(r, exc)
                    # Every call already queued on this replica (this step's and later ones) must settle
                    # before the reset, or a stale backward could land after it. Then redo them all. (Calls
                    # to replaced holders fail as soon as the GCS has ended them: the wait stays short.)
                    later = self._settle_replica(r, step, refs[r], c.liveness_timeout_s if lost else c.step_timeout_s)
                    self._void(r, [step, *later])  # redone below: timed afresh
                    self._replace_ended(r)
                    # with a round in flight the holders' theta0 is not yet the outer state's: no restart at it
                    if self._recover(r, exc, None if self.overlap is not None else step):
                        fresh[r] = step  # the replica goes on from theta0 here: this step's losses are at theta0
                        if step % t.sync_every:  # after the round's first step: its record is not this proof's
                            self.rechecks.restarted_at_theta0(r)
                    refs[r] = self._submit(step, r)
                    for s in later:
                        self.pending[s][r] = self._submit(s, r)
            # counted once the step is through, so a step re-run after a recovery counts once
            for s in range(len(refs[r].steps)):
                self._batches[s, r] = self._batches.get((s, r), 0) + len(refs[r].losses)
        if step % t.sync_every == 0:  # the round's first step: its records asked for, queued behind the next step
            self.rechecks.first_step_done(step, {r: self._theta0_losses[r] for r in range(len(refs))
                                                 if refs[r].losses and r in self._theta0_losses})
        else:  # the records are in once the next step is: the re-executions queue beside the round's later steps
            self.rechecks.launch()
        return sum(losses) / len(losses) if losses else float("nan")  # nan: every replica is out of this round

    def _settle_replica(self, replica: int, step: int, refs: StepRefs, timeout: float) -> list[int]:
        """Wait for every call already queued on ``replica`` (step ``step``'s, ``refs``, and later steps') and read
        their failures, so none lands after a reset and Ray reports none as unhandled. Returns the later steps."""
        later = sorted(s for s in self.pending if s > step)
        stale = [x for sr in [refs, *(self.pending[s][replica] for s in later)] for x in sr.losses + sr.steps + sr.tails]
        ray.wait(stale, num_returns=len(stale), timeout=timeout)
        for x in stale:
            value_or_none(x)
        return later

    def _void(self, replica: int, steps: list[int]) -> None:
        """``replica``'s calls of these steps failed or are redone: no pace from them (their times say nothing)."""
        if self.clock is not None:
            self.clock.void(replica, steps)

    def _bench(self, replica: int, step: int, rejected, later: list[int]) -> None:
        """A hop of ``replica`` was rejected in inner step ``step``: name its sender, drop the replica's half-done
        step, and leave the replica out of the rest of the round (its later steps, already queued, are void)."""
        t = self.trainer
        t.hop_rejected(rejected, rejected.sender_stage, replica, step)
        self.benched.add(replica)
        self.bench_senders.add((rejected.sender_stage, replica))
        for s in later:
            self.pending[s][replica] = StepRefs([], [], [])
        self._theta0_losses.pop(replica, None)  # its Driver's proof is not used this round: nothing to commit
        aborts = [h.abort_step.remote() for h in t.swarm.replicas[replica]]
        ray.wait(aborts, num_returns=len(aborts), timeout=t.cfg.cluster.step_timeout_s)
        for x in aborts:  # a holder that died meanwhile is recovered by the next call that needs it
            value_or_none(x)

    def _wait(self, sr: StepRefs, replica: int, step: int) -> list:
        """The step's losses and gradient norms of one replica. Every ``cluster.liveness_timeout_s`` without
        them, the hosts of the replica's holders are asked whether they are still there
        (neuroray.swarm.liveness); HostsLost when one is not. A slow step on hosts that answer may take up
        to ``cluster.step_timeout_s``."""
        c = self.trainer.cfg.cluster
        wanted = sr.losses + sr.steps
        deadline = time.monotonic() + c.step_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PipelineError(f"inner step {step + 1} of replica {replica} took longer than {c.step_timeout_s:g}s; "
                                    "raise cluster.step_timeout_s or check the Ray dashboard")
            wait = min(left, c.liveness_timeout_s) if c.liveness_timeout_s > 0 else left
            ready, _ = ray.wait(wanted, num_returns=len(wanted), timeout=wait)
            if len(ready) == len(wanted):
                return ray.get(wanted)
            if c.liveness_timeout_s > 0:
                lost = self._lost_holders(replica)
                if lost:
                    raise HostsLost(replica, lost)

    def _lost_holders(self, replica: int) -> dict[int, str]:
        """stage -> node id of the replica's holders whose node does not answer."""
        from neuroray.swarm.liveness import actor_node, unreachable

        placed = {s: actor_node(h) for s, h in enumerate(self.trainer.swarm.replicas[replica])}
        down = unreachable({n for n in placed.values() if n}, self.trainer.cfg.cluster.liveness_probe_s)
        return {s: n for s, n in placed.items() if n and n in down}

    def _recover(self, replica: int, exc: BaseException, step: int | None) -> bool:
        """:meth:`Trainer.recover`; under direct hops once more if Ray ended a holder for good meanwhile (its
        monitor ends the two ends of a failed transfer a moment later, maybe after :meth:`_replace_ended` looked)."""
        try:
            return self.trainer.recover(replica, exc, step)
        except PipelineError:
            if not self._replace_ended(replica):
                raise
            return self.trainer.recover(replica, exc, step)

    def _replace_ended(self, replica: int) -> bool:
        """Direct hops: Ray ends both holders of a transfer that failed (a holder died in the middle of one)
        without restart (neuroray/swarm/direct_transport.py). Start those afresh from their newest snapshots,
        as for a lost host; the recovery that follows brings the replica back and remakes its group. True when
        it replaced any."""
        if self.direct is None:
            return False
        t = self.trainer
        probe = t.cfg.cluster.liveness_probe_s
        ended = [s for s, h in enumerate(t.swarm.replicas[replica]) if ended_for_good(h, probe)]
        if not ended:
            return False
        t.log(f"recovery: Ray ended replica {replica}'s holders {ended} after a failed direct transfer; "
              "starting them afresh from their newest snapshots")
        new = t.swarm.replace_holders(replica, ended, set(), t.cfg.checkpoint.recovery_timeout_s)
        t.holders_replaced(new)
        return True

    def _replace(self, replica: int, exc: HostsLost) -> None:
        t = self.trainer
        t0 = time.monotonic()
        t.log(f"liveness: {exc}; starting its holders {sorted(exc.lost)} on a live node from their newest snapshots")
        new = t.swarm.replace_holders(replica, sorted(exc.lost), set(exc.lost.values()),
                                      t.cfg.checkpoint.recovery_timeout_s)
        t.holders_replaced(new)
        t.log(f"liveness: replica {replica}'s holders {sorted(exc.lost)} started afresh and registered with the "
              f"ledger in {time.monotonic() - t0:.1f}s")

    def _fragment(self, step: int) -> int | None:
        """Streaming: the fragment whose outer step follows inner step ``step``; None without streaming."""
        from neuroray.diloco.streaming import due_fragment

        d = self.trainer.cfg.diloco
        return None if d.streaming_fragments == 1 else due_fragment(step + 1, d.inner_steps, d.streaming_fragments)

    def outer_step(self, step: int) -> RoundResult | None:
        """Every holder's pseudo-gradient; a holder dying meanwhile rolls the outer state back, every
        replica is recovered and the outer step is redone. With overlap: sent, and None (it lands later)."""
        t = self.trainer
        c, outer = t.cfg.cluster, t.outer
        self._round_end = step  # the round paces() times: its calls are the steps up to this one
        saved = (list(outer.theta0), list(outer.momentum), list(outer.memory))
        if self._losses_sent != step:
            self._send_theta0_losses()
        if self.overlap is not None:
            batches, self._batches = self._batches, {}
            self.overlap.begin(step, batches, *self._take_benched())
            if step + 1 < t.total_steps:
                return None
            self.overlap.land()  # the last round: nothing left to overlap, it lands at once
            return self.take_landed()
        benched, senders = self._take_benched()
        # a holder whose first-step hops a peer's re-execution contradicts is left out of this outer step, and
        # with it its replica-mates: they computed on what it sent (as when a hop is rejected, _bench)
        findings, checked, positions = self.rechecks.settle(outer.rounds + 1)
        failed = frozenset((f.stage, f.replica) for f in findings)
        spoiled = frozenset(benched | {r for _, r in failed})
        while True:
            reports, loads = outer.submit(self._fragment(step), spoiled, failed)
            try:
                results = ray.get(reports + loads, timeout=c.step_timeout_s)
                break
            except ray.exceptions.GetTimeoutError:
                raise PipelineError(f"outer step after inner step {step + 1} took longer than {c.step_timeout_s:g}s") from None
            except Exception as exc:
                if not holder_died(exc):
                    raise user_error(exc, f"outer step after inner step {step + 1}") from None
                # memory too: its broadcast residual belongs to the update being redone
                outer.theta0, outer.momentum, outer.memory = map(list, saved)
                outer.rounds -= 1
                for r in range(len(t.swarm.replicas)):
                    t.recover(r, exc)
        reports, loaded = results[: len(reports)], results[len(reports):]
        comm = outer.measure(reports, loaded)
        # a report's indices are those of the replicas left in (all but the spoiled ones)
        spoiled_slots = {(s, r) for s in range(len(reports)) for r in spoiled}
        unused, observed = by_replica(reports, [members(len(t.swarm.replicas), spoiled)] * len(reports), spoiled_slots)
        batches, self._batches = self._batches, {}
        # the spoiled replicas' holders not proven faulty did honest work on what a faulty mate sent: excused
        excused = spoiled_slots - failed - senders
        return RoundResult(reports, comm, unused, batches, observed, findings, checked, excused, positions)

    def _send_theta0_losses(self) -> None:
        t = self.trainer
        if t.ledger is not None:  # the Drivers sign the round's losses at theta0 (spot checks recompute them)
            for r, losses in self._theta0_losses.items():
                t.swarm.replicas[r][0].set_theta0_losses.remote(losses)

    def presends(self) -> bool:
        return self.overlap is not None and self.trainer.cfg.diloco.streaming_fragments == 1

    def presend(self, step: int) -> None:
        # the losses first: a Driver's call order stays losses, pseudo-gradient, next step, as outer_step gives it
        self._send_theta0_losses()
        self._losses_sent = step
        self.overlap.presend()

    def _take_benched(self) -> tuple[set[int], set[tuple[int, int]]]:
        """The replicas left out of the outer step about to run for a rejected hop, and the ``(stage, replica)``
        that sent each; from the next inner step on, all train again."""
        benched, senders, self.benched, self.bench_senders = self.benched, self.bench_senders, set(), set()
        return benched, senders

    def take_landed(self) -> RoundResult | None:
        return None if self.overlap is None else self.overlap.collect(self._settle_steps)

    def _settle_steps(self) -> None:
        """Collect every inner step in flight now (recovering dead holders); :meth:`collect` hands them out."""
        for step in sorted(self.pending):
            self._settled[step] = self.collect(step)
