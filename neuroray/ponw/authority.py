"""Authority from keys, not from callers: coordinator-signed receipts and registrations, validator evidence.

Any member of a Ray cluster can call the ledger actor, so the ledger trusts no caller. It trusts keys:

- the **coordinator** (the driver; its key is stored in the ledger file when the ledger is created)
  signs every receipt (what the swarm saw a holder do) and every registration (which holder keys may
  submit proofs, which nodes may act as validators, and model growth);
- **holders** sign proofs (proof.py);
- **validators** (the coordinator, or nodes the coordinator registered as validators) sign evidence
  that a credited proof is false. The ledger re-verifies the evidence against the stored proof before
  it takes anything back.

Signed fields carry no floats: norms travel as the shortest round-trip decimal text of the float
(``repr``), which a reader checks is exactly that, so each value has one byte form.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from neuroray.errors import NeurorayError
from neuroray.ponw.envelope import EnvelopeError, open_envelope, seal
from neuroray.ponw.identity import Identity, node_id_of
from neuroray.ponw.proof import MAX_INT, PROOF_TYPES, Proof, loss_to_micro, new_nonce
from neuroray.ponw.verifier import NodeRecord, Receipt, RegistrationError, SpotCheck

RECEIPT_DOMAIN = b"NEURORAY-RECEIPT-v1\n"
REGISTRATION_DOMAIN = b"NEURORAY-REGISTER-v1\n"
EVIDENCE_DOMAIN = b"NEURORAY-EVIDENCE-v1\n"
MAX_RECEIPT_BYTES = 4096
MAX_EVIDENCE_BYTES = 4096
MAX_REGISTRATION_BYTES = 1 << 20  # ~4000 nodes per signed registration
VERSION = 1
COORDINATOR_KEY_FILE = "coordinator.pem"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX66 = re.compile(r"0[23][0-9a-f]{64}")


class AuthorityError(NeurorayError, ValueError):
    """A receipt, registration or evidence record that is malformed or not signed by a key with authority.

    ``code`` is the outcome reason the ledger reports (receipt, receipt_signature, registration, evidence,
    signature, unknown_validator...)."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


# ----- value encodings --------------------------------------------------------------------------
def norm_text(value: float | None) -> str | None:
    """A non-negative finite float as its shortest round-trip decimal text (signed fields hold no floats)."""
    if value is None:
        return None
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise RegistrationError(f"norm {value!r} must be finite and >= 0")
    return repr(value)


def _norm(name: str, text, code: str) -> float | None:
    if text is None:
        return None
    try:
        value = float(text) if type(text) is str else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0 and repr(value) == text):
        raise AuthorityError(code, f"{name} {text!r} must be the repr() text of a finite float >= 0")
    return value


def _uint(name: str, value, code: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise AuthorityError(code, f"{name} must be an integer in [0, 2^53), got {value!r}")


def _hex(name: str, value, pattern: re.Pattern, code: str, empty: bool = False) -> None:
    if not ((empty and value == "") or (type(value) is str and pattern.fullmatch(value))):
        raise AuthorityError(code, f"{name} must be {'empty or ' if empty else ''}lowercase hex "
                                   f"({pattern.pattern}), got {value!r}")


def _keys(payload: dict, want: set[str], code: str, what: str) -> None:
    if payload.keys() != want or payload.get("v") != VERSION or type(payload.get("v")) is not int:
        missing, extra = sorted(want - payload.keys()), sorted(payload.keys() - want)
        raise AuthorityError(code, f"{what} v{VERSION} fields wrong: missing {missing}, unexpected {extra}")


def _open(data, domain: bytes, max_bytes: int, what: str, code: str) -> tuple[dict, bytes, bytes]:
    try:
        return open_envelope(data, domain, max_bytes, what)
    except EnvelopeError as exc:
        raise AuthorityError(code, str(exc)) from None


# ----- receipts ---------------------------------------------------------------------------------
_RECEIPT_KEYS = {"v", "node_id", "outer_round", "proof_type", "batches", "tokens", "pseudo_gradient",
                 "pseudo_gradient_norm", "range_median_norm", "aggregated", "data_position", "theta0_before",
                 "theta0_after", "reward_bp", "escrow"}


def receipt_payload(r: Receipt) -> dict:
    return {"v": VERSION, "node_id": r.node_id, "outer_round": r.outer_round, "proof_type": r.proof_type,
            "batches": r.batches, "tokens": r.tokens, "pseudo_gradient": r.pseudo_gradient,
            "pseudo_gradient_norm": norm_text(r.pseudo_gradient_norm),
            "range_median_norm": norm_text(r.range_median_norm), "aggregated": r.aggregated,
            "data_position": r.data_position, "theta0_before": r.theta0_before, "theta0_after": r.theta0_after,
            "reward_bp": r.reward_bp, "escrow": r.escrow}


def receipt_from_payload(p: dict) -> Receipt:
    code = "receipt"
    _keys(p, _RECEIPT_KEYS, code, "receipt")
    _hex("receipt node_id", p["node_id"], _HEX64, code)
    if p["proof_type"] not in PROOF_TYPES or type(p["proof_type"]) is not str:
        raise AuthorityError(code, f"receipt proof_type must be one of {PROOF_TYPES}, got {p['proof_type']!r}")
    for name in ("outer_round", "batches", "tokens"):
        _uint(f"receipt {name}", p[name], code)
    _uint("receipt data_position", p["data_position"], code, optional=True)
    for name in ("pseudo_gradient", "theta0_before", "theta0_after"):
        _hex(f"receipt {name}", p[name], _HEX64, code, empty=True)
    _uint("receipt reward_bp", p["reward_bp"], code)
    if p["reward_bp"] > 10_000:  # a factor in [0, 1]: the coordinator's reputation cannot inflate a reward
        raise AuthorityError(code, f"receipt reward_bp must be in [0, 10000], got {p['reward_bp']}")
    for name in ("aggregated", "escrow"):
        if type(p[name]) is not bool:
            raise AuthorityError(code, f"receipt {name} must be true or false, got {p[name]!r}")
    return Receipt(p["node_id"], p["outer_round"], p["proof_type"], p["batches"], p["tokens"], p["pseudo_gradient"],
                   _norm("receipt pseudo_gradient_norm", p["pseudo_gradient_norm"], code),
                   _norm("receipt range_median_norm", p["range_median_norm"], code), p["aggregated"],
                   p["data_position"], p["theta0_before"], p["theta0_after"], p["reward_bp"], p["escrow"])


# ----- registrations ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Registration:
    """An opened, coordinator-signed registration. ``auth_id``: hex sha256 of its signed message (replay key)."""

    records: tuple[NodeRecord, ...]
    validators: tuple[str, ...]
    model_layers: int | None  # None: the ledger's current count; larger: the model grew
    auth_id: str


def _record_payload(r: NodeRecord) -> dict:
    return {"node_id": r.node_id, "public_key": r.public_key.hex(), "layer_start": r.layer_start,
            "layer_end": r.layer_end, "has_embedding": r.has_embedding, "has_lm_head": r.has_lm_head,
            "max_batches_per_s": norm_text(r.max_batches_per_s)}


def _record_from_payload(d, i: int) -> NodeRecord:
    code, what = "registration", f"registration node {i}"
    if not isinstance(d, dict) or d.keys() != {"node_id", "public_key", "layer_start", "layer_end", "has_embedding",
                                               "has_lm_head", "max_batches_per_s"}:
        raise AuthorityError(code, f"{what} must be an object with exactly the NodeRecord fields")
    _hex(f"{what} node_id", d["node_id"], _HEX64, code)
    _hex(f"{what} public_key", d["public_key"], _HEX66, code)
    for name in ("layer_start", "layer_end"):
        _uint(f"{what} {name}", d[name], code)
    if type(d["has_embedding"]) is not bool or type(d["has_lm_head"]) is not bool:
        raise AuthorityError(code, f"{what} has_embedding/has_lm_head must be true or false")
    rate = _norm(f"{what} max_batches_per_s", d["max_batches_per_s"], code)
    return NodeRecord(d["node_id"], bytes.fromhex(d["public_key"]), d["layer_start"], d["layer_end"],
                      d["has_embedding"], d["has_lm_head"], rate)


# ----- evidence ---------------------------------------------------------------------------------
_EVIDENCE_KEYS = {"v", "kind", "proof_id", "node_id", "validator", "position", "claimed", "recomputed",
                  "recomputed_shard"}


@dataclass(frozen=True)
class Evidence:
    """A validator's signed record that a credited Driver proof is false (a failed spot check).

    ``claimed``/``recomputed``: losses in micro-nats at stream ``position``; ``recomputed`` is None when
    the position's batch is not in the shard the proof names (``recomputed_shard`` says where it is).
    """

    proof_id: str
    node_id: str  # the accused
    validator: str  # the signer's node id
    position: int
    claimed: int
    recomputed: int | None
    recomputed_shard: int | None
    evidence_id: str = ""  # hex sha256 of the signed message (replay key); set when opened
    kind: str = "spot_check"

    def payload(self) -> dict:
        return {"v": VERSION, "kind": self.kind, "proof_id": self.proof_id, "node_id": self.node_id,
                "validator": self.validator, "position": self.position, "claimed": self.claimed,
                "recomputed": self.recomputed, "recomputed_shard": self.recomputed_shard}

    @property
    def reason(self) -> str:
        if self.recomputed is None:
            return (f"spot check by {self.validator[:12]}…: position {self.position} lies in shard "
                    f"{self.recomputed_shard}, not the shard the proof names")
        return (f"spot check by {self.validator[:12]}…: batch at position {self.position}: claimed loss "
                f"{self.claimed / 1e6:.6f}, recomputed {self.recomputed / 1e6:.6f}")


def sign_evidence(validator: Identity, proof: Proof, check: SpotCheck, backend: str = "auto") -> bytes:
    """Evidence of a failed :func:`verifier.spot_check` of ``proof``, signed by ``validator``."""
    if check.ok:
        raise ValueError("a spot check that passed is no evidence against a proof")
    recomputed = None if not math.isfinite(check.recomputed) else loss_to_micro(check.recomputed)
    ev = Evidence(proof.proof_id, proof.node_id, validator.node_id, check.position,
                  proof.theta0_losses[check.position - proof.data_position], recomputed, check.recomputed_shard)
    return seal(EVIDENCE_DOMAIN, ev.payload(), validator, backend)


def open_evidence(data) -> tuple[Evidence, bytes, bytes]:
    """Parse evidence: ``(evidence, signature, digest)``; the caller checks the signature under the
    validator's key. Raises AuthorityError('evidence')."""
    code = "evidence"
    p, sig, digest = _open(data, EVIDENCE_DOMAIN, MAX_EVIDENCE_BYTES, "evidence", code)
    if p.get("kind") == "hop_recheck":
        return _open_hop(p, digest), sig, digest
    _keys(p, _EVIDENCE_KEYS, code, "evidence")
    if p["kind"] != "spot_check":
        raise AuthorityError(code, f"evidence kind {p['kind']!r} is not spot_check")
    for name in ("proof_id", "node_id", "validator"):
        _hex(f"evidence {name}", p[name], _HEX64, code)
    _uint("evidence position", p["position"], code)
    _uint("evidence claimed", p["claimed"], code)
    _uint("evidence recomputed", p["recomputed"], code, optional=True)
    _uint("evidence recomputed_shard", p["recomputed_shard"], code, optional=True)
    if (p["recomputed"] is None) == (p["recomputed_shard"] is None):
        raise AuthorityError(code, "evidence names exactly one of recomputed (a loss) and recomputed_shard")
    ev = Evidence(p["proof_id"], p["node_id"], p["validator"], p["position"], p["claimed"], p["recomputed"],
                  p["recomputed_shard"], digest.hex())
    return ev, sig, digest


def evidence_problem(ev: Evidence, proof: Proof | None, status: str, tolerance: float) -> tuple[str, str] | None:
    """Why ``ev`` does not prove ``proof`` (as stored by the ledger, with its ``status``) false, or None.

    The ledger cannot rerun the model, so it checks everything else: the evidence is about this node's
    credited Driver proof, the position is one the proof committed, the claimed loss is the committed
    one, and the recomputed value really contradicts it under the ledger's own tolerance.
    """
    if isinstance(ev, HopEvidence):
        return hop_evidence_problem(ev, proof, status, tolerance)
    if proof is None:
        return "no_proof", f"no proof {ev.proof_id[:12]}… in this ledger"
    if ev.node_id != proof.node_id:
        return "evidence", f"evidence names node {ev.node_id[:12]}…, the proof is {proof.node_id[:12]}…'s"
    if ev.validator == proof.node_id:
        return "conflict", "a node cannot file evidence about its own proof"
    if status != "credited":
        return "not_credited", f"proof {ev.proof_id[:12]}… is {status}; only a credited proof can be invalidated"
    j = ev.position - proof.data_position
    if not (proof.proof_type == "training" and proof.has_embedding and 0 <= j < len(proof.theta0_losses)):
        return "unfounded", f"position {ev.position} is not a batch the proof committed a loss for"
    if ev.claimed != proof.theta0_losses[j]:
        return "unfounded", f"claimed loss {ev.claimed} is not the {proof.theta0_losses[j]} the proof committed"
    if ev.recomputed is None:
        if ev.recomputed_shard == proof.shard_id:
            return "unfounded", f"the proof does name shard {proof.shard_id}"
        return None
    claimed, recomputed = ev.claimed / 1e6, ev.recomputed / 1e6
    if abs(claimed - recomputed) <= tolerance * max(1.0, recomputed):
        return "unfounded", (f"recomputed loss {recomputed:.6f} agrees with the claimed {claimed:.6f} "
                             f"within the tolerance {tolerance:g}")
    return None


# ----- evidence from hop rechecks (neuroray/training/hop_audit.py) -------------------------------
_HOP_EVIDENCE_KEYS = {"v", "kind", "proof_id", "node_id", "validator", "checker", "microbatch", "direction", "sent",
                      "recomputed", "error_ppm"}
# what the accused sent: activation on, gradient back, the last range's loss; or (a Driver) the data it trained on
HOP_DIRECTIONS = ("fwd", "bwd", "loss", "data")


@dataclass(frozen=True)
class HopEvidence:
    """A validator's signed record that a holder's hop (of its round's first inner step, at theta0) is not what
    another holder of its range (``checker``) computed from the same inputs. ``sent``/``recomputed``: digests of
    both; ``error_ppm``: their relative L2 distance (the loss: relative difference) in millionths. The proof is
    the accused's proof of that round."""

    proof_id: str
    node_id: str
    validator: str
    checker: str
    microbatch: int
    direction: str
    sent: str
    recomputed: str
    error_ppm: int
    evidence_id: str = ""
    kind: str = "hop_recheck"

    def payload(self) -> dict:
        return {"v": VERSION, "kind": self.kind, "proof_id": self.proof_id, "node_id": self.node_id,
                "validator": self.validator, "checker": self.checker, "microbatch": self.microbatch,
                "direction": self.direction, "sent": self.sent, "recomputed": self.recomputed,
                "error_ppm": self.error_ppm}

    @property
    def reason(self) -> str:
        if self.direction == "data":
            return (f"data check by {self.validator[:12]}…: microbatch {self.microbatch} was not the batch at the "
                    "data position the Driver committed, in its own shards")
        return (f"hop recheck by {self.validator[:12]}…: microbatch {self.microbatch}'s {self.direction} differs from "
                f"{self.checker[:12]}…'s re-execution by {self.error_ppm / 1e6:.4g} (relative)")


def sign_hop_evidence(validator: Identity, proof: Proof, checker: str, microbatch: int, direction: str, sent: str,
                      recomputed: str, error: float, backend: str = "auto") -> bytes:
    """Evidence of a failed hop recheck of ``proof``'s node, signed by ``validator``."""
    ppm = min(int(round(error * 1e6)), MAX_INT) if math.isfinite(error) else MAX_INT
    ev = HopEvidence(proof.proof_id, proof.node_id, validator.node_id, checker, microbatch, direction, sent,
                     recomputed, ppm)
    return seal(EVIDENCE_DOMAIN, ev.payload(), validator, backend)


def _open_hop(p: dict, digest: bytes) -> HopEvidence:
    code = "evidence"
    _keys(p, _HOP_EVIDENCE_KEYS, code, "hop evidence")
    for name in ("proof_id", "node_id", "validator", "checker", "sent", "recomputed"):
        _hex(f"evidence {name}", p[name], _HEX64, code)
    _uint("evidence microbatch", p["microbatch"], code)
    _uint("evidence error_ppm", p["error_ppm"], code)
    if p["direction"] not in HOP_DIRECTIONS or type(p["direction"]) is not str:
        raise AuthorityError(code, f"evidence direction must be one of {HOP_DIRECTIONS}, got {p['direction']!r}")
    return HopEvidence(p["proof_id"], p["node_id"], p["validator"], p["checker"], p["microbatch"], p["direction"],
                       p["sent"], p["recomputed"], p["error_ppm"], digest.hex())


def hop_evidence_problem(ev: HopEvidence, proof: Proof | None, status: str, tolerance: float) -> tuple[str, str] | None:
    """Why ``ev`` does not prove ``proof``'s node sent a false hop, or None. The ledger cannot rerun the range:
    it checks that the evidence names this node's credited training proof, that neither the signer nor the
    re-executing holder is the accused, that the hop is one the node's range sends, and that the two digests
    differ by more than the ledger's own tolerance."""
    if proof is None:
        return "no_proof", f"no proof {ev.proof_id[:12]}… in this ledger"
    if ev.node_id != proof.node_id:
        return "evidence", f"evidence names node {ev.node_id[:12]}…, the proof is {proof.node_id[:12]}…'s"
    if proof.node_id in (ev.validator, ev.checker):
        return "conflict", "a node cannot file or re-execute evidence about its own work"
    if status != "credited":
        return "not_credited", f"proof {ev.proof_id[:12]}… is {status}; only a credited proof can be invalidated"
    sends = {"fwd": not proof.has_lm_head, "bwd": not proof.has_embedding, "loss": proof.has_lm_head,
             "data": proof.has_embedding}
    if proof.proof_type != "training" or not sends[ev.direction]:
        return "unfounded", f"a {proof.proof_type} proof of this range sends no {ev.direction} hop"
    if ev.sent == ev.recomputed or ev.error_ppm <= tolerance * 1e6:
        return "unfounded", (f"the re-executed {ev.direction} agrees with the one sent within the tolerance "
                             f"{tolerance:g} ({ev.error_ppm / 1e6:.4g})")
    return None


# ----- the two sides ----------------------------------------------------------------------------
class Coordinator:
    """The driver's key: it signs receipts and registrations (and may file evidence as a validator)."""

    def __init__(self, identity: Identity, backend: str = "auto"):
        self.identity, self.backend = identity, backend

    @classmethod
    def load_or_create(cls, path: str | Path, backend: str = "auto") -> Coordinator:
        """The persistent coordinator key at ``path`` (mode 0600), created on first use: a resumed run
        reopens its ledger under the same key."""
        return cls(Identity.load_or_create(path), backend)

    @property
    def public_key(self) -> bytes:
        return self.identity.public_key

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def sign_receipt(self, receipt: Receipt | dict) -> bytes:
        r = Receipt.coerce(receipt)
        return seal(RECEIPT_DOMAIN, receipt_payload(r), self.identity, self.backend)

    def sign_receipts(self, receipts: Iterable[Receipt | dict | None]) -> list[bytes | None]:
        """One signed receipt per receipt (None stays None: a holder the swarm saw nothing of)."""
        return [None if r is None else self.sign_receipt(r) for r in receipts]

    def sign_registration(self, records: Iterable[NodeRecord | dict | None], model_layers: int | None = None,
                          validators: Iterable[str] = ()) -> bytes:
        """Authorize holder keys (None entries, holders without PoNW, are skipped). ``model_layers``: the
        model's layer count after a live upgrade (None: unchanged). ``validators``: node ids (registered
        here or before) whose evidence the ledger accepts."""
        recs = [r if isinstance(r, NodeRecord) else NodeRecord.from_dict(r) for r in records if r is not None]
        payload = {"v": VERSION, "nodes": [_record_payload(r) for r in recs], "validators": sorted(set(validators)),
                   "model_layers": model_layers, "nonce": new_nonce()}
        return seal(REGISTRATION_DOMAIN, payload, self.identity, self.backend)

    def sign_evidence(self, proof: Proof, check: SpotCheck) -> bytes:
        return sign_evidence(self.identity, proof, check, self.backend)


class Authority:
    """The ledger's side: opens receipts and registrations and checks them against the coordinator's key."""

    def __init__(self, public_key: bytes, backend):
        self.public_key, self.backend = public_key, backend
        self.node_id = node_id_of(public_key)
        try:
            self._key = backend.load_public_key(public_key)
        except ValueError as exc:
            raise AuthorityError("coordinator", f"the coordinator key is not a secp256k1 public key ({exc})") from None

    def verify(self, digest: bytes, signature: bytes) -> bool:
        return self.backend.verify(self._key, digest, signature)

    def receipt(self, data) -> Receipt:
        """A coordinator-signed receipt, opened. Raises AuthorityError('receipt' or 'receipt_signature')."""
        if isinstance(data, (Receipt, dict)):
            raise AuthorityError("receipt", "the receipt is not signed: the ledger takes receipts signed by the "
                                            "coordinator (Coordinator.sign_receipts(receipts))")
        payload, sig, digest = _open(data, RECEIPT_DOMAIN, MAX_RECEIPT_BYTES, "receipt", "receipt")
        receipt = receipt_from_payload(payload)
        if not self.verify(digest, sig):
            raise AuthorityError("receipt_signature", "the receipt is not signed by this ledger's coordinator")
        return receipt

    def registration(self, data) -> Registration:
        """A coordinator-signed registration, opened. Raises AuthorityError('registration' / 'signature')."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise AuthorityError("registration", "register() takes a registration signed by the coordinator "
                                                 "(Coordinator.sign_registration(records)), not plain records")
        p, sig, digest = _open(data, REGISTRATION_DOMAIN, MAX_REGISTRATION_BYTES, "registration", "registration")
        _keys(p, {"v", "nodes", "validators", "model_layers", "nonce"}, "registration", "registration")
        _hex("registration nonce", p["nonce"], _HEX32, "registration")
        _uint("registration model_layers", p["model_layers"], "registration", optional=True)
        if not isinstance(p["nodes"], list) or not isinstance(p["validators"], list):
            raise AuthorityError("registration", "registration nodes and validators must be lists")
        for v in p["validators"]:
            _hex("registration validator", v, _HEX64, "registration")
        records = tuple(_record_from_payload(d, i) for i, d in enumerate(p["nodes"]))
        if not self.verify(digest, sig):
            raise AuthorityError("signature", "the registration is not signed by this ledger's coordinator")
        return Registration(records, tuple(p["validators"]), p["model_layers"], digest.hex())

    def evidence(self, data, validator_key: Callable[[str], object | None]) -> Evidence:
        """Evidence, opened and its signature checked under the validator's key: the coordinator's, or
        ``validator_key(node_id)`` (None: not a registered validator)."""
        ev, sig, digest = open_evidence(data)
        key = self._key if ev.validator == self.node_id else validator_key(ev.validator)
        if key is None:
            raise AuthorityError("unknown_validator", f"evidence signer {ev.validator[:12]}… is not a validator "
                                                      "the coordinator registered")
        if not self.backend.verify(key, digest, sig):
            raise AuthorityError("signature", f"evidence signature does not verify under validator "
                                              f"{ev.validator[:12]}…'s key")
        return ev
