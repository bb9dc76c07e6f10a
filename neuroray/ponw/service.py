"""PoNW in a training run: the ledger as a named Ray actor, and the helpers holders and the driver use.

Per outer round::

    holder (each)        RoundProver.start_round(...)  at the round's start (theta0, counters, data position)
                         RoundProver.note_pseudo_gradient(delta)  when it hands its delta to the outer step
                         RoundProver.finish_round(...) -> proof bytes  after it loaded the new theta0
    orchestrator         observe_delta(delta) in the outer-step task, round_receipts(...) per range,
                         Coordinator.sign_receipts(receipts)  (only the coordinator's key makes a receipt)
    ledger actor         LedgerService.submit_round([(proof, signed receipt), ...])  verify + credit, one commit
    validator            audit_evidence(...) spot checks -> LedgerService.invalidate(evidence) on a mismatch

:class:`LedgerService` is a plain class (tests use it in-process); :func:`start_ledger_actor` runs it
as a Ray actor pinned to the driver's node, so the SQLite file lives in the run directory there.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from neuroray.config import PonwConfig
from neuroray.digest import tensor_digest  # the one commitment format: holder, coordinator, outer step
from neuroray.ponw.authority import COORDINATOR_KEY_FILE, Coordinator, sign_evidence
from neuroray.ponw.identity import Identity
from neuroray.ponw.ledger import Ledger, LedgerError
from neuroray.ponw.proof import MAX_LOSSES, Proof, SignedProof, loss_to_micro, new_nonce, now_ms
from neuroray.ponw.rules import UNIT
from neuroray.ponw.verifier import DataMismatch, NodeRecord, Receipt, SpotCheck, spot_check

LEDGER_FILE = "ledger.sqlite"


# ----- commitments ----------------------------------------------------------------------------
def _commitment(x):
    """A commitment given as a digest or a future of one (neuroray.digest.DigestThread), kept as it is, or a
    tensor, hashed now."""
    return x if isinstance(x, str) or hasattr(x, "result") else tensor_digest(x)


def _resolved(x) -> str:
    x = _commitment(x)
    return x if isinstance(x, str) else x.result()


def observe_delta(delta) -> tuple[str, float]:
    """What the orchestrator records of a pseudo-gradient it received: ``(digest, L2 norm)``."""
    return tensor_digest(delta), float(delta.detach().double().norm())


def round_receipts(node_ids: Sequence[str], outer_round: int, batches: int | Sequence[int],
                   observations: Sequence[tuple[str, float] | None], aggregated: Sequence[bool] | None = None,
                   theta0_before: str = "", theta0_after: str = "",
                   data_positions: Sequence[int | None] | None = None,
                   reward_bp: Sequence[int] | None = None, escrow: Sequence[bool] | None = None) -> list[Receipt]:
    """Receipts for the holders of ONE layer range in one round (sign them: ``Coordinator.sign_receipts``).

    ``batches``: microbatches the orchestrator routed through each holder (one int for all, or one
    each), counted by the orchestrator; ``observations``: :func:`observe_delta` of each holder's delta,
    in the same order (``OuterReport.observations``; None: nothing observed, e.g. streaming fragments or
    a malformed payload, which the outer step already lists as not aggregated: no digest or norm is
    compared); ``aggregated``: False for holders whose delta the robust aggregator dropped;
    ``theta0_before``/``theta0_after``: digests of the range's theta0 (``OuterReport``);
    ``data_positions``: each Driver's first committed stream position (None for the others). Every
    non-empty field is compared with the proof; the range's median norm feeds the free-rider rule.
    ``reward_bp``: each holder's reward factor (its reputation) in basis points; None: 10000 each.
    ``escrow``: True for the holders whose reward the ledger holds until a settlement (neuroray/ponw/escrow.py).
    """
    n = len(node_ids)
    counts = [batches] * n if isinstance(batches, int) else list(batches)
    assert len(counts) == n and len(observations) == n, "one batch count and one observation per holder"
    norms = [o[1] for o in observations if o is not None]
    median = statistics.median(norms) if norms else 0.0
    agg = list(aggregated) if aggregated is not None else [True] * n
    pos = list(data_positions) if data_positions is not None else [None] * n
    obs = [o if o is not None else ("", None) for o in observations]
    factors = list(reward_bp) if reward_bp is not None else [10_000] * n
    held = list(escrow) if escrow is not None else [False] * n
    return [Receipt(node_id=node, outer_round=outer_round, proof_type="training", batches=counts[i],
                    pseudo_gradient=obs[i][0], pseudo_gradient_norm=obs[i][1],
                    range_median_norm=median, aggregated=agg[i],
                    data_position=pos[i], theta0_before=theta0_before, theta0_after=theta0_after,
                    reward_bp=factors[i], escrow=held[i])
            for i, node in enumerate(node_ids)]


# ----- the holder's side ----------------------------------------------------------------------
class RoundProver:
    """Builds and signs one holder's training proof per outer round from its counters and commitments."""

    def __init__(self, identity: Identity, layer_start: int, layer_end: int, has_embedding: bool,
                 has_lm_head: bool, tokens_per_batch: int, backend: str = "auto"):
        self.identity, self.backend = identity, backend
        self.layer_start, self.layer_end = layer_start, layer_end
        self.has_embedding, self.has_lm_head = has_embedding, has_lm_head
        self.tokens_per_batch = tokens_per_batch
        self._start: tuple[str, int, int, int | None] | None = None  # theta0 digest, counter, position, shard
        self._delta = ""

    @classmethod
    def for_holder(cls, holder, tokens_per_batch: int, backend: str = "auto") -> RoundProver:
        """A prover for a :class:`neuroray.swarm.holder.StageHolder` (uses its identity and spec)."""
        spec = holder.spec
        lo, hi = spec.ranges[spec.stage]
        return cls(holder.identity, lo, hi, spec.is_first, spec.is_last, tokens_per_batch, backend)

    def registration(self, max_batches_per_s: float = 0.0) -> NodeRecord:
        """What the orchestrator registers with the ledger for this holder."""
        return NodeRecord(self.identity.node_id, self.identity.public_key, self.layer_start, self.layer_end,
                          self.has_embedding, self.has_lm_head, max_batches_per_s)

    def start_round(self, theta0, microbatches_done: int, data_position: int = 0, shard_id: int | None = None) -> None:
        """Call when a round starts: theta0 it starts from (a tensor, its digest or a future of it, resolved
        when the proof is signed), the holder's microbatch counter, and for the Driver its stream position and
        current shard id."""
        self._start = (_commitment(theta0), microbatches_done, data_position, shard_id)
        self._delta = ""

    def set_data_start(self, data_position: int, shard_id: int | None) -> None:
        """Driver under swarm routing: the round's committed microbatches start here in the shared ring."""
        assert self._start is not None, "set_data_start needs start_round first"
        self._start = (*self._start[:2], data_position, shard_id)

    def note_pseudo_gradient(self, delta) -> None:
        """Call with the delta handed to the outer step (a tensor, its digest or a future of it)."""
        self._delta = _commitment(delta)

    def finish_round(self, outer_round: int, theta0_after, microbatches_done: int,
                     theta0_losses: Iterable[float] = (), timestamp_ms: int | None = None) -> bytes:
        """The signed proof (wire bytes) of the round that just ended.

        ``theta0_losses`` (Driver only): the losses of the round's first inner-step microbatches,
        which were computed at theta0 and are what spot checks recompute.
        """
        if self._start is None or not self._delta:
            raise RuntimeError("finish_round needs start_round and note_pseudo_gradient first in this round")
        before, mb0, position, shard = self._start
        batches = microbatches_done - mb0
        assert batches >= 0, "the microbatch counter went backwards"
        proof = Proof(
            node_id=self.identity.node_id, proof_type="training",
            timestamp_ms=now_ms() if timestamp_ms is None else timestamp_ms, nonce=new_nonce(),
            outer_round=outer_round, tokens_processed=batches * self.tokens_per_batch, training_batches=batches,
            layers_held=self.layer_end - self.layer_start, layer_start=self.layer_start,
            has_embedding=self.has_embedding, has_lm_head=self.has_lm_head,
            shard_id=shard if self.has_embedding else None, data_position=position if self.has_embedding else 0,
            theta0_before=_resolved(before), theta0_after=_resolved(theta0_after),
            pseudo_gradient=_resolved(self._delta),
            theta0_losses=tuple(loss_to_micro(x) for x in theta0_losses)[:min(batches, MAX_LOSSES)]
            if self.has_embedding else (),
        )
        self._start = None
        return proof.sign(self.identity, self.backend).to_bytes()


# ----- spot checks ----------------------------------------------------------------------------
def make_recompute(root: str | Path, manifest, seq_len: int, microbatch_size: int,
                   loss_fn: Callable[[object, object], float], ring_start: int | None = None
                   ) -> Callable[[Proof, int], float]:
    """A ``recompute(proof, position)`` for :func:`spot_check` that reads a Driver's own data.

    It rebuilds the Driver's deterministic token stream (``shard_for(node_id)``), checks that the
    round's first batch really comes from the shard the proof names, and returns
    ``loss_fn(inputs, labels)``. ``loss_fn`` must evaluate the model at the proof's theta0_before.
    ``ring_start``: a swarm-routing run, whose Drivers all read one ring starting at this shard.
    """
    from neuroray.genesis import TokenStream

    def recompute(proof: Proof, position: int) -> float:
        stream = TokenStream(root, manifest, proof.node_id, seq_len, microbatch_size, prefetch=False,
                             _start=ring_start)
        stream.seek(proof.data_position)
        if stream.shard_id != proof.shard_id:
            raise DataMismatch(f"position {proof.data_position} of node {proof.node_id[:12]}… is in shard "
                               f"{stream.shard_id}, the proof names {proof.shard_id}", stream.shard_id)
        stream.seek(position)
        inputs, labels = stream.next_microbatch()
        return float(loss_fn(inputs, labels))

    return recompute


def spot_checks(proofs, recompute, cfg: PonwConfig, rng=None, rate=None) -> list[tuple[Proof, SpotCheck]]:
    """Spot-check a sample (``rate``, default ``cfg.spot_check_rate``) of these Driver training proofs:
    every check made, passed or failed, with its proof (a validator is paid per recomputed batch)."""
    rng = rng or random.SystemRandom()
    rate = cfg.spot_check_rate if rate is None else rate
    checks = []
    for data in proofs:
        proof = SignedProof.from_bytes(data, cfg.max_proof_bytes).proof
        if not (proof.proof_type == "training" and proof.has_embedding) or rng.random() >= rate:
            continue
        check = spot_check(proof, recompute, cfg.spot_check_tolerance, rng)
        if check is not None:
            checks.append((proof, check))
    return checks


def _failed_checks(proofs, recompute, cfg: PonwConfig, rng, rate) -> list[tuple[Proof, SpotCheck]]:
    return [(proof, check) for proof, check in spot_checks(proofs, recompute, cfg, rng, rate) if not check.ok]


def validation_proof(identity: Identity, record: NodeRecord, outer_round: int, batches: int, tokens_per_batch: int,
                     backend: str = "auto") -> bytes:
    """A validator's signed proof that it recomputed ``batches`` microbatches of round ``outer_round``:
    the ledger pays ``ponw.validation_fee_per_batch`` for each, against the coordinator's receipt."""
    proof = Proof(node_id=identity.node_id, proof_type="validation", timestamp_ms=now_ms(), nonce=new_nonce(),
                  outer_round=outer_round, tokens_processed=batches * tokens_per_batch, training_batches=batches,
                  layers_held=record.layers_held, layer_start=record.layer_start,
                  has_embedding=record.has_embedding, has_lm_head=record.has_lm_head, shard_id=None,
                  data_position=0, theta0_before="", theta0_after="", pseudo_gradient="")
    return proof.sign(identity, backend).to_bytes()


def audit_round(proofs: Iterable[bytes], recompute: Callable[[Proof, int], float], cfg: PonwConfig,
                rng: random.Random | None = None, rate: float | None = None) -> list[tuple[str, SpotCheck]]:
    """Spot-check a sample (``cfg.spot_check_rate``) of a round's Driver proofs; return the failures
    as ``(proof_id, check)``. :func:`audit_evidence` turns them into evidence the ledger accepts."""
    return [(proof.proof_id, check) for proof, check in _failed_checks(proofs, recompute, cfg, rng, rate)]


def audit_evidence(proofs: Iterable[bytes], recompute: Callable[[Proof, int], float], cfg: PonwConfig,
                   validator: Identity | Coordinator, rng: random.Random | None = None,
                   rate: float | None = None) -> list[bytes]:
    """:func:`audit_round`, each failure signed as evidence by ``validator`` (the coordinator, or a node
    the coordinator registered as a validator). Pass each to :meth:`LedgerService.invalidate`, which
    re-verifies it, takes the reward back and slashes the node."""
    signer = validator.identity if isinstance(validator, Coordinator) else validator
    return [sign_evidence(signer, proof, check, cfg.backend)
            for proof, check in _failed_checks(proofs, recompute, cfg, rng, rate)]


def coordinator_key_path(cfg: PonwConfig, key_dir: str | Path) -> Path:
    """``ponw.coordinator_key``, or ``<key_dir>/coordinator.pem`` (the driver's persistent key)."""
    return Path(cfg.coordinator_key or Path(key_dir) / COORDINATOR_KEY_FILE).expanduser()


def load_coordinator(cfg: PonwConfig, key_dir: str | Path) -> Coordinator:
    """The driver's coordinator key (created on first use, mode 0600); it signs receipts and registrations."""
    return Coordinator.load_or_create(coordinator_key_path(cfg, key_dir), cfg.backend)


# ----- the ledger service ---------------------------------------------------------------------
def ledger_path(cfg: PonwConfig, run_dir: str | Path) -> Path:
    """``ponw.ledger_path`` or ``<run_dir>/ledger.sqlite``."""
    return Path(cfg.ledger_path).expanduser() if cfg.ledger_path else Path(run_dir) / LEDGER_FILE


class LedgerService:
    """The ledger behind a small, Ray-friendly API: plain values in and out (bytes, dicts, lists)."""

    def __init__(self, path: str | Path, cfg: PonwConfig, model_layers: int, tokens_per_batch: int,
                 clock: Callable[[], float] = time.time, coordinator_public_key: bytes | None = None):
        self.cfg = cfg
        self.ledger = Ledger(path, cfg, model_layers=model_layers, tokens_per_batch=tokens_per_batch, clock=clock,
                             coordinator_key=coordinator_public_key)

    def info(self) -> dict:
        """Which ledger this is (path, the model facts it was created for, its coordinator)."""
        led = self.ledger
        return {"path": str(led.path.resolve()), "model_layers": led.model_layers,
                "tokens_per_batch": led.tokens_per_batch, "backend": led.backend.name,
                "coordinator": led.authority.node_id if led.authority else ""}

    # Every write below is authorized by a signature the ledger checks, never by who calls: any member
    # of the Ray cluster can reach this actor. The WAL is folded into the main file after every write:
    # the run ends with ``ray.kill`` of this actor, and the .sqlite must hold every round on its own.
    def register(self, signed: bytes) -> int:
        """A registration signed by the coordinator (:meth:`Coordinator.sign_registration`)."""
        count = self.ledger.register(signed)
        self.ledger.checkpoint()
        return count

    def grow_model(self, signed: bytes) -> int:
        """A live upgrade: a coordinator-signed registration naming the grown ``model_layers``."""
        count = self.ledger.grow_model(signed)
        self.ledger.checkpoint()
        return count

    def submit_round(self, items: Iterable[tuple[bytes, bytes | None]]) -> list[dict]:
        """Verify and credit a round's proofs, each with its coordinator-signed receipt, in one transaction."""
        outcomes = [o.to_dict() for o in self.ledger.submit_many(items)]
        self.ledger.checkpoint()
        return outcomes

    def submit(self, data: bytes, receipt: bytes | None = None) -> dict:
        return self.ledger.submit(data, receipt).to_dict()

    def invalidate(self, evidence: bytes) -> dict:
        """Evidence signed by a registered validator (:func:`audit_evidence`); re-verified by the ledger."""
        outcome = self.ledger.invalidate(evidence).to_dict()
        self.ledger.checkpoint()
        return outcome

    def settle_escrow(self, signed: bytes) -> dict:
        """Release or forfeit escrowed rewards on the coordinator's signed settlement (neuroray/ponw/escrow.py)."""
        done = self.ledger.settle_escrow(signed)
        self.ledger.checkpoint()
        return done

    def escrowed(self) -> list[dict]:
        return self.ledger.escrowed()

    def balances(self) -> dict[str, dict]:
        """``{node_id: {"balance": micro-NEURO, "stake": micro-NEURO}}``."""
        return {a.node_id: {"balance": a.balance, "stake": a.stake} for a in self.ledger.accounts()}

    def summary(self) -> dict:
        """Flat numbers for progress lines and metrics (NEURO as floats: display only)."""
        s = self.ledger.supply()
        counts = self.ledger.counts()
        return {"supply_neuro": s.total / UNIT, "minted_neuro": s.minted / UNIT, "burned_neuro": s.burned / UNIT,
                "supply_consistent": s.consistent, "proofs_credited": counts.get("credited", 0),
                "validations_credited": self.ledger.credited_by_type().get("validation", 0),
                "proofs_rejected": counts.get("rejected", 0), "proofs_invalidated": counts.get("invalidated", 0),
                "balances_neuro": {a.node_id: (a.balance + a.stake) / UNIT for a in self.ledger.accounts()}}

    def history(self, node_id: str | None = None, limit: int = 50) -> list[dict]:
        return self.ledger.history(node_id, limit)

    def close(self) -> None:
        self.ledger.close()


def start_ledger_actor(cfg: PonwConfig, path: str | Path, model_layers: int, tokens_per_batch: int,
                       coordinator_public_key: bytes):
    """Start (or reuse) the named ledger actor on this (the driver's) node; returns its handle.

    ``coordinator_public_key`` (``Coordinator.public_key``) is the only key whose receipts and
    registrations the ledger accepts; it is stored in a new ledger file and must match on reopen.

    One actor, one thread: every ledger write is serialized through it. It needs no CPU reservation
    (``num_cpus=0``) so it always fits beside the holders.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(LedgerService).options(
        name=cfg.actor_name, get_if_exists=True, num_cpus=0, max_concurrency=1, scheduling_strategy=here)
    handle = actor.remote(str(path), cfg, model_layers, tokens_per_batch, coordinator_public_key=coordinator_public_key)
    try:
        info = ray.get(handle.info.remote())
    except ray.exceptions.RayActorError as exc:  # the constructor raised (bad path, other model...)
        cause = getattr(exc, "cause", None) or exc
        raise LedgerError(f"the ledger actor could not start: {str(cause).strip().splitlines()[-1]}") from None
    want = str(Path(path).expanduser().resolve())
    from neuroray.ponw.identity import node_id_of

    mine = (want, model_layers, tokens_per_batch, node_id_of(coordinator_public_key))
    if (info["path"], info["model_layers"], info["tokens_per_batch"], info["coordinator"]) != mine:
        # get_if_exists handed back an actor another run started under the same name
        raise LedgerError(f"a ledger actor named {cfg.actor_name!r} already runs on {info['path']}; "
                          "set ponw.actor_name to a name of its own for this run")
    return handle
