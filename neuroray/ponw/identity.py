"""A holder's identity: a persistent secp256k1 key whose public key names the node.

``node_id = sha256(compressed public key)`` in hex. The key file is created with mode 0600 and
reused on restart, so a holder keeps its node id (and with it its data shard) across runs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ecdsa import SECP256k1, SigningKey


@dataclass
class Identity:
    signing_key: SigningKey

    @property
    def public_key(self) -> bytes:
        return self.signing_key.get_verifying_key().to_string("compressed")

    @property
    def node_id(self) -> str:
        return hashlib.sha256(self.public_key).hexdigest()

    @classmethod
    def generate(cls) -> "Identity":
        return cls(SigningKey.generate(curve=SECP256k1))

    @classmethod
    def load_or_create(cls, path: str | Path) -> "Identity":
        path = Path(path).expanduser()
        if path.exists():
            try:
                return cls(SigningKey.from_pem(path.read_bytes()))
            except Exception as exc:
                raise ValueError(f"key file {path} is not a PEM secp256k1 key ({exc}); move it away to get a new identity") from None
        ident = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(ident.signing_key.to_pem())
        os.replace(tmp, path)
        return ident
