"""Booking each outer round in the NEURO ledger (``ponw.enabled``, docs/ponw.md).

The :class:`~neuroray.training.trainer.Trainer` hands every finished round here. :class:`ProofBooking` owns
the ledger actor, created under the driver's coordinator key, and the spot checks. It turns what the executor
saw each holder do into coordinator-signed receipts, next to the holders' own signed proofs:
- the microbatches it did;
- whether its pseudo-gradient was used;
- what the outer step received from it;
- the reward factor the reputation and the straggler rule set.
It then submits the round and starts that round's spot checks. The checks that decide a receipt run before
it: the outer step's rule, the copy check (neuroray/training/copies.py), the reputation, the hop rechecks.
Only their verdicts arrive here.
"""

from __future__ import annotations

from dataclasses import replace

import ray

from neuroray.training.executor import RoundResult, value_or_none


class ProofBooking:
    """The ledger side of one training loop: its actor, the coordinator key, the spot checks, the stragglers."""

    def __init__(self, trainer):
        from neuroray.ponw.rules import spot_check_tolerance
        from neuroray.ponw.service import ledger_path, load_coordinator, start_ledger_actor

        self.trainer = t = trainer
        # ponw.spot_check_tolerance=0 (auto) becomes the tolerance that fits how the holders compute, before the
        # ledger (which re-verifies evidence under it) and the validator read it
        float32_only = all(info.get("autocast") is None for info in t.swarm.infos)
        t.cfg = replace(t.cfg, ponw=replace(t.cfg.ponw, spot_check_tolerance=spot_check_tolerance(t.cfg.ponw,
                                                                                              float32_only)))
        cfg, d = t.cfg, t.cfg.data
        # the ledger takes receipts and holder keys only when this key signed them, whoever in the cluster calls it
        self.coordinator = load_coordinator(cfg.ponw, cfg.swarm.key_dir)
        self.ledger = start_ledger_actor(cfg.ponw, ledger_path(cfg.ponw, t.run_dir), cfg.model.n_layers,
                                         d.seq_len * d.microbatch_size, self.coordinator.public_key)
        self.spot_checks = None
        self._straggler_watch = None  # neuroray.ponw.stragglers.StragglerWatch, made at the first booked round
        # proof id -> the (range, replica) slot whose pay waits (None: left by an earlier session, released at start)
        self.escrow: dict[str, tuple[int, int] | None] = {}

    def start(self) -> None:
        """Register the swarm's holders and start the validator (it reads the trainer's ledger and key)."""
        from neuroray.training.audit import SpotChecks

        t = self.trainer
        self.register([h for p in t.swarm.replicas for h in p], "registering the holders")
        self.spot_checks = SpotChecks(t)  # a validator recomputes a sample of each round's Driver proofs
        # pay an earlier session left in escrow: its verdict needed a straggler streak this process does not have
        left = ray.get(self.ledger.escrowed.remote(), timeout=t.cfg.cluster.step_timeout_s)
        if left:
            self.escrow = {e["proof_id"]: None for e in left}
            self._settle(set(), {}, why="an earlier session's")

    def register(self, holders: list, what: str) -> None:
        """The ledger learns these holders' PoNW keys, signed by the coordinator (before their next proof)."""
        if not holders:
            return
        t = self.trainer
        records = t.swarm.get([h.ponw_registration.remote() for h in holders], t.cfg.cluster.step_timeout_s, what)
        ray.get(self.ledger.register.remote(self.coordinator.sign_registration(records)),
                timeout=t.cfg.cluster.step_timeout_s)

    def book(self, result: RoundResult) -> int:
        """Every holder's signed proof of the round goes to the ledger with what the executor saw it do,
        including whether the range's outer step used its pseudo-gradient. Returns the control-plane bytes."""
        from neuroray.ponw.rules import UNIT
        from neuroray.ponw.service import round_receipts

        t = self.trainer
        holders = [h for p in t.swarm.replicas for h in p]
        refs = [t.executor.take_proof(h) for h in holders]
        ray.wait(refs, num_returns=len(refs), timeout=t.cfg.cluster.step_timeout_s)
        proofs = [value_or_none(ref) for ref in refs]  # a holder that died meanwhile has no proof this round
        infos = {id(h): info for h, info in zip(holders, t.swarm.infos)}
        # One receipt per holder, signed by the coordinator: the microbatches the executor saw it do, whether
        # the range's outer step used its pseudo-gradient (work the rule rejected or gave weight 0 is accepted
        # but earns nothing), and what the outer step received from it. holders[k] is replica k // stages,
        # stage k % stages; a range's receipts are made together (the free-rider rule compares their norms).
        stages, receipts = len(t.swarm.ranges), {}
        reports = {rep.range_index: rep for rep in result.reports}
        slow = self._stragglers(result)
        suspects = {} if self._straggler_watch is None else self._straggler_watch.suspects
        self._settle(slow, suspects)  # earlier rounds' escrow, now that this round's paces are in
        for s in range(stages):
            ks = list(range(s, len(holders), stages))
            keys = [(s, k // stages) for k in ks]
            report = reports.get(s)
            nodes = [infos[id(holders[k])]["node_id"] for k in ks]
            # the reputation's reward factor (ponw.reputation), booked with this round's scores
            factors = [10_000 if t.reputation is None else t.reputation.reward_bp(n) for n in nodes]
            factors = [0 if key in slow else f for key, f in zip(keys, factors)]
            made = round_receipts(nodes, t.outer.rounds,
                                  [result.batches.get(key, 0) for key in keys],
                                  [None if key in result.excused else result.observed.get(key) for key in keys],
                                  [key not in result.unused or key in result.excused for key in keys],
                                  getattr(report, "theta0_before", ""), getattr(report, "theta0_after", ""),
                                  data_positions=[result.data_positions.get(r) if s == 0 else None for _, r in keys],
                                  reward_bp=factors, escrow=[key in suspects for key in keys])
            receipts.update(zip(ks, made))
        signed = dict(zip(receipts, self.coordinator.sign_receipts(list(receipts.values()))))
        booked = [k for k, proof in enumerate(proofs) if proof is not None]
        items = [(proofs[k], signed[k]) for k in booked]
        outcomes = ray.get(self.ledger.submit_round.remote(items), timeout=t.cfg.cluster.step_timeout_s)
        for k, o in zip(booked, outcomes):
            if o["escrowed"]:
                s, r = k % stages, k // stages
                self.escrow[o["proof_id"]] = (s, r)
                t.log(f"ledger: round {t.outer.rounds}: r{r}-s{s}'s pay held in escrow: its calls "
                      f"{suspects[s, r]:.1f}x slower than the other holders' of range {s} (released once a round "
                      f"finds it at pace; forfeited if it is named a straggler)")
        summary = ray.get(self.ledger.summary.remote())
        credited = sum(o["reward"] for o in outcomes if o["accepted"]) / UNIT
        refused = [o for o in outcomes if not o["accepted"]]
        unpaid = sum(1 for o in outcomes if o["accepted"] and not o["reward"])  # e.g. work the rule did not use
        unpaid_note = f"; {unpaid} earned 0" if unpaid else ""
        for o in refused:
            t.log(f"ledger: proof of {o['node_id'][:12]} refused: {o['reason']}: {o['detail']}")
        t.log(f"ledger: round {t.outer.rounds}: {len(outcomes) - len(refused)}/{len(holders)} proofs credited "
              f"({credited:.4f} NEURO{unpaid_note}), supply {summary['supply_neuro']:.4f} NEURO"
              + (f"; refused: {sorted({o['reason'] for o in refused})}" if refused else ""))
        if t.metrics:
            t.metrics.balances(summary["balances_neuro"])
        for s, r in sorted(result.excused):
            t.log(f"ledger: round {t.outer.rounds}: r{r}-s{s} excused: it worked on what a holder proven faulty this "
                  "round sent (a replica-mate, or one on its routes), so its work is credited though the outer step "
                  "left it out, and its proof is not spot-checked")
        for s, r in sorted(result.spot_excused):
            t.log(f"ledger: round {t.outer.rounds}: r{r}-s{s} not spot-checked: its committed losses went through a "
                  "holder the hop rechecks proved faulty this round")
        # spot checks of this round start (in a Ray task); earlier rounds' finished ones are filed. An excused
        # Driver's committed losses went through its faulty mate (or a faulty holder on its routes): not a check
        # of its own work
        audited = [proof for k, proof in enumerate(proofs) if proof is not None
                   and (k % stages, k // stages) not in result.excused | result.spot_excused]
        checks = self.spot_checks.audit(audited, outcomes, t.outer.rounds,
                                        self._accused(result.hop_findings), result.hop_checks)
        return sum(len(proof) for proof, _ in items) + checks  # control plane: counted, not sync

    def _stragglers(self, result: RoundResult) -> set[tuple[int, int]]:
        """The ``(range, replica)`` slots the straggler rule names this round (paid 0), logged and counted."""
        t = self.trainer
        from neuroray.ponw.stragglers import StragglerWatch, straggler_factor

        p = t.cfg.ponw
        factor = straggler_factor(p.straggler_factor, t.cfg.swarm.routing)
        if factor <= 0:
            return set()
        if self._straggler_watch is None:
            self._straggler_watch = StragglerWatch(factor, p.straggler_rounds)
        named = self._straggler_watch.observe(t.executor.paces(result))
        for (s, r), ratio in sorted(named.items()):
            t.log(f"ledger: round {t.outer.rounds}: r{r}-s{s} is a straggler (its calls {ratio:.1f}x slower than "
                  f"the other holders' of range {s}, {p.straggler_rounds} rounds in a row; "
                  f"ponw.straggler_factor={factor:g}): paid 0")
            if t.metrics:
                t.metrics.straggler(f"r{r}-s{s}")
        return set(named)

    def _settle(self, named: set, suspects: dict, why: str = "") -> None:
        """Pay or not the escrowed rounds: forfeited where the slot is named a straggler now, kept while it is
        still a suspect, released otherwise (``named`` and ``suspects`` empty: release them all)."""
        release = [pid for pid, slot in self.escrow.items() if slot not in named and slot not in suspects]
        forfeit = [pid for pid, slot in self.escrow.items() if slot in named]
        if not (release or forfeit):
            return
        t = self.trainer
        from neuroray.ponw.escrow import sign_settlement

        signed = sign_settlement(self.coordinator, release, forfeit)
        done = ray.get(self.ledger.settle_escrow.remote(signed), timeout=t.cfg.cluster.step_timeout_s)
        for pid in release + forfeit:
            del self.escrow[pid]
        from neuroray.ponw.rules import UNIT

        t.log(f"ledger: {why or f'round {t.outer.rounds}:'} escrow settled: {done['released']} released "
              f"({done['released_amount'] / UNIT:.4f} NEURO), {done['forfeited']} forfeited "
              f"({done['forfeited_amount'] / UNIT:.4f} NEURO not paid)")

    def _accused(self, findings: list) -> list[tuple[str, object]]:
        """``(node id, the re-executing holder's node id or None, finding)`` of each holder a hop recheck blamed."""
        stages, infos = len(self.trainer.swarm.ranges), self.trainer.swarm.infos
        return [(infos[f.replica * stages + f.stage]["node_id"],
                 None if f.checker is None else infos[f.checker * stages + f.stage]["node_id"], f) for f in findings]

    def summary(self) -> dict:
        self.spot_checks.drain()  # the last round's spot checks are booked too
        self._settle(set(), {}, why="the run's end:")  # slow in the last round but never named: paid
        return ray.get(self.ledger.summary.remote())

    def close(self) -> None:
        ray.kill(self.ledger)
