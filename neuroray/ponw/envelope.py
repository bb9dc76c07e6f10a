"""Signed envelopes: the one wire form of everything the ledger accepts on someone's authority.

A proof (holder), a receipt and a registration (coordinator), and evidence (validator) all travel as
``{"payload": {...}, "signature": "<128 hex>"}`` with the same discipline as proofs (proof.py): the
signature covers ``sha256(domain || canonical_json(payload))``; JSON is strict (no floats, no NaN, no
duplicate keys); the wire bytes must be canonical. Each kind has its own domain tag, so a signature
made for one kind can never be passed off as another.
"""

from __future__ import annotations

import hashlib
import re

from neuroray.ponw.proof import ProofError, canonical_json, strict_json

_HEX128 = re.compile(r"[0-9a-f]{128}")


class EnvelopeError(ProofError):
    """A signed envelope that is not well formed (``code``: size, json, schema or canonical)."""


def seal(domain: bytes, payload: dict, identity, backend: str = "auto") -> bytes:
    """The canonical wire bytes of ``payload`` signed by ``identity`` under ``domain``."""
    body = canonical_json(payload)
    signature = identity.sign_digest(hashlib.sha256(domain + body).digest(), backend)
    return canonical_json({"payload": payload, "signature": signature.hex()})


def open_envelope(data, domain: bytes, max_bytes: int, what: str) -> tuple[dict, bytes, bytes]:
    """Strictly parse a sealed envelope: ``(payload, signature, digest)``. The signature is NOT checked
    here (the caller knows which key must have made it). Raises EnvelopeError naming ``what``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EnvelopeError("schema", f"a {what} is signed wire bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise EnvelopeError("size", f"{what} is {len(data)} bytes, the limit is {max_bytes}")
    data = bytes(data)
    try:
        env = strict_json(data)
    except ProofError as exc:
        raise EnvelopeError(exc.code, f"{what}: {exc}") from None
    if not isinstance(env, dict) or env.keys() != {"payload", "signature"}:
        raise EnvelopeError("schema", f"{what} must be an object with keys payload and signature")
    sig, payload = env["signature"], env["payload"]
    if not (type(sig) is str and _HEX128.fullmatch(sig)):
        raise EnvelopeError("schema", f"{what} signature must be 128 lowercase hex digits (r || s)")
    if not isinstance(payload, dict):
        raise EnvelopeError("schema", f"{what} payload must be a JSON object")
    body = canonical_json(payload)
    if data != b'{"payload":' + body + b',"signature":"' + sig.encode("ascii") + b'"}':
        raise EnvelopeError("canonical", f"{what} bytes are not canonical (sorted keys, compact separators, ASCII)")
    return payload, bytes.fromhex(sig), hashlib.sha256(domain + body).digest()
