"""Verifying a Proof of Neural Work, cheapest check first.

1. size and schema (:meth:`SignedProof.from_bytes`: size, strict JSON, exact fields, canonical bytes);
2. timestamp within ``±timestamp_window`` of the ledger's clock (the edges pass);
3. replay: the proof id (hash of the signed payload) or ``(node_id, nonce)`` was seen before. The
   key never involves the signature bytes, so a re-signed copy or a high-S twin is still a replay;
4. rate limit: the node already has ``rate_limit_per_hour`` proofs in the last hour. Counted over
   proofs that passed the signature check, so forged proofs under a victim's id cannot use it up;
5. the node is registered, and the signature (low-S, over the payload digest) is its key's;
6. plausibility, against the planner's registration, the model and the orchestrator's receipt.

Checks 1-5 cannot be pinned on a node (anyone can send bytes naming any node): they reject without
consequence. A failed check 6 (or a failed spot check) is a *signed false claim*: it is slashed.

The ledger supplies the state for 3-5 through :class:`ProofState`; everything here is pure.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields
from typing import Callable, Protocol

from neuroray.errors import NeurorayError
from neuroray.ponw.crypto import Backend
from neuroray.ponw.identity import node_id_of
from neuroray.ponw.proof import PROOF_TYPES, Proof, ProofError, SignedProof
from neuroray.ponw.rules import Rules

HOUR_MS = 3_600_000


class RegistrationError(NeurorayError, ValueError):
    """A node registration or receipt that contradicts itself or the model."""


@dataclass(frozen=True)
class NodeRecord:
    """What the planner assigned a node: its key, layer range and roles. Registered by the orchestrator."""

    node_id: str
    public_key: bytes
    layer_start: int
    layer_end: int  # exclusive
    has_embedding: bool
    has_lm_head: bool
    max_batches_per_s: float = 0.0  # measured physical bound; 0: the config's default

    @property
    def layers_held(self) -> int:
        return self.layer_end - self.layer_start

    def check(self, model_layers: int) -> None:
        if node_id_of(self.public_key) != self.node_id:
            raise RegistrationError(f"node {self.node_id[:12]}…: node_id is not sha256 of its public key")
        if not 0 <= self.layer_start < self.layer_end <= model_layers:
            raise RegistrationError(f"node {self.node_id[:12]}…: layers [{self.layer_start}, {self.layer_end}) "
                                    f"are not a non-empty range of the model's {model_layers} layers")
        if self.has_embedding and self.layer_start != 0:
            raise RegistrationError(f"node {self.node_id[:12]}…: only a stage-0 holder (layer 0) has the embedding")
        if self.has_lm_head and self.layer_end != model_layers:
            raise RegistrationError(f"node {self.node_id[:12]}…: only the last stage holder has the LM head")
        if not (math.isfinite(self.max_batches_per_s) and self.max_batches_per_s >= 0):
            raise RegistrationError(f"node {self.node_id[:12]}…: max_batches_per_s must be finite and >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["public_key"] = self.public_key.hex()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NodeRecord:
        """From :meth:`to_dict` output (public key as hex) or a dict with the key as bytes."""
        try:
            d = dict(d)
            if isinstance(d.get("public_key"), str):
                d["public_key"] = bytes.fromhex(d["public_key"])
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise RegistrationError(f"bad node registration ({exc})") from None


@dataclass(frozen=True)
class Receipt:
    """What the swarm observed a node do in one round, from the orchestrator (trusted, unsigned).

    ``batches``: microbatches routed through the node; ``tokens``: inference tokens served.
    The optional fields, when set, must match the proof exactly (digests, data position) or feed the
    free-rider rule (pseudo-gradient norm against the range's median; ``aggregated`` is False when the
    robust aggregator dropped this node's delta). ``reward_bp``: the coordinator's reward factor for the
    node (its reputation, neuroray/ponw/reputation.py) in basis points, 0..10000; the ledger multiplies it
    into the reward. ``escrow``: the ledger holds the reward instead of crediting it, until a settlement
    from the coordinator releases or forfeits it (neuroray/ponw/escrow.py).
    """

    node_id: str
    outer_round: int
    proof_type: str = "training"
    batches: int = 0
    tokens: int = 0
    pseudo_gradient: str = ""
    pseudo_gradient_norm: float | None = None
    range_median_norm: float | None = None
    aggregated: bool = True
    data_position: int | None = None
    theta0_before: str = ""
    theta0_after: str = ""
    reward_bp: int = 10_000
    escrow: bool = False

    def __post_init__(self):
        if self.proof_type not in PROOF_TYPES:
            raise RegistrationError(f"receipt proof_type {self.proof_type!r} is not one of {PROOF_TYPES}")
        if not (isinstance(self.node_id, str) and isinstance(self.aggregated, bool) and isinstance(self.escrow, bool)):
            raise RegistrationError("receipt node_id must be a string, aggregated and escrow bools")
        for name in ("outer_round", "batches", "tokens", "data_position"):
            value = getattr(self, name)
            if not (value is None and name == "data_position") and (type(value) is not int or value < 0):
                raise RegistrationError(f"receipt {name}={value!r} must be an integer >= 0")
        if type(self.reward_bp) is not int or not 0 <= self.reward_bp <= 10_000:
            raise RegistrationError(f"receipt reward_bp={self.reward_bp!r} must be an integer in [0, 10000]")
        for name in ("pseudo_gradient_norm", "range_median_norm"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise RegistrationError(f"receipt {name}={value!r} must be finite and >= 0")
        for name in ("pseudo_gradient", "theta0_before", "theta0_after"):
            if not isinstance(getattr(self, name), str):
                raise RegistrationError(f"receipt {name} must be a hex digest string or empty")

    @classmethod
    def coerce(cls, r) -> Receipt | None:
        """A Receipt from a Receipt, a dict (e.g. after crossing Ray) or None."""
        if r is None or isinstance(r, Receipt):
            return r
        if not isinstance(r, dict):
            raise RegistrationError(f"a receipt is a Receipt or a dict, got {type(r).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(r) - names
        if unknown:
            raise RegistrationError(f"receipt has unknown keys {sorted(unknown)}")
        try:
            return cls(**r)
        except TypeError as exc:  # a required key is missing
            raise RegistrationError(f"receipt is incomplete ({exc})") from None


@dataclass
class Verdict:
    """The outcome of verifying one proof. ``reason`` is ``"ok"`` or the name of the failed check."""

    accepted: bool
    reason: str
    detail: str = ""
    signed: SignedProof | None = None
    authentic: bool = False  # the signature checked out: the ledger records it (replay, rate limit)
    slash: bool = False  # a signed false claim
    useful: bool = True  # False: accepted but earns nothing (free-rider, delta dropped by the aggregator)
    reward_bp: int = 10_000  # the receipt's reward factor (reputation) in basis points
    facts: NodeFacts | None = None  # the ledger's view of the node, for booking

    @property
    def proof(self) -> Proof | None:
        return None if self.signed is None else self.signed.proof


@dataclass(frozen=True)
class NodeFacts:
    """What the ledger knows about a node when one of its proofs arrives (one query, see ledger.py)."""

    seen: bool  # this proof id, or this (node_id, nonce), was already submitted
    recent: int  # authentic proofs from the node in the last hour
    round_taken: bool  # the node was already credited for this proof type and round
    last_credit_ms: int  # its last credit, or its registration
    balance: int
    stake: int
    earned_today: int


class ProofState(Protocol):
    """What the verifier needs to know from the ledger."""

    def node(self, node_id: str) -> tuple[NodeRecord, object] | None: ...  # record, parsed key
    def facts(self, proof: Proof, now_ms: int) -> NodeFacts: ...  # only asked for registered nodes


def _reject(reason: str, detail: str, signed=None, authentic=False, slash=False) -> Verdict:
    return Verdict(False, reason, detail, signed, authentic, slash)


class Verifier:
    def __init__(self, rules: Rules, backend: Backend, model_layers: int, tokens_per_batch: int):
        self.rules, self.backend = rules, backend
        self.model_layers, self.tokens_per_batch = model_layers, tokens_per_batch

    def verify(self, data: bytes, state: ProofState, now_ms: int, receipt: Receipt | None = None) -> Verdict:
        """Run checks 1-6 in order; the first failure decides."""
        r = self.rules
        try:  # 1. size and schema
            signed = SignedProof.from_bytes(data, r.max_proof_bytes)
        except ProofError as exc:
            return _reject(exc.code, str(exc))
        p = signed.proof
        skew = p.timestamp_ms - now_ms  # 2. timestamp
        if abs(skew) > r.timestamp_window_ms:
            return _reject("timestamp", f"timestamp is {skew / 1000:+.3f}s from the ledger's clock; "
                                        f"the window is ±{r.timestamp_window_ms / 1000:g}s", signed)
        entry = state.node(p.node_id)
        # an unregistered node has no proofs to replay and none in its rate window: 3 and 4 pass trivially
        facts = state.facts(p, now_ms) if entry is not None else None
        if facts is not None and facts.seen:  # 3. replay
            return _reject("replay", f"proof {p.proof_id[:12]}… (or nonce {p.nonce}) was already submitted", signed)
        if facts is not None and facts.recent >= r.rate_limit_per_hour:  # 4. rate limit
            return _reject("rate_limit", f"node {p.node_id[:12]}… already sent {facts.recent} proofs in the last "
                                         f"hour (limit {r.rate_limit_per_hour})", signed)
        if entry is None:  # 5. known node, valid signature
            return _reject("unknown_node", f"node {p.node_id[:12]}… is not registered with this ledger", signed)
        node, key = entry
        if not self.backend.verify(key, p.digest(), signed.signature):
            return _reject("signature", f"signature does not verify under node {p.node_id[:12]}…'s key "
                                        "(or is high-S)", signed)
        if facts.round_taken:  # one credit per node, proof type and round
            return _reject("duplicate_round", f"node {p.node_id[:12]}… was already credited for its "
                                              f"{p.proof_type} work of round {p.outer_round}", signed, True)
        verdict = self.plausibility(signed, node, receipt, now_ms - facts.last_credit_ms)
        verdict.facts = facts
        return verdict

    # ----- 6. plausibility ------------------------------------------------------------------
    def plausibility(self, signed: SignedProof, node: NodeRecord, receipt: Receipt | None, elapsed_ms: int) -> Verdict:
        p = signed.proof

        def lie(detail: str) -> Verdict:
            return _reject("implausible", detail, signed, authentic=True, slash=True)

        if p.layers_held > self.model_layers:
            return lie(f"layers_held {p.layers_held} > the model's {self.model_layers} layers")
        if (p.layer_start, p.layers_held) != (node.layer_start, node.layers_held):
            return lie(f"claims layers [{p.layer_start}, {p.layer_start + p.layers_held}) but the planner "
                       f"gave it [{node.layer_start}, {node.layer_end})")
        if p.has_embedding != node.has_embedding or p.has_lm_head != node.has_lm_head:
            return lie("has_embedding/has_lm_head differ from the node's stage (only stage 0 has the embedding)")
        if p.proof_type in ("training", "validation") and p.tokens_processed != p.training_batches * self.tokens_per_batch:
            return lie(f"tokens_processed {p.tokens_processed} != training_batches {p.training_batches} x "
                       f"{self.tokens_per_batch} tokens per batch")
        if p.proof_type == "training":
            if not (p.theta0_before and p.theta0_after and p.pseudo_gradient):
                return lie("a training proof must commit to theta0 before/after and its pseudo-gradient")
            if p.has_embedding:
                if p.shard_id is None:
                    return lie("a Driver's training proof must name its shard")
                if p.training_batches and not 1 <= len(p.theta0_losses) <= p.training_batches:
                    return lie(f"a Driver must commit 1..{p.training_batches} theta0 losses for spot checks")
            elif p.shard_id is not None or p.data_position or p.theta0_losses:
                return lie("only the Driver (stage 0) reads data: shard_id, data_position and losses must be empty")
        # the physical bound: no node processes batches faster than its measured throughput
        max_rate = node.max_batches_per_s or self.rules.max_batches_per_s
        bound = max_rate * (max(elapsed_ms, 0) / 1000 + 1.0)
        if p.training_batches > bound:
            return lie(f"{p.training_batches} batches in {elapsed_ms / 1000:.1f}s exceeds the physical bound "
                       f"of {max_rate:g} batches/s")
        if receipt is None:
            if self.rules.require_receipts:
                return _reject("unobserved", "no receipt: the swarm did not observe this work", signed, True)
            return Verdict(True, "ok", "", signed, True)
        return self._against_receipt(signed, receipt, lie)

    def _against_receipt(self, signed: SignedProof, rc: Receipt, lie) -> Verdict:
        p = signed.proof
        if (rc.node_id, rc.outer_round, rc.proof_type) != (p.node_id, p.outer_round, p.proof_type):
            return _reject("receipt_mismatch", f"the receipt is for node {rc.node_id[:12]}… {rc.proof_type} round "
                                               f"{rc.outer_round}, not this proof", signed, True)
        if p.training_batches > rc.batches:
            return lie(f"claims {p.training_batches} batches, the swarm saw {rc.batches}")
        if p.proof_type == "inference" and p.tokens_processed > rc.tokens:
            return lie(f"claims {p.tokens_processed} inference tokens, the swarm saw {rc.tokens}")
        for name in ("pseudo_gradient", "theta0_before", "theta0_after"):
            if getattr(rc, name) and getattr(rc, name) != getattr(p, name):
                return lie(f"{name} commitment differs from what the orchestrator received")
        if rc.data_position is not None and p.has_embedding and rc.data_position != p.data_position:
            return lie(f"data_position {p.data_position} != {rc.data_position} observed")
        verdict = Verdict(True, "ok", "", signed, True, reward_bp=rc.reward_bp)
        if p.proof_type == "training":
            if not rc.aggregated:
                verdict.useful, verdict.detail = False, "its pseudo-gradient was dropped by the robust aggregator"
            elif rc.pseudo_gradient_norm is not None:
                median = rc.range_median_norm or 0.0
                floor = median * self.rules.free_rider_bp / 10_000
                if rc.pseudo_gradient_norm == 0 or rc.pseudo_gradient_norm < floor:
                    verdict.useful = False
                    verdict.detail = (f"free-rider: pseudo-gradient norm {rc.pseudo_gradient_norm:.3g} < "
                                      f"{floor:.3g} ({self.rules.free_rider_bp / 100:g}% of the range median)")
        return verdict


# ----- 7. spot checks -----------------------------------------------------------------------
class DataMismatch(Exception):
    """Raised by a recompute callable when the proof's data claims cannot be true (wrong shard).

    ``shard``: the shard the position really lies in (evidence carries it to the ledger)."""

    def __init__(self, message: str, shard: int | None = None):
        super().__init__(message)
        self.shard = shard


@dataclass(frozen=True)
class SpotCheck:
    ok: bool
    position: int  # stream position of the recomputed microbatch
    claimed: float  # nats, from the proof
    recomputed: float  # nan when the position is not in the claimed shard
    recomputed_shard: int | None = None  # where the position really lies, on a data mismatch

    @property
    def detail(self) -> str:
        return (f"batch at position {self.position}: claimed loss {self.claimed:.6f}, "
                f"recomputed {self.recomputed:.6f}")


def spot_check(proof: Proof, recompute: Callable[[Proof, int], float], tolerance: float,
               rng: random.Random | None = None) -> SpotCheck | None:
    """Recompute one sampled committed batch of a Driver's training proof and compare its loss.

    ``recompute(proof, position)`` must return the loss, at the proof's ``theta0_before``, of the
    microbatch at ``position`` of the stream of ``proof.node_id`` (the deterministic shard assignment
    gives every validator the same tokens). The sample is drawn from ``rng`` (system randomness by
    default) so a prover cannot tell in advance which batch will be checked. Returns None when the
    proof commits to no batch (not a Driver training proof).
    """
    if proof.proof_type != "training" or not proof.has_embedding or not proof.theta0_losses:
        return None
    rng = rng or random.SystemRandom()
    j = rng.randrange(len(proof.theta0_losses))
    claimed = proof.theta0_losses[j] / 1_000_000
    position = proof.data_position + j
    try:
        recomputed = float(recompute(proof, position))
    except DataMismatch as exc:  # e.g. the claimed shard is not where that position lies: a false claim
        return SpotCheck(False, position, claimed, float("nan"), exc.shard)
    ok = math.isfinite(recomputed) and abs(claimed - recomputed) <= tolerance * max(1.0, abs(recomputed))
    return SpotCheck(ok, position, claimed, recomputed)
