"""secp256k1 ECDSA over SHA-256 with two interchangeable backends.

Wire format of a signature: 64 bytes ``r || s`` (big-endian, 32 bytes each) with **low S**
(``s <= n/2``). Signing is deterministic (RFC 6979, HMAC-SHA256), so both backends produce the
*same* bytes for the same key and digest; tests pin that with checked-in vectors.

- ``coincurve`` (libsecp256k1) when it is installed: ~50x faster, used for the ledger's hot path.
- ``ecdsa`` (pure Python) otherwise: always available, slow (~200 verifications/s).

High-S signatures are refused here, before either backend sees them: libsecp256k1 would refuse them
anyway, python-ecdsa would accept them, and the two must agree on what is valid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import ecdsa
from ecdsa.util import sigencode_string_canonize

try:  # optional fast backend
    import coincurve
except ImportError:  # pragma: no cover - depends on the environment
    coincurve = None

# Order of the secp256k1 group.
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_N = N // 2
SIG_BYTES = 64
PUBKEY_BYTES = 33  # compressed SEC1


def is_low_s(sig: bytes) -> bool:
    """True for a well-formed 64-byte signature with 0 < r < n and 0 < s <= n/2."""
    if len(sig) != SIG_BYTES:
        return False
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:], "big")
    return 0 < r < N and 0 < s <= HALF_N


def high_s_twin(sig: bytes) -> bytes:
    """The other valid ECDSA signature ``(r, n - s)`` of the same message (for attack tests)."""
    r, s = sig[:32], int.from_bytes(sig[32:], "big")
    return r + (N - s).to_bytes(32, "big")


def _der_int(value: bytes) -> bytes:
    value = value.lstrip(b"\x00") or b"\x00"
    if value[0] & 0x80:  # DER integers are signed: keep them positive
        value = b"\x00" + value
    return b"\x02" + bytes([len(value)]) + value


def compact_to_der(sig: bytes) -> bytes:
    body = _der_int(sig[:32]) + _der_int(sig[32:])
    return b"\x30" + bytes([len(body)]) + body


def der_to_compact(der: bytes) -> bytes:
    """Parse the strict DER that libsecp256k1 emits into ``r || s``."""
    assert der[0] == 0x30 and der[1] == len(der) - 2, "not a DER sequence"
    out, pos = b"", 2
    for _ in range(2):
        assert der[pos] == 0x02, "not a DER integer"
        length = der[pos + 1]
        out += der[pos + 2:pos + 2 + length].lstrip(b"\x00").rjust(32, b"\x00")
        pos += 2 + length
    return out


@dataclass(frozen=True)
class Backend:
    """One implementation of sign / verify / key parsing; see :func:`backend`."""

    name: str

    def public_key(self, secret: bytes) -> bytes:
        """Compressed SEC1 public key of a 32-byte secret."""
        if self.name == "coincurve":
            return coincurve.PrivateKey(secret).public_key.format(compressed=True)
        sk = ecdsa.SigningKey.from_string(secret, curve=ecdsa.SECP256k1)
        return sk.get_verifying_key().to_string("compressed")

    def load_public_key(self, public_key: bytes) -> Any:
        """Parse (and validate) a compressed public key once; the result feeds :meth:`verify`.

        Raises ValueError if the bytes are not a point on the curve.
        """
        if len(public_key) != PUBKEY_BYTES or public_key[0] not in (2, 3):
            raise ValueError("public key must be 33 bytes of compressed SEC1")
        if self.name == "coincurve":
            return coincurve.PublicKey(public_key)
        try:
            return ecdsa.VerifyingKey.from_string(public_key, curve=ecdsa.SECP256k1, hashfunc=hashlib.sha256)
        except ecdsa.errors.MalformedPointError as exc:
            raise ValueError(f"public key is not on secp256k1 ({exc})") from None

    def sign(self, secret: bytes, digest: bytes) -> bytes:
        """Deterministic (RFC 6979) low-S signature of a 32-byte digest, as ``r || s``."""
        assert len(digest) == 32, "sign a SHA-256 digest"
        if self.name == "coincurve":
            # libsecp256k1 always emits low-S signatures with RFC 6979 nonces.
            return der_to_compact(coincurve.PrivateKey(secret).sign(digest, hasher=None))
        sk = ecdsa.SigningKey.from_string(secret, curve=ecdsa.SECP256k1, hashfunc=hashlib.sha256)
        return sk.sign_digest_deterministic(digest, hashfunc=hashlib.sha256, sigencode=sigencode_string_canonize)

    def verify(self, key: Any, digest: bytes, sig: bytes) -> bool:
        """True iff ``sig`` is a low-S signature of ``digest`` by ``key`` (from :meth:`load_public_key`)."""
        if not is_low_s(sig):
            return False
        if self.name == "coincurve":
            return key.verify(compact_to_der(sig), digest, hasher=None)
        try:
            return key.verify_digest(sig, digest)
        except ecdsa.BadSignatureError:
            return False


ECDSA = Backend("ecdsa")
COINCURVE = Backend("coincurve") if coincurve is not None else None


def backend(name: str = "auto") -> Backend:
    """``"auto"``: coincurve when installed, else ecdsa. ``"ecdsa"`` / ``"coincurve"`` force one."""
    if name == "auto":
        return COINCURVE or ECDSA
    if name == "ecdsa":
        return ECDSA
    if name == "coincurve":
        if COINCURVE is None:
            raise ValueError("the coincurve backend is not installed: pip install coincurve, or use 'ecdsa'")
        return COINCURVE
    raise ValueError(f"unknown signature backend {name!r}; choose auto, ecdsa or coincurve")


def available() -> list[Backend]:
    return [b for b in (COINCURVE, ECDSA) if b is not None]
