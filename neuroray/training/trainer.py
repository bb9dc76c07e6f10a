"""The one DiLoCo training loop over a swarm: inner steps, outer rounds, snapshots, proofs and crash recovery.

Fixed pipelines and swarm routing differ only in the step executor the :class:`Trainer` is given
(neuroray.training.executor): it runs the inner steps and gathers the outer step, and observes how many
microbatches each holder did; the loop records every step, books every round (metrics, logs, the
ledger's receipts), snapshots and brings back replicas whose holders Ray restarted.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
from tqdm import tqdm

from neuroray.config import TrainConfig
from neuroray.errors import PipelineError
from neuroray.snapshot import Snapshot, SnapshotStore
from neuroray.swarm.copy_check import CopyRejected
from neuroray.swarm.ray_errors import holder_died, unwrap_ray_error, user_error
from neuroray.training.executor import StepExecutor, value_or_none
from neuroray.training.metrics import TrainMetrics


@dataclass
class LoopStats:
    losses: list[float] = field(default_factory=list)  # mean loss per inner step run by this loop
    recoveries: list[dict] = field(default_factory=list)  # one record per recovered replica
    snapshots: list[int] = field(default_factory=list)  # steps at which a snapshot set was taken
    comm: list[dict] = field(default_factory=list)  # bytes counted per outer round (OuterSync.measure + proofs)
    # one record per hop a holder rejected (neuroray/swarm/hop_guard.py): the sender it is counted against
    hop_rejections: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0

    def bytes_total(self, key: str) -> int:
        return sum(c[key] for c in self.comm)


def wait_alive(holder, deadline: float) -> dict:
    """Poll a holder until it answers: while Ray restarts it, calls fail fast with ActorUnavailableError."""
    while True:
        try:
            return ray.get(holder.counters.remote(), timeout=max(deadline - time.monotonic(), 0.1))
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Trainer:
    def __init__(self, cfg: TrainConfig, swarm, outer, run_dir: Path, snapshot_root: str, executor: StepExecutor,
                 start_step: int = 0, log=print, metrics: TrainMetrics | None = None, upgrades=None,
                 evaluator=None, vocab=None):
        self.cfg, self.swarm, self.outer, self.run_dir, self.log = cfg, swarm, outer, run_dir, log
        self.metrics = metrics
        self.evaluator = evaluator  # held-out evaluation after outer steps (neuroray/training/evaluation.py)
        self.upgrades = upgrades  # model=auto: a neuroray.planner.upgrade.Upgrader, asked between rounds
        self.vocab = vocab  # data.watch_rounds: a neuroray.training.vocab_growth.VocabWatch, asked between rounds
        self.start_step = start_step
        self.outer_stores = [SnapshotStore(snapshot_root, f"outer-s{s}", keep=cfg.checkpoint.keep)
                             for s in range(len(swarm.ranges))]
        d = cfg.data
        self.tokens_per_step = d.microbatch_size * d.seq_len * d.num_microbatches * cfg.diloco.replicas
        self.total_steps = cfg.rounds * cfg.diloco.inner_steps
        # An outer step every sync_every inner steps: every H, or with streaming one fragment every H/F
        self.sync_every = cfg.diloco.inner_steps // cfg.diloco.streaming_fragments
        self.tokens = 0  # trained by this loop, all replicas (their number can grow mid-run)
        self.stats = LoopStats()
        self.comm_before: list[dict] = []  # resumed: rounds booked by earlier runs (comm.json, byte totals)
        self.reputation = self.booking = self.copies = self.replays = None
        if cfg.ponw.reputation:  # held-out scores -> reputation -> aggregation weights and rewards
            from neuroray.training.reputation import Reputation

            self.reputation = Reputation(self, log)
        if cfg.ponw.enabled:
            from neuroray.training.booking import ProofBooking
            from neuroray.training.copies import CopyCheck

            self.booking = ProofBooking(self)  # the ledger actor, the coordinator key, receipts, spot checks
            self.booking.start()
            self.copies = CopyCheck(self, log)  # names who copied another holder's pseudo-gradient
            outer.keep_inputs = True
            if cfg.ponw.replay_check:
                from neuroray.training.replays import ReplayCheck

                self.replays = ReplayCheck(self, self.copies, log)  # refuses replayed pseudo-gradients
        self.executor = executor
        executor.attach(self)

    @property
    def snapshot_dir(self) -> str:
        """Where every slot's snapshots are kept (named in the errors that ask for resume=true)."""
        return self.outer_stores[0].dir.rsplit("/", 1)[0]

    # ----- Proof of Neural Work (neuroray/training/booking.py) -------------------------------------
    @property
    def ledger(self):
        return None if self.booking is None else self.booking.ledger

    @property
    def coordinator(self):
        return None if self.booking is None else self.booking.coordinator

    @property
    def spot_checks(self):
        return None if self.booking is None else self.booking.spot_checks

    def _register_holders(self, holders: list, what: str) -> None:
        if self.booking is not None:
            self.booking.register(holders, what)

    def routing_summary(self) -> dict | None:
        return self.executor.routing_summary()

    def ledger_summary(self) -> dict | None:
        return None if self.booking is None else self.booking.summary()

    def close(self) -> None:
        self.executor.close()
        if self.booking is not None:
            self.booking.close()
            self.booking = None

    # ----- replicas added mid-run ----------------------------------------------------------------
    def replicas_added(self, pipelines: list[list]) -> None:
        """New replicas joined the swarm between rounds (neuroray.planner.upgrade): the next outer step
        reduces over them too, the loop submits their inner steps, and the ledger knows their keys."""
        self.outer.holders_by_range = self.swarm.by_range
        self.cfg = replace(self.cfg, diloco=replace(self.cfg.diloco, replicas=len(self.swarm.replicas)))
        d = self.cfg.data
        self.tokens_per_step = d.microbatch_size * d.seq_len * d.num_microbatches * len(self.swarm.replicas)
        holders = [h for p in pipelines for h in p]
        if hasattr(self, "_holders"):  # utilisation windows (the loop's _begin made the list)
            self._holders += holders
            self._utilisation += [h.utilisation.remote() for h in holders]
        self._register_holders(holders, "registering the added holders")

    # ----- inner steps -------------------------------------------------------------------------
    def inner_lr(self, step: int) -> float:
        """The inner learning rate of (0-based) inner step ``step``: diloco.lr_schedule over the whole run."""
        from neuroray.diloco.lr import inner_lr_at

        d = self.cfg.diloco
        return inner_lr_at(step, self.total_steps, d.inner_lr, d.lr_schedule, d.warmup_steps, d.min_lr_ratio)

    # ----- hops rejected by their receiver --------------------------------------------------------
    def hop_rejected(self, err, stage: int, replica: int, step: int) -> None:
        """A holder rejected a hop (``err``: a :class:`~neuroray.swarm.hop_guard.HopRejected`) that the holder of
        range ``stage`` in replica (or router index) ``replica`` sent: one log line, a metric, a record. The
        executor leaves that holder's pseudo-gradient out of the round's outer step, so it earns nothing."""
        sender = f"r{replica}-s{stage}"
        record = {"step": step + 1, "round": self.outer.rounds + 1, "sender": sender, "receiver": err.receiver,
                  "direction": err.direction, "check": err.check, "detail": err.detail, "microbatch": err.mb}
        self.stats.hop_rejections.append(record)
        if self.metrics:
            self.metrics.hop_rejected(sender, err.check)
        self.log(f"hop rejected: {err} (sent by {sender}, inner step {step + 1}); {sender}'s work this round "
                 "is left out of the outer step and earns nothing")

    def hop_recheck_failed(self, finding, outer_round: int) -> None:
        """A peer's re-execution contradicts what a holder sent in round ``outer_round``'s first inner step
        (neuroray/training/hop_audit.py): one log line, a metric, a record. The executor leaves the holder out of
        the round's outer step; the validator files evidence once the round's proofs are booked."""
        record = {"round": outer_round, "sender": finding.slot, "receiver": "recheck", "direction": finding.direction,
                  "check": "recheck", "detail": finding.detail, "microbatch": finding.mb}
        self.stats.hop_rejections.append(record)
        if self.metrics:
            self.metrics.hop_rejected(finding.slot, "recheck")
        self.log(f"hop recheck failed: {finding.slot}: {finding.detail}; its work this round is left out of the outer "
                 "step and its proof is reported")

    # ----- recovery ---------------------------------------------------------------------------
    def holders_replaced(self, holders: list) -> None:
        """The executor started ``holders`` (already in ``swarm.replicas``) in place of holders on a lost host:
        the outer step reduces over them, utilisation reads them, and the ledger knows their keys (a holder
        started on another host finds no key of its own there and makes one: an unregistered node id)."""
        self.outer.holders_by_range = self.swarm.by_range
        if hasattr(self, "_holders"):
            self._holders = [h for p in self.swarm.replicas for h in p]
            self._utilisation = [h.utilisation.remote() for h in self._holders]
        self._register_holders(holders, "registering the replaced holders")

    def recover(self, replica: int, exc: BaseException, step: int | None = None) -> bool:
        """Wait for the replica's holders to be back, fill any without a snapshot from a peer, reset the step.
        ``step`` (fixed routing, no overlap): the inner step the replica re-runs; True when the replica then goes on
        from theta0 at it (see :meth:`_recover_once`), so that step's losses are the round's theta0 losses.

        A holder of the replica can die again while it recovers (Ray's memory monitor kills one after
        another under memory pressure): the recovery then starts over, within the same deadline."""
        t0 = time.monotonic()
        timeout = self.cfg.checkpoint.recovery_timeout_s
        self.log(f"recovery: a holder of replica {replica} died ({type(exc).__name__}); "
                 + ("waiting for its restart" if self.swarm.spares is None else "a spare takes its slot over"))
        self._taken_over: list[dict] = []  # checkpoint.spares: the slots _recover_once gave a new holder
        while True:
            try:
                counters, fresh = self._recover_once(replica, t0 + timeout, timeout, step)
                break
            except PipelineError:
                raise
            except Exception as again:
                if not holder_died(again) or time.monotonic() > t0 + timeout:
                    raise user_error(again, f"recovering replica {replica}") from None
                self.log(f"recovery: a holder of replica {replica} died again ({type(again).__name__}); starting over")
        self.executor.recovered(replica)  # a restarted holder is in no collective group: direct hops need one
        record = {"replica": replica, "seconds": time.monotonic() - t0,
                  "restored_steps": [c["restored_step"] for c in counters]}
        if self._taken_over:
            record["taken_over"] = self._taken_over
        self.stats.recoveries.append(record)
        if self.metrics:
            self.metrics.failover()
        self.log(f"recovery: replica {replica} back in {record['seconds']:.1f}s (restored snapshot steps "
                 f"{record['restored_steps']}); re-running its lost step")
        return fresh

    def _recover_once(self, replica: int, deadline: float, timeout: float, step: int | None) -> tuple[list[dict], bool]:
        pipeline = self.swarm.replicas[replica]
        counters = []
        for s, h in enumerate(pipeline):
            try:
                counters.append(wait_alive(h, deadline))
            except ray.exceptions.ActorDiedError:
                if self.swarm.spares is None:
                    raise self._not_back(replica, s, timeout) from None
                counters.append(self._take_over(replica, s, deadline))  # no Ray restart with spares: a spare's turn
            except Exception:
                raise self._not_back(replica, s, timeout) from None
        for s, (h, c) in enumerate(zip(pipeline, counters)):
            if c["inner_steps"] == 0 and c["restored_step"] is None and self.stats.losses:
                peers = [(i, p[s]) for i, p in enumerate(self.swarm.replicas) if i != replica]
                self._copy_from_peer(replica, s, h, peers, timeout)
        if self.vocab is not None:  # a holder restored from before a vocabulary growth grows to the swarm's first
            self.vocab.catch_up(self, pipeline, timeout)
        # A snapshot older than the last outer step holds that round's theta0: the holder's next
        # pseudo-gradient (theta0 - theta) would count again learning the outer step already aggregated.
        # Move it to its range's current theta0 and the swarm's round count, as the router's rejoin does.
        # (A holder ahead of outer.rounds loaded a rolled-back outer step's theta0; that redo handles it.)
        behind = [(s, h) for s, (h, c) in enumerate(zip(pipeline, counters))
                  if c["restored_step"] is not None and c["outer_rounds"] < self.outer.rounds]
        fresh = step is not None and any(c["inner_steps"] != step or c["restored_step"] is not None for c in counters)
        if fresh:
            # The whole replica goes on from its range's theta0 at the step it re-runs. A restarted holder lost the
            # round's steps it had taken; a surviving one may have taken the lost step already (a holder's step call
            # does not wait for the other stages) and would take it twice. At theta0 everywhere, every holder's
            # proof starts afresh and counts the batches from here, and the re-run step's losses are at theta0,
            # what the Driver's proof commits and a spot check recomputes. Before the rejoin, every holder's
            # counters (a Driver's data position with them) move to the step, so the proof names those batches.
            behind = list(enumerate(pipeline))
            ray.get([h.align_data.remote(step, self.cfg.data.num_microbatches) for h in pipeline], timeout=timeout)
        ray.get([h.rejoin.remote(self.outer.theta0[s], self.outer.rounds) for s, h in behind], timeout=timeout)
        ray.get([h.abort_step.remote() for h in pipeline], timeout=timeout)
        self.refresh_identities(pipeline)
        return counters, fresh

    def _not_back(self, replica: int, stage: int, timeout: float) -> PipelineError:
        return PipelineError(
            f"holder r{replica}-s{stage} did not come back within {timeout:g}s (restarts exhausted or node lost); "
            f"its snapshots are kept under {self.snapshot_dir}; rerun with resume=true")

    def _take_over(self, replica: int, stage: int, deadline: float) -> dict:
        """checkpoint.spares: the dead holder's slot goes to a ready spare, else a fresh holder (neuroray/swarm/spares.py);
        the outer step, utilisation and the ledger learn the new holder. Returns its counters."""
        t0 = time.monotonic()
        h, how = self.swarm.take_over(replica, stage, max(deadline - t0, 0.1))
        self.holders_replaced([h])
        counters = wait_alive(h, deadline)
        actor = self.swarm.infos[replica * len(self.swarm.ranges) + stage].get("actor")
        self._taken_over.append({"stage": stage, "by": how, "actor": actor, "seconds": time.monotonic() - t0,
                                 "restored_step": counters["restored_step"]})
        self.log(f"recovery: r{replica}-s{stage} taken over by {'a spare' if how == 'spare' else 'a fresh holder'} "
                 f"({actor}) in {time.monotonic() - t0:.2f}s, restored snapshot step {counters['restored_step']}")
        return counters

    def refresh_identities(self, holders: list) -> None:
        """Holders that Ray restarted may run on another host now, where their PoNW key is another one
        (``swarm.key_dir`` is per host): the receipts name their new node ids and the ledger registers them."""
        if self.ledger is None or not holders:
            return
        flat = [h for p in self.swarm.replicas for h in p]
        infos = self.swarm.get([h.info.remote() for h in holders], self.cfg.checkpoint.recovery_timeout_s,
                               "reading the restarted holders' identities")
        moved = []
        for h, info in zip(holders, infos):
            k = next(k for k, x in enumerate(flat) if x is h)
            if self.swarm.infos[k]["node_id"] != info["node_id"]:
                self.swarm.infos[k] = info
                moved.append(h)
        if moved:
            self.log(f"ledger: {len(moved)} restarted holder(s) run under a new key; registering it")
            self._register_holders(moved, "registering the restarted holders")

    def _copy_from_peer(self, replica: int, stage: int, holder, peers: list[tuple[int, object]],
                        timeout: float) -> None:
        # the copy must carry the range's theta0 (the current one, or the round in flight's under overlap)
        box = [self.outer.theta0[stage], self.outer.round_theta0[stage]]
        for r, peer in peers:
            try:
                ray.get(holder.import_range.remote(peer.export_range.remote(), box), timeout=timeout)
                self.log(f"recovery: r{replica}-s{stage} had no snapshot; copied its range from a live peer, "
                         f"r{r}-s{stage}")
                return
            except Exception as exc:  # noqa: BLE001 - a dead, slow or refused peer: try the next
                cause = unwrap_ray_error(exc)
                if isinstance(cause, CopyRejected):
                    self.log(f"recovery: r{replica}-s{stage} refused r{r}-s{stage}'s copy: {cause}")
                continue
        raise PipelineError(f"every holder of range {stage} is gone and r{replica}-s{stage} has no snapshot; "
                            "rerun with resume=true from the kept snapshots")

    # ----- outer step and snapshots --------------------------------------------------------------
    def _outer_round(self, step: int | None) -> None:
        """Run the outer step after inner step ``step``, or (None) book the overlapped round that landed, if any.
        With ``diloco.overlap`` the outer step only starts here and is booked when it lands."""
        if self.ledger is not None and step is not None:
            self.spot_checks.round_starts()  # the theta0 this round's proofs commit to
        if self.replays is not None and step is not None:
            self.replays.round_ends(step)  # its vetting runs inside the outer step, before each range's rule
        result = self.executor.outer_step(step) if step is not None else self.executor.take_landed()
        if result is None:
            return
        copies = self.copies.capture(result) if self.copies is not None else []  # before the scores clear them
        if self.reputation is not None:  # before the receipts: this round's scores count in its rewards
            self.reputation.score_round()
        if copies:  # before the receipts: a copier's says aggregated=False
            # overlapped: the round it books ended steps ago; its batches are those of the steps up to that end
            self.copies.settle(copies, result, step if step is not None else result.end_step)
        if self.reputation is None:
            self.outer.reduced.clear()
        if self.ledger is not None:
            result.comm["control_bytes"] += self.booking.book(result)
        self._finish_round(result.reports, result.comm)

    def _finish_round(self, reports: list, comm: dict) -> None:
        """Book a finished outer round: its counted bytes, its metrics, and every rejection or refusal."""
        self.stats.comm.append(comm)
        if self.metrics:
            self.metrics.comm(comm)
            self.metrics.round(self.outer.rounds, [reason for rep in reports for _, reason in rep.rejected])
        for report in reports:
            for holder, reason in report.rejected:
                self.log(f"outer round {self.outer.rounds}: range {report.range_index} rejected holder #{holder}: {reason}")
            if report.refused:
                self.log(f"outer round {self.outer.rounds}: range {report.range_index} refused, theta0 unchanged: "
                         f"{report.refused}")

    def _snapshot(self, step: int) -> list[tuple[int, BaseException]]:
        """Snapshot every holder and each range's outer state at the boundary after ``step`` steps. Returns
        the replicas with a holder that died meanwhile (the set is then skipped) and why."""
        self.executor.settle()
        died = self._each_replica(lambda h: h.snapshot.remote(step), f"snapshot at step {step}")
        if died:
            self.log(f"snapshot at step {step} skipped: a holder died; the next inner step recovers it")
            return died
        theta0 = ray.get(self.outer.theta0)
        momentum = [None if m is None else ray.get(m) for m in self.outer.momentum]
        memory = [None if m is None else ray.get(m) for m in self.outer.memory]
        for s, store in enumerate(self.outer_stores):
            tensors = {"theta0": theta0[s]} | ({} if momentum[s] is None else {"momentum": momentum[s]})
            meta = {"rounds": self.outer.rounds}
            if s == 0 and self.reputation is not None:  # the run's reputation travels with range 0's outer state
                meta["reputation"] = self.reputation.book.state()
            if s == 0 and self.executor.barred():  # so does who the hop rechecks barred from routing
                meta["barred"] = self.executor.barred()
            if getattr(self.executor, "overlap", None) is not None and self.executor.overlap.inflight is not None:
                # theta0 above is the round in flight's; the holders hold their base: land it at the same step
                meta["overlap_land_at"] = self.executor.overlap.inflight.land_at
            if memory[s] is not None:  # the rule's memory (centered clipping's centre, stale replay)
                extra, extra_meta = memory[s].to_snapshot()
                tensors, meta = tensors | extra, meta | extra_meta
            store.write_async(Snapshot(step, tensors, meta))
        self.stats.snapshots.append(step)
        if self.metrics:
            self.metrics.snapshot_taken()
        return []

    def _each_replica(self, call, what: str) -> list[tuple[int, BaseException]]:
        """``call(holder)`` on every holder; the replicas with a holder that died (or restarted) meanwhile."""
        refs = [[call(h) for h in p] for p in self.swarm.replicas]
        died = []
        for r, row in enumerate(refs):
            try:
                ray.get(row, timeout=self.cfg.cluster.step_timeout_s)
            except Exception as exc:
                if not holder_died(exc):
                    raise user_error(exc, what) from None
                died.append((r, exc))
        return died

    def restore_outer(self, step: int) -> None:
        """Load each range's theta0, momentum and outer-step memory of snapshot ``step`` into the outer-sync state."""
        from neuroray.diloco.sync import OuterMemory

        for s, store in enumerate(self.outer_stores):
            snap = store.read(step)
            self.outer.theta0[s] = ray.put(snap.tensors["theta0"])
            self.outer.momentum[s] = ray.put(snap.tensors["momentum"]) if "momentum" in snap.tensors else None
            # no memory in the snapshot (taken before the first round, or by an older version): start afresh
            memory = OuterMemory.from_snapshot(snap.tensors, snap.meta) if "memory_replay" in snap.meta else None
            self.outer.memory[s] = None if memory is None else ray.put(memory)
            self.outer.rounds = snap.meta["rounds"]
            land_at = snap.meta.get("overlap_land_at")
            if s == 0 and self.reputation is not None and "reputation" in snap.meta:
                self.reputation.book.load(snap.meta["reputation"])
            if s == 0 and snap.meta.get("barred"):
                self.executor.bar_again(list(snap.meta["barred"]))
        if land_at is not None:  # diloco.overlap: the snapshot was taken with a round in flight
            self.executor.overlap.resumed(land_at)

    def flush(self) -> list[tuple[int, BaseException]]:
        """Wait for every snapshot write; the replicas with a holder that died before its writes were done."""
        died = self._each_replica(lambda h: h.flush_snapshots.remote(), "flushing snapshots")
        for store in self.outer_stores:
            store.flush()
        return died

    def _final_snapshot(self) -> None:
        """A final snapshot set, so resume=true with more rounds continues from the end, never re-training
        logged steps (it adds files only: snapshots read the holders, they change nothing). A holder that
        dies meanwhile (the memory monitor kills at the end as at any time) is recovered: back at its
        range's theta0, which after the last outer step is the model, and the set is taken again."""
        deadline = time.monotonic() + self.cfg.checkpoint.recovery_timeout_s
        while True:
            died = []
            if self.total_steps > self.start_step and self.stats.snapshots[-1:] != [self.total_steps]:
                died = self._snapshot(self.total_steps)
            died = died or self.flush()
            if not died:
                return
            if time.monotonic() > deadline:
                raise PipelineError(f"the final snapshot set was not written: holders kept dying for "
                                    f"{self.cfg.checkpoint.recovery_timeout_s:g}s (checkpoint.recovery_timeout_s); "
                                    f"the last complete set is under {self.snapshot_dir}; rerun with resume=true")
            for r, exc in died:
                self.recover(r, exc)
            if self.stats.snapshots[-1:] == [self.total_steps]:
                self.stats.snapshots.pop()  # a holder's part of that set may be lost with it: take it again

    # ----- the loop ---------------------------------------------------------------------------
    def _begin(self, metrics_file) -> None:
        """Start the clocks, the progress bar and the first utilisation window of a training loop."""
        self._t0 = self._last_snapshot = self._last_step = time.monotonic()
        self._metrics_file = metrics_file
        self._holders = [h for p in self.swarm.replicas for h in p]
        self._utilisation = [h.utilisation.remote() for h in self._holders]
        self._bar = tqdm(total=self.total_steps, initial=self.start_step, unit="step", dynamic_ncols=True,
                         disable=not (self.cfg.progress_bar and sys.stderr.isatty()))
        self._say = self._bar.write if not self._bar.disable else self.log

    def _record(self, step: int, loss: float) -> None:
        """Book one finished inner step: metrics.jsonl, Ray metrics, the bar and the progress line."""
        cfg, H = self.cfg, self.cfg.diloco.inner_steps
        self.stats.losses.append(loss)
        self.tokens += self.tokens_per_step
        done = len(self.stats.losses)
        now = time.monotonic()
        elapsed = now - self._t0
        tps = self.tokens / elapsed
        record = {"step": step + 1, "round": step // H + 1, "loss": loss, "lr": self.inner_lr(step),
                  "tokens_per_s": tps, "elapsed_s": elapsed,
                  # counted so far: a round's bytes show from the first step record after its outer step
                  "sync_bytes": self._bytes_total("sync_bytes"),
                  "control_bytes": self._bytes_total("control_bytes")}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self.metrics:
            self.metrics.step(step + 1, loss, tps, now - self._last_step)
        self._last_step = now
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
        if (step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps:
            eta = elapsed / done * (self.total_steps - step - 1)
            self._say(f"round {record['round']}/{cfg.rounds} step {step + 1}/{self.total_steps} loss {loss:.4f} "
                      f"tok/s {tps:,.0f} elapsed {elapsed:.0f}s eta {eta:.0f}s")
            if self.metrics:  # read the previous window's numbers, ask for the next: never wait on holders
                ready, _ = ray.wait(self._utilisation, num_returns=len(self._utilisation), timeout=0)
                if len(ready) == len(self._utilisation):
                    self.metrics.holders([u for u in map(value_or_none, self._utilisation) if u is not None])
                    self._utilisation = [h.utilisation.remote() for h in self._holders]

    def _bytes_total(self, key: str) -> int:
        """Counted over the whole run, rounds booked before a resume included."""
        return sum(c[key] for c in self.comm_before) + self.stats.bytes_total(key)

    def _boundary(self, step: int, round_end: bool, due: bool) -> None:
        """After inner step ``step``: the outer round at a round's end, then a snapshot when one is due."""
        grew = False
        self._outer_round(None)  # diloco.overlap: a round landed behind this step
        if round_end:
            self._outer_round(step)
            if self.upgrades is not None:  # nothing in flight now: holders may grow
                grew = self.upgrades.between_rounds(self)
            if self.vocab is not None:  # the dataset extended with a grown tokenizer: the vocabulary grows
                grew = self.vocab.between_rounds(self) or grew
        # after a growth, snapshot at once: a restart must never fall back to the old shapes
        if (round_end and self.cfg.checkpoint.every_round) or due or grew:
            self._snapshot(step + 1)
            self._last_snapshot = time.monotonic()

    def _round_end(self, step: int, due: bool) -> None:
        self._boundary(step, True, due)
        if self.evaluator is not None:  # at the last landed theta0 (under overlap, a round may be in flight)
            self.evaluator.after_outer_step(self, step + 1)

    def _presends(self, step: int) -> bool:
        """Whether the round ending after ``step`` may end before that step is collected (``diloco.overlap``:
        :meth:`StepExecutor.presend`), so no holder waits on the driver at the round's end. Not where this
        boundary needs the holders still: the last round, a snapshot, an evaluation, a growth."""
        return (self.executor.presends() and step + 1 < self.total_steps and not self.cfg.checkpoint.every_round
                and self.upgrades is None and self.vocab is None
                and (self.evaluator is None or not self.evaluator.due(step + 1)))

    def _snapshot_due(self) -> bool:
        ck = self.cfg.checkpoint
        return ck.interval_s > 0 and time.monotonic() - self._last_snapshot >= ck.interval_s

    def run(self, metrics_file) -> LoopStats:
        ex = self.executor
        self._begin(metrics_file)
        uncollected = None  # the step submitted last and not collected yet
        present = None  # a round's end whose pseudo-gradients were asked for before its last step was collected
        try:
            for step in range(self.start_step, self.total_steps):
                # submit this step before waiting on the previous one, so holders never idle on the driver
                ex.submit(step)
                if uncollected is not None:
                    self._record(uncollected, ex.collect(uncollected))
                if present is not None:
                    self._round_end(present, False)
                    present = None
                uncollected = step
                round_end = (step + 1) % self.sync_every == 0
                due = self._snapshot_due()
                if round_end and not due and self._presends(step):
                    ex.presend(step)  # the outer step waits for the next step to be queued, not the holders for it
                    present = step
                    continue
                if round_end or due:
                    self._record(step, ex.collect(step))
                    uncollected = None
                if round_end:
                    self._round_end(step, due)
                else:
                    self._boundary(step, False, due)
            if uncollected is not None:
                self._record(uncollected, ex.collect(uncollected))
        finally:
            self._bar.close()
        ex.finish()
        self._final_snapshot()
        self.stats.elapsed_s = time.monotonic() - self._t0
        return self.stats
