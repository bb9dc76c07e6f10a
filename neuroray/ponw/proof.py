"""Proof of Neural Work: the signed payload, its canonical bytes, and strict parsing of the wire form.

A proof is a JSON object ``{"payload": {...}, "signature": "<128 hex>"}``. Every field that can
change a reward lives inside ``payload`` and is signed. The signed message is::

    DOMAIN || canonical_json(payload)

where ``canonical_json`` is sorted-key, compact (``,`` and ``:``), ASCII-only JSON with no floats
(amounts are integers; losses are micro-nats). ``sha256`` of that message is both the digest the
signature covers and the proof's id (the ledger's replay key).

The wire bytes themselves must be canonical too: :meth:`SignedProof.from_bytes` re-serializes what it
parsed and rejects any difference. So there is exactly one byte string per (payload, signature): a
flipped bit anywhere either breaks parsing, breaks canonical form, or changes the payload or the
signature, and every one of those is rejected.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass, fields

from neuroray.errors import NeurorayError

DOMAIN = b"NEURORAY-PONW-v1\n"
VERSION = 1
PROOF_TYPES = ("training", "inference", "validation")
MAX_INT = 2**53 - 1  # integers every JSON implementation reads exactly
MAX_LOSSES = 64
DEFAULT_MAX_BYTES = 4096

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX128 = re.compile(r"[0-9a-f]{128}")


class ProofError(NeurorayError, ValueError):
    """A proof that is not well formed. ``code`` names the failed check (size, json, schema, canonical)."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


def canonical_json(obj) -> bytes:
    """Sorted-key compact ASCII JSON; the single byte form of a payload."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _no_duplicates(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ProofError("json", f"duplicate key {dup!r} in proof JSON")
    return obj


def _no_floats(text: str):
    raise ProofError("json", f"float {text} in proof JSON: signed fields are integers only")


def _no_constants(text: str):
    raise ProofError("json", f"{text} in proof JSON: NaN and infinities are not JSON numbers")


def strict_json(data: bytes):
    """Parse JSON rejecting duplicate keys, floats, NaN/Infinity and non-UTF-8 bytes."""
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates, parse_float=_no_floats,
                          parse_constant=_no_constants)
    except ProofError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProofError("json", f"proof is not valid JSON ({str(exc).splitlines()[0]})") from None


def _uint(name: str, value) -> None:
    # bool is a subclass of int: refuse it explicitly, true is not 1 here
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise ProofError("schema", f"{name} must be an integer in [0, 2^53), got {value!r}")


def _bool(name: str, value) -> None:
    if type(value) is not bool:
        raise ProofError("schema", f"{name} must be true or false, got {value!r}")


def _hex64_or_empty(name: str, value) -> None:
    if not (value == "" or (type(value) is str and _HEX64.fullmatch(value))):
        raise ProofError("schema", f"{name} must be 64 lowercase hex digits or empty, got {value!r}")


def _check_node_id(value) -> None:
    if not (type(value) is str and _HEX64.fullmatch(value)):
        raise ProofError("schema", f"node_id must be 64 lowercase hex digits, got {value!r}")


@dataclass(frozen=True)
class Proof:
    """The signed payload of one Proof of Neural Work (all fields signed, all integers/strings/bools).

    ``theta0_losses`` are the losses (micro-nats) of the microbatches at stream positions
    ``data_position, data_position + 1, ...`` computed at ``theta0_before``: what a spot check recomputes.
    """

    node_id: str
    proof_type: str
    timestamp_ms: int
    nonce: str  # 128 random bits, hex: (node_id, nonce) is unique per proof
    outer_round: int
    tokens_processed: int
    training_batches: int
    layers_held: int
    layer_start: int
    has_embedding: bool
    has_lm_head: bool
    shard_id: int | None  # Drivers: the shard the round's first batch came from; others None
    data_position: int  # Drivers: stream position (microbatches) of the round's first batch
    theta0_before: str  # sha256 of the range's theta0 the round started from ("" if n/a)
    theta0_after: str  # sha256 of the theta0 the outer step produced
    pseudo_gradient: str  # sha256 of the delta this node sent to the aggregator
    theta0_losses: tuple[int, ...] = ()
    v: int = VERSION

    def __post_init__(self):
        # A holder must not be able to build a proof the verifier would refuse as malformed.
        object.__setattr__(self, "theta0_losses", tuple(self.theta0_losses))
        validate_payload(self.payload())

    def payload(self) -> dict:
        d = {name: getattr(self, name) for name in _FIELDS}
        d["theta0_losses"] = list(self.theta0_losses)
        return d

    def message(self) -> bytes:
        """The exact bytes the signature covers."""
        return DOMAIN + canonical_json(self.payload())

    def digest(self) -> bytes:
        cached = self.__dict__.get("_digest")
        if cached is None:
            cached = hashlib.sha256(self.message()).digest()
            object.__setattr__(self, "_digest", cached)  # frozen: the digest never changes
        return cached

    @property
    def proof_id(self) -> str:
        """Hex sha256 of the signed message: the replay key (independent of the signature bytes)."""
        return self.digest().hex()

    def sign(self, identity, backend: str = "auto") -> SignedProof:
        if identity.node_id != self.node_id:
            raise ProofError("schema", f"identity {identity.node_id[:12]}… cannot sign a proof of node {self.node_id[:12]}…")
        return SignedProof(self, identity.sign_digest(self.digest(), backend))

    @classmethod
    def from_payload(cls, payload) -> Proof:
        """Validate a parsed payload dict and build the proof (validated once, not twice)."""
        validate_payload(payload)
        proof = cls.__new__(cls)
        for name in _FIELDS:
            object.__setattr__(proof, name, payload[name])
        object.__setattr__(proof, "theta0_losses", tuple(payload["theta0_losses"]))
        return proof


_FIELDS = tuple(f.name for f in fields(Proof))
_FIELD_SET = frozenset(_FIELDS)


def validate_payload(p) -> None:
    """Schema of a payload dict: exact key set, types and ranges. Raises ProofError('schema')."""
    if not isinstance(p, dict):
        raise ProofError("schema", f"payload must be a JSON object, got {type(p).__name__}")
    if p.keys() != _FIELD_SET:
        missing, extra = sorted(_FIELD_SET - p.keys()), sorted(p.keys() - _FIELD_SET)
        raise ProofError("schema", f"payload keys wrong: missing {missing}, unexpected {extra}")
    if p["v"] != VERSION or type(p["v"]) is not int:
        raise ProofError("schema", f"proof version {p['v']!r} is not {VERSION}")
    _check_node_id(p["node_id"])
    if p["proof_type"] not in PROOF_TYPES or type(p["proof_type"]) is not str:
        raise ProofError("schema", f"proof_type must be one of {PROOF_TYPES}, got {p['proof_type']!r}")
    for name in ("timestamp_ms", "outer_round", "tokens_processed", "training_batches", "layers_held",
                 "layer_start", "data_position"):
        _uint(name, p[name])
    if not (type(p["nonce"]) is str and _HEX32.fullmatch(p["nonce"])):
        raise ProofError("schema", f"nonce must be 32 lowercase hex digits, got {p['nonce']!r}")
    _bool("has_embedding", p["has_embedding"])
    _bool("has_lm_head", p["has_lm_head"])
    if p["shard_id"] is not None:
        _uint("shard_id", p["shard_id"])
    for name in ("theta0_before", "theta0_after", "pseudo_gradient"):
        _hex64_or_empty(name, p[name])
    losses = p["theta0_losses"]
    if not isinstance(losses, (list, tuple)) or len(losses) > MAX_LOSSES:
        raise ProofError("schema", f"theta0_losses must be a list of at most {MAX_LOSSES} integers")
    for x in losses:
        _uint("theta0_losses[]", x)


@dataclass(frozen=True)
class SignedProof:
    """A payload and its 64-byte ``r || s`` signature; :meth:`to_bytes` is the wire form."""

    proof: Proof
    signature: bytes

    def to_bytes(self) -> bytes:
        return canonical_json({"payload": self.proof.payload(), "signature": self.signature.hex()})

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> SignedProof:
        """Strictly parse the wire form. Raises ProofError with code size, json, schema or canonical."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ProofError("schema", f"a proof is bytes, got {type(data).__name__}")
        if len(data) > max_bytes:
            raise ProofError("size", f"proof is {len(data)} bytes, the limit is {max_bytes}")
        data = bytes(data)
        env = strict_json(data)
        if not isinstance(env, dict) or env.keys() != {"payload", "signature"}:
            got = sorted(env) if isinstance(env, dict) else type(env).__name__
            raise ProofError("schema", f"proof must be an object with keys payload and signature, got {got}")
        sig = env["signature"]
        if not (type(sig) is str and _HEX128.fullmatch(sig)):
            raise ProofError("schema", "signature must be 128 lowercase hex digits (r || s)")
        proof = Proof.from_payload(env["payload"])
        payload_json = canonical_json(env["payload"])
        # {"payload":<payload>,"signature":"<hex>"} is the whole canonical envelope
        if data != b'{"payload":' + payload_json + b',"signature":"' + sig.encode("ascii") + b'"}':
            raise ProofError("canonical", "proof bytes are not canonical (sorted keys, compact separators, ASCII)")
        object.__setattr__(proof, "_digest", hashlib.sha256(DOMAIN + payload_json).digest())
        return cls(proof, bytes.fromhex(sig))


def new_nonce() -> str:
    return secrets.token_hex(16)


def now_ms() -> int:
    return int(time.time() * 1000)


def loss_to_micro(loss: float) -> int:
    """A loss in nats as integer micro-nats (signed fields carry no floats)."""
    if not loss == loss or loss < 0 or loss == float("inf"):
        raise ProofError("schema", f"loss {loss!r} must be a finite non-negative number")
    return int(round(loss * 1_000_000))
