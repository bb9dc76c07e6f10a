"""Hop rechecks: a sample of each round's first-step microbatches re-executed on another holder of the same range.

Why the first step: when a round starts every holder of a range holds the same weights, theta0, and each keeps
them (neuroray/swarm/outer_state.py). So what holder S of range s in replica r computed on a microbatch of the
round's first inner step, any other holder T of range s (another replica's) can compute again from the same
inputs, and must get the same outputs (fp32 and the same code: equal to the last bits on the CPU). Every
holder records that step (neuroray/swarm/hop_record.py): what it received in full, a digest of what it sent.

Each round, after the first inner step is collected, :class:`HopRechecks` asks every holder for its record
(queued behind the step already submitted); at the next step it draws, with system randomness (a holder cannot
know which of its outputs will be checked), ``ponw.hop_recheck_rate`` of each holder's microbatches and has a
random other replica's holder of the same range re-execute each one (:meth:`StageHolder.reexecute`, at its
theta0, its own training state untouched). The calls queue behind the inner steps already submitted, so they
run beside the round, and the outer step waits for them: a failed holder is left out of THIS round's outer step.

The check of S on microbatch j (:func:`inputs_for`, :func:`judge`):

* S's inputs: its recorded activation in (the Driver: its token ids) and gradient in (the last range: its labels
  and loss scale), each cross-checked against the digest its sender kept of what it sent;
* S's outputs, as their receivers got them: the next holder's recorded activation, the previous holder's recorded
  gradient, the loss the driver collected; compared with T's re-execution in relative L2 (the loss: relative to
  max(1, loss)) against ``ponw.spot_check_tolerance``.

Attribution: a receiver's copy that does not match its sender's own digest is a forged record (the receiver
is blamed); else an output outside the tolerance is the sender's (S). So a holder that computes honestly on
tampered inputs is not blamed: its re-execution from the same inputs gives what it sent.

Every Driver's data, every round (:func:`data_findings`, no re-execution: a shard read): the token ids of each of
its first-step microbatches, as its record has them, must be the batch at its data position (the one it recorded
when the step started, which its proof commits) + j of its own shard ring, rebuilt by the coordinator from its
node id. A Driver that trains on other data (another node's shards) is blamed in the round it starts. The position
it recorded goes into its receipt (the coordinator saw it before the proof), so a proof that names another
position is refused; a Driver that records the right batch but computes on another is caught by the
re-execution of its activation, when drawn.

On a failure (:class:`Finding`): a log line naming the holder and a metric (Trainer.hop_recheck_failed), the
holder's pseudo-gradient left out of the round's outer step (it earns nothing), and once the round's proofs are
booked, evidence signed by the validator (neuroray/training/audit.py, the same identity and fee path as the
Driver spot checks), which the ledger re-verifies before it invalidates the holder's proof and slashes it.

Under swarm routing the same checks run by the router's routes instead of by replica (who sent a holder's inputs
and who received its outputs), at the outer step: neuroray/training/hop_routes.py.

Trusted here: the re-executing holder's answer (a lying checker could frame S; a second checker on a mismatch
would close that) and the sender's digest (kept by the sender; a sender that records one thing and sends
another makes its receiver's record look forged: signing each hop's digest into the payload would close that).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import ray
import torch

from neuroray.config_checks import hop_recheck_off
from neuroray.digest import tensor_digest
from neuroray.training.executor import value_or_none


@dataclass(frozen=True)
class Draw:
    """Microbatch ``mb`` of the holder of range ``stage`` in replica ``replica``, redone by replica ``checker``'s."""

    stage: int
    replica: int
    mb: int
    checker: int


@dataclass(frozen=True)
class Finding:
    """A holder blamed by a recheck: the hop it sent (``fwd``, ``bwd``, ``loss``), or a forged ``record``."""

    stage: int
    replica: int
    mb: int
    direction: str
    error: float = float("inf")
    sent: str = ""  # digest of what it sent (as its receiver got it)
    recomputed: str = ""  # digest of the re-execution
    checker: int | None = None
    detail: str = ""

    @property
    def slot(self) -> str:
        return f"r{self.replica}-s{self.stage}"


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in float32 (inf for different shapes; 0 for two zeros)."""
    if tuple(a.shape) != tuple(b.shape):
        return float("inf")
    a, b = a.float(), b.float()
    diff = float((a - b).norm())
    return diff / max(float(b.norm()), 1e-30) if diff else 0.0


@dataclass(frozen=True)
class Routes:
    """Swarm routing: who ran each range of each microbatch of a round's first inner step, from the router's own
    record of the calls that counted (neuroray/training/hop_routes.py), never from the holders' claims.
    ``fwd[mb][s]``: the holder index of range s whose forward was passed on (the last range: its forward-backward);
    ``bwd[mb][s]``: the one whose backward of range s counted; None where no call counted."""

    fwd: dict
    bwd: dict

    def holder(self, mb: int, stage: int, way: str) -> int | None:
        hops = (self.fwd if way == "fwd" else self.bwd).get(mb)
        return None if hops is None or not 0 <= stage < len(hops) else hops[stage]

    def owner(self, mb: int, stage: int) -> int | None:
        """The holder that ran range ``stage`` of ``mb`` both ways (what a re-execution redoes), or None."""
        f = self.holder(mb, stage, "fwd")
        return f if f is not None and f == self.holder(mb, stage, "bwd") else None


def _peer(route: Routes | None, d: Draw, stage: int, way: str) -> int | None:
    """The holder of range ``stage`` on ``d``'s microbatch (its ``way`` hop): fixed routing, ``d``'s replica."""
    return d.replica if route is None else route.holder(d.mb, stage, way)


def draw_checks(records: dict, stages: int, replicas: list[int], rate: float, rng,
                route: Routes | None = None) -> list[Draw]:
    """Each microbatch of each holder's record with probability ``rate``, each redone by a random other holder of
    its range. ``route`` (swarm routing): only the microbatches the router saw that holder run both ways."""
    out = []
    for r in replicas:
        for s in range(stages):
            rec = records.get((s, r))
            peers = [q for q in replicas if q != r and (s, q) in records]
            for mb in sorted(rec["sent"]) if rec else ():
                if route is not None and route.owner(mb, s) != r:
                    continue
                if peers and rng.random() < rate:
                    out.append(Draw(s, r, mb, rng.choice(peers)))
    return out


def _sent(records: dict, stage: int, replica: int, mb: int, key: str):
    return records.get((stage, replica), {}).get("sent", {}).get(mb, {}).get(key)


def _received(records: dict, stage: int, replica: int, mb: int, key: str):
    return records.get((stage, replica), {}).get("received", {}).get(mb, {}).get(key)


def inputs_for(records: dict, d: Draw, stages: int, route: Routes | None = None) -> tuple[dict | None, Finding | None]:
    """What S received for ``d.mb`` (``{"x", "grad", "labels", "scale"}``), each hop matched against its sender's
    digest (``route``: the sender the router saw); ``(None, finding)`` when S's record is not what its sender sent;
    ``(None, None)``: a piece is missing."""
    s, r, mb = d.stage, d.replica, d.mb
    x, last = _received(records, s, r, mb, "x"), s == stages - 1
    got = {"x": x, "grad": _received(records, s, r, mb, "g"), "labels": _received(records, s, r, mb, "labels"),
           "scale": _received(records, s, r, mb, "scale")}
    if x is None or (last and got["labels"] is None) or (not last and got["grad"] is None):
        return None, None
    for sender, key, what in ((s - 1, "fwd", "x"), (s + 1, "bwd", "grad")):
        if not 0 <= sender < stages:
            continue
        who = _peer(route, d, sender, key)
        digest = None if who is None else _sent(records, sender, who, mb, key)
        if digest is None:
            return None, None
        if tensor_digest(got[what]) != digest:
            return None, Finding(s, r, mb, "record", detail=f"its record of microbatch {mb}'s {key} hop is not what "
                                                            f"r{who}-s{sender} sent")
    got["scale"] = 1.0 if got["scale"] is None else got["scale"]
    return got, None


def judge(records: dict, d: Draw, result: dict, losses: dict, stages: int, tolerance: float,
          route: Routes | None = None) -> Finding | None:
    """S's outputs for ``d.mb``, as their receivers got them (``route``: the receivers the router saw), against the
    re-execution ``result``; the first failure (a forged receiver record, or S's output outside ``tolerance``) or
    None. ``losses``: ``(S's index, mb) -> the loss the driver collected``."""
    s, r, mb = d.stage, d.replica, d.mb
    for receiver, key, got in ((s + 1, "fwd", "x"), (s - 1, "bwd", "g")):
        who = _peer(route, d, receiver, key) if 0 <= receiver < stages else None
        if who is None:
            continue
        received, own, redone = _received(records, receiver, who, mb, got), _sent(records, s, r, mb, key), result[key]
        if received is None or own is None or redone is None:
            continue
        if tensor_digest(received) != own:
            return Finding(receiver, who, mb, "record", detail=f"its record of microbatch {mb}'s {key} hop is not "
                                                               f"what r{r}-s{s} sent")
        error = relative_l2(received, redone)
        if not error <= tolerance:
            return Finding(s, r, mb, key, error, own, tensor_digest(redone), d.checker,
                           f"its {key} hop of microbatch {mb} is {error:.3g} (relative L2) from r{d.checker}-s{s}'s "
                           f"re-execution at theta0")
    loss, redone = losses.get((r, mb)), result.get("loss")
    if s == stages - 1 and loss is not None and redone is not None:
        error = abs(loss - redone) / max(1.0, abs(redone))
        if not error <= tolerance:
            return Finding(s, r, mb, "loss", error, tensor_digest(torch.tensor([loss])),
                           tensor_digest(torch.tensor([redone])), d.checker,
                           f"its loss {loss:.6f} of microbatch {mb} is not r{d.checker}-s{s}'s {redone:.6f}")
    return None


def data_findings(records: dict, replicas: list[int], assigned, shared: bool = False) -> list[Finding]:
    """Each Driver whose recorded token ids of a first-step microbatch are not ``assigned(replica, position)`` (the
    batch at that position of its own shard ring); ``position``: the data position it recorded + j. ``shared``
    (swarm routing): every Driver reads microbatch ``mb`` at position ``mb`` of the one shared ring."""
    out = []
    for r in replicas:
        rec = records.get((0, r)) or {}
        start, mbs = rec.get("position"), sorted(rec.get("received", {}))
        for j, mb in enumerate(mbs):
            x, position = rec["received"][mb].get("x"), mb if shared else None if start is None else start + j
            if position is None or x is None:
                continue
            want, _ = assigned(r, position)
            if tuple(x.shape) != tuple(want.shape) or not torch.equal(x.long(), want.long()):
                ring = "the shared ring" if shared else "its own shards"
                out.append(Finding(0, r, mb, "data", float("inf"), tensor_digest(x), tensor_digest(want), None,
                                   f"microbatch {mb} was not the batch at position {position} of {ring}"))
                break
    return out


class HopRechecks:
    """The fixed executor's side: ask for the records, draw, re-execute on peers, judge before the outer step
    (swarm routing's: :class:`neuroray.training.hop_routes.RoutedRechecks`)."""

    def __init__(self, trainer):
        self.trainer, cfg = trainer, trainer.cfg
        off = hop_recheck_off(cfg)
        self.enabled = off is None and trainer.ledger is not None
        if off is not None and cfg.ponw.enabled and cfg.ponw.hop_recheck_rate > 0:
            trainer.log(f"hop rechecks: off under {off}")
        self.rate, self.tolerance = cfg.ponw.hop_recheck_rate, cfg.ponw.spot_check_tolerance
        self.stats = {"checked": 0, "failed": 0, "seconds": 0.0}
        self._reset()

    def _reset(self) -> None:
        self.takes: dict[tuple[int, int], object] = {}  # (stage, replica) -> ref of the holder's record
        self.losses: dict[tuple[int, int], float] = {}  # (replica, mb) -> the loss the driver collected
        self.records: dict | None = None
        self.jobs: list[tuple[Draw, object]] = []
        self.findings: list[Finding] = []
        self.positions: dict[int, int] = {}  # replica -> its Driver's data position at the round's first step
        self.restarted: set[int] = set()  # replicas restarted from theta0 after the round's first step
        self.route: Routes | None = None  # swarm routing: who ran what (neuroray/training/hop_routes.py)

    def first_step_done(self, step: int, losses: dict[int, list[float]]) -> None:
        """Inner step ``step`` (a round's first) was collected on the replicas in ``losses``: ask for their records."""
        if not self.enabled:
            return
        self._reset()
        t = self.trainer
        first = step * t.cfg.data.num_microbatches
        self.losses = {(r, first + j): v for r, vals in losses.items() for j, v in enumerate(vals)}
        self.takes = {(s, r): h.take_hop_record.remote() for r in losses for s, h in enumerate(t.swarm.replicas[r])}

    def launch(self, wait: bool = False) -> None:
        """Once the records are in (``wait``: wait for them): draw and submit the re-executions."""
        if not self.takes:
            return
        refs = list(self.takes.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.trainer.cfg.cluster.step_timeout_s if wait else 0)
        if len(ready) < len(refs) and not wait:
            return
        records = {key: value_or_none(ref) for key, ref in self.takes.items()}
        self.takes = {}
        stages = len(self.trainer.swarm.ranges)
        # a replica whose holder died meanwhile has no complete record: none of its microbatches is drawn
        replicas = sorted({r for (_, r) in records if all(records.get((s, r)) for s in range(stages))})
        self.records = {key: rec for key, rec in records.items() if key[1] in replicas}
        self.positions = {r: self.records[0, r]["position"] for r in replicas
                          if self.records[0, r].get("position") is not None}
        self.findings += data_findings(self.records, replicas, self._assigned)
        self._reexecute(draw_checks(self.records, stages, replicas, self.rate, random.SystemRandom()))

    def _reexecute(self, draws: list[Draw]) -> None:
        """Each drawn microbatch's inputs (or a forged record's finding), submitted to its checker."""
        stages = len(self.trainer.swarm.ranges)
        for d in draws:
            inputs, forged = inputs_for(self.records, d, stages, self.route)
            if forged is not None:
                self.findings.append(forged)
            elif inputs is not None:
                checker = self.trainer.swarm.replicas[d.checker][d.stage]
                self.jobs.append((d, checker.reexecute.remote(inputs["x"], inputs["grad"], inputs["labels"],
                                                              inputs["scale"])))

    def _assigned(self, replica: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The microbatch at ``position`` of replica ``replica``'s Driver's own shard ring (the coordinator's read)."""
        from neuroray.training.copies import batch_at

        t = self.trainer
        return batch_at(t, t.swarm.infos[replica * len(t.swarm.ranges)]["node_id"], position)

    def restarted_at_theta0(self, replica: int) -> None:
        """``replica`` went on from theta0 after the round's first step (a recovery): its proof starts again, at
        another data position than its record's, so no position of it is observed this round."""
        self.restarted.add(replica)

    def settle(self, outer_round: int) -> tuple[list[Finding], int, dict[int, int]]:
        """Before the outer step: every re-execution judged. Returns the holders blamed (one finding each), the
        number of microbatches re-executed, and each Driver's observed data position (replica -> position)."""
        if not self.enabled:
            return [], 0, {}
        self.launch(wait=True)
        t, stages, checked, seconds = self.trainer, len(self.trainer.swarm.ranges), 0, 0.0
        for d, ref in self.jobs:
            try:
                result = ray.get(ref, timeout=t.cfg.cluster.step_timeout_s)
            except Exception as exc:  # noqa: BLE001 - a check that did not run is no evidence against anyone
                t.log(f"hop recheck of r{d.replica}-s{d.stage} microbatch {d.mb} on r{d.checker} did not run "
                      f"({type(exc).__name__})")
                continue
            checked, seconds = checked + 1, seconds + result["seconds"]
            finding = judge(self.records, d, result, self.losses, stages, self.tolerance, self.route)
            if finding is not None:
                self.findings.append(finding)
        blamed: dict[tuple[int, int], Finding] = {}
        for f in self.findings:
            blamed.setdefault((f.stage, f.replica), f)
        findings = list(blamed.values())
        self.stats["checked"] += checked
        self.stats["failed"] += len(findings)
        self.stats["seconds"] += seconds
        if checked or findings:
            t.log(f"hop recheck: round {outer_round}: {checked} microbatch(es) re-executed on peers in {seconds:.3f}s, "
                  f"{len(findings)} holder(s) failed")
        for f in findings:
            t.hop_recheck_failed(f, outer_round)
        positions = {r: p for r, p in self.positions.items() if r not in self.restarted}
        self._reset()
        return findings, checked, positions
