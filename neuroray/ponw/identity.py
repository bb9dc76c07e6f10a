"""A holder's identity: a persistent secp256k1 key whose public key names the node.

``node_id = sha256(compressed public key)`` in hex. The key file is created with mode 0600 and
reused on restart, so a holder keeps its node id (and with it its data shard) across runs.
Signing goes through :mod:`neuroray.ponw.crypto`, which picks the fast libsecp256k1 backend when
it is installed; both backends produce identical deterministic signatures.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ecdsa import SECP256k1, SigningKey

from neuroray.ponw import crypto


@dataclass
class Identity:
    signing_key: SigningKey

    @property
    def public_key(self) -> bytes:
        return self.signing_key.get_verifying_key().to_string("compressed")

    @property
    def node_id(self) -> str:
        return node_id_of(self.public_key)

    @property
    def secret(self) -> bytes:
        """The 32-byte private scalar (never leaves the holder; used to sign)."""
        return self.signing_key.to_string()

    def sign_digest(self, digest: bytes, backend: str = "auto") -> bytes:
        """Deterministic low-S ``r || s`` signature of a SHA-256 digest."""
        return crypto.backend(backend).sign(self.secret, digest)

    @classmethod
    def from_secret(cls, secret: bytes) -> "Identity":
        """An identity from a known 32-byte scalar (test vectors, key import)."""
        return cls(SigningKey.from_string(secret, curve=SECP256k1))

    @classmethod
    def generate(cls) -> "Identity":
        return cls(SigningKey.generate(curve=SECP256k1))

    @classmethod
    def load_or_create(cls, path: str | Path) -> "Identity":
        path = Path(path).expanduser()
        if path.exists():
            try:
                key = SigningKey.from_pem(path.read_bytes())
            except Exception as exc:
                raise ValueError(f"key file {path} is not a PEM secp256k1 key ({exc}); move it away to get a new identity") from None
            if key.curve != SECP256k1:
                raise ValueError(f"key file {path} holds a {key.curve.name} key, not secp256k1; move it away to get a new identity")
            return cls(key)
        ident = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(ident.signing_key.to_pem())
        os.replace(tmp, path)
        return ident


def node_id_of(public_key: bytes) -> str:
    """``sha256(compressed public key)`` as lowercase hex: the name of a node everywhere."""
    return hashlib.sha256(public_key).hexdigest()
