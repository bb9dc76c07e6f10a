"""Spot checks during training: a validator recomputes a sample of each round's Driver proofs.

Every Driver proof commits the losses of its round's first microbatches, computed at the round's theta0.
After the trainer has booked a round's proofs, :class:`SpotChecks` draws ``ponw.spot_check_rate`` of the
credited Driver proofs (system randomness: a Driver cannot know whether, or which of its batches, will
be checked) and a background thread recomputes each drawn batch: it rebuilds the Driver's data from its node id
(the deterministic shard assignment) and evaluates the model at the round's theta0, every range's, as
the coordinator kept it. A loss outside ``ponw.spot_check_tolerance`` (or a batch that is not in the
shard the proof names) becomes evidence, signed by the validator, and the ledger's ``invalidate``
re-verifies it, claws the reward back and slashes the Driver; the validator is paid part of the slash.
For the batches it recomputed the validator submits a ``validation`` proof, against a coordinator
receipt, and the ledger pays it ``ponw.validation_fee_per_batch`` for each.

The same validator files the hop rechecks' findings (neuroray/training/hop_audit.py: a holder's first-step
hops re-executed on a peer of its range): evidence against the blamed holder's proof of the round, and the fee
for the microbatches re-executed, in the round's one validation proof.

The validator is a key of the driver's (``<swarm.key_dir>/validator.pem``), registered by the coordinator
as a node holding the whole model and as a validator.

Why it does not stall training: the recompute runs in one background thread of the driver while the next
round trains (torch releases the GIL in its kernels; the driver's loop mostly waits on Ray). A thread,
not a Ray task: a fresh Ray worker would import torch and the model code first, seconds of CPU on a small
machine for a check that takes milliseconds. Its result is filed when the next round is booked (or at
the end of the run, :meth:`SpotChecks.drain`). One forward pass of the whole model per checked Driver
proof, in float32 on the driver's CPU: it competes with the holders for the cores, which
benchmarks/verification.py measures.

Not checked: streaming runs (``diloco.streaming_fragments > 1``): only one fragment is at theta0 when a
round starts, so the committed losses are at weights the coordinator never held. Overlapped runs
(``diloco.overlap``) likewise: a round's first step runs from weights the previous round had not yet landed on.
Nor runs with compressed hops (``swarm.hop_compression``): the committed loss went through the codec at
every stage cut, which the driver's one-process recompute does not (lowrank alone moves it past the
tolerance, docs/hops.md), so an honest Driver would be slashed.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import ray
import torch

from neuroray.config_checks import hop_recheck_off
from neuroray.ponw.identity import Identity
from neuroray.ponw.proof import SignedProof
from neuroray.ponw.verifier import NodeRecord, Receipt, SpotCheck

VALIDATOR_KEY_FILE = "validator.pem"


# ----- the recompute (in the spot-check thread, or in-process in tests) ----------------------------
def build_loss_at(model, vocab_size: int, ranges: list[tuple[int, int]], seed: int, theta0: list[torch.Tensor]):
    """``loss_fn(inputs, labels)``: the pipeline of ``ranges`` at these flat theta0 vectors, one per range,
    in float32 on the CPU, as the holders compute the loss (each stage's module, chained)."""
    from neuroray.training.reputation import StagePipeline

    pipe = StagePipeline(model, vocab_size, ranges, seed)
    for s, flat in enumerate(theta0):
        pipe.load(s, flat)

    def loss_fn(inputs: torch.Tensor, labels: torch.Tensor) -> float:
        out, _ = pipe.run(inputs)
        return pipe.loss(out, labels)

    return loss_fn


def recompute_checks(spec: dict, theta0: list[torch.Tensor], proofs: list[bytes], seed: int,
                     rate: float, tolerance: float, max_proof_bytes: int) -> list[tuple[bytes, SpotCheck]]:
    """Spot-check a ``rate`` sample of ``proofs`` (one random committed batch each, drawn from ``seed``);
    returns every check made, with its proof's wire bytes."""
    from neuroray.config import PonwConfig
    from neuroray.genesis import Manifest
    from neuroray.ponw.service import make_recompute, spot_checks

    loss_fn = build_loss_at(spec["model"], spec["vocab_size"], spec["ranges"], spec["seed"], theta0)
    recompute = make_recompute(spec["data_root"], Manifest.from_json(spec["manifest"]), spec["seq_len"],
                               spec["microbatch_size"], loss_fn, ring_start=spec["ring_start"])
    cfg = PonwConfig(spot_check_rate=rate, spot_check_tolerance=tolerance, max_proof_bytes=max_proof_bytes)
    by_id = {SignedProof.from_bytes(p, max_proof_bytes).proof.proof_id: p for p in proofs}
    return [(by_id[proof.proof_id], check)
            for proof, check in spot_checks(proofs, recompute, cfg, random.Random(seed), rate)]


def _recompute_job(spec: dict, theta0_refs: list, proofs: list[bytes], seed: int, rate: float, tolerance: float,
                   max_proof_bytes: int) -> tuple[list[tuple[bytes, SpotCheck]], float]:
    """:func:`recompute_checks` on the kept theta0 refs, and the seconds it took (its cost, for the logs)."""
    t0 = time.perf_counter()
    theta0 = ray.get(theta0_refs)
    checks = recompute_checks(spec, theta0, proofs, seed, rate, tolerance, max_proof_bytes)
    return checks, time.perf_counter() - t0


# ----- the driver's side ----------------------------------------------------------------------------
class SpotChecks:
    """The trainer's validator: draws, recomputes (in a background thread), files evidence and claims its fees."""

    def __init__(self, trainer):
        cfg = trainer.cfg
        self.trainer, self.ponw = trainer, cfg.ponw
        self.enabled = (cfg.ponw.spot_check_rate > 0 and cfg.diloco.streaming_fragments == 1
                        and cfg.diloco.overlap == "none" and cfg.swarm.hop_compression == "none")
        self.hops = hop_recheck_off(cfg) is None  # the hop rechecks file through this validator too
        self.hop_fees: dict[int, int] = {}  # outer round -> microbatches re-executed, paid with its Driver checks
        self.identity = Identity.load_or_create(Path(cfg.swarm.key_dir).expanduser() / VALIDATOR_KEY_FILE)
        self.record = NodeRecord(self.identity.node_id, self.identity.public_key, 0, cfg.model.n_layers, True, True)
        self.tokens_per_batch = cfg.data.seq_len * cfg.data.microbatch_size
        self.pending: list[tuple[int, Future]] = []  # (outer round, its recompute in the thread)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spot-checks")
        self.start: tuple[list, dict] | None = None  # the round in flight: theta0 refs and the model they fit
        self.stats = {"checked": 0, "failed": 0, "slashed": 0, "fees": 0, "seconds": 0.0}
        if self.enabled or self.hops:
            ray.get(trainer.ledger.register.remote(trainer.coordinator.sign_registration(
                [self.record], validators=[self.identity.node_id])), timeout=cfg.cluster.step_timeout_s)
        elif cfg.ponw.spot_check_rate > 0:
            trainer.log("spot checks: off under streaming, overlap and hop compression (the committed losses "
                        "are not what the coordinator's one-process recompute gives)")

    def round_starts(self) -> None:
        """Before the outer step: the theta0 (every range's) and the model the round's proofs commit to."""
        if not self.enabled or self.trainer.swarm.data is None:  # no data plan: nothing to rebuild a batch from
            return
        t = self.trainer
        swarm, d = t.swarm, t.cfg.data
        spec = {"model": swarm.model, "vocab_size": swarm.vocab_size, "ranges": list(swarm.ranges), "seed": t.cfg.seed,
                "data_root": swarm.data.root, "manifest": swarm.data.manifest, "seq_len": d.seq_len,
                "microbatch_size": d.microbatch_size, "ring_start": 0 if t.cfg.swarm.routing == "router" else None}
        self.start = (list(t.outer.theta0), spec)

    def audit(self, proofs: list[bytes], outcomes: list[dict], outer_round: int, accused: list = (),
              hop_checks: int = 0) -> int:
        """After a round's proofs were booked: file the earlier rounds' finished checks and this round's hop
        recheck findings (``accused``: ``(node id, checker node id, finding)``; ``hop_checks`` microbatches were
        re-executed), start this round's Driver checks. Returns the control-plane bytes sent to the ledger."""
        sent = self._file(wait=False) + self._file_hops(proofs, outcomes, outer_round, accused)
        if hop_checks:  # paid with the round's Driver checks (one validation proof per round), or now
            self.hop_fees[outer_round] = hop_checks
        if not self.enabled or self.start is None:
            return sent + self._pay(outer_round, self.hop_fees.pop(outer_round, 0))
        credited = {o["proof_id"] for o in outcomes if o["accepted"]}
        drivers = [p for p in proofs if _is_credited_driver(p, credited, self.ponw.max_proof_bytes)]
        theta0, spec = self.start
        self.start = None
        if drivers:
            p = self.ponw
            job = self.pool.submit(_recompute_job, spec, theta0, drivers, random.SystemRandom().getrandbits(63),
                                   p.spot_check_rate, p.spot_check_tolerance, p.max_proof_bytes)
            self.pending.append((outer_round, job))
        else:
            sent += self._pay(outer_round, self.hop_fees.pop(outer_round, 0))
        return sent

    def drain(self) -> int:
        """Wait for every recompute in flight and file it (the end of a run)."""
        return self._file(wait=True)

    def _file(self, wait: bool) -> int:
        sent = 0
        timeout = self.trainer.cfg.cluster.step_timeout_s
        while self.pending:
            outer_round, job = self.pending[0]
            if not (wait or job.done()):
                break
            self.pending.pop(0)
            try:
                checks, seconds = job.result(timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - a lost check is no evidence against anyone
                self.trainer.log(f"spot checks of round {outer_round} failed to run ({type(exc).__name__}: {exc})")
                sent += self._pay(outer_round, self.hop_fees.pop(outer_round, 0))
                continue
            self.stats["seconds"] += seconds
            if checks:
                self.trainer.log(f"spot check: round {outer_round}: {len(checks)} Driver proof(s) recomputed in "
                                 f"{seconds:.3f}s, {sum(not c.ok for _, c in checks)} failed")
            sent += self._settle(outer_round, checks)
        return sent

    def _settle(self, outer_round: int, checks: list[tuple[bytes, SpotCheck]]) -> int:
        """The fee for the recomputed batches (and the round's hop rechecks); evidence against every failed check."""
        from neuroray.ponw.authority import sign_evidence

        p = self.ponw
        sent = self._pay(outer_round, len(checks) + self.hop_fees.pop(outer_round, 0))
        failed = [(wire, check) for wire, check in checks if not check.ok]
        evidence = [sign_evidence(self.identity, SignedProof.from_bytes(wire, p.max_proof_bytes).proof, check, p.backend)
                    for wire, check in failed]
        self.stats["checked"] += len(checks)
        self.stats["failed"] += len(evidence)
        return sent + self._invalidate(outer_round, evidence, [f"Driver ({check.detail})" for _, check in failed])

    def _file_hops(self, proofs: list[bytes], outcomes: list[dict], outer_round: int, accused: list) -> int:
        """Evidence against each holder a hop recheck blamed, on its credited proof of the round. A forged record
        (the holder's own account of what it received) is left out of the round but not slashed: no hop of its
        differs from a re-execution, and the ledger takes only that as evidence."""
        from neuroray.ponw.authority import sign_hop_evidence

        p, credited = self.ponw, {o["proof_id"] for o in outcomes if o["accepted"]}
        by_node = {proof.node_id: proof for proof in (SignedProof.from_bytes(w, p.max_proof_bytes).proof for w in proofs)
                   if proof.proof_id in credited}
        evidence, what = [], []
        for node, checker, f in accused:
            if f.direction == "data":  # the validator read the Driver's own shards itself
                checker = self.identity.node_id
            if f.direction == "record" or checker is None or node not in by_node:
                continue
            evidence.append(sign_hop_evidence(self.identity, by_node[node], checker, f.mb, f.direction, f.sent,
                                              f.recomputed, f.error, p.backend))
            what.append(f"{f.slot} ({f.detail})")
        return self._invalidate(outer_round, evidence, what)

    def _pay(self, outer_round: int, batches: int) -> int:
        """The validator's ``validation`` proof for ``batches`` checked in ``outer_round``, against a receipt."""
        from neuroray.ponw.service import validation_proof

        t, p = self.trainer, self.ponw
        if not batches:
            return 0
        proof = validation_proof(self.identity, self.record, outer_round, batches, self.tokens_per_batch, p.backend)
        receipt = t.coordinator.sign_receipt(Receipt(self.identity.node_id, outer_round, "validation", batches=batches))
        fee = ray.get(t.ledger.submit_round.remote([(proof, receipt)]), timeout=t.cfg.cluster.step_timeout_s)[0]
        self.stats["fees"] += fee["reward"] if fee["accepted"] else 0
        if not fee["accepted"]:
            t.log(f"spot check: round {outer_round}: the validator's fee was refused: {fee['reason']}")
        return len(proof) + len(receipt)

    def _invalidate(self, outer_round: int, evidence: list[bytes], what: list[str]) -> int:
        """File each signed evidence record with the ledger, which re-verifies it; one log line each."""
        t = self.trainer
        verdicts = ray.get([t.ledger.invalidate.remote(e) for e in evidence], timeout=t.cfg.cluster.step_timeout_s)
        for who, v in zip(what, verdicts):
            self.stats["slashed"] += v["reason"] == "invalidated"
            t.log(f"spot check: round {outer_round}: {who} failed: {v['reason']}, slashed "
                  f"{v.get('slashed', 0) / 1e6:.4f} NEURO")
        return sum(map(len, evidence))


def _is_credited_driver(wire: bytes, credited: set[str], max_bytes: int) -> bool:
    proof = SignedProof.from_bytes(wire, max_bytes).proof
    return proof.has_embedding and proof.proof_type == "training" and proof.proof_id in credited

