"""Stable per-name seeds: a tensor's random init depends on (run seed, its name), never on what else is built.

That is what makes a stage's parameters equal the monolith's whatever the split, and grown rows or
layers reproducible on every holder. Python's ``hash()`` is salted per process, so SHA-256 it is.
"""

from __future__ import annotations

import hashlib


def named_seed(seed: int, name: str) -> int:
    """A 63-bit seed for ``name`` under run seed ``seed``."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
